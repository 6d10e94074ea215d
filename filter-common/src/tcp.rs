//! What the server's TCP accepts: the rules by which the ingress classifier lets its view of a
//! client's byte stream advance only on bytes the server's TCP will read.
//!
//! A TC classifier sees a segment before the server's TCP has judged it. Where the two differ
//! a request can be slipped past the filter (Ptacek and Newsham's *insertion*): a first copy of
//! some bytes that TCP discards advances the filter, and the bytes sent next at the same
//! sequence number pass as a "retransmission" the backend reads for the first time. The filter
//! therefore acts as a *traffic normalizer* (Handley, Paxson and Kreibich, USENIX Security
//! 2001): every segment that would change its view of a connection passes the checks Linux's
//! `tcp_validate_incoming`, `tcp_ack` and `tcp_data_queue` make, and is dropped (or trimmed)
//! where TCP would discard it, so the two views never part. Where the filter cannot know
//! exactly what TCP will do, it errs towards dropping: a segment the filter drops and TCP would
//! have accepted costs the client a retransmission, never the filter its view.
//!
//! The checks ([`judge`]), for a segment that carries new bytes or a FIN on a connection the
//! filter follows:
//!
//! | TCP discards it when | the filter |
//! |---|---|
//! | it has no ACK flag | drops it (`no_ack`) |
//! | its ACK acknowledges data the server never sent (`after(ack, snd_nxt)`) | drops it (`bad_ack`), where the server's `snd_nxt` is known exactly (responses followed from the handshake) |
//! | its ACK is older than `snd_una - max_window` (RFC 5961 §5.2) | drops it (`bad_ack`) when older than the highest ACK it accepted minus the handshake's window: a bound at least as strict |
//! | its timestamp fails PAWS (RFC 7323) | drops it (`paws`) when `TSval` is more than 1 older than the newest it accepted (at least as strict as TCP's `ts_recent`), or when timestamps were negotiated and it carries none (kernels differ there) |
//! | it starts at or past the right edge of the receive window (zero window included) | drops it (`out_of_window`) |
//! | its data runs past the right edge (kernels differ: some keep it, newer ones only with an empty receive queue) | trims it to the edge (`out_of_window`, counted; the client resends the rest) |
//!
//! The checksum, the packet type and the IP header are checked by the classifier itself (they
//! need the skb); a SYN never changes the filter's view (in an established connection TCP
//! answers it with a challenge ACK and discards it, RFC 5961 §4); an RST changes it only at
//! exactly the next expected byte (RFC 5961 §3, [`rst_acceptable`]); a FIN only in order.

use crate::{tcp_flags, Reason};

/// TCP option kinds the filter reads.
pub mod kind {
    pub const EOL: u8 = 0;
    pub const NOP: u8 = 1;
    pub const WSCALE: u8 = 3;
    pub const TIMESTAMP: u8 = 8;
}

/// Longest TCP option block (60-byte header minus the fixed 20).
pub const OPTIONS_MAX: usize = 40;

/// The options the filter reads from a segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Window scale shift (SYN and SYN|ACK only), if present.
    pub wscale: Option<u8>,
    /// Timestamp value, if a timestamp option is present.
    pub tsval: Option<u32>,
}

/// Walks an option block one option at a time (the kernel drives it from a `bpf_loop`
/// callback; [`parse_options`] loops it on the host).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OptionWalk {
    /// Offset of the next option.
    pub at: u32,
    /// 1 when the walk is over (end of the block, `EOL`, or a malformed option).
    pub done: u32,
    /// `Options::wscale`, 0xff for none.
    pub wscale: u32,
    /// 1 when a timestamp was found; its value.
    pub has_ts: u32,
    pub tsval: u32,
}

impl OptionWalk {
    pub const fn new() -> OptionWalk {
        OptionWalk {
            at: 0,
            done: 0,
            wscale: 0xff,
            has_ts: 0,
            tsval: 0,
        }
    }

    /// Take the option at `self.at` of `opts[..len]` (`len <= OPTIONS_MAX`). Returns false
    /// when the walk is over. A malformed block (an option longer than the block, a length
    /// below 2) ends the walk with what was found so far; Linux's parser does the same.
    #[inline(always)]
    pub fn step(&mut self, opts: &[u8; OPTIONS_MAX], len: usize) -> bool {
        let at = self.at as usize;
        if self.done != 0 || at >= len || at >= OPTIONS_MAX {
            self.done = 1;
            return false;
        }
        let k = opts[at];
        if k == kind::EOL {
            self.done = 1;
            return false;
        }
        if k == kind::NOP {
            self.at += 1;
            return true;
        }
        if at + 1 >= len || at + 1 >= OPTIONS_MAX {
            self.done = 1;
            return false;
        }
        let n = opts[at + 1] as usize;
        if n < 2 || at + n > len {
            self.done = 1;
            return false;
        }
        if k == kind::WSCALE && n == 3 && at + 2 < OPTIONS_MAX {
            self.wscale = opts[at + 2] as u32;
        } else if k == kind::TIMESTAMP && n == 10 && at + 5 < OPTIONS_MAX {
            self.has_ts = 1;
            self.tsval =
                u32::from_be_bytes([opts[at + 2], opts[at + 3], opts[at + 4], opts[at + 5]]);
        }
        self.at += n as u32;
        true
    }

    pub fn options(&self) -> Options {
        Options {
            // RFC 7323 §2.3: a shift above 14 is used as 14.
            wscale: (self.wscale != 0xff).then(|| (self.wscale as u8).min(14)),
            tsval: (self.has_ts != 0).then_some(self.tsval),
        }
    }
}

/// The options of `opts[..len]`.
pub fn parse_options(opts: &[u8; OPTIONS_MAX], len: usize) -> Options {
    let mut w = OptionWalk::new();
    let mut i = 0;
    while i < OPTIONS_MAX && w.step(opts, len) {
        i += 1;
    }
    w.options()
}

/// The timestamp of the usual option layout of a data segment (`NOP NOP TS`, what Linux, the
/// BSDs and Windows send), read without a walk from the option block's first `N` bytes (at
/// least 8; the block is `len` bytes): `Some(tsval)`, or `None` when the block has another
/// layout (then walk it) — `Some` is exactly what [`parse_options`] would find.
#[inline(always)]
pub fn fast_tsval<const N: usize>(opts: &[u8; N], len: usize) -> Option<u32> {
    const { assert!(N >= 8) };
    if len >= 12
        && opts[0] == kind::NOP
        && opts[1] == kind::NOP
        && opts[2] == kind::TIMESTAMP
        && opts[3] == 10
    {
        return Some(u32::from_be_bytes([opts[4], opts[5], opts[6], opts[7]]));
    }
    None
}

/// `a` is after `b` in sequence space.
#[inline(always)]
pub fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// `a` is before `b` in sequence space.
#[inline(always)]
pub fn before(a: u32, b: u32) -> bool {
    after(b, a)
}

/// What the ingress side knows of the client's half of a connection: written by the ingress
/// classifier only (part of the connection's `CONNS` entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientView {
    /// The newest timestamp value of an accepted segment (with [`client::TS_SEEN`]).
    pub ts_max: u32,
    /// The highest acknowledgement number of an accepted segment (with
    /// [`client::ACK_SEEN`]).
    pub ack_max: u32,
    /// The window the client advertised in the handshake's last ACK, scaled: a lower bound
    /// of the `max_window` the server's TCP holds (with [`client::WIN0`]).
    pub win0: u32,
    /// [`client`] bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ClientView>() == 16);

/// [`ClientView::flags`] bits.
pub mod client {
    /// `ts_max` holds a value.
    pub const TS_SEEN: u32 = 1 << 0;
    /// `ack_max` holds a value.
    pub const ACK_SEEN: u32 = 1 << 1;
    /// `win0` holds a value.
    pub const WIN0: u32 = 1 << 2;
    /// Both ends sent the timestamp option in the handshake: every segment must carry one.
    pub const TS_ON: u32 = 1 << 3;
}

/// What the egress side knows of the server's receive window: written by the egress
/// classifier only (part of the connection's `CONNS` entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerView {
    /// The right edge of the server's receive window as it last advertised it: its
    /// acknowledgement number plus its window, scaled (with [`server::EDGE`]).
    pub edge: u32,
    /// The server's window scale shift (with [`server::WSCALE`]): 0 when either end did not
    /// send the option.
    pub wscale: u8,
    /// [`server`] bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ServerView>() == 8);

/// [`ServerView::flags`] bits.
pub mod server {
    /// `edge` holds a value.
    pub const EDGE: u8 = 1 << 0;
    /// `wscale` is known (from the handshake).
    pub const WSCALE: u8 = 1 << 1;
}

impl ServerView {
    /// A server segment advertised window `window` (raw field) with acknowledgement `ack`:
    /// the right edge moves there (it never moves left: RFC 9293 §3.8.6 forbids shrinking;
    /// a stale segment arriving late leaves it where it is).
    #[inline(always)]
    pub fn advertise(&mut self, ack: u32, window: u16) {
        if self.flags & server::WSCALE == 0 {
            return;
        }
        let edge = ack.wrapping_add((window as u32) << (self.wscale & 15));
        if self.flags & server::EDGE == 0 || after(edge, self.edge) {
            self.edge = edge;
            self.flags |= server::EDGE;
        }
    }
}

/// A client segment, as far as [`judge`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub seq: u32,
    pub ack: u32,
    /// [`tcp_flags`] bits.
    pub flags: u8,
    pub payload_len: u32,
    pub tsval: Option<u32>,
}

/// What to do with a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Accept its first `n` payload bytes only (the rest is past the window's edge).
    Trim(u32),
    /// Drop it: TCP would discard it (or might, on some kernel).
    Drop(Reason),
}

/// Whether the server's TCP will accept `seg`, a segment with new bytes (or a FIN) on an
/// established connection whose next expected byte is `pos`; `snd_nxt` is the server's next
/// sequence number when it is known exactly.
#[inline(always)]
pub fn judge(
    seg: &Seg,
    pos: u32,
    client: &ClientView,
    server: &ServerView,
    snd_nxt: Option<u32>,
) -> Verdict {
    if seg.flags & tcp_flags::ACK == 0 {
        return Verdict::Drop(Reason::NoAck);
    }
    if let Some(n) = snd_nxt {
        if after(seg.ack, n) {
            return Verdict::Drop(Reason::BadAck);
        }
    }
    let known = client::ACK_SEEN | client::WIN0;
    if client.flags & known == known && before(seg.ack, client.ack_max.wrapping_sub(client.win0)) {
        return Verdict::Drop(Reason::BadAck);
    }
    match seg.tsval {
        None if client.flags & client::TS_ON != 0 => return Verdict::Drop(Reason::Paws),
        Some(t)
            if client.flags & client::TS_SEEN != 0
                && (client.ts_max.wrapping_sub(t) as i32) > 1 =>
        {
            return Verdict::Drop(Reason::Paws)
        }
        _ => {}
    }
    if seg.payload_len > 0 && server.flags & server::EDGE != 0 {
        // TCP takes the segment from `seq`; bytes before `pos` are old (its first copy
        // stays).
        if !before(seg.seq, server.edge) {
            return Verdict::Drop(Reason::OutOfWindow);
        }
        let end = seg.seq.wrapping_add(seg.payload_len);
        if after(end, server.edge) {
            let keep = server.edge.wrapping_sub(seg.seq);
            if !after(seg.seq.wrapping_add(keep), pos) {
                // Nothing new inside the window.
                return Verdict::Drop(Reason::OutOfWindow);
            }
            return Verdict::Trim(keep);
        }
    }
    Verdict::Accept
}

/// Note what a client segment says in the client's view: the newest timestamp and the highest
/// acknowledgement (no further than `snd_nxt`, where it is known). The server's TCP takes them
/// from every segment it validates, pure ACKs and retransmissions included; noting them from
/// segments it would not validate only makes [`judge`] stricter.
#[inline(always)]
pub fn note(client: &mut ClientView, seg: &Seg, snd_nxt: Option<u32>) {
    if let Some(t) = seg.tsval {
        if client.flags & client::TS_SEEN == 0 || after(t, client.ts_max) {
            client.ts_max = t;
        }
        client.flags |= client::TS_SEEN;
    }
    if seg.flags & tcp_flags::ACK == 0 {
        return;
    }
    let ack = match snd_nxt {
        Some(n) if after(seg.ack, n) => n,
        _ => seg.ack,
    };
    if client.flags & client::ACK_SEEN == 0 || after(ack, client.ack_max) {
        client.ack_max = ack;
    }
    client.flags |= client::ACK_SEEN;
}

/// Whether an RST with sequence number `seq` resets a connection whose next expected byte is
/// `pos`: only at exactly that byte (RFC 5961 §3; in the window otherwise, TCP answers with a
/// challenge ACK and keeps the connection).
#[inline(always)]
pub fn rst_acceptable(seq: u32, pos: u32) -> bool {
    seq == pos
}

/// A connection's handshake as the filter sees it, until its last ACK (the `SYNS` table): the
/// client's SYN (written by the ingress side) and the server's SYN|ACK (egress side).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    /// The client's initial sequence number.
    pub client_isn: u32,
    /// The server's initial sequence number (with [`hs::SYNACK`]).
    pub server_isn: u32,
    /// The right edge of the server's receive window its SYN|ACK advertised (unscaled, as
    /// RFC 7323 has it for SYN segments).
    pub edge: u32,
    /// The client's window scale shift (0xff: none), then the server's.
    pub client_wscale: u8,
    pub server_wscale: u8,
    /// [`hs`] bits.
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Handshake>() == 16);

/// [`Handshake::flags`] bits.
pub mod hs {
    /// The server's SYN|ACK was seen.
    pub const SYNACK: u8 = 1 << 0;
    /// The client's SYN carried a timestamp.
    pub const CLIENT_TS: u8 = 1 << 1;
    /// The server's SYN|ACK carried a timestamp.
    pub const SERVER_TS: u8 = 1 << 2;
}

impl Handshake {
    /// The client's SYN with initial sequence number `isn` and options `o`.
    pub fn syn(isn: u32, o: &Options) -> Handshake {
        Handshake {
            client_isn: isn,
            server_isn: 0,
            edge: 0,
            client_wscale: o.wscale.unwrap_or(0xff),
            server_wscale: 0xff,
            flags: if o.tsval.is_some() { hs::CLIENT_TS } else { 0 },
            _pad: 0,
        }
    }

    /// The server's SYN|ACK: initial sequence number `isn`, acknowledging `ack`, window
    /// `window`, options `o`. One that does not acknowledge the client's SYN is ignored.
    pub fn synack(&mut self, isn: u32, ack: u32, window: u16, o: &Options) {
        if ack != self.client_isn.wrapping_add(1) {
            return;
        }
        self.server_isn = isn;
        self.edge = ack.wrapping_add(window as u32);
        self.server_wscale = o.wscale.unwrap_or(0xff);
        self.flags |= hs::SYNACK;
        if o.tsval.is_some() {
            self.flags |= hs::SERVER_TS;
        }
    }

    /// Whether a client segment with `seq` and `ack` completes this handshake (it
    /// acknowledges the server's SYN|ACK, which the filter saw).
    pub fn completed_by(&self, seq: u32, ack: u32) -> bool {
        self.flags & hs::SYNACK != 0
            && seq == self.client_isn.wrapping_add(1)
            && ack == self.server_isn.wrapping_add(1)
    }

    /// Whether window scaling is on (both ends sent the option): then the shifts apply to
    /// every window after the SYNs.
    fn scaling(&self) -> bool {
        self.client_wscale != 0xff && self.server_wscale != 0xff
    }

    /// The views the connection starts with, at the handshake's last ACK (its window `window`).
    pub fn views(&self, window: u16) -> (ClientView, ServerView) {
        let (cs, ss) = if self.scaling() {
            (self.client_wscale.min(14), self.server_wscale.min(14))
        } else {
            (0, 0)
        };
        let ts_on = self.flags & (hs::CLIENT_TS | hs::SERVER_TS) == hs::CLIENT_TS | hs::SERVER_TS;
        let client = ClientView {
            ts_max: 0,
            ack_max: 0,
            win0: (window as u32) << cs,
            flags: client::WIN0 | if ts_on { client::TS_ON } else { 0 },
        };
        let server = ServerView {
            edge: self.edge,
            wscale: ss,
            flags: server::EDGE | server::WSCALE,
            _pad: [0; 2],
        };
        (client, server)
    }
}

#[cfg(test)]
mod tests;
