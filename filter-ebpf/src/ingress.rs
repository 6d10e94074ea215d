//! The ingress decision: headers → connection state → every request in the client's byte
//! stream → verdict.
//!
//! Each TCP segment to an inspected port is placed in its connection's stream (`CONNS`):
//! segments ahead of the next expected byte are dropped (the client sends them again in
//! order), bytes already decided on pass untouched, and new bytes go through the shared
//! stream parser (`filter_common::stream`) in `bpf_loop` callbacks, eight bytes at a time where
//! they are ordinary (path, rest of the request line, header names and values) and byte by byte
//! elsewhere, in bulk for bodies. Each request is decided when its path is known, and again
//! for each method-override header. A refused request that starts inside the segment after
//! bytes that may pass is cut off (the segment is shortened, the client resends the rest); one
//! that starts at the segment's first new byte turns the segment into a reset to the backend,
//! and the responder is told what to answer.

use aya_ebpf::bindings::__sk_buff;
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_ktime_get_ns, bpf_loop, generated::bpf_probe_read_kernel},
    programs::TcContext,
};
use core::ffi::c_void;
use core::ptr::{
    addr_of, addr_of_mut, read_unaligned, read_volatile, write_unaligned, write_volatile,
};
use filter_common::reply::{Replies, OUTSTANDING_MAX};
use filter_common::{
    hash::{full_words, SipState},
    http::plain_path_word,
    stream::{flag, Ev, Stream},
    swar, tcp_flags, Method, MethodSet, PrefixData, Reason, RejectEvent, RuleValue, Scratch,
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, EVENT_LINE_MAX, FAMILY_V4,
    FAMILY_V6, IPPROTO_TCP, IPV4_HLEN_MIN, IPV6_HLEN, LINE_WINDOW, PATH_MAX, PREFIX_MAX,
    RULE_MONITOR, SETTINGS_DRY_RUN, SETTINGS_OPTIONS_ANSWER, SETTINGS_OVERSIZE_PASS, STOP_AWAIT,
    STOP_BULK, STOP_DECIDE, STOP_HOLD, STOP_LOAD_FAILED, STOP_MONITOR, STOP_NONE, STOP_OVERRIDE,
    STOP_REFUSE, STOP_TUNNEL, TCP_HLEN_MIN,
};

use crate::maps::{
    CONNS, EVENTS, FILTER_CONFIG, PENDING, PREFIX_A, PREFIX_B, RULES_A, RULES_B, SCRATCH, SETTINGS,
};
use crate::skb::{load_into, trim_payload, turn_into_reset, Segment};
use crate::util::{
    be16, be32, copy_words, count, key_tail, key_v4, peek, peek_with, port_inspected, seq_after,
    word_at,
};

/// Let the packet continue: under TCX this is `TCX_NEXT`, so programs after ours still run.
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT as i32;

/// Windows (request-line/header runs or body runs) processed per segment. A segment with more
/// is cut after the last one processed and the client sends the rest again.
const MAX_ROUNDS: usize = 32;

/// A verdict: a reason to count (per packet), or the action for a segment whose requests
/// were already counted one by one.
enum Out {
    Count(Reason),
    Counted(i32),
}

pub fn run(ctx: &TcContext) -> i32 {
    let out = match try_run(ctx) {
        Ok(o) => o,
        Err(r) => Out::Count(r),
    };
    finish(out)
}

/// Every verdict leaves through here: count it, then map it to a TC action.
#[inline(always)]
fn finish(out: Out) -> i32 {
    match out {
        Out::Counted(action) => action,
        Out::Count(reason) => {
            count(reason);
            match reason {
                Reason::ResetFailed
                | Reason::OutOfOrder
                | Reason::Fragment
                | Reason::Held
                | Reason::Awaiting => DROP,
                _ => PASS,
            }
        }
    }
}

/// Where the current segment's headers and payload are.
pub struct Headers {
    pub family: u8,
    /// Offset of the IP header (after any VLAN tags left in the frame).
    pub l3: usize,
    pub l4: usize,
    pub payload: usize,
    pub payload_len: usize,
    pub seq: u32,
}

/// VLAN tags read through inside the frame (each must be a priority tag, VID 0).
const VLAN_TAGS_MAX: usize = 2;

/// IPv6 extension headers walked before giving up (`unsupported_ip`).
const V6_EXT_MAX: usize = 4;
/// Bound of the TCP header's offset: past the Ethernet header, the VLAN tags, the IPv6 header
/// and its extension headers (each at most 2048 bytes). A mask: the verifier establishes
/// packet bounds only for offsets whose maximum plus the access stays within 64 KiB.
const L4_MAX: usize = 0x3fff;
const _: () = assert!(ETH_HLEN + 4 * VLAN_TAGS_MAX + IPV6_HLEN + 2048 * V6_EXT_MAX <= L4_MAX);

/// The first fragment of a fragmented IP packet whose TCP header starts at `l4`: dropped when
/// it is for an inspected port, since the filter cannot see the whole segment (fail-closed;
/// TCP stacks avoid fragmentation with path MTU discovery).
#[inline(always)]
fn first_fragment(ctx: &TcContext, l4: usize) -> Reason {
    match ctx.load::<[u8; 4]>(l4) {
        Ok(ports) if port_inspected(be16(ports[2], ports[3])) => Reason::Fragment,
        _ => Reason::Unsupported,
    }
}

fn try_run(ctx: &TcContext) -> Result<Out, Reason> {
    let ethertype = peek_with::<ETH_HLEN, _>(ctx, 0, |h| h.be16(12)).map_err(|_| Reason::NotIp)?;
    let skb = ctx.skb.skb;
    if unsafe { (*skb).vlan_present != 0 && (*skb).vlan_tci & 0x0fff != 0 } {
        // Tagged for a VLAN (the tag is already out of the frame): it belongs to a VLAN
        // interface, where filterd must be attached to filter it; here it passes untouched.
        return Err(Reason::Unsupported);
    }
    // VLAN tags left in the frame: the inner tag of QinQ once the outer one is offloaded, or
    // any tag when offload is off. A priority tag (VID 0) is read through; a VLAN's frame
    // passes untouched, as above.
    let mut proto = ethertype;
    let mut l3 = ETH_HLEN;
    let mut k = 0;
    while k < VLAN_TAGS_MAX && (proto == ETH_P_8021Q || proto == ETH_P_8021AD) {
        let tag: [u8; 4] = ctx.load(l3).map_err(|_| Reason::NotIp)?;
        if be16(tag[0], tag[1]) & 0x0fff != 0 {
            return Err(Reason::Unsupported);
        }
        proto = be16(tag[2], tag[3]);
        l3 += 4;
        k += 1;
    }
    let (family, l4, ip_end) = match proto {
        ETH_P_IPV4 => {
            let (proto, vihl, frag, total) = peek_with::<IPV4_HLEN_MIN, _>(ctx, l3, |ip| {
                (ip.b(9), ip.b(0), ip.be16(6), ip.be16(2))
            })
            .map_err(|_| Reason::NotIp)?;
            if proto != IPPROTO_TCP {
                return Err(Reason::NotTcp);
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < IPV4_HLEN_MIN {
                return Err(Reason::Unsupported);
            }
            if frag & 0x1fff != 0 {
                // A later fragment: no TCP header to judge; without its first fragment (dropped
                // below when it is for an inspected port) it is never reassembled.
                return Err(Reason::Unsupported);
            }
            if frag & 0x2000 != 0 {
                return Err(first_fragment(ctx, l3 + ihl));
            }
            (FAMILY_V4, l3 + ihl, l3 + total as usize)
        }
        ETH_P_IPV6 => {
            let (next, payload_len) =
                peek_with::<IPV6_HLEN, _>(ctx, l3, |ip| (ip.b(6), ip.be16(4)))
                    .map_err(|_| Reason::NotIp)?;
            // Walk up to V6_EXT_MAX extension headers to the TCP header.
            let mut next = next;
            let mut l4 = l3 + IPV6_HLEN;
            let mut k = 0;
            while k < V6_EXT_MAX && next != IPPROTO_TCP {
                let ext: [u8; 8] = ctx.load(l4).map_err(|_| Reason::Unsupported)?;
                match next {
                    // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
                    0 | 43 | 60 => l4 += (ext[1] as usize + 1) * 8,
                    // Authentication header: (len + 2) * 4 bytes.
                    51 => l4 += (ext[1] as usize + 2) * 4,
                    // Fragment header: a first fragment for an inspected port is dropped; a
                    // later one carries no TCP header and is never reassembled without it.
                    44 => {
                        if be16(ext[2], ext[3]) & 0xfff8 == 0 && ext[0] == IPPROTO_TCP {
                            return Err(first_fragment(ctx, l4 + 8));
                        }
                        return Err(Reason::Unsupported);
                    }
                    _ => return Err(Reason::NotTcp),
                }
                next = ext[0];
                k += 1;
            }
            if next != IPPROTO_TCP {
                return Err(Reason::Unsupported);
            }
            (FAMILY_V6, l4, l3 + IPV6_HLEN + payload_len as usize)
        }
        _ => return Err(Reason::NotIp),
    };
    // Everything else leaves here, before any map is touched.
    let dport = peek_with::<4, _>(ctx, l4, |tcp| tcp.be16(2)).map_err(|_| Reason::NotTcp)?;
    if !port_inspected(dport) {
        return Err(Reason::OtherPort);
    }
    let s = SCRATCH.get_ptr_mut(0).ok_or(Reason::NotIp)?;
    let s = unsafe { &mut *s };
    if family == FAMILY_V4 {
        let (client, server) = peek_with::<8, _>(ctx, l3 + 12, |a| (a.array(0), a.array(4)))
            .map_err(|_| Reason::NotIp)?;
        key_v4(&mut s.key, client, server);
    } else {
        let a: [u8; 32] = peek(ctx, l3 + 8).map_err(|_| Reason::NotIp)?;
        s.key.client_addr_be.copy_from_slice(&a[..16]);
        s.key.server_addr_be.copy_from_slice(&a[16..]);
    }
    // verifier: pass the header offsets through map memory, so that the IPv4 path and each
    // length of the IPv6 extension-header walk reach the rest of the program as one state
    // instead of one copy each.
    unsafe {
        write_volatile(addr_of_mut!(s.hdr_l4), l4 as u32);
        write_volatile(addr_of_mut!(s.hdr_ip_end), ip_end as u32);
        write_volatile(addr_of_mut!(s.hdr_family), family as u32);
        write_volatile(addr_of_mut!(s.hdr_l3), l3 as u32);
    }
    let (l3, l4, ip_end, family) = unsafe {
        (
            read_volatile(addr_of!(s.hdr_l3)) as usize & 0xff,
            read_volatile(addr_of!(s.hdr_l4)) as usize & L4_MAX,
            read_volatile(addr_of!(s.hdr_ip_end)) as usize & 0xffff,
            read_volatile(addr_of!(s.hdr_family)) as u8,
        )
    };
    let tcp: [u8; TCP_HLEN_MIN] = peek(ctx, l4).map_err(|_| Reason::NotTcp)?;
    key_tail(
        &mut s.key,
        be16(tcp[0], tcp[1]),
        be16(tcp[2], tcp[3]),
        family,
    );
    let flags = tcp[13];
    let mut seq = be32(&tcp, 4);

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
    let payload = l4 + ((tcp[12] >> 4) as usize) * 4;
    if ip_end <= payload {
        if flags & tcp_flags::FIN != 0 {
            forget(s);
        }
        return Err(Reason::NoPayload);
    }
    let payload_len = ip_end - payload;
    let hdr = Headers {
        family,
        l3,
        l4,
        payload,
        payload_len,
        seq,
    };

    let conn = match CONNS.get_ptr_mut(&s.key) {
        Some(c) => c,
        None => {
            s.conn.stream.reset(seq, 0);
            if !adopting() {
                // Its state was evicted (the table is full): this segment may sit inside a
                // request or a body, so it cannot be read as a request boundary. Refuse it.
                prepare_event(ctx, s, &tcp, &hdr);
                s.canon_len = 0;
                return refuse(
                    ctx,
                    s,
                    &tcp,
                    &hdr,
                    seq,
                    Reason::ConnTableFull,
                    0,
                    Method::Other,
                );
            }
            // Open before the filter was loaded: start following it here, at a request
            // boundary (its responses are not followed: the egress side saw no SYN|ACK).
            track(s);
            CONNS.get_ptr_mut(&s.key).ok_or(Reason::ConnTableFull)?
        }
    };
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
        // in place, with no copy, event or loop.
        conn.consume(end.wrapping_sub(pos) as u64);
        return Err(Reason::MidStream);
    }
    copy_words(&mut s.conn.stream, conn);
    prepare_event(ctx, s, &tcp, &hdr);
    if s.conn.stream.path_in_progress() {
        match unsafe { PENDING.get(&s.key) } {
            Some(p) => copy_path(&mut s.raw, p),
            // The saved path was evicted: the request cannot be decided, so refuse it.
            None => return refuse(ctx, s, &tcp, &hdr, pos, Reason::BadPath, 0, Method::Other),
        }
    }
    let off = pos.wrapping_sub(seq) as usize;
    let settings = SETTINGS.get(0).ok_or(Reason::NotHttp)?;

    s.off = off as u32;
    s.payload_off = payload as u32;
    s.payload_len = payload_len as u32;
    // No window of this segment loaded yet.
    s.window_len = 0;
    s.stop = STOP_NONE;
    s.decided = 0;
    s.rep_read = 0;
    let mut rc = RoundCtx {
        skb: ctx.skb.skb,
        s: s as *mut Scratch,
    };
    // verifier: the round body (window parse, decision, bulk body) verified once, not once
    // per round.
    unsafe {
        bpf_loop(
            MAX_ROUNDS as u32,
            round as *mut c_void,
            (&mut rc as *mut RoundCtx).cast(),
            0,
        )
    };
    let off = s.off as usize;
    let decided = s.decided != 0;
    match s.stop {
        STOP_TUNNEL => {
            copy_words(conn, &s.conn.stream);
            conn.tunnel();
            count(Reason::Tunnel);
            return Ok(Out::Counted(PASS));
        }
        STOP_REFUSE => {
            let reason = Reason::from_u32(s.stop_reason);
            let oversize = reason == Reason::LineTooLong || reason == Reason::HeadersTooLarge;
            if oversize && settings.flags & SETTINGS_OVERSIZE_PASS != 0 {
                copy_words(conn, &s.conn.stream);
                conn.tunnel();
                count(Reason::PathTooLong);
                return Ok(Out::Counted(PASS));
            }
            if reason == Reason::NotHttp && s.conn.stream.flags & flag::SYN == 0 {
                // Joined mid-stream and not at a request boundary: nothing to decide on.
                copy_words(conn, &s.conn.stream);
                conn.tunnel();
                return Err(Reason::NotHttp);
            }
            return refuse(
                ctx,
                s,
                &tcp,
                &hdr,
                pos,
                reason,
                s.stop_allow,
                Method::from_u8(s.stop_method as u8),
            );
        }
        STOP_NONE => {}
        // Waiting for the server's answer to an upgrade from here: the rest is held (cut
        // off; the client sends it again).
        STOP_AWAIT => {}
        STOP_HOLD => {
            // Too many requests outstanding: hold the current one, from its start.
            let start = s.conn.stream.req_start;
            if !seq_after(start, pos) {
                return Err(Reason::Held);
            }
            let keep = start.wrapping_sub(seq) as usize;
            if keep < payload_len && !trim_payload(ctx, s, &hdr, keep) {
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

    if off < payload_len {
        // More windows than one pass follows: let the processed part through, cut the rest;
        // the client sends it again and the next segment goes on from here.
        if !trim_payload(ctx, s, &hdr, off) {
            return Err(Reason::ResetFailed);
        }
    }
    save(s, conn, flags & tcp_flags::FIN != 0);
    if decided {
        // The requests this segment started were counted one by one.
        Ok(Out::Counted(PASS))
    } else {
        Err(Reason::MidStream)
    }
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

/// The connection's responses, if the egress side follows them (lost or not). A lookup of its
/// own, for the callbacks (which have only the scratch).
#[inline(always)]
fn followed_replies(s: &Scratch) -> Option<&'static Replies> {
    unsafe { CONNS.get(&s.key) }
        .map(|c| &c.replies)
        .filter(|r| r.followed())
}

/// Write the stream back to the connection table, and the path if a request line is still
/// in flight; forget the connection after the client's FIN.
#[inline(always)]
fn save(s: &mut Scratch, conn: &mut Stream, fin: bool) {
    if fin {
        forget(s);
        return;
    }
    copy_words(conn, &s.conn.stream);
    if s.conn.stream.path_in_progress() {
        let _ = PENDING.insert(&s.key, &s.raw, 0);
    }
}

/// Copy a saved path buffer with one helper call instead of a 1 KiB loop.
#[inline(always)]
fn copy_path(dst: &mut [u8; PATH_MAX], src: &[u8; PATH_MAX]) {
    unsafe {
        bpf_probe_read_kernel(
            dst.as_mut_ptr() as *mut c_void,
            PATH_MAX as u32,
            src.as_ptr() as *const c_void,
        )
    };
}

#[inline(always)]
fn forget(s: &Scratch) {
    let _ = CONNS.remove(&s.key);
    let _ = PENDING.remove(&s.key);
}

/// What the round callback needs from the main program: the skb and the scratch buffer
/// (spilled pointers the verifier follows into the callback, so no callback looks the scratch
/// up again).
#[repr(C)]
struct RoundCtx {
    skb: *mut __sk_buff,
    s: *mut Scratch,
}

/// What the per-byte, per-path-byte and per-word callbacks need: the scratch buffer.
#[repr(C)]
struct ScratchCtx {
    s: *mut Scratch,
}

impl ScratchCtx {
    #[inline(always)]
    fn new(s: &mut Scratch) -> ScratchCtx {
        ScratchCtx {
            s: s as *mut Scratch,
        }
    }

    #[inline(always)]
    fn ptr(&mut self) -> *mut c_void {
        (self as *mut ScratchCtx).cast()
    }
}

/// The scratch buffer a callback was handed.
#[inline(always)]
unsafe fn scratch<'a>(ctx: *mut c_void) -> &'a mut Scratch {
    unsafe { &mut *(*(ctx as *const ScratchCtx)).s }
}

/// `bpf_loop` callback: one round over the segment's new bytes: a body run consumed in bulk, or
/// a window of request line / headers parsed byte by byte with each decision applied. Leaves
/// `s.stop` at `STOP_NONE`, or `STOP_REFUSE` / `STOP_TUNNEL` for the main program to act on.
unsafe extern "C" fn round(_i: u64, rc: *mut c_void) -> i64 {
    let rc = unsafe { &*(rc as *const RoundCtx) };
    let s = unsafe { &mut *rc.s };
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
        // Still inside the window the previous round loaded (a decision or a body run
        // stopped it there): go on in it.
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
    if s.stop == STOP_DECIDE {
        s.stop = STOP_NONE;
        // The request is counted under its verdict (or refused, and counted then).
        s.decided = 1;
        decide(s);
    } else if s.stop == STOP_OVERRIDE {
        s.stop = STOP_NONE;
        check_override(s);
    } else if s.stop == STOP_BULK {
        s.stop = STOP_NONE;
    } else if s.stop == STOP_TUNNEL
        && (s.conn.stream.flags & flag::REPLIES_SEEN != 0 || followed_replies(s).is_some())
    {
        // The connection's responses are followed: go on with the request's body, then wait
        // for the answer (for good if the responses can no longer be framed).
        s.stop = STOP_NONE;
        s.conn.stream.await_reply();
    }
    if s.stop == STOP_MONITOR {
        send_event(s, Reason::Monitored as u32, s.stop_allow, s.stop_method);
        s.stop = STOP_NONE;
    }
    if s.stop == STOP_NONE {
        0
    } else {
        1
    }
}

// `word_at` reads the window and the raw path through 8-aligned bases.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Scratch, line).is_multiple_of(8));
    assert!(offset_of!(Scratch, raw).is_multiple_of(8));
    assert!(core::mem::align_of::<Scratch>() >= 8);
};

/// Words (eight bytes each) a stream or canonicalizer callback may take through the fast path
/// before it steps one byte.
const WORDS_PER_CALL: usize = 8;

/// Whole path words a stream callback may take (`path_words`) before the runs and the byte
/// below: a 1 KiB path is 128 words. Each costs the verifier about 700 instructions.
const PATH_WORDS_PER_CALL: usize = 32;

/// Bytes a canonicalizer callback steps (each after its run of words) before it returns: a
/// callback call costs about as much as a byte step.
const BYTES_PER_CALL: usize = 1;
/// The same for the stream callback (whose byte step is much larger to verify).
const STREAM_BYTES_PER_CALL: usize = 1;

/// `bpf_loop` callback: feed the window's next bytes to the connection's stream parser: up to
/// `STREAM_BYTES_PER_CALL` times, whole words of a path (up to `PATH_WORDS_PER_CALL`,
/// `path_words`), runs of ordinary bytes, up to `WORDS_PER_CALL` words of them
/// (`Stream::step_run`), then one byte (`Stream::step`), deciding each request as its path
/// completes. Returns 1 to stop (see `STOP_*`) or when the window is done; each call takes at
/// least one byte, so `window_len` calls are enough.
unsafe extern "C" fn stream_byte(_i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { scratch(ctx) };
    let w = s.window_len as usize;
    let mut j = 0;
    while j < STREAM_BYTES_PER_CALL {
        j += 1;
        let mut i = s.consumed as usize;
        // A path's long run first, a whole word at a time with the least work per word, once
        // a call starts with eight or more path bytes behind it: in practice after the first
        // ~65, which the calls before take through the runs below (a short path's words cost
        // less there than a call into the loop).
        if s.conn.stream.in_path() && s.conn.stream.line.path_len() >= 8 {
            let j = path_words(s, i, w);
            if j >= i + 8 * PATH_WORDS_PER_CALL {
                // A whole batch: the path likely goes on, and the next call takes it the same
                // way rather than through the slower runs below.
                s.consumed = j as u32;
                return 0;
            }
            i = j;
        }
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
            // `at <= LINE_WINDOW - 8`: the next aligned word is inside the window; only its
            // bytes before the window's end are read.
            let word = word_at(s.line.as_ptr(), at);
            let n = s.conn.stream.step_run(word, w - at, &mut s.raw);
            i = at + n;
            if n < 8 {
                // The next byte is not ordinary: `step` takes it.
                break;
            }
            k += 1;
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
            Ev::More => {}
            Ev::Bulk => return stop(s, STOP_BULK),
            Ev::Tunnel => return stop(s, STOP_TUNNEL),
            Ev::Await => {
                s.consumed = i as u32;
                return stop(s, STOP_AWAIT);
            }
            Ev::Fail(r) => return refuse_stop(s, r, 0, Method::from_u8(s.conn.stream.method)),
            Ev::Decide => return stop(s, STOP_DECIDE),
            Ev::Override => return stop(s, STOP_OVERRIDE),
        }
    }
    0
}

/// Take whole words of a request line's path from window offset `i` (up to
/// `PATH_WORDS_PER_CALL`, while `http::plain_path_word` accepts them and the stream has room:
/// `Stream::path_words_room`), writing each into the raw path as two aligned words
/// (`swar::splice`). Returns the offset after them.
#[inline(never)]
fn path_words(s: &mut Scratch, i: usize, w: usize) -> usize {
    let room = s.conn.stream.path_words_room();
    if room == 0 || i + 8 > w {
        return i;
    }
    let mut limit = (w - i) / 8;
    if limit > room {
        limit = room;
    }
    if limit > PATH_WORDS_PER_CALL {
        limit = PATH_WORDS_PER_CALL;
    }
    let n = s.conn.stream.line.path_len();
    let mut prev = s.conn.stream.line.path_last(&s.raw);
    let (mut at, mut a) = (i, n);
    let mut taken = 0;
    while taken < limit {
        // verifier: the window's word, and the aligned word the path's end is in and the
        // next, inside their buffers (`limit` keeps them there already).
        let at_m = at & (LINE_WINDOW - 1);
        let a_m = a & (PATH_MAX - 8);
        if at_m > LINE_WINDOW - 8 || a_m > PATH_MAX - 16 {
            break;
        }
        let word = word_at(s.line.as_ptr(), at_m);
        if !plain_path_word(word, prev) {
            break;
        }
        let base = s.raw.as_mut_ptr();
        // SAFETY: `a_m` and `a_m + 8` are 8-aligned offsets of `raw` (itself 8-aligned in the
        // scratch, asserted below `round`) with eight bytes each inside it.
        unsafe {
            let lo = base.add(a_m).cast::<u64>();
            let (new_lo, hi) = swar::splice(lo.read(), word, n);
            lo.write(new_lo);
            base.add(a_m + 8).cast::<u64>().write(hi);
        }
        prev = (word >> 56) as u8;
        at = at_m + 8;
        a = a_m + 8;
        taken += 1;
    }
    s.conn.stream.take_path_words(taken);
    at
}

#[inline(always)]
fn stop(s: &mut Scratch, why: u32) -> i64 {
    s.stop = why;
    1
}

#[inline(always)]
fn refuse_stop(s: &mut Scratch, reason: Reason, allow: u32, method: Method) -> i64 {
    s.stop_reason = reason as u32;
    s.stop_allow = allow;
    s.stop_method = method as u32;
    stop(s, STOP_REFUSE)
}

/// The current request's path is complete: apply the policy. Leaves `s.stop` at
/// `STOP_NONE` (go on), `STOP_MONITOR` or `STOP_REFUSE`.
// verifier/stack: a BPF-to-BPF call keeps its frame off the main program's stack.
#[inline(never)]
fn decide(s: &mut Scratch) -> i64 {
    let Some(settings) = SETTINGS.get(0) else {
        return refuse_stop(s, Reason::NotHttp, 0, Method::Other);
    };
    if too_many_outstanding(s) {
        return stop(s, STOP_HOLD);
    }
    let method = s.conn.stream.take_method();
    // Canonicalize the raw path into `s.path`, a word or a byte per callback; unless it is
    // plain (already canonical): then no callback runs, `canon_len` is the raw length, and
    // `finish` (of a fresh canonicalizer, after a `/`) changes nothing. Masks, not
    // branches: the verifier walks what follows once.
    let plain = s.conn.stream.line.plain_mask();
    s.plain = plain;
    s.canon.reset();
    s.canon_err = u32::MAX;
    s.canon_raw_len = s.conn.stream.line.path_len() as u32;
    s.canon_len = (s.canon_raw_len & plain as u32) as u16;
    s.canon_pos = 0;
    if s.canon_raw_len > 0 {
        let mut sc = ScratchCtx::new(s);
        let calls = s.canon_raw_len & !(plain as u32);
        unsafe { bpf_loop(calls, canon_byte as *mut c_void, sc.ptr(), 0) };
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
            return refuse_stop(s, r, 0, method);
        }
    }
    let rule = lookup(s, s.canon_len as usize, settings.active_rules);
    let (allow, rule_flags, verdict) = match rule {
        Some(r) => (r.allow, r.flags, Reason::AllowedByRule),
        None => (settings.default_allow, 0, Reason::AllowedByDefault),
    };
    if method == Method::Options {
        // Never 405 for OPTIONS (CORS preflight): pass it, or answer 204 + Allow.
        if rule.is_some() && settings.flags & SETTINGS_OPTIONS_ANSWER != 0 {
            return refuse_stop(s, Reason::OptionsAnswered, allow, method);
        }
        count(Reason::OptionsPassed);
        s.conn.stream.set_verdict(MethodSet::ANY.0, rule_flags);
        return 0;
    }
    let monitor = rule_flags & RULE_MONITOR != 0 || settings.flags & SETTINGS_DRY_RUN != 0;
    s.conn
        .stream
        .set_verdict(allow, rule_flags | if monitor { RULE_MONITOR } else { 0 });
    if allow & method.bit() != 0 {
        count(verdict);
        return 0;
    }
    violation(s, allow, method, monitor)
}

/// Whether `OUTSTANDING_MAX` requests already wait for their response (the egress side's ring
/// of `HEAD` bits would wrap with one more). The responses' half of the connection's entry is
/// read (a `CONNS` lookup from the callback) at most once per segment, and
/// only when the responses counted at the last read (`Stream::done_seen`) leave the limit
/// within reach, or to note that the connection's responses are followed (`REPLIES_SEEN`).
#[inline(always)]
fn too_many_outstanding(s: &mut Scratch) -> bool {
    if s.conn.stream.flags & flag::REPLIES_SEEN != 0
        && s.conn.stream.reqs.wrapping_sub(s.conn.stream.done_seen) < OUTSTANDING_MAX
    {
        return false;
    }
    if s.rep_read == 0 {
        s.rep_read = 1;
        if let Some(r) = followed_replies(s) {
            s.conn.stream.flags |= flag::REPLIES_SEEN;
            if !r.is_lost() && !r.is_switched() {
                s.rep_read = 2;
                s.conn.stream.done_seen = r.done;
            }
        }
    }
    s.rep_read == 2 && s.conn.stream.reqs.wrapping_sub(s.conn.stream.done_seen) >= OUTSTANDING_MAX
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

#[inline(always)]
fn violation(s: &mut Scratch, allow: u32, method: Method, monitor: bool) -> i64 {
    if monitor {
        count(Reason::Monitored);
        s.stop_allow = allow;
        s.stop_method = method as u32;
        return stop(s, STOP_MONITOR);
    }
    refuse_stop(s, Reason::Rejected, allow, method)
}

/// `bpf_loop` callback: feed the raw path's next bytes to the canonicalizer: up to
/// `BYTES_PER_CALL` times, runs of plain bytes, up to `WORDS_PER_CALL` words of them
/// (`Canon::push_run`), then one byte (`Canon::push`). Each call takes at least one byte, so
/// `canon_raw_len` calls are enough.
unsafe extern "C" fn canon_byte(_i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { scratch(ctx) };
    let n = s.canon_raw_len as usize;
    let mut j = 0;
    while j < BYTES_PER_CALL {
        j += 1;
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
            // `at <= PATH_MAX - 8`: the next aligned word is inside the raw path. Its bytes
            // past the path's end read as LF, where every run stops.
            let w = swar::pad(word_at(s.raw.as_ptr(), at), n - at, b'\n');
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
    }
    0
}

/// Path words hashed per `hash_words` callback.
const HASH_WORDS_PER_CALL: usize = 8;

/// `bpf_loop` callback: absorb path words `i * HASH_WORDS_PER_CALL ..` (up to
/// `HASH_WORDS_PER_CALL` of them, as far as `sip_words`) into the hash under way.
unsafe extern "C" fn hash_words(i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { scratch(ctx) };
    let first = i as usize * HASH_WORDS_PER_CALL;
    let mut j = 0;
    while j < HASH_WORDS_PER_CALL {
        let k = first + j;
        if k >= s.sip_words as usize {
            return 1;
        }
        // verifier: mask the byte offset into the path (`sip_words <= PATH_MAX / 8`).
        let off = (k * 8) & (PATH_MAX - 8);
        let m = plain_word(s, off);
        s.sip.absorb(m);
        j += 1;
    }
    0
}

/// The canonical path's word at `off` (`off <= PATH_MAX - 8`, a multiple of 8): the raw
/// path's if it is plain (also copied into `path`), else `path`'s. Both buffers sit at
/// 8-aligned offsets of the scratch, so these are aligned loads (little-endian, as
/// `SipState::word` reads them); a mask chooses, not a branch.
#[inline(always)]
fn plain_word(s: &mut Scratch, off: usize) -> u64 {
    let raw = unsafe { s.raw.as_ptr().add(off).cast::<u64>().read() };
    let path = unsafe { s.path.as_ptr().add(off).cast::<u64>().read() };
    let m = (raw & s.plain) | (path & !s.plain);
    unsafe { s.path.as_mut_ptr().add(off).cast::<u64>().write(m) };
    m
}

/// The rule for the parsed path: an exact rule, else the longest prefix rule.
#[inline(always)]
fn lookup(s: &mut Scratch, path_len: usize, active: u32) -> Option<RuleValue> {
    let key = unsafe { read_volatile(addr_of!((*addr_of!(FILTER_CONFIG)).hash_key)) };
    s.sip = SipState::new(&key);
    s.sip_words = full_words(path_len) as u32;
    // verifier: the 128 words of a 1 KiB path through one callback verified once.
    let calls = (s.sip_words as usize).div_ceil(HASH_WORDS_PER_CALL) as u32;
    // The word after the full ones (the hash's last bytes) is not absorbed by the callback.
    plain_word(s, (path_len & !7) & (PATH_MAX - 8));
    let mut sc = ScratchCtx::new(s);
    unsafe { bpf_loop(calls, hash_words as *mut c_void, sc.ptr(), 0) };
    let hash = s.sip.finish(&s.path, path_len);
    let (rules, prefixes) = if active == 1 {
        (&RULES_B, &PREFIX_B)
    } else {
        (&RULES_A, &PREFIX_A)
    };
    if let Some(r) = unsafe { rules.get(hash) } {
        return Some(*r);
    }
    let n = if path_len < PREFIX_MAX {
        path_len
    } else {
        PREFIX_MAX
    };
    s.prefix_key.prefixlen = (n * 8) as u32;
    let mut i = 0;
    while i < PREFIX_MAX / 8 {
        // verifier: constant-bounded word copy of the path into the LPM key.
        let w = unsafe { read_unaligned(s.path.as_ptr().add(i * 8).cast::<u64>()) };
        unsafe { write_unaligned(s.prefix_key.data.as_mut_ptr().add(i * 8).cast::<u64>(), w) };
        i += 1;
    }
    let key = unsafe { &*(addr_of!(s.prefix_key).cast::<Key<PrefixData>>()) };
    prefixes.get(key).copied()
}

/// Fill the per-segment part of the event (where to answer) in the scratch buffer.
#[inline(always)]
fn prepare_event(ctx: &TcContext, s: &mut Scratch, tcp: &[u8; TCP_HLEN_MIN], hdr: &Headers) {
    // The Ethernet header was read before (it cannot fail now).
    let (client_mac, server_mac) =
        peek_with::<ETH_HLEN, _>(ctx, 0, |eth| (eth.array(6), eth.array(0)))
            .unwrap_or(([0; 6], [0; 6]));
    let ev: &mut RejectEvent = &mut s.event;
    ev.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    ev.seq = hdr.seq;
    ev.ack = be32(tcp, 8);
    ev.payload_len = hdr.payload_len as u32;
    ev.client_port = s.key.client_port;
    ev.server_port = s.key.server_port;
    ev.family = hdr.family;
    ev._pad0 = [0; 2];
    ev.client_mac = client_mac;
    ev.server_mac = server_mac;
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
    // The key's addresses: its layout is asserted with `util::key_v4`.
};

/// Complete the prepared event with what to answer and the path, and hand it to the
/// responder.
// verifier/stack: a BPF-to-BPF call keeps its frame off the main program's stack.
#[inline(never)]
fn send_event(s: &mut Scratch, reason: u32, allow: u32, method: u32) {
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

/// Refuse the current request. If it starts after new bytes of this segment, cut the segment
/// there (those bytes pass; the refused request comes again and is refused then). Otherwise
/// tell the responder what to answer and turn the segment into a reset to the backend, whose
/// next expected byte is `pos`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn refuse(
    ctx: &TcContext,
    s: &mut Scratch,
    tcp: &[u8; TCP_HLEN_MIN],
    hdr: &Headers,
    pos: u32,
    reason: Reason,
    allow: u32,
    method: Method,
) -> Result<Out, Reason> {
    let entry = CONNS.get_ptr_mut(&s.key);
    let start = s.conn.stream.req_start;
    if seq_after(start, pos) {
        let keep = start.wrapping_sub(hdr.seq) as usize;
        if keep < hdr.payload_len {
            if !trim_payload(ctx, s, hdr, keep) {
                return Err(Reason::ResetFailed);
            }
            s.conn.stream.restart_at(start);
            if let Some(e) = entry {
                copy_words(unsafe { &mut (*e).stream }, &s.conn.stream);
            }
            return Ok(Out::Counted(PASS));
        }
    }
    if let Some(e) = entry {
        let rep = unsafe { &(*e).replies };
        if rep.followed() && !rep.is_lost() {
            // Answer only after every earlier response is complete and acknowledged: the
            // backend finishes them, the client gets them intact, and the answer follows them
            // at the server's next sequence number.
            let before = s.conn.stream.reqs_before_current();
            let pending = !rep.fin_seen() && (rep.done.wrapping_sub(before) as i32) < 0;
            if pending || seq_after(rep.snd_nxt, s.event.ack) {
                return Err(Reason::Held);
            }
            s.event.ack = rep.snd_nxt;
        }
    }
    send_event(s, reason as u32, allow, method as u32);
    // The connection is over for the backend, but the client may send the refused request
    // again (if the answer was lost): keep following it from the refused request, so a resent
    // copy gets the same answer. Its FIN or the table's eviction releases the state.
    let _ = PENDING.remove(&s.key);
    if let Some(e) = entry {
        s.conn.stream.restart_at(pos);
        copy_words(unsafe { &mut (*e).stream }, &s.conn.stream);
    }
    let seg = Segment {
        family: hdr.family,
        l3: hdr.l3,
        l4: hdr.l4,
        seq: pos,
        tcp,
        client: &s.key.client_addr_be,
        server: &s.key.server_addr_be,
    };
    if !turn_into_reset(ctx, &seg) {
        return Err(Reason::ResetFailed);
    }
    count(reason);
    Ok(Out::Counted(PASS))
}

#[allow(dead_code)]
const _: () = assert!(PATH_MAX >= EVENT_LINE_MAX && PATH_MAX >= PREFIX_MAX);
