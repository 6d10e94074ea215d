//! Reading from and rewriting the skb: bounded payload loads and turning a rejected segment
//! into a reset to the backend.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_CSUM_LEVEL_QUERY, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    check_bounds_signed,
    helpers::{
        bpf_csum_diff, bpf_csum_level, bpf_csum_update, bpf_l3_csum_replace, bpf_l4_csum_replace,
        bpf_loop, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use core::ffi::c_void;
use core::ptr::null_mut;
use filter_common::{
    csum,
    packet::{IP_END_MAX, L4_MAX},
    tcp_flags, ConnKey, HdrSlots, SumJob, FAMILY_V4, IPV6_HLEN, LINE_WINDOW, TCP_HLEN_MIN,
};

/// Where the segment being read or rewritten is in the frame.
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
            payload_len: payload_len as usize & IP_END_MAX,
        }
    }
}

/// Shorten the segment to its first `keep` payload bytes: fix the IP length and checksum, and
/// take the removed bytes and the new length out of the TCP checksum (`bpf_l4_csum_replace`
/// applies each change the way the skb's checksum state needs it).
#[inline(always)]
pub fn trim_payload(
    ctx: &TcContext,
    buf: &mut [u8; LINE_WINDOW],
    job: &mut SumJob,
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

    // One's-complement sum of the removed bytes (negated below).
    let Some(diff) = sum_range(
        ctx,
        buf,
        job,
        (hdr.payload + keep) as u32,
        (hdr.payload_len - keep) as u32,
    ) else {
        return false;
    };
    // Negated: the checksum loses these bytes.
    let diff = !fold(diff) as u32 & 0xffff;
    let mut d = diff;
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
    if !set_ip_len(ctx, hdr.family, hdr.l3, hdr.l4, doff + keep) {
        return false;
    }
    // A FIN now comes before bytes the client still has to send: it goes with them.
    tcp[13] & tcp_flags::FIN == 0 || clear_flags(ctx, hdr.l4, &tcp, tcp_flags::FIN)
}

/// Bytes summed per `sum_chunk` call: a multiple of 4 for `bpf_csum_diff`, even (so every chunk
/// starts on a 16-bit word of the range), and at most 512: before 6.13 the helper refuses more
/// (`-EINVAL`: its per-CPU scratch holds 128 words).
const SUM_CHUNK: usize = 512;
/// Chunks a range may have: 64 KiB, a full GSO segment.
const SUM_CHUNKS: u32 = 128;

#[repr(C)]
struct SumCtx {
    skb: *mut __sk_buff,
    buf: *mut [u8; LINE_WINDOW],
    job: *mut SumJob,
}

/// `bpf_loop` callback: add chunk `i` of the job's range to its sum.
unsafe extern "C" fn sum_chunk(i: u64, c: *mut c_void) -> i64 {
    // SAFETY: `c` is the `SumCtx` `sum_range` passed, its pointers valid for the loop.
    let (c, job, buf) = unsafe {
        let c = &*(c as *const SumCtx);
        (c, &mut *c.job, &mut *c.buf)
    };
    let start = i as usize * SUM_CHUNK;
    let len = job.len as usize;
    if start >= len {
        return 1;
    }
    let rest = len - start;
    let n = if rest < SUM_CHUNK { rest } else { SUM_CHUNK };
    let ctx = TcContext::new(c.skb);
    if !load_into(&ctx, job.off as usize + start, buf, n) {
        job.failed = 1;
        return 1;
    }
    // Pad to a multiple of 4 with zeros, which add nothing to the sum.
    buf[n & (LINE_WINDOW - 1)] = 0;
    buf[(n + 1) & (LINE_WINDOW - 1)] = 0;
    buf[(n + 2) & (LINE_WINDOW - 1)] = 0;
    let n4 = ((n + 3) & !3) as i64;
    // verifier: bounded, non-zero size for bpf_csum_diff.
    if !check_bounds_signed(n4, 4, SUM_CHUNK as i64) {
        job.failed = 1;
        return 1;
    }
    // SAFETY: `n4` bytes of `buf`, inside it.
    let r = unsafe {
        bpf_csum_diff(
            null_mut(),
            0,
            buf.as_mut_ptr() as *mut u32,
            n4 as u32,
            job.sum,
        )
    };
    if r < 0 {
        job.failed = 1;
        return 1;
    }
    job.sum = r as u32;
    0
}

/// The one's-complement sum of the frame's `len` bytes from `off` (byte-swapped, as a 16-bit
/// value, when read on a little-endian host: fold it with [`fold`], then swap it to compare
/// with big-endian arithmetic), through `buf`; `None` if a chunk cannot be read or the range is
/// over 64 KiB.
// verifier: one chunk's body verified once, not once per chunk.
#[inline(always)]
pub fn sum_range(
    ctx: &TcContext,
    buf: &mut [u8; LINE_WINDOW],
    job: &mut SumJob,
    off: u32,
    len: u32,
) -> Option<u32> {
    job.off = off;
    job.len = len;
    job.sum = 0;
    job.failed = 0;
    if len as usize > SUM_CHUNKS as usize * SUM_CHUNK {
        return None;
    }
    let mut c = SumCtx {
        skb: ctx.skb.skb,
        buf: buf as *mut _,
        job: job as *mut _,
    };
    // SAFETY: the callback and its context, valid for the call.
    unsafe {
        bpf_loop(
            SUM_CHUNKS,
            sum_chunk as *mut c_void,
            (&mut c as *mut SumCtx).cast(),
            0,
        )
    };
    (job.failed == 0).then_some(job.sum)
}

/// A 32-bit one's-complement sum folded to 16 bits.
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// Rewrite the 16-bit word at TCP header offset `at` (even) from `old` to `new` (values as
/// read, big-endian), the TCP checksum following along: as `bpf_l4_csum_replace` does it for
/// the skb's checksum state (not at all for `CHECKSUM_PARTIAL`, whose field the device or
/// the stack completes later). Both writes leave a `CHECKSUM_COMPLETE` sum as it was: the
/// word and the field change by opposite amounts.
#[inline(always)]
fn rewrite_word(ctx: &TcContext, l4: usize, at: usize, old: u16, new: u16) -> bool {
    let skb = ctx.skb.skb;
    let bytes = new.to_be_bytes();
    // SAFETY: helper calls on this program's skb, with in-frame offsets the helpers check.
    unsafe {
        bpf_l4_csum_replace(
            skb,
            (l4 + 16) as u32,
            u16::from_ne_bytes(old.to_be_bytes()) as u64,
            u16::from_ne_bytes(bytes) as u64,
            2,
        ) >= 0
            && bpf_skb_store_bytes(skb, (l4 + at) as u32, bytes.as_ptr() as *const c_void, 2, 0)
                >= 0
    }
}

/// Clear `flags` in the TCP header at `l4` (`tcp`: its first 20 bytes, as read).
#[inline(always)]
pub fn clear_flags(ctx: &TcContext, l4: usize, tcp: &[u8; TCP_HLEN_MIN], flags: u8) -> bool {
    let old = u16::from_be_bytes([tcp[12], tcp[13]]);
    let new = u16::from_be_bytes([tcp[12], tcp[13] & !flags]);
    old == new || rewrite_word(ctx, l4, 12, old, new)
}

/// Clear the urgent flag and pointer of the TCP header at `l4`: the host's TCP then reads the
/// urgent byte in line, where the filter read it (without this, it takes it out of the stream
/// the application reads).
#[inline(always)]
pub fn clear_urgent(ctx: &TcContext, l4: usize, tcp: &[u8; TCP_HLEN_MIN]) -> bool {
    let ptr = u16::from_be_bytes([tcp[18], tcp[19]]);
    clear_flags(ctx, l4, tcp, tcp_flags::URG) && (ptr == 0 || rewrite_word(ctx, l4, 18, ptr, 0))
}

/// Whether the host's TCP will take the TCP checksum of the segment at `at` as good. It does
/// not look when a device verified it (`CHECKSUM_UNNECESSARY`) or when the checksum is still to
/// be completed (`CHECKSUM_PARTIAL`: a sender on this host, or segments the GRO engine merged
/// after verifying them); otherwise it sums the segment, and so does this.
#[inline(always)]
pub fn checksum_ok(
    ctx: &TcContext,
    buf: &mut [u8; LINE_WINDOW],
    job: &mut SumJob,
    at: &Layout,
    key: &ConnKey,
) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: a query of this program's skb.
    if unsafe { bpf_csum_level(skb, BPF_CSUM_LEVEL_QUERY as u64) } >= 0 {
        return true;
    }
    let tcp_len = at.payload + at.payload_len - at.l4;
    let pseudo = if at.family == FAMILY_V4 {
        // The addresses' first four bytes in place, not copied onto the stack (this runs in
        // the frame of the entry's deepest call chain).
        let (Some(src), Some(dst)) = (
            key.client_addr_be.first_chunk::<4>(),
            key.server_addr_be.first_chunk::<4>(),
        ) else {
            return false;
        };
        csum::pseudo_v4(src, dst, tcp_len as u16)
    } else {
        csum::pseudo_v6(&key.client_addr_be, &key.server_addr_be, tcp_len as u32)
    };
    let Some(field) = csum_field(ctx, buf, at.l4) else {
        return false;
    };
    // A checksum still to be completed holds the pseudo-header's sum.
    if field == fold(pseudo) && is_partial(ctx, buf, at.l4, field) {
        return true;
    }
    let Some(sum) = sum_range(ctx, buf, job, at.l4 as u32, tcp_len as u32) else {
        return false;
    };
    let seg = fold(sum).swap_bytes();
    fold(pseudo + seg as u32) == 0xffff
}

/// Whether the skb's checksum is `CHECKSUM_PARTIAL` (`field`: the TCP checksum field as it is
/// now): `bpf_l4_csum_replace` leaves the field of such an skb alone when not told the change
/// is in the pseudo-header. So change it by one and see; change it back if it moved.
#[inline(always)]
fn is_partial(ctx: &TcContext, buf: &mut [u8; LINE_WINDOW], l4: usize, field: u16) -> bool {
    let skb = ctx.skb.skb;
    let off = (l4 + 16) as u32;
    // SAFETY: helper calls on this program's skb at an in-frame offset.
    if unsafe { bpf_l4_csum_replace(skb, off, 0, 1, 2) } < 0 {
        return false;
    }
    match csum_field(ctx, buf, l4) {
        Some(after) if after == field => true,
        _ => {
            // SAFETY: as above; undoes the change.
            unsafe { bpf_l4_csum_replace(skb, off, 1, 0, 2) };
            false
        }
    }
}

/// The TCP checksum field of the segment whose TCP header is at `l4`, read where the frame
/// holds it; where the header is not in the frame's linear part, copied into `buf` (not onto
/// the stack: the caller's frame is on the entry's deepest call chain).
#[inline(always)]
fn csum_field(ctx: &TcContext, buf: &mut [u8; LINE_WINDOW], l4: usize) -> Option<u16> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let at = start + l4 + 16;
    if at + 2 <= end {
        // SAFETY: two bytes inside the packet, as just checked (the verifier checks it
        // again); `[u8; 2]` has alignment 1, and nothing writes the packet meanwhile.
        return Some(u16::from_be_bytes(unsafe { *(at as *const [u8; 2]) }));
    }
    load_into(ctx, l4 + 16, buf, 2).then(|| u16::from_be_bytes([buf[0], buf[1]]))
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
