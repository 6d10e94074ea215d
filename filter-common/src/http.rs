//! The HTTP/1.x request-line parser the kernel decides on (RFC 9112 §3).
//!
//! It reads `method SP request-target` and stops as soon as the path is known: at the first
//! SP/HTAB, `?`, CR or LF after it. A `#` in the target is refused ([`Reason::BadPath`]): a
//! request-target has no fragment (RFC 9112 §3.2), and backends disagree on it (nginx ends
//! the path there, Go's `ParseRequestURI` keeps it in the path, so `/a#/../admin` is `/a` to
//! one and `/admin` to the other). The raw path it writes then goes through
//! [`crate::canon`], so the decision is on the path a backend routes (`/a/../admin` is
//! `/admin`), or the path is refused. The version is not needed for the decision, so a
//! request line the backend might read leniently (HTTP/0.9 style, extra spaces, leading empty
//! lines) is still decided. Absolute-form targets (`http://host/p`) are reduced to their path.
//!
//! The parser is a byte-at-a-time state machine ([`LineParser::step`]) so that the same code
//! can later follow a request line across segments, and so that the kernel can drive it with
//! `bpf_loop` (one verified callback instead of a 1 KiB unrolled walk). [`parse_request_line`]
//! drives it over one buffer on the host; both end in [`LineParser::finish`].

use crate::method::{is_tchar, Method, METHOD_MAX};
use crate::{put, swar, Reason, LINE_WINDOW, PATH_MAX};

/// Blank lines a request may start with (RFC 9112 §2.2 says a server SHOULD skip at least one)
/// before the parser calls the payload "not HTTP".
const MAX_LEADING_EOL: u16 = 4;

/// Parser phases (a `u8`, not an enum: the state lives in map memory, where any byte
/// pattern must be a valid state).
mod phase {
    pub const METHOD: u8 = 0;
    pub const TARGET_START: u8 = 1;
    pub const SCHEME: u8 = 2;
    pub const SLASH1: u8 = 3;
    pub const SLASH2: u8 = 4;
    pub const AUTHORITY: u8 = 5;
    pub const PATH: u8 = 6;
}

/// Parser state. Small, `Copy`, `repr(C)` and free of pointers so that it can live in a map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LineParser {
    w0: u64,
    w1: u64,
    path_len: u16,
    method_len: u16,
    leading_eol: u16,
    phase: u8,
    /// 1 once the path holds a byte the canonicalizer would change or check, else 0 (see
    /// [`LineParser::plain_mask`]).
    shape: u8,
}
const _: () = assert!(core::mem::size_of::<LineParser>() == 24);

/// Whether the eight bytes of `w` (the first in the low bits) can go on a path whose last
/// byte is `prev` as the path's next bytes, leaving it plain: none of them ends the path or
/// would be checked or changed by the canonicalizer. The test for a path's long run a whole
/// word at a time ([`LineParser::add_path_words`]), so it is cheap rather than exact: it
/// takes only the bytes most paths are made of, the unreserved characters (ALPHA, DIGIT,
/// `-._~`) and `/`, with no `/` or `.` after a `/`. A word with anything else (an end, `%`,
/// a sub-delimiter, `:` or `@`, a byte written as an escape, a control byte) goes through
/// [`LineParser::path_run`] and `step`, which decide exactly.
#[inline(always)]
pub fn plain_path_word(w: u64, prev: u8) -> bool {
    let stop = (!swar::path_plain(w) & swar::HIGH) | dot_or_slash_after_slash(w, prev);
    stop == 0
}

/// Bit 7 of the bytes of `w` (the first in the low bits) that are `/` or `.` right after a
/// `/` (an empty or dot segment starts there); `prev` is the path byte before `w`'s first.
/// As [`swar::eq_from_low`], exact for whether a leading run of bytes holds one.
#[inline(always)]
fn dot_or_slash_after_slash(w: u64, prev: u8) -> u64 {
    // Each byte's predecessor.
    let before = (w << 8) | prev as u64;
    let slash = swar::ONES.wrapping_mul(b'/' as u64);
    // Zero exactly where the byte before is `/` and the byte is `/` or `.` (the two differ
    // in bit 0 only): one zero test for both conditions.
    swar::zero_from_low((before ^ slash) | ((w | swar::ONES) ^ slash))
}

/// [`LineParser::finish`] outcome codes besides a [`Reason`]: still reading, or decided.
pub const OUTCOME_PENDING: u32 = u32::MAX;
pub const OUTCOME_DECIDED: u32 = u32::MAX - 1;

/// What one more byte did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Need more bytes.
    More,
    /// The path is complete: [`LineParser::method`] and [`LineParser::path_len`] are final.
    Decided,
    /// The bytes are not a request line the filter decides on; the reason says why.
    Fail(Reason),
}

/// A request line the filter can decide on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLine {
    pub method: Method,
    /// Bytes of the path written to the path buffer.
    pub path_len: usize,
}

impl Default for LineParser {
    fn default() -> Self {
        Self::new()
    }
}

impl LineParser {
    pub const fn new() -> LineParser {
        LineParser {
            w0: 0,
            w1: 0,
            path_len: 0,
            method_len: 0,
            leading_eol: 0,
            phase: phase::METHOD,
            shape: 0,
        }
    }

    /// Make this a fresh parser in place (what `*self = LineParser::new()` does, without the
    /// byte-loop `memset` BPF would run for it; see [`crate::put`]).
    #[inline(always)]
    pub fn reset(&mut self) {
        put(&mut self.w0, 0);
        put(&mut self.w1, 0);
        put(&mut self.path_len, 0);
        put(&mut self.method_len, 0);
        put(&mut self.leading_eol, 0);
        put(&mut self.phase, phase::METHOD);
        put(&mut self.shape, 0);
    }

    pub fn method(&self) -> Method {
        if self.method_len as usize > METHOD_MAX {
            Method::Other
        } else {
            Method::from_words(self.method_len as usize, self.w0, self.w1)
        }
    }

    /// Whether the method token read so far is exactly `m` (one comparison, no table walk).
    #[inline(always)]
    pub fn is_method(&self, m: Method) -> bool {
        let (n, a, b) = crate::method::packed(m);
        self.method_len as usize == n && self.w0 == a && self.w1 == b
    }

    pub fn path_len(&self) -> usize {
        self.path_len as usize
    }

    /// All ones if the raw path is already in normal form (it holds only `/` and literal
    /// characters, [`swar::literal`], and no `/` followed by `/` or `.`: no escape to decode
    /// or write, parameter to drop, empty or dot segment to resolve, nothing to refuse), else
    /// 0: the canonicalizer pass can be skipped where it is all ones. Conservative:
    /// `/.well-known` is in normal form but not plain. A mask rather than a `bool`, so that
    /// callers can use it without a branch.
    #[inline(always)]
    pub fn plain_mask(&self) -> u64 {
        (self.shape as u64 & 1).wrapping_sub(1)
    }

    /// Note the path bytes of `w` marked in `taken` (bit 7 of each: a leading run of bytes,
    /// possibly none) in `shape`; `prev` is the path byte before `w`'s first (0 if none).
    /// A byte is odd unless it is `/` or a literal character ([`swar::literal`]), or it is
    /// a `/` or `.` after a `/`. Branch-free: it runs inside the kernel's verified loops.
    #[inline(always)]
    fn note_path(&mut self, w: u64, prev: u8, taken: u64) {
        let odd = (!(swar::literal(w) | swar::eq(w, b'/')) & swar::HIGH)
            | dot_or_slash_after_slash(w, prev);
        // How many taken bytes are odd (0 to 8, summed into the top byte), as 0 or 1.
        let count = ((odd & taken) >> 7).wrapping_mul(swar::ONES) >> 56;
        self.shape |= ((count + 7) >> 3) as u8;
    }

    /// Forget the path (a target with no path: `*`, `host:port`).
    pub fn clear_path(&mut self) {
        self.path_len = 0;
    }

    /// One raw path byte into `path`. Canonicalization is a separate pass over the raw path
    /// ([`crate::canon`]): run byte by byte together with this parser, the two make a state
    /// space the kernel verifier cannot walk.
    #[inline(always)]
    fn push_path(&mut self, b: u8, path: &mut [u8; PATH_MAX]) -> Step {
        if self.path_len as usize >= PATH_MAX {
            return Step::Fail(Reason::PathTooLong);
        }
        let n = self.path_len as usize;
        // The byte before, 0 for the first (`some`: 0 if `n` is 0, else all ones).
        let some = ((n as u64).wrapping_sub(1) >> 63).wrapping_sub(1);
        let prev = (path[n.wrapping_sub(1) & (PATH_MAX - 1)] as u64 & some) as u8;
        path[n & (PATH_MAX - 1)] = b;
        self.path_len += 1;
        self.note_path(b as u64, prev, 0x80);
        Step::More
    }

    /// The fast path of [`LineParser::step`] for path bytes: of the eight bytes of `w` (the
    /// first in the low bits), appends the leading ones that end nothing (no SP, HTAB, CR, LF
    /// or `?`; it also stops at `#`, which `step` refuses, and at other control bytes) and
    /// returns how many it took, 0 to 8: the same result as that many [`LineParser::step`] calls (in `path`, up to the path's length: the bytes after it are
    /// scratch). Takes nothing outside a path, or when eight more bytes might not fit in
    /// `path` (the caller steps byte by byte).
    #[inline(always)]
    pub fn path_run(&mut self, w: u64, path: &mut [u8; PATH_MAX]) -> usize {
        let n = self.path_len as usize;
        if self.phase != phase::PATH || n > PATH_MAX - 8 {
            return 0;
        }
        // SP, HTAB, CR and LF are below 0x21; so are control bytes, which end nothing but are
        // rare in a path: the run stops there too and `step` takes them.
        let ends = swar::lt(w, 0x21) | swar::eq(w, b'?') | swar::eq(w, b'#');
        let k = swar::leading(ends);
        // Bit 7 of the bytes before the first end (of all eight if none).
        let taken = (ends & ends.wrapping_neg()).wrapping_sub(1) & swar::HIGH;
        // `n >= 1`: a path starts with the `/` that began this phase.
        self.note_path(w, path[(n - 1) & (PATH_MAX - 1)], taken);
        // All eight bytes are written (no loop of run-time length for the verifier); those
        // past the new `path_len` are scratch, overwritten before the path grows over them.
        let b = w.to_le_bytes();
        let mut j = 0;
        while j < 8 {
            path[n + j] = b[j]; // in bounds: n <= PATH_MAX - 8
            j += 1;
        }
        self.path_len += k as u16;
        k
    }

    /// Whether the parser is in the path (its next byte continues or ends it).
    #[inline(always)]
    pub fn in_path(&self) -> bool {
        self.phase == phase::PATH
    }

    /// How many whole words [`LineParser::add_path_words`] may add now: 0 outside a path;
    /// else as many as fit in the path buffer.
    #[inline(always)]
    pub fn path_words_room(&self) -> usize {
        let n = self.path_len as usize;
        if self.phase != phase::PATH || n > PATH_MAX - 8 {
            0
        } else {
            (PATH_MAX - 8 - n) / 8 + 1
        }
    }

    /// The path's last byte (in a path, which starts with `/`, there is one).
    #[inline(always)]
    pub fn path_last(&self, path: &[u8; PATH_MAX]) -> u8 {
        path[(self.path_len as usize).wrapping_sub(1) & (PATH_MAX - 1)]
    }

    /// The caller appended `k` words (each accepted by [`plain_path_word`], at most
    /// [`LineParser::path_words_room`] in all) to `path` after the path's last byte: the
    /// state is then what `8 * k` [`LineParser::step`] calls leave (`shape` unchanged).
    #[inline(always)]
    pub fn add_path_words(&mut self, k: usize) {
        self.path_len += 8 * k as u16;
    }

    /// The fast path of [`LineParser::step`] at the start of a request line: of the first
    /// `avail` bytes of `w` (`avail <= 8`, the first byte in the low bits), takes the
    /// method's leading upper-case letters (as many as its first word holds), then the SP
    /// after them and the `/` that starts an origin-form path. Returns how many it took, 0 to
    /// 8, with the state that many `step` calls would leave (each returning `More`).
    #[inline(always)]
    pub fn method_run(&mut self, w: u64, avail: usize, path: &mut [u8; PATH_MAX]) -> usize {
        let n = self.method_len as usize;
        if self.phase != phase::METHOD || n >= 8 {
            return 0;
        }
        let upper = swar::in_range(w, b'A', b'Z') & swar::first(avail);
        let k = swar::leading(!upper & swar::HIGH);
        let k = if k < 8 - n { k } else { 8 - n };
        self.w0 |= (w & swar::bytes(k)) << (8 * n);
        self.method_len += k as u16;
        if k == 0 || self.method_len == 0 || k >= avail || swar::skip(w, k) as u8 != b' ' {
            return k;
        }
        self.phase = phase::TARGET_START;
        if k + 1 >= avail || swar::skip(w, k + 1) as u8 != b'/' {
            return k + 1;
        }
        self.phase = phase::PATH;
        // `path_len` is 0 before a path starts: the byte fits.
        match self.push_path(b'/', path) {
            Step::More => k + 2,
            _ => k + 1,
        }
    }

    /// The path is complete.
    #[inline(always)]
    fn end_path(&mut self, _path: &mut [u8; PATH_MAX]) -> Step {
        Step::Decided
    }

    /// Feed one byte; path bytes are written to `path`.
    #[inline(always)]
    pub fn step(&mut self, b: u8, path: &mut [u8; PATH_MAX]) -> Step {
        let blank = b == b' ' || b == b'\t';
        let eol = b == b'\r' || b == b'\n';
        match self.phase {
            phase::METHOD => {
                if is_tchar(b) {
                    let n = self.method_len as usize;
                    if n < 8 {
                        self.w0 |= (b as u64) << (8 * n);
                    } else if n < 16 {
                        self.w1 |= (b as u64) << (8 * (n - 8));
                    }
                    self.method_len = self.method_len.saturating_add(1);
                    Step::More
                } else if blank && self.method_len > 0 {
                    self.phase = phase::TARGET_START;
                    Step::More
                } else if eol && self.method_len == 0 && self.leading_eol < MAX_LEADING_EOL {
                    self.leading_eol += 1;
                    Step::More
                } else {
                    Step::Fail(Reason::NotHttp)
                }
            }
            phase::TARGET_START => {
                if blank {
                    Step::More
                } else if b == b'/' {
                    self.phase = phase::PATH;
                    self.push_path(b, path)
                } else if b.is_ascii_alphabetic() {
                    self.phase = phase::SCHEME;
                    Step::More
                } else if eol {
                    Step::Fail(Reason::NotHttp)
                } else {
                    // `*` (asterisk-form) and anything else that is not a path.
                    Step::Fail(Reason::TargetForm)
                }
            }
            phase::SCHEME => {
                if b == b':' {
                    self.phase = phase::SLASH1;
                    Step::More
                } else if b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.' {
                    Step::More
                } else {
                    Step::Fail(Reason::TargetForm)
                }
            }
            phase::SLASH1 | phase::SLASH2 => {
                if b != b'/' {
                    // Authority-form (`CONNECT host:port`) or a scheme without `//`.
                    return Step::Fail(Reason::TargetForm);
                }
                self.phase = if self.phase == phase::SLASH1 {
                    phase::SLASH2
                } else {
                    phase::AUTHORITY
                };
                Step::More
            }
            phase::AUTHORITY => {
                if b == b'/' {
                    self.phase = phase::PATH;
                    self.push_path(b, path)
                } else if b == b'#' {
                    Step::Fail(Reason::BadPath)
                } else if blank || eol || b == b'?' {
                    // An absolute-form target with an empty path means "/".
                    match self.push_path(b'/', path) {
                        Step::More => self.end_path(path),
                        other => other,
                    }
                } else {
                    Step::More
                }
            }
            _ => {
                // phase::PATH (and, defensively, any other value).
                if blank || eol || b == b'?' {
                    self.end_path(path)
                } else if b == b'#' {
                    Step::Fail(Reason::BadPath)
                } else {
                    self.push_path(b, path)
                }
            }
        }
    }
}

impl LineParser {
    /// The parse's result, given the last step's outcome (`OUTCOME_PENDING` if the bytes ran
    /// out, `OUTCOME_DECIDED`, or a [`Reason`] code) and how many bytes were available.
    #[inline(always)]
    pub fn finish(&self, outcome: u32, len: usize) -> Result<RequestLine, Reason> {
        if outcome == OUTCOME_DECIDED {
            Ok(RequestLine {
                method: self.method(),
                path_len: self.path_len(),
            })
        } else if outcome != OUTCOME_PENDING {
            Err(Reason::from_u32(outcome))
        } else if len >= LINE_WINDOW {
            Err(Reason::PathTooLong)
        } else {
            Err(Reason::LineIncomplete)
        }
    }
}

impl Step {
    /// This step as a [`LineParser::finish`] outcome code.
    #[inline(always)]
    pub fn outcome(self) -> u32 {
        match self {
            Step::More => OUTCOME_PENDING,
            Step::Decided => OUTCOME_DECIDED,
            Step::Fail(r) => r as u32,
        }
    }
}

/// Parse the request line at the start of `buf[..len]`, writing its path to `path`.
///
/// `Err` carries the reason the filter does not decide on these bytes: [`Reason::NotHttp`],
/// [`Reason::TargetForm`], [`Reason::PathTooLong`], or [`Reason::LineIncomplete`] when the
/// bytes end before the path does.
#[inline(always)]
pub fn parse_request_line(
    buf: &[u8; LINE_WINDOW],
    len: usize,
    path: &mut [u8; PATH_MAX],
) -> Result<RequestLine, Reason> {
    let mut p = LineParser::new();
    let mut outcome = OUTCOME_PENDING;
    let mut i = 0;
    while i < LINE_WINDOW && i < len {
        outcome = p.step(buf[i], path).outcome();
        if outcome != OUTCOME_PENDING {
            break;
        }
        i += 1;
    }
    p.finish(outcome, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;
    use std::vec::Vec;

    #[test]
    fn dot_or_slash_after_slash_is_exact_for_leading_runs() {
        // Words built from the bytes that matter (`/`, `.`, their neighbours `-` and `0`,
        // a letter), every predecessor among them: each leading run holds a flagged byte
        // exactly when a `/` (or `prev`) comes right before a `/` or `.` inside it.
        let alphabet = [b'/', b'.', b'-', b'0', b'a'];
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..200_000 {
            let state = next();
            let bytes: [u8; 8] =
                core::array::from_fn(|i| alphabet[((state >> (5 * i)) % 5) as usize]);
            let prev = alphabet[((state >> 50) % 5) as usize];
            let got = dot_or_slash_after_slash(u64::from_le_bytes(bytes), prev);
            for k in 0..=8 {
                let want = (0..k).any(|i| {
                    let before = if i == 0 { prev } else { bytes[i - 1] };
                    before == b'/' && (bytes[i] == b'/' || bytes[i] == b'.')
                });
                assert_eq!(
                    got & swar::first(k) != 0,
                    want,
                    "{bytes:?} after {prev}, {k}"
                );
            }
        }
    }

    fn parse(input: &[u8]) -> Result<(Method, String), Reason> {
        let mut buf = [0u8; LINE_WINDOW];
        let n = input.len().min(LINE_WINDOW);
        buf[..n].copy_from_slice(&input[..n]);
        let mut path = [0u8; PATH_MAX];
        parse_request_line(&buf, input.len(), &mut path).map(|r| {
            (
                r.method,
                String::from_utf8_lossy(&path[..r.path_len]).into_owned(),
            )
        })
    }

    #[test]
    fn request_lines_table() {
        use Method::*;
        let ok: &[(&[u8], Method, &str)] = &[
            (b"GET / HTTP/1.1\r\n", Get, "/"),
            (
                b"DELETE /api/items HTTP/1.1\r\nHost: x\r\n\r\n",
                Delete,
                "/api/items",
            ),
            (
                b"POST /api/items?x=1&y=/admin HTTP/1.1\r\n",
                Post,
                "/api/items",
            ),
            (b"PROPPATCH /dav HTTP/1.1\r\n", Proppatch, "/dav"),
            (b"get /a HTTP/1.1\r\n", Other, "/a"),
            (b"BREW /pot HTTP/1.1\r\n", Other, "/pot"),
            (b"VERYLONGMETHODNAMEXYZ /a HTTP/1.1\r\n", Other, "/a"),
            // HTTP/0.9 style and lenient separators are decided, not passed.
            (b"DELETE /admin\r\n", Delete, "/admin"),
            (b"DELETE /admin\n", Delete, "/admin"),
            (b"DELETE  /admin HTTP/1.1\r\n", Delete, "/admin"),
            (b"DELETE\t/admin\tHTTP/1.1\r\n", Delete, "/admin"),
            (b"\r\n\r\nDELETE /admin HTTP/1.1\r\n", Delete, "/admin"),
            // Absolute form reduces to the path.
            (
                b"DELETE http://example.com/admin?q HTTP/1.1\r\n",
                Delete,
                "/admin",
            ),
            (
                b"DELETE HTTPS://example.com:8443/a/b HTTP/1.1\r\n",
                Delete,
                "/a/b",
            ),
            (b"DELETE http://example.com HTTP/1.1\r\n", Delete, "/"),
            (b"DELETE http://example.com?x HTTP/1.1\r\n", Delete, "/"),
            // The version need not be in the segment: the path is complete.
            (b"DELETE /admin ", Delete, "/admin"),
        ];
        for (input, m, p) in ok {
            assert_eq!(
                parse(input),
                Ok((*m, String::from(*p))),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let bad: &[(&[u8], Reason)] = &[
            (b"", Reason::LineIncomplete),
            (b"GET /adm", Reason::LineIncomplete),
            (b"GE", Reason::LineIncomplete),
            (b"\x16\x03\x01\x02\x00", Reason::NotHttp),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Reason::TargetForm),
            (b"OPTIONS * HTTP/1.1\r\n", Reason::TargetForm),
            (b"PUT /a#frag HTTP/1.0\r\n", Reason::BadPath),
            (b"DELETE /a#/../admin HTTP/1.1\r\n", Reason::BadPath),
            (b"DELETE http://h#x HTTP/1.1\r\n", Reason::BadPath),
            (b"CONNECT example.com:443 HTTP/1.1\r\n", Reason::TargetForm),
            (b"GET\r\n", Reason::NotHttp),
            (b" GET / HTTP/1.1\r\n", Reason::NotHttp),
            (b"\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n", Reason::NotHttp),
        ];
        for (input, r) in bad {
            assert_eq!(parse(input), Err(*r), "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn paths_longer_than_the_bound_are_reported() {
        let mut line = Vec::from(&b"GET /"[..]);
        line.extend(core::iter::repeat_n(b'a', LINE_WINDOW));
        assert_eq!(parse(&line), Err(Reason::PathTooLong));
        // The longest path that fits the window is decided.
        let mut line = Vec::from(&b"GET /"[..]);
        line.extend(core::iter::repeat_n(b'a', LINE_WINDOW - 6));
        line.push(b' ');
        assert_eq!(parse(&line).map(|(_, p)| p.len()), Ok(LINE_WINDOW - 5));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic sweep; the fuzz target covers the rest.
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let mut buf = [0u8; 64];
            for b in buf.iter_mut() {
                *b = b" /?#\r\nGETPOSTHhttp:/%."[(next() % 22) as usize];
            }
            let _ = parse(&buf[..(next() % 65) as usize]);
        }
    }

    /// Parse `GET <target> HTTP/1.1` byte by byte, or through `path_run` wherever eight bytes
    /// are left (as the kernel does); returns the raw path and whether it was called plain.
    fn plain_of(target: &[u8], words: bool) -> Option<(Vec<u8>, bool)> {
        let mut line = Vec::from(&b"GET "[..]);
        line.extend_from_slice(target);
        line.extend_from_slice(b" HTTP/1.1\r\n");
        let mut p = LineParser::new();
        let mut path = [0u8; PATH_MAX];
        let mut i = 0;
        while i < line.len() {
            if words && i + 8 <= line.len() {
                let k = p.path_run(crate::swar::word(&line, i), &mut path);
                if k > 0 {
                    i += k;
                    continue;
                }
            }
            match p.step(line[i], &mut path) {
                Step::More => i += 1,
                Step::Decided => {
                    let mask = p.plain_mask();
                    assert!(mask == 0 || mask == u64::MAX);
                    return Some((path[..p.path_len()].to_vec(), mask != 0));
                }
                Step::Fail(_) => return None,
            }
        }
        None
    }

    #[test]
    fn plain_paths_are_exactly_the_ones_called_plain() {
        let plain: &[&[u8]] = &[
            b"/",
            b"/api/items",
            b"/api/items/",
            b"/a.b/c..d/e.",
            b"/x-y_z~/",
            b"/users/@me:x,y=1!$&'()*+",
            b"http://h.example/a/b",
            b"/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/b",
        ];
        let odd: &[&[u8]] = &[
            b"//",
            b"/a//b",
            b"/./a",
            b"/a/.",
            b"/a/..",
            b"/.well-known",
            b"/a%41",
            b"/a;p=1",
            b"/a\\b",
            b"/a\x7fb",
            b"/a\x01b",
            b"/\x80\xff/",
            b"/a\"b",
            b"/a<b>",
            b"/a[b]^{|}`",
            b"/aaaaaaa/.aaaaaaaaaaaaaaaa",
            b"/aaaaaaa/aaaaaaa//aaaaaaaaa",
            b"/aaaaaaaaaaaaaaaaaaaaaa%2e",
        ];
        for words in [false, true] {
            for t in plain {
                let (_, is_plain) = plain_of(t, words).unwrap();
                assert!(is_plain, "{:?} words={words}", String::from_utf8_lossy(t));
            }
            for t in odd {
                let (_, is_plain) = plain_of(t, words).unwrap();
                assert!(!is_plain, "{:?} words={words}", String::from_utf8_lossy(t));
            }
        }
    }

    /// What `plain_mask` promises: a path called plain canonicalizes to itself, so the
    /// canonicalizer pass may be skipped. Generated paths over the bytes that matter, every
    /// alignment, both drivers.
    #[test]
    fn a_plain_path_is_its_own_canonical_form() {
        let mut next = crate::xorshift(0x853c_49e6_748f_ea9b);
        const ALPHABET: &[u8] = b"/././/ab.%2e;\\\x01\x7f\x80~-_zZ09@:=\"<[^|";
        let mut plain = 0;
        for n in 0..40_000 {
            let len = 1 + (next() % 40) as usize;
            let mut t = Vec::from(&b"/"[..]);
            for _ in 1..len {
                let b = ALPHABET[(next() % ALPHABET.len() as u64) as usize];
                t.push(b);
            }
            let words = n % 2 == 0;
            let Some((raw, is_plain)) = plain_of(&t, words) else {
                continue;
            };
            // The other driver agrees.
            assert_eq!(plain_of(&t, !words).unwrap().1, is_plain);
            if is_plain {
                plain += 1;
                let mut out = [0u8; PATH_MAX];
                let got = crate::canon::readings(&raw, &mut out)
                    .map(|r| (out[..r.len].to_vec(), r.changed, r.params_at));
                assert_eq!(
                    got,
                    Ok((raw.clone(), None, None)),
                    "{:?}",
                    String::from_utf8_lossy(&raw)
                );
            }
        }
        // The sweep must reach plain paths of some length, or it proves little.
        assert!(plain > 2_000, "{plain}");
    }
}
