//! Eight bytes at a time ("SIMD within a register"): exact per-byte masks over a `u64` whose
//! first byte is in the low bits (little-endian), for the parsers' fast paths.
//!
//! Each mask has bit 7 of a byte set exactly when that byte matches, and no other bit: no
//! borrow or carry crosses a byte (the classic `(x - 0x01..) & !x` trick can flag the byte
//! after a match, so it is not used). Pure integer arithmetic, no branches, no tables: cheap
//! for the kernel verifier and the same on the host.

/// `0x01` in every byte.
pub const ONES: u64 = 0x0101_0101_0101_0101;
/// `0x7f` in every byte.
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
/// `0x80` in every byte.
pub const HIGH: u64 = 0x8080_8080_8080_8080;

/// For bytes below 0x80 (`t`): bit 7 of !(b + 0x7f) is set exactly when b is zero. No sum
/// reaches 0x100: no carry into the next byte. The other bits are not masked.
#[inline(always)]
const fn zero_low7(t: u64) -> u64 {
    !t.wrapping_add(LOW7)
}

/// Bit 7 of each zero byte of `x`: [`zero_low7`] of its low seven bits, without the bytes
/// with bit 7 set (spelled out whole: the composition compiles to longer BPF).
#[inline(always)]
pub const fn zero(x: u64) -> u64 {
    !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7)
}

/// Bit 7 of each zero byte of `x`, and possibly of bytes above a zero byte (a borrow runs
/// up from it), never of a byte below the lowest zero byte: cheaper than [`zero`], and exact
/// for asking whether a leading run of bytes (a mask of its bytes' bit 7) holds a zero byte.
#[inline(always)]
pub const fn zero_from_low(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & HIGH
}

/// [`zero_from_low`] for the bytes of `x` equal to `c`.
#[inline(always)]
pub const fn eq_from_low(x: u64, c: u8) -> u64 {
    zero_from_low(x ^ ONES.wrapping_mul(c as u64))
}

/// Bit 7 of each byte of `x` equal to `c`.
#[inline(always)]
pub const fn eq(x: u64, c: u8) -> u64 {
    zero(x ^ ONES.wrapping_mul(c as u64))
}

/// For bytes below 0x80 (`t`) and `lo <= 0x80`: bit 7 of b + (0x80 - lo) is set exactly when
/// b >= lo. No sum reaches 0x100: no carry into the next byte. The other bits are not masked.
#[inline(always)]
const fn at_least(t: u64, lo: u8) -> u64 {
    t.wrapping_add(ONES.wrapping_mul((0x80 - lo) as u64))
}

/// Bit 7 of each byte of `x` below `n` (`n <= 0x80`): a byte with bit 7 set never is.
#[inline(always)]
pub const fn lt(x: u64, n: u8) -> u64 {
    !(at_least(x & LOW7, n) | x) & HIGH
}

/// Bit 7 of each byte of `x` at or above `n` (`n <= 0x80`; every byte with bit 7 set is).
#[inline(always)]
pub const fn ge(x: u64, n: u8) -> u64 {
    (at_least(x & LOW7, n) | x) & HIGH
}

/// Bit 7 of each byte of `x` in `lo..=hi` (`lo <= hi < 0x80`).
#[inline(always)]
pub const fn in_range(x: u64, lo: u8, hi: u8) -> u64 {
    lt(x, hi + 1) & !lt(x, lo)
}

/// Bit 7 of each byte of `x` that a path in normal form holds as itself inside a segment
/// (RFC 3986 `pchar` without `%` and `;`): ALPHA, DIGIT, `-._~`, the sub-delimiters but `;`
/// (`!$&'()*+,=`), `:` and `@`. Every other byte is a separator (`/`), starts an escape or
/// path parameters, is refused, or is written as its escape (`crate::canon`).
#[inline(always)]
pub const fn literal(x: u64) -> u64 {
    // `A`-`Z` and `a`-`z` differ in bit 5 only, and no other byte lands in `a`-`z` with it
    // set; `&'()*+,-.` and `0`-`9` `:` are two runs around `/`.
    in_range(x | ONES.wrapping_mul(0x20), b'a', b'z')
        | in_range(x, b'&', b'.')
        | in_range(x, b'0', b':')
        | eq(x, b'!')
        | eq(x, b'$')
        | eq(x, b'=')
        | eq(x, b'@')
        | eq(x, b'_')
        | eq(x, b'~')
}

/// Bit 7 of each byte of `x` that is a letter, a digit or one of `-./_~`: the bytes the path's
/// word loop takes (`http::plain_path_word`). Cheaper than [`in_range`] and [`eq`] for the
/// same set: the comparisons work on the bytes' low seven bits, and the bytes with bit 7 set
/// are dropped once, at the end.
#[inline(always)]
pub const fn path_plain(x: u64) -> u64 {
    let t = x & LOW7;
    let digits = at_least(t, b'-') & !at_least(t, b'9' + 1);
    // `A`-`Z` and `a`-`z` differ in bit 5 only, and no other byte lands in `a`-`z` with it set.
    let f = t | ONES.wrapping_mul(0x20);
    let letters = at_least(f, b'a') & !at_least(f, b'z' + 1);
    let underscore = zero_low7(t ^ ONES.wrapping_mul(b'_' as u64));
    let tilde = zero_low7(t ^ ONES.wrapping_mul(b'~' as u64));
    (digits | letters | underscore | tilde) & !x & HIGH
}

/// `x` with ASCII `A`-`Z` lowercased (what `u8::to_ascii_lowercase` does to each byte).
#[inline(always)]
pub const fn lower(x: u64) -> u64 {
    x | (in_range(x, b'A', b'Z') >> 2)
}

/// `x` with ASCII `a`-`z` uppercased (what `u8::to_ascii_uppercase` does to each byte).
#[inline(always)]
pub const fn upper(x: u64) -> u64 {
    x & !(in_range(x, b'a', b'z') >> 2)
}

/// How many bytes of the word come before the first one flagged in `stop` (a mask as above):
/// 0 to 8.
#[inline(always)]
pub const fn leading(stop: u64) -> usize {
    // The bits below the lowest flagged one: bit 7 is set in each byte before it; those bits,
    // one per byte, summed into the top byte.
    let below = (stop & stop.wrapping_neg()).wrapping_sub(1);
    (((below & HIGH) >> 7).wrapping_mul(ONES) >> 56) as usize
}

/// Bit 7 of each of the first `k` bytes (`k <= 8`).
#[inline(always)]
pub const fn first(k: usize) -> u64 {
    if k >= 8 {
        HIGH
    } else {
        HIGH & ((1u64 << (8 * k)) - 1)
    }
}

/// All bits of the first `k` bytes (`k <= 8`).
#[inline(always)]
pub const fn bytes(k: usize) -> u64 {
    (first(k) >> 7).wrapping_mul(0xff)
}

/// `w` without its first `n` bytes (`n <= 8`; zero bytes come in at the top).
#[inline(always)]
pub const fn skip(w: u64, n: usize) -> u64 {
    if n >= 8 {
        0
    } else {
        w >> (8 * n)
    }
}

/// `w` with its bytes from the `avail`-th on (`avail <= 8`) replaced by `fill`: the word at
/// the end of a buffer, padded with a byte that ends every run reading it (`\n` for the
/// request side's runs), so a run never takes bytes past the buffer.
#[inline(always)]
pub const fn pad(w: u64, avail: usize, fill: u8) -> u64 {
    let keep = bytes(avail);
    (w & keep) | ((fill as u64).wrapping_mul(ONES) & !keep)
}

/// The bytes of `b` from `off` (up to eight) as a little-endian word, padded with `fill`
/// past the end of `b` (host and tests).
pub fn word_padded(b: &[u8], off: usize, fill: u8) -> u64 {
    let mut w = [fill; 8];
    let n = (b.len() - off).min(8);
    w[..n].copy_from_slice(&b[off..off + n]);
    u64::from_le_bytes(w)
}

/// The eight bytes of `b` from `off` as a little-endian word (host and tests; the kernel
/// loads its words from map memory itself).
#[inline(always)]
pub fn word(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(mask: u64) -> [bool; 8] {
        let mut r = [false; 8];
        for (i, r) in r.iter_mut().enumerate() {
            let byte = (mask >> (8 * i)) & 0xff;
            assert!(byte == 0 || byte == 0x80, "mask byte {byte:#x}");
            *r = byte == 0x80;
        }
        r
    }

    #[test]
    fn first_bytes() {
        for k in 0..=8usize {
            let b = bytes(k).to_le_bytes();
            for (i, &v) in b.iter().enumerate() {
                assert_eq!(v, if i < k { 0xff } else { 0 });
            }
            assert_eq!(first(k), bytes(k) & HIGH);
        }
    }

    #[test]
    fn pad_keeps_the_first_bytes_and_fills_the_rest() {
        let w = u64::from_le_bytes(*b"abcdefgh");
        for k in 0..=8usize {
            let mut want = *b"\n\n\n\n\n\n\n\n";
            want[..k].copy_from_slice(&b"abcdefgh"[..k]);
            assert_eq!(pad(w, k, b'\n').to_le_bytes(), want);
            assert_eq!(word_padded(&b"abcdefgh"[..k], 0, b'\n').to_le_bytes(), want);
        }
    }

    #[test]
    fn zero_from_low_marks_every_zero_byte_and_nothing_below_the_lowest() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..200_000 {
            let state = next();
            // Bytes from a small alphabet, so that zero bytes and 0x01 (which a borrow can
            // turn into a false mark) are common.
            let w: [u8; 8] = core::array::from_fn(|i| {
                [0u8, 1, 2, 0x80, 0x81, 0xff][((state >> (5 * i)) % 6) as usize]
            });
            let m = bytes_of(zero_from_low(u64::from_le_bytes(w)));
            let lowest = w.iter().position(|&b| b == 0).unwrap_or(8);
            for i in 0..8 {
                if w[i] == 0 {
                    assert!(m[i], "{w:?}");
                }
                if i < lowest {
                    assert!(!m[i], "{w:?}");
                }
            }
        }
    }

    #[test]
    fn masks_are_exact_for_every_byte_in_every_position() {
        // Every byte value, in every position, next to neighbours that provoke borrows.
        for fill in [0x00u8, 0x01, 0x20, 0x7f, 0x80, 0xff, b'A', b'z'] {
            for pos in 0..8 {
                for b in 0..=255u8 {
                    let mut w = [fill; 8];
                    w[pos] = b;
                    let x = u64::from_le_bytes(w);
                    for (i, &v) in w.iter().enumerate() {
                        assert_eq!(bytes_of(zero(x))[i], v == 0);
                        assert_eq!(bytes_of(eq(x, b'/'))[i], v == b'/');
                        assert_eq!(bytes_of(eq(x, 0x7f))[i], v == 0x7f);
                        assert_eq!(bytes_of(lt(x, 0x20))[i], v < 0x20);
                        assert_eq!(bytes_of(lt(x, 0x80))[i], v < 0x80);
                        assert_eq!(bytes_of(lt(x, 1))[i], v < 1);
                        assert_eq!(bytes_of(ge(x, 0x7f))[i], v >= 0x7f);
                        assert_eq!(bytes_of(ge(x, 0x21))[i], v >= 0x21);
                        assert_eq!(bytes_of(in_range(x, b'a', b'z'))[i], v.is_ascii_lowercase());
                        let lit = v.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&v);
                        assert_eq!(bytes_of(literal(x))[i], lit, "{v:#x}");
                        let plain = v.is_ascii_alphanumeric() || b"-./_~".contains(&v);
                        assert_eq!(bytes_of(path_plain(x))[i], plain, "{v:#x}");
                    }
                    let stop = eq(x, b'/');
                    let want = w.iter().position(|&v| v == b'/').unwrap_or(8);
                    assert_eq!(leading(stop), want);
                    let lo = lower(x).to_le_bytes();
                    let up = upper(x).to_le_bytes();
                    for i in 0..8 {
                        assert_eq!(lo[i], w[i].to_ascii_lowercase());
                        assert_eq!(up[i], w[i].to_ascii_uppercase());
                    }
                }
            }
        }
    }
}
