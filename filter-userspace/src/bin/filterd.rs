//! `filterd`: load the classifier onto interfaces, answer rejected requests, serve the API.
//!
//! Fail mode: by default the classifiers stay attached when filterd exits or crashes (TCX
//! links pinned under `--pin-dir`, or netlink tc filters, which belong to no process), so they
//! keep enforcing the last policy, and a restarted filterd swaps its new programs in without a
//! gap. `--fail-open` detaches them when filterd exits: TCX links belong to the process and go
//! however it exits; netlink filters are deleted at a clean exit (a crash leaves them).
//! `--attach` picks TCX (kernel ≥ 6.6) or netlink tc; `auto` takes TCX where the kernel has it.
//!
//! The policy belongs to the operator (`--policy FILE|DIR`: read-only, watched) or to the API
//! (`--state FILE`: the daemon's own file). `--check` validates it and exits. Under systemd
//! (`Type=notify`) filterd says `READY=1` once the classifiers are attached on every
//! interface and the API serves.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use filter_userspace::api::{self, Actor, PolicyStore, Reloaded};
use filter_userspace::cli::{Filterd as Args, LogFormat};
use filter_userspace::sd_notify::Notifier;
use filter_userspace::{auth, dataplane, document, responder, serve, DaemonObserver, DaemonSink};
use tokio::signal::unix::{signal, SignalKind};

fn main() {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .with_target(true)
            .init(),
    }
    if args.check {
        std::process::exit(check(&args));
    }
    if let Err(e) = run(args) {
        if let Ok(Some(n)) = Notifier::from_env() {
            let _ = n.status(&format!("failed: {e:#}"));
        }
        eprintln!("filterd: {e:#}");
        std::process::exit(1);
    }
}

fn store_of(args: &Args) -> Option<PolicyStore> {
    match (&args.policy, &args.state) {
        (Some(p), _) => Some(PolicyStore::ReadOnly(p.clone())),
        (None, Some(s)) => Some(PolicyStore::State(s.clone())),
        (None, None) => None,
    }
}

/// `filterd --check`: every error of the policy source, placed; exit 0 (valid) or 1.
fn check(args: &Args) -> i32 {
    let Some(store) = store_of(args) else {
        eprintln!("filterd: --check needs --policy or --state");
        return 2;
    };
    let shown = store.path().display();
    match store.load(false) {
        Ok((policy, _)) => {
            println!(
                "filterd: policy {shown} is valid: {} rules ({} exact, {} prefix), default {}",
                policy.rules.len(),
                policy.count(filter_userspace::policy::MatchKind::Exact),
                policy.count(filter_userspace::policy::MatchKind::Prefix),
                match policy.default {
                    filter_userspace::policy::DefaultPolicy::Any => "any".to_owned(),
                    d => d
                        .effective()
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            );
            0
        }
        Err(diagnostics) => {
            eprintln!("{}", document::render_all(&diagnostics));
            eprintln!(
                "filterd: policy {shown}: {} error{}",
                diagnostics.len(),
                if diagnostics.len() == 1 { "" } else { "s" }
            );
            1
        }
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (it loads eBPF programs and sends raw packets: CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW)");
    }
    let notifier = Notifier::from_env().context("$NOTIFY_SOCKET")?;
    for iface in &args.ifaces {
        let name = std::ffi::CString::new(iface.as_str()).context("interface name contains NUL")?;
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            bail!("interface {iface:?} does not exist (see `ip link`)");
        }
    }
    // Everything that can be wrong with the configuration is found before the kernel is touched.
    let store = store_of(&args);
    let (policy, revision) = match &store {
        Some(s) => s.load(true).map_err(|d| {
            anyhow::anyhow!(
                "refusing to start with an invalid policy:\n{}",
                document::render_all(&d)
            )
        })?,
        None => {
            tracing::warn!(
                "no --policy or --state: the policy lives in memory and API changes are lost on restart"
            );
            (filter_userspace::policy::Policy::default(), 0)
        }
    };
    // A read-only source's policy starts at revision 1 (there is no file revision to keep).
    let revision = match &store {
        Some(PolicyStore::ReadOnly(_)) => 1,
        _ => revision,
    };
    let token = if args.no_auth {
        if !args.api.ip().is_loopback() {
            bail!(
                "--no-auth with --api {}: the API would be open to the network; drop --no-auth (a token is generated into --token-file) or listen on loopback",
                args.api
            );
        }
        tracing::warn!("--no-auth: anyone on this host can change the policy");
        None
    } else {
        let (token, source) = auth::load_or_create(&args.token_file)?;
        if source == auth::TokenSource::Generated {
            tracing::info!(file = %args.token_file.display(), "generated the API token");
        }
        Some(token)
    };
    // Bind before touching the kernel, so a busy port fails fast and changes nothing.
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("cannot listen on {} for the API", args.api))?;
    let unix = match &args.api_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {} for the API", path.display()))?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            Some(l)
        }
        None => None,
    };

    let opts = dataplane::LoadOptions {
        max_connections: args.max_connections,
        adopt_window: Duration::from_secs(args.adopt_window),
        verifier_log_dir: None,
        bpf_log: args.bpf_log,
    };
    let kernel = filter_userspace::verifier::kernel_release();
    let mode = dataplane::AttachMode::choose(args.attach, &args.ifaces[0])?;
    let mut dataplane = dataplane::Dataplane::load_opts(&args.ports, Some(&args.pin_dir), &opts)?;
    tracing::info!(kernel, attach = %mode, version = filter_userspace::LONG_VERSION, "classifiers verified and loaded");
    dataplane.set_dry_run(args.dry_run)?;
    dataplane.apply(&policy)?;
    let ring = dataplane
        .take_events()
        .context("the event ring was already taken")?;
    let stats = Arc::new(responder::ResponderStats::default());
    stats.hits.set_policy(&policy);
    let responder = responder::Responder::new(stats.clone())
        .context("cannot open the AF_PACKET socket the responder sends through")?;
    // The policy is in the new program's maps before any interface sees the program.
    for iface in &args.ifaces {
        let how = dataplane.attach_kept(iface, mode)?;
        tracing::info!(iface, ?how, attach = %mode, "classifier attached");
    }
    for gone in dataplane.unpin_others(&args.ifaces) {
        tracing::info!(
            iface = gone,
            "detached a pinned classifier from an interface no longer configured"
        );
    }
    if args.fail_open {
        // Adopted or fresh, the classifiers now go when this process exits.
        dataplane.detach_at_exit();
        if mode == dataplane::AttachMode::Netlink {
            tracing::warn!(
                "fail-open with netlink tc: the filters are deleted when filterd exits cleanly; if it crashes they stay and enforce the last policy until filterd starts again or `tc filter del dev IFACE ingress pref {} && tc filter del dev IFACE egress pref {}`",
                filter_userspace::tc_netlink::PRIORITY,
                filter_userspace::tc_netlink::PRIORITY
            );
        }
    }
    let fail_mode = if args.fail_open { "open" } else { "closed" };
    let source = match &store {
        Some(s) => format!("{} {}", s.kind(), s.path().display()),
        None => "memory".into(),
    };
    tracing::info!(
        ifaces = ?args.ifaces,
        ports = ?args.ports,
        rules = policy.rules.len(),
        revision,
        policy = %source,
        api = %args.api,
        dry_run = args.dry_run,
        fail_mode,
        attach = %mode,
        "filtering ({})",
        match (args.fail_open, mode) {
            (true, _) => "fail-open: the classifier detaches when filterd exits",
            (false, dataplane::AttachMode::Tcx) =>
                "fail-closed: the pinned classifier keeps enforcing when filterd exits",
            (false, dataplane::AttachMode::Netlink) =>
                "fail-closed: the netlink filters keep enforcing when filterd exits",
        }
    );

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let responder_task = tokio::spawn(responder.run(ring, shutdown_rx.clone()));
    if let Some(log) = dataplane.take_kernel_log() {
        let stop = shutdown_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = filter_userspace::kernel_log::run(log, stop).await {
                tracing::warn!("the classifiers' log stopped: {e}");
            }
        });
        tracing::info!("the classifiers' diagnostics are on (--bpf-log)");
    }
    let observer = Arc::new(DaemonObserver {
        dataplane: dataplane.observer(&args.ifaces)?,
        responder: stats.clone(),
    });
    let events = stats.events.clone();
    let state = api::AppState::with(
        policy,
        revision,
        Box::new(DaemonSink {
            dataplane: Some(dataplane),
            responder: stats,
            observer,
        }),
        store.clone(),
        token,
        api::DaemonInfo {
            fail_mode: fail_mode.into(),
            policy_file: store.as_ref().map(|s| s.path().display().to_string()),
        },
    );
    let header_timeout = Duration::from_secs(args.api_header_timeout);
    let tcp_router = api::host_guard(
        api::router(state.clone()),
        api::AllowedHosts::new(args.api, &args.api_hosts),
    );
    let mut servers = vec![tokio::spawn(serve::serve(
        listener,
        tcp_router,
        header_timeout,
        shutdown_rx.clone(),
    ))];
    if let Some(unix) = unix {
        servers.push(tokio::spawn(serve::serve(
            unix,
            api::router(state.clone()),
            header_timeout,
            shutdown_rx.clone(),
        )));
    }
    let ready_status = format!(
        "filtering {} on {} ({} rules, revision {revision}, policy {source})",
        args.ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.ifaces.join(", "),
        state.policy().rules.len()
    );
    if let Some(n) = &notifier {
        n.ready(&ready_status)
            .context("telling systemd filterd is ready")?;
    }

    // The operator's source is watched: a change is checked and applied, or refused.
    let watch = match (&store, args.watch_interval) {
        (Some(PolicyStore::ReadOnly(path)), secs) if secs > 0 => {
            let (state, path) = (state.clone(), path.clone());
            let mut stop = shutdown_rx.clone();
            Some(tokio::spawn(async move {
                let mut seen = document::fingerprint(&path);
                let mut tick = tokio::time::interval(Duration::from_secs(secs));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tick.tick() => {}
                    }
                    let now = document::fingerprint(&path);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    let st = state.clone();
                    let actor = Actor::reload(&format!("the watch on {}", path.display()));
                    log_reload(
                        "the policy source changed",
                        tokio::task::spawn_blocking(move || st.reload(&actor)).await,
                    );
                }
            }))
        }
        _ => None,
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: exiting"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: exiting"); break; }
            _ = hup.recv() => {
                if let Some(n) = &notifier {
                    let _ = n.reloading();
                }
                let st = state.clone();
                let result = tokio::task::spawn_blocking(move || st.reload(&Actor::reload("SIGHUP"))).await;
                let status = match &result {
                    Ok(Ok(_)) => ready_status.clone(),
                    Ok(Err(e)) => format!("reload failed, the policy in force is kept: {e}"),
                    Err(e) => format!("reload failed: {e}"),
                };
                log_reload("SIGHUP", result);
                if let Some(n) = &notifier {
                    let _ = n.notify(&format!("READY=1\nSTATUS={}", status.replace('\n', " ")));
                }
            }
        }
    }
    if let Some(n) = &notifier {
        let _ = n.stopping();
    }
    let _ = shutdown_tx.send(true);
    events.close();
    if let Some(w) = watch {
        let _ = w.await;
    }
    if let Ok(Err(e)) = responder_task.await {
        tracing::warn!(error = %e, "responder stopped with an error");
    }
    for s in servers {
        let _ = s.await;
    }
    if let Some(path) = &args.api_socket {
        let _ = std::fs::remove_file(path);
    }
    state.release(args.fail_open);
    match (args.fail_open, mode) {
        (true, _) => tracing::info!("fail-open: the classifier is detached"),
        (false, dataplane::AttachMode::Tcx) => {
            tracing::info!(pins = %args.pin_dir.join("links").display(), "fail-closed: the classifier stays attached and enforces the last policy; remove the pins to detach")
        }
        (false, dataplane::AttachMode::Netlink) => tracing::info!(
            "fail-closed: the netlink filters stay attached and enforce the last policy; `tc filter del dev IFACE ingress pref {p}` and `... egress pref {p}` detach them",
            p = filter_userspace::tc_netlink::PRIORITY
        ),
    }
    Ok(())
}

fn log_reload(
    why: &str,
    result: Result<Result<Reloaded, api::ReloadError>, tokio::task::JoinError>,
) {
    match result {
        Ok(Ok(Reloaded::Applied(rev))) => {
            tracing::info!(revision = rev, "{why}: policy reloaded")
        }
        Ok(Ok(Reloaded::Unchanged(rev))) => {
            tracing::info!(
                revision = rev,
                "{why}: the source holds the policy in force"
            )
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "{why}: policy not reloaded; the policy in force is unchanged")
        }
        Err(e) => tracing::error!(error = %e, "{why}: reload task failed"),
    }
}
