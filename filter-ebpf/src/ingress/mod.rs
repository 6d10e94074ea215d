//! The ingress decision: headers → connection state → every request in the client's byte
//! stream → verdict, in four stages joined by tail calls (see the crate's `//!`).
//!
//! This module is the entry stage (`http_ingress`) and what the stages share. Each TCP segment
//! to an inspected port is placed in its connection's stream (`CONNS`): segments ahead of the
//! next expected byte are dropped (the client sends them again in order), bytes already
//! decided on pass untouched, body bytes are counted in place, and a segment with new bytes to
//! read goes through [`parse`] (in this program, `parse::in_entry`), with the connection's
//! state copied into the per-CPU scratch where every later stage finds it.

pub mod canon;
mod conn;
pub mod finish;
pub mod judge;
pub mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_probe_read_kernel,
    programs::TcContext,
};
use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_unaligned, write_unaligned};
use filter_common::{
    packet::{Dir, Frame, Tcp, IP_END_MAX},
    reply::Replies,
    stage,
    stream::{flag, Stream},
    tcp::{self, Seg, Verdict},
    tcp_flags, Conn, Method, Reason, RejectEvent, Scratch, ETH_HLEN, EVENT_LINE_MAX, PATH_MAX,
    REP_FOLLOWED, STOP_NONE, STOP_REFUSE, TCP_HLEN_MIN,
};

use self::conn::Begin;
use crate::frame::{headers, other_port, park, parked, Skb};
use crate::maps::{CONNS, EVENTS, PENDING, SCRATCH, STAGES};
use crate::skb::{checksum_ok, clear_urgent, trim_payload, Layout};
use crate::tcp::options;
use crate::util::{conn_key, copy_words, count, seq_after};

/// `skb->pkt_type` of a frame addressed to this host (`PACKET_HOST`, linux/if_packet.h).
const PACKET_HOST: u32 = 0;

/// Let the packet continue: under TCX this is `TCX_NEXT`, so programs after ours still run.
pub const PASS: i32 = TC_ACT_UNSPEC;
pub const DROP: i32 = TC_ACT_SHOT;

/// What a stage does with the segment (`Err(reason)`: count that reason and leave with its
/// action).
pub enum Out {
    /// Leave with this action; the requests the segment started were counted one by one.
    Counted(i32),
    /// Go on in this stage (`filter_common::stage`).
    Stage(u32),
    /// A retransmission ending at this sequence number: passed if the server's socket took
    /// its bytes (the entry's main body asks, see `try_run`).
    Retransmit(u32),
}

/// Every verdict of every ingress stage leaves through here: count it, then map it to a TC
/// action; or go on to the next stage.
#[inline(always)]
pub fn finish(ctx: &TcContext, out: Result<Out, Reason>) -> i32 {
    let reason = match out {
        Ok(Out::Counted(action)) => return action,
        Ok(Out::Retransmit(_)) => Reason::Retransmit,
        Ok(Out::Stage(next)) => {
            // SAFETY: `ctx` is this program's context; the stage programs are classifiers.
            unsafe { STAGES.tail_call(ctx, next) };
            // Still here: the stage is missing or the chain is too long. Fail closed.
            Reason::StageFailed
        }
        Err(r) => r,
    };
    count(reason);
    crate::diag::cold(reason);
    match reason {
        Reason::ResetFailed
        | Reason::OutOfOrder
        | Reason::Fragment
        | Reason::Held
        | Reason::Awaiting
        | Reason::StageFailed
        | Reason::NoAck
        | Reason::BadAck
        | Reason::Paws
        | Reason::OutOfWindow
        | Reason::BadChecksum
        | Reason::NotForHost
        | Reason::Unwalkable
        | Reason::BadHeader
        | Reason::Unconfirmed => DROP,
        _ => PASS,
    }
}

/// The per-CPU scratch (every stage of one packet runs on one CPU, without preemption).
#[inline(always)]
pub fn scratch() -> Result<&'static mut Scratch, Reason> {
    let s = SCRATCH.get_ptr_mut(0).ok_or(Reason::StageFailed)?;
    // SAFETY: a valid map value, used by one program at a time on this CPU.
    Ok(unsafe { &mut *s })
}

/// The entry stage (`http_ingress`).
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    finish(ctx, try_run(ctx))
}

/// Read the segment's headers into the scratch (its place in the frame, its connection's key,
/// its TCP header). Everything that is not TCP to an inspected port leaves here, before any map
/// is touched.
// verifier/stack: the header walk's locals live in a frame of their own, off the deepest call
// chain (the main program's frame plus the socket lookup's).
#[inline(never)]
fn read_segment(ctx: &TcContext) -> Result<(), Reason> {
    let seg = headers(ctx, Dir::ToServer)?;
    // SAFETY: the program's context, valid for the whole run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        // Not addressed to this host: its TCP never reads it.
        return Err(Reason::NotForHost);
    }
    let s = scratch()?;
    let hdr = park(&mut s.hdr, &seg);
    let tcp = seg.tcp;
    conn_key(
        ctx,
        &mut s.key,
        &hdr,
        Dir::ToServer,
        tcp.sport(),
        tcp.dport(),
    )
    .map_err(|_| Reason::NotIp)?;
    let payload = hdr.l4 as usize + tcp.header_len();
    s.tcp = tcp.0;
    s.payload_off = payload as u32;
    s.payload_len = (hdr.ip_end as usize).saturating_sub(payload) as u32;
    s.seg_seq = tcp.seq();
    s.seg_flags = tcp.flags() as u32;
    Ok(())
}

// verifier/stack: the entry is a short main body calling its phases one after the other, each
// a function with a frame of its own; the deepest chain of calls is then the main body plus one
// phase (and what that phase calls), not all of them stacked.
#[inline(always)]
fn try_run(ctx: &TcContext) -> Result<Out, Reason> {
    if other_port(ctx, Dir::ToServer) {
        return Err(Reason::OtherPort);
    }
    let mut conn: *mut Conn = core::ptr::null_mut();
    match place(ctx, &mut conn) {
        // The parse stage's work, here: the entry is at hand.
        Ok(Out::Stage(stage::INGRESS_PARSE)) if !conn.is_null() => parse::in_entry(ctx, conn),
        out => out,
    }
}

/// The segment's place in its connection's stream: everything before its new bytes are read.
/// For a segment to read (`Out::Stage(INGRESS_PARSE)`), `conn` is set to the connection's
/// entry.
// verifier: a frame of its own, so that the parse (`parse::in_entry`) starts from one state of
// the main body, whichever way the segment came here (its phases' locals are gone by then):
// called from here, 6.1 walked the parse about twice over.
#[inline(never)]
fn place(ctx: &TcContext, conn: &mut *mut Conn) -> Result<Out, Reason> {
    read_segment(ctx)?;
    let s = scratch()?;
    let flags = s.seg_flags as u8;
    if flags & (tcp_flags::URG | tcp_flags::SYN | tcp_flags::RST) != 0 {
        control(ctx)?;
    }
    let entry = match CONNS.get_ptr_mut(&s.key) {
        Some(c) => c,
        None => match conn::begin(ctx) {
            Begin::Follow(c) => c,
            Begin::Done(out) => return out,
        },
    };
    match established(ctx, entry) {
        Ok(Out::Retransmit(end)) => Err(conn::retransmit(ctx, &s.key, end)),
        Ok(Out::Stage(stage::INGRESS_PARSE)) => {
            *conn = entry;
            Ok(Out::Stage(stage::INGRESS_PARSE))
        }
        out => out,
    }
}

/// The control bits: an urgent pointer is cleared (the segment goes on); a SYN or an RST
/// changes what the server's TCP would change, and the segment leaves here (`Err`).
#[inline(never)]
fn control(ctx: &TcContext) -> Result<(), Reason> {
    let s = scratch()?;
    let at = Layout::new(&parked(&s.hdr), s.payload_off, s.payload_len);
    let flags = s.seg_flags as u8;
    let seq = s.seg_seq;
    if flags & tcp_flags::URG != 0 {
        // The server's TCP would take the urgent byte out of the stream the application reads;
        // the filter reads it in line. Make the server read it in line too.
        if !clear_urgent(ctx, at.l4, &s.tcp) {
            return Err(Reason::ResetFailed);
        }
        s.tcp[13] &= !tcp_flags::URG;
        s.tcp[18] = 0;
        s.tcp[19] = 0;
        s.seg_flags &= !(tcp_flags::URG as u32);
        count(Reason::UrgentCleared);
    }
    if flags & tcp_flags::SYN != 0 {
        return Err(conn::syn(ctx, s, &at, seq, flags & tcp_flags::ACK != 0));
    }
    if flags & tcp_flags::RST != 0 {
        conn::rst(ctx, s, &at, seq);
        return Err(Reason::NoPayload);
    }
    Ok(())
}

/// A segment of a connection the filter follows (`conn`, its entry): placed in the stream,
/// checked against what the server's TCP will take, counted in place if it is body bytes only,
/// else prepared for the parser.
#[inline(never)]
fn established(ctx: &TcContext, conn: *mut Conn) -> Result<Out, Reason> {
    let s = scratch()?;
    // SAFETY: a valid map value; the LRU may evict it, the memory stays valid for this run.
    let entry = unsafe { &mut *conn };
    let tcp = Tcp(s.tcp);
    let flags = s.seg_flags as u8;
    let seq = s.seg_seq;
    let payload_len = s.payload_len as usize & IP_END_MAX;
    let fin = flags & tcp_flags::FIN != 0;
    if entry.stream.is_tunnel() {
        if fin {
            forget(s);
        }
        return Err(Reason::Tunnel);
    }
    let pos = entry.stream.pos;
    if seq_after(seq, pos) {
        if payload_len == 0 {
            // No byte to read: a bare ACK or FIN ahead of the filter (after a refused request,
            // the client's FIN follows bytes the filter never passed). It passes and changes
            // nothing here; a FIN the server queues out of order only ends what it reads.
            return Err(Reason::NoPayload);
        }
        // Ahead of the bytes the filter has decided on: dropped, the client resends in order
        // (so the server's TCP never holds bytes out of order the filter has not read).
        return Err(Reason::OutOfOrder);
    }
    let at = Layout::new(&parked(&s.hdr), s.payload_off, s.payload_len);
    let end = seq.wrapping_add(payload_len as u32);
    let doff = tcp.header_len();
    let tsval = if doff > TCP_HLEN_MIN {
        options(ctx, &mut s.opts, &mut s.walk, at.l4, doff, true).tsval
    } else {
        None
    };
    let mut segment = Seg {
        seq,
        ack: tcp.ack(),
        flags,
        payload_len: payload_len as u32,
        tsval,
    };
    let snd_nxt = entry.replies.followed().then_some(entry.replies.snd_nxt);
    if !seq_after(end, pos) && !(fin && end == pos) {
        // Nothing new: a retransmission or a bare ACK. What it says still counts (the server's
        // TCP takes the newest timestamp and acknowledgement from such segments too).
        tcp::note(&mut entry.client, &segment, snd_nxt);
        if payload_len == 0 {
            return Err(Reason::NoPayload);
        }
        return Ok(Out::Retransmit(end));
    }
    // New bytes (or a FIN in order): only what the server's TCP will take counts.
    if !checksum_ok(ctx, &mut s.line, &mut s.sum, &at, &s.key) {
        return Err(Reason::BadChecksum);
    }
    match tcp::judge(&segment, pos, &entry.client, &entry.server, snd_nxt) {
        Verdict::Accept => {}
        Verdict::Drop(r) => return Err(r),
        Verdict::Trim(keep) => {
            // Past the right edge of the server's window: only the part inside it is taken.
            if !trim_payload(ctx, &mut s.line, &mut s.sum, &at, keep as usize) {
                return Err(Reason::ResetFailed);
            }
            count(Reason::OutOfWindow);
            segment.payload_len = keep;
            segment.flags &= !tcp_flags::FIN;
            s.payload_len = keep;
            s.seg_flags &= !(tcp_flags::FIN as u32);
        }
    }
    tcp::note(&mut entry.client, &segment, snd_nxt);
    let fin = segment.flags & tcp_flags::FIN != 0;
    let end = seq.wrapping_add(segment.payload_len);
    if !seq_after(end, pos) {
        // A FIN in order, no new byte: the client is done sending.
        forget(s);
        return Err(Reason::NoPayload);
    }
    let (conn, replies) = (&mut entry.stream, &entry.replies);
    if conn.is_awaiting() {
        // After an `Upgrade` / `CONNECT` request: nothing passes before the server's answer.
        match settle_upgrade(conn, replies) {
            Settled::Tunnel => {
                conn.tunnel();
                count(Reason::Tunnel);
                return Ok(Out::Counted(PASS));
            }
            Settled::Resume => {
                conn.resume();
                count(Reason::UpgradeRefused);
            }
            Settled::Wait => return Err(Reason::Awaiting),
        }
    }
    if conn.in_bulk() && conn.bulk_left() > end.wrapping_sub(pos) as u64 && !fin {
        // Body bytes only, and the body goes on after them (an upload's segments): counted
        // in place, with no copy, event or stage.
        conn.consume(end.wrapping_sub(pos) as u64);
        return Err(Reason::MidStream);
    }
    copy_words(&mut s.conn.stream, conn);
    s.seg_pos = pos;
    if s.conn.stream.path_in_progress() {
        match unsafe { PENDING.get(&s.key) } {
            Some(p) => copy_path(&mut s.raw, p),
            // The saved path was evicted: the request cannot be decided, so refuse it.
            None => {
                s.canon_len = 0;
                return Ok(refuse_now(s, Reason::BadPath));
            }
        }
    }
    s.off = pos.wrapping_sub(seq);
    // No window of this segment loaded yet.
    s.window_len = 0;
    s.stop = STOP_NONE;
    s.decided = 0;
    s.canons = 0;
    // The responses' half as it is now, for the judgements and refusals of this segment.
    s.rep_snd_nxt = entry.replies.snd_nxt;
    s.rep_done = entry.replies.done;
    s.rep_state = entry.replies.state_bits();
    if s.rep_state & REP_FOLLOWED != 0 {
        s.conn.stream.flags |= flag::REPLIES_SEEN;
    }
    Ok(Out::Stage(stage::INGRESS_PARSE))
}

/// Refuse the segment from its first new byte on, in the finishing stage.
#[inline(always)]
fn refuse_now(s: &mut Scratch, reason: Reason) -> Out {
    s.stop = STOP_REFUSE;
    s.stop_reason = reason as u32;
    s.stop_allow = 0;
    s.stop_method = Method::Other as u32;
    Out::Stage(stage::INGRESS_FINISH)
}

/// What the server's answer to an awaited `Upgrade` / `CONNECT` request says.
enum Settled {
    /// It switched protocols (or there is no egress state to see the answer: what the filter
    /// does without it): stop following the connection.
    Tunnel,
    /// It answered without switching: follow the connection as HTTP/1.1 again.
    Resume,
    /// Not answered yet, or the answer cannot be known (lost framing): hold the client's
    /// bytes.
    Wait,
}

#[inline(always)]
fn settle_upgrade(conn: &Stream, rep: &Replies) -> Settled {
    if !rep.followed() {
        if conn.flags & flag::REPLIES_SEEN != 0 {
            // Followed once, no longer (the server reset the connection): the answer can no
            // longer be known; fail closed.
            return Settled::Wait;
        }
        // Never followed (the server's answers leave through another interface): what the
        // filter does without egress state.
        return Settled::Tunnel;
    }
    let upgrade = conn.reqs.wrapping_sub(1);
    if rep.is_switched() && rep.switch_index == upgrade {
        if conn.inferred != 0 {
            // The framing that read the switch started where the lockstep inference put a
            // response boundary: not trusted enough to stop following (fail closed).
            return Settled::Wait;
        }
        return Settled::Tunnel;
    }
    if rep.fin_seen() {
        // The server closed its side: nothing switched that could still answer.
        return Settled::Resume;
    }
    if !rep.is_switched() && !rep.is_lost() && rep.done.wrapping_sub(conn.reqs) as i32 >= 0 {
        return Settled::Resume;
    }
    // Not answered yet, or the answer cannot be known (lost: fail closed, the client's bytes
    // wait until the connection ends).
    Settled::Wait
}

/// The client's acknowledgement number in the current segment.
#[inline(always)]
pub fn client_ack(s: &Scratch) -> u32 {
    u32::from_be_bytes([s.tcp[8], s.tcp[9], s.tcp[10], s.tcp[11]])
}

/// Copy a saved path buffer with one helper call instead of a 1 KiB loop.
#[inline(always)]
fn copy_path(dst: &mut [u8; PATH_MAX], src: &[u8; PATH_MAX]) {
    // SAFETY: both are whole `PATH_MAX`-byte buffers.
    unsafe {
        bpf_probe_read_kernel(
            dst.as_mut_ptr() as *mut c_void,
            PATH_MAX as u32,
            src.as_ptr() as *const c_void,
        )
    };
}

#[inline(always)]
pub fn forget(s: &Scratch) {
    conn::forget(&s.key);
}

/// Fill the per-segment part of the event (where to answer: `ack`, the acknowledgement
/// number the answer starts at) in the scratch buffer.
#[inline(always)]
fn prepare_event(ctx: &TcContext, s: &mut Scratch, ack: u32) {
    let ev: &mut RejectEvent = &mut s.event;
    // The Ethernet header was read before (it cannot fail now): its addresses copied byte by
    // byte, not assembled into words first.
    let macs = Skb(ctx).view::<12, _>(0, |m| {
        ev.client_mac.copy_from_slice(&m[6..]);
        ev.server_mac.copy_from_slice(&m[..6]);
    });
    if macs.is_none() {
        ev.client_mac = [0; 6];
        ev.server_mac = [0; 6];
    }
    ev.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    ev.seq = s.seg_seq;
    ev.ack = ack;
    ev.payload_len = s.payload_len;
    ev.client_port = s.key.client_port;
    ev.server_port = s.key.server_port;
    ev.family = s.hdr.family as u8;
    ev._pad0 = [0; 2];
    // Both addresses, as four aligned words (a `[u8; 16]` assignment is byte by byte).
    let src = addr_of!(s.key.client_addr_be).cast::<u64>();
    let dst = addr_of_mut!(ev.client_addr_be).cast::<u64>();
    let mut i = 0;
    while i < 4 {
        // SAFETY: 32 bytes from each (the client then the server address, in both structs),
        // 8-aligned as asserted below.
        unsafe { dst.add(i).write(src.add(i).read()) };
        i += 1;
    }
}
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Scratch, event).is_multiple_of(8));
    assert!(offset_of!(RejectEvent, client_addr_be).is_multiple_of(8));
    assert!(
        offset_of!(RejectEvent, server_addr_be) == offset_of!(RejectEvent, client_addr_be) + 16
    );
    assert!(ETH_HLEN >= 12);
    // The key's addresses: its layout is asserted with `util::key_v4`.
};

/// Write the event and hand it to the responder: where to answer (the segment's frame and
/// addresses; `ack`, the sequence number the answer starts at), what (`reason`, and the
/// request's method and `Allow` in `s.stop_method` / `s.stop_allow`) and the path. Written
/// only here: most segments never send one.
// verifier/stack: a BPF-to-BPF call keeps its frame off the caller's stack.
#[inline(never)]
pub fn send_event(ctx: &TcContext, s: &mut Scratch, reason: u32, ack: u32) {
    prepare_event(ctx, s, ack);
    let (allow, method) = (s.stop_allow, s.stop_method);
    let path_len = s.canon_len as usize;
    let ev: &mut RejectEvent = &mut s.event;
    ev.reason = reason;
    ev.allow = allow;
    ev.method = method as u8;
    ev.path_len = path_len as u16;
    ev.line_len = if path_len < EVENT_LINE_MAX {
        path_len as u16
    } else {
        EVENT_LINE_MAX as u16
    };
    let mut i = 0;
    while i < EVENT_LINE_MAX / 8 {
        // verifier: constant-bounded word copy of the path into the event.
        let w = unsafe { read_unaligned(s.path.as_ptr().add(i * 8).cast::<u64>()) };
        unsafe { write_unaligned(ev.line.as_mut_ptr().add(i * 8).cast::<u64>(), w) };
        i += 1;
    }
    if EVENTS.output::<RejectEvent>(&*ev, 0).is_err() {
        count(Reason::EventLost);
        crate::diag::cold(Reason::EventLost);
    }
}

/// Leave a callback loop: `s.stop` says why.
#[inline(always)]
pub fn stop(s: &mut Scratch, why: u32) -> i64 {
    s.stop = why;
    1
}

#[inline(always)]
pub fn refuse_stop(s: &mut Scratch, reason: Reason, allow: u32, method: Method) -> i64 {
    s.stop_reason = reason as u32;
    s.stop_allow = allow;
    s.stop_method = method as u32;
    stop(s, STOP_REFUSE)
}

/// A method the rule does not allow: refuse the request, or in monitor mode report it and go
/// on.
#[inline(always)]
pub fn violation(s: &mut Scratch, allow: u32, method: Method, monitor: bool) -> i64 {
    if monitor {
        count(Reason::Monitored);
        s.stop_allow = allow;
        s.stop_method = method as u32;
        return stop(s, filter_common::STOP_MONITOR);
    }
    refuse_stop(s, Reason::Rejected, allow, method)
}

/// What a `bpf_loop` callback gets: the scratch buffer (a spilled pointer the verifier
/// follows into the callback, so no callback looks the scratch up again).
#[repr(C)]
pub struct ScratchCtx {
    pub s: *mut Scratch,
}

impl ScratchCtx {
    #[inline(always)]
    pub fn new(s: &mut Scratch) -> ScratchCtx {
        ScratchCtx {
            s: s as *mut Scratch,
        }
    }

    #[inline(always)]
    pub fn ptr(&mut self) -> *mut c_void {
        (self as *mut ScratchCtx).cast()
    }
}

/// The scratch buffer a callback was handed.
///
/// # Safety
/// `ctx` is the `ScratchCtx` the caller passed to `bpf_loop`.
#[inline(always)]
pub unsafe fn from_ctx<'a>(ctx: *mut c_void) -> &'a mut Scratch {
    unsafe { &mut *(*(ctx as *const ScratchCtx)).s }
}
