//! Judging a request whose path is known: hash it with the load-time key (keyed SipHash-1-3,
//! a `bpf_loop`; not for a long path of a length no exact rule has, `EXACT_LENS`), look the
//! rule up (exact, then longest prefix, else the default) and judge the method. A plain path
//! (`LineParser::plain_mask`: already in normal form) is judged as it was read; any other
//! goes through stage `INGRESS_CANON` first, and comes back with the canonicalizer's report of
//! where the path's other readings leave the canonical one (`filter_common::canon`: the path
//! as sent, and `;` read as text), whose rules that stage looked up (each can only fall under
//! a prefix rule above that point, or the default): the request is judged under the methods
//! every reading allows. Runs in the parse (`http_ingress`, and stage `INGRESS_PARSE`).

use aya_ebpf::{helpers::bpf_loop, maps::lpm_trie::Key};
use core::ffi::c_void;
use core::ptr::{addr_of, read_volatile};
use filter_common::{
    has_exact_len,
    hash::{full_words, SipState},
    reply::{infer, Infer, OUTSTANDING_MAX},
    Method, MethodSet, PrefixData, Reason, RuleValue, Scratch, EVENT_LINE_MAX, PATH_MAX,
    PREFIX_MAX, REP_FOLLOWED, REP_IDLE, REP_LOST, REP_SWITCHED, RULE_MONITOR, SETTINGS_DRY_RUN,
    SETTINGS_OPTIONS_ANSWER, STOP_CANON, STOP_HOLD,
};

use super::{client_ack, from_ctx, refuse_stop, stop, violation, ScratchCtx};
use crate::maps::{EXACT_LENS, FILTER_CONFIG, PREFIX_A, PREFIX_B, RULES_A, RULES_B, SETTINGS};
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
        // No other reading; the rule set in force now.
        s.other_allow = MethodSet::ANY.0;
        s.other_enforced = MethodSet::ANY.0;
        s.rules_active = settings.active_rules;
        s.rules_default = settings.default_allow;
    }
    // A canonicalized path's other readings were looked up in stage `INGRESS_CANON`, under
    // the rule set it read: the canonical one is judged under the same. verifier: read back
    // from map memory, one state whichever branch wrote them.
    let active = unsafe { read_volatile(addr_of!(s.rules_active)) };
    let default = unsafe { read_volatile(addr_of!(s.rules_default)) };
    let rule = lookup(s, s.canon_len as usize, active);
    reading(s, rule, default);
    s.judge_allow &= s.other_allow;
    s.judge_enforced &= s.other_enforced;
    // verifier: read back from map memory: what follows is walked once, not once per
    // combination of lookup outcomes.
    let allow = unsafe { read_volatile(addr_of!(s.judge_allow)) };
    let enforced = if settings.flags & SETTINGS_DRY_RUN != 0 {
        MethodSet::ANY.0
    } else {
        unsafe { read_volatile(addr_of!(s.judge_enforced)) }
    };
    let rule_flags = unsafe { read_volatile(addr_of!(s.judge_flags)) };
    let has_rule = unsafe { read_volatile(addr_of!(s.judge_rule)) } != 0;
    // For the method overrides to come: every refusal reported only (monitor mode) when no
    // reading's rule enforces a restriction, else every refusal enforced.
    let monitor_all = enforced == MethodSet::ANY.0;
    s.conn.stream.set_verdict(
        allow,
        rule_flags | if monitor_all { RULE_MONITOR } else { 0 },
    );
    if method == Method::Options {
        // Never 405 for OPTIONS (CORS preflight): pass it, or answer 204 + Allow. A method
        // override on it is checked against `allow` like on any other request.
        if has_rule && settings.flags & SETTINGS_OPTIONS_ANSWER != 0 {
            return refuse_stop(s, Reason::OptionsAnswered, allow, method);
        }
        count(Reason::OptionsPassed);
        return 0;
    }
    if allow & method.bit() != 0 {
        count(if has_rule {
            Reason::AllowedByRule
        } else {
            Reason::AllowedByDefault
        });
        return 0;
    }
    // Refused if a reading whose rule enforces refuses it (`Allow`: the methods no such
    // reading refuses), else only reported (with the methods every reading allows).
    if enforced & method.bit() == 0 {
        return violation(s, enforced, method, false);
    }
    violation(s, allow, method, true)
}

/// The canonical path's rule (`None`: the default) as the judgement in the scratch.
#[inline(always)]
fn reading(s: &mut Scratch, rule: Option<RuleValue>, default: u32) {
    let (allow, flags) = match rule {
        Some(r) => (r.allow, r.flags),
        None => (default, 0),
    };
    s.judge_allow = allow;
    s.judge_enforced = enforced(allow, flags);
    s.judge_flags = flags;
    s.judge_rule = rule.is_some() as u32;
}

/// What a rule (or the default, flags 0) with this allow set and these flags allows in
/// enforce mode: its allow set, or every method for a monitor-mode rule.
#[inline(always)]
pub fn enforced(allow: u32, flags: u32) -> u32 {
    if flags & RULE_MONITOR != 0 {
        MethodSet::ANY.0
    } else {
        allow
    }
}

/// The longest prefix rule in `prefixes` that is a prefix of `src[..len]` (`src`: a path in
/// the scratch, 8-aligned).
#[inline(always)]
pub fn prefix_rule(
    s: &mut Scratch,
    src: *const u8,
    len: usize,
    prefixes: &aya_ebpf::maps::LpmTrie<PrefixData, RuleValue>,
) -> Option<RuleValue> {
    let n = if len < PREFIX_MAX { len } else { PREFIX_MAX };
    s.prefix_key.prefixlen = (n * 8) as u32;
    let mut i = 0;
    while i < PREFIX_MAX / 8 {
        // verifier: constant-bounded word copy of the path into the LPM key: aligned loads
        // (`src` is 8-aligned), two aligned 4-byte stores (the key's data is 4-aligned), not
        // the byte loads and stores an unaligned access is in BPF.
        let w = unsafe { src.add(i * 8).cast::<u64>().read() };
        let d = unsafe { s.prefix_key.data.as_mut_ptr().add(i * 8).cast::<u32>() };
        unsafe {
            d.write(w as u32);
            d.add(1).write((w >> 32) as u32);
        }
        i += 1;
    }
    let key = unsafe { &*(addr_of!(s.prefix_key).cast::<Key<PrefixData>>()) };
    prefixes.get(key).copied()
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
const HASH_WORDS_PER_CALL: usize = 32;

/// `bpf_loop` callback: absorb path words `i * HASH_WORDS_PER_CALL ..` (up to
/// `HASH_WORDS_PER_CALL` of them, as far as `sip_words`) into the hash under way.
unsafe extern "C" fn hash_words(i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { from_ctx(ctx) };
    // In registers for the loop: the stores into `path` could alias the scratch's fields.
    let (n, plain, mut sip) = (s.sip_words as usize, s.plain, s.sip);
    let (raw, path) = (s.raw.as_ptr(), s.path.as_mut_ptr());
    let first = i as usize * HASH_WORDS_PER_CALL;
    let mut j = 0;
    let mut done = 0;
    while j < HASH_WORDS_PER_CALL {
        let k = first + j;
        if k >= n {
            done = 1;
            break;
        }
        // verifier: mask the byte offset into the path (`sip_words <= PATH_MAX / 8`).
        let off = (k * 8) & (PATH_MAX - 8);
        // SAFETY: `off` is an 8-aligned offset of both 8-aligned buffers, 8 bytes inside them
        // (as in `plain_word`).
        let m = unsafe {
            let m = (raw.add(off).cast::<u64>().read() & plain)
                | (path.add(off).cast::<u64>().read() & !plain);
            path.add(off).cast::<u64>().write(m);
            m
        };
        sip.absorb(m);
        j += 1;
    }
    s.sip = sip;
    done
}

/// The canonical path's exact rule, into `Scratch::exact` (`exact_found` 1), else
/// `exact_found` 0. A path of a length no exact rule of the set has (`EXACT_LENS`) is not
/// hashed: only its first `PREFIX_MAX` bytes are copied into `path` (what the prefix lookup
/// and the event read).
#[inline(always)]
fn exact_rule(s: &mut Scratch, path_len: usize, active: u32) {
    s.exact_found = 0;
    // A short path is hashed without asking: its hash costs less than the question. No entry
    // (never: the array has both): hashed, as if a rule had the length.
    let hashed = path_len < HASH_UNASKED
        || match EXACT_LENS.get(active & 1) {
            Some(lens) => has_exact_len(lens, path_len),
            None => true,
        };
    let mut sc = ScratchCtx::new(s);
    if !hashed {
        // verifier: a callback verified once, not a loop walked word by word.
        // SAFETY: the callback takes the scratch context `sc` points to, alive for the call.
        unsafe { bpf_loop(1, copy_prefix as *mut c_void, sc.ptr(), 0) };
        return;
    }
    // SAFETY: a field of the loader's read-only global, read whole.
    let key = unsafe { read_volatile(addr_of!((*addr_of!(FILTER_CONFIG)).hash_key)) };
    s.sip = SipState::new(&key);
    let words = full_words(path_len);
    // The word after the full ones (the hash's last bytes) is not absorbed by the callback.
    plain_word(s, (path_len & !7) & (PATH_MAX - 8));
    if words <= INLINE_WORDS {
        // A short path's words here: a callback's call and return cost more than a
        // SipHash round.
        let mut i = 0;
        while i < INLINE_WORDS {
            if i >= words {
                break;
            }
            let m = plain_word(s, i * 8);
            s.sip.absorb(m);
            i += 1;
        }
    } else {
        s.sip_words = words as u32;
        // verifier: the 128 words of a 1 KiB path through one callback verified once.
        let calls = words.div_ceil(HASH_WORDS_PER_CALL) as u32;
        // SAFETY: as above.
        unsafe { bpf_loop(calls, hash_words as *mut c_void, sc.ptr(), 0) };
    }
    let hash = s.sip.finish(&s.path, path_len);
    // One lookup per map: a map chosen at run time would make the verifier call the helper
    // instead of inlining the lookup.
    // SAFETY (both): the value is copied out at once; the daemon only replaces it whole.
    let rule = if active == 1 {
        unsafe { RULES_B.get(hash) }
    } else {
        unsafe { RULES_A.get(hash) }
    };
    if let Some(r) = rule {
        s.exact = *r;
        s.exact_found = 1;
    }
}

/// Full words of a path hashed without the `hash_words` callback: paths under 24 bytes.
const INLINE_WORDS: usize = 2;

/// Paths shorter than this are hashed whatever the lengths of the exact rules.
const HASH_UNASKED: usize = 64;

/// `bpf_loop` callback: copy what anything but the hash reads of a plain path (its first
/// `PREFIX_MAX` bytes) from `raw` into `path`, as [`hash_words`] would have.
unsafe extern "C" fn copy_prefix(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the scratch context `exact_rule` passed to `bpf_loop`.
    let s = unsafe { from_ctx(ctx) };
    let mut i = 0;
    while i < PREFIX_MAX / 8 {
        plain_word(s, i * 8);
        i += 1;
    }
    1
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
    exact_rule(s, path_len, active);
    // verifier: read back from map memory: what follows is walked once, whether the path was
    // hashed or not.
    // SAFETY: fields of the per-CPU scratch, read whole.
    if unsafe { read_volatile(addr_of!(s.exact_found)) } != 0 {
        // SAFETY: as above.
        return Some(unsafe { read_volatile(addr_of!(s.exact)) });
    }
    let prefixes = if active == 1 { &PREFIX_B } else { &PREFIX_A };
    let path = s.path.as_ptr();
    prefix_rule(s, path, path_len, prefixes)
}

// The words `lookup` copies when it does not hash cover what the event reads of the path.
const _: () = assert!(PATH_MAX >= PREFIX_MAX && PREFIX_MAX >= EVENT_LINE_MAX);
// `prefix_rule` reads the paths as aligned words and writes the key's data as aligned halves.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Scratch, path).is_multiple_of(8));
    assert!(offset_of!(Scratch, raw).is_multiple_of(8));
    assert!(offset_of!(Scratch, prefix_key).is_multiple_of(4));
    assert!(offset_of!(filter_common::PrefixKey, data) == 4);
    assert!(core::mem::align_of::<Scratch>() >= 8);
};
