//! Reading from and rewriting the skb: bounded payload loads and turning a rejected segment
//! into a reset to the backend.

use aya_ebpf::{
    bindings::BPF_F_RECOMPUTE_CSUM,
    check_bounds_signed,
    helpers::{bpf_l3_csum_replace, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use core::ffi::c_void;
use filter_common::{csum, tcp_flags, ETH_HLEN, FAMILY_V4, IPV6_HLEN, TCP_HLEN_MIN};

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

/// Where the headers of the segment being rewritten are.
pub struct Segment<'a> {
    pub family: u8,
    /// Offset of the TCP header from the start of the frame.
    pub l4: usize,
    /// The first 20 bytes of the TCP header as received.
    pub tcp: &'a [u8; TCP_HLEN_MIN],
    pub client: &'a [u8; 16],
    pub server: &'a [u8; 16],
}

/// Rewrite the segment in place into `RST|ACK` with the same sequence number and no payload
/// or options, with correct lengths and checksums. The backend's `rcv_nxt` is exactly that
/// sequence number (the rejected bytes never reach it), so Linux accepts it (RFC 5961).
#[inline(always)]
pub fn turn_into_reset(ctx: &TcContext, seg: &Segment) -> bool {
    let skb = ctx.skb.skb;
    let mut h = *seg.tcp;
    h[12] = ((TCP_HLEN_MIN / 4) as u8) << 4;
    h[13] = tcp_flags::RST | tcp_flags::ACK;
    h[14] = 0; // window
    h[15] = 0;
    h[16] = 0; // checksum
    h[17] = 0;
    h[18] = 0; // urgent pointer
    h[19] = 0;

    if unsafe { bpf_skb_change_tail(skb, (seg.l4 + TCP_HLEN_MIN) as u32, 0) } < 0 {
        return false;
    }
    let pseudo = if seg.family == FAMILY_V4 {
        let Ok(old) = ctx.load::<[u8; 2]>(ETH_HLEN + 2) else {
            return false;
        };
        let new = ((seg.l4 - ETH_HLEN + TCP_HLEN_MIN) as u16).to_be_bytes();
        // tot_len and the header checksum change together: the header still sums to 0xffff,
        // so skb->csum (CHECKSUM_COMPLETE) needs no update for these two writes.
        let ok = unsafe {
            bpf_skb_store_bytes(
                skb,
                (ETH_HLEN + 2) as u32,
                new.as_ptr() as *const c_void,
                2,
                0,
            ) >= 0
                && bpf_l3_csum_replace(
                    skb,
                    (ETH_HLEN + 10) as u32,
                    u16::from_ne_bytes(old) as u64,
                    u16::from_ne_bytes(new) as u64,
                    2,
                ) >= 0
        };
        if !ok {
            return false;
        }
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        src.copy_from_slice(&seg.client[..4]);
        dst.copy_from_slice(&seg.server[..4]);
        csum::pseudo_v4(&src, &dst, TCP_HLEN_MIN as u16)
    } else {
        let new = ((seg.l4 - ETH_HLEN - IPV6_HLEN + TCP_HLEN_MIN) as u16).to_be_bytes();
        let r = unsafe {
            bpf_skb_store_bytes(
                skb,
                (ETH_HLEN + 4) as u32,
                new.as_ptr() as *const c_void,
                2,
                BPF_F_RECOMPUTE_CSUM as u64,
            )
        };
        if r < 0 {
            return false;
        }
        csum::pseudo_v6(seg.client, seg.server, TCP_HLEN_MIN as u32)
    };
    let c = csum::finish(csum::add(pseudo, &h)).to_be_bytes();
    h[16] = c[0];
    h[17] = c[1];
    unsafe {
        bpf_skb_store_bytes(
            skb,
            seg.l4 as u32,
            h.as_ptr() as *const c_void,
            TCP_HLEN_MIN as u32,
            BPF_F_RECOMPUTE_CSUM as u64,
        ) >= 0
    }
}
