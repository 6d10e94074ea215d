//! Small helpers both classifiers use: counters, byte order, sequence space, the port bitmap,
//! packet reads and word copies.

use aya_ebpf::programs::TcContext;
use core::ptr::{addr_of, read_unaligned, read_volatile, write_unaligned};
use filter_common::Reason;

use crate::maps::{FILTER_CONFIG, STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = STATS.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn be16(a: u8, b: u8) -> u16 {
    u16::from_be_bytes([a, b])
}

#[inline(always)]
pub fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// `a` is after `b` in sequence space.
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[inline(always)]
pub fn port_inspected(port: u16) -> bool {
    let cfg = addr_of!(FILTER_CONFIG);
    // Read through a volatile pointer: the loader rewrites this read-only global, so the
    // compiler must not fold the zeroed initialiser.
    let word = unsafe {
        read_volatile(
            addr_of!((*cfg).ports)
                .cast::<u64>()
                .add((port >> 6) as usize),
        )
    };
    word & (1u64 << (port & 63)) != 0
}

/// `size_of::<T>()` bytes of the frame at `off`: read in place when they are in the skb's
/// linear data (a bounds check and plain loads), else copied out with `bpf_skb_load_bytes`
/// (a helper call, several times the cost of the whole early exit).
#[inline(always)]
pub fn peek<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() <= end {
        // SAFETY: the bytes are inside the packet, as just checked (the verifier checks it
        // again).
        return Ok(unsafe { read_unaligned((start + off) as *const T) });
    }
    ctx.load(off).map_err(|_| ())
}

/// Copy a map-resident struct word by word (a plain assignment becomes a byte-wise memcpy
/// loop in BPF, which the verifier walks byte by byte).
#[inline(always)]
pub fn copy_words<T: Copy>(dst: &mut T, src: &T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0) };
    let d = (dst as *mut T).cast::<u64>();
    let s = (src as *const T).cast::<u64>();
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        unsafe { write_unaligned(d.add(i), read_unaligned(s.add(i))) };
        i += 1;
    }
}
