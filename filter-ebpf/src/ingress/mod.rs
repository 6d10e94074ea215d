//! The ingress decision: headers → connection state → every request in the client's byte
//! stream → verdict, in four stages joined by tail calls (see the crate's `//!`).
//!
//! This module is the entry stage (`http_ingress`) and what the stages share. Each TCP segment
//! to an inspected port is placed in its connection's stream (`CONNS`): segments ahead of the
//! next expected byte are dropped (the client sends them again in order), bytes already
//! decided on pass untouched, body bytes are counted in place, and a segment with new bytes to
//! read goes to [`parse`], with the connection's state copied into the per-CPU scratch where
//! every later stage finds it.

pub mod canon;
pub mod finish;
pub mod judge;
pub mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_kernel},
    programs::TcContext,
};
use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_unaligned, write_unaligned};
use filter_common::{
    packet::{Dir, Frame},
    reply::Replies,
    stage,
    stream::{flag, Stream},
    tcp_flags, Method, Reason, RejectEvent, Scratch, ETH_HLEN, EVENT_LINE_MAX, PATH_MAX, STOP_NONE,
    STOP_REFUSE,
};

use crate::frame::{headers, park, Skb};
use crate::maps::{CONNS, EVENTS, PENDING, SCRATCH, SETTINGS, STAGES};
use crate::util::{conn_key, copy_words, count, seq_after};

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
}

/// Every verdict of every ingress stage leaves through here: count it, then map it to a TC
/// action; or go on to the next stage.
#[inline(always)]
pub fn finish(ctx: &TcContext, out: Result<Out, Reason>) -> i32 {
    let reason = match out {
        Ok(Out::Counted(action)) => return action,
        Ok(Out::Stage(next)) => {
            // SAFETY: `ctx` is this program's context; the stage programs are classifiers.
            unsafe { STAGES.tail_call(ctx, next) };
            // Still here: the stage is missing or the chain is too long. Fail closed.
            Reason::StageFailed
        }
        Err(r) => r,
    };
    count(reason);
    match reason {
        Reason::ResetFailed
        | Reason::OutOfOrder
        | Reason::Fragment
        | Reason::Held
        | Reason::Awaiting
        | Reason::StageFailed => DROP,
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

#[inline(always)]
fn try_run(ctx: &TcContext) -> Result<Out, Reason> {
    // Everything that is not TCP to an inspected port leaves here, before any map is touched.
    let seg = headers(ctx, Dir::ToServer)?;
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
    let flags = tcp.flags();
    let mut seq = tcp.seq();

    if flags & tcp_flags::RST != 0 {
        forget(s);
        return Err(Reason::NoPayload);
    }
    if flags & tcp_flags::SYN != 0 {
        // A new connection: its first byte is the one after the SYN.
        seq = seq.wrapping_add(1);
        s.conn.stream.reset(seq, flag::SYN);
        // The egress side starts following the responses at the server's SYN|ACK.
        track(s);
        let _ = PENDING.remove(&s.key);
    }
    let payload = hdr.l4 as usize + tcp.header_len();
    let ip_end = hdr.ip_end as usize;
    if ip_end <= payload {
        if flags & tcp_flags::FIN != 0 {
            forget(s);
        }
        return Err(Reason::NoPayload);
    }
    let payload_len = ip_end - payload;
    s.tcp = tcp.0;
    s.payload_off = payload as u32;
    s.payload_len = payload_len as u32;
    s.seg_seq = seq;
    s.seg_flags = flags as u32;

    let conn = match CONNS.get_ptr_mut(&s.key) {
        Some(c) => c,
        None => {
            s.conn.stream.reset(seq, 0);
            if !adopting() {
                // Its state was evicted (the table is full): this segment may sit inside a
                // request or a body, so it cannot be read as a request boundary. Refuse it.
                prepare_event(ctx, s, tcp.ack());
                s.canon_len = 0;
                s.seg_pos = seq;
                return Ok(refuse_now(s, Reason::ConnTableFull));
            }
            // Open before the filter was loaded: start following it here, at a request
            // boundary (its responses are not followed: the egress side saw no SYN|ACK).
            track(s);
            CONNS.get_ptr_mut(&s.key).ok_or(Reason::ConnTableFull)?
        }
    };
    // SAFETY: a valid map value; the LRU may evict it, the memory stays valid for this run.
    let entry = unsafe { &mut *conn };
    let (conn, replies) = (&mut entry.stream, &entry.replies);
    if conn.is_tunnel() {
        if flags & tcp_flags::FIN != 0 {
            forget(s);
        }
        return Err(Reason::Tunnel);
    }
    let pos = conn.pos;
    if seq_after(seq, pos) {
        // Ahead of the bytes the filter has decided on: dropped, the client resends in order.
        return Err(Reason::OutOfOrder);
    }
    let end = seq.wrapping_add(payload_len as u32);
    if !seq_after(end, pos) {
        // Bytes already decided on: the backend keeps its first copy.
        return Err(Reason::Retransmit);
    }
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
    if conn.in_bulk()
        && conn.bulk_left() > end.wrapping_sub(pos) as u64
        && flags & tcp_flags::FIN == 0
    {
        // Body bytes only, and the body goes on after them (an upload's segments): counted
        // in place, with no copy, event or stage.
        conn.consume(end.wrapping_sub(pos) as u64);
        return Err(Reason::MidStream);
    }
    copy_words(&mut s.conn.stream, conn);
    prepare_event(ctx, s, tcp.ack());
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
    s.rep_read = 0;
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

/// Whether a connection with no state is still adopted (see `Settings::adopt_until`).
#[inline(always)]
fn adopting() -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    now < settings.adopt_until as u64
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

/// Start following the connection: its `CONNS` entry from the scratch's stream, its
/// responses not followed until the egress side sees the server's SYN|ACK.
#[inline(always)]
fn track(s: &mut Scratch) {
    copy_words(&mut s.conn.replies, &Replies::none());
    if CONNS.insert(&s.key, &s.conn, 0).is_err() {
        count(Reason::ConnTableFull);
    }
}

/// The connection's responses, if the egress side follows them (lost or not).
#[inline(always)]
pub fn followed_replies(s: &Scratch) -> Option<&'static Replies> {
    unsafe { CONNS.get(&s.key) }
        .map(|c| &c.replies)
        .filter(|r| r.followed())
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
    let _ = CONNS.remove(&s.key);
    let _ = PENDING.remove(&s.key);
}

/// Fill the per-segment part of the event (where to answer) in the scratch buffer.
#[inline(always)]
fn prepare_event(ctx: &TcContext, s: &mut Scratch, ack: u32) {
    // The Ethernet header was read before (it cannot fail now).
    let macs = Skb(ctx).bytes::<12>(0).unwrap_or([0; 12]);
    let ev: &mut RejectEvent = &mut s.event;
    ev.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    ev.seq = s.seg_seq;
    ev.ack = ack;
    ev.payload_len = s.payload_len;
    ev.client_port = s.key.client_port;
    ev.server_port = s.key.server_port;
    ev.family = s.hdr.family as u8;
    ev._pad0 = [0; 2];
    ev.client_mac.copy_from_slice(&macs[6..]);
    ev.server_mac.copy_from_slice(&macs[..6]);
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

/// Complete the prepared event with what to answer and the path, and hand it to the
/// responder.
// verifier/stack: a BPF-to-BPF call keeps its frame off the caller's stack.
#[inline(never)]
pub fn send_event(s: &mut Scratch, reason: u32, allow: u32, method: u32) {
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
