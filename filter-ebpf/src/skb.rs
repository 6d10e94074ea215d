//! Reading from and rewriting the skb: bounded payload loads and turning a rejected segment
//! into a reset to the backend.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    check_bounds_signed,
    helpers::{
        bpf_csum_diff, bpf_csum_update, bpf_l3_csum_replace, bpf_l4_csum_replace,
        bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use core::ffi::c_void;
use core::ptr::null_mut;
use filter_common::{
    csum, packet::L4_MAX, tcp_flags, HdrSlots, FAMILY_V4, IPV6_HLEN, LINE_WINDOW, TCP_HLEN_MIN,
};

/// Where the segment being rewritten is in the frame.
pub struct Layout {
    pub family: u8,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// Offset of the TCP payload, and its length.
    pub payload: usize,
    pub payload_len: usize,
}

impl Layout {
    /// From the parked header offsets (`frame::parked`) and the payload's place, bounded.
    #[inline(always)]
    pub fn new(hdr: &HdrSlots, payload_off: u32, payload_len: u32) -> Layout {
        Layout {
            family: hdr.family as u8,
            l3: hdr.l3 as usize,
            l4: hdr.l4 as usize,
            // verifier: the TCP header's offset plus at most 60 bytes of it.
            payload: payload_off as usize & (2 * L4_MAX + 1),
            payload_len: payload_len as usize & 0x1ffff,
        }
    }
}

/// Bytes summed per step when cutting a segment (a multiple of 4 for `bpf_csum_diff`, with
/// room for padding in the 1 KiB window).
const CUT_CHUNK: usize = 1020;
/// Steps: a segment is cut by at most this many chunks (64 KiB, a full GSO segment).
const CUT_CHUNKS: usize = 65;

/// Shorten the segment to its first `keep` payload bytes: fix the IP length and checksum, and
/// take the removed bytes and the new length out of the TCP checksum (`bpf_l4_csum_replace`
/// applies each change the way the skb's checksum state needs it).
#[inline(always)]
pub fn trim_payload(
    ctx: &TcContext,
    buf: &mut [u8; LINE_WINDOW],
    hdr: &Layout,
    keep: usize,
) -> bool {
    let skb = ctx.skb.skb;
    if keep >= hdr.payload_len {
        return true;
    }
    let Ok(tcp) = ctx.load::<[u8; TCP_HLEN_MIN]>(hdr.l4) else {
        return false;
    };
    let doff = ((tcp[12] >> 4) as usize) * 4;
    let csum_off = (hdr.l4 + 16) as u32;
    let Ok(old_field) = ctx.load::<[u8; 2]>(hdr.l4 + 16) else {
        return false;
    };

    // One's-complement sum of the removed bytes, negated (bpf_csum_diff with only `from`).
    let mut diff: u32 = 0;
    let mut i = 0;
    while i < CUT_CHUNKS {
        let start = keep + i * CUT_CHUNK;
        if start >= hdr.payload_len {
            break;
        }
        let rest = hdr.payload_len - start;
        let n = if rest < CUT_CHUNK { rest } else { CUT_CHUNK };
        if !load_into(ctx, hdr.payload + start, buf, n) {
            return false;
        }
        // Pad to a multiple of 4 with zeros, which add nothing to the sum.
        buf[n & (LINE_WINDOW - 1)] = 0;
        buf[(n + 1) & (LINE_WINDOW - 1)] = 0;
        buf[(n + 2) & (LINE_WINDOW - 1)] = 0;
        let n4 = ((n + 3) & !3) as i64;
        // verifier: bounded, non-zero size for bpf_csum_diff.
        if !check_bounds_signed(n4, 4, (CUT_CHUNK + 4) as i64) {
            return false;
        }
        let r =
            unsafe { bpf_csum_diff(buf.as_mut_ptr() as *mut u32, n4 as u32, null_mut(), 0, diff) };
        if r < 0 {
            return false;
        }
        diff = r as u32;
        i += 1;
    }
    if keep + CUT_CHUNKS * CUT_CHUNK < hdr.payload_len {
        return false;
    }
    let mut d = (diff & 0xffff) + (diff >> 16);
    d = (d & 0xffff) + (d >> 16);
    // The removed bytes start at an odd offset of the TCP segment: their 16-bit words are
    // byte-swapped relative to the checksum's.
    if (doff + keep) & 1 == 1 {
        d = ((d & 0xff) << 8) | (d >> 8);
    }
    let old_len = ((doff + hdr.payload_len) as u16).to_be_bytes();
    let new_len = ((doff + keep) as u16).to_be_bytes();
    let ok = unsafe {
        bpf_skb_change_tail(skb, (hdr.payload + keep) as u32, 0) >= 0
            && bpf_l4_csum_replace(skb, csum_off, 0, d as u64, 0) >= 0
            && bpf_l4_csum_replace(
                skb,
                csum_off,
                u16::from_ne_bytes(old_len) as u64,
                u16::from_ne_bytes(new_len) as u64,
                (BPF_F_PSEUDO_HDR | 2) as u64,
            ) >= 0
    };
    if !ok {
        return false;
    }
    // CHECKSUM_COMPLETE: skb->csum covers the checksum field, which the payload change moved.
    if let Ok(new_field) = ctx.load::<[u8; 2]>(hdr.l4 + 16) {
        let mut from = [0u8; 4];
        let mut to = [0u8; 4];
        from[..2].copy_from_slice(&old_field);
        to[..2].copy_from_slice(&new_field);
        let delta = unsafe {
            bpf_csum_diff(
                from.as_mut_ptr() as *mut u32,
                4,
                to.as_mut_ptr() as *mut u32,
                4,
                0,
            )
        };
        if delta >= 0 {
            // Fails (harmlessly) unless the skb is CHECKSUM_COMPLETE.
            unsafe { bpf_csum_update(skb, delta as u32) };
        }
    }
    set_ip_len(ctx, hdr.family, hdr.l3, hdr.l4, doff + keep)
}

/// Write the IP length (IP header at `l3`) for a TCP segment of `tcp_len` bytes at `l4`.
#[inline(always)]
fn set_ip_len(ctx: &TcContext, family: u8, l3: usize, l4: usize, tcp_len: usize) -> bool {
    let skb = ctx.skb.skb;
    if family == FAMILY_V4 {
        let Ok(old) = ctx.load::<[u8; 2]>(l3 + 2) else {
            return false;
        };
        let new = ((l4 - l3 + tcp_len) as u16).to_be_bytes();
        // tot_len and the header checksum change together: the header still sums to 0xffff,
        // so skb->csum (CHECKSUM_COMPLETE) needs no update for these two writes.
        unsafe {
            bpf_skb_store_bytes(skb, (l3 + 2) as u32, new.as_ptr() as *const c_void, 2, 0) >= 0
                && bpf_l3_csum_replace(
                    skb,
                    (l3 + 10) as u32,
                    u16::from_ne_bytes(old) as u64,
                    u16::from_ne_bytes(new) as u64,
                    2,
                ) >= 0
        }
    } else {
        let new = ((l4 - l3 - IPV6_HLEN + tcp_len) as u16).to_be_bytes();
        unsafe {
            bpf_skb_store_bytes(
                skb,
                (l3 + 4) as u32,
                new.as_ptr() as *const c_void,
                2,
                BPF_F_RECOMPUTE_CSUM as u64,
            ) >= 0
        }
    }
}

/// Copy `len` bytes at `off` into `dst`, for `1 <= len <= N`.
#[inline(always)]
pub fn load_into<const N: usize>(
    ctx: &TcContext,
    off: usize,
    dst: &mut [u8; N],
    len: usize,
) -> bool {
    let len = len as i64;
    // verifier: bpf_skb_load_bytes needs a provably non-zero, bounded length (aya #1207).
    if !check_bounds_signed(len, 1, N as i64) {
        return false;
    }
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            off as u32,
            dst.as_mut_ptr() as *mut c_void,
            len as u32,
        )
    };
    r >= 0
}

/// What the reset is made of, besides the segment's place ([`Layout`]).
pub struct Reset<'a> {
    /// Sequence number the reset carries: the backend's next expected byte.
    pub seq: u32,
    /// The first 20 bytes of the TCP header as received.
    pub tcp: &'a [u8; TCP_HLEN_MIN],
    pub client: &'a [u8; 16],
    pub server: &'a [u8; 16],
}

/// Rewrite the segment in place into `RST|ACK` with the same sequence number and no payload
/// or options, with correct lengths and checksums. The backend's `rcv_nxt` is exactly that
/// sequence number (the rejected bytes never reach it), so Linux accepts it (RFC 5961).
#[inline(always)]
pub fn turn_into_reset(ctx: &TcContext, at: &Layout, seg: &Reset) -> bool {
    let skb = ctx.skb.skb;
    let mut h = *seg.tcp;
    h[4..8].copy_from_slice(&seg.seq.to_be_bytes());
    h[12] = ((TCP_HLEN_MIN / 4) as u8) << 4;
    h[13] = tcp_flags::RST | tcp_flags::ACK;
    h[14] = 0; // window
    h[15] = 0;
    h[16] = 0; // checksum
    h[17] = 0;
    h[18] = 0; // urgent pointer
    h[19] = 0;

    if unsafe { bpf_skb_change_tail(skb, (at.l4 + TCP_HLEN_MIN) as u32, 0) } < 0 {
        return false;
    }
    if !set_ip_len(ctx, at.family, at.l3, at.l4, TCP_HLEN_MIN) {
        return false;
    }
    let pseudo = if at.family == FAMILY_V4 {
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        src.copy_from_slice(&seg.client[..4]);
        dst.copy_from_slice(&seg.server[..4]);
        csum::pseudo_v4(&src, &dst, TCP_HLEN_MIN as u16)
    } else {
        csum::pseudo_v6(seg.client, seg.server, TCP_HLEN_MIN as u32)
    };
    let c = csum::finish(csum::add(pseudo, &h)).to_be_bytes();
    h[16] = c[0];
    h[17] = c[1];
    unsafe {
        bpf_skb_store_bytes(
            skb,
            at.l4 as u32,
            h.as_ptr() as *const c_void,
            TCP_HLEN_MIN as u32,
            BPF_F_RECOMPUTE_CSUM as u64,
        ) >= 0
    }
}
