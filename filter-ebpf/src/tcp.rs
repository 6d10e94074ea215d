//! The kernel's side of TCP normalization (`filter_common::tcp`): a segment's options, and the
//! server's socket as ground truth where the backend runs on this host.

use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{bpf_loop, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_sock},
    programs::TcContext,
};
use core::ffi::c_void;
use filter_common::{
    tcp::{fast_tsval, OptionWalk, Options, OPTIONS_MAX},
    ConnKey, FAMILY_V4,
};

use crate::skb::load_into;

/// What the option walk's callback needs.
#[repr(C)]
struct WalkCtx {
    opts: *const [u8; OPTIONS_MAX],
    walk: *mut OptionWalk,
    len: u32,
}

/// `bpf_loop` callback: one option.
unsafe extern "C" fn walk_option(_i: u64, c: *mut c_void) -> i64 {
    // SAFETY: `c` is the `WalkCtx` `options` passed, its pointers valid for the loop.
    let (w, opts, len) = unsafe {
        let c = &*(c as *const WalkCtx);
        (&mut *c.walk, &*c.opts, c.len as usize)
    };
    if w.step(opts, len) {
        0
    } else {
        1
    }
}

/// The options of the TCP header at `l4` (`doff`: its length), read into `opts`; `fast`:
/// only a timestamp is wanted, so the usual `NOP NOP TS` layout is read without a walk.
// verifier: the walk's step verified once, not once per option.
#[inline(always)]
pub fn options(
    ctx: &TcContext,
    opts: &mut [u8; OPTIONS_MAX],
    walk: &mut OptionWalk,
    l4: usize,
    doff: usize,
    fast: bool,
) -> Options {
    let len = doff.saturating_sub(20);
    if fast {
        // The usual layout, read in place where the frame holds it: no copy of the block.
        let (start, end) = (ctx.data(), ctx.data_end());
        let at = start + l4 + 20;
        if at + 8 <= end {
            // SAFETY: eight bytes inside the packet, as just checked (the verifier checks it
            // again); `[u8; 8]` has alignment 1, and nothing writes the packet meanwhile.
            let head = unsafe { &*(at as *const [u8; 8]) };
            if let Some(t) = fast_tsval(head, len) {
                return Options {
                    wscale: None,
                    tsval: Some(t),
                };
            }
        }
    }
    if len == 0 || !load_into(ctx, l4 + 20, opts, len) {
        return Options::default();
    }
    *walk = OptionWalk::new();
    let mut c = WalkCtx {
        opts: opts as *const _,
        walk: walk as *mut _,
        len: len as u32,
    };
    // SAFETY: the callback and its context, valid for the call.
    unsafe {
        bpf_loop(
            OPTIONS_MAX as u32,
            walk_option as *mut c_void,
            (&mut c as *mut WalkCtx).cast(),
            0,
        )
    };
    walk.options()
}

/// What the server's side of a connection is on this host.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sock {
    /// An established connection that takes data: its next expected byte, and whether it got
    /// any data yet.
    Live { rcv_nxt: u32, fresh: bool },
    /// A listener only, or a handshake the server has not completed: the server's TCP may yet
    /// make a connection of this segment (a SYN cookie, the handshake's last ACK).
    Pending,
    /// A connection that takes no more data (closing, closed, `TIME_WAIT`).
    Closed,
    /// Nothing on this host answers for the address and port: the backend is elsewhere (or the
    /// port is closed).
    Remote,
}

const TCP_ESTABLISHED: u32 = 1;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_SYN_RECV: u32 = 3;
const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: u32 = 12;

/// The server's socket for the client's segment of connection `key` (looked up in this
/// network namespace, as the host's TCP will).
// verifier/stack: the socket reference is taken and released inside one function.
#[inline(never)]
pub fn server_socket(ctx: &TcContext, key: &ConnKey) -> Sock {
    // SAFETY: a plain-old-data union, all zero.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size;
    // SAFETY: writes to the union's members of the family the key has.
    unsafe {
        if key.family == FAMILY_V4 {
            let v4 = &mut t.__bindgen_anon_1.ipv4;
            v4.saddr = u32::from_ne_bytes([
                key.client_addr_be[0],
                key.client_addr_be[1],
                key.client_addr_be[2],
                key.client_addr_be[3],
            ]);
            v4.daddr = u32::from_ne_bytes([
                key.server_addr_be[0],
                key.server_addr_be[1],
                key.server_addr_be[2],
                key.server_addr_be[3],
            ]);
            v4.sport = key.client_port.to_be();
            v4.dport = key.server_port.to_be();
            size = core::mem::size_of_val(v4);
        } else {
            let v6 = &mut t.__bindgen_anon_1.ipv6;
            let mut i = 0;
            while i < 4 {
                let a = &key.client_addr_be[i * 4..i * 4 + 4];
                let b = &key.server_addr_be[i * 4..i * 4 + 4];
                v6.saddr[i] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
                v6.daddr[i] = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                i += 1;
            }
            v6.sport = key.client_port.to_be();
            v6.dport = key.server_port.to_be();
            size = core::mem::size_of_val(v6);
        }
    }
    // SAFETY: a lookup with this program's skb and a tuple of `size` bytes; the reference it
    // returns is released below on every path.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut c_void,
            &mut t,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return Sock::Remote;
    }
    // SAFETY: `sk` is a valid socket reference until released.
    let state = unsafe { (*sk).state };
    let out = match state {
        TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_FIN_WAIT2 => {
            // SAFETY: as above.
            let tp = unsafe { bpf_tcp_sock(sk) };
            if tp.is_null() {
                Sock::Closed
            } else {
                // SAFETY: a valid `bpf_tcp_sock` while `sk` is held.
                unsafe {
                    Sock::Live {
                        rcv_nxt: (*tp).rcv_nxt,
                        fresh: (*tp).bytes_received == 0,
                    }
                }
            }
        }
        TCP_LISTEN | TCP_SYN_RECV | TCP_NEW_SYN_RECV => Sock::Pending,
        _ => Sock::Closed,
    };
    // SAFETY: releases the reference taken above.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    out
}
