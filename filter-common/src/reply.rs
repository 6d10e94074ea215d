//! Following a connection's server-to-client bytes far enough to know where each response
//! ends: status line → headers → body (`Content-Length`, chunked, none, or until the server
//! closes) → next response.
//!
//! [`Replies`] is the per-connection state the egress classifier keeps (its half of the
//! connection's `CONNS` entry, [`crate::Conn`]). It counts
//! the final responses the server has completed ([`Replies::done`]) and the server's next
//! sequence number ([`Replies::snd_nxt`]); the ingress classifier reads both to decide when a
//! refused request may be answered (every earlier response complete and acknowledged) and
//! whether an `Upgrade` / `CONNECT` request was accepted. Response `r` answers request `r`:
//! [`ReqView`] is what the egress side reads from the connection's ingress half about the
//! requests the backend got.
//!
//! The caller feeds the bytes of each in-order segment: [`Replies::step`] one byte at a time
//! for status lines, headers and chunk-size lines, [`Replies::consume`] for body bytes in bulk.
//! Anything that cannot be framed with certainty (not `HTTP/1.x NNN`, two different
//! `Content-Length`s, a malformed chunk size, a response nobody asked for, a `101` to a request
//! that did not ask to upgrade, a gap in the sequence space) makes the state
//! [lost](Replies::is_lost) for good: the ingress side then falls back to what it does without
//! egress state.
//!
//! **Lockstep: framing only where it matters.** Framing every response costs the egress side
//! a parse of every status line and header block. Most connections never need it: a client
//! sends a request, reads the whole response, sends the next. So a connection starts
//! [idle](Replies::is_idle): the egress side keeps only `snd_nxt`, and the ingress side infers
//! ([`infer`]) that every earlier response is complete when the next request comes after the
//! server sent something since the previous request and the client has acknowledged all of it.
//! Where that does not hold, it asks the egress side to start framing (`Stream::arm`): at once
//! when the server has sent nothing since the previous request (the next server byte starts
//! its response, so framing from there is exact), and for every `Upgrade` / `CONNECT` request
//! (whose answer must be read); a request that arrives while part of a response is still
//! unacknowledged waits (held) until the client has it all. Framing, once armed, stays on.
//!
//! Same constraints as the rest of the crate: runs inside a `bpf_loop` callback; no panics,
//! constant-bounded loops, integer-only state (any byte pattern is a valid state).

use crate::chunk::{self, Chunk};
use crate::swar;
use crate::token::{insert, pack, zero, NAME_WORDS};

/// Requests outstanding (sent, response not complete) that [`ReqView::head_ring`] can
/// describe: the ingress side holds a new request rather than let more be outstanding.
pub const RING: u32 = 64;
/// The ingress side holds a new request when this many are outstanding.
pub const OUTSTANDING_MAX: u32 = RING - 1;
/// Longest status line or header block followed; past it the state is lost.
const HEAD_LIMIT: u32 = 65536;
/// Bytes one [`Replies::skip_words`] call takes at most.
pub const LINE_SKIP_MAX: u32 = 64;
/// Largest `Content-Length` followed (1 TiB, as a chunk's size).
const LENGTH_MAX: u64 = chunk::SIZE_MAX;

/// [`ReqView::switch`]: the last request sent asked to switch protocols.
pub const SWITCH_NONE: u8 = 0;
/// An `Upgrade` request: a `101` answer switches.
pub const SWITCH_UPGRADE: u8 = 1;
/// A `CONNECT` request: a `2xx` answer switches.
pub const SWITCH_CONNECT: u8 = 2;

mod phase {
    pub const STATUS: u8 = 0;
    pub const STATUS_REST: u8 = 1;
    pub const HEADER_START: u8 = 2;
    pub const HEADER_NAME: u8 = 3;
    pub const HEADER_VALUE: u8 = 4;
    pub const HEADER_LF: u8 = 5;
    pub const HEADERS_END_LF: u8 = 6;
    pub const BODY: u8 = 7;
    pub const CHUNK_SIZE: u8 = crate::chunk::SIZE;
    pub const CHUNK_EXT: u8 = crate::chunk::EXT;
    pub const CHUNK_SIZE_LF: u8 = crate::chunk::SIZE_LF;
    pub const CHUNK_DATA: u8 = crate::chunk::DATA;
    pub const CHUNK_DATA_CR: u8 = crate::chunk::DATA_CR;
    pub const CHUNK_DATA_LF: u8 = crate::chunk::DATA_LF;
    /// A body delimited by the server closing the connection.
    pub const CLOSE: u8 = 14;
    /// The connection switched protocols: nothing more to frame.
    pub const SWITCHED: u8 = 15;
    /// Framing lost: nothing more to frame.
    pub const LOST: u8 = 16;
    /// A header line the framing does not read (its name so far is a prefix of neither
    /// `Content-Length` nor `Transfer-Encoding`): skipped to its LF.
    pub const SKIP_LINE: u8 = 17;
    /// Not followed: the connection was adopted mid-way, its server's SYN|ACK has not been
    /// seen (it may leave through another interface), or the server reset it.
    pub const NONE: u8 = 18;
    /// Followed in lockstep: only `snd_nxt` (and the FIN) is kept, nothing is framed.
    pub const IDLE: u8 = 19;
}

mod flag {
    pub const CONTENT_LENGTH: u8 = 1 << 0;
    pub const TRANSFER_ENCODING: u8 = 1 << 1;
    /// The last `Transfer-Encoding` ends in `chunked`.
    pub const CHUNKED: u8 = 1 << 2;
    /// Reading the trailer section of a chunked body.
    pub const TRAILER: u8 = 1 << 3;
    /// The current `Content-Length` value had whitespace after digits.
    pub const CL_SPACE: u8 = 1 << 4;
    /// The server sent its FIN.
    pub const FIN: u8 = 1 << 5;
}

mod header {
    pub const OTHER: u8 = 0;
    pub const CONTENT_LENGTH: u8 = 1;
    pub const TRANSFER_ENCODING: u8 = 2;
}

const CONTENT_LENGTH: (u8, [u64; NAME_WORDS]) = pack("content-length");
const TRANSFER_ENCODING: (u8, [u64; NAME_WORDS]) = pack("transfer-encoding");
/// `chunked` as the low 7 bytes of the value's tail register (last byte lowest).
const CHUNKED_TAIL: u64 = u64::from_be_bytes([0, b'c', b'h', b'u', b'n', b'k', b'e', b'd']);

/// `HTTP/1.` as the low seven bytes of a little-endian word.
const STATUS_PREFIX: u64 = u64::from_le_bytes(*b"HTTP/1.\0");

/// What the egress side knows about the requests the backend got, from the ingress state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqView {
    /// Bit `r % RING`: request `r` was `HEAD` (its response has no body).
    pub head_ring: u64,
    /// Requests whose head reached the backend.
    pub reqs: u32,
    /// `SWITCH_*`: what the last request (index `reqs - 1`) asked for.
    pub switch: u8,
    /// Non-zero: a method-override header made a request's `HEAD`-ness uncertain (a backend
    /// that honours it answers with or without a body against its request line): the
    /// responses cannot be framed with certainty any more.
    pub unsure: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ReqView>() == 16);

/// What the caller must do after a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum REv {
    More,
    /// Body bytes follow: consume them with [`Replies::consume`].
    Bulk,
}

/// Per-connection response state.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Replies {
    /// Body bytes left in the current `Content-Length` body or chunk.
    pub body_left: u64,
    /// The `Content-Length` value being read, or the one in force.
    cl: u64,
    /// Header name being read, lowercased (first 24 bytes).
    name: [u64; NAME_WORDS],
    /// Last 8 non-blank bytes of the `Transfer-Encoding` value being read, lowercased.
    tail: u64,
    /// Sequence number of the next byte to frame.
    pub pos: u32,
    /// The server's next sequence number: the highest end seen (its FIN included).
    pub snd_nxt: u32,
    /// Final responses completed (`1xx` other than a switching `101` are interim).
    pub done: u32,
    /// Index of the response that switched protocols (with [`Replies::is_switched`]).
    pub switch_index: u32,
    /// Bytes of the current status line or header block, or chunk-size digits.
    count: u32,
    pub status: u16,
    name_len: u8,
    phase: u8,
    flags: u8,
    header: u8,
    /// Digits in the current `Content-Length` value.
    cl_digits: u8,
    _pad: u8,
    _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<Replies>() == 80);

impl Replies {
    /// A connection whose server's next byte is `pos` (after its SYN|ACK) and starts a response.
    pub const fn new(pos: u32) -> Replies {
        Replies {
            body_left: 0,
            cl: 0,
            name: [0; NAME_WORDS],
            tail: 0,
            pos,
            snd_nxt: pos,
            done: 0,
            switch_index: 0,
            count: 0,
            status: 0,
            name_len: 0,
            phase: phase::STATUS,
            flags: 0,
            header: header::OTHER,
            cl_digits: 0,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// A connection whose responses are followed from the server's SYN|ACK (its next byte
    /// `pos`), in lockstep: nothing is framed until the ingress side asks ([`Replies::arm`]).
    pub const fn idle(pos: u32) -> Replies {
        let mut r = Replies::new(pos);
        r.phase = phase::IDLE;
        r
    }

    /// Followed in lockstep, not framing (see the module's docs).
    pub fn is_idle(&self) -> bool {
        self.phase == phase::IDLE
    }

    /// What the ingress side reads of this state at a segment, as `crate::REP_*` bits.
    #[inline(always)]
    pub fn state_bits(&self) -> u32 {
        let mut b = 0;
        if self.followed() {
            b |= crate::REP_FOLLOWED;
        }
        if self.is_idle() {
            b |= crate::REP_IDLE;
        }
        if self.is_lost() {
            b |= crate::REP_LOST;
        }
        if self.is_switched() {
            b |= crate::REP_SWITCHED;
        }
        if self.fin_seen() {
            b |= crate::REP_FIN;
        }
        b
    }

    /// Start framing at `pos`, the first byte of a response, with `done` responses complete
    /// before it (`snd_nxt` and a FIN seen stay).
    pub fn arm(&mut self, pos: u32, done: u32) {
        self.pos = pos;
        self.done = done;
        self.switch_index = 0;
        self.next_response();
    }

    /// A connection whose responses are not followed (see [`Replies::followed`]).
    pub const fn none() -> Replies {
        let mut r = Replies::new(0);
        r.phase = phase::NONE;
        r
    }

    /// Whether the server's responses on this connection are followed (from its SYN|ACK on),
    /// lost or not.
    pub fn followed(&self) -> bool {
        self.phase != phase::NONE
    }

    /// Give up framing this connection.
    pub fn lose(&mut self) {
        self.phase = phase::LOST;
    }

    pub fn is_lost(&self) -> bool {
        self.phase == phase::LOST
    }

    /// The response at [`Replies::switch_index`] switched protocols (`101` to an `Upgrade`
    /// request, `2xx` to `CONNECT`).
    pub fn is_switched(&self) -> bool {
        self.phase == phase::SWITCHED
    }

    /// The server sent its FIN: no response follows (recorded on a lost state too).
    pub fn fin_seen(&self) -> bool {
        self.flags & flag::FIN != 0
    }

    /// Body (or post-switch, or unframeable) bytes are next: consume them with
    /// [`Replies::consume`], not [`Replies::step`].
    pub fn in_bulk(&self) -> bool {
        matches!(
            self.phase,
            phase::BODY | phase::CHUNK_DATA | phase::CLOSE | phase::SWITCHED | phase::LOST
        )
    }

    pub fn bulk_left(&self) -> u64 {
        match self.phase {
            phase::BODY | phase::CHUNK_DATA => self.body_left,
            phase::CLOSE | phase::SWITCHED | phase::LOST => u64::MAX,
            _ => 0,
        }
    }

    /// Consume up to `n` bulk bytes (no more than `bulk_left()`); returns how many.
    #[inline(always)]
    pub fn consume(&mut self, n: u64) -> u64 {
        let n = if n > self.bulk_left() {
            self.bulk_left()
        } else {
            n
        };
        self.pos = self.pos.wrapping_add(n as u32);
        if self.phase == phase::BODY || self.phase == phase::CHUNK_DATA {
            self.body_left -= n;
            if self.body_left == 0 {
                if self.phase == phase::BODY {
                    self.complete();
                } else {
                    chunk::data_done(&mut self.phase);
                }
            }
        }
        n
    }

    /// The server's FIN at sequence number `seq` (after any payload of its segment): a body
    /// delimited by the close is complete.
    pub fn fin(&mut self) {
        if self.phase == phase::CLOSE {
            self.complete();
        }
        self.flags |= flag::FIN;
    }

    /// Start the next response at the current position. Field by field (see
    /// `Stream::next_request`).
    #[inline(always)]
    fn next_response(&mut self) {
        zero(&mut self.body_left);
        zero(&mut self.cl);
        zero(&mut self.tail);
        self.count = 0;
        self.status = 0;
        self.name_len = 0;
        self.phase = phase::STATUS;
        self.flags &= flag::FIN;
        self.header = header::OTHER;
        self.cl_digits = 0;
    }

    #[inline(always)]
    fn complete(&mut self) {
        self.done = self.done.wrapping_add(1);
        self.next_response();
    }

    /// Feed one byte (not a bulk byte: see [`Replies::in_bulk`]).
    #[inline(always)]
    pub fn step(&mut self, b: u8, req: &ReqView) -> REv {
        self.pos = self.pos.wrapping_add(1);
        match self.phase {
            phase::STATUS => self.step_status(b),
            phase::STATUS_REST => {
                self.count = self.count.wrapping_add(1);
                if b == b'\n' {
                    self.start_headers();
                } else if self.count > HEAD_LIMIT {
                    self.lose();
                }
                REv::More
            }
            phase::HEADER_START
            | phase::HEADER_NAME
            | phase::HEADER_VALUE
            | phase::HEADER_LF
            | phase::HEADERS_END_LF
            | phase::SKIP_LINE => {
                self.count = self.count.wrapping_add(1);
                if self.count > HEAD_LIMIT {
                    self.lose();
                    return REv::More;
                }
                self.step_header(b, req)
            }
            phase::CHUNK_SIZE
            | phase::CHUNK_EXT
            | phase::CHUNK_SIZE_LF
            | phase::CHUNK_DATA_CR
            | phase::CHUNK_DATA_LF => {
                match chunk::step(&mut self.phase, &mut self.body_left, &mut self.count, b) {
                    Chunk::More => REv::More,
                    Chunk::Data => REv::Bulk,
                    Chunk::Last => {
                        self.flags |= flag::TRAILER;
                        self.start_headers();
                        REv::More
                    }
                    Chunk::Bad => {
                        self.lose();
                        REv::More
                    }
                }
            }
            _ => {
                // Bulk phases fed one byte at a time, or a corrupted phase.
                self.pos = self.pos.wrapping_sub(1);
                if self.phase > phase::LOST {
                    self.lose();
                }
                self.consume(1);
                if self.in_bulk() {
                    REv::Bulk
                } else {
                    REv::More
                }
            }
        }
    }

    /// The leading run of the eight bytes of `w` (first byte lowest) that the framing takes
    /// without looking at them one by one: `HTTP/1.x` and ` NNN ` of a status line, the rest
    /// of a status line, a line the framing does not read (its name starts with neither `c`
    /// nor `t`: see `SKIP_LINE`) through its LF and the first byte of the next line, the
    /// letters and `-` of a header name, a value of a header the framing does not read
    /// through its CRLF; one piece, up to where the next phase starts (a loop over pieces in the
    /// kernel's callback multiplies the states its verifier walks by the phases each piece can
    /// end in: 139k instructions for four pieces against 17k for one, on one kernel). Only the
    /// first `avail` bytes of `w` are read (`avail <= 8`; fewer at the end of a window). Takes
    /// them, leaving exactly the state that as many [`Replies::step`] calls would, and returns
    /// how many (0: the caller steps one byte).
    #[inline(always)]
    pub fn step_run(&mut self, w: u64, avail: usize) -> usize {
        if self.count > HEAD_LIMIT - 8 {
            return 0;
        }
        // The bytes past `avail` read as zero, which no run takes.
        self.run_part(w & swar::bytes(avail), avail)
    }

    /// Inside a line whose bytes the framing only counts up to its LF (the rest of a status
    /// line, a line the framing does not read), with room for `LINE_SKIP_MAX` more bytes
    /// before the head limit: whole words without an LF may be taken with
    /// [`Replies::skip_words`].
    #[inline(always)]
    pub fn in_line_rest(&self) -> bool {
        (self.phase == phase::SKIP_LINE || self.phase == phase::STATUS_REST)
            && self.count <= HEAD_LIMIT - LINE_SKIP_MAX
    }

    /// Take `n` bytes (at most `LINE_SKIP_MAX`), none of them an LF, inside a line
    /// ([`Replies::in_line_rest`]): what as many [`Replies::step`] calls would do.
    #[inline(always)]
    pub fn skip_words(&mut self, n: u32) {
        let n = if n < LINE_SKIP_MAX { n } else { LINE_SKIP_MAX };
        self.pos = self.pos.wrapping_add(n);
        self.count = self.count.wrapping_add(n);
    }

    /// One piece of [`Replies::step_run`]: the leading bytes of `w` (`avail` of them, first
    /// byte lowest; the bytes above are zero) in the current phase, at most to where the next
    /// phase starts. Returns how many it took.
    #[inline(always)]
    fn run_part(&mut self, w: u64, avail: usize) -> usize {
        let k = match self.phase {
            phase::STATUS if self.count == 0 => {
                // `HTTP/1.` and the minor version's digit, as one word.
                let minor = (w >> 56) as u8;
                if avail == 8
                    && w & 0x00ff_ffff_ffff_ffff == STATUS_PREFIX
                    && minor.is_ascii_digit()
                {
                    8
                } else {
                    0
                }
            }
            phase::STATUS if self.count == 8 && avail >= 5 => {
                // ` NNN` and the byte after the code, as `step_status` takes them.
                let d = swar::in_range(w, b'0', b'9') & 0x0000_0000_8080_8000;
                let after = (w >> 32) as u8;
                if w as u8 != b' ' || d != 0x0000_0000_8080_8000 {
                    0
                } else if after == b' ' || after == b'\r' {
                    self.status = (((w >> 8) as u8 - b'0') as u16) * 100
                        + (((w >> 16) as u8 - b'0') as u16) * 10
                        + ((w >> 24) as u8 - b'0') as u16;
                    self.phase = phase::STATUS_REST;
                    5
                } else {
                    0
                }
            }
            phase::STATUS_REST | phase::SKIP_LINE => {
                let lf = swar::leading(swar::eq(w, b'\n'));
                if lf >= avail {
                    avail
                } else {
                    // Through the LF: the status line or the field line ends.
                    self.count = self.count.wrapping_add(lf as u32 + 1);
                    self.pos = self.pos.wrapping_add(lf as u32 + 1);
                    if self.phase == phase::STATUS_REST {
                        self.start_headers();
                    } else {
                        // `end_field` of a header the framing does not read.
                        self.phase = phase::HEADER_START;
                    }
                    return lf + 1;
                }
            }
            phase::HEADER_START => {
                let b = w as u8;
                if !crate::method::is_tchar(b) {
                    // An empty line or a byte that loses: `step`.
                    0
                } else if matches!(b | 0x20, b'c' | b't') {
                    // A name that could be a framing header's, as `step_header` starts it.
                    self.start_name(b);
                    1
                } else {
                    self.header = header::OTHER;
                    self.phase = phase::SKIP_LINE;
                    1
                }
            }
            phase::HEADER_NAME => {
                let plain = swar::in_range(w, b'a', b'z')
                    | swar::in_range(w, b'A', b'Z')
                    | swar::eq(w, b'-');
                let k = swar::leading(!plain & swar::HIGH);
                let n = self.name_len;
                insert(&mut self.name, n as usize, swar::lower(w) & swar::bytes(k));
                self.name_len = n.saturating_add(k as u8);
                self.skip_unless_framing();
                k
            }
            phase::HEADER_VALUE if self.header == header::OTHER => {
                let k = swar::leading(swar::eq(w, b'\r') | swar::eq(w, b'\n'));
                let k = if k < avail { k } else { avail };
                if k + 2 <= avail && (w >> (8 * k)) as u16 == u16::from_le_bytes(*b"\r\n") {
                    // Through the CRLF: `end_field` of a header the framing does not read.
                    self.count = self.count.wrapping_add(k as u32 + 2);
                    self.pos = self.pos.wrapping_add(k as u32 + 2);
                    self.phase = phase::HEADER_START;
                    return k + 2;
                }
                k
            }
            _ => 0,
        };
        self.pos = self.pos.wrapping_add(k as u32);
        self.count = self.count.wrapping_add(k as u32);
        k
    }

    /// `HTTP/1.x NNN` then anything up to the end of the line.
    #[inline(always)]
    fn step_status(&mut self, b: u8) -> REv {
        const PREFIX: &[u8; 7] = b"HTTP/1.";
        let i = self.count;
        self.count = self.count.wrapping_add(1);
        let ok = match i {
            0..=6 => b == PREFIX[(i as usize) % 7],
            7 => b.is_ascii_digit(),
            8 => b == b' ',
            9..=11 => {
                if b.is_ascii_digit() {
                    self.status = self.status.wrapping_mul(10).wrapping_add((b - b'0') as u16);
                    true
                } else {
                    false
                }
            }
            _ => {
                if b == b'\n' {
                    self.start_headers();
                    true
                } else if b == b' ' || b == b'\r' {
                    self.phase = phase::STATUS_REST;
                    true
                } else {
                    false
                }
            }
        };
        if !ok {
            self.lose();
        }
        REv::More
    }

    #[inline(always)]
    fn start_headers(&mut self) {
        self.phase = phase::HEADER_START;
        self.count = 0;
    }

    #[inline(always)]
    fn step_header(&mut self, b: u8, req: &ReqView) -> REv {
        match self.phase {
            phase::HEADER_START => {
                if b == b'\r' {
                    self.phase = phase::HEADERS_END_LF;
                    REv::More
                } else if b == b'\n' {
                    self.end_head(req)
                } else if crate::method::is_tchar(b) {
                    if matches!(b | 0x20, b'c' | b't') {
                        self.start_name(b);
                    } else {
                        self.header = header::OTHER;
                        self.phase = phase::SKIP_LINE;
                    }
                    REv::More
                } else {
                    self.lose();
                    REv::More
                }
            }
            phase::HEADER_NAME => {
                if b == b':' {
                    self.header = if self.flags & flag::TRAILER != 0 {
                        header::OTHER
                    } else {
                        self.classify()
                    };
                    self.flags &= !flag::CL_SPACE;
                    if self.header == header::CONTENT_LENGTH {
                        self.cl_digits = 0;
                        self.body_left = 0;
                    } else if self.header == header::TRANSFER_ENCODING {
                        self.tail = 0;
                    }
                    self.phase = phase::HEADER_VALUE;
                } else if crate::method::is_tchar(b) {
                    self.push_name(b);
                    self.skip_unless_framing();
                } else {
                    self.lose();
                }
                REv::More
            }
            phase::HEADER_VALUE => {
                if b == b'\r' {
                    self.phase = phase::HEADER_LF;
                    REv::More
                } else if b == b'\n' {
                    self.end_field()
                } else {
                    self.push_value(b);
                    REv::More
                }
            }
            phase::HEADER_LF => {
                if b == b'\n' {
                    self.end_field()
                } else {
                    self.lose();
                    REv::More
                }
            }
            phase::SKIP_LINE => {
                if b == b'\n' {
                    self.end_field()
                } else {
                    REv::More
                }
            }
            _ => {
                // HEADERS_END_LF
                if b == b'\n' {
                    self.end_head(req)
                } else {
                    self.lose();
                    REv::More
                }
            }
        }
    }

    /// A field line whose first byte is `b` (`c` or `t`): its name is read.
    #[inline(always)]
    fn start_name(&mut self, b: u8) {
        for w in self.name.iter_mut() {
            zero(w);
        }
        self.name_len = 0;
        self.push_name(b);
        self.phase = phase::HEADER_NAME;
    }

    /// Once the name read so far can no longer become `Content-Length` or
    /// `Transfer-Encoding`, the line is skipped to its LF like any line the framing does not
    /// read (its name is not checked further).
    #[inline(always)]
    fn skip_unless_framing(&mut self) {
        let n = self.name_len as usize;
        let prefix = |(len, w): (u8, [u64; NAME_WORDS])| {
            // The name's bytes past `n` are zero: compare the pattern's first `n` bytes.
            n <= len as usize
                && self.name[0] == w[0] & swar::bytes(n)
                && self.name[1] == w[1] & swar::bytes(n.saturating_sub(8))
                && self.name[2] == w[2] & swar::bytes(n.saturating_sub(16))
        };
        if !prefix(CONTENT_LENGTH) && !prefix(TRANSFER_ENCODING) {
            self.header = header::OTHER;
            self.phase = phase::SKIP_LINE;
            // The name is not read any more: forget it, so that a run that took more of its
            // letters leaves the same state as byte steps.
            for w in self.name.iter_mut() {
                zero(w);
            }
            self.name_len = 0;
        }
    }

    #[inline(always)]
    fn push_name(&mut self, b: u8) {
        let n = self.name_len as usize;
        if n < NAME_WORDS * 8 {
            self.name[(n / 8) % NAME_WORDS] |= (b.to_ascii_lowercase() as u64) << (8 * (n % 8));
        }
        self.name_len = self.name_len.saturating_add(1);
    }

    #[inline(always)]
    fn classify(&self) -> u8 {
        let same = |(n, w): (u8, [u64; NAME_WORDS])| {
            n == self.name_len
                && w[0] == self.name[0]
                && w[1] == self.name[1]
                && w[2] == self.name[2]
        };
        if same(CONTENT_LENGTH) {
            header::CONTENT_LENGTH
        } else if same(TRANSFER_ENCODING) {
            header::TRANSFER_ENCODING
        } else {
            header::OTHER
        }
    }

    #[inline(always)]
    fn push_value(&mut self, b: u8) {
        let blank = b == b' ' || b == b'\t';
        if self.header == header::CONTENT_LENGTH {
            if blank {
                if self.cl_digits > 0 {
                    self.flags |= flag::CL_SPACE;
                }
            } else if !b.is_ascii_digit()
                || self.flags & flag::CL_SPACE != 0
                || self.body_left > LENGTH_MAX
            {
                self.lose();
            } else {
                self.body_left = self
                    .body_left
                    .wrapping_mul(10)
                    .wrapping_add((b - b'0') as u64);
                self.cl_digits = 1;
            }
        } else if self.header == header::TRANSFER_ENCODING && !blank {
            self.tail = (self.tail << 8) | b.to_ascii_lowercase() as u64;
        }
    }

    /// The end of one field line.
    #[inline(always)]
    fn end_field(&mut self) -> REv {
        self.phase = phase::HEADER_START;
        if self.flags & flag::TRAILER != 0 {
            return REv::More;
        }
        match self.header {
            header::CONTENT_LENGTH => {
                if self.cl_digits == 0
                    || (self.flags & flag::CONTENT_LENGTH != 0 && self.cl != self.body_left)
                {
                    self.lose();
                }
                self.cl = self.body_left;
                self.body_left = 0;
                self.flags |= flag::CONTENT_LENGTH;
            }
            header::TRANSFER_ENCODING => {
                // The last coding of the last field decides (RFC 9112 §6.3): `chunked`, or a
                // body read until the server closes.
                let top = self.tail >> 56;
                let chunked = self.tail & 0x00ff_ffff_ffff_ffff == CHUNKED_TAIL
                    && (top == 0 || top == b',' as u64);
                self.flags |= flag::TRANSFER_ENCODING;
                if chunked {
                    self.flags |= flag::CHUNKED;
                } else {
                    self.flags &= !flag::CHUNKED;
                }
            }
            _ => {}
        }
        REv::More
    }

    /// The empty line after the header block (or the trailer section): how the body is
    /// framed, given the request it answers.
    #[inline(always)]
    fn end_head(&mut self, req: &ReqView) -> REv {
        if self.flags & flag::TRAILER != 0 {
            self.complete();
            return REv::More;
        }
        let r = self.done;
        if req.unsure != 0 || r.wrapping_sub(req.reqs) as i32 >= 0 {
            // A response to no request the filter saw reach the backend.
            self.lose();
            return REv::More;
        }
        let last = r.wrapping_add(1) == req.reqs;
        let status = self.status;
        if status < 200 {
            if status == 101 {
                if last && req.switch == SWITCH_UPGRADE {
                    self.switch_index = r;
                    self.phase = phase::SWITCHED;
                } else {
                    self.lose();
                }
            } else {
                // Interim (100 Continue, 103 Early Hints): the final response follows.
                self.next_response();
            }
            return REv::More;
        }
        if last && req.switch == SWITCH_CONNECT && status < 300 {
            self.switch_index = r;
            self.phase = phase::SWITCHED;
            return REv::More;
        }
        let head = (req.head_ring >> (r % RING)) & 1 != 0;
        if head || status == 204 || status == 304 {
            self.complete();
            return REv::More;
        }
        if self.flags & flag::TRANSFER_ENCODING != 0 {
            if self.flags & flag::CHUNKED != 0 {
                self.start_chunk_size();
                return REv::More;
            }
            self.phase = phase::CLOSE;
            return REv::Bulk;
        }
        if self.flags & flag::CONTENT_LENGTH != 0 {
            if self.cl == 0 {
                self.complete();
                return REv::More;
            }
            self.body_left = self.cl;
            self.phase = phase::BODY;
            return REv::Bulk;
        }
        self.phase = phase::CLOSE;
        REv::Bulk
    }

    #[inline(always)]
    fn start_chunk_size(&mut self) {
        chunk::start(&mut self.phase, &mut self.body_left, &mut self.count);
    }
}

/// Feed a whole byte run the way the egress classifier does: bulk runs consumed at once,
/// runs of plain bytes through [`Replies::step_run`] (up to eight bytes, fewer at the end),
/// else byte by byte (host tests and fuzz targets compare it with [`feed_bytes`]).
pub fn feed(r: &mut Replies, data: &[u8], req: &ReqView) {
    feed_with(r, data, req, true);
}

/// As [`feed`], without the run fast path.
pub fn feed_bytes(r: &mut Replies, data: &[u8], req: &ReqView) {
    feed_with(r, data, req, false);
}

fn feed_with(r: &mut Replies, data: &[u8], req: &ReqView, runs: bool) {
    let mut i = 0;
    while i < data.len() {
        if r.in_bulk() {
            i += r.consume((data.len() - i) as u64) as usize;
            continue;
        }
        if runs && r.in_line_rest() {
            // Whole words without an LF, as the egress classifier skips them.
            let mut n = 0;
            while n < LINE_SKIP_MAX as usize
                && i + n + 8 <= data.len()
                && swar::eq(swar::word(data, i + n), b'\n') == 0
            {
                n += 8;
            }
            if n > 0 {
                r.skip_words(n as u32);
                i += n;
                continue;
            }
        }
        if runs {
            // Past the end, letters (which a name run would take): `step_run` must not read
            // beyond `avail`, as the kernel's window holds stale bytes there.
            let avail = (data.len() - i).min(8);
            let k = r.step_run(swar::word_padded(data, i, b'Z'), avail);
            if k > 0 {
                i += k;
                continue;
            }
        }
        r.step(data[i], req);
        i += 1;
    }
}

/// What the ingress side can tell, in lockstep, about the responses to the `reqs` requests
/// before the current one ([`infer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Infer {
    /// Every one is complete.
    Complete,
    /// The last one's response has not started: framing can start at `snd_nxt`, exactly.
    Arm,
    /// Part of a response is unacknowledged (the client sent this request without waiting for
    /// all of it): wait until it has.
    Wait,
}

/// The lockstep inference (see the module's docs): `reqs` requests before the current one,
/// `lock_done` of whose responses are known complete; `snd_at_req` the server's next sequence
/// number when the last of them was judged, `snd_nxt` its next sequence number now,
/// `client_ack` the acknowledgement number of the client's segment carrying the current
/// request.
///
/// The last response is complete when the server has sent something since that request and
/// the client has acknowledged all of it: a client that reads each response whole before
/// sending the next request (every browser and HTTP library) sends the next one only then.
/// A client that sends a request while a response is under way shows it, unless the server
/// stopped in the middle of a response and the client had acknowledged all it got: only such
/// a client's own stream could then see an answer placed inside an unfinished response.
#[inline(always)]
pub fn infer(reqs: u32, lock_done: u32, snd_at_req: u32, snd_nxt: u32, client_ack: u32) -> Infer {
    if lock_done == reqs {
        return Infer::Complete;
    }
    let sent = (snd_nxt.wrapping_sub(snd_at_req) as i32) > 0;
    let acked = (client_ack.wrapping_sub(snd_nxt) as i32) >= 0;
    if sent && acked {
        Infer::Complete
    } else if !sent {
        Infer::Arm
    } else {
        Infer::Wait
    }
}

#[cfg(test)]
mod tests;
