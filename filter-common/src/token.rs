//! Pieces both HTTP parsers (requests in `stream`, responses in `reply`) share: header names
//! packed into words for comparison, and hexadecimal digits of chunk sizes.

/// Words a header name is compared on (its first 24 bytes, lowercased).
pub const NAME_WORDS: usize = 3;

/// A lowercase header name as its length and its first 24 bytes packed little-endian into
/// words, the form the parsers accumulate names in.
pub const fn pack(s: &str) -> (u8, [u64; NAME_WORDS]) {
    let b = s.as_bytes();
    let mut w = [0u64; NAME_WORDS];
    let mut i = 0;
    while i < b.len() {
        w[i / 8] |= (b[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    (b.len() as u8, w)
}

/// Store zero in `*w` as a store of its own. Zero stores to neighbouring fields otherwise
/// merge into a `memset` call, which BPF runs as a loop over single bytes.
#[inline(always)]
pub fn zero(w: &mut u64) {
    // SAFETY: `w` is a valid, exclusive reference.
    unsafe { core::ptr::write_volatile(w, 0) };
}

/// The value of a hexadecimal digit.
#[inline(always)]
pub fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `words` (bytes in little-endian order) with the bytes of `w` ORed in from byte `n` on;
/// bytes past the end are dropped (what the parsers' `push_name` / `push_value` do byte by
/// byte).
#[inline(always)]
pub fn insert<const N: usize>(words: &mut [u64; N], n: usize, w: u64) {
    if n >= N * 8 {
        return;
    }
    let (q, r) = (n / 8, (n % 8) * 8);
    words[q % N] |= w << r;
    if r != 0 && q + 1 < N {
        words[(q + 1) % N] |= w >> (64 - r);
    }
}
