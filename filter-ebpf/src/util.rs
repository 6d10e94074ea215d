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

/// The eight bytes at `base + at` (little-endian), at any alignment, in one load. The caller
/// bounds `at` so that all eight are inside `base`'s buffer, a map value (the scratch): the
/// verifier wants stack accesses aligned everywhere. The kernels this runs on have efficient
/// unaligned access (x86-64, arm64), where the verifier checks a map value access's bounds,
/// not its alignment; but LLVM does not know the kernel and splits a misaligned
/// `read_unaligned` into eight byte loads, so the one load is spelled out.
#[inline(always)]
pub fn word_at(base: *const u8, at: usize) -> u64 {
    let v: u64;
    // SAFETY: a load inside the map value, as the caller bounds `at`; no other effect.
    unsafe {
        core::arch::asm!(
            "{v} = *(u64 *)({p} + 0)",
            p = in(reg) base.add(at),
            v = lateout(reg) v,
            options(readonly, nostack, preserves_flags)
        )
    };
    v
}

/// The four bytes at `p` (little-endian), at any alignment, in one load (see [`word_at`]):
/// packet data, whose end the caller has checked `p + 4` against. The kernels this runs on
/// check a packet load's alignment only when the program asks for strict alignment.
#[inline(always)]
pub fn u32_at(p: usize) -> u32 {
    let v: u32;
    // SAFETY: a load inside the packet, as the caller checked (the verifier checks it again);
    // no other effect.
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({p} + 0)",
            p = in(reg) p,
            v = lateout(reg) v,
            options(readonly, nostack, preserves_flags)
        )
    };
    v
}

/// Store the eight bytes of `v` (little-endian) at `p`, at any alignment, in one store (see
/// [`word_at`]).
///
/// # Safety
/// `p..p + 8` inside one map value, bounded so the verifier sees it.
#[inline(always)]
pub unsafe fn store_any(p: *mut u8, v: u64) {
    // SAFETY: the caller's bounds.
    unsafe {
        core::arch::asm!(
            "*(u64 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) v,
            options(nostack, preserves_flags)
        )
    };
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
