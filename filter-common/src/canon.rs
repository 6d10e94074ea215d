//! The streaming path canonicalizer: the path the policy lookup sees is the path common
//! backends route, not the raw bytes of the request target; where common backends read a
//! target differently, the path is refused, or the differences are reported so that the
//! caller can judge every reading.
//!
//! [`Canon::push`] takes one raw path byte at a time (the request-line parser stops at `?`,
//! SP, HTAB, CR and LF, refuses `#`, and the first byte is the leading `/`) and appends
//! canonical bytes to a fixed `[u8; PATH_MAX]` buffer; [`Canon::finish`] completes the last
//! segment. [`Canon::push_run`] is an optional fast path that takes up to eight plain bytes at
//! once, with exactly the result of as many `push`es. [`canonicalize`] (and [`readings`])
//! runs the same machine over a whole path for userspace (rule paths) and tests.
//!
//! **Normal form.** The output (when `Ok`) is the path in normal form: it starts with `/`,
//! holds no empty segment (`//`), no `.` or `..` segment, no `;` parameters, no `\`, and
//! spells every character one way: a *literal* character (RFC 3986 `pchar` other than `%`
//! and `;`: ALPHA, DIGIT, `-._~`, `!$&'()*+,=`, `:`, `@`; [`crate::swar::literal`]) as
//! itself, any other byte as its escape `%XX` with uppercase hex. Canonicalizing it again
//! gives the same bytes, and [`Canon::changed`] says whether the raw path already was in
//! normal form (the `paths = "strict"` policy refuses any path that was not).
//!
//! The rules, in the order a byte meets them:
//!
//! 1. **Escapes.** `%XX` (hex digits of either case) of a literal character is decoded:
//!    `/%61dmin` → `/admin`, `/users/%40me` → `/users/@me`, `/a%3Ab` → `/a:b`. Most routers
//!    decode before matching (those that do not read the path *as sent*, below), so a rule
//!    written with the character covers both spellings. Every other valid escape is kept, with uppercase hex: `%3b` → `%3B`,
//!    `%25` → `%25` (one level of decoding, never two), `%c3%a9` → `%C3%A9`. An encoded
//!    `%3B` therefore stays text: it never starts path parameters (Tomcat decodes it only
//!    after removing parameters, so it routes `/a%3Bx` as the segment `a;x`, as nginx does).
//! 2. **Bytes that cannot appear literally** (`"`, `<`, `>`, `[`, `]`, `^`, `` ` ``, `{`,
//!    `|`, `}`, and every byte `>= 0x80`; `\` and control bytes are refused, rule 3) are
//!    written as their escape: `/caf\xc3\xa9` → `/caf%C3%A9`, the spelling a rule path
//!    (visible ASCII) has.
//! 3. **Refused** with [`Reason::BadPath`] (the responder answers 400):
//!    * `%2F`/`%2f` (backends disagree on whether it separates segments), `%5C`, `%00`, a
//!      literal `\` (IIS and some Java backends treat it as `/`), an invalid escape (`%` not
//!      followed by two hex digits, including at the end of the path), any byte below
//!      `0x21` or `0x7f`, and a path that does not start with `/` (the parser never feeds
//!      one). These checks apply to every byte, parameters included: `/a;%2F` is refused;
//!    * a `..` that would climb above the root (`/..`, `/a/../..`), or further back than the
//!      last [`DEPTH`] segments;
//!    * a dot segment with parameters (`..;`, `..;x`, `.;`): Tomcat and Spring strip the
//!      parameters and read `..` (`/a/..;/admin` is `/admin` there), nginx, Go, Express and
//!      axum read an ordinary segment named `..;`;
//!    * a dot segment spelled with an escape (`%2e`, `.%2E`, `%2e%2e`): backends that decode
//!      before resolving dot segments read `..`, the others an ordinary segment;
//!    * a `..` anywhere after an empty segment (`/a//../b`, `//a/..`, `/a/;x/../b`): merging
//!      slashes before resolving (nginx `merge_slashes`) gives `/b`, resolving without
//!      merging (WHATWG URL parsers, Envoy without `merge_slashes`) gives `/a/b`.
//! 4. **Path parameters are removed**: from the first `;` of a segment to the end of that
//!    segment (`/admin;x=1` → `/admin`, `/a;v=1/b` → `/a/b`, `/a/;x/b` → `/a/b`: a segment
//!    that was only parameters becomes empty and merges away). That is how Tomcat and Spring
//!    route; the other backends read the `;` as part of the segment, which the caller judges
//!    through [`Canon::params_at`].
//! 5. **Repeated slashes are merged**: `//admin///x` → `/admin/x`.
//! 6. **Dot segments are removed** (RFC 3986 §5.2.4): `/a/./b` → `/a/b`,
//!    `/a/b/../c` → `/a/c`. A trailing dot segment leaves a trailing slash, as in RFC 3986:
//!    `/a/.` → `/a/`, `/a/b/..` → `/a/`, `/a/..` → `/`. Segments that only look like dot
//!    segments are ordinary: `...`, `.a`, `a.`, `.%3B`, `%2e%2e%2e`.
//! 7. **Length**: [`Reason::PathTooLong`] when the canonical bytes so far (what is in the
//!    buffer at any moment) would exceed `PATH_MAX`. The machine cannot know whether a later
//!    `..` would shorten the path, so it refuses as soon as the buffer is full. Escapes
//!    written for raw bytes (rule 2) make the output up to three times the input.
//!
//! **Other readings.** The canonical path is how a normalizing backend with Tomcat's
//! parameter rule reads the target. Two other readings are common, and the machine reports
//! where they leave it, so that the caller can judge them too (the kernel does in
//! `paths = "normalize"`):
//!
//! * *As sent* (Express and axum match the raw path): it differs from the canonical path from
//!   the first segment the canonicalizer changed in any way, and no rule path can hold that
//!   segment's spelling. [`Canon::changed`]: the raw offset where that segment starts (just
//!   after its `/`), so only a prefix rule that is a prefix of `raw[..changed]`, or the
//!   default, can govern this reading.
//! * *Parameters as text* (nginx, Go, Starlette, Express: `;` is an ordinary character): it
//!   differs from the canonical path from the first segment (still in the output) that had
//!   parameters. [`Canon::params_at`]: the canonical offset where that segment starts, so only
//!   a prefix rule that is a prefix of `out[..params_at]`, or the default, can govern it (rule
//!   paths never hold `;`, nor, where the caller judges this reading, `%3B`).
//!
//! Kernel constraints: this runs inside a `bpf_loop` callback. There is no way to panic
//! (indices are masked with `PATH_MAX - 1`, arithmetic cannot overflow), no slice of run-time
//! length, no iterator, no recursion, no allocation. Every byte is O(1). The state is integers
//! only: any byte pattern is a valid state (a corrupted one can produce a wrong path or an
//! error, never a fault).

use crate::{put, swar, Reason, PATH_MAX};

const MASK: usize = PATH_MAX - 1;
const _: () = assert!(PATH_MAX.is_power_of_two() && PATH_MAX < u16::MAX as usize);

/// [`Canon::changed`] and [`Canon::params_at`] when there is nothing to report.
pub const NONE: u16 = u16::MAX;

/// `Canon::esc` values: outside an escape, after `%`, after `%` and one hex digit (an
/// uppercase letter or a digit, or a lowercase letter).
const ESC_NONE: u8 = 0;
const ESC_PCT: u8 = 1;
const ESC_UPPER: u8 = 2;
const ESC_LOWER: u8 = 3;
/// `Canon::dots` value for a segment that is not (so far) `.` or `..`.
const DOTS_OTHER: u8 = 3;
/// `Canon::seg` bits: the current segment has a `.` that was an escape; an empty segment
/// (repeated `/`, or parameters only) was merged earlier in the path.
const SEG_ENCODED_DOT: u8 = 1 << 0;
const SEG_EMPTY_SEEN: u8 = 1 << 1;
const _: () = assert!(ESC_LOWER == ESC_UPPER + 1 && SEG_EMPTY_SEEN == 2);

/// Canonicalizer state. `repr(C)`, integers only, so that it can live in map memory next to
/// the request-line parser's state.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Canon {
    /// Index in `out` where the current segment starts (just after its `/`).
    seg_start: u16,
    /// Raw bytes taken so far.
    fed: u16,
    /// Raw offset where the current segment starts (just after its `/`).
    raw_seg: u16,
    /// See [`Canon::changed`].
    changed: u16,
    /// See [`Canon::params_at`].
    params_at: u16,
    /// Escape state: `ESC_NONE`, `ESC_PCT`, `ESC_UPPER` / `ESC_LOWER`: one hex digit read (in
    /// `hi`).
    esc: u8,
    /// The first hex digit of the escape being read.
    hi: u8,
    /// What the current segment's kept bytes are: 0 none, 1 `.`, 2 `..`, `DOTS_OTHER` else.
    dots: u8,
    /// Nonzero inside the current segment's `;parameters` (dropped up to the next `/`).
    param: u8,
    /// Ring of the starts of the enclosing segments, for `..` in O(1): `top` is where the
    /// next start goes, `depth` how many of the last `DEPTH` starts are held.
    top: u8,
    depth: u8,
    /// `SEG_*` bits.
    seg: u8,
    _pad: u8,
    starts: [u16; DEPTH],
}
const _: () = assert!(core::mem::size_of::<Canon>() == 18 + 2 * DEPTH);

/// Enclosing segments a `..` can climb back to. A `..` that would climb further than the last
/// `DEPTH` segments is refused as [`Reason::BadPath`] (the scan that would find it is a loop the
/// kernel verifier has to walk at every call site).
pub const DEPTH: usize = 16;

impl Default for Canon {
    fn default() -> Self {
        Self::new()
    }
}

#[inline(always)]
fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0xff,
    }
}

#[inline(always)]
fn hex_digit(n: u8) -> u8 {
    let n = n & 0xf;
    if n < 10 {
        b'0' + n
    } else {
        b'A' + (n - 10)
    }
}

/// A character a path in normal form holds as itself ([`crate::swar::literal`]).
#[inline(always)]
pub fn is_literal(c: u8) -> bool {
    swar::literal(c as u64) & 0x80 != 0
}

/// The lesser of `a` and `b`, without a branch (each branch in the per-byte code is a state
/// more for the kernel verifier to walk).
#[inline(always)]
fn min(a: u16, b: u16) -> u16 {
    // All ones if `b < a`.
    let m = ((b as i32 - a as i32) >> 31) as u16;
    (a & !m) | (b & m)
}

#[inline(always)]
fn emit(c: u8, out: &mut [u8; PATH_MAX], len: &mut u16) -> Result<(), Reason> {
    let n = *len as usize;
    if n >= PATH_MAX {
        return Err(Reason::PathTooLong);
    }
    out[n & MASK] = c; // verifier: masked although `n < PATH_MAX` was just checked
    *len = (n + 1) as u16;
    Ok(())
}

impl Canon {
    pub const fn new() -> Canon {
        Canon {
            seg_start: 0,
            fed: 0,
            raw_seg: 0,
            changed: NONE,
            params_at: NONE,
            esc: ESC_NONE,
            hi: 0,
            dots: 0,
            param: 0,
            top: 0,
            depth: 0,
            seg: 0,
            _pad: 0,
            starts: [0; DEPTH],
        }
    }

    /// Make this a fresh canonicalizer in place (what `*self = Canon::new()` does, without
    /// the byte-loop `memset` BPF would run for it; see [`crate::put`]).
    #[inline(always)]
    pub fn reset(&mut self) {
        put(&mut self.seg_start, 0);
        put(&mut self.fed, 0);
        put(&mut self.raw_seg, 0);
        put(&mut self.changed, NONE);
        put(&mut self.params_at, NONE);
        put(&mut self.esc, ESC_NONE);
        put(&mut self.hi, 0);
        put(&mut self.dots, 0);
        put(&mut self.param, 0);
        put(&mut self.top, 0);
        put(&mut self.depth, 0);
        put(&mut self.seg, 0);
        put(&mut self._pad, 0);
        let mut i = 0;
        while i < DEPTH {
            put(&mut self.starts[i], 0);
            i += 1;
        }
    }

    /// [`NONE`] if the raw path fed so far is in normal form (the canonical bytes are the raw
    /// bytes); else the raw offset where the first segment the canonicalizer changed starts
    /// (just after its `/`): the raw path and the canonical path agree before it.
    #[inline(always)]
    pub fn changed(&self) -> u16 {
        self.changed
    }

    /// [`NONE`] if no segment with `;` parameters is in the output; else the offset in `out`
    /// where the first one starts (just after its `/`). A segment that was parameters only is
    /// counted where it would start. A `..` that removes the segment removes this too.
    #[inline(always)]
    pub fn params_at(&self) -> u16 {
        self.params_at
    }

    /// The canonical path differs from the raw path in the current segment. (`raw_seg` only
    /// grows, so the first change is the least; branch-free, see [`min`].)
    #[inline(always)]
    fn change(&mut self) {
        self.changed = min(self.changed, self.raw_seg);
    }

    /// Feed one raw byte of the path. Canonical bytes are appended to `out` at `*len`, and
    /// `*len` (the canonical length so far, kept by the caller, starting at 0) is updated; a
    /// `.`/`..` segment may later shorten it again.
    #[inline(always)]
    pub fn push(&mut self, b: u8, out: &mut [u8; PATH_MAX], len: &mut u16) -> Result<(), Reason> {
        if *len == 0 && b != b'/' {
            return Err(Reason::BadPath);
        }
        self.fed = self.fed.wrapping_add(1);
        let c = if self.esc == ESC_NONE {
            if b == b'%' {
                self.esc = ESC_PCT;
                return Ok(());
            }
            if b < 0x21 || b == 0x7f || b == b'\\' {
                return Err(Reason::BadPath);
            }
            if b != b'/' && b != b';' && !is_literal(b) {
                // Not allowed literally: written as its escape.
                self.change();
                return self.kept_escape(b, out, len);
            }
            b
        } else {
            let v = hex_value(b);
            if v > 0xf {
                return Err(Reason::BadPath);
            }
            // `a`-`f` are the only valid digits at or above `a`.
            let lower = b >= b'a';
            if self.esc == ESC_PCT {
                self.esc = if lower { ESC_LOWER } else { ESC_UPPER };
                self.hi = v;
                return Ok(());
            }
            let lower = lower || self.esc == ESC_LOWER;
            self.esc = ESC_NONE;
            let c = (self.hi << 4) | v;
            if c == b'/' || c == b'\\' || c == 0 {
                return Err(Reason::BadPath);
            }
            if !is_literal(c) {
                if lower {
                    self.change();
                }
                return self.kept_escape(c, out, len);
            }
            self.change();
            if c == b'.' {
                self.seg |= SEG_ENCODED_DOT;
            }
            c
        };
        // One call site, so the segment logic is inlined once.
        self.char(c, out, len)
    }

    /// The fast path of [`Canon::push`]: of the eight raw bytes of `w` (the first in the low
    /// bits), takes the leading ones that are literal characters ([`crate::swar::literal`]:
    /// not `/`, `%`, `;`, a byte written as an escape or refused), and no `.` that could make
    /// the segment a dot segment: kept, or dropped inside path parameters. Returns how many it
    /// took, 0 to 8, with the state that many `push` calls would leave (in `out`, up to
    /// `*len`: the bytes after it are scratch); the caller pushes the next byte with `push`.
    #[inline(always)]
    pub fn push_run(&mut self, w: u64, out: &mut [u8; PATH_MAX], len: &mut u16) -> usize {
        let n = *len as usize;
        if self.esc != ESC_NONE || n == 0 || n > PATH_MAX - 8 {
            return 0;
        }
        let k = swar::leading(!swar::literal(w) & swar::HIGH);
        if k == 0 || self.param != 0 {
            // Parameter bytes are dropped up to the next `/`.
            self.fed = self.fed.wrapping_add(k as u16);
            return k;
        }
        // A `.` only counts towards `.`/`..` while the segment has nothing else: after the
        // first byte of a segment that is not a dot (or already holds more), it is ordinary.
        if self.dots != DOTS_OTHER && (w & 0xff) as u8 == b'.' {
            return 0;
        }
        // All eight bytes are written (no loop of run-time length for the verifier); those
        // past the new `*len` are scratch, overwritten before the output grows over them.
        let b = w.to_le_bytes();
        let mut j = 0;
        while j < 8 {
            out[n + j] = b[j]; // in bounds: n <= PATH_MAX - 8
            j += 1;
        }
        *len = (n + k) as u16;
        self.fed = self.fed.wrapping_add(k as u16);
        self.dots = DOTS_OTHER;
        k
    }

    /// A byte written as an escape: three bytes, uppercase hex, never a separator, dot or
    /// parameter start.
    #[inline(always)]
    fn kept_escape(
        &mut self,
        c: u8,
        out: &mut [u8; PATH_MAX],
        len: &mut u16,
    ) -> Result<(), Reason> {
        if self.param != 0 {
            return Ok(());
        }
        let n = *len as usize;
        if n + 3 > PATH_MAX {
            return Err(Reason::PathTooLong);
        }
        out[n & MASK] = b'%';
        out[(n + 1) & MASK] = hex_digit(c >> 4);
        out[(n + 2) & MASK] = hex_digit(c);
        *len = (n + 3) as u16;
        self.dots = DOTS_OTHER;
        Ok(())
    }

    /// End of the path: complete the last segment (a trailing `.` or `..` is resolved). `*len`
    /// is then final. A path that ends inside an escape, or is empty, is refused.
    #[inline(always)]
    pub fn finish(&mut self, out: &mut [u8; PATH_MAX], len: &mut u16) -> Result<(), Reason> {
        if self.esc != ESC_NONE {
            return Err(Reason::BadPath);
        }
        self.end_segment(false, out, len)?;
        if *len == 0 {
            return Err(Reason::BadPath);
        }
        Ok(())
    }

    /// One decoded character: `/`, `;`, or a byte kept in the segment.
    #[inline(always)]
    fn char(&mut self, c: u8, out: &mut [u8; PATH_MAX], len: &mut u16) -> Result<(), Reason> {
        if c == b'/' {
            return self.end_segment(true, out, len);
        }
        if self.param != 0 {
            return Ok(());
        }
        if c == b';' {
            self.param = 1;
            self.change();
            // The first segment with parameters still in the output starts before this one
            // (or there is none, `NONE`): the least start is the first.
            self.params_at = min(self.params_at, self.seg_start);
            return Ok(());
        }
        self.dots = if c == b'.' && self.dots < 2 {
            self.dots + 1
        } else {
            DOTS_OTHER
        };
        emit(c, out, len)
    }

    /// The current segment ends (at a `/` if `slash`, else at the end of the path); the next
    /// one starts at the raw bytes taken so far.
    #[inline(always)]
    fn end_segment(
        &mut self,
        slash: bool,
        out: &mut [u8; PATH_MAX],
        len: &mut u16,
    ) -> Result<(), Reason> {
        let r = self.close_segment(slash, out, len);
        self.raw_seg = self.fed;
        r
    }

    #[inline(always)]
    fn close_segment(
        &mut self,
        slash: bool,
        out: &mut [u8; PATH_MAX],
        len: &mut u16,
    ) -> Result<(), Reason> {
        let dots = self.dots;
        let param = self.param;
        let seg = self.seg;
        self.dots = 0;
        self.param = 0;
        self.seg = seg & SEG_EMPTY_SEEN;
        if dots == 1 || dots == 2 {
            // Backends disagree on these (see the module's rule 3): with parameters, spelled
            // with an escape, `..` after an empty segment. One test for the three.
            let after_empty = dots == 2 && seg & SEG_EMPTY_SEEN != 0;
            if param != 0 || seg & SEG_ENCODED_DOT != 0 || after_empty {
                return Err(Reason::BadPath);
            }
            self.change();
            if dots == 1 {
                // `.`: drop it; `out` already ends with the `/` before it.
                *len = self.seg_start;
                return Ok(());
            }
            return self.pop(out, len);
        }
        if !slash {
            // The last segment needs nothing.
            return Ok(());
        }
        if dots == 0 && *len != 0 {
            // An empty segment (repeated `/`, or parameters only) merges away.
            self.change();
            self.seg |= SEG_EMPTY_SEEN;
            return Ok(());
        }
        emit(b'/', out, len)?;
        // Remember where the segment just closed started, for a later `..`.
        self.starts[self.top as usize % DEPTH] = self.seg_start;
        self.top = self.top.wrapping_add(1);
        if (self.depth as usize) < DEPTH {
            self.depth += 1;
        }
        self.seg_start = *len;
        Ok(())
    }

    /// `..`: drop the current segment and the one before it.
    #[inline(always)]
    fn pop(&mut self, _out: &mut [u8; PATH_MAX], len: &mut u16) -> Result<(), Reason> {
        // `out[..seg_start]` is `/` or `/s1/.../sn/`: climbing above the root is refused, and
        // so is climbing past the segments the ring still remembers.
        if self.seg_start < 2 || self.depth == 0 {
            return Err(Reason::BadPath);
        }
        self.top = self.top.wrapping_sub(1);
        self.depth -= 1;
        let start = self.starts[self.top as usize % DEPTH];
        *len = start;
        self.seg_start = start;
        // A segment with parameters at or after `start` is gone with the ones `..` removed
        // (`NONE` is above every start; branch-free: all ones where `params_at >= start`).
        let gone = ((start as i32 - self.params_at as i32 - 1) >> 31) as u16;
        self.params_at |= gone;
        Ok(())
    }
}

/// A raw path's canonical form and where the other readings leave it ([`Canon::changed`],
/// [`Canon::params_at`]; `None` for [`NONE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readings {
    /// Bytes of canonical path written to the output.
    pub len: usize,
    pub changed: Option<usize>,
    pub params_at: Option<usize>,
}

/// Canonicalize a whole path into `out` and report the readings (userspace and tests; the
/// same machine the kernel runs). `path` is a path only: `?` and `#` in it are ordinary bytes
/// (written as escapes).
pub fn readings(path: &[u8], out: &mut [u8; PATH_MAX]) -> Result<Readings, Reason> {
    let mut canon = Canon::new();
    let mut len = 0u16;
    for &b in path {
        canon.push(b, out, &mut len)?;
    }
    canon.finish(out, &mut len)?;
    let some = |v: u16| (v != NONE).then_some(v as usize);
    Ok(Readings {
        len: len as usize,
        changed: some(canon.changed),
        params_at: some(canon.params_at),
    })
}

/// Canonicalize a whole path into `out` and return its length ([`readings`] without them).
pub fn canonicalize(path: &[u8], out: &mut [u8; PATH_MAX]) -> Result<usize, Reason> {
    readings(path, out).map(|r| r.len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;
    use std::string::String;
    use std::vec;
    use std::vec::Vec;

    fn canon(path: &[u8]) -> Result<Vec<u8>, Reason> {
        let mut out = [0u8; PATH_MAX];
        canonicalize(path, &mut out).map(|n| out[..n].to_vec())
    }

    fn show(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// What the reference says about a path: the canonical bytes, and the readings.
    #[derive(Debug, PartialEq, Eq)]
    struct Ref {
        out: Vec<u8>,
        changed: Option<usize>,
        params_at: Option<usize>,
    }

    /// The rules of the module doc, written the obvious way: validate the whole path, split
    /// it into raw segments, decode each (escapes of literal characters decoded, other bytes
    /// written as escapes), strip parameters, then resolve `.`/`..` with a stack.
    fn reference(path: &[u8]) -> Result<Ref, Reason> {
        if path.first() != Some(&b'/') {
            return Err(Reason::BadPath);
        }
        let lit = |c: u8| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&c);
        // Validate every byte and escape first: the errors win over anything else.
        let mut i = 0;
        while i < path.len() {
            let b = path[i];
            if b == b'%' {
                let hex = path.get(i + 1..i + 3).ok_or(Reason::BadPath)?;
                if !hex.iter().all(|h| h.is_ascii_hexdigit()) {
                    return Err(Reason::BadPath);
                }
                let c = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
                if c == b'/' || c == b'\\' || c == 0 {
                    return Err(Reason::BadPath);
                }
                i += 3;
            } else if b < 0x21 || b == 0x7f || b == b'\\' {
                return Err(Reason::BadPath);
            } else {
                i += 1;
            }
        }
        // One raw segment: (raw start, decoded bytes, had parameters, has an encoded dot).
        struct Seg {
            raw_start: usize,
            name: Vec<u8>,
            params: bool,
            encoded_dot: bool,
            /// The raw segment is not what the canonical path holds for it.
            changed: bool,
        }
        let mut segs = Vec::new();
        let mut start = 1;
        for raw in path[1..].split(|&b| b == b'/') {
            let (mut name, mut params, mut encoded_dot, mut changed) =
                (Vec::new(), false, false, false);
            let mut j = 0;
            while j < raw.len() {
                let (c, escaped, lower) = if raw[j] == b'%' {
                    let hex = &raw[j + 1..j + 3];
                    let c = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
                    j += 3;
                    (c, true, hex.iter().any(|h| h.is_ascii_lowercase()))
                } else {
                    j += 1;
                    (raw[j - 1], false, false)
                };
                if params {
                    continue;
                }
                if !escaped && c == b';' {
                    params = true;
                    changed = true;
                } else if lit(c) {
                    name.push(c);
                    changed |= escaped;
                    encoded_dot |= escaped && c == b'.';
                } else {
                    name.extend(format!("%{c:02X}").bytes());
                    changed |= !escaped || lower;
                }
            }
            segs.push(Seg {
                raw_start: start,
                name,
                params,
                encoded_dot,
                changed,
            });
            start += raw.len() + 1;
        }
        // Resolve: the stack holds (name, had parameters), empty names for parameter-only
        // segments (they take no room in the output).
        let mut stack: Vec<(&[u8], bool)> = Vec::new();
        let mut changed: Option<usize> = None;
        let mut empty_seen = false;
        let last = segs.len() - 1;
        for (k, s) in segs.iter().enumerate() {
            let dot = s.name == b"." || s.name == b"..";
            if dot && (s.params || s.encoded_dot || (s.name == b".." && empty_seen)) {
                return Err(Reason::BadPath);
            }
            let empty = s.name.is_empty() && k != last;
            if s.changed || dot || empty {
                changed.get_or_insert(s.raw_start);
            }
            if empty {
                empty_seen = true;
            }
            if s.name == b".." {
                // Pop the parameter-only markers too: the real segment before them goes.
                while stack.last().is_some_and(|(n, _)| n.is_empty()) {
                    stack.pop();
                }
                stack.pop().ok_or(Reason::BadPath)?;
            } else if s.name != b"." && (!s.name.is_empty() || s.params) {
                stack.push((&s.name, s.params));
            }
        }
        let mut out = vec![b'/'];
        let mut params_at = None;
        let kept: Vec<&[u8]> = stack
            .iter()
            .filter(|(n, _)| !n.is_empty())
            .map(|(n, _)| *n)
            .collect();
        for (n, p) in &stack {
            if *p && params_at.is_none() {
                params_at = Some(out.len());
            }
            if !n.is_empty() {
                out.extend(*n);
                out.push(b'/');
            }
        }
        // A trailing `/` only where the path ended with an empty or dot segment.
        let last = &segs[last];
        let trailing = last.name.is_empty() || last.name == b"." || last.name == b"..";
        if !kept.is_empty() && !trailing {
            out.pop();
        }
        if out.len() > PATH_MAX {
            return Err(Reason::PathTooLong);
        }
        Ok(Ref {
            out,
            changed,
            params_at,
        })
    }

    #[test]
    fn canonical_paths_table() {
        let ok: &[(&str, &str)] = &[
            // Nothing to do.
            ("/", "/"),
            ("/admin", "/admin"),
            ("/api/items/42", "/api/items/42"),
            ("/a/", "/a/"),
            // Repeated slashes.
            ("//admin", "/admin"),
            ("//admin///x", "/admin/x"),
            ("/a//", "/a/"),
            ("///", "/"),
            // Dot segments.
            ("/a/./b", "/a/b"),
            ("/./admin", "/admin"),
            ("/.", "/"),
            ("/./", "/"),
            ("/a/b/../c", "/a/c"),
            ("/a/../admin", "/admin"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/./", "/a/"),
            ("/a/b/../../c/", "/c/"),
            ("/a/..//b", "/b"),
            ("/a//./b", "/a/b"),
            // Segments that only look like dot segments.
            ("/...", "/..."),
            ("/a/.../b", "/a/.../b"),
            ("/.a", "/.a"),
            ("/a.", "/a."),
            ("/..a/b", "/..a/b"),
            ("/.%3B", "/.%3B"),
            ("/%2e%2e%2e", "/..."),
            ("/%2ewell-known", "/.well-known"),
            // Escapes of literal characters are decoded, either case.
            ("/%61dmin", "/admin"),
            ("/%41DMIN", "/ADMIN"),
            ("/%7e%7E%2D%5f%30", "/~~-_0"),
            ("/users/%40me", "/users/@me"),
            ("/a%3Ab%3ac", "/a:b:c"),
            ("/%21%24%26%27%28%29%2A%2B%2C%3D", "/!$&'()*+,="),
            // Other escapes stay, uppercased.
            ("/a%3bb", "/a%3Bb"),
            ("/a%3Bb", "/a%3Bb"),
            ("/a%20b", "/a%20b"),
            ("/%25", "/%25"),
            ("/%2561", "/%2561"),
            ("/%ff%c3%a9", "/%FF%C3%A9"),
            (
                "/%3F%23%22%3c%3E%5B%5D%5E%60%7B%7C%7D",
                "/%3F%23%22%3C%3E%5B%5D%5E%60%7B%7C%7D",
            ),
            // Bytes that cannot appear literally are written as their escapes.
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a\"b<c>", "/a%22b%3Cc%3E"),
            ("/[x]^`{|}", "/%5Bx%5D%5E%60%7B%7C%7D"),
            ("/a?b#c", "/a%3Fb%23c"),
            // Literal characters stay.
            ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
            // Path parameters.
            ("/admin;x=1", "/admin"),
            ("/a;v=1/b", "/a/b"),
            ("/a/;x/b", "/a/b"),
            ("/;x", "/"),
            ("/a;x/", "/a/"),
            ("/a;x;y=2/b", "/a/b"),
            ("/a;%2e%2e/b", "/a/b"),
            ("/a;x/../b", "/b"),
            ("/admin%3Bx=1", "/admin%3Bx=1"),
        ];
        for (input, want) in ok {
            assert_eq!(
                canon(input.as_bytes()).map(|v| show(&v)),
                Ok(String::from(*want)),
                "{input}"
            );
        }
        let bad: &[&[u8]] = &[
            b"/a%2Fb",
            b"/a%2fb",
            b"/..%2F",
            b"/a%5Cb",
            b"/a%5cb",
            b"/a%00",
            b"/a\\b",
            b"/a\\..\\admin",
            b"/a%",
            b"/a%4",
            b"/a%g1",
            b"/a%1g",
            b"/a%%41",
            b"/a% 1",
            b"/a b",
            b"/a\tb",
            b"/a\x00",
            b"/a\x1f",
            b"/a\x7f",
            b"/..",
            b"/../admin",
            b"/a/../..",
            b"/a/../../admin",
            b"/a;x=%2F",
            b"/a;x=%zz",
            b"",
            b"admin",
            b"%2Fadmin",
            // Read differently by different backends.
            b"/a/..;x/admin",
            b"/a/..;/admin",
            b"/a/.;x/b",
            b"/a/b/..;x",
            b"/..;x/admin",
            b"/%2e",
            b"/a/%2e",
            b"/a/%2e%2e/admin",
            b"/a/%2E%2e/admin",
            b"/a/.%2e/admin",
            b"/%2e%2e/admin",
            b"/a//..",
            b"/a//../b",
            b"//a/..",
            b"//../a",
            b"/a//b/./../c",
            b"/a/;x/../b",
        ];
        for input in bad {
            assert_eq!(canon(input), Err(Reason::BadPath), "{}", show(input));
        }
    }

    /// Where the other readings leave the canonical path.
    #[test]
    fn readings_table() {
        let cases: &[(&str, &str, Option<usize>, Option<usize>)] = &[
            ("/admin", "/admin", None, None),
            ("/.well-known/x", "/.well-known/x", None, None),
            ("/a/b%3Bc", "/a/b%3Bc", None, None),
            ("/a/%3bc", "/a/%3Bc", Some(3), None),
            ("/users/%40me", "/users/@me", Some(7), None),
            ("/public/../admin", "/admin", Some(8), None),
            ("/x/y/./z", "/x/y/z", Some(5), None),
            ("/a//b", "/a/b", Some(3), None),
            ("//a", "/a", Some(1), None),
            ("/a/b;x", "/a/b", Some(3), Some(3)),
            ("/a/b;x/c", "/a/b/c", Some(3), Some(3)),
            ("/a/;x/c", "/a/c", Some(3), Some(3)),
            ("/a;x/../b", "/b", Some(1), None),
            ("/x/../a/b;x", "/a/b", Some(3), Some(3)),
            ("/%61/b;x", "/a/b", Some(1), Some(3)),
            ("/caf\u{e9}/x", "/caf%C3%A9/x", Some(1), None),
        ];
        for (input, out, changed, params_at) in cases {
            let mut buf = [0u8; PATH_MAX];
            let r = readings(input.as_bytes(), &mut buf).unwrap();
            assert_eq!(show(&buf[..r.len]), *out, "{input}");
            assert_eq!((r.changed, r.params_at), (*changed, *params_at), "{input}");
        }
    }

    #[test]
    fn length_bound() {
        let mut p = vec![b'/'];
        p.extend(core::iter::repeat_n(b'a', PATH_MAX - 1));
        assert_eq!(canon(&p).map(|v| v.len()), Ok(PATH_MAX));
        p.push(b'a');
        assert_eq!(canon(&p), Err(Reason::PathTooLong));
        // A longer raw path whose canonical form fits is fine.
        let mut p = Vec::new();
        for _ in 0..PATH_MAX / 2 {
            p.extend(b"/%61");
        }
        assert_eq!(canon(&p).map(|v| v.len()), Ok(PATH_MAX));
        let mut p = vec![b'/'];
        p.extend(core::iter::repeat_n(b'/', 3 * PATH_MAX));
        assert_eq!(canon(&p), Ok(vec![b'/']));
        // A kept escape that does not fit as a whole.
        let mut p = vec![b'/'];
        p.extend(core::iter::repeat_n(b'a', PATH_MAX - 3));
        p.extend(b"%20");
        assert_eq!(canon(&p), Err(Reason::PathTooLong));
        // The buffer never holds a `..` that would shorten a too-long path.
        let mut p = vec![b'/'];
        p.extend(core::iter::repeat_n(b'a', PATH_MAX));
        p.extend(b"/..");
        assert_eq!(canon(&p), Err(Reason::PathTooLong));
    }

    #[test]
    fn streaming_matches_whole_path_and_len_tracks_the_buffer() {
        // Byte by byte, `len` never exceeds the bytes fed (no raw byte here is written as an
        // escape), and the result is `canonicalize`'s.
        let path = b"/a/./b;x/../c%3b/%7e/x/../d%40/";
        let mut out = [0xaau8; PATH_MAX];
        let mut len = 0u16;
        let mut c = Canon::new();
        for (i, &b) in path.iter().enumerate() {
            c.push(b, &mut out, &mut len).unwrap();
            assert!(len as usize <= i + 1);
        }
        c.finish(&mut out, &mut len).unwrap();
        assert_eq!(show(&out[..len as usize]), "/a/c%3B/~/d@/");
        assert_eq!(canon(path), Ok(b"/a/c%3B/~/d@/".to_vec()));
    }

    #[test]
    fn any_state_bytes_are_safe() {
        // Map memory may hold any pattern: no state may fault, whatever it is fed.
        let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let r = next();
            let mut c = Canon::new();
            c.seg_start = r as u16;
            c.esc = (r >> 16) as u8;
            c.hi = (r >> 24) as u8;
            c.dots = (r >> 32) as u8;
            c.param = (r >> 40) as u8;
            let r2 = next();
            c.fed = r2 as u16;
            c.raw_seg = (r2 >> 16) as u16;
            c.changed = (r2 >> 32) as u16;
            c.params_at = (r2 >> 48) as u16;
            let r3 = next();
            c.top = r3 as u8;
            c.depth = (r3 >> 8) as u8;
            c.seg = (r3 >> 16) as u8;
            let mut out = [b'x'; PATH_MAX];
            let mut len = (r >> 48) as u16;
            for _ in 0..16 {
                let b = b"/.%2e;a\\\x80"[(next() % 9) as usize];
                if c.push(b, &mut out, &mut len).is_err() {
                    break;
                }
            }
            let _ = c.finish(&mut out, &mut len);
        }
    }

    /// Random paths over an alphabet rich in the characters that matter, half built from
    /// single characters, half from meaningful tokens.
    fn random_path(next: &mut impl FnMut() -> u64) -> Vec<u8> {
        const CHARS: &[u8] = b"/////..%%2eEfF5cC;;a0\\3bB~@4\"";
        const TOKENS: &[&[u8]] = &[
            b"/", b"/", b"/", b".", b"..", b"...", b"%2e", b"%2E", b"%2f", b"%5c", b"%61", b"%41",
            b"%3b", b"%3B", b"%25", b"%7e", b"%00", b"%", b"%2", b"%zz", b";", b";x=1", b"a", b"b",
            b"0", b"\\", b"\x80", b"\xff", b" ", b"?", b"%40", b"@", b":", b"%3a", b"\"", b"%22",
            b"..;", b"%c3", b"//", b"/a/", b"/b/",
        ];
        let mut p = Vec::new();
        if !next().is_multiple_of(16) {
            p.push(b'/');
        }
        let n = next() % 24;
        let by_token = next().is_multiple_of(2);
        for _ in 0..n {
            let r = next() as usize;
            if by_token {
                p.extend(TOKENS[r % TOKENS.len()]);
            } else {
                p.push(CHARS[r % CHARS.len()]);
            }
        }
        p
    }

    /// At every offset of `path` (pushed byte by byte), [`Canon::push_run`] takes k bytes
    /// and leaves exactly the state, output and length of k [`Canon::push`] calls, each `Ok`
    /// (nothing changes when k is 0). Returns how many bytes it took in all.
    fn word_fast_path_is_exact(path: &[u8]) -> usize {
        let mut c = Canon::new();
        let mut out = [0x5au8; PATH_MAX];
        let mut len = 0u16;
        let mut taken = 0;
        for i in 0..path.len() {
            {
                // Near the end, the word is padded with LF as the kernel pads it: the run must
                // not take the padding.
                let w = crate::swar::word_padded(path, i, b'\n');
                let (mut fc, mut fout, mut flen) = (c, out, len);
                let k = fc.push_run(w, &mut fout, &mut flen);
                assert!(k <= (path.len() - i).min(8));
                let (mut sc, mut sout, mut slen) = (c, out, len);
                for &b in &path[i..i + k] {
                    assert_eq!(sc.push(b, &mut sout, &mut slen), Ok(()), "{:?}", show(path));
                }
                assert_eq!(
                    format!("{fc:?} {flen}"),
                    format!("{sc:?} {slen}"),
                    "{:?} at {i}",
                    show(path)
                );
                // The output up to its length; the bytes after it are scratch.
                assert!(
                    fout[..flen as usize] == sout[..slen as usize],
                    "{:?}",
                    show(path)
                );
                taken += k;
            }
            if c.push(path[i], &mut out, &mut len).is_err() {
                break;
            }
        }
        taken
    }

    #[test]
    fn word_fast_path_matches_byte_pushes() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
        let mut taken = 0;
        for _ in 0..50_000 {
            let mut p = random_path(&mut next);
            // Plain runs, so that words are taken as well as declined.
            let k = (next() % 24) as usize;
            let at = (next() as usize) % (p.len() + 1);
            let run: Vec<u8> = (0..k).map(|j| b"abcXYZ09.-_~"[(j * 7 + at) % 12]).collect();
            p.splice(at..at, run);
            taken += word_fast_path_is_exact(&p);
        }
        assert!(taken > 50_000, "{taken}");
        let mut long = vec![b'/'];
        long.extend(core::iter::repeat_n(b'a', PATH_MAX + 16));
        assert!(word_fast_path_is_exact(&long) > 100);
    }

    /// The same, as a bolero target over the interesting alphabet.
    #[test]
    fn fuzz_word_fast_path_matches_byte_pushes() {
        bolero::check!()
            .with_type::<Vec<u8>>()
            .with_max_len(256)
            .for_each(|p| {
                let mut q = vec![b'/'];
                q.extend(
                    p.iter()
                        .map(|&b| b"/.%2eEfF5cC;a0\\3bB~\x80 xyz"[b as usize % 24]),
                );
                word_fast_path_is_exact(&q);
            });
    }

    /// The machine's answer in the reference's terms.
    fn machine(path: &[u8]) -> Result<Ref, Reason> {
        let mut out = [0u8; PATH_MAX];
        readings(path, &mut out).map(|r| Ref {
            out: out[..r.len].to_vec(),
            changed: r.changed,
            params_at: r.params_at,
        })
    }

    /// The machine agrees with the reference, its output is a fixed point, and it calls a path
    /// unchanged exactly when the output is the input.
    fn agrees(p: &[u8]) -> bool {
        let got = machine(p);
        assert_eq!(got, reference(p), "{:?}", show(p));
        let Ok(r) = &got else {
            return false;
        };
        let again = machine(&r.out);
        assert_eq!(
            again.as_ref().map(|a| (&a.out, a.changed)),
            Ok((&r.out, None)),
            "not idempotent: {:?}",
            show(p)
        );
        assert_eq!(r.changed.is_none(), r.out == p, "{:?}", show(p));
        true
    }

    #[test]
    fn matches_the_reference_and_is_idempotent() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
        let (mut ok, mut total, mut changed, mut params) = (0, 0, 0, 0);
        for _ in 0..100_000 {
            let p = random_path(&mut next);
            if agrees(&p) {
                ok += 1;
                let r = machine(&p).unwrap();
                changed += r.changed.is_some() as usize;
                params += r.params_at.is_some() as usize;
            }
            total += 1;
        }
        // Both outcomes must be well represented, or the comparison proves little.
        assert!(ok * 5 > total && ok * 5 < total * 4, "{ok} of {total} ok");
        assert!(
            changed * 4 > ok && changed * 10 < ok * 9,
            "{changed} of {ok} changed"
        );
        assert!(params * 20 > ok, "{params} of {ok} with parameters");
    }

    /// The same comparison as a bolero target (about a second under `cargo test`; see
    /// `tests/fuzz.rs` for running it under libFuzzer, as
    /// `canon::tests::fuzz_matches_the_reference`). Inputs stay well below `PATH_MAX` even when
    /// every byte is written as an escape: the streaming machine refuses a too-long buffer
    /// before a later `..` could shorten it, or a later byte be refused, which the reference
    /// does not model.
    #[test]
    fn fuzz_matches_the_reference() {
        bolero::check!()
            .with_type::<Vec<u8>>()
            .with_max_len(300)
            .for_each(|p| {
                // Mostly valid paths: map each byte into the interesting alphabet.
                let p: Vec<u8> = p
                    .iter()
                    .map(|&b| b"/.%2eEfF5cC;a0\\3bB~\x80 @4\""[b as usize % 24])
                    .collect();
                let mut q = vec![b'/'];
                q.extend(&p);
                for input in [&p, &q] {
                    agrees(input);
                }
            });
    }
}
