//! `filterd`: load the classifier onto interfaces, answer rejected requests, serve the API.
//!
//! Fail mode: by default the classifiers stay attached when filterd exits or crashes (TCX
//! links pinned under `--pin-dir`, or netlink tc filters, which belong to no process), so they
//! keep enforcing the last policy, and a restarted filterd swaps its new programs in without a
//! gap. `--fail-open` detaches them when filterd exits: TCX links belong to the process and go
//! however it exits; netlink filters are deleted at a clean exit (a crash leaves them).
//! `--attach` picks TCX (kernel ≥ 6.6) or netlink tc; `auto` takes TCX where the kernel has it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use filter_userspace::{api, auth, dataplane, policy, responder, serve, DaemonSink};
use tokio::signal::unix::{signal, SignalKind};

/// HTTP method firewall daemon: enforces allowed methods per path in the kernel and answers
/// violations with `405 Method Not Allowed`.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Interface to filter ingress traffic on (repeatable).
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    /// TCP destination port carrying plaintext HTTP/1.x (repeatable).
    #[arg(long = "port", default_values_t = [80u16])]
    ports: Vec<u16>,
    /// Policy file (TOML). Loaded at start (an invalid file stops the start), reloaded on
    /// SIGHUP, and rewritten atomically on every accepted API change. Without it, API changes
    /// are lost on restart.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// TCP address of the REST API.
    #[arg(long, default_value = "127.0.0.1:9405")]
    api: SocketAddr,
    /// Also serve the REST API on this Unix socket (mode 0600).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// File holding the API's bearer token; generated (mode 0600) if missing.
    #[arg(long, default_value = auth::DEFAULT_TOKEN_FILE)]
    token_file: PathBuf,
    /// Serve the API without a token. Refused unless the API listens on loopback only.
    #[arg(long)]
    no_auth: bool,
    /// Count and log what would be rejected; block nothing.
    #[arg(long)]
    dry_run: bool,
    /// Detach the classifier when filterd exits (default: keep enforcing via pinned TCX links
    /// or netlink filters). With netlink tc a crash still leaves the filters attached.
    #[arg(long)]
    fail_open: bool,
    /// How to attach: TCX links (kernel 6.6 and later), netlink tc (clsact qdisc, cls_bpf
    /// filters; any kernel), or auto (TCX where the kernel has it, else netlink).
    #[arg(long, value_enum, default_value_t = dataplane::AttachChoice::Auto)]
    attach: dataplane::AttachChoice,
    /// bpffs directory for the pinned links and counters (bpffs is mounted at /sys/fs/bpf if
    /// it is not).
    #[arg(long, default_value = dataplane::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Connections the classifier follows at once. When the table is full the least recently
    /// active connection's state is evicted, and that connection's next data segment is
    /// refused (503, backend reset): size it above the host's peak of concurrent connections.
    #[arg(long, default_value_t = filter_common::CONNS_MAX, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Seconds after start during which connections already open (no state in the new
    /// classifier) are adopted at their next segment; afterwards a connection without state
    /// is one whose state was evicted, and its segment is refused.
    #[arg(long, default_value_t = dataplane::DEFAULT_ADOPT_WINDOW.as_secs())]
    adopt_window: u64,
    /// Seconds an API client may take to send a request's line and headers; a connection
    /// that has not (slowloris), or that stays idle that long, is closed.
    #[arg(long, default_value_t = serve::HEADER_READ_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    api_header_timeout: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("filterd: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (it loads eBPF programs and sends raw packets: CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW)");
    }
    for iface in &args.ifaces {
        let name = std::ffi::CString::new(iface.as_str()).context("interface name contains NUL")?;
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            bail!("interface {iface:?} does not exist (see `ip link`)");
        }
    }
    // Everything that can be wrong with the configuration is found before the kernel is touched.
    let (policy, revision) = match &args.policy {
        Some(path) => policy::load_document(path).with_context(|| {
            if path.exists() {
                "refusing to start with an invalid policy".to_owned()
            } else {
                format!(
                    "create {} (an empty file is an empty policy: every method allowed)",
                    path.display()
                )
            }
        })?,
        None => {
            tracing::warn!(
                "no --policy file: API changes are not persisted and are lost on restart"
            );
            (policy::Policy::default(), 0)
        }
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
        adopt_window: std::time::Duration::from_secs(args.adopt_window),
        verifier_log_dir: None,
    };
    let kernel = filter_userspace::verifier::kernel_release();
    let mode = dataplane::AttachMode::choose(args.attach, &args.ifaces[0])?;
    let mut dataplane = dataplane::Dataplane::load_opts(&args.ports, Some(&args.pin_dir), &opts)?;
    tracing::info!(kernel, attach = %mode, "classifiers verified and loaded");
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
    tracing::info!(
        ifaces = ?args.ifaces,
        ports = ?args.ports,
        rules = policy.rules.len(),
        revision,
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
    let state = api::AppState::with(
        policy,
        revision,
        Box::new(DaemonSink {
            dataplane: Some(dataplane),
            responder: stats,
        }),
        args.policy.clone().map(|path| api::PolicyStore { path }),
        token,
        api::DaemonInfo {
            fail_mode: fail_mode.into(),
            policy_file: args.policy.as_ref().map(|p| p.display().to_string()),
        },
    );
    let header_timeout = std::time::Duration::from_secs(args.api_header_timeout);
    let mut servers = vec![tokio::spawn(serve::serve(
        listener,
        api::router(state.clone()),
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

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: exiting"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: exiting"); break; }
            _ = hup.recv() => {
                let st = state.clone();
                match tokio::task::spawn_blocking(move || st.reload()).await {
                    Ok(Ok(rev)) => tracing::info!(revision = rev, "SIGHUP: policy file reloaded"),
                    Ok(Err(e)) => tracing::error!(error = %e, "SIGHUP: policy file not reloaded; the policy in force is unchanged"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload task failed"),
                }
            }
        }
    }
    let _ = shutdown_tx.send(true);
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
