//! The egress view: follow each tracked connection's server-to-client bytes far enough to
//! know where every response ends (`filter_common::reply`), and the server's next sequence
//! number. It never changes or drops a packet; the ingress classifier reads what it keeps
//! (the `replies` half of the connection's `CONNS` entry) to time refusals (the 405 follows
//! every earlier response, at the right sequence number) and to settle `Upgrade` / `CONNECT`
//! requests.
//!
//! Only TCP from an inspected source port is looked at (the port bitmap first, before any
//! map), and not the responder's own answers (`RESPONDER_MARK`). A connection's responses are
//! followed from the server's SYN|ACK when the ingress side follows the connection from its
//! SYN, so positions are exact; any gap, unframeable response or more work than one pass
//! allows makes them lost (counted `reply_lost`) for good. Segments
//! may be GSO super-packets (64 KiB): bodies are skipped in bulk (a run inside a header window
//! in one callback step too), status lines and headers go byte by byte through a `bpf_loop`
//! callback, as on ingress.

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_UNSPEC},
    helpers::bpf_loop,
    programs::TcContext,
};
use core::ffi::c_void;
use filter_common::{
    reply::{REv, Replies, LINE_SKIP_MAX},
    stream::flag as stream_flag,
    swar, tcp_flags, Reason, ReplyScratch, ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, FAMILY_V6,
    IPPROTO_TCP, IPV4_HLEN_MIN, IPV6_HLEN, LINE_WINDOW, RESPONDER_MARK, TCP_HLEN_MIN,
};

use crate::maps::{CONNS, REPLY_SCRATCH};
use crate::skb::load_into;
use crate::util::{
    be16, copy_words, count, key_tail, key_v4, peek, peek_with, port_inspected, seq_after, word_at,
};

/// Under TCX this is `TCX_NEXT`: egress never changes a verdict.
const PASS: i32 = TC_ACT_UNSPEC;

/// Rounds per segment. A round is a window (used up whole: status lines, headers, chunk-size
/// lines and the body bytes among them) or a body run (at least one byte), so a segment of
/// `n` bytes needs at most `2 * n / 1 KiB + 2` rounds: 130 for a 64 KiB GSO segment, and
/// room for a 128 KiB one.
const ROUNDS: u32 = 260;

pub fn run(ctx: &TcContext) -> i32 {
    let _ = try_run(ctx);
    PASS
}

fn try_run(ctx: &TcContext) -> Result<(), ()> {
    let ethertype = peek_with::<ETH_HLEN, _>(ctx, 0, |h| h.be16(12))?;
    let (family, l4, ip_end) = match ethertype {
        ETH_P_IPV4 => {
            let (proto, vihl, frag, total) = peek_with::<IPV4_HLEN_MIN, _>(ctx, ETH_HLEN, |ip| {
                (ip.b(9), ip.b(0), ip.be16(6), ip.be16(2))
            })?;
            if proto != IPPROTO_TCP || frag & 0x3fff != 0 {
                // Not TCP, or a fragment: not followed (a gap then loses the connection).
                return Err(());
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < IPV4_HLEN_MIN {
                return Err(());
            }
            (FAMILY_V4, ETH_HLEN + ihl, ETH_HLEN + total as usize)
        }
        ETH_P_IPV6 => {
            let (next, payload_len) =
                peek_with::<IPV6_HLEN, _>(ctx, ETH_HLEN, |ip| (ip.b(6), ip.be16(4)))?;
            // A server's segments carry no extension headers; one that does is not followed.
            if next != IPPROTO_TCP {
                return Err(());
            }
            (
                FAMILY_V6,
                ETH_HLEN + IPV6_HLEN,
                ETH_HLEN + IPV6_HLEN + payload_len as usize,
            )
        }
        _ => return Err(()),
    };
    let tcp: [u8; TCP_HLEN_MIN] = peek(ctx, l4)?;
    // From an inspected port: checked before any map is touched.
    if !port_inspected(be16(tcp[0], tcp[1])) {
        return Err(());
    }
    // The responder's own answer: not the server's bytes.
    if unsafe { (*ctx.skb.skb).mark } == RESPONDER_MARK {
        return Err(());
    }
    let s = REPLY_SCRATCH.get_ptr_mut(0).ok_or(())?;
    let s = unsafe { &mut *s };
    // The connection's key from the client's side: the server is the source here.
    if family == FAMILY_V4 {
        let (server, client) = peek_with::<8, _>(ctx, ETH_HLEN + 12, |a| (a.array(0), a.array(4)))?;
        key_v4(&mut s.key, client, server);
    } else {
        let a: [u8; 32] = peek(ctx, ETH_HLEN + 8)?;
        s.key.server_addr_be.copy_from_slice(&a[..16]);
        s.key.client_addr_be.copy_from_slice(&a[16..]);
    }
    key_tail(
        &mut s.key,
        be16(tcp[2], tcp[3]),
        be16(tcp[0], tcp[1]),
        family,
    );
    let flags = tcp[13];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);

    // Only connections the ingress side follows (from the client's SYN, or adopted).
    let conn = CONNS.get_ptr_mut(&s.key).ok_or(())?;
    let conn = unsafe { &mut *conn };
    if flags & tcp_flags::RST != 0 {
        // The server reset the connection: its responses are no longer followed (what
        // depends on them fails closed on the ingress side).
        copy_words(&mut conn.replies, &Replies::none());
        return Ok(());
    }
    if flags & tcp_flags::SYN != 0 {
        // The server's SYN|ACK of a connection ingress follows from its SYN: positions are
        // exact from here. (An adopted connection has no SYN|ACK: never followed.)
        if conn.stream.flags & stream_flag::SYN != 0 {
            copy_words(&mut conn.replies, &Replies::new(seq.wrapping_add(1)));
        }
        return Ok(());
    }
    let rep = &mut conn.replies;
    if !rep.followed() {
        return Err(());
    }
    let payload = l4 + ((tcp[12] >> 4) as usize) * 4;
    let payload_len = ip_end.saturating_sub(payload) & 0x1ffff;
    let fin = flags & tcp_flags::FIN != 0;
    let end = seq.wrapping_add(payload_len as u32);
    let last = end.wrapping_add(fin as u32);
    if seq_after(last, rep.snd_nxt) {
        rep.snd_nxt = last;
    }
    if rep.is_lost() || rep.is_switched() {
        if fin {
            rep.fin();
        }
        return Ok(());
    }
    let pos = rep.pos;
    if seq_after(seq, pos) {
        // A gap: bytes the parser never saw.
        rep.lose();
        count(Reason::ReplyLost);
        return Ok(());
    }
    if !seq_after(end, pos) {
        // Nothing new (a retransmission or a bare ACK); a FIN right at the parser's position
        // ends a body delimited by the close.
        if fin && end == pos {
            rep.fin();
        }
        return Ok(());
    }
    let new = end.wrapping_sub(pos) as u64;
    if rep.in_bulk() && rep.bulk_left() >= new {
        // Body bytes only (a download's segments): counted in place, with no request view,
        // copy or loop.
        rep.consume(new);
        if fin {
            rep.fin();
        }
        return Ok(());
    }
    s.view = conn.stream.req_view();
    copy_words(&mut s.replies, rep);
    s.payload_off = payload as u32;
    s.payload_len = payload_len as u32;
    s.off = pos.wrapping_sub(seq);
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
    if fin {
        s.replies.fin();
    }
    if s.replies.is_lost() {
        count(Reason::ReplyLost);
    }
    // snd_nxt may have moved on another CPU meanwhile: keep the highest.
    let snd_nxt = rep.snd_nxt;
    copy_words(rep, &s.replies);
    if seq_after(snd_nxt, rep.snd_nxt) {
        rep.snd_nxt = snd_nxt;
    }
    Ok(())
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

// `word_at` reads the window through an 8-aligned base.
const _: () = {
    assert!(core::mem::offset_of!(ReplyScratch, window).is_multiple_of(8));
    assert!(core::mem::align_of::<ReplyScratch>() >= 8);
};

/// Steps (a word, a byte or a body run) one `frame` call takes.
const STEPS_PER_CALL: usize = 8;

/// `bpf_loop` callback: frame the window from its cursor on, up to `STEPS_PER_CALL` steps:
/// a run of up to eight plain bytes (`Replies::step_run`: the rest of a status line, header
/// name letters, values of headers the framing does not read), a whole body run inside the
/// window (so small chunks cost no round each and body bytes are never stepped one by one),
/// else one status/header/chunk-size byte. Returns 1 when the window is used up.
unsafe extern "C" fn frame(_i: u64, rc: *mut c_void) -> i64 {
    let s = unsafe { &mut *(*(rc as *const RoundCtx)).s };
    let len = s.window_len as usize;
    if len > LINE_WINDOW {
        return 1;
    }
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
            // `at <= LINE_WINDOW - 8`: the next aligned word is inside the window; only its
            // bytes before the window's end are read.
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
