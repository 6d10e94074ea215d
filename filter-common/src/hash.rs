//! The keyed path hash: SipHash-1-3 over the path bytes, with a 128-bit key the daemon draws
//! at random on every start, so that nobody outside can craft paths that collide in the
//! policy map.
//!
//! The kernel hashes a path it has copied into a fixed `[u8; PATH_MAX]` buffer; userspace
//! hashes rule paths with the same function, so the two sides cannot drift.

use crate::PATH_MAX;

const MASK: usize = PATH_MAX - 1;
const _: () = assert!(PATH_MAX.is_power_of_two() && PATH_MAX >= 8);

#[inline(always)]
fn sipround(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

#[inline(always)]
fn word_at(buf: &[u8; PATH_MAX], off: usize) -> u64 {
    let mut w = 0u64;
    let mut j = 0;
    while j < 8 {
        w |= (buf[(off + j) & MASK] as u64) << (8 * j);
        j += 1;
    }
    w
}

/// SipHash-1-3 state, so the kernel can feed the words from a `bpf_loop` callback (one word
/// per call) instead of a 128-iteration loop the verifier walks at every call site.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SipState {
    v: [u64; 4],
}

impl SipState {
    #[inline(always)]
    pub fn new(key: &[u64; 2]) -> SipState {
        SipState {
            v: [
                key[0] ^ 0x736f_6d65_7073_6575,
                key[1] ^ 0x646f_7261_6e64_6f6d,
                key[0] ^ 0x6c79_6765_6e65_7261,
                key[1] ^ 0x7465_6462_7974_6573,
            ],
        }
    }

    /// Absorb the little-endian word at byte `off` of `buf`.
    #[inline(always)]
    pub fn word(&mut self, buf: &[u8; PATH_MAX], off: usize) {
        self.absorb(word_at(buf, off));
    }

    /// Absorb one message word (the next eight path bytes, little-endian), for a caller that
    /// loads the words itself (the kernel reads them from an aligned buffer in one load).
    #[inline(always)]
    pub fn absorb(&mut self, m: u64) {
        self.v[3] ^= m;
        sipround(&mut self.v);
        self.v[0] ^= m;
    }

    /// Absorb the tail (the `len % 8` bytes after the full words) and the length; the hash.
    /// Branch-free: the tail is the word after the full ones, masked to its `len % 8` bytes
    /// (in the kernel, a loop over the tail's bytes multiplies the states the verifier walks
    /// through the rest of the caller by eight).
    #[inline(always)]
    pub fn finish(mut self, buf: &[u8; PATH_MAX], len: usize) -> u64 {
        let len = clamp(len);
        let tail = len & 7;
        // `len == PATH_MAX` has no tail: the masked word is then empty whatever is read.
        let word = word_at(buf, (len & !7) & (PATH_MAX - 8));
        let keep = (1u64 << (8 * tail)).wrapping_sub(1);
        let b = ((len as u64) << 56) | (word & keep);
        let v = &mut self.v;
        v[3] ^= b;
        sipround(v);
        v[0] ^= b;
        v[2] ^= 0xff;
        sipround(v);
        sipround(v);
        sipround(v);
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
}

#[inline(always)]
fn clamp(len: usize) -> usize {
    if len > PATH_MAX {
        PATH_MAX
    } else {
        len
    }
}

/// Full 8-byte words in a path of `len` bytes: what [`SipState::word`] takes before
/// [`SipState::finish`].
#[inline(always)]
pub fn full_words(len: usize) -> usize {
    clamp(len) / 8
}

/// SipHash-1-3 of `buf[..len]` under `key` (`len` is clamped to `PATH_MAX`).
#[inline(always)]
pub fn path_hash(key: &[u64; 2], buf: &[u8; PATH_MAX], len: usize) -> u64 {
    let mut st = SipState::new(key);
    let full = full_words(len);
    let mut w = 0;
    while w < PATH_MAX / 8 {
        if w >= full {
            break;
        }
        st.word(buf, w * 8);
        w += 1;
    }
    st.finish(buf, len)
}

/// Hash a path given as a slice (userspace): copies it into a zeroed buffer first.
/// Returns `None` for a path longer than `PATH_MAX`, which no rule may have.
pub fn hash_slice(key: &[u64; 2], path: &[u8]) -> Option<u64> {
    if path.len() > PATH_MAX {
        return None;
    }
    let mut buf = [0u8; PATH_MAX];
    buf[..path.len()].copy_from_slice(path);
    Some(path_hash(key, &buf, path.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::hash::Hasher;
    use siphasher::sip::SipHasher13;

    fn reference(key: &[u64; 2], data: &[u8]) -> u64 {
        let mut h = SipHasher13::new_with_keys(key[0], key[1]);
        h.write(data);
        h.finish()
    }

    #[test]
    fn matches_the_reference_siphash13_for_every_length() {
        let key = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        let data: std::vec::Vec<u8> = (0..PATH_MAX).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..=PATH_MAX {
            assert_eq!(
                hash_slice(&key, &data[..len]),
                Some(reference(&key, &data[..len])),
                "len {len}"
            );
        }
    }

    #[test]
    fn bytes_past_len_do_not_matter() {
        let key = [1, 2];
        let mut a = [0u8; PATH_MAX];
        let mut b = [0xffu8; PATH_MAX];
        a[..4].copy_from_slice(b"/api");
        b[..4].copy_from_slice(b"/api");
        assert_eq!(path_hash(&key, &a, 4), path_hash(&key, &b, 4));
    }

    #[test]
    fn the_key_changes_the_hash_and_long_paths_are_refused() {
        assert_ne!(
            hash_slice(&[1, 2], b"/admin"),
            hash_slice(&[1, 3], b"/admin")
        );
        assert_eq!(hash_slice(&[1, 2], &[b'a'; PATH_MAX + 1]), None);
    }
}
