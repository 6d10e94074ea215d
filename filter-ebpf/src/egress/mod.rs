//! The egress view: follow each tracked connection's server-to-client bytes far enough to
//! know where every response ends (`filter_common::reply`), and the server's next sequence
//! number. It never changes or drops a packet; the ingress classifier reads what it keeps
//! (the `replies` half of the connection's `CONNS` entry) to time refusals (the 405 follows
//! every earlier response, at the right sequence number) and to settle `Upgrade` / `CONNECT`
//! requests.
//!
//! This module is the entry stage (`http_egress`): only TCP from an inspected source port is
//! looked at (the port bitmap first, before any map), and not the responder's own answers
//! (`RESPONDER_MARK`). The server's SYN|ACK completes what the ingress side knows of a
//! handshake (`SYNS`); every segment's acknowledgement and window move the right edge of the
//! server's receive window the ingress side checks client segments against. A connection's
//! responses are followed from the server's SYN|ACK when the ingress side follows the
//! connection from its handshake, so positions are exact; any gap,
//! unframeable response or more work than one pass allows makes them lost (counted
//! `reply_lost`) for good. Body bytes are counted in place; a segment with status lines or
//! headers to read goes to [`frame`] (stage `EGRESS_FRAME`).

pub mod frame;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use filter_common::{
    packet::Dir, reply::Replies, stage, tcp_flags, Reason, ReplyScratch, RESPONDER_MARK,
};

use crate::frame::{headers, other_port, park};
use crate::maps::{CONNS, REPLY_SCRATCH, STAGES, SYNS};
use crate::tcp::options;
use crate::util::{conn_key, copy_words, count, seq_after};

/// Under TCX this is `TCX_NEXT`: egress never changes a verdict.
pub const PASS: i32 = TC_ACT_UNSPEC;

/// The per-CPU scratch of the egress stages.
#[inline(always)]
pub fn scratch() -> Option<&'static mut ReplyScratch> {
    let s = REPLY_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a valid map value, used by one program at a time on this CPU.
    Some(unsafe { &mut *s })
}

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    if try_run(ctx) == Some(true) {
        // SAFETY: `ctx` is this program's context; the stage is a classifier.
        unsafe { STAGES.tail_call(ctx, stage::EGRESS_FRAME) };
        // Still here: the stage is missing. The responses cannot be framed.
        if let Some(s) = scratch() {
            if let Some(c) = CONNS.get_ptr_mut(&s.key) {
                // SAFETY: a valid map value for this run.
                unsafe { (*c).replies.lose() };
            }
        }
        count(Reason::StageFailed);
        count(Reason::ReplyLost);
        crate::diag::cold(Reason::StageFailed);
    }
    PASS
}

/// `Some(true)` when the segment's new bytes need framing (the scratch is ready for it).
#[inline(always)]
fn try_run(ctx: &TcContext) -> Option<bool> {
    if other_port(ctx, Dir::FromServer) {
        return None;
    }
    let seg = headers(ctx, Dir::FromServer).ok()?;
    // The responder's own answer: not the server's bytes.
    if unsafe { (*ctx.skb.skb).mark } == RESPONDER_MARK {
        return None;
    }
    let s = scratch()?;
    let hdr = park(&mut s.hdr, &seg);
    let tcp = seg.tcp;
    conn_key(
        ctx,
        &mut s.key,
        &hdr,
        Dir::FromServer,
        tcp.sport(),
        tcp.dport(),
    )
    .ok()?;
    let flags = tcp.flags();
    let seq = tcp.seq();

    if flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK {
        // The server's SYN|ACK: what the handshake under way (`SYNS`) needs to know the ACK
        // that completes it, and the connection's first window.
        if let Some(h) = SYNS.get_ptr_mut(&s.key) {
            let o = options(
                ctx,
                &mut s.opts,
                &mut s.walk,
                hdr.l4 as usize,
                tcp.header_len(),
                false,
            );
            // SAFETY: a valid map value for this run.
            unsafe { (*h).synack(seq, tcp.ack(), tcp.window(), &o) };
        }
        return None;
    }
    // Only connections the ingress side follows (from the handshake, or adopted).
    let conn = CONNS.get_ptr_mut(&s.key)?;
    // SAFETY: a valid map value for this run.
    let conn = unsafe { &mut *conn };
    if flags & tcp_flags::ACK != 0 {
        // The right edge of the server's receive window, for the ingress side's checks.
        conn.server.advertise(tcp.ack(), tcp.window());
    }
    if flags & tcp_flags::RST != 0 {
        // The server reset the connection: its responses are no longer followed (what
        // depends on them fails closed on the ingress side).
        copy_words(&mut conn.replies, &Replies::none());
        return None;
    }
    if flags & tcp_flags::SYN != 0 {
        return None;
    }
    let rep = &mut conn.replies;
    if !rep.followed() {
        return None;
    }
    let payload = hdr.l4 as usize + tcp.header_len();
    let payload_len = (hdr.ip_end as usize).saturating_sub(payload) & 0x1ffff;
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
        return None;
    }
    if rep.is_idle() {
        // Lockstep: nothing to frame, unless the ingress side asked for it (from the response
        // that starts at `arm_pos`).
        if fin {
            rep.fin();
        }
        let st = &conn.stream;
        if st.arm == 0 || !seq_after(end, st.arm_pos) {
            return None;
        }
        if seq_after(seq, st.arm_pos) {
            // The response's first bytes went by unframed: it cannot be framed now.
            rep.lose();
            count(Reason::ReplyLost);
            return None;
        }
        rep.arm(st.arm_pos, st.arm_done);
    }
    let pos = rep.pos;
    if seq_after(seq, pos) {
        // A gap: bytes the parser never saw.
        rep.lose();
        count(Reason::ReplyLost);
        return None;
    }
    if !seq_after(end, pos) {
        // Nothing new (a retransmission or a bare ACK); a FIN right at the parser's position
        // ends a body delimited by the close.
        if fin && end == pos {
            rep.fin();
        }
        return None;
    }
    let new = end.wrapping_sub(pos) as u64;
    if rep.in_bulk() && rep.bulk_left() >= new {
        // Body bytes only (a download's segments): counted in place, with no request view,
        // copy or stage.
        rep.consume(new);
        if fin {
            rep.fin();
        }
        return None;
    }
    s.view = conn.stream.req_view();
    copy_words(&mut s.replies, rep);
    s.payload_off = payload as u32;
    s.payload_len = payload_len as u32;
    s.off = pos.wrapping_sub(seq);
    s.fin = fin as u32;
    Some(true)
}
