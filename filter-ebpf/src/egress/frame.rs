//! Stage `EGRESS_FRAME`: the server's new bytes framed into responses. Segments may be GSO
//! super-packets (64 KiB): bodies are skipped in bulk (a run inside a header window in one
//! callback step too), status lines and headers go through a `bpf_loop` callback a run of
//! plain bytes or one byte at a time, as on ingress.

use aya_ebpf::{bindings::__sk_buff, helpers::bpf_loop, programs::TcContext};
use core::ffi::c_void;
use filter_common::{
    reply::{REv, LINE_SKIP_MAX},
    swar, Reason, ReplyScratch, LINE_WINDOW,
};

use super::{scratch, PASS};
use crate::maps::CONNS;
use crate::skb::load_into;
use crate::util::{copy_words, count, seq_after, word_at};

/// Rounds per segment. A round is a window (used up whole: status lines, headers, chunk-size
/// lines and the body bytes among them) or a body run (at least one byte), so a segment of
/// `n` bytes needs at most `2 * n / 1 KiB + 2` rounds: 130 for a 64 KiB GSO segment, and
/// room for a 128 KiB one.
const ROUNDS: u32 = 260;

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let Some(s) = scratch() else {
        return PASS;
    };
    let mut rc = RoundCtx {
        skb: ctx.skb.skb,
        s: s as *mut ReplyScratch,
    };
    // verifier: the round body verified once, not once per round.
    unsafe {
        bpf_loop(
            ROUNDS,
            round as *mut c_void,
            (&mut rc as *mut RoundCtx).cast(),
            0,
        )
    };
    if s.off < s.payload_len && !s.replies.is_lost() {
        // More work than one pass: give up on this connection rather than guess.
        s.replies.lose();
    }
    if s.fin != 0 {
        s.replies.fin();
    }
    if s.replies.is_lost() {
        count(Reason::ReplyLost);
    }
    let Some(conn) = CONNS.get_ptr_mut(&s.key) else {
        // Evicted meanwhile: nothing to keep.
        return PASS;
    };
    // SAFETY: a valid map value for this run.
    let rep = unsafe { &mut (*conn).replies };
    // snd_nxt may have moved on another CPU meanwhile: keep the highest.
    let snd_nxt = rep.snd_nxt;
    copy_words(rep, &s.replies);
    if seq_after(snd_nxt, rep.snd_nxt) {
        rep.snd_nxt = snd_nxt;
    }
    PASS
}

/// What the callbacks need from the main program: the skb and the scratch buffer (spilled
/// pointers the verifier follows into the callback, so no callback looks the scratch up).
#[repr(C)]
struct RoundCtx {
    skb: *mut __sk_buff,
    s: *mut ReplyScratch,
}

/// `bpf_loop` callback: one round over the segment's new bytes: a bulk run consumed at once,
/// or a window of status/header/chunk-size bytes framed (see `frame`).
unsafe extern "C" fn round(_i: u64, rc: *mut c_void) -> i64 {
    let rc = unsafe { &mut *(rc as *mut RoundCtx) };
    let s = unsafe { &mut *rc.s };
    let (off, len) = (s.off as usize, s.payload_len as usize);
    if off >= len || s.replies.is_lost() {
        return 1;
    }
    if s.replies.in_bulk() {
        let n = s.replies.consume((len - off) as u64);
        s.off = (off as u64 + n) as u32;
        return 0;
    }
    let w = if len - off < LINE_WINDOW {
        len - off
    } else {
        LINE_WINDOW
    };
    let ctx = TcContext::new(rc.skb);
    if !load_into(&ctx, s.payload_off as usize + off, &mut s.window, w) {
        s.replies.lose();
        return 1;
    }
    s.window_len = w as u32;
    s.widx = 0;
    let before = s.replies.pos;
    // verifier: one callback verified once, instead of a 1 KiB loop walked byte by byte. Each
    // call takes at least one byte, so `w` calls are enough.
    unsafe {
        bpf_loop(
            w as u32,
            frame as *mut c_void,
            (rc as *mut RoundCtx).cast(),
            0,
        )
    };
    s.off = (off as u32).wrapping_add(s.replies.pos.wrapping_sub(before));
    0
}

/// Steps (a word, a byte or a body run) one `frame` call takes.
const STEPS_PER_CALL: usize = 1;

/// `bpf_loop` callback: frame the window from its cursor on, up to `STEPS_PER_CALL` steps:
/// a run of up to eight plain bytes (`Replies::step_run`: the rest of a status line, header
/// name letters, values of headers the framing does not read), a whole body run inside the
/// window (so small chunks cost no round each and body bytes are never stepped one by one),
/// else one status/header/chunk-size byte. Returns 1 when the window is used up.
unsafe extern "C" fn frame(_i: u64, rc: *mut c_void) -> i64 {
    let s = unsafe { &mut *(*(rc as *const RoundCtx)).s };
    // Not checked against `LINE_WINDOW` here: with that bound known, the compiler drops the
    // index masks below, which kernels before 6.7 need (they cannot bound an index by a
    // comparison with another register).
    let len = s.window_len as usize;
    let mut k = 0;
    while k < STEPS_PER_CALL {
        k += 1;
        let i = s.widx as usize;
        if i >= len {
            return 1;
        }
        if s.replies.in_bulk() {
            let n = s.replies.consume((len - i) as u64);
            s.widx = (i as u64 + n) as u32;
            continue;
        }
        // verifier: mask the index into the window.
        let at = i & (LINE_WINDOW - 1);
        if s.replies.in_line_rest() {
            // Inside a line counted to its LF: whole words without one, in a tight loop.
            let mut n = 0;
            while n < LINE_SKIP_MAX as usize {
                let a = at + n;
                if a + 8 > len || a > LINE_WINDOW - 8 {
                    break;
                }
                if swar::eq(word_at(s.window.as_ptr(), a), b'\n') != 0 {
                    break;
                }
                n += 8;
            }
            if n > 0 {
                s.replies.skip_words(n as u32);
                s.widx = (at + n) as u32;
                continue;
            }
        }
        if at <= LINE_WINDOW - 8 {
            // `at <= LINE_WINDOW - 8`: the eight bytes at `at` are inside the buffer;
            // `step_run` reads only those before the window's end.
            let word = word_at(s.window.as_ptr(), at);
            let avail = if len - at < 8 { len - at } else { 8 };
            let n = s.replies.step_run(word, avail);
            if n > 0 {
                s.widx = (at + n) as u32;
                continue;
            }
        }
        let b = s.window[at];
        s.widx = at as u32 + 1;
        let _: REv = s.replies.step(b, &s.view);
    }
    0
}
