//! Small helpers both classifiers use: counters, byte order, sequence space, the port bitmap,
//! packet reads and word copies.

use aya_ebpf::programs::TcContext;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use filter_common::{
    packet::{Dir, Frame},
    ConnKey, HdrSlots, Reason, FAMILY_V4,
};

use crate::frame::Skb;
use crate::maps::{FILTER_CONFIG, STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = STATS.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
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

/// An IPv4 connection's addresses in its key, the rest of both 16-byte fields zero. Word
/// stores of their own: merged, the zeroing becomes a byte-loop memset in BPF.
#[inline(always)]
pub fn key_v4(key: &mut ConnKey, client: [u8; 4], server: [u8; 4]) {
    let k = addr_of_mut!(*key).cast::<u64>();
    let c = u64::from_ne_bytes([client[0], client[1], client[2], client[3], 0, 0, 0, 0]);
    let v = u64::from_ne_bytes([server[0], server[1], server[2], server[3], 0, 0, 0, 0]);
    unsafe {
        write_volatile(k, c);
        write_volatile(k.add(1), 0);
        write_volatile(k.add(2), v);
        write_volatile(k.add(3), 0);
    }
}

/// The key's last word (ports, family, zero padding) as one store.
#[inline(always)]
pub fn key_tail(key: &mut ConnKey, client_port: u16, server_port: u16, family: u8) {
    let (c, s) = (client_port.to_ne_bytes(), server_port.to_ne_bytes());
    let tail = u64::from_ne_bytes([c[0], c[1], s[0], s[1], family, 0, 0, 0]);
    unsafe { write_volatile(addr_of_mut!(*key).cast::<u64>().add(4), tail) };
}

/// The connection's key (from the client's side, whichever way the frame goes) from the
/// parked header offsets and the TCP ports. `Err` if the addresses cannot be read (they
/// were, by the header walk: it does not happen).
#[inline(always)]
pub fn conn_key(
    ctx: &TcContext,
    key: &mut ConnKey,
    hdr: &HdrSlots,
    dir: Dir,
    sport: u16,
    dport: u16,
) -> Result<(), ()> {
    let frame = Skb(ctx);
    let (client_port, server_port) = match dir {
        Dir::ToServer => (sport, dport),
        Dir::FromServer => (dport, sport),
    };
    if hdr.family as u8 == FAMILY_V4 {
        let a = frame.bytes::<8>(hdr.l3 as usize + 12).ok_or(())?;
        let (src, dst) = ([a[0], a[1], a[2], a[3]], [a[4], a[5], a[6], a[7]]);
        match dir {
            Dir::ToServer => key_v4(key, src, dst),
            Dir::FromServer => key_v4(key, dst, src),
        }
    } else {
        // The frame's source address, then its destination, copied byte by byte.
        let (src, dst) = match dir {
            Dir::ToServer => (&mut key.client_addr_be, &mut key.server_addr_be),
            Dir::FromServer => (&mut key.server_addr_be, &mut key.client_addr_be),
        };
        frame
            .view::<32, _>(hdr.l3 as usize + 8, |a| {
                src.copy_from_slice(&a[..16]);
                dst.copy_from_slice(&a[16..]);
            })
            .ok_or(())?;
    }
    key_tail(key, client_port, server_port, hdr.family as u8);
    Ok(())
}

// `key_v4` and `key_tail` write the key as five words (little-endian): addresses, then
// ports, family, padding; 8-aligned wherever it is embedded.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(ConnKey, client_addr_be) == 0);
    assert!(offset_of!(ConnKey, server_addr_be) == 16);
    assert!(offset_of!(ConnKey, client_port) == 32);
    assert!(offset_of!(ConnKey, server_port) == 34);
    assert!(offset_of!(ConnKey, family) == 36);
    assert!(core::mem::size_of::<ConnKey>() == 40);
    assert!(core::mem::align_of::<ConnKey>() >= 8);
};

/// The eight bytes from `base + at` as a little-endian word, from aligned loads (an unaligned
/// load is eight byte loads in BPF). `base` must be 8-aligned, and the aligned word after the
/// one holding `at` readable when `at` is not a multiple of 8.
#[inline(always)]
pub fn word_at(base: *const u8, at: usize) -> u64 {
    let a = at & !7;
    let r = (at & 7) * 8;
    let lo = u64::from_le(unsafe { base.add(a).cast::<u64>().read() });
    if r == 0 {
        return lo;
    }
    let hi = u64::from_le(unsafe { base.add(a + 8).cast::<u64>().read() });
    (lo >> r) | (hi << (64 - r))
}

/// The eight bytes at `a + r / 8` (little-endian), `a` an 8-aligned offset of `base` (itself
/// 8-aligned) with two aligned words readable there, `r` in `0, 8, .., 56`: the end of one
/// aligned word and the start of the next, shifted together without a branch, for a loop over
/// consecutive words at one misalignment (`word_at` branches on it). A shift by 64 is not
/// defined: `hi << 1 << (63 - r)` is 0 for `r == 0`.
#[inline(always)]
pub fn word_across(base: *const u8, a: usize, r: u32) -> u64 {
    // SAFETY: `a` and `a + 8` are 8-aligned offsets of `base` with eight bytes each inside
    // its buffer, as the caller bounds them.
    let (lo, hi) = unsafe {
        (
            u64::from_le(base.add(a).cast::<u64>().read()),
            u64::from_le(base.add(a + 8).cast::<u64>().read()),
        )
    };
    (lo >> r) | ((hi << 1) << (63 - r))
}

/// Copy a map-resident struct word by word (a plain assignment becomes a byte-wise memcpy
/// loop in BPF, which the verifier walks byte by byte). The struct must be 8-aligned: these
/// are aligned word loads and stores (an unaligned one is eight byte loads or stores in BPF).
#[inline(always)]
pub fn copy_words<T: Copy>(dst: &mut T, src: &T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8)) };
    const { assert!(core::mem::align_of::<T>() >= 8) };
    let d = (dst as *mut T).cast::<u64>();
    let s = (src as *const T).cast::<u64>();
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: both point to a whole `T`, 8-aligned (checked above), `size_of::<T>() / 8`
        // words long.
        unsafe { d.add(i).write(s.add(i).read()) };
        i += 1;
    }
}
