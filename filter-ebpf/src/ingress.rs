//! The ingress decision: headers → request line → policy → verdict.

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::TC_ACT_SHOT, bindings::TC_ACT_UNSPEC, helpers::bpf_loop, programs::TcContext,
};
use core::ffi::c_void;
use core::ptr::{addr_of, null_mut, read_unaligned, read_volatile, write_unaligned};
use filter_common::{
    hash::path_hash,
    http::{LineParser, OUTCOME_PENDING},
    Method, PrefixData, Reason, RejectEvent, RuleValue, Scratch, ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6,
    EVENT_LINE_MAX, FAMILY_V4, FAMILY_V6, IPPROTO_TCP, IPV4_HLEN_MIN, IPV6_HLEN, LINE_WINDOW,
    PREFIX_MAX, RULE_MONITOR, SETTINGS_DRY_RUN, SETTINGS_OPTIONS_ANSWER, SETTINGS_OVERSIZE_PASS,
    TCP_HLEN_MIN,
};

use crate::maps::{
    EVENTS, FILTER_CONFIG, PREFIX_A, PREFIX_B, RULES_A, RULES_B, SCRATCH, SETTINGS, STATS,
};
use crate::skb::{load_into, turn_into_reset, Segment};

/// Let the packet continue: under TCX this is `TCX_NEXT`, so programs after ours still run.
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT as i32;

pub fn run(ctx: &TcContext) -> i32 {
    match try_run(ctx) {
        Ok(r) | Err(r) => finish(r),
    }
}

/// Every verdict leaves through here: count it, then map it to a TC action.
#[inline(always)]
fn finish(reason: Reason) -> i32 {
    count(reason);
    match reason {
        Reason::ResetFailed => DROP,
        _ => PASS,
    }
}

#[inline(always)]
fn count(reason: Reason) {
    if let Some(c) = STATS.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn be16(a: u8, b: u8) -> u16 {
    u16::from_be_bytes([a, b])
}

#[inline(always)]
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[inline(always)]
fn port_inspected(port: u16) -> bool {
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

/// `bpf_loop` callback: feed payload byte `i` to the request-line parser in the scratch
/// buffer. Returns 1 to stop once the parser has decided or failed.
unsafe extern "C" fn parse_byte(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let s = unsafe { &mut *s };
    let i = i as usize;
    if i >= s.window_len as usize {
        return 1;
    }
    // verifier: mask the index into the window.
    let b = s.line[i & (LINE_WINDOW - 1)];
    let outcome = s.parser.step(b, &mut s.path).outcome();
    if outcome == OUTCOME_PENDING {
        return 0;
    }
    s.outcome = outcome;
    1
}

fn try_run(ctx: &TcContext) -> Result<Reason, Reason> {
    let eth: [u8; ETH_HLEN] = ctx.load(0).map_err(|_| Reason::NotIp)?;
    let (family, l4, ip_end) = match be16(eth[12], eth[13]) {
        ETH_P_IPV4 => {
            let ip: [u8; IPV4_HLEN_MIN] = ctx.load(ETH_HLEN).map_err(|_| Reason::NotIp)?;
            if ip[9] != IPPROTO_TCP {
                return Err(Reason::NotTcp);
            }
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            // More-fragments flag or a fragment offset: TCP is not at l4 for all of them.
            if ihl < IPV4_HLEN_MIN || be16(ip[6], ip[7]) & 0x3fff != 0 {
                return Err(Reason::Unsupported);
            }
            (
                FAMILY_V4,
                ETH_HLEN + ihl,
                ETH_HLEN + be16(ip[2], ip[3]) as usize,
            )
        }
        ETH_P_IPV6 => {
            let ip: [u8; IPV6_HLEN] = ctx.load(ETH_HLEN).map_err(|_| Reason::NotIp)?;
            match ip[6] {
                IPPROTO_TCP => {}
                // Hop-by-hop, routing, fragment, destination options, AH, mobility: TCP may
                // follow, behind headers this program does not walk yet.
                0 | 43 | 44 | 51 | 60 | 135 => return Err(Reason::Unsupported),
                _ => return Err(Reason::NotTcp),
            }
            (
                FAMILY_V6,
                ETH_HLEN + IPV6_HLEN,
                ETH_HLEN + IPV6_HLEN + be16(ip[4], ip[5]) as usize,
            )
        }
        _ => return Err(Reason::NotIp),
    };
    let tcp: [u8; TCP_HLEN_MIN] = ctx.load(l4).map_err(|_| Reason::NotTcp)?;
    if !port_inspected(be16(tcp[2], tcp[3])) {
        return Err(Reason::OtherPort);
    }
    let payload = l4 + ((tcp[12] >> 4) as usize) * 4;
    if ip_end <= payload {
        return Err(Reason::NoPayload);
    }
    let payload_len = ip_end - payload;

    let s = SCRATCH.get_ptr_mut(0).ok_or(Reason::NotHttp)?;
    let s = unsafe { &mut *s };
    let n = if payload_len < LINE_WINDOW {
        payload_len
    } else {
        LINE_WINDOW
    };
    if !load_into(ctx, payload, &mut s.line, n) {
        return Err(Reason::NoPayload);
    }
    s.parser = LineParser::new();
    s.window_len = n as u32;
    s.outcome = OUTCOME_PENDING;
    // verifier: one callback verified once, instead of a 1 KiB loop walked byte by byte.
    unsafe { bpf_loop(n as u32, parse_byte as *mut c_void, null_mut(), 0) };
    let hdr = Headers {
        family,
        l4,
        payload_len,
        payload,
        window_len: n,
    };

    let settings = SETTINGS.get(0).ok_or(Reason::NotHttp)?;
    let req = match s.parser.finish(s.outcome, n) {
        Ok(req) => req,
        Err(Reason::PathTooLong) if settings.flags & SETTINGS_OVERSIZE_PASS == 0 => {
            // The path runs past the inspection window: answer 414 rather than let an
            // undecided request through.
            return reject(
                ctx,
                s,
                &eth,
                &tcp,
                &hdr,
                Reason::LineTooLong,
                0,
                Method::Other,
                0,
            );
        }
        Err(r) => return Err(r),
    };

    let rule = lookup(s, req.path_len, settings.active_rules);
    let (allow, verdict) = match rule {
        Some(r) => (r.allow, Reason::AllowedByRule),
        None => (settings.default_allow, Reason::AllowedByDefault),
    };
    if req.method == Method::Options {
        // Never 405 for OPTIONS (CORS preflight): pass it, or answer 204 + Allow.
        if rule.is_some() && settings.flags & SETTINGS_OPTIONS_ANSWER != 0 {
            return reject(
                ctx,
                s,
                &eth,
                &tcp,
                &hdr,
                Reason::OptionsAnswered,
                allow,
                req.method,
                req.path_len,
            );
        }
        return Ok(Reason::OptionsPassed);
    }
    if allow & req.method.bit() != 0 {
        return Ok(verdict);
    }
    let monitor = rule.is_some_and(|r| r.flags & RULE_MONITOR != 0);
    if monitor || settings.flags & SETTINGS_DRY_RUN != 0 {
        send_event(
            ctx,
            s,
            &eth,
            &tcp,
            &hdr,
            Reason::Monitored,
            allow,
            req.method,
            req.path_len,
        );
        return Ok(Reason::Monitored);
    }
    reject(
        ctx,
        s,
        &eth,
        &tcp,
        &hdr,
        Reason::Rejected,
        allow,
        req.method,
        req.path_len,
    )
}

/// The rule for the parsed path: an exact rule, else the longest prefix rule.
#[inline(always)]
fn lookup(s: &mut Scratch, path_len: usize, active: u32) -> Option<RuleValue> {
    let key = unsafe { read_volatile(addr_of!((*addr_of!(FILTER_CONFIG)).hash_key)) };
    let hash = path_hash(&key, &s.path, path_len);
    let (rules, prefixes) = if active == 1 {
        (&RULES_B, &PREFIX_B)
    } else {
        (&RULES_A, &PREFIX_A)
    };
    if let Some(r) = unsafe { rules.get(hash) } {
        return Some(*r);
    }
    let n = if path_len < PREFIX_MAX {
        path_len
    } else {
        PREFIX_MAX
    };
    s.prefix_key.prefixlen = (n * 8) as u32;
    let mut i = 0;
    while i < PREFIX_MAX / 8 {
        // verifier: constant-bounded word copy of the path into the LPM key.
        let w = unsafe { read_unaligned(s.path.as_ptr().add(i * 8).cast::<u64>()) };
        unsafe { write_unaligned(s.prefix_key.data.as_mut_ptr().add(i * 8).cast::<u64>(), w) };
        i += 1;
    }
    let key = unsafe { &*(addr_of!(s.prefix_key).cast::<Key<PrefixData>>()) };
    prefixes.get(key).copied()
}

/// Where the headers of the current segment are, for events and the reset.
struct Headers {
    family: u8,
    l4: usize,
    payload_len: usize,
    payload: usize,
    window_len: usize,
}

/// Fill the event in the scratch buffer and hand it to the responder.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn send_event(
    ctx: &TcContext,
    s: &mut Scratch,
    eth: &[u8; ETH_HLEN],
    tcp: &[u8; TCP_HLEN_MIN],
    hdr: &Headers,
    reason: Reason,
    allow: u32,
    method: Method,
    path_len: usize,
) -> bool {
    let ev: &mut RejectEvent = &mut s.event;
    ev.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    ev.reason = reason as u32;
    ev.allow = allow;
    ev.seq = be32(tcp, 4);
    ev.ack = be32(tcp, 8);
    ev.payload_len = hdr.payload_len as u32;
    ev.client_port = be16(tcp[0], tcp[1]);
    ev.server_port = be16(tcp[2], tcp[3]);
    ev.path_len = path_len as u16;
    ev.family = hdr.family;
    ev.method = method as u8;
    ev._pad0 = [0; 2];
    ev.client_mac.copy_from_slice(&eth[6..12]);
    ev.server_mac.copy_from_slice(&eth[0..6]);
    if hdr.family == FAMILY_V4 {
        let Ok(ip) = ctx.load::<[u8; IPV4_HLEN_MIN]>(ETH_HLEN) else {
            return false;
        };
        ev.client_addr_be = [0; 16];
        ev.server_addr_be = [0; 16];
        ev.client_addr_be[..4].copy_from_slice(&ip[12..16]);
        ev.server_addr_be[..4].copy_from_slice(&ip[16..20]);
    } else {
        let Ok(ip) = ctx.load::<[u8; IPV6_HLEN]>(ETH_HLEN) else {
            return false;
        };
        ev.client_addr_be.copy_from_slice(&ip[8..24]);
        ev.server_addr_be.copy_from_slice(&ip[24..40]);
    }
    let line_len = if hdr.window_len < EVENT_LINE_MAX {
        hdr.window_len
    } else {
        EVENT_LINE_MAX
    };
    ev.line_len = line_len as u16;
    if !load_into(ctx, hdr.payload, &mut ev.line, line_len) {
        ev.line_len = 0;
    }
    if EVENTS.output::<RejectEvent>(&*ev, 0).is_err() {
        count(Reason::EventLost);
    }
    true
}

/// Stop this request: tell the responder what to answer, and turn the segment into a reset
/// so the backend never reads it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn reject(
    ctx: &TcContext,
    s: &mut Scratch,
    eth: &[u8; ETH_HLEN],
    tcp: &[u8; TCP_HLEN_MIN],
    hdr: &Headers,
    reason: Reason,
    allow: u32,
    method: Method,
    path_len: usize,
) -> Result<Reason, Reason> {
    if !send_event(ctx, s, eth, tcp, hdr, reason, allow, method, path_len) {
        return Err(Reason::ResetFailed);
    }
    let ev = &s.event;
    let seg = Segment {
        family: hdr.family,
        l4: hdr.l4,
        tcp,
        client: &ev.client_addr_be,
        server: &ev.server_addr_be,
    };
    if !turn_into_reset(ctx, &seg) {
        return Err(Reason::ResetFailed);
    }
    Ok(reason)
}
