//! Kernel-side diagnostics through aya-log: the cold paths only (a stage missing from the
//! program array, a packet rewrite or a map insert that failed, an event the ring had no room
//! for), never per packet. Off unless `filterd --bpf-log`: the loader sets `AYA_LOG_LEVEL`, a
//! frozen read-only global, to 0, and the verifier then drops the logging as dead code.
//!
//! Each message is a constant: a record with no arguments is a fixed-size write, where a
//! `&str` argument of varying length is a loop the verifier walks at every call site.

use aya_log_ebpf::{
    macro_support::{level_enabled, Level},
    warn,
};
use filter_common::Reason;

/// Report `reason` if it is a cold-path failure.
#[inline(always)]
pub fn cold(reason: Reason) {
    if matches!(
        reason,
        Reason::StageFailed | Reason::ResetFailed | Reason::ConnTableFull | Reason::EventLost
    ) {
        report(reason as u32);
    }
}

// verifier: a function of its own, reached whether the logging is on or off (the level is
// checked inside), so the program's functions are the same either way.
#[inline(never)]
fn report(code: u32) {
    if !level_enabled(Level::Warn) {
        return;
    }
    // aya-log-ebpf 0.2 takes a context argument and does not use it (the record goes to its
    // own ring buffer): no program context is needed here.
    if code == Reason::StageFailed as u32 {
        warn!(
            (),
            "stage_failed: a tail call into a stage failed; the segment was dropped"
        );
    } else if code == Reason::ResetFailed as u32 {
        warn!(
            (),
            "reset_failed: a segment could not be rewritten; it was dropped"
        );
    } else if code == Reason::ConnTableFull as u32 {
        warn!(
            (),
            "conn_table_full: a connection's state could not be stored"
        );
    } else if code == Reason::EventLost as u32 {
        warn!(
            (),
            "event_lost: the event ring was full; the responder does not answer this refusal"
        );
    }
}
