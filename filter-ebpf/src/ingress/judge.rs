//! Judging a request whose path is known: hash it with the load-time key (keyed SipHash-1-3,
//! a `bpf_loop`), look the rule up (exact, then longest prefix, else the default) and judge
//! the method. A plain path (`LineParser::plain_mask`: already canonical) is judged as it was
//! read; any other goes through stage `INGRESS_CANON` first. Runs in stage `INGRESS_PARSE`.

use aya_ebpf::{helpers::bpf_loop, maps::lpm_trie::Key};
use core::ffi::c_void;
use core::ptr::{addr_of, read_unaligned, read_volatile, write_unaligned};
use filter_common::{
    hash::{full_words, SipState},
    reply::{infer, Infer, OUTSTANDING_MAX},
    Method, MethodSet, PrefixData, Reason, RuleValue, Scratch, EVENT_LINE_MAX, PATH_MAX,
    PREFIX_MAX, REP_FOLLOWED, REP_IDLE, REP_LOST, REP_SWITCHED, RULE_MONITOR, SETTINGS_DRY_RUN,
    SETTINGS_OPTIONS_ANSWER, STOP_CANON, STOP_HOLD,
};

use super::{client_ack, from_ctx, refuse_stop, stop, violation, ScratchCtx};
use crate::maps::{FILTER_CONFIG, PREFIX_A, PREFIX_B, RULES_A, RULES_B, SETTINGS};
use crate::util::count;

/// Apply the policy to the current request, whose path is complete (`canonical`: and
/// canonicalized into `s.path` by stage `INGRESS_CANON`). Leaves `s.stop` at `STOP_NONE` (go
/// on), `STOP_MONITOR`, `STOP_HOLD`, `STOP_CANON` (a path that is not plain: canonicalize it
/// first) or `STOP_REFUSE`.
// verifier/stack: a BPF-to-BPF call keeps its frame off the callers' stacks.
#[inline(never)]
pub fn judge(s: &mut Scratch, canonical: bool) -> i64 {
    let Some(settings) = SETTINGS.get(0) else {
        return refuse_stop(s, Reason::NotHttp, 0, Method::Other);
    };
    if !responses_allow(s) {
        return stop(s, STOP_HOLD);
    }
    s.conn.stream.take_method();
    // verifier: read back from map memory, so that what follows is walked once, not once per
    // method the table walk could return.
    let method = Method::from_u8(unsafe { read_volatile(addr_of!(s.conn.stream.method)) });
    if canonical {
        s.plain = 0;
    } else {
        // A plain path is already canonical: judged as read, the hash copying the raw path's
        // words into `path` as it reads them.
        s.plain = s.conn.stream.line.plain_mask();
        if s.plain == 0 {
            return stop(s, STOP_CANON);
        }
        s.canon_len = s.conn.stream.line.path_len() as u16;
    }
    let rule = lookup(s, s.canon_len as usize, settings.active_rules);
    let (allow, rule_flags, verdict) = match rule {
        Some(r) => (r.allow, r.flags, Reason::AllowedByRule),
        None => (settings.default_allow, 0, Reason::AllowedByDefault),
    };
    if method == Method::Options {
        // Never 405 for OPTIONS (CORS preflight): pass it, or answer 204 + Allow.
        if rule.is_some() && settings.flags & SETTINGS_OPTIONS_ANSWER != 0 {
            return refuse_stop(s, Reason::OptionsAnswered, allow, method);
        }
        count(Reason::OptionsPassed);
        s.conn.stream.set_verdict(MethodSet::ANY.0, rule_flags);
        return 0;
    }
    let monitor = rule_flags & RULE_MONITOR != 0 || settings.flags & SETTINGS_DRY_RUN != 0;
    s.conn
        .stream
        .set_verdict(allow, rule_flags | if monitor { RULE_MONITOR } else { 0 });
    if allow & method.bit() != 0 {
        count(verdict);
        return 0;
    }
    violation(s, allow, method, monitor)
}

/// Whether the current request may go on as far as the earlier responses go: not while
/// `OUTSTANDING_MAX` requests wait for theirs (the egress side's ring of `HEAD` bits would wrap
/// with one more), nor, in lockstep (`filter_common::reply`), while part of a response is
/// unacknowledged. In lockstep it also notes what the inference says: every earlier response
/// complete, or framing to start at the server's next byte.
#[inline(always)]
fn responses_allow(s: &mut Scratch) -> bool {
    let state = s.rep_state;
    if state & REP_FOLLOWED == 0 || state & (REP_LOST | REP_SWITCHED) != 0 {
        return true;
    }
    let (snd_nxt, ack) = (s.rep_snd_nxt, client_ack(s));
    let st = &mut s.conn.stream;
    if state & REP_IDLE != 0 && st.arm == 0 {
        match infer(st.reqs, st.lock_done, st.snd_at_req, snd_nxt, ack) {
            Infer::Complete => {
                if st.lock_done != st.reqs {
                    st.inferred = 1;
                }
                st.lock_done = st.reqs;
            }
            Infer::Arm => {
                let done = st.lock_done;
                st.request_arm(snd_nxt, done);
            }
            Infer::Wait => return false,
        }
        st.snd_at_req = snd_nxt;
    }
    let done = st.responses_done(state & REP_IDLE != 0, s.rep_done);
    st.reqs.wrapping_sub(done) < OUTSTANDING_MAX
}

/// Path words hashed per `hash_words` callback.
const HASH_WORDS_PER_CALL: usize = 8;

/// `bpf_loop` callback: absorb path words `i * HASH_WORDS_PER_CALL ..` (up to
/// `HASH_WORDS_PER_CALL` of them, as far as `sip_words`) into the hash under way.
unsafe extern "C" fn hash_words(i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { from_ctx(ctx) };
    let first = i as usize * HASH_WORDS_PER_CALL;
    let mut j = 0;
    while j < HASH_WORDS_PER_CALL {
        let k = first + j;
        if k >= s.sip_words as usize {
            return 1;
        }
        // verifier: mask the byte offset into the path (`sip_words <= PATH_MAX / 8`).
        let off = (k * 8) & (PATH_MAX - 8);
        let m = plain_word(s, off);
        s.sip.absorb(m);
        j += 1;
    }
    0
}

/// The canonical path's word at `off` (`off <= PATH_MAX - 8`, a multiple of 8): the raw
/// path's if it is plain (also copied into `path`), else `path`'s. Both buffers sit at
/// 8-aligned offsets of the scratch, so these are aligned loads (little-endian, as
/// `SipState::word` reads them); a mask chooses, not a branch.
#[inline(always)]
fn plain_word(s: &mut Scratch, off: usize) -> u64 {
    let raw = unsafe { s.raw.as_ptr().add(off).cast::<u64>().read() };
    let path = unsafe { s.path.as_ptr().add(off).cast::<u64>().read() };
    let m = (raw & s.plain) | (path & !s.plain);
    unsafe { s.path.as_mut_ptr().add(off).cast::<u64>().write(m) };
    m
}

/// The rule for the canonical path: an exact rule, else the longest prefix rule.
#[inline(always)]
fn lookup(s: &mut Scratch, path_len: usize, active: u32) -> Option<RuleValue> {
    let key = unsafe { read_volatile(addr_of!((*addr_of!(FILTER_CONFIG)).hash_key)) };
    s.sip = SipState::new(&key);
    s.sip_words = full_words(path_len) as u32;
    // verifier: the 128 words of a 1 KiB path through one callback verified once.
    let calls = (s.sip_words as usize).div_ceil(HASH_WORDS_PER_CALL) as u32;
    // The word after the full ones (the hash's last bytes) is not absorbed by the callback.
    plain_word(s, (path_len & !7) & (PATH_MAX - 8));
    let mut sc = ScratchCtx::new(s);
    unsafe { bpf_loop(calls, hash_words as *mut c_void, sc.ptr(), 0) };
    let hash = s.sip.finish(&s.path, path_len);
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

const _: () = assert!(PATH_MAX >= EVENT_LINE_MAX && PATH_MAX >= PREFIX_MAX);
