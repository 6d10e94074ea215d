//! Stage `INGRESS_FINISH`: the segment's verdict applied, from what the earlier stages left
//! in the scratch (`s.stop` and the stream state): pass it, cut it before a request that must
//! wait or be refused (the client sends the rest again), hold it, or turn it into a reset to
//! the backend and tell the responder; then save the stream state (`CONNS`, and `PENDING` for
//! a request line still in flight).

use aya_ebpf::programs::TcContext;
use filter_common::{
    reply::{infer, Infer},
    stream::{flag, Stream},
    tcp_flags, Reason, Scratch, SETTINGS_OVERSIZE_PASS, STOP_AWAIT, STOP_HOLD, STOP_NONE,
    STOP_REFUSE, STOP_TUNNEL,
};

use super::{client_ack, finish, forget, scratch, send_event, Out, PASS};
use crate::frame::parked;
use crate::maps::{CONNS, PENDING, SETTINGS};
use crate::skb::{trim_payload, turn_into_reset, Layout, Reset};
use crate::util::{copy_words, count, seq_after};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    finish(ctx, try_run(ctx))
}

#[inline(always)]
fn try_run(ctx: &TcContext) -> Result<Out, Reason> {
    let s = scratch()?;
    let at = Layout::new(&parked(&s.hdr), s.payload_off, s.payload_len);
    let (seq, pos) = (s.seg_seq, s.seg_pos);
    let mut fin = s.seg_flags & tcp_flags::FIN as u32 != 0;
    let off = s.off as usize;
    // The connection's entry, unless it was evicted meanwhile (then nothing is saved: its
    // next segment is refused as one without state).
    let conn = CONNS
        .get_ptr_mut(&s.key)
        // SAFETY: a valid map value for this run.
        .map(|c| unsafe { &mut (*c).stream });
    match s.stop {
        STOP_TUNNEL => {
            save_tunnel(s, conn);
            count(Reason::Tunnel);
            return Ok(Out::Counted(PASS));
        }
        STOP_REFUSE => {
            let reason = Reason::from_u32(s.stop_reason);
            let oversize = reason == Reason::LineTooLong || reason == Reason::HeadersTooLarge;
            let settings_flags = SETTINGS.get(0).map_or(0, |st| st.flags);
            if oversize && settings_flags & SETTINGS_OVERSIZE_PASS != 0 {
                save_tunnel(s, conn);
                count(Reason::PathTooLong);
                return Ok(Out::Counted(PASS));
            }
            if reason == Reason::NotHttp && s.conn.stream.flags & flag::SYN == 0 {
                // Joined mid-stream and not at a request boundary: nothing to decide on.
                save_tunnel(s, conn);
                return Err(Reason::NotHttp);
            }
            return refuse(ctx, s, &at, reason);
        }
        STOP_NONE => {}
        // Waiting for the server's answer to an upgrade from here: the rest is held (cut
        // off; the client sends it again).
        STOP_AWAIT => {}
        STOP_HOLD => {
            // Too many requests outstanding (or decided in this segment): hold the current
            // one, from its start.
            let start = s.conn.stream.req_start;
            if !seq_after(start, pos) {
                return Err(Reason::Held);
            }
            let keep = start.wrapping_sub(seq) as usize;
            if keep < at.payload_len && !trim_payload(ctx, &mut s.line, &mut s.sum, &at, keep) {
                return Err(Reason::ResetFailed);
            }
            s.conn.stream.restart_at(start);
            save(s, conn, false);
            count(Reason::Held);
            return Ok(Out::Counted(PASS));
        }
        // A window that could not be loaded.
        _ => return Err(Reason::NoPayload),
    }

    if off < at.payload_len {
        // More windows than one pass follows: let the processed part through, cut the rest;
        // the client sends it again and the next segment goes on from here.
        if !trim_payload(ctx, &mut s.line, &mut s.sum, &at, off) {
            return Err(Reason::ResetFailed);
        }
        // The cut took the FIN with it.
        fin = false;
    }
    save(s, conn, fin);
    passed(s)
}

/// The segment read to its end with nothing to cut, hold or refuse (`s.stop` is `STOP_NONE`,
/// every new byte taken): save the stream into the connection's entry `conn` and pass the
/// segment. What this stage does in that case, for a caller that has the entry already
/// (`parse::in_entry`).
#[inline(always)]
pub fn read_through(s: &mut Scratch, conn: &mut Stream) -> Result<Out, Reason> {
    save(s, Some(conn), s.seg_flags & tcp_flags::FIN as u32 != 0);
    passed(s)
}

/// How a segment passed whole (or its part before a cut) is counted.
#[inline(always)]
fn passed(s: &Scratch) -> Result<Out, Reason> {
    if s.decided != 0 {
        // The requests this segment started were counted one by one.
        Ok(Out::Counted(PASS))
    } else {
        Err(Reason::MidStream)
    }
}

/// The connection is no longer followed: its further bytes pass untouched.
#[inline(always)]
fn save_tunnel(s: &Scratch, conn: Option<&mut Stream>) {
    if let Some(conn) = conn {
        copy_words(conn, &s.conn.stream);
        conn.tunnel();
    }
}

/// Write the stream back to the connection table, and the path if a request line is still
/// in flight; forget the connection after the client's FIN.
#[inline(always)]
fn save(s: &mut Scratch, conn: Option<&mut Stream>, fin: bool) {
    if fin {
        forget(s);
        return;
    }
    if let Some(conn) = conn {
        copy_words(conn, &s.conn.stream);
    }
    if s.conn.stream.path_in_progress() {
        let _ = PENDING.insert(&s.key, &s.raw, 0);
    }
}

/// Refuse the current request. If it starts after new bytes of this segment, cut the segment
/// there (those bytes pass; the refused request comes again and is refused then). Otherwise
/// tell the responder what to answer and turn the segment into a reset to the backend, whose
/// next expected byte is the segment's `seg_pos`.
#[inline(always)]
fn refuse(ctx: &TcContext, s: &mut Scratch, at: &Layout, reason: Reason) -> Result<Out, Reason> {
    let (seq, pos) = (s.seg_seq, s.seg_pos);
    let entry = CONNS.get_ptr_mut(&s.key);
    let start = s.conn.stream.req_start;
    if seq_after(start, pos) {
        let keep = start.wrapping_sub(seq) as usize;
        if keep < at.payload_len {
            if !trim_payload(ctx, &mut s.line, &mut s.sum, at, keep) {
                return Err(Reason::ResetFailed);
            }
            s.conn.stream.restart_at(start);
            if let Some(e) = entry {
                copy_words(unsafe { &mut (*e).stream }, &s.conn.stream);
            }
            return Ok(Out::Counted(PASS));
        }
    }
    // Where the answer starts: the client's acknowledgement, or past the responses before
    // the refused request.
    let mut ack = client_ack(s);
    if let Some(e) = entry {
        // SAFETY: a valid map value for this run.
        let (rep, stored) = unsafe { (&(*e).replies, &mut (*e).stream) };
        if rep.followed() && !rep.is_lost() {
            // Answer only after every earlier response is complete and acknowledged: the
            // backend finishes them, the client gets them intact, and the answer follows them
            // at the server's next sequence number.
            let before = s.conn.stream.reqs_before_current();
            let st = &mut s.conn.stream;
            if rep.is_idle() && st.arm == 0 && st.lock_done != before {
                // In lockstep, and not judged yet (refused on its request line): infer now.
                match infer(before, st.lock_done, st.snd_at_req, rep.snd_nxt, ack) {
                    Infer::Complete => {
                        st.inferred = 1;
                        st.lock_done = before;
                    }
                    Infer::Arm => st.request_arm(rep.snd_nxt, st.lock_done),
                    Infer::Wait => {}
                }
            }
            // Kept while the refused request waits (nothing else of the stream is): what the
            // lockstep inference found, and a request to start framing.
            stored.lock_done = st.lock_done;
            stored.inferred = st.inferred;
            stored.arm = st.arm;
            stored.arm_pos = st.arm_pos;
            stored.arm_done = st.arm_done;
            let done = st.responses_done(rep.is_idle(), rep.done);
            let pending = !rep.fin_seen() && (done.wrapping_sub(before) as i32) < 0;
            if pending || seq_after(rep.snd_nxt, ack) {
                return Err(Reason::Held);
            }
            ack = rep.snd_nxt;
        }
    }
    send_event(ctx, s, reason as u32, ack);
    // The connection is over for the backend, but the client may send the refused request
    // again (if the answer was lost): keep following it from the refused request, so a resent
    // copy gets the same answer. Its FIN or the table's eviction releases the state.
    let _ = PENDING.remove(&s.key);
    if let Some(e) = entry {
        s.conn.stream.restart_at(pos);
        s.conn.stream.refused = 1;
        copy_words(unsafe { &mut (*e).stream }, &s.conn.stream);
    }
    let reset = Reset {
        seq: pos,
        tcp: &s.tcp,
        client: &s.key.client_addr_be,
        server: &s.key.server_addr_be,
    };
    if !turn_into_reset(ctx, at, &reset) {
        return Err(Reason::ResetFailed);
    }
    count(reason);
    Ok(Out::Counted(PASS))
}
