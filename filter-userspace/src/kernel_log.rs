//! The classifiers' own diagnostics (aya-log), when `filterd --bpf-log` asks for them: cold
//! paths only (a stage missing from the program array, a packet rewrite or a map insert that
//! failed, an event the ring had no room for; `filter-ebpf/src/diag.rs`). Off by default: the
//! kernel object's `AYA_LOG_LEVEL` is then 0 and the verifier removes the logging.
//!
//! The records go to the daemon's log (text or JSON) under the target `filterd::kernel`.

use std::io;

use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

/// The global the kernel object's logging reads (aya-log-ebpf's level switch).
pub const LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";

/// `AYA_LOG_LEVEL` for `--bpf-log` on or off: 0 drops every log statement, 3 (aya-log's
/// `Info`) keeps the warnings and errors the object emits.
pub fn level(on: bool) -> u8 {
    if on {
        3
    } else {
        0
    }
}

/// Forwards aya-log's records to `tracing`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "filterd::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "filterd::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "filterd::kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "filterd::kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "filterd::kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The kernel's log records, read from the object's log ring.
pub type KernelLog = EbpfLogger<ToTracing>;

/// Forward the kernel's records until `shutdown` changes.
pub async fn run(log: KernelLog, mut shutdown: watch::Receiver<bool>) -> io::Result<()> {
    // SAFETY: the AsyncFd owns the logger (and its ring), so the fd stays open for as long as
    // it is registered.
    let mut log = unsafe { AsyncFd::register_with_interest(log, Interest::READABLE) }?;
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                log.get_mut().flush();
                return Ok(());
            }
            guard = log.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
}
