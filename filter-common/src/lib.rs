//! The kernel/user contract of the HTTP method firewall, and the pure logic both sides share.
//!
//! This crate is the only place the kernel program (`filter-ebpf`) and the daemon
//! (`filter-userspace`) agree on anything: map names, key and value layouts, the event the
//! kernel sends the responder, verdict reasons and counter indices, the method table, the
//! request-line parser, the keyed path hash and the Internet checksum.
//!
//! It is `#![no_std]`, allocation-free and panic-free on every path the kernel uses: loops have
//! constant bounds, indexing is masked or checked. It must not depend on aya-ebpf, tokio or
//! anything that assumes an operating system.
#![no_std]

#[cfg(test)]
extern crate std;

/// A deterministic xorshift64 generator for the host tests' sweeps.
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

pub mod canon;
pub mod chunk;
pub mod csum;
pub mod hash;
pub mod http;
pub mod maps;
pub mod method;
pub mod packet;
pub mod reason;
pub mod reply;
pub mod stream;
pub mod swar;
pub mod tcp;
pub mod token;

pub use maps::*;
pub use method::{Method, MethodSet};
pub use reason::{Reason, REASON_COUNT};

/// `*dst = v` as a store of its own. Fields zeroed one after the other are otherwise merged by
/// the compiler into a `memset` call, which BPF runs as a byte loop (tens of iterations per
/// request on the kernel's hot path); a volatile store is never merged. Same effect as the
/// assignment.
#[inline(always)]
pub(crate) fn put<T: Copy>(dst: &mut T, v: T) {
    // SAFETY: `dst` is a valid, aligned, exclusive reference.
    unsafe { core::ptr::write_volatile(dst, v) }
}

/// [`REASON_COUNT`] as the map size type.
pub const REASON_COUNT_U32: u32 = REASON_COUNT as u32;

/// Bytes of TCP payload the kernel inspects for a request line (a per-CPU scratch buffer).
pub const LINE_WINDOW: usize = 1024;
/// Longest path (after the target's scheme and authority are removed) the filter can decide on.
/// A power of two: indices into the path buffer are masked with `PATH_MAX - 1`.
pub const PATH_MAX: usize = 1024;
/// Request-line bytes copied into a [`RejectEvent`] for the responder and the logs.
pub const EVENT_LINE_MAX: usize = 256;

/// EtherType values, host byte order.
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad service tag (QinQ outer tag).
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN_MIN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN_MIN: usize = 20;

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}
