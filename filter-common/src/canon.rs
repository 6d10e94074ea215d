//! The streaming path canonicalizer: the path the policy lookup sees is the path common
//! backends route, not the raw bytes of the request target.
//!
//! [`Canon::push`] takes one raw path byte at a time (the request-line parser stops at `?`,
//! `#`, SP, HTAB, CR and LF; the first byte is the leading `/`) and appends canonical bytes to
//! a fixed `[u8; PATH_MAX]` buffer; [`Canon::finish`] completes the last segment.
//! [`Canon::push_run`] is an optional fast path that takes up to eight plain bytes at once,
//! with exactly the result of as many `push`es.
//! [`canonicalize`] runs the same machine over a whole path for userspace (rule paths) and
//! tests. The rules are what nginx (`merge_slashes`, its URI normalisation), Envoy
//! (`normalize_path` + `merge_slashes`), Tomcat and Spring do before routing:
//!
//! 1. **Percent-decoding of unreserved characters.** `%XX` (hex digits of either case) that
//!    decodes to ALPHA, DIGIT, `-`, `.`, `_` or `~` is replaced by that character:
//!    `/%61dmin` → `/admin`; `/a/%2e%2E/b` reads as `/a/../b`, a dot segment (→ `/b`). Every
//!    other valid escape is kept encoded, with uppercase hex: `%3b` → `%3B`, `%25` → `%25`
//!    (one level of decoding, never two). An encoded `%3B` therefore stays literal text: it
//!    does not start path parameters (Tomcat decodes it only after removing parameters, so
//!    it routes `/a%3Bx` as the literal segment `a;x`, not as `a`).
//! 2. **Ambiguous encodings are refused** with [`Reason::BadPath`] (the responder answers
//!    400): `%2F`/`%2f` (backends disagree on whether it separates segments), `%5C`, `%00`,
//!    a literal `\` (IIS and some Java backends treat it as `/`), an invalid escape (`%` not
//!    followed by two hex digits, including at the end of the path), any byte below `0x21`
//!    or `0x7f`, a `..` that would climb above the root (`/..`, `/a/../..`), and a path that
//!    does not start with `/` (the parser never feeds one). These checks apply to every byte
//!    of the path, parameters included: `/a;%2F` is refused although the parameter is dropped.
//! 3. **Bytes `>= 0x80` are kept as they are**: no backend routes them as a separator or dot.
//! 4. **Path parameters are removed**: from the first `;` of a segment to the end of that
//!    segment (`/admin;x=1` → `/admin`, `/a;v=1/b` → `/a/b`, `/a/;x/b` → `/a/b`: a segment
//!    that was only parameters becomes empty and merges away). Dot-segment handling looks at
//!    what is left, so `..;x` counts as `..` and `.;x` as `.`, as in Tomcat:
//!    `/a/..;x/admin` → `/admin`. (A backend that routes `..;x` as a literal segment would see
//!    a different path; the filter then decides on the stricter, shorter path, which is the
//!    one Tomcat and Spring actually serve.)
//! 5. **Repeated slashes are merged**: `//admin///x` → `/admin/x`. Merging happens as the
//!    segments are read, so an empty segment never counts as a level for `..`:
//!    `/a//..` → `/`.
//! 6. **Dot segments are removed** (RFC 3986 §5.2.4): `/a/./b` → `/a/b`,
//!    `/a/b/../c` → `/a/c`. A trailing dot segment leaves a trailing slash, as in RFC 3986:
//!    `/a/.` → `/a/`, `/a/b/..` → `/a/`, `/a/..` → `/`. Unlike RFC 3986, which clamps `..` at
//!    the root, a `..` above the root is refused (rule 2). Segments that only look like dot
//!    segments are ordinary: `...`, `.a`, `a.`, `.%3B`.
//! 7. **Length**: [`Reason::PathTooLong`] when the canonical bytes so far (what is in the
//!    buffer at any moment) would exceed `PATH_MAX`. The machine cannot know whether a later
//!    `..` would shorten the path, so it refuses as soon as the buffer is full. The buffer
//!    never holds more bytes than were fed, so a raw path of at most `PATH_MAX` bytes never
//!    fails this way.
//!
//! The output (when `Ok`) starts with `/`, holds no `//`, no `.` or `..` segment, no `;`, no
//! `\`, and `%` only as an uppercase escape of a reserved character; canonicalizing it again
//! gives the same bytes.
//!
//! Kernel constraints: this runs inside a `bpf_loop` callback. There is no way to panic
//! (indices are masked with `PATH_MAX - 1`, arithmetic cannot overflow), no slice of run-time
//! length, no iterator, no recursion, no allocation. Every byte is O(1) except a `..`, which
//! scans `out` backwards for the previous `/` in a loop bounded by `PATH_MAX`. The state is
//! eight bytes of integers: any byte pattern is a valid state (a corrupted one can produce a
//! wrong path or an error, never a fault).

use crate::{put, swar, Reason, PATH_MAX};

const MASK: usize = PATH_MAX - 1;
const _: () = assert!(PATH_MAX.is_power_of_two() && PATH_MAX < u16::MAX as usize);

/// `Canon::esc` values: outside an escape, after `%`, after `%` and one hex digit.
const ESC_NONE: u8 = 0;
const ESC_PCT: u8 = 1;
/// `Canon::dots` value for a segment that is not (so far) `.` or `..`.
const DOTS_OTHER: u8 = 3;

/// Canonicalizer state. `repr(C)`, integers only, so that it can live in map memory next to
/// the request-line parser's state.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Canon {
    /// Index in `out` where the current segment starts (just after its `/`).
    seg_start: u16,
    /// Escape state: `ESC_NONE`, `ESC_PCT`, anything else: one hex digit read (in `hi`).
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
    starts: [u16; DEPTH],
}
const _: () = assert!(core::mem::size_of::<Canon>() == 8 + 2 * DEPTH);

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

/// RFC 3986 `unreserved`.
#[inline(always)]
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_' || c == b'~'
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
            esc: ESC_NONE,
            hi: 0,
            dots: 0,
            param: 0,
            top: 0,
            depth: 0,
            starts: [0; DEPTH],
        }
    }

    /// Make this a fresh canonicalizer in place (what `*self = Canon::new()` does, without
    /// the byte-loop `memset` BPF would run for it; see [`crate::put`]).
    #[inline(always)]
    pub fn reset(&mut self) {
        put(&mut self.seg_start, 0);
        put(&mut self.esc, ESC_NONE);
        put(&mut self.hi, 0);
        put(&mut self.dots, 0);
        put(&mut self.param, 0);
        put(&mut self.top, 0);
        put(&mut self.depth, 0);
        let mut i = 0;
        while i < DEPTH {
            put(&mut self.starts[i], 0);
            i += 1;
        }
    }

    /// Feed one raw byte of the path. Canonical bytes are appended to `out` at `*len`, and
    /// `*len` (the canonical length so far, kept by the caller, starting at 0) is updated; a
    /// `.`/`..` segment may later shorten it again.
    #[inline(always)]
    pub fn push(&mut self, b: u8, out: &mut [u8; PATH_MAX], len: &mut u16) -> Result<(), Reason> {
        if *len == 0 && b != b'/' {
            return Err(Reason::BadPath);
        }
        let c = if self.esc == ESC_NONE {
            if b == b'%' {
                self.esc = ESC_PCT;
                return Ok(());
            }
            if b < 0x21 || b == 0x7f || b == b'\\' {
                return Err(Reason::BadPath);
            }
            b
        } else {
            let v = hex_value(b);
            if v > 0xf {
                return Err(Reason::BadPath);
            }
            if self.esc == ESC_PCT {
                self.esc = ESC_PCT + 1;
                self.hi = v;
                return Ok(());
            }
            self.esc = ESC_NONE;
            let c = (self.hi << 4) | v;
            if c == b'/' || c == b'\\' || c == 0 {
                return Err(Reason::BadPath);
            }
            if !is_unreserved(c) {
                return self.kept_escape(c, out, len);
            }
            c
        };
        // One call site, so the segment logic (and its `..` loop) is inlined once.
        self.char(c, out, len)
    }

    /// The fast path of [`Canon::push`]: of the eight raw bytes of `w` (the first in the low
    /// bits), takes the leading ones that are plain (not `/`, `%`, `;`, `\\`, a control byte,
    /// SP or DEL, and no `.` that could make the segment a dot segment): kept, or dropped
    /// inside path parameters. Returns how many it took, 0 to 8, with the state that many
    /// `push` calls would leave (in `out`, up to `*len`: the bytes after it are scratch); the
    /// caller pushes the next byte with `push`.
    #[inline(always)]
    pub fn push_run(&mut self, w: u64, out: &mut [u8; PATH_MAX], len: &mut u16) -> usize {
        let n = *len as usize;
        if self.esc != ESC_NONE || n == 0 || n > PATH_MAX - 8 {
            return 0;
        }
        let special = swar::lt(w, 0x21)
            | swar::eq(w, 0x7f)
            | swar::eq(w, b'/')
            | swar::eq(w, b'%')
            | swar::eq(w, b';')
            | swar::eq(w, b'\\');
        let k = swar::leading(special);
        if k == 0 || self.param != 0 {
            // Parameter bytes are dropped up to the next `/`.
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
        self.dots = DOTS_OTHER;
        k
    }

    /// A valid escape of a reserved character: three bytes, uppercase hex, never a
    /// separator, dot or parameter start.
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
            return Ok(());
        }
        self.dots = if c == b'.' && self.dots < 2 {
            self.dots + 1
        } else {
            DOTS_OTHER
        };
        emit(c, out, len)
    }

    /// The current segment ends (at a `/` if `slash`, else at the end of the path).
    #[inline(always)]
    fn end_segment(
        &mut self,
        slash: bool,
        out: &mut [u8; PATH_MAX],
        len: &mut u16,
    ) -> Result<(), Reason> {
        let dots = self.dots;
        self.dots = 0;
        self.param = 0;
        if dots == 1 {
            // `.`: drop it; `out` already ends with the `/` before it.
            *len = self.seg_start;
            return Ok(());
        }
        if dots == 2 {
            return self.pop(out, len);
        }
        if (dots == 0 && *len != 0) || !slash {
            // An empty segment (repeated `/`) merges away; the last segment needs nothing.
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
        Ok(())
    }
}

/// Canonicalize a whole path into `out` and return its length (userspace and tests; the same
/// machine the kernel runs). `path` is a path only: `?` and `#` in it are ordinary bytes.
pub fn canonicalize(path: &[u8], out: &mut [u8; PATH_MAX]) -> Result<usize, Reason> {
    let mut canon = Canon::new();
    let mut len = 0u16;
    for &b in path {
        canon.push(b, out, &mut len)?;
    }
    canon.finish(out, &mut len)?;
    Ok(len as usize)
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

    /// The rules of the module doc, written the obvious way: validate and decode the whole
    /// path, split it into segments, strip parameters, then resolve `.`/`..` with a stack.
    fn reference(path: &[u8]) -> Result<Vec<u8>, Reason> {
        if path.first() != Some(&b'/') {
            return Err(Reason::BadPath);
        }
        let mut decoded = Vec::new();
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
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    decoded.push(c);
                } else {
                    decoded.extend(format!("%{c:02X}").bytes());
                }
                i += 3;
            } else if b < 0x21 || b == 0x7f || b == b'\\' {
                return Err(Reason::BadPath);
            } else {
                decoded.push(b);
                i += 1;
            }
        }
        let segments: Vec<&[u8]> = decoded[1..]
            .split(|&b| b == b'/')
            .map(|s| s.split(|&b| b == b';').next().unwrap())
            .collect();
        let mut stack: Vec<&[u8]> = Vec::new();
        for s in &segments {
            match *s {
                b"" | b"." => {}
                b".." => {
                    stack.pop().ok_or(Reason::BadPath)?;
                }
                _ => stack.push(s),
            }
        }
        let mut out = vec![b'/'];
        out.extend(stack.join(&b'/'));
        let last = *segments.last().unwrap();
        if !stack.is_empty() && matches!(last, b"" | b"." | b"..") {
            out.push(b'/');
        }
        if out.len() > PATH_MAX {
            return Err(Reason::PathTooLong);
        }
        Ok(out)
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
            ("/a//..", "/"),
            ("/a/..//b", "/b"),
            // Segments that only look like dot segments.
            ("/...", "/..."),
            ("/a/.../b", "/a/.../b"),
            ("/.a", "/.a"),
            ("/a.", "/a."),
            ("/..a/b", "/..a/b"),
            ("/.%3B", "/.%3B"),
            // Percent-decoding of unreserved characters, either case.
            ("/%61dmin", "/admin"),
            ("/%41DMIN", "/ADMIN"),
            ("/%7e%7E%2D%5f%30", "/~~-_0"),
            ("/%2e", "/"),
            ("/a/%2e", "/a/"),
            ("/a/%2e%2e/admin", "/admin"),
            ("/a/%2E%2e/admin", "/admin"),
            ("/a/.%2e/admin", "/admin"),
            ("/%2e%2e%2e", "/..."),
            // Other escapes stay, uppercased.
            ("/a%3bb", "/a%3Bb"),
            ("/a%3Bb", "/a%3Bb"),
            ("/a%20b", "/a%20b"),
            ("/%25", "/%25"),
            ("/%2561", "/%2561"),
            ("/%ff%c3%a9", "/%FF%C3%A9"),
            ("/%3F", "/%3F"),
            // Path parameters.
            ("/admin;x=1", "/admin"),
            ("/a;v=1/b", "/a/b"),
            ("/a/;x/b", "/a/b"),
            ("/;x", "/"),
            ("/a;x/", "/a/"),
            ("/a/..;x/admin", "/admin"),
            ("/a/.;x/b", "/a/b"),
            ("/a/b/..;x", "/a/"),
            ("/a;x;y=2/b", "/a/b"),
            ("/a;%2e%2e/b", "/a/b"),
            ("/admin%3Bx=1", "/admin%3Bx=1"),
            // Bytes >= 0x80 and other visible ASCII are kept.
            ("/caf\u{e9}", "/caf\u{e9}"),
            ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
            ("/a?b#c", "/a?b#c"),
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
            b"/%2e%2e/admin",
            b"/a/../..",
            b"/a/../../admin",
            b"/..;x/admin",
            b"//../a",
            b"/a;x=%2F",
            b"/a;x=%zz",
            b"",
            b"admin",
            b"%2Fadmin",
        ];
        for input in bad {
            assert_eq!(canon(input), Err(Reason::BadPath), "{}", show(input));
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
        // Byte by byte, `len` never exceeds the bytes fed, and the result is `canonicalize`'s.
        let path = b"//a/./b;x/../%2e%2E/c%3b/%7e/..;p/d/";
        let mut out = [0xaau8; PATH_MAX];
        let mut len = 0u16;
        let mut c = Canon::new();
        for (i, &b) in path.iter().enumerate() {
            c.push(b, &mut out, &mut len).unwrap();
            assert!(len as usize <= i + 1);
        }
        c.finish(&mut out, &mut len).unwrap();
        assert_eq!(show(&out[..len as usize]), "/c%3B/d/");
        assert_eq!(canon(path), Ok(b"/c%3B/d/".to_vec()));
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
            let mut out = [b'x'; PATH_MAX];
            let mut len = (r >> 48) as u16;
            for _ in 0..16 {
                let b = b"/.%2e;a\\"[(next() % 8) as usize];
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
        const CHARS: &[u8] = b"/////..%%2eEfF5cC;;a0\\3bB~";
        const TOKENS: &[&[u8]] = &[
            b"/", b"/", b"/", b".", b"..", b"...", b"%2e", b"%2E", b"%2f", b"%5c", b"%61", b"%41",
            b"%3b", b"%3B", b"%25", b"%7e", b"%00", b"%", b"%2", b"%zz", b";", b";x=1", b"a", b"b",
            b"0", b"\\", b"\x80", b"\xff", b" ", b"?",
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

    #[test]
    fn matches_the_reference_and_is_idempotent() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
        let (mut ok, mut total) = (0, 0);
        for _ in 0..100_000 {
            let p = random_path(&mut next);
            let got = canon(&p);
            assert_eq!(got, reference(&p), "{:?}", show(&p));
            if let Ok(c) = &got {
                assert_eq!(canon(c).as_ref(), Ok(c), "not idempotent: {:?}", show(&p));
                ok += 1;
            }
            total += 1;
        }
        // Both outcomes must be well represented, or the comparison proves little.
        assert!(ok * 5 > total && ok * 5 < total * 4, "{ok} of {total} ok");
    }

    /// The same comparison as a bolero target (about a second under `cargo test`; see
    /// `tests/fuzz.rs` for running it under libFuzzer, as
    /// `canon::tests::fuzz_matches_the_reference`). Inputs stay well below `PATH_MAX`: the
    /// streaming machine refuses a too-long buffer before a later `..` could shorten it,
    /// which the reference does not model.
    #[test]
    fn fuzz_matches_the_reference() {
        bolero::check!()
            .with_type::<Vec<u8>>()
            .with_max_len(512)
            .for_each(|p| {
                // Mostly valid paths: map each byte into the interesting alphabet.
                let p: Vec<u8> = p
                    .iter()
                    .map(|&b| b"/.%2eEfF5cC;a0\\3bB~\x80 "[b as usize % 21])
                    .collect();
                let mut q = vec![b'/'];
                q.extend(&p);
                for input in [&p, &q] {
                    let got = canon(input);
                    assert_eq!(got, reference(input), "{:?}", show(input));
                    if let Ok(c) = &got {
                        assert_eq!(canon(c).as_ref(), Ok(c));
                    }
                }
            });
    }
}
