//! Stage `INGRESS_CANON`: the current request's raw path is not plain (it has an escape, a
//! parameter, an empty or dot segment, a byte written as an escape, or a byte to refuse):
//! canonicalize it into `Scratch::path` (`filter_common::canon`, a `bpf_loop`), then back to
//! `INGRESS_PARSE`, which judges it; or refuse it (`INGRESS_FINISH`, 400): a path backends
//! read differently, one whose normal form does not fit the buffer, and, in `paths =
//! "strict"` (`SETTINGS_PATHS_NORMALIZE` clear), any path not already in normal form. In
//! `paths = "normalize"` the path's other readings (`filter_common::canon`: the path as sent,
//! `;` read as text) are looked up here, each in the prefix rules above the point where it
//! leaves the canonical path, and folded into `Scratch::other_allow` / `other_enforced` for
//! the judgement.

use aya_ebpf::{helpers::bpf_loop, programs::TcContext};
use core::ffi::c_void;
use filter_common::{
    canon, stage, MethodSet, Reason, Scratch, PATH_MAX, SETTINGS_PATHS_NORMALIZE, STOP_JUDGE,
};

use super::judge::{enforced, prefix_rule};
use super::{finish, from_ctx, refuse_stop, scratch, Out, ScratchCtx};
use crate::maps::{PREFIX_A, PREFIX_B, SETTINGS};
use crate::util::word_at;

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    finish(ctx, try_run())
}

#[inline(always)]
fn try_run() -> Result<Out, Reason> {
    let s = scratch()?;
    let method = s.conn.stream.take_method();
    s.canon.reset();
    s.canon_err = u32::MAX;
    s.canon_raw_len = s.conn.stream.line.path_len() as u32;
    s.canon_len = 0;
    s.canon_pos = 0;
    let mut sc = ScratchCtx::new(s);
    // verifier: one callback verified once, instead of a loop over the path's bytes. Each
    // call takes at least one byte, so `canon_raw_len` calls are enough.
    unsafe { bpf_loop(s.canon_raw_len, canon_byte as *mut c_void, sc.ptr(), 0) };
    if s.canon_err == u32::MAX {
        if let Err(r) = s.canon.finish(&mut s.path, &mut s.canon_len) {
            s.canon_err = r as u32;
        }
    }
    let Some(settings) = SETTINGS.get(0) else {
        refuse_stop(s, Reason::NotHttp, 0, method);
        return Ok(Out::Stage(stage::INGRESS_FINISH));
    };
    let normalize = settings.flags & SETTINGS_PATHS_NORMALIZE != 0;
    if !normalize && s.canon.changed() != canon::NONE {
        s.canon_err = Reason::BadPath as u32;
    }
    if s.canon_err != u32::MAX {
        // Every error is a 400, too long included: the raw path fitted the line's bounds,
        // only bytes written as escapes can make its normal form overflow the buffer (and a
        // 414 would pass with `oversize = "pass"`).
        refuse_stop(s, Reason::BadPath, 0, method);
        return Ok(Out::Stage(stage::INGRESS_FINISH));
    }
    // The other readings, under the rule set the judgement then uses too.
    let (active, default) = (settings.active_rules, settings.default_allow);
    s.rules_active = active;
    s.rules_default = default;
    s.other_allow = MethodSet::ANY.0;
    s.other_enforced = MethodSet::ANY.0;
    let changed = s.canon.changed();
    if changed != canon::NONE {
        let raw = s.raw.as_ptr();
        other_reading(s, raw, changed as usize, active, default);
    }
    let params_at = s.canon.params_at();
    if params_at != canon::NONE {
        let path = s.path.as_ptr();
        other_reading(s, path, params_at as usize, active, default);
    }
    s.stop = STOP_JUDGE;
    Ok(Out::Stage(stage::INGRESS_PARSE))
}

/// One other reading of the path: the longest prefix rule that is a prefix of `src[..len]`
/// (`src`: the raw or the canonical path in the scratch), else the default, folded into
/// `other_allow` / `other_enforced`.
// verifier/stack: a BPF-to-BPF call; `src` is a pointer into the scratch at a constant
// offset per call site.
#[inline(never)]
fn other_reading(s: &mut Scratch, src: *const u8, len: usize, active: u32, default: u32) {
    let prefixes = if active == 1 { &PREFIX_B } else { &PREFIX_A };
    let (allow, flags) = match prefix_rule(s, src, len, prefixes) {
        Some(r) => (r.allow, r.flags),
        None => (default, 0),
    };
    s.other_allow &= allow;
    s.other_enforced &= enforced(allow, flags);
}

/// `bpf_loop` callback: feed the raw path's next bytes to the canonicalizer: one piece per
/// call, a run of up to eight literal bytes (`Canon::push_run`) or else one byte
/// (`Canon::push`). Each call takes at least one byte, so `canon_raw_len` calls are enough.
// verifier: one piece per call; a loop of runs here made the callback's branches multiply.
unsafe extern "C" fn canon_byte(_i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { from_ctx(ctx) };
    let n = s.canon_raw_len as usize;
    let i = s.canon_pos as usize;
    if i >= n {
        return 1;
    }
    // verifier: mask the index into the raw path (`i < n` already: no wrap).
    let at = i & (PATH_MAX - 1);
    if at <= PATH_MAX - 8 {
        // The eight bytes at `at` are inside the buffer. Those past the path's end read as LF,
        // where every run stops.
        let w = filter_common::swar::pad(word_at(s.raw.as_ptr(), at), n - at, b'\n');
        let taken = s.canon.push_run(w, &mut s.path, &mut s.canon_len);
        if taken > 0 {
            s.canon_pos = (at + taken) as u32;
            return 0;
        }
    }
    s.canon_pos = at as u32 + 1;
    let b = s.raw[at];
    if let Err(r) = s.canon.push(b, &mut s.path, &mut s.canon_len) {
        s.canon_err = r as u32;
        return 1;
    }
    0
}
