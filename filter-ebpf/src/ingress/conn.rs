//! A connection's life as the filter follows it: where its state starts (the handshake's last
//! ACK, not the client's SYN), what an RST or a SYN changes (only what the server's TCP would
//! act on: RFC 9293, RFC 5961), and what a segment of a connection without state gets.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use filter_common::{
    packet::Tcp,
    reply::Replies,
    stream::flag,
    tcp::{after, rst_acceptable, ClientView, Handshake, ServerView},
    tcp_flags, Conn, ConnKey, Reason, Scratch,
};

use super::{refuse_now, Out};
use crate::frame::parked;
use crate::maps::{CONNS, PENDING, SETTINGS, SYNS};
use crate::skb::{checksum_ok, trim_payload, Layout};
use crate::tcp::{options, server_socket, Sock};
use crate::util::copy_words;

/// A client SYN. Without ACK, a handshake starts (`SYNS`). On a tuple the filter follows, the
/// state stays while a connection may live on the server's side (an established connection
/// answers a SYN with a challenge ACK and discards it, RFC 5961 §4; counted `syn_in_stream`),
/// and goes when none can: the filter refused a request on it and reset the backend's side,
/// or the server's socket shows nothing established (the client reuses its port after a close
/// the filter did not see end). The SYN passes, but data on it (TCP Fast Open) is cut off: the
/// client sends it again after the handshake, where it is read.
#[inline(always)]
pub fn syn(ctx: &TcContext, s: &mut Scratch, at: &Layout, seq: u32, ack_flag: bool) -> Reason {
    if at.payload_len > 0 && !trim_payload(ctx, &mut s.line, &mut s.sum, at, 0) {
        return Reason::ResetFailed;
    }
    if !ack_flag {
        let doff = at.payload - at.l4;
        let o = options(ctx, &mut s.opts, &mut s.walk, at.l4, doff, false);
        let h = Handshake::syn(seq, &o);
        let _ = SYNS.insert(&s.key, &h, 0);
    }
    // SAFETY: a valid map value for this run (read once, here).
    let Some(c) = (unsafe { CONNS.get(&s.key) }) else {
        return Reason::NoPayload;
    };
    if c.stream.refused == 0 {
        match server_socket(ctx, &s.key) {
            // The server's TCP answers with a challenge ACK and keeps the connection; so does
            // the filter. Where the backend is elsewhere the filter cannot know whether a
            // connection lives there, and keeps its state too: forgetting it on a SYN would let
            // a client restart the filter's reading in the middle of the server's stream.
            Sock::Live { .. } | Sock::Remote => return Reason::SynInStream,
            Sock::Pending | Sock::Closed => {}
        }
    }
    forget(&s.key);
    Reason::NoPayload
}

/// A client RST: the connection's state goes only when the server's TCP takes the reset (its
/// sequence number is exactly the next expected byte, and its checksum is good); an RST
/// anywhere else gets a challenge ACK and changes nothing.
#[inline(always)]
pub fn rst(ctx: &TcContext, s: &mut Scratch, at: &Layout, seq: u32) {
    if let Some(h) = unsafe { SYNS.get(&s.key) } {
        if seq == h.client_isn.wrapping_add(1) {
            let _ = SYNS.remove(&s.key);
        }
    }
    let Some(c) = (unsafe { CONNS.get(&s.key) }) else {
        return;
    };
    // A tunnel's positions are no longer followed: any good reset ends it.
    let takes = c.stream.is_tunnel() || rst_acceptable(seq, c.stream.pos);
    if takes && checksum_ok(ctx, &mut s.line, &mut s.sum, at, &s.key) {
        forget(&s.key);
    }
}

#[inline(always)]
pub fn forget(key: &ConnKey) {
    let _ = CONNS.remove(key);
    let _ = PENDING.remove(key);
}

/// Where a segment of a connection without a `CONNS` entry goes.
pub enum Begin {
    /// Follow it from this segment on: the new entry.
    Follow(*mut Conn),
    /// Done with it.
    Done(Result<Out, Reason>),
}

/// A segment of a connection without state (`ack_flag`, `window`: its ACK flag and window).
///
/// * The handshake's last ACK, if it acknowledges the server's SYN|ACK the filter saw: the
///   connection starts here, its positions exact from its first byte, its responses followed
///   from the SYN|ACK, with what the handshake said of timestamps and window scaling.
/// * Otherwise, data (or a FIN) is placed against the server's socket, where the backend runs
///   on this host: an established connection that has received nothing yet starts here; one
///   that has is adopted during the adoption window after a load (it predates the filter), and
///   else refused (503: its state was evicted; the socket proves the peer real, so the answer
///   reflects nothing); a listener or half-open handshake only gets it dropped (a SYN cookie or
///   the handshake's last ACK could still make a connection of it: `unconfirmed`); a closed
///   connection gets it passed untouched (`stray`: the server's TCP resets or discards it).
/// * No socket on this host for it (the backend is elsewhere): started at the first byte after
///   a SYN the filter saw (when the SYN|ACK went unseen: the server's answers leave through
///   another interface), adopted during the adoption window, else refused (503; the responder
///   rate-limits these answers).
// verifier/stack: a frame of its own, called from the entry's main body (see `try_run`).
#[inline(never)]
pub fn begin(ctx: &TcContext) -> Begin {
    let s = match super::scratch() {
        Ok(s) => s,
        Err(r) => return Begin::Done(Err(r)),
    };
    let at = Layout::new(&parked(&s.hdr), s.payload_off, s.payload_len);
    let tcp = Tcp(s.tcp);
    let (seq, ack, window) = (s.seg_seq, tcp.ack(), tcp.window());
    let flags = s.seg_flags as u8;
    let ack_flag = flags & tcp_flags::ACK != 0;
    let fin = flags & tcp_flags::FIN != 0;
    let at = &at;
    // The client's SYN, if the filter saw it: `Some(first byte)`.
    let mut first = None;
    if let Some(h) = unsafe { SYNS.get(&s.key) } {
        if ack_flag && h.completed_by(seq, ack) {
            let h = *h;
            if !checksum_ok(ctx, &mut s.line, &mut s.sum, at, &s.key) {
                return Begin::Done(Err(Reason::BadChecksum));
            }
            let _ = SYNS.remove(&s.key);
            let (client, server) = h.views(window);
            s.conn.stream.reset(seq, flag::SYN);
            // Followed in lockstep (`filter_common::reply`): nothing framed until needed.
            let replies = Replies::idle(h.server_isn.wrapping_add(1));
            copy_words(&mut s.conn.replies, &replies);
            return follow(s, client, server);
        }
        first = Some(h.client_isn.wrapping_add(1));
    }
    if at.payload_len == 0 && !fin {
        return Begin::Done(Err(Reason::NoPayload));
    }
    match server_socket(ctx, &s.key) {
        Sock::Live { rcv_nxt, fresh } => {
            if seq != rcv_nxt {
                // Not the next byte the server expects: ahead of it (dropped: the server's TCP
                // must never hold bytes out of order that the filter did not read in order),
                // or bytes it has (passed: it keeps its first copy).
                return Begin::Done(Err(if after(seq, rcv_nxt) {
                    Reason::OutOfOrder
                } else {
                    Reason::Retransmit
                }));
            }
            if fresh {
                // Its first byte: positions are exact.
                s.conn.stream.reset(seq, flag::SYN);
            } else if adopting() {
                s.conn.stream.reset(seq, 0);
            } else {
                return evicted(s, seq);
            }
        }
        Sock::Pending => return Begin::Done(Err(Reason::Unconfirmed)),
        Sock::Closed => return Begin::Done(Err(Reason::Stray)),
        Sock::Remote => {
            if let Some(first) = first {
                // After a SYN the filter saw, with no SYN|ACK seen (the server's answers leave
                // through another interface): the first byte starts the stream, positions
                // exact; anything ahead of it waits until it comes.
                if seq != first {
                    return Begin::Done(Err(if after(seq, first) {
                        Reason::OutOfOrder
                    } else {
                        Reason::Stray
                    }));
                }
                let _ = SYNS.remove(&s.key);
                s.conn.stream.reset(seq, flag::SYN);
            } else if adopting() {
                s.conn.stream.reset(seq, 0);
            } else {
                return evicted(s, seq);
            }
        }
    }
    // Not followed: the egress side saw no SYN|ACK for it.
    copy_words(&mut s.conn.replies, &Replies::none());
    follow(s, ClientView::default(), ServerView::default())
}

/// A data segment of a connection whose state was evicted (the table is full): it may sit
/// inside a request or a body, so it cannot be read as a request boundary. Refuse it.
#[inline(always)]
fn evicted(s: &mut Scratch, seq: u32) -> Begin {
    s.conn.stream.reset(seq, 0);
    s.canon_len = 0;
    s.seg_pos = seq;
    Begin::Done(Ok(refuse_now(s, Reason::ConnTableFull)))
}

/// Give the connection its `CONNS` entry, from the scratch's stream and replies and the views.
#[inline(always)]
fn follow(s: &mut Scratch, client: ClientView, server: ServerView) -> Begin {
    s.conn.client = client;
    s.conn.server = server;
    if CONNS.insert(&s.key, &s.conn, 0).is_err() {
        return Begin::Done(Err(Reason::ConnTableFull));
    }
    match CONNS.get_ptr_mut(&s.key) {
        Some(c) => Begin::Follow(c),
        None => Begin::Done(Err(Reason::ConnTableFull)),
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

/// A retransmission (no byte the filter has not decided on): the backend keeps its first copy,
/// unless it never took it. Where the server's socket is on this host, it says: bytes it has
/// not taken although the filter passed them mean its TCP dropped them after the filter (under
/// memory pressure, say), and these bytes could differ from the ones the filter read; they are
/// dropped, never passed unread.
#[inline(always)]
pub fn retransmit(ctx: &TcContext, key: &ConnKey, end: u32) -> Reason {
    match server_socket(ctx, key) {
        Sock::Live { rcv_nxt, .. } if after(end, rcv_nxt) => Reason::Unconfirmed,
        _ => Reason::Retransmit,
    }
}
