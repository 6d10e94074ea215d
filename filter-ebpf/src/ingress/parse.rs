//! Stage `INGRESS_PARSE`: the segment's new bytes through the connection's stream parser
//! (`filter_common::stream`) in `bpf_loop` callbacks: eight bytes at a time where they are
//! ordinary (path, rest of the request line, header names and values), byte by byte elsewhere,
//! in bulk for bodies. Each request is judged as its path completes ([`super::judge`]), and
//! again at each method-override header. A path that is not plain goes to `INGRESS_CANON`
//! first, which comes back here; the segment's end, or a stop its verdict depends on, goes to
//! `INGRESS_FINISH`.

use aya_ebpf::{bindings::__sk_buff, helpers::bpf_loop, programs::TcContext};
use core::ffi::c_void;
use core::ptr::{addr_of, read_volatile};
use filter_common::{
    http::plain_path_word,
    stage,
    stream::{flag, plain_value_word, query_word, Ev},
    Conn, Method, Reason, Scratch, CANONS_MAX, LINE_WINDOW, PATH_MAX, REP_IDLE, RULE_MONITOR,
    STOP_AWAIT, STOP_BULK, STOP_CANON, STOP_DECIDE, STOP_HOLD, STOP_JUDGE, STOP_LOAD_FAILED,
    STOP_MONITOR, STOP_NONE, STOP_OVERRIDE, STOP_TUNNEL,
};

use super::judge::judge;
use super::{
    client_ack, finish, from_ctx, refuse_stop, scratch, send_event, stop, violation, Out,
    ScratchCtx,
};
use crate::skb::load_into;
use crate::util::{store_any, word_at};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    finish(ctx, scratch().map(|s| read(ctx, s)))
}

/// The entry stage's way into this one: the segment's new bytes read inside `http_ingress`
/// itself, with the connection's entry `conn` it looked up. The commonest end, every new byte
/// read with nothing to cut, hold or refuse, is saved and counted here: no tail call and no
/// second lookup of the entry. Anything else goes on in the stage that acts on it, as after
/// [`read`] in this stage.
// verifier/stack: a frame of its own, called from the entry's main body (see `try_run`
// there), so the parse's call chain starts from that body's small frame.
#[inline(never)]
pub fn in_entry(ctx: &TcContext, conn: *mut Conn) -> Result<Out, Reason> {
    let s = scratch()?;
    let out = read(ctx, s);
    if s.stop == STOP_NONE && s.off >= s.payload_len {
        // SAFETY: a valid map value; the LRU may evict it, the memory stays valid for this
        // run.
        let stream = unsafe { &mut (*conn).stream };
        return super::finish::read_through(s, stream);
    }
    Ok(out)
}

/// Every request of the segment's new bytes through the parser and the judgement (as many as
/// `MAX_JUDGED` allows); then the stage that acts on where they stopped.
#[inline(always)]
fn read(ctx: &TcContext, s: &mut Scratch) -> Out {
    let mut rc = RoundCtx {
        skb: ctx.skb.skb,
        s: s as *mut Scratch,
    };
    // verifier: the round body (the judgement, the window parse, the bulk body) verified once.
    unsafe {
        bpf_loop(
            MAX_ROUNDS,
            round as *mut c_void,
            (&mut rc as *mut RoundCtx).cast(),
            0,
        )
    };
    if s.stop == STOP_DECIDE {
        // Out of judgements or rounds with a request still to judge: hold it (the segment is
        // cut before it; the client sends it again).
        s.stop = STOP_HOLD;
    }
    if s.stop != STOP_CANON {
        return Out::Stage(stage::INGRESS_FINISH);
    }
    if s.canons >= CANONS_MAX {
        // No tail calls left for this request: hold it, as above.
        s.stop = STOP_HOLD;
        return Out::Stage(stage::INGRESS_FINISH);
    }
    s.canons += 1;
    Out::Stage(stage::INGRESS_CANON)
}

/// Requests judged per segment.
const MAX_JUDGED: u32 = 32;

/// Rounds (a window of request line and headers, or a body run; the judgement of a request
/// whose path completed starts the round after) per entry into this stage. A segment with more
/// is cut after the last one processed, and the client sends the rest again.
const MAX_ROUNDS: u32 = 1024;

/// What the round callback needs: the skb and the scratch buffer (spilled pointers the
/// verifier follows into the callback, so no callback looks the scratch up again).
#[repr(C)]
struct RoundCtx {
    skb: *mut __sk_buff,
    s: *mut Scratch,
}

/// `bpf_loop` callback: one round. First the current request's judgement if its path is
/// complete (`STOP_DECIDE` from the round before, `STOP_JUDGE` back from `INGRESS_CANON`); then
/// the segment's new bytes: a body run consumed in bulk, or a window of request line / headers
/// parsed up to the next request's completed path. Returns 1 (stop) at the segment's end or
/// when `s.stop` is set for the stage to act on.
unsafe extern "C" fn round(_i: u64, rc: *mut c_void) -> i64 {
    // SAFETY: `rc` is the `RoundCtx` `read` passed to `bpf_loop`, alive for the loop, and its
    // scratch pointer a valid map value.
    let rc = unsafe { &*(rc as *const RoundCtx) };
    let s = unsafe { &mut *rc.s };
    if s.stop == STOP_DECIDE || s.stop == STOP_JUDGE {
        // verifier: the count lives in map memory, so the rounds are not walked once per value.
        if s.decided >= MAX_JUDGED {
            return 1;
        }
        // The request is counted under its verdict (or refused, and counted then).
        s.decided += 1;
        let canonical = s.stop == STOP_JUDGE;
        s.stop = STOP_NONE;
        judge(s, canonical);
        if s.stop == STOP_MONITOR {
            let ctx = TcContext::new(rc.skb);
            send_event(&ctx, s, Reason::Monitored as u32, client_ack(s));
            s.stop = STOP_NONE;
        }
    }
    let (off, len) = (s.off as usize, s.payload_len as usize);
    if off >= len || s.stop != STOP_NONE {
        return 1;
    }
    if s.conn.stream.is_awaiting() {
        s.stop = STOP_AWAIT;
        return 1;
    }
    if s.conn.stream.in_bulk() {
        let n = s.conn.stream.consume((len - off) as u64);
        s.off = (off as u64 + n) as u32;
        return 0;
    }
    let (win_off, win_len) = (s.win_off as usize, s.window_len as usize);
    if off >= win_off && off - win_off < win_len {
        // Still inside the window an earlier round loaded (a decision or a body run stopped
        // it there): go on in it.
        s.consumed = (off - win_off) as u32;
    } else {
        let w = if len - off < LINE_WINDOW {
            len - off
        } else {
            LINE_WINDOW
        };
        let ctx = TcContext::new(rc.skb);
        if !load_into(&ctx, s.payload_off as usize + off, &mut s.line, w) {
            s.stop = STOP_LOAD_FAILED;
            return 1;
        }
        s.win_off = off as u32;
        s.window_len = w as u32;
        s.consumed = 0;
    }
    let (win_off, w) = (s.win_off as usize, s.window_len as usize);
    // verifier: one callback verified once, instead of a 1 KiB loop walked byte by byte.
    let mut sc = ScratchCtx::new(s);
    unsafe { bpf_loop(w as u32, stream_byte as *mut c_void, sc.ptr(), 0) };
    let consumed = s.consumed as usize;
    s.off = (win_off + if consumed < w { consumed } else { w }) as u32;
    if s.stop == STOP_OVERRIDE {
        s.stop = STOP_NONE;
        check_override(s);
    } else if s.stop == STOP_BULK {
        s.stop = STOP_NONE;
    } else if s.stop == STOP_TUNNEL && s.conn.stream.flags & flag::REPLIES_SEEN != 0 {
        // The connection's responses are followed: go on with the request's body, then wait
        // for the answer (for good if the responses can no longer be framed). In lockstep, the
        // answer must be read: framing starts at the server's next byte, which begins it (the
        // request's judgement found every earlier response complete, or asked already).
        s.stop = STOP_NONE;
        if s.rep_state & REP_IDLE != 0 {
            let done = s.conn.stream.lock_done;
            s.conn.stream.request_arm(s.rep_snd_nxt, done);
        }
        s.conn.stream.await_reply();
    }
    if s.stop == STOP_MONITOR {
        let ctx = TcContext::new(rc.skb);
        send_event(&ctx, s, Reason::Monitored as u32, client_ack(s));
        s.stop = STOP_NONE;
    }
    // A completed path: the next round judges it. The segment's end: stop here rather than in
    // one more call that finds it.
    if s.stop == STOP_DECIDE || (s.stop == STOP_NONE && s.off < s.payload_len) {
        0
    } else {
        1
    }
}

/// A method-override header named a method: it must be allowed too.
#[inline(never)]
fn check_override(s: &mut Scratch) -> i64 {
    let m = s.conn.stream.override_method();
    s.conn.stream.note_override(m);
    let allow = s.conn.stream.allow;
    if allow & m.bit() != 0 {
        return 0;
    }
    violation(s, allow, m, s.conn.stream.rule_flags & RULE_MONITOR != 0)
}

/// Words (eight bytes each) a stream callback may take through the fast path before it steps
/// one byte.
const WORDS_PER_CALL: usize = 1;

/// Runs after a run that took a whole word (`Stream::run_on`) a stream callback may take.
const RUNS_ON: usize = 2;

/// Whole words of a path, a header value or a skipped query parameter a stream callback may
/// take (`words`) before the runs and the byte below: a 1 KiB path is 128 words.
const WORDS_PER_BATCH: usize = 32;

/// `bpf_loop` callback: feed the window's next bytes to the connection's stream parser: whole
/// words of a path, of the value of a header the filter does not act on or of a query
/// parameter that cannot be `_method` (up to `WORDS_PER_BATCH`, `words`), runs of ordinary
/// bytes, up to `WORDS_PER_CALL` words of them (`Stream::step_run`) and, after a whole word,
/// up to `RUNS_ON` more where the next word likely goes on (`Stream::run_on`), then one byte
/// (`Stream::step`).
/// Returns 1 to stop (see `STOP_*`) or when the window is done; each call takes at least one
/// byte, so `window_len` calls are enough.
unsafe extern "C" fn stream_byte(_i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { from_ctx(ctx) };
    let w = s.window_len as usize;
    let mut i = s.consumed as usize;
    // A long run first, a whole word at a time with the least work per word: a path's, once
    // a call starts with eight or more path bytes behind it (in practice after the first
    // ~65, which the calls before take through the runs below: a short path's words cost less
    // there than a call into the loop), a header value's the filter only checks, or a skipped
    // query parameter's. Most calls are elsewhere (a method, the rest of a line, a field name)
    // and skip the call.
    if s.conn.stream.words_may_follow() {
        s.consumed = words(s, i, w) as u32;
    }
    // verifier: read back from map memory: the rest is walked once, not once per number of
    // words taken (6.1 tracks the count precisely across the call).
    let j = unsafe { read_volatile(addr_of!(s.consumed)) } as usize;
    if j >= i + 8 * WORDS_PER_BATCH {
        // A whole batch: the run likely goes on, and the next call takes it the same way
        // rather than through the slower runs below.
        return 0;
    }
    i = j;
    let mut k = 0;
    while k < WORDS_PER_CALL {
        if i >= w {
            break;
        }
        // verifier: mask the index into the window (`i < w` already: no wrap).
        let at = i & (LINE_WINDOW - 1);
        if at > LINE_WINDOW - 8 {
            break;
        }
        // `at <= LINE_WINDOW - 8`: the eight bytes at `at` are inside the buffer; `step_run`
        // reads only those before the window's end.
        let word = word_at(s.line.as_ptr(), at);
        let n = s.conn.stream.step_run(word, w - at, &mut s.raw);
        i = at + n;
        if n < 8 {
            // The next byte is not ordinary: `step` takes it.
            break;
        }
        k += 1;
    }
    // A whole word taken in the rest of a request line (its `HTTP/1.1`: the next word holds
    // the line's CRLF and the first field name), in a header name (which goes on in the next
    // word), or through a field line's CRLF (the next line's name starts the next word): more
    // runs take them here, not in another call.
    let mut more = k == WORDS_PER_CALL;
    let mut r = 0;
    while r < RUNS_ON {
        if !more || !s.conn.stream.runs_on() || i >= w {
            break;
        }
        let at = i & (LINE_WINDOW - 1);
        if at > LINE_WINDOW - 8 {
            break;
        }
        let word = word_at(s.line.as_ptr(), at);
        let n = s.conn.stream.run_on(word, w - at);
        i = at + n;
        more = n == 8;
        r += 1;
    }
    if i >= w {
        s.consumed = i as u32;
        return 1;
    }
    // verifier: mask the index into the window.
    let i = i & (LINE_WINDOW - 1);
    s.consumed = i as u32 + 1;
    let b = s.line[i];
    match s.conn.stream.step(b, &mut s.raw) {
        Ev::More => 0,
        Ev::Bulk => stop(s, STOP_BULK),
        Ev::Tunnel => stop(s, STOP_TUNNEL),
        Ev::Await => {
            s.consumed = i as u32;
            stop(s, STOP_AWAIT)
        }
        Ev::Fail(r) => refuse_stop(s, r, 0, Method::from_u8(s.conn.stream.method)),
        Ev::Decide => stop(s, STOP_DECIDE),
        Ev::Override => stop(s, STOP_OVERRIDE),
    }
}

/// Whole words from window offset `i` (of `w` loaded bytes) through `path_words` or
/// `skipped_words` (a header value's or a query parameter's), whichever the stream is in
/// (none elsewhere), as many as `batch` allows with the stream's room for them. Returns the
/// offset after them.
// verifier: one call site in the stream callback, so that what follows it is walked once.
#[inline(never)]
fn words(s: &mut Scratch, i: usize, w: usize) -> usize {
    // verifier: asked again rather than passed in by the caller (which asked already, two
    // byte loads): an argument known at each call makes the verifier walk this function once
    // per value (`ingress_parse` 60,611 -> 92,344 processed instructions on 6.18).
    let path = s.conn.stream.in_path_words();
    let value = s.conn.stream.in_ignored_value();
    // Each room is 0 outside its own phase.
    let room = if path {
        s.conn.stream.path_words_room()
    } else if value {
        s.conn.stream.value_words_room()
    } else {
        s.conn.stream.query_words_room()
    };
    let limit = batch(i, w, room);
    if limit == 0 {
        return i;
    }
    if path {
        return path_words(s, i, limit);
    }
    let taken = if value {
        let k = skipped_words(s, i, limit, plain_value_word);
        s.conn.stream.take_value_words(k);
        k
    } else {
        // Whether a word taken went on into a next parameter: its mask, accumulated
        // (verifier: an unknown word's mask, not a flag, so the words' states stay alike).
        let mut next = 0;
        let k = skipped_words(s, i, limit, |w| {
            let (stop, cross) = query_word(w);
            if stop != 0 {
                return false;
            }
            next |= cross;
            true
        });
        s.conn.stream.take_query_words(k, next != 0);
        k
    };
    i + 8 * taken
}

/// How many whole words from window offset `i` (of `w` loaded bytes) one batch may take with
/// `room` for them: at most `WORDS_PER_BATCH`.
#[inline(always)]
fn batch(i: usize, w: usize, room: usize) -> usize {
    if i + 8 > w {
        return 0;
    }
    let mut limit = (w - i) / 8;
    if limit > room {
        limit = room;
    }
    if limit > WORDS_PER_BATCH {
        limit = WORDS_PER_BATCH;
    }
    limit
}

/// Take up to `limit` whole words of a request line's path from window offset `i` (`batch`
/// with `Stream::path_words_room`), while `http::plain_path_word` accepts them, writing each
/// into the raw path in one store (`util::store_any`). Returns the offset after them.
#[inline(always)]
fn path_words(s: &mut Scratch, i: usize, limit: usize) -> usize {
    let n = s.conn.stream.line.path_len();
    let mut prev = s.conn.stream.line.path_last(&s.raw);
    let line = s.line.as_ptr();
    let raw = s.raw.as_mut_ptr();
    let (mut at, mut a) = (i, n);
    let mut taken = 0;
    while taken < limit {
        // verifier: the window's word and the path's next eight bytes inside their buffers
        // (`limit` keeps them there already).
        let at_m = at & (LINE_WINDOW - 1);
        let a_m = a & (PATH_MAX - 1);
        if at_m > LINE_WINDOW - 8 || a_m > PATH_MAX - 8 {
            break;
        }
        let word = word_at(line, at_m);
        if !plain_path_word(word, prev) {
            break;
        }
        // SAFETY: eight bytes inside the raw path, bounded above.
        unsafe { store_any(raw.add(a_m), word) };
        prev = (word >> 56) as u8;
        at = at_m + 8;
        a = a_m + 8;
        taken += 1;
    }
    s.conn.stream.take_path_words(taken);
    i + 8 * taken
}

/// How many of up to `limit` whole words from window offset `i` `plain` accepts, from the
/// first: the words of a run the stream only counts, a header value's (`batch` with
/// `Stream::value_words_room`, `stream::plain_value_word`: no control byte but HTAB, no DEL)
/// or a skipped query parameter's (`Stream::query_words_room`, `stream::query_word`).
/// The byte that ends the run goes through the runs and `step`.
#[inline(always)]
fn skipped_words(s: &Scratch, i: usize, limit: usize, mut plain: impl FnMut(u64) -> bool) -> usize {
    let base = s.line.as_ptr();
    let mut a = i;
    let mut taken = 0;
    while taken < limit {
        // verifier: the word inside the window (`limit` keeps it there already).
        let a_m = a & (LINE_WINDOW - 1);
        if a_m > LINE_WINDOW - 8 {
            break;
        }
        if !plain(word_at(base, a_m)) {
            break;
        }
        a = a_m + 8;
        taken += 1;
    }
    taken
}
