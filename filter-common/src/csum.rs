//! The Internet checksum (RFC 1071) for the TCP segments the filter writes: the reset the
//! kernel turns a rejected segment into, and the response the responder forges.

/// Add big-endian 16-bit words of `bytes` to a running 32-bit sum (odd tail padded with zero).
#[inline(always)]
pub fn add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum = sum.wrapping_add(u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32);
        i += 2;
    }
    if i < bytes.len() {
        sum = sum.wrapping_add((bytes[i] as u32) << 8);
    }
    sum
}

/// Fold a running sum and complement it: the value to store in a checksum field.
#[inline(always)]
pub fn finish(mut sum: u32) -> u16 {
    // Two folds suffice for any sum of fewer than 2^16 words.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Sum of the TCP pseudo-header for IPv4 (RFC 9293 §3.1).
#[inline(always)]
pub fn pseudo_v4(src: &[u8; 4], dst: &[u8; 4], tcp_len: u16) -> u32 {
    let s = add(add(0, src), dst);
    s.wrapping_add(crate::IPPROTO_TCP as u32)
        .wrapping_add(tcp_len as u32)
}

/// Sum of the TCP pseudo-header for IPv6 (RFC 8200 §8.1).
#[inline(always)]
pub fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], tcp_len: u32) -> u32 {
    let s = add(add(0, src), dst);
    s.wrapping_add(tcp_len >> 16)
        .wrapping_add(tcp_len & 0xffff)
        .wrapping_add(crate::IPPROTO_TCP as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: 0x0001 f203 f4f5 f6f7 sums to 0xddf2 (checksum 0x220d).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(finish(add(0, &data)), !0xddf2u16);
    }

    #[test]
    fn a_header_with_its_checksum_sums_to_all_ones() {
        // A real IPv4 header (from a capture) whose checksum field is 0xb861.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(finish(add(0, &hdr)), 0);
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(finish(add(0, &zeroed)), 0xb861);
    }

    #[test]
    fn odd_lengths_pad_with_zero() {
        assert_eq!(add(0, &[0x12]), 0x1200);
        assert_eq!(add(0, &[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }
}
