//! The method table: which request methods the filter names, their bit in a [`MethodSet`],
//! and their canonical order in an `Allow` header.
//!
//! Methods are case-sensitive tokens (RFC 9110 §9.1): `get` is not `GET`. A token that is not
//! in the table is [`Method::Other`]; a rule can never allow it, so on a governed path it is
//! rejected, while the default for ungoverned paths (`any`) lets it through.

/// Longest method token the kernel can name. Longer tokens are [`Method::Other`].
pub const METHOD_MAX: usize = 16;

/// A request method, by its bit index in a [`MethodSet`]. Append-only: values are part of the
/// kernel/user contract.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    Get = 0,
    Head = 1,
    Post = 2,
    Put = 3,
    Delete = 4,
    Connect = 5,
    Options = 6,
    Trace = 7,
    Patch = 8,
    Propfind = 9,
    Proppatch = 10,
    Mkcol = 11,
    Copy = 12,
    Move = 13,
    Lock = 14,
    Unlock = 15,
    /// Any syntactically valid token the table does not name (including other cases of a
    /// known one, such as `get`).
    Other = 31,
}

/// Every named method, in canonical `Allow` order.
pub const NAMED: [Method; 16] = [
    Method::Get,
    Method::Head,
    Method::Post,
    Method::Put,
    Method::Delete,
    Method::Connect,
    Method::Options,
    Method::Trace,
    Method::Patch,
    Method::Propfind,
    Method::Proppatch,
    Method::Mkcol,
    Method::Copy,
    Method::Move,
    Method::Lock,
    Method::Unlock,
];

impl Method {
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Connect => "CONNECT",
            Method::Options => "OPTIONS",
            Method::Trace => "TRACE",
            Method::Patch => "PATCH",
            Method::Propfind => "PROPFIND",
            Method::Proppatch => "PROPPATCH",
            Method::Mkcol => "MKCOL",
            Method::Copy => "COPY",
            Method::Move => "MOVE",
            Method::Lock => "LOCK",
            Method::Unlock => "UNLOCK",
            Method::Other => "(other)",
        }
    }

    pub const fn bit(self) -> u32 {
        1 << (self as u8)
    }

    pub const fn from_u8(v: u8) -> Method {
        if (v as usize) < NAMED.len() {
            NAMED[v as usize]
        } else {
            Method::Other
        }
    }

    /// The method named by an exact token, if the table has it.
    pub fn from_token(token: &[u8]) -> Option<Method> {
        let mut i = 0;
        while i < NAMED.len() {
            if NAMED[i].as_str().as_bytes() == token {
                return Some(NAMED[i]);
            }
            i += 1;
        }
        None
    }

    /// Identify a token the kernel accumulated as two little-endian words (bytes 0..8 in
    /// `w0`, 8..16 in `w1`, unused bytes zero). Integer compares only: no slices, no memcmp.
    #[inline(always)]
    pub fn from_words(len: usize, w0: u64, w1: u64) -> Method {
        let mut i = 0;
        while i < NAMED.len() {
            let (n, a, b) = PACKED[i];
            if n == len && a == w0 && b == w1 {
                return NAMED[i];
            }
            i += 1;
        }
        Method::Other
    }
}

/// A named method's token as (length, first word, second word), as the kernel accumulates it.
#[inline(always)]
pub fn packed(m: Method) -> (usize, u64, u64) {
    PACKED[(m as usize) % PACKED.len()]
}

const fn pack(s: &str) -> (usize, u64, u64) {
    let b = s.as_bytes();
    let mut w = [0u64; 2];
    let mut i = 0;
    while i < b.len() {
        w[i / 8] |= (b[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    (b.len(), w[0], w[1])
}

const PACKED: [(usize, u64, u64); 16] = {
    let mut out = [(0, 0, 0); 16];
    let mut i = 0;
    while i < NAMED.len() {
        out[i] = pack(NAMED[i].as_str());
        i += 1;
    }
    out
};

/// `tchar` from RFC 9110 §5.6.2: the bytes a method token may contain.
#[inline(always)]
pub const fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`'
        | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// A set of methods as the kernel stores it: bit `m as u8` for each method `m`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MethodSet(pub u32);

impl MethodSet {
    pub const EMPTY: MethodSet = MethodSet(0);
    /// Every method, [`Method::Other`] included: the `any` default.
    pub const ANY: MethodSet = MethodSet(u32::MAX);

    pub const fn contains(self, m: Method) -> bool {
        self.0 & m.bit() != 0
    }

    pub const fn with(self, m: Method) -> MethodSet {
        MethodSet(self.0 | m.bit())
    }

    /// The named methods in the set, in canonical order.
    pub fn iter(self) -> impl Iterator<Item = Method> {
        NAMED.into_iter().filter(move |m| self.contains(*m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[u8]) -> (usize, u64, u64) {
        let mut w = [0u64; 2];
        for (i, b) in s.iter().enumerate().take(16) {
            w[i / 8] |= (*b as u64) << (8 * (i % 8));
        }
        (s.len(), w[0], w[1])
    }

    #[test]
    fn every_named_method_round_trips_through_words_and_tokens() {
        for m in NAMED {
            let (n, a, b) = words(m.as_str().as_bytes());
            assert_eq!(Method::from_words(n, a, b), m);
            assert_eq!(Method::from_token(m.as_str().as_bytes()), Some(m));
            assert_eq!(Method::from_u8(m as u8), m);
        }
    }

    #[test]
    fn methods_are_case_sensitive_and_unknown_tokens_are_other() {
        for t in [&b"get"[..], b"Get", b"GETX", b"GE", b"PROPPATCHX", b"FOO"] {
            let (n, a, b) = words(t);
            assert_eq!(Method::from_words(n, a, b), Method::Other, "{t:?}");
            assert_eq!(Method::from_token(t), None);
        }
    }

    #[test]
    fn set_iterates_in_canonical_order() {
        let s = MethodSet::EMPTY
            .with(Method::Post)
            .with(Method::Get)
            .with(Method::Head);
        let names: std::vec::Vec<_> = s.iter().map(Method::as_str).collect();
        assert_eq!(names, ["GET", "HEAD", "POST"]);
        assert!(!s.contains(Method::Other));
        assert!(MethodSet::ANY.contains(Method::Other));
    }
}
