//! Stage `INGRESS_CANON`: the current request's raw path is not plain (it has an escape, a
//! parameter, an empty or dot segment, or a byte to refuse): canonicalize it into
//! `Scratch::path` (`filter_common::canon`, a `bpf_loop`), then back to `INGRESS_PARSE`, which
//! judges it; or refuse it (`INGRESS_FINISH`) when the path is ambiguous or too long.

use aya_ebpf::{helpers::bpf_loop, programs::TcContext};
use core::ffi::c_void;
use filter_common::{stage, Reason, PATH_MAX, STOP_JUDGE};

use super::{finish, from_ctx, refuse_stop, scratch, Out, ScratchCtx};
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
    if s.canon_err != u32::MAX {
        let r = if s.canon_err == Reason::PathTooLong as u32 {
            Reason::LineTooLong
        } else {
            Reason::BadPath
        };
        refuse_stop(s, r, 0, method);
        return Ok(Out::Stage(stage::INGRESS_FINISH));
    }
    s.stop = STOP_JUDGE;
    Ok(Out::Stage(stage::INGRESS_PARSE))
}

/// Words (eight bytes each) a canonicalizer callback may take through the fast path before it
/// steps one byte.
const WORDS_PER_CALL: usize = 8;

/// `bpf_loop` callback: feed the raw path's next bytes to the canonicalizer: runs of plain
/// bytes, up to `WORDS_PER_CALL` words of them (`Canon::push_run`), then one byte
/// (`Canon::push`). Each call takes at least one byte, so `canon_raw_len` calls are enough.
unsafe extern "C" fn canon_byte(_i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { from_ctx(ctx) };
    let n = s.canon_raw_len as usize;
    let mut i = s.canon_pos as usize;
    let mut k = 0;
    while k < WORDS_PER_CALL {
        if i >= n {
            break;
        }
        // verifier: mask the index into the raw path (`i < n` already: no wrap).
        let at = i & (PATH_MAX - 1);
        if at > PATH_MAX - 8 {
            break;
        }
        // `at <= PATH_MAX - 8`: the next aligned word is inside the raw path. Its bytes past
        // the path's end read as LF, where every run stops.
        let w = filter_common::swar::pad(word_at(s.raw.as_ptr(), at), n - at, b'\n');
        let taken = s.canon.push_run(w, &mut s.path, &mut s.canon_len);
        i = at + taken;
        if taken < 8 {
            // The next byte is not plain: `push` takes it.
            break;
        }
        k += 1;
    }
    if i >= n {
        s.canon_pos = i as u32;
        return 1;
    }
    // verifier: mask the index into the raw path.
    let i = i & (PATH_MAX - 1);
    s.canon_pos = i as u32 + 1;
    let b = s.raw[i];
    if let Err(r) = s.canon.push(b, &mut s.path, &mut s.canon_len) {
        s.canon_err = r as u32;
        return 1;
    }
    0
}
