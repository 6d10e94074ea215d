//! The chunked transfer coding (RFC 9112 §7.1) between chunks: chunk sizes, extensions and
//! the CRLF after each chunk's data. One state machine, read by both directions: the request
//! stream ([`crate::stream`]) and the response follower ([`crate::reply`]) keep the phase,
//! the size and the digit count in their own fields and hand them to [`step`]; each decides
//! what a [`Chunk::Bad`] means for it (a refused request; framing lost on a response).
//!
//! Chunk data itself is not stepped here: in [`DATA`] the caller consumes `size` bytes in
//! bulk and then moves to [`DATA_CR`] ([`data_done`]). The trailer section after the last
//! chunk is a header block, read by the caller's header parser.
//!
//! Rules, the same in both directions: a size is one or more hex digits (at most
//! [`SIZE_MAX`]); after it, `;`, SP or HTAB start an extension that runs to the line's end and
//! may not hold a control byte other than HTAB; a line ends in CRLF or a bare LF; chunk data
//! is followed by CRLF or a bare LF. Anything else is [`Chunk::Bad`].

use crate::token::hex;

/// Reading a chunk size's hex digits.
pub const SIZE: u8 = 8;
/// Reading a chunk extension (or whitespace after the size) up to the line's end.
pub const EXT: u8 = 9;
/// After the size line's CR: its LF.
pub const SIZE_LF: u8 = 10;
/// Chunk data, consumed in bulk by the caller.
pub const DATA: u8 = 11;
/// After chunk data: its CR (or a bare LF).
pub const DATA_CR: u8 = 12;
/// After chunk data's CR: its LF.
pub const DATA_LF: u8 = 13;

/// Largest chunk size accepted (1 TiB): more digits are [`Chunk::Bad`].
pub const SIZE_MAX: u64 = 1 << 40;

/// What one byte did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Taken; the phase may have changed within the framing.
    More,
    /// A size line ended with a size above zero: `size` bytes of data follow (phase [`DATA`]).
    Data,
    /// The last chunk's size line ended: the trailer section follows (the caller reads it as
    /// a header block).
    Last,
    /// Not chunked framing.
    Bad,
}

/// Start a chunk size line.
#[inline(always)]
pub fn start(phase: &mut u8, size: &mut u64, digits: &mut u32) {
    *phase = SIZE;
    *size = 0;
    *digits = 0;
}

/// A chunk's data is all consumed: its CRLF is next.
#[inline(always)]
pub fn data_done(phase: &mut u8) {
    *phase = DATA_CR;
}

/// Feed one byte in a framing phase (any chunk phase but [`DATA`]); `digits` counts the
/// size's digits.
#[inline(always)]
pub fn step(phase: &mut u8, size: &mut u64, digits: &mut u32, b: u8) -> Chunk {
    match *phase {
        SIZE => {
            if let Some(d) = hex(b) {
                if *size > SIZE_MAX {
                    return Chunk::Bad;
                }
                *size = size.wrapping_mul(16).wrapping_add(d as u64);
                *digits = digits.wrapping_add(1);
                Chunk::More
            } else if b == b';' || b == b' ' || b == b'\t' {
                *phase = EXT;
                Chunk::More
            } else if b == b'\r' {
                *phase = SIZE_LF;
                Chunk::More
            } else if b == b'\n' {
                size_done(phase, *size, *digits)
            } else {
                Chunk::Bad
            }
        }
        EXT => {
            if b == b'\r' {
                *phase = SIZE_LF;
                Chunk::More
            } else if b == b'\n' {
                size_done(phase, *size, *digits)
            } else if b < 0x20 && b != b'\t' {
                Chunk::Bad
            } else {
                Chunk::More
            }
        }
        SIZE_LF => {
            if b == b'\n' {
                size_done(phase, *size, *digits)
            } else {
                Chunk::Bad
            }
        }
        DATA_CR => {
            if b == b'\r' {
                *phase = DATA_LF;
                Chunk::More
            } else if b == b'\n' {
                start(phase, size, digits);
                Chunk::More
            } else {
                Chunk::Bad
            }
        }
        DATA_LF => {
            if b == b'\n' {
                start(phase, size, digits);
                Chunk::More
            } else {
                Chunk::Bad
            }
        }
        _ => Chunk::Bad,
    }
}

#[inline(always)]
fn size_done(phase: &mut u8, size: u64, digits: u32) -> Chunk {
    if digits == 0 {
        Chunk::Bad
    } else if size == 0 {
        Chunk::Last
    } else {
        *phase = DATA;
        Chunk::Data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `body` through the framing, consuming data in bulk; `Ok(bytes before the trailer)`
    /// or `Err(offset of the bad byte)`.
    fn frame(body: &[u8]) -> Result<usize, usize> {
        let (mut phase, mut size, mut digits) = (0, 0, 0);
        start(&mut phase, &mut size, &mut digits);
        let mut i = 0;
        while i < body.len() {
            if phase == DATA {
                let n = (size as usize).min(body.len() - i);
                i += n;
                size -= n as u64;
                if size == 0 {
                    data_done(&mut phase);
                }
                continue;
            }
            match step(&mut phase, &mut size, &mut digits, body[i]) {
                Chunk::More | Chunk::Data => {}
                Chunk::Last => return Ok(i + 1),
                Chunk::Bad => return Err(i),
            }
            i += 1;
        }
        Err(body.len())
    }

    #[test]
    fn reads_sizes_extensions_and_data() {
        assert_eq!(frame(b"5\r\nhello\r\n0\r\n"), Ok(13));
        assert_eq!(frame(b"A;name=\"v\"\r\n0123456789\r\n0\r\n"), Ok(27));
        assert_eq!(frame(b"3\nabc\n0\n"), Ok(8));
        assert_eq!(frame(b"1 \t;x\r\na\r\n0;last\r\n"), Ok(18));
    }

    #[test]
    fn refuses_what_is_not_chunked_framing() {
        // No digits, a bad digit, data not followed by CRLF, a CR not followed by LF.
        assert_eq!(frame(b"\r\n"), Err(1));
        assert_eq!(frame(b"5g\r\n"), Err(1));
        assert_eq!(frame(b"1\r\nab\r\n"), Err(4));
        assert_eq!(frame(b"1\rx"), Err(2));
        // Control bytes in an extension (HTAB is whitespace, NUL and ESC are not).
        assert_eq!(frame(b"1;a\x00b\r\n"), Err(3));
        assert_eq!(frame(b"1;a\x1b\r\n"), Err(3));
        // A size beyond SIZE_MAX.
        assert_eq!(frame(b"fffffffffffff\r\n"), Err(11));
    }
}
