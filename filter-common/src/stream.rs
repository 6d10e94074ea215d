//! Following a connection's client-to-server bytes the way the backend reads them: request
//! line → headers → body (`Content-Length` or chunked) → next request.
//!
//! [`Stream`] is the per-connection state the kernel keeps in an LRU map. The caller feeds it
//! the bytes of each in-order segment: [`Stream::step`] one byte at a time for request lines,
//! headers and chunk-size lines, and [`Stream::consume`] for body bytes in bulk.
//! [`Stream::step_run`] is an optional fast path: it takes up to eight bytes at once where
//! they are ordinary (path bytes, query parameters other than `_method`, the rest of a request
//! line, header names and values), with exactly the result of as many `step`s, and leaves
//! everything else to `step`. `step` returns an [`Ev`] whenever the caller has something to
//! do:
//!
//! * [`Ev::Decide`]: the request line's method and canonical path are known (the path is in
//!   the caller's path buffer): look the rule up, then [`Stream::set_verdict`] or refuse.
//! * [`Ev::Override`]: an `X-HTTP-Method-Override` / `X-HTTP-Method` / `X-Method-Override`
//!   header, or a `_method` parameter in the query string, named a method; it must be allowed
//!   too (see "Method overrides" below).
//! * [`Ev::Bulk`]: body bytes follow; consume [`Stream::bulk_left`] of them with `consume`.
//! * [`Ev::Tunnel`]: the head of a request that may stop the connection being HTTP/1.1
//!   (`CONNECT`, or a request carrying `Upgrade`) is complete: stop tracking it, or, when the
//!   server's answer can be seen ([`crate::reply`]), [`Stream::await_reply`].
//! * [`Ev::Await`]: the stream waits for the server's answer to such a request; the byte was
//!   not consumed. [`Stream::resume`] when the answer refused the switch.
//! * [`Ev::Fail`]: refuse the request: an ambiguous path or framing (400), a request line or
//!   header block over the bound (414 / 431), bytes that are not HTTP/1.x.
//!
//! **Method overrides.** Frameworks let a request name another method than its request line
//! does. The three override headers are read from the header block (names in any case, the
//! value upper-cased, as frameworks do). In the query string (after the path's `?`, up to the
//! SP, HTAB, CR or LF that ends the target) every parameter is split off at `&` or `;` and
//! its name read the way PHP reads it for Symfony and Laravel (which honour `_method` in the
//! query of a `POST`): `+` is a space, `%XX` is decoded, leading spaces are dropped, `.` and
//! space read as `_`, a `[` or NUL ends the name; the result is compared with `_method` in any
//! case. A match (`_method`, `%5Fmethod`, `.method`, `_METHOD`, `_method[]`) reports the value
//! (decoded the same way, upper-cased; without `=` it is empty) as an override, whatever the
//! request's method, and every such parameter is reported, not only the last one a framework
//! would take. A value that is not a method token is `Method::Other`. The filter never reads a
//! request body, so `_method` in a form body (which Rails, Laravel, Symfony and Spring honour)
//! is not seen.
//!
//! Framing is strict where backends disagree (request smuggling): `Content-Length` together
//! with `Transfer-Encoding`, two different `Content-Length`s, a `Transfer-Encoding` other than
//! `chunked`, obsolete line folding, control bytes in a header value and a malformed chunk
//! size are all [`Reason::BadFraming`].
//!
//! Same constraints as the rest of the crate: runs inside a `bpf_loop` callback; no panics,
//! constant-bounded loops, integer-only state (any byte pattern is a valid state).

use crate::chunk::{self, Chunk};
use crate::http::{LineParser, Step};
use crate::method::{is_tchar, Method};
use crate::reply::{ReqView, RING, SWITCH_CONNECT, SWITCH_NONE, SWITCH_UPGRADE};
use crate::token::{hex, insert, pack, NAME_WORDS};
use crate::{put, swar, Reason, PATH_MAX};

/// Longest request line (method, target, version) the filter follows: 414 past it.
pub const LINE_LIMIT: u32 = 8192;
/// Longest header block: 431 past it.
pub const HEADER_LIMIT: u32 = 16384;
/// Largest `Content-Length` accepted (1 TiB, as a chunk's size): larger is
/// [`Reason::BadFraming`].
const LENGTH_MAX: u64 = chunk::SIZE_MAX;

mod phase {
    pub const LINE: u8 = 0;
    pub const LINE_REST: u8 = 1;
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
    pub const TUNNEL: u8 = 14;
    /// After an `Upgrade` / `CONNECT` request: waiting for the server's answer.
    pub const AWAIT: u8 = 15;
    /// The query string: a parameter's name (`Stream::qmatch` says how much of `_method` it
    /// spells so far).
    pub const QUERY_NAME: u8 = 16;
    /// The query string: the value of a `_method` parameter (in `Stream::value`).
    pub const QUERY_VALUE: u8 = 17;
    /// The query string: the rest of a parameter that is not `_method`.
    pub const QUERY_SKIP: u8 = 18;
}

/// The query parameter name that overrides the method (Symfony, Laravel), lowercase.
const METHOD_PARAM: &[u8; 7] = b"_method";
/// `Stream::qmatch` once a name spelled all of [`METHOD_PARAM`] and then ended (`[`, NUL).
const QMATCH_ENDED: u8 = 8;
/// A decoded query byte that stands for an invalid escape: neither a method token byte nor a
/// byte of [`METHOD_PARAM`].
const QUERY_INVALID: u8 = 0xff;

/// [`Stream::flags`] bits.
pub mod flag {
    /// The connection's SYN was seen: positions are exact from the first byte.
    pub const SYN: u8 = 1 << 0;
    pub const CONTENT_LENGTH: u8 = 1 << 1;
    pub const CHUNKED: u8 = 1 << 2;
    pub const UPGRADE: u8 = 1 << 3;
    /// Reading the trailer section of a chunked body.
    pub const TRAILER: u8 = 1 << 4;
    /// The current header value had whitespace followed by more bytes.
    const VALUE_SPACE: u8 = 1 << 5;
    pub(super) const VALUE_INNER_SPACE: u8 = 1 << 6;
    pub(super) const PENDING_SPACE: u8 = VALUE_SPACE;
    /// The egress side followed this connection's responses: if it stops (the server reset
    /// the connection), what depends on them fails closed.
    pub const REPLIES_SEEN: u8 = 1 << 7;
    /// Flags that outlive a request.
    pub(super) const PERSISTENT: u8 = SYN | REPLIES_SEEN;
}

/// Headers the filter acts on.
mod header {
    pub const OTHER: u8 = 0;
    pub const CONTENT_LENGTH: u8 = 1;
    pub const TRANSFER_ENCODING: u8 = 2;
    pub const METHOD_OVERRIDE: u8 = 3;
    pub const UPGRADE: u8 = 4;
}

/// Bit 7 of each byte of `w` no header value may hold: a control byte other than HTAB, or
/// DEL (CR and LF end the value; the rest fail the request).
#[inline(always)]
fn value_ctl(w: u64) -> u64 {
    (swar::lt(w, 0x20) & !swar::eq(w, b'\t')) | swar::eq(w, 0x7f)
}

/// Whether the eight bytes of `w` can all go on the value of a header the filter does not act
/// on ([`Stream::take_value_words`]): none is a control byte (HTAB aside) or DEL, so none ends
/// the value or fails it.
#[inline(always)]
pub fn plain_value_word(w: u64) -> bool {
    value_ctl(w) == 0
}

const HEADERS: [(u8, [u64; NAME_WORDS], u8); 6] = {
    const fn h(name: &str, id: u8) -> (u8, [u64; NAME_WORDS], u8) {
        let (n, w) = pack(name);
        (n, w, id)
    }
    [
        h("content-length", header::CONTENT_LENGTH),
        h("transfer-encoding", header::TRANSFER_ENCODING),
        h("x-http-method-override", header::METHOD_OVERRIDE),
        h("x-http-method", header::METHOD_OVERRIDE),
        h("x-method-override", header::METHOD_OVERRIDE),
        h("upgrade", header::UPGRADE),
    ]
};

const CHUNKED: (u8, [u64; NAME_WORDS]) = pack("chunked");

/// What the caller must do after a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ev {
    More,
    Decide,
    /// A method-override header ended: [`Stream::override_method`] names the method.
    Override,
    Bulk,
    Tunnel,
    /// Waiting for the server's answer to an `Upgrade` / `CONNECT` request: the byte was not
    /// consumed.
    Await,
    Fail(Reason),
}

/// Per-connection stream state.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    pub line: LineParser,
    /// Body bytes left in the current `Content-Length` body or chunk.
    pub body_left: u64,
    /// The `Content-Length` value being read.
    cl: u64,
    /// The header name being read, lowercased (first 24 bytes).
    name: [u64; NAME_WORDS],
    /// The header value being read (first 16 bytes; uppercased for method overrides,
    /// lowercased otherwise).
    value: [u64; 2],
    /// Sequence number of the next byte this state expects.
    pub pos: u32,
    /// Sequence number of the current request's first byte.
    pub req_start: u32,
    /// Bytes of the current request line or header block so far (limits), or chunk-size
    /// digits.
    count: u32,
    /// Methods the current request's rule allows (set by the caller on [`Ev::Decide`]).
    pub allow: u32,
    /// `RULE_*` flags of the rule that decided the current request.
    pub rule_flags: u32,
    name_len: u8,
    value_len: u8,
    phase: u8,
    pub flags: u8,
    /// The request line's [`Method`].
    pub method: u8,
    header: u8,
    /// In the query string: how many bytes of `_method` the parameter's name spells so far
    /// (`QMATCH_ENDED`: all, and the name ended).
    qmatch: u8,
    /// In the query string: 0 outside an escape, 1 after `%`, `0x10 | digit` after one hex
    /// digit.
    qesc: u8,
    /// Requests whose head (line and header block) was complete and passed: the backend
    /// answers request `r` with response `r` (`crate::reply`).
    pub reqs: u32,
    /// `reply::SWITCH_*`: the last request asked to switch protocols and the stream awaits
    /// (or will await, after its body) the server's answer.
    pub switch: u8,
    /// Non-zero once a method-override header made a request's `HEAD`-ness uncertain (see
    /// `reply::ReqView::unsure`).
    pub unsure: u8,
    /// Non-zero once the filter refused a request on this connection and reset the backend's
    /// side: nothing of it lives on the server, so a new SYN on its tuple starts afresh.
    pub refused: u8,
    _pad_e: u8,
    /// Non-zero once the lockstep inference took a response for complete without seeing it
    /// end (`crate::reply::infer`): framing, if it starts later, starts where the inference
    /// put a response boundary, which a server pausing inside a response could have misled, so
    /// a switch of protocols it reads is not trusted (the `Upgrade` waits: fail closed).
    pub inferred: u32,
    /// Bit `r % reply::RING`: request `r` was `HEAD`.
    pub head_ring: u64,
    /// Lockstep (`crate::reply`, the module's docs): responses known complete, and the
    /// server's next sequence number when the last request was judged.
    pub lock_done: u32,
    pub snd_at_req: u32,
    /// Non-zero: the egress side is asked to start framing at `arm_pos`, with `arm_done`
    /// responses complete before it.
    pub arm: u32,
    pub arm_pos: u32,
    pub arm_done: u32,
    _pad_l: u32,
}
const _: () = assert!(core::mem::size_of::<Stream>().is_multiple_of(8));

impl Stream {
    /// A connection whose next byte is `pos` and starts a request.
    pub const fn new(pos: u32, flags: u8) -> Stream {
        Stream {
            line: LineParser::new(),
            body_left: 0,
            cl: 0,
            name: [0; NAME_WORDS],
            value: [0; 2],
            pos,
            req_start: pos,
            count: 0,
            allow: 0,
            rule_flags: 0,
            name_len: 0,
            value_len: 0,
            phase: phase::LINE,
            flags: flags & flag::PERSISTENT,
            method: Method::Other as u8,
            header: header::OTHER,
            qmatch: 0,
            qesc: 0,
            reqs: 0,
            switch: SWITCH_NONE,
            unsure: 0,
            refused: 0,
            _pad_e: 0,
            inferred: 0,
            head_ring: 0,
            lock_done: 0,
            snd_at_req: 0,
            arm: 0,
            arm_pos: 0,
            arm_done: 0,
            _pad_l: 0,
        }
    }

    /// Start the next request at the current position. Field by field: a whole-struct
    /// assignment becomes a byte-wise memcpy loop in BPF, which the verifier walks at every
    /// call site.
    #[inline(always)]
    fn next_request(&mut self) {
        // Stores of their own (`put`): merged, they become a byte-loop memset in BPF.
        self.line.reset();
        put(&mut self.body_left, 0);
        put(&mut self.cl, 0);
        self.req_start = self.pos;
        put(&mut self.count, 0);
        put(&mut self.allow, 0);
        put(&mut self.rule_flags, 0);
        put(&mut self.name_len, 0);
        put(&mut self.value_len, 0);
        // After an `Upgrade` / `CONNECT` request (and its body), wait for the answer.
        let next = if self.switch != SWITCH_NONE {
            phase::AWAIT
        } else {
            phase::LINE
        };
        put(&mut self.phase, next);
        self.flags &= flag::PERSISTENT;
        put(&mut self.method, Method::Other as u8);
        put(&mut self.header, header::OTHER);
        put(&mut self.qmatch, 0);
        put(&mut self.qesc, 0);
    }

    /// Make this a fresh connection state, in place (see [`Stream::new`]).
    #[inline(always)]
    pub fn reset(&mut self, pos: u32, flags: u8) {
        self.pos = pos;
        self.flags = flags & flag::PERSISTENT;
        self.clear_name();
        self.clear_value();
        put(&mut self.reqs, 0);
        put(&mut self.switch, SWITCH_NONE);
        put(&mut self.unsure, 0);
        put(&mut self.refused, 0);
        put(&mut self._pad_e, 0);
        put(&mut self.inferred, 0);
        put(&mut self.head_ring, 0);
        put(&mut self.lock_done, 0);
        put(&mut self.snd_at_req, 0);
        put(&mut self.arm, 0);
        put(&mut self.arm_pos, 0);
        put(&mut self.arm_done, 0);
        put(&mut self._pad_l, 0);
        self.next_request();
    }

    /// The responses complete before the current request as the ingress side knows them:
    /// the egress side's count once it frames (`rep_done`), else the lockstep inference's (or
    /// the count framing is asked to start from).
    #[inline(always)]
    pub fn responses_done(&self, rep_idle: bool, rep_done: u32) -> u32 {
        if !rep_idle {
            rep_done
        } else if self.arm != 0 {
            self.arm_done
        } else {
            self.lock_done
        }
    }

    /// Ask the egress side to start framing at `pos` (the server's next byte, which starts the
    /// response to the request `done` counts up to).
    #[inline(always)]
    pub fn request_arm(&mut self, pos: u32, done: u32) {
        if self.arm == 0 {
            self.arm = 1;
            self.arm_pos = pos;
            self.arm_done = done;
        }
    }

    /// Forget everything from `pos` on: the bytes from `pos` will be sent again and start a
    /// request (used when a segment is cut before a refused request).
    pub fn restart_at(&mut self, pos: u32) {
        self.pos = pos;
        self.next_request();
    }

    /// Stop following this connection: its further bytes pass untouched.
    pub fn tunnel(&mut self) {
        self.phase = phase::TUNNEL;
    }

    pub fn is_tunnel(&self) -> bool {
        self.phase == phase::TUNNEL
    }

    /// On [`Ev::Tunnel`], when the server's answer will be seen: go on with the request's body
    /// (if any), then wait for the answer ([`Ev::Await`]) instead of parsing more requests.
    pub fn await_reply(&mut self) -> Ev {
        self.switch = if self.method == Method::Connect as u8 {
            SWITCH_CONNECT
        } else {
            SWITCH_UPGRADE
        };
        if self.flags & flag::CHUNKED != 0 {
            self.start_chunk_size();
            return Ev::More;
        }
        if self.flags & flag::CONTENT_LENGTH != 0 && self.body_left > 0 {
            self.phase = phase::BODY;
            return Ev::Bulk;
        }
        self.next_request();
        Ev::More
    }

    /// Waiting for the server's answer to an `Upgrade` / `CONNECT` request.
    pub fn is_awaiting(&self) -> bool {
        self.phase == phase::AWAIT
    }

    /// The server answered the awaited request without switching protocols: the next bytes
    /// start a request.
    pub fn resume(&mut self) {
        self.switch = SWITCH_NONE;
        self.next_request();
    }

    /// Requests before the current one (the current one's head may already be counted in
    /// [`Stream::reqs`] when its body is being read).
    pub fn reqs_before_current(&self) -> u32 {
        let in_body = self.phase >= phase::BODY && self.phase <= phase::CHUNK_DATA_LF;
        if in_body || self.flags & flag::TRAILER != 0 {
            self.reqs.wrapping_sub(1)
        } else {
            self.reqs
        }
    }

    /// What the egress side needs to frame the responses.
    pub fn req_view(&self) -> ReqView {
        ReqView {
            head_ring: self.head_ring,
            reqs: self.reqs,
            switch: self.switch,
            unsure: self.unsure,
            _pad: [0; 2],
        }
    }

    /// The current request's head passed: count it, and remember whether it was `HEAD`.
    #[inline(always)]
    fn head_done(&mut self) {
        let bit = 1u64 << (self.reqs % RING);
        if self.method == Method::Head as u8 {
            self.head_ring |= bit;
        } else {
            self.head_ring &= !bit;
        }
        self.reqs = self.reqs.wrapping_add(1);
    }

    /// Body bytes are next: consume them with [`Stream::consume`], not [`Stream::step`].
    pub fn in_bulk(&self) -> bool {
        self.phase == phase::BODY || self.phase == phase::CHUNK_DATA
    }

    pub fn bulk_left(&self) -> u64 {
        if self.in_bulk() {
            self.body_left
        } else {
            0
        }
    }

    /// Whether the caller's path buffer holds a path the parser is still writing (so it must
    /// be kept across segments).
    pub fn path_in_progress(&self) -> bool {
        self.phase == phase::LINE && self.line.path_len() > 0
    }

    /// On [`Ev::Decide`]: identify the request line's method (the request line of `OPTIONS *`
    /// and `CONNECT` already did) and remember it.
    pub fn take_method(&mut self) -> Method {
        if self.line.path_len() > 0 || self.method == Method::Other as u8 {
            self.method = self.line.method() as u8;
        }
        Method::from_u8(self.method)
    }

    /// On [`Ev::Override`], with the method the header names: a backend that honours the
    /// header answers `HEAD` without a body and anything else with one, so when the two
    /// disagree on `HEAD` the responses can no longer be framed with certainty.
    pub fn note_override(&mut self, m: Method) {
        if (m == Method::Head) != (self.method == Method::Head as u8) {
            self.unsure = 1;
        }
    }

    /// On [`Ev::Override`]: the method the header names (upper-cased, as frameworks do).
    pub fn override_method(&self) -> Method {
        if self.value_len as usize > 16 {
            Method::Other
        } else {
            Method::from_words(self.value_len as usize, self.value[0], self.value[1])
        }
    }

    /// The caller decided the current request may proceed: `allow` is the rule's method set
    /// (checked again for method overrides).
    pub fn set_verdict(&mut self, allow: u32, rule_flags: u32) {
        self.allow = allow;
        self.rule_flags = rule_flags;
    }

    /// Consume up to `n` body bytes (no more than `bulk_left()`); returns how many.
    #[inline(always)]
    pub fn consume(&mut self, n: u64) -> u64 {
        let n = if n > self.bulk_left() {
            self.bulk_left()
        } else {
            n
        };
        self.body_left -= n;
        self.pos = self.pos.wrapping_add(n as u32);
        if self.body_left == 0 {
            if self.phase == phase::BODY {
                self.next_request();
            } else if self.phase == phase::CHUNK_DATA {
                chunk::data_done(&mut self.phase);
            }
        }
        n
    }

    /// Feed one byte (not a body byte: see [`Stream::in_bulk`]). The request line's path is
    /// written, canonical, to `path`.
    #[inline(always)]
    pub fn step(&mut self, b: u8, path: &mut [u8; PATH_MAX]) -> Ev {
        self.pos = self.pos.wrapping_add(1);
        match self.phase {
            phase::LINE => self.step_line(b, path),
            phase::LINE_REST => {
                self.count += 1;
                if b == b'\n' {
                    self.start_headers();
                    Ev::More
                } else if self.count > LINE_LIMIT {
                    Ev::Fail(Reason::LineTooLong)
                } else {
                    Ev::More
                }
            }
            phase::QUERY_NAME | phase::QUERY_VALUE | phase::QUERY_SKIP => {
                self.count += 1;
                if self.count > LINE_LIMIT {
                    return Ev::Fail(Reason::LineTooLong);
                }
                self.step_query(b)
            }
            phase::HEADER_START
            | phase::HEADER_NAME
            | phase::HEADER_VALUE
            | phase::HEADER_LF
            | phase::HEADERS_END_LF => {
                self.count += 1;
                if self.count > HEADER_LIMIT {
                    return Ev::Fail(Reason::HeadersTooLarge);
                }
                self.step_header(b)
            }
            phase::CHUNK_SIZE
            | phase::CHUNK_EXT
            | phase::CHUNK_SIZE_LF
            | phase::CHUNK_DATA_CR
            | phase::CHUNK_DATA_LF => {
                match chunk::step(&mut self.phase, &mut self.body_left, &mut self.count, b) {
                    Chunk::More => Ev::More,
                    Chunk::Data => Ev::Bulk,
                    Chunk::Last => {
                        // The trailer section follows, ended by an empty line.
                        self.flags |= flag::TRAILER;
                        self.start_headers();
                        Ev::More
                    }
                    Chunk::Bad => Ev::Fail(Reason::BadFraming),
                }
            }
            phase::TUNNEL => Ev::More,
            phase::AWAIT => {
                self.pos = self.pos.wrapping_sub(1);
                Ev::Await
            }
            // BODY / CHUNK_DATA bytes fed one at a time (the caller may do this for short
            // runs), or a corrupted phase: count the byte as body, or refuse.
            phase::BODY | phase::CHUNK_DATA => {
                self.pos = self.pos.wrapping_sub(1);
                self.consume(1);
                if self.in_bulk() {
                    Ev::Bulk
                } else {
                    Ev::More
                }
            }
            _ => Ev::Fail(Reason::NotHttp),
        }
    }

    /// Whether the next byte is in a request line's path (two loads: a cheap test before
    /// the path's word loop).
    #[inline(always)]
    pub fn in_path(&self) -> bool {
        self.phase == phase::LINE && self.line.in_path()
    }

    /// Whether whole words may be taken next: in a path's long run
    /// ([`Stream::in_path_words`]), or in the value of a header the filter does not act on
    /// ([`Stream::in_ignored_value`]). A cheap test, so that the kernel calls its word loops
    /// only there.
    #[inline(always)]
    pub fn words_may_follow(&self) -> bool {
        self.in_path_words() || self.in_ignored_value() || self.in_skipped_query()
    }

    /// In a query parameter that cannot be `_method` (`phase::QUERY_SKIP`): skipped up to its
    /// `&` or `;`, not kept ([`Stream::query_words_room`]).
    #[inline(always)]
    pub fn in_skipped_query(&self) -> bool {
        self.phase == phase::QUERY_SKIP
    }

    /// In a path with eight bytes or more behind: where the path's word loop
    /// ([`Stream::path_words_room`]) pays for its call; a shorter path's first words cost less
    /// through [`Stream::step_run`].
    #[inline(always)]
    pub fn in_path_words(&self) -> bool {
        self.in_path() && self.line.path_len() >= 8
    }

    /// In the value of a header the filter does not act on: checked for control bytes, not
    /// kept ([`Stream::value_words_room`]).
    #[inline(always)]
    pub fn in_ignored_value(&self) -> bool {
        self.phase == phase::HEADER_VALUE && self.header == header::OTHER
    }

    /// How many whole words of a request line's path [`Stream::take_path_words`] may take now
    /// (see [`LineParser::path_words_room`]): 0 outside a path, before the request's first
    /// byte, or where eight more bytes might reach the line's limit.
    #[inline(always)]
    pub fn path_words_room(&self) -> usize {
        if self.phase != phase::LINE || self.count == 0 || self.count > LINE_LIMIT - 8 {
            return 0;
        }
        let by_line = (LINE_LIMIT - 8 - self.count) as usize / 8 + 1;
        let by_path = self.line.path_words_room();
        if by_line < by_path {
            by_line
        } else {
            by_path
        }
    }

    /// The fastest path of [`Stream::step`], for the long run of a path: the caller appended
    /// `k` words to the path (each accepted by [`crate::http::plain_path_word`], at most
    /// [`Stream::path_words_room`] in all); the state is then what `8 * k` `step` calls leave
    /// (each returning [`Ev::More`]).
    #[inline(always)]
    pub fn take_path_words(&mut self, k: usize) {
        self.pos = self.pos.wrapping_add(8 * k as u32);
        self.count += 8 * k as u32;
        self.line.add_path_words(k);
    }

    /// How many whole words of a header value [`Stream::take_value_words`] may take now: 0
    /// unless the stream is in the value of a header the filter does not act on (which is
    /// checked for control bytes, not kept), else as many as keep the header block within
    /// `HEADER_LIMIT`. Each word must pass [`plain_value_word`].
    #[inline(always)]
    pub fn value_words_room(&self) -> usize {
        if !self.in_ignored_value() || self.count > HEADER_LIMIT {
            return 0;
        }
        (HEADER_LIMIT - self.count) as usize / 8
    }

    /// Take `k` whole words of a header value (at most [`Stream::value_words_room`], each
    /// passing [`plain_value_word`]): the state `8 * k` calls of `step` would leave.
    #[inline(always)]
    pub fn take_value_words(&mut self, k: usize) {
        self.pos = self.pos.wrapping_add(8 * k as u32);
        self.count += 8 * k as u32;
    }

    /// How many whole words of a skipped query parameter ([`Stream::in_skipped_query`])
    /// [`Stream::take_value_words`] may take now: 0 elsewhere, else as many as start within
    /// `LINE_LIMIT - 8` of the line ([`Stream::take_query_words`]).
    #[inline(always)]
    pub fn query_words_room(&self) -> usize {
        if !self.in_skipped_query() || self.count > LINE_LIMIT - 8 {
            return 0;
        }
        (LINE_LIMIT - 8 - self.count) as usize / 8 + 1
    }

    /// One word through [`Stream::take_query_words`] if there is room in a skipped query
    /// parameter and [`query_word`] finds nothing to stop at (returns `true`), else nothing
    /// (`false`): the tests' reference for the kernel's loop over many words.
    #[cfg(test)]
    pub fn query_word(&mut self, w: u64) -> bool {
        let (stop, next) = query_word(w);
        if self.query_words_room() == 0 || stop != 0 {
            return false;
        }
        self.take_query_words(1, next != 0);
        true
    }

    /// Take `k` whole words of a skipped query parameter (at most
    /// [`Stream::query_words_room`], [`query_word`] finding nothing to stop at in any; `next`:
    /// one of them went on into a next parameter): the state `8 * k` calls of `step` would
    /// leave.
    #[inline(always)]
    pub fn take_query_words(&mut self, k: usize, next: bool) {
        self.take_value_words(k);
        if next {
            self.enter_next_param();
        }
    }

    /// What a `&` or `;` in a skipped query parameter (`start_query_param`), then a name that
    /// cannot be `_method`, leave besides the counters: still `QUERY_SKIP`, the new name's
    /// match and escape state clear.
    #[inline(always)]
    fn enter_next_param(&mut self) {
        self.qmatch = 0;
        self.qesc = 0;
    }

    /// [`Stream::step_run`] in a skipped query parameter: the leading bytes of `w` up to what
    /// ends the parameter where `step` must see it, through each `&` or `;` into a next
    /// parameter that cannot be `_method` (past `avail`, LF or 0: no name there).
    #[inline(always)]
    fn query_skip_run(&mut self, w: u64) -> usize {
        let (stop, next) = query_word(w);
        let k = swar::leading(stop);
        if next & swar::first(k) != 0 {
            self.enter_next_param();
        }
        k
    }

    /// One word through [`Stream::take_value_words`] if there is room and it passes
    /// [`plain_value_word`] (returns `true`), else nothing (`false`): the tests' reference for
    /// the kernel's loop over many words (`skipped_words` in the kernel).
    #[cfg(test)]
    pub fn value_word(&mut self, w: u64) -> bool {
        if self.value_words_room() == 0 || !plain_value_word(w) {
            return false;
        }
        self.take_value_words(1);
        true
    }

    /// One word through [`Stream::take_path_words`], with the path written byte by byte: the
    /// eight bytes of `w` if there is room and they pass [`crate::http::plain_path_word`]
    /// (returns `true`), else nothing (`false`). The kernel does the same for many words at
    /// once, writing aligned words (`path_words` in the kernel), so this is the tests'
    /// reference.
    #[cfg(test)]
    pub fn path_word(&mut self, w: u64, path: &mut [u8; PATH_MAX]) -> bool {
        if self.path_words_room() == 0
            || !crate::http::plain_path_word(w, self.line.path_last(path))
        {
            return false;
        }
        let n = self.line.path_len();
        path[n..n + 8].copy_from_slice(&w.to_le_bytes());
        self.take_path_words(1);
        true
    }

    /// The fast path of [`Stream::step`]: of the first `avail` bytes of `w` (`avail` may exceed
    /// 8; the first byte in the low bits), takes the leading ones that would each make `step`
    /// return [`Ev::More`] while changing only counters, the phase between lines, the path, the
    /// header name or the header value: path bytes, a query parameter that cannot be `_method`
    /// (one whose name starts with a letter, digit or `-`, up to its `&` or `;`, and through it
    /// into the next such parameter), the rest of a request line through its LF, header names
    /// of letters and `-` (from a line's first byte), header value bytes other than control
    /// bytes, and the CRLF after the value of a header the filter does not act on. Returns how
    /// many it took, 0 to 8. The state is then exactly what that many `step` calls would have
    /// left; the caller steps the next byte with `step`.
    #[inline(always)]
    pub fn step_run(&mut self, w: u64, avail: usize, path: &mut [u8; PATH_MAX]) -> usize {
        let avail = if avail < 8 { avail } else { 8 };
        // Past `avail`, LF: every run below stops there, and none takes it.
        let w = swar::pad(w, avail, b'\n');
        let k = match self.phase {
            // `count != 0`: the request's first byte (which sets `req_start`) is behind.
            phase::LINE if self.count != 0 && self.count <= LINE_LIMIT - 8 => {
                let k = self.line.method_run(w, avail, path);
                if k > 0 {
                    k
                } else {
                    self.line.path_run(w, path)
                }
            }
            phase::LINE if self.count == 0 => {
                // The request's first byte: it sets `req_start`, as `step_line` does.
                let k = self.line.method_run(w, avail, path);
                if k > 0 {
                    self.req_start = self.pos;
                }
                k
            }
            phase::LINE_REST | phase::HEADER_START | phase::HEADER_NAME => {
                return self.phase_run(w, avail)
            }
            phase::QUERY_SKIP if self.count <= LINE_LIMIT - 8 => self.query_skip_run(w),
            phase::QUERY_NAME
                if self.count <= LINE_LIMIT - 8 && self.qmatch == 0 && self.qesc == 0 =>
            {
                // A name that starts with a letter, digit or `-` is not `_method` in any
                // spelling: the rest of the parameter is skipped with it.
                let b = w as u8;
                if !(b.is_ascii_alphanumeric() || b == b'-') {
                    return 0;
                }
                self.phase = phase::QUERY_SKIP;
                1 + self.query_skip_run(w >> 8)
            }
            phase::HEADER_VALUE if self.count <= HEADER_LIMIT - 8 => {
                let k = self.value_run(w);
                if self.header == header::OTHER
                    && k + 2 <= avail
                    && (w >> (8 * k)) as u16 == u16::from_le_bytes(*b"\r\n")
                {
                    // Through the CRLF of a header the filter does not act on.
                    return self.next_field(w, avail, k + 2);
                }
                k
            }
            phase::HEADER_LF
                if self.header == header::OTHER
                    && self.count <= HEADER_LIMIT - 8
                    && avail > 0
                    && w as u8 == b'\n' =>
            {
                // The LF after a CR `step` took (the value ended at a word's last byte).
                return self.next_field(w, avail, 1);
            }
            _ => 0,
        };
        self.pos = self.pos.wrapping_add(k as u32);
        self.count += k as u32;
        k
    }

    /// Where a run that took a whole word is often continued by the next word: the rest of a
    /// request line (after its path: `HTTP/1.1`, then the CRLF), a header name, the start of
    /// a field line (after a CRLF that ended the word).
    #[inline(always)]
    pub fn runs_on(&self) -> bool {
        self.phase == phase::LINE_REST
            || self.phase == phase::HEADER_NAME
            || self.phase == phase::HEADER_START
    }

    /// [`Stream::step_run`] where [`Stream::runs_on`] (0 elsewhere): for the word after one
    /// `step_run` took whole, so that a request line's CRLF and the first field name, the rest
    /// of a long header name, or a name whose line starts a word, are taken in the same call.
    #[inline(always)]
    pub fn run_on(&mut self, w: u64, avail: usize) -> usize {
        let avail = if avail < 8 { avail } else { 8 };
        self.phase_run(swar::pad(w, avail, b'\n'), avail)
    }

    /// The runs of the phases [`Stream::runs_on`] names, for [`Stream::step_run`] and
    /// [`Stream::run_on`] (`w` padded with LF past `avail`; 0 in any other phase, or too close
    /// to the line's or the header block's limit).
    #[inline(always)]
    fn phase_run(&mut self, w: u64, avail: usize) -> usize {
        if self.phase == phase::HEADER_NAME && self.count <= HEADER_LIMIT - 8 {
            let k = self.name_run(w);
            self.pos = self.pos.wrapping_add(k as u32);
            self.count += k as u32;
            return k;
        }
        if self.phase == phase::HEADER_START && self.count <= HEADER_LIMIT - 8 {
            return self.name_start(w, avail);
        }
        if self.phase == phase::LINE_REST && self.count <= LINE_LIMIT - 8 {
            return self.rest_run(w, avail);
        }
        0
    }

    /// Through the last `n` bytes of a field line of a header the filter does not act on (its
    /// CRLF, or the LF after a CR taken before; `end_field` changes nothing else for it), then
    /// the next line's start ([`Stream::name_start`]).
    #[inline(always)]
    fn next_field(&mut self, w: u64, avail: usize, n: usize) -> usize {
        self.pos = self.pos.wrapping_add(n as u32);
        self.count += n as u32;
        self.phase = phase::HEADER_START;
        n + self.name_start(swar::skip(w, n), avail - n)
    }

    /// The rest of a request line (`LINE_REST`, `count` at most `LINE_LIMIT - 8`; `w` padded
    /// with LF past `avail`): its bytes through the LF, then the first field name's start.
    #[inline(always)]
    fn rest_run(&mut self, w: u64, avail: usize) -> usize {
        let lf = swar::leading(swar::eq(w, b'\n'));
        if lf < avail {
            // Through the LF: the header block starts.
            self.pos = self.pos.wrapping_add(lf as u32 + 1);
            self.start_headers();
            return lf + 1 + self.name_start(swar::skip(w, lf + 1), avail - lf - 1);
        }
        self.pos = self.pos.wrapping_add(lf as u32);
        self.count += lf as u32;
        lf
    }

    /// At the start of a field line (`HEADER_START`, `count` at most `HEADER_LIMIT - 8` minus
    /// the bytes of this word already taken): a first byte that is a letter starts the name
    /// (as `step_header` does), and the letters and `-` after it are taken too; the CR of the
    /// empty line that ends the block is taken alone. Returns how many of the first `avail`
    /// bytes of `w` it took (0 when the line starts otherwise: a bare LF, another token
    /// character or a byte that fails go to `step`).
    #[inline(always)]
    fn name_start(&mut self, w: u64, avail: usize) -> usize {
        let b = w as u8;
        if avail == 0 {
            return 0;
        }
        if b == b'\r' {
            // The empty line's CR, as `step_header` takes it: the step on the LF after it then
            // ends the header block in the same stream callback.
            self.phase = phase::HEADERS_END_LF;
            self.pos = self.pos.wrapping_add(1);
            self.count += 1;
            return 1;
        }
        if !b.is_ascii_alphabetic() {
            return 0;
        }
        self.clear_name();
        self.name_len = 0;
        self.push_name(b);
        self.phase = phase::HEADER_NAME;
        self.pos = self.pos.wrapping_add(1);
        self.count += 1;
        // The bytes past `avail` are LF (see `step_run`), which ends a name run.
        let k = self.name_run(w >> 8);
        self.pos = self.pos.wrapping_add(k as u32);
        self.count += k as u32;
        1 + k
    }

    /// The leading letters and `-` of `w` as header-name bytes ([`Stream::push_name`] for
    /// each; other token characters go byte by byte).
    #[inline(always)]
    fn name_run(&mut self, w: u64) -> usize {
        let plain =
            swar::in_range(w, b'a', b'z') | swar::in_range(w, b'A', b'Z') | swar::eq(w, b'-');
        let k = swar::leading(!plain & swar::HIGH);
        let n = self.name_len;
        insert(&mut self.name, n as usize, swar::lower(w) & swar::bytes(k));
        self.name_len = n.saturating_add(k as u8);
        k
    }

    /// The leading bytes of `w` as bytes of a header value other than `Content-Length`'s, up
    /// to a control byte (HTAB aside) or DEL ([`Stream::push_value`] and the whitespace flags
    /// for each, for a header the filter acts on). Whitespace is taken only once the stored
    /// prefix of such a value (16 bytes) is full.
    #[inline(always)]
    fn value_run(&mut self, w: u64) -> usize {
        if self.header == header::CONTENT_LENGTH {
            return 0;
        }
        let ctl = value_ctl(w);
        if self.header == header::OTHER {
            // Checked, not kept (see `step_header`).
            return swar::leading(ctl);
        }
        let blank = swar::eq(w, b' ') | swar::eq(w, b'\t');
        let n = self.value_len;
        if n < 16 {
            let k = swar::leading(ctl | blank);
            if k == 0 {
                return 0;
            }
            if self.flags & flag::PENDING_SPACE != 0 {
                self.flags = (self.flags & !flag::PENDING_SPACE) | flag::VALUE_INNER_SPACE;
            }
            let c = if self.header == header::METHOD_OVERRIDE {
                swar::upper(w)
            } else {
                swar::lower(w)
            };
            insert(&mut self.value, n as usize, c & swar::bytes(k));
            self.value_len = n.saturating_add(k as u8);
            return k;
        }
        let k = swar::leading(ctl);
        if k == 0 {
            return 0;
        }
        // `value_len > 0` throughout: every blank sets PENDING_SPACE, every other byte turns
        // a pending space into an inner one.
        let blank = blank & swar::first(k);
        let solid = !blank & swar::first(k);
        let pending = if self.flags & flag::PENDING_SPACE != 0 {
            0x80
        } else {
            0
        };
        if solid & ((blank << 8) | pending) != 0 {
            self.flags |= flag::VALUE_INNER_SPACE;
        }
        // PENDING_SPACE afterwards: whether the last byte taken is a blank.
        if (blank >> (8 * k - 1)) & 1 != 0 {
            self.flags |= flag::PENDING_SPACE;
        } else {
            self.flags &= !flag::PENDING_SPACE;
        }
        // One bit per solid byte, summed into the top byte.
        let solid_count = ((solid >> 7).wrapping_mul(swar::ONES) >> 56) as u8;
        self.value_len = n.saturating_add(solid_count);
        k
    }

    #[inline(always)]
    fn step_line(&mut self, b: u8, path: &mut [u8; PATH_MAX]) -> Ev {
        if self.count == 0 {
            self.req_start = self.pos.wrapping_sub(1);
        }
        self.count += 1;
        match self.line.step(b, path) {
            Step::More if self.count > LINE_LIMIT => Ev::Fail(Reason::LineTooLong),
            Step::More => Ev::More,
            Step::Decided => {
                // The caller identifies the method ([`Stream::take_method`]): the table
                // lookup has no place in the per-byte step the verifier walks.
                if b == b'\n' {
                    self.start_headers();
                } else if b == b'?' {
                    self.start_query_param();
                } else {
                    self.phase = phase::LINE_REST;
                }
                Ev::Decide
            }
            Step::Fail(Reason::TargetForm) => {
                // `OPTIONS *` and `CONNECT host:port` have no path: they are decided on the
                // method alone (the default policy); any other method with such a target
                // is not a request a backend routes.
                let m = if self.line.is_method(Method::Options) {
                    Method::Options
                } else if self.line.is_method(Method::Connect) {
                    Method::Connect
                } else {
                    Method::Other
                };
                if m != Method::Other {
                    self.method = m as u8;
                    self.line.clear_path();
                    self.phase = phase::LINE_REST;
                    Ev::Decide
                } else {
                    Ev::Fail(Reason::NotHttp)
                }
            }
            Step::Fail(Reason::PathTooLong) => Ev::Fail(Reason::LineTooLong),
            Step::Fail(r) => Ev::Fail(r),
        }
    }

    /// A query parameter starts (after the path's `?`, or a `&` / `;`).
    #[inline(always)]
    fn start_query_param(&mut self) {
        self.phase = phase::QUERY_NAME;
        self.qmatch = 0;
        self.qesc = 0;
    }

    /// One byte of the query string (see "Method overrides" in the module's doc).
    #[inline(always)]
    fn step_query(&mut self, b: u8) -> Ev {
        let end = b == b' ' || b == b'\t' || b == b'\r' || b == b'\n';
        if end || b == b'&' || b == b';' {
            // The parameter ends: a `_method` one names a method (none without `=`).
            let ev = if self.phase == phase::QUERY_VALUE {
                if self.qesc != 0 {
                    // Ends inside an escape: not a method token.
                    self.push_query_value(QUERY_INVALID);
                }
                Ev::Override
            } else if self.phase == phase::QUERY_NAME && self.qmatch >= METHOD_PARAM.len() as u8 {
                self.clear_value();
                self.value_len = 0;
                Ev::Override
            } else {
                Ev::More
            };
            if b == b'\n' {
                self.start_headers();
            } else if end {
                self.phase = phase::LINE_REST;
            } else {
                self.start_query_param();
            }
            return ev;
        }
        if self.phase == phase::QUERY_SKIP {
            return Ev::More;
        }
        if self.phase == phase::QUERY_NAME && b == b'=' && self.qesc == 0 {
            if self.qmatch >= METHOD_PARAM.len() as u8 {
                self.phase = phase::QUERY_VALUE;
                self.clear_value();
                self.value_len = 0;
            } else {
                self.phase = phase::QUERY_SKIP;
            }
            return Ev::More;
        }
        let Some(c) = self.query_byte(b) else {
            return Ev::More;
        };
        if self.phase == phase::QUERY_VALUE {
            self.push_query_value(c);
        } else {
            self.query_name_byte(c);
        }
        Ev::More
    }

    /// The decoded byte a raw query byte stands for (`+` is a space, `%XX` the byte it
    /// encodes, an invalid escape `QUERY_INVALID`), or `None` inside an escape.
    #[inline(always)]
    fn query_byte(&mut self, b: u8) -> Option<u8> {
        if self.qesc == 0 {
            if b == b'%' {
                self.qesc = 1;
                return None;
            }
            return Some(if b == b'+' { b' ' } else { b });
        }
        let Some(d) = hex(b) else {
            self.qesc = 0;
            return Some(QUERY_INVALID);
        };
        if self.qesc == 1 {
            self.qesc = 0x10 | d;
            return None;
        }
        let c = ((self.qesc & 0xf) << 4) | d;
        self.qesc = 0;
        Some(c)
    }

    /// One decoded byte of a query parameter's name, compared with `_method` as PHP reads
    /// names: leading spaces dropped, `.` and space as `_`, the name ended by `[` or NUL.
    #[inline(always)]
    fn query_name_byte(&mut self, c: u8) {
        let n = self.qmatch as usize;
        if n >= QMATCH_ENDED as usize || (n == 0 && c == b' ') {
            return;
        }
        let c = if c == b'.' || c == b' ' {
            b'_'
        } else {
            c.to_ascii_lowercase()
        };
        if n == METHOD_PARAM.len() && (c == b'[' || c == 0) {
            self.qmatch = QMATCH_ENDED;
        } else if n < METHOD_PARAM.len() && c == METHOD_PARAM[n % METHOD_PARAM.len()] {
            self.qmatch += 1;
        } else {
            self.phase = phase::QUERY_SKIP;
        }
    }

    /// One decoded byte of a `_method` value, upper-cased (frameworks upper-case it).
    #[inline(always)]
    fn push_query_value(&mut self, c: u8) {
        let n = self.value_len as usize;
        if n < 16 {
            self.value[(n / 8) % 2] |= (c.to_ascii_uppercase() as u64) << (8 * (n % 8));
        }
        self.value_len = self.value_len.saturating_add(1);
    }

    #[inline(always)]
    fn start_headers(&mut self) {
        self.phase = phase::HEADER_START;
        self.count = 0;
    }

    #[inline(always)]
    fn step_header(&mut self, b: u8) -> Ev {
        match self.phase {
            phase::HEADER_START => {
                if b == b'\r' {
                    self.phase = phase::HEADERS_END_LF;
                    Ev::More
                } else if b == b'\n' {
                    self.end_headers()
                } else if is_tchar(b) {
                    // A new field line. (A leading SP/HTAB would be obsolete line folding.)
                    self.clear_name();
                    self.name_len = 0;
                    self.push_name(b);
                    self.phase = phase::HEADER_NAME;
                    Ev::More
                } else {
                    Ev::Fail(Reason::BadFraming)
                }
            }
            phase::HEADER_NAME => {
                if b == b':' {
                    self.header = self.classify();
                    self.clear_value();
                    self.value_len = 0;
                    self.cl = 0;
                    self.flags &= !(flag::PENDING_SPACE | flag::VALUE_INNER_SPACE);
                    self.phase = phase::HEADER_VALUE;
                    Ev::More
                } else if is_tchar(b) {
                    self.push_name(b);
                    Ev::More
                } else {
                    // Whitespace before the colon, or a byte no field name has.
                    Ev::Fail(Reason::BadFraming)
                }
            }
            phase::HEADER_VALUE => {
                if b == b'\r' {
                    self.phase = phase::HEADER_LF;
                    Ev::More
                } else if b == b'\n' {
                    self.end_field()
                } else if self.header == header::OTHER {
                    // A header the filter does not act on: its value is checked, not kept
                    // (`end_field` reads nothing of it).
                    if (b < 0x20 && b != b'\t') || b == 0x7f {
                        Ev::Fail(Reason::BadFraming)
                    } else {
                        Ev::More
                    }
                } else if b == b' ' || b == b'\t' {
                    if self.value_len > 0 {
                        self.flags |= flag::PENDING_SPACE;
                    }
                    Ev::More
                } else if b < 0x20 || b == 0x7f {
                    Ev::Fail(Reason::BadFraming)
                } else {
                    if self.flags & flag::PENDING_SPACE != 0 {
                        self.flags = (self.flags & !flag::PENDING_SPACE) | flag::VALUE_INNER_SPACE;
                    }
                    self.push_value(b)
                }
            }
            phase::HEADER_LF => {
                if b == b'\n' {
                    self.end_field()
                } else {
                    Ev::Fail(Reason::BadFraming)
                }
            }
            _ => {
                // HEADERS_END_LF
                if b == b'\n' {
                    self.end_headers()
                } else {
                    Ev::Fail(Reason::BadFraming)
                }
            }
        }
    }

    /// `name = [0; NAME_WORDS]` as word stores (see [`crate::put`]).
    #[inline(always)]
    fn clear_name(&mut self) {
        put(&mut self.name[0], 0);
        put(&mut self.name[1], 0);
        put(&mut self.name[2], 0);
    }

    /// `value = [0; 2]` as word stores (see [`crate::put`]).
    #[inline(always)]
    fn clear_value(&mut self) {
        put(&mut self.value[0], 0);
        put(&mut self.value[1], 0);
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
        let mut i = 0;
        while i < HEADERS.len() {
            let (n, w, id) = HEADERS[i];
            if n == self.name_len
                && w[0] == self.name[0]
                && w[1] == self.name[1]
                && w[2] == self.name[2]
            {
                return id;
            }
            i += 1;
        }
        header::OTHER
    }

    #[inline(always)]
    fn push_value(&mut self, b: u8) -> Ev {
        if self.header == header::CONTENT_LENGTH {
            let Some(d) = b.checked_sub(b'0').filter(|d| *d <= 9) else {
                return Ev::Fail(Reason::BadFraming);
            };
            // Checked before the multiply (no 128-bit overflow arithmetic in BPF).
            if self.cl > LENGTH_MAX {
                return Ev::Fail(Reason::BadFraming);
            }
            self.cl = self.cl.wrapping_mul(10).wrapping_add(d as u64);
        }
        let n = self.value_len as usize;
        if n < 16 {
            // Frameworks upper-case override values (`delete` acts as DELETE).
            let c = if self.header == header::METHOD_OVERRIDE {
                b.to_ascii_uppercase()
            } else {
                b.to_ascii_lowercase()
            };
            self.value[(n / 8) % 2] |= (c as u64) << (8 * (n % 8));
        }
        self.value_len = self.value_len.saturating_add(1);
        Ev::More
    }

    /// The end of one field line: act on the fields the filter cares about.
    #[inline(always)]
    fn end_field(&mut self) -> Ev {
        self.phase = phase::HEADER_START;
        if self.flags & flag::TRAILER != 0 {
            return Ev::More;
        }
        let inner_space = self.flags & flag::VALUE_INNER_SPACE != 0;
        match self.header {
            header::CONTENT_LENGTH => {
                if self.value_len == 0 || inner_space {
                    return Ev::Fail(Reason::BadFraming);
                }
                if self.flags & flag::CONTENT_LENGTH != 0 && self.body_left != self.cl {
                    return Ev::Fail(Reason::BadFraming);
                }
                self.flags |= flag::CONTENT_LENGTH;
                self.body_left = self.cl;
                Ev::More
            }
            header::TRANSFER_ENCODING => {
                let (n, w) = CHUNKED;
                let chunked = !inner_space
                    && self.value_len == n
                    && self.value[0] == w[0]
                    && self.value[1] == w[1];
                if !chunked || self.flags & flag::CHUNKED != 0 {
                    return Ev::Fail(Reason::BadFraming);
                }
                self.flags |= flag::CHUNKED;
                Ev::More
            }
            header::METHOD_OVERRIDE => {
                if inner_space {
                    self.value_len = u8::MAX;
                }
                Ev::Override
            }
            header::UPGRADE => {
                self.flags |= flag::UPGRADE;
                Ev::More
            }
            _ => Ev::More,
        }
    }

    /// The empty line after the header block (or the trailer section).
    #[inline(always)]
    fn end_headers(&mut self) -> Ev {
        if self.flags & flag::TRAILER != 0 {
            self.next_request();
            return Ev::More;
        }
        let cl = self.flags & flag::CONTENT_LENGTH != 0;
        let chunked = self.flags & flag::CHUNKED != 0;
        if cl && chunked {
            return Ev::Fail(Reason::BadFraming);
        }
        self.head_done();
        if self.method == Method::Connect as u8 || self.flags & flag::UPGRADE != 0 {
            self.phase = phase::TUNNEL;
            return Ev::Tunnel;
        }
        if chunked {
            self.start_chunk_size();
            return Ev::More;
        }
        if cl && self.body_left > 0 {
            self.phase = phase::BODY;
            return Ev::Bulk;
        }
        self.next_request();
        Ev::More
    }

    #[inline(always)]
    fn start_chunk_size(&mut self) {
        chunk::start(&mut self.phase, &mut self.body_left, &mut self.count);
    }
}

/// A whole word of a skipped query parameter ([`Stream::query_words_room`]), as two masks
/// (bit 7 of each byte): `stop`, the bytes that end the parameter where `step` must see
/// them, and `next`, each `&` or `;` that ends it with the next parameter's name starting
/// right after it, in the word, with a letter, digit or `-` (that one cannot be `_method`
/// and is skipped too). The word can be taken whole ([`Stream::take_query_words`]) when
/// `stop` is 0. Branch-free, for the kernel's loop.
#[inline(always)]
pub fn query_word(w: u64) -> (u64, u64) {
    let seps = swar::eq(w, b'&') | swar::eq(w, b';');
    let name = swar::in_range(w, b'0', b'9')
        | swar::in_range(w, b'a', b'z')
        | swar::in_range(w, b'A', b'Z')
        | swar::eq(w, b'-');
    let next = seps & (name >> 8);
    // What ends a parameter: `&`, `;`, SP, HTAB, CR, LF or any other control byte.
    let ends = swar::lt(w, 0x21) | seps;
    (ends & !next, next)
}

#[cfg(test)]
mod tests;
