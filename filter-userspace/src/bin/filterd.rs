//! `filterd`: load the classifier onto interfaces, answer rejected requests, serve the API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use filter_userspace::{api, dataplane::Dataplane, policy, responder, DaemonSink};
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
    /// Policy file (TOML) loaded at start.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:9405")]
    api: SocketAddr,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
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
    let policy = match &args.policy {
        Some(path) => policy::load_file(path)?,
        None => policy::Policy::default(),
    };
    // Bind before touching the kernel, so a busy port fails fast and changes nothing.
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("cannot listen on {} for the API", args.api))?;

    let mut dataplane = Dataplane::load(&args.ports)?;
    dataplane.apply(&policy)?;
    let ring = dataplane
        .take_events()
        .context("the event ring was already taken")?;
    let stats = Arc::new(responder::ResponderStats::default());
    let responder = responder::Responder::new(stats.clone())
        .context("cannot open the AF_PACKET socket the responder sends through")?;
    for iface in &args.ifaces {
        dataplane.attach(iface)?;
    }
    tracing::info!(
        ifaces = ?args.ifaces,
        ports = ?args.ports,
        rules = policy.rules.len(),
        api = %args.api,
        "filtering (fail-open: the classifier detaches when filterd exits)"
    );

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let responder_task = tokio::spawn(responder.run(ring, shutdown_rx.clone()));
    let state = api::AppState::new(
        policy,
        Box::new(DaemonSink {
            dataplane,
            responder: stats,
        }),
    );
    let mut api_shutdown = shutdown_rx.clone();
    let server =
        axum::serve(listener, api::router(state.clone())).with_graceful_shutdown(async move {
            let _ = api_shutdown.changed().await;
        });
    let server_task = tokio::spawn(async move { server.await });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: detaching and exiting"),
        _ = int.recv() => tracing::info!("SIGINT: detaching and exiting"),
    }
    let _ = shutdown_tx.send(true);
    if let Ok(Err(e)) = responder_task.await {
        tracing::warn!(error = %e, "responder stopped with an error");
    }
    let _ = server_task.await;
    // Dropping the state drops the dataplane: the TCX links close and the classifier detaches.
    drop(state);
    Ok(())
}
