//! The kernel half of the HTTP method firewall: a TC ingress classifier, and a TC egress
//! classifier that follows the server's responses for it.
//!
//! It owns the per-packet decision and nothing else: parse Ethernet/IPv4/IPv6/TCP, follow the
//! client's HTTP/1.x byte stream, look each request's path up in the policy map, and either let
//! the segment through or turn it into a reset to the backend and tell the responder. All
//! parsing and matching logic lives in `filter-common`, shared with the host build where it is
//! unit-tested; this crate only glues it to the skb and the maps.
//!
//! Each classifier is a chain of stages, each a program of its own joined by tail calls
//! (`STAGES`, indexed by `filter_common::stage`), so the verifier checks each stage on its own
//! and their costs add up instead of multiplying:
//!
//! * `http_ingress` (entry): headers, the connection's place in its stream, the cheap verdicts
//!   (other ports, retransmissions, body bytes); then `ingress_parse`'s work, in this program
//!   (`ingress::parse::in_entry`): a segment read to its end with nothing else to do is saved
//!   and passed here, without a tail call; → `ingress_canon`, or `ingress_finish` for
//!   anything to apply (and for a segment refused outright);
//! * `ingress_parse`: the new bytes through the stream parser, and each request judged as its
//!   path completes (hash, rule lookup, verdict), where the entry's reading left them for
//!   `ingress_canon`; → `ingress_canon` for a path that is not plain, → `ingress_finish` at
//!   the end;
//! * `ingress_canon`: such a path canonicalized (and, in `paths = "normalize"`, its other
//!   readings looked up); → `ingress_parse`, or `ingress_finish` to refuse one that
//!   backends read differently, or (`paths = "strict"`) one not in normal form;
//! * `ingress_finish`: the segment's verdict applied and the stream state saved;
//! * `http_egress` (entry) → `egress_frame`: the server's responses framed.
//!
//! It must not log per packet (`diag` logs cold paths only, and only when asked), allocate,
//! or hold policy of its own.
#![no_std]
#![no_main]
// `util::word_at` / `store_any`: one BPF load or store at any alignment.
#![feature(asm_experimental_arch)]
// Map keys are passed by reference on purpose: by value, a 40-byte `ConnKey` is copied onto
// the 512-byte stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

mod diag;
mod egress;
mod frame;
mod ingress;
mod maps;
mod skb;
mod tcp;
mod util;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Ingress classifier, attached to every configured interface.
#[classifier]
pub fn http_ingress(ctx: TcContext) -> i32 {
    ingress::run(&ctx)
}

/// Ingress stage `stage::INGRESS_PARSE`.
#[classifier]
pub fn ingress_parse(ctx: TcContext) -> i32 {
    ingress::parse::run(&ctx)
}

/// Ingress stage `stage::INGRESS_CANON`.
#[classifier]
pub fn ingress_canon(ctx: TcContext) -> i32 {
    ingress::canon::run(&ctx)
}

/// Ingress stage `stage::INGRESS_FINISH`.
#[classifier]
pub fn ingress_finish(ctx: TcContext) -> i32 {
    ingress::finish::run(&ctx)
}

/// Egress classifier, attached to the same interfaces: frames the server's responses for the
/// ingress side (the `replies` half of each `CONNS` entry); never changes a packet.
#[classifier]
pub fn http_egress(ctx: TcContext) -> i32 {
    egress::run(&ctx)
}

/// Egress stage `stage::EGRESS_FRAME`.
#[classifier]
pub fn egress_frame(ctx: TcContext) -> i32 {
    egress::frame::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
