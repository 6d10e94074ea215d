//! The skb as a `filter_common::packet::Frame`, and the header walk both classifiers start
//! with.

use aya_ebpf::programs::TcContext;
use core::ptr::{addr_of, addr_of_mut, read_unaligned, read_volatile, write_volatile};
use filter_common::{
    packet::{self, Dir, Frame, Segment, IP_END_MAX, L3_MAX, L4_MAX},
    HdrSlots, Reason,
};

use crate::util::{port_inspected, u32_at};

/// A frame read from the skb: in place where the bytes are in its linear data (a bounds check
/// and plain loads), else copied out with `bpf_skb_load_bytes` (a helper call, several times
/// the cost of an in-place read).
pub struct Skb<'a>(pub &'a TcContext);

impl Frame for Skb<'_> {
    // verifier: a read of its own, not `view` with a copying closure: written that way, 6.1
    // refused `http_egress` (the helper's length no longer proven non-negative).
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let (start, end) = (self.0.data(), self.0.data_end());
        if start + off + N <= end {
            // SAFETY: the `N` bytes are inside the packet, as just checked (the verifier checks
            // it again).
            return Some(unsafe { read_unaligned((start + off) as *const [u8; N]) });
        }
        self.0.load(off).ok()
    }

    #[inline(always)]
    fn view<const N: usize, R>(&self, off: usize, f: impl FnOnce(&[u8; N]) -> R) -> Option<R> {
        let (start, end) = (self.0.data(), self.0.data_end());
        if start + off + N <= end {
            // SAFETY: the `N` bytes are inside the packet, as just checked (the verifier checks
            // it again); `[u8; N]` has alignment 1, and the packet is not written while `f`
            // reads it.
            return Some(f(unsafe { &*((start + off) as *const [u8; N]) }));
        }
        self.0.load::<[u8; N]>(off).ok().map(|b| f(&b))
    }

    // A load per word (`util::u32_at`): the IPv4 header's checksum, on every segment of an
    // inspected port in both directions.
    #[inline(always)]
    fn word_sum<const N: usize>(&self, off: usize) -> Option<u64> {
        let (start, end) = (self.0.data(), self.0.data_end());
        if start + off + N <= end {
            let mut sum = 0u64;
            let mut i = 0;
            while i < N / 4 {
                sum += u32_at(start + off + 4 * i) as u64;
                i += 1;
            }
            return Some(sum);
        }
        self.0
            .load::<[u8; N]>(off)
            .ok()
            .map(|b| packet::le_word_sum(&b))
    }

    // One bounds check, then a load per word (`util::u32_at`): the quick port check on every
    // packet of the interface.
    #[inline(always)]
    fn le_words<const N: usize>(&self, within: usize, offs: [usize; N]) -> Option<[u32; N]> {
        let (start, end) = (self.0.data(), self.0.data_end());
        if start + within > end {
            return None;
        }
        let mut out = [0u32; N];
        let mut i = 0;
        while i < N {
            out[i] = u32_at(start + offs[i]);
            i += 1;
        }
        Some(out)
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.0.len() as usize
    }

    #[inline(always)]
    fn offloaded_vlan(&self) -> Option<u16> {
        let skb = self.0.skb.skb;
        // SAFETY: `skb` is the program's context, valid for the whole run.
        unsafe { ((*skb).vlan_present != 0).then(|| (*skb).vlan_tci as u16) }
    }
}

/// Walk the frame to the TCP header of a segment for an inspected port (`dir` says which).
#[inline(always)]
pub fn headers(ctx: &TcContext, dir: Dir) -> Result<Segment, Reason> {
    packet::parse(&Skb(ctx), dir, port_inspected)
}

/// Whether the frame is, beyond doubt, TCP for a port that is not inspected (`dir` says
/// which): the commonest frames, from four word loads before the walk (`packet::other_port`).
#[inline(always)]
pub fn other_port(ctx: &TcContext, dir: Dir) -> bool {
    packet::other_port(&Skb(ctx), dir, port_inspected)
}

/// Park `seg`'s offsets in map memory and read them back, bounded: whatever layout the header
/// walk took, the rest of the program continues from one state.
// verifier: one state after the walk instead of one per layout (VLAN tags, IPv4 options, each
// IPv6 extension-header chain).
#[inline(always)]
pub fn park(slots: &mut HdrSlots, seg: &Segment) -> HdrSlots {
    // SAFETY: plain stores and loads of fields of a valid `&mut`; volatile so the compiler
    // keeps the round trip through map memory.
    unsafe {
        write_volatile(addr_of_mut!(slots.l3), seg.l3 as u32);
        write_volatile(addr_of_mut!(slots.l4), seg.l4 as u32);
        write_volatile(addr_of_mut!(slots.ip_end), seg.ip_end as u32);
        write_volatile(addr_of_mut!(slots.family), seg.family as u32);
    }
    parked(slots)
}

/// The offsets [`park`] left, bounded for the verifier (a later stage reads them this way).
#[inline(always)]
pub fn parked(slots: &HdrSlots) -> HdrSlots {
    // SAFETY: plain loads of fields of a valid reference.
    unsafe {
        HdrSlots {
            l3: read_volatile(addr_of!(slots.l3)) & L3_MAX as u32,
            l4: read_volatile(addr_of!(slots.l4)) & L4_MAX as u32,
            ip_end: read_volatile(addr_of!(slots.ip_end)) & IP_END_MAX as u32,
            family: read_volatile(addr_of!(slots.family)) & 0xff,
        }
    }
}
