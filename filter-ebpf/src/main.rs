//! The kernel half of the HTTP method firewall: a TC ingress classifier, and a TC egress
//! classifier that follows the server's responses for it.
//!
//! It owns the per-packet decision and nothing else: parse Ethernet/IPv4/IPv6/TCP, read the
//! HTTP/1.x request line at the start of the payload, look the path up in the policy map, and
//! either let the segment through or turn it into a reset to the backend and tell the
//! responder. All parsing and matching logic lives in `filter-common`, shared with the host
//! build where it is unit-tested; this crate only glues it to the skb and the maps.
//! It must not log per packet, allocate, or hold policy of its own.
#![no_std]
#![no_main]

mod egress;
mod ingress;
mod maps;
mod skb;
mod util;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Ingress classifier, attached to every configured interface.
#[classifier]
pub fn http_ingress(ctx: TcContext) -> i32 {
    ingress::run(&ctx)
}

/// Egress classifier, attached to the same interfaces: frames the server's responses for the
/// ingress side (the `replies` half of each `CONNS` entry); never changes a packet.
#[classifier]
pub fn http_egress(ctx: TcContext) -> i32 {
    egress::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
