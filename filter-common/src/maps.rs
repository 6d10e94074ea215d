//! Map names and the layouts of map keys, map values, load-time globals and events.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and a size assertion, and
//! holds no `bool`, `Option`, `usize` or reference. Byte order is in the field name.

use crate::{EVENT_LINE_MAX, REASON_COUNT_U32};

/// Policy maps, `u64` path hash → [`RuleValue`]. Two of them, so a whole new rule set is
/// written into the inactive one and switched in with one write to [`Settings::active_rules`].
pub const MAP_RULES: [&str; 2] = ["RULES_A", "RULES_B"];
/// Prefix-rule maps, `LpmTrie<PrefixData, RuleValue>`, paired with [`MAP_RULES`] by index:
/// the longest rule path that is a byte prefix of the request path wins. Prefix rule paths end
/// in `/`, so a prefix rule covers exactly the subtree under it.
pub const MAP_PREFIX: [&str; 2] = ["PREFIX_A", "PREFIX_B"];
/// `Array<ExactLens>` of two entries, paired with [`MAP_RULES`] by index: the lengths of the
/// set's exact rule paths. A path of a length no exact rule has cannot match one: it is not
/// hashed.
pub const MAP_EXACT_LENS: &str = "EXACT_LENS";
/// `LruHashMap<ConnKey, Conn>`: each tracked connection's client stream (ingress) and server
/// responses (egress).
pub const MAP_CONNS: &str = "CONNS";
/// `LruHashMap<ConnKey, [u8; PATH_MAX]>`: the path of a request line split across segments.
pub const MAP_PENDING: &str = "PENDING";
/// `LruHashMap<ConnKey, tcp::Handshake>`: handshakes under way, from the client's SYN to the
/// ACK that completes them (then the connection gets its `CONNS` entry). Separate from
/// `CONNS`, so that a flood of SYNs (spoofed or not) evicts only other half-open handshakes,
/// never an established connection's state.
pub const MAP_SYNS: &str = "SYNS";
/// Handshakes under way at once.
pub const SYNS_MAX: u32 = 65_536;
/// `PerCpuArray<ReplyScratch>` with one entry: the egress classifier's working memory.
pub const MAP_REPLY_SCRATCH: &str = "REPLY_SCRATCH";
/// Tracked connections (default; `filterd --max-connections` sets the table's size at load).
pub const CONNS_MAX: u32 = 65_536;
/// Connections with a request line in flight across segments at once.
pub const PENDING_MAX: u32 = 4_096;
/// `Array<Settings>` with one entry: run-time switches.
pub const MAP_SETTINGS: &str = "SETTINGS";
/// `PerCpuArray<u64>` indexed by [`crate::Reason`].
pub const MAP_STATS: &str = "STATS";
/// `RingBuf` of [`RejectEvent`].
pub const MAP_EVENTS: &str = "EVENTS";
/// `PerCpuArray<Scratch>` with one entry: the classifier's working memory.
pub const MAP_SCRATCH: &str = "SCRATCH";
/// The load-time global of type [`LoadConfig`].
pub const GLOBAL_CONFIG: &str = "FILTER_CONFIG";
/// The classifier's program name (its Rust function name).
pub const PROG_INGRESS: &str = "http_ingress";
/// The egress classifier's program name (frames the server's responses).
pub const PROG_EGRESS: &str = "http_egress";

/// `ProgramArray` of the classifiers' later stages, indexed by [`stage`]: each stage is a
/// program of its own, verified on its own, entered with a tail call. The daemon fills it
/// after loading the programs; a missing stage fails closed ([`crate::Reason::StageFailed`]).
pub const MAP_STAGES: &str = "STAGES";

/// Indices of [`MAP_STAGES`], and the program each holds ([`STAGE_PROGS`]).
pub mod stage {
    /// The client's new bytes through the stream parser, window by window; each request's
    /// path hashed and looked up, and the request judged.
    pub const INGRESS_PARSE: u32 = 0;
    /// A request path that is not plain canonicalized (then back to `INGRESS_PARSE`).
    pub const INGRESS_CANON: u32 = 1;
    /// The segment's verdict applied: passed, cut, held or turned into a reset; the stream
    /// state saved.
    pub const INGRESS_FINISH: u32 = 2;
    /// The server's new bytes framed into responses.
    pub const EGRESS_FRAME: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// The stage programs by [`stage`] index (their Rust function names).
pub const STAGE_PROGS: [&str; stage::COUNT as usize] = [
    "ingress_parse",
    "ingress_canon",
    "ingress_finish",
    "egress_frame",
];

/// Request paths canonicalized per segment. Each costs two tail calls (into `INGRESS_CANON`
/// and back into the parser) of the 33 the kernel allows a packet; a segment that starts more
/// requests with paths that are not plain is cut before the next one, which the client sends
/// again. (Plain paths, the common case, cost no tail call.)
pub const CANONS_MAX: u32 = 14;

/// Capacity of each policy map.
pub const RULES_MAX: u32 = 131_072;
/// Capacity of each prefix-rule map.
pub const PREFIX_RULES_MAX: u32 = 16_384;
/// Longest prefix-rule path (the LPM trie's key data).
pub const PREFIX_MAX: usize = 256;
/// Key data of a prefix-rule map; the LPM key is `{ prefixlen: u32 (bits), data }`.
pub type PrefixData = [u8; PREFIX_MAX];

/// Bitmap of the path lengths (in bytes) some exact rule of a rule set has: bit `len %
/// PATH_MAX` ([`add_exact_len`], [`has_exact_len`]; no path is empty, so bit 0 stands for
/// `PATH_MAX`). A superset
/// is safe (a path of that length is hashed and looked up for nothing); a missing length is
/// not (its rules would never match).
pub type ExactLens = [u64; crate::PATH_MAX / 64];

/// Word and bit of a path length in [`ExactLens`].
#[inline(always)]
const fn exact_len_bit(len: usize) -> (usize, u64) {
    let b = len % crate::PATH_MAX;
    (b / 64, 1u64 << (b % 64))
}

/// Note a path length in `lens` (the daemon, for each exact rule it writes).
#[inline(always)]
pub fn add_exact_len(lens: &mut ExactLens, len: usize) {
    let (w, bit) = exact_len_bit(len);
    lens[w] |= bit;
}

/// Whether some exact rule of the set whose lengths `lens` are has a path of `len` bytes (the
/// classifier, before it hashes a long path).
#[inline(always)]
pub fn has_exact_len(lens: &ExactLens, len: usize) -> bool {
    let (w, bit) = exact_len_bit(len);
    lens[w] & bit != 0
}

/// [`RuleValue::flags`]: the rule is a prefix rule (informational; prefix rules live in
/// their own maps).
pub const RULE_PREFIX: u32 = 1 << 0;
/// [`RuleValue::flags`]: monitor mode: count and log violations, block nothing.
pub const RULE_MONITOR: u32 = 1 << 1;

/// [`Settings::flags`]: global dry run: every rule behaves as if in monitor mode.
pub const SETTINGS_DRY_RUN: u32 = 1 << 0;
/// [`Settings::flags`]: answer OPTIONS on governed paths with 204 + `Allow` (else pass it).
pub const SETTINGS_OPTIONS_ANSWER: u32 = 1 << 1;
/// [`Settings::flags`]: pass requests whose line or headers exceed the inspection bound
/// instead of answering 414 / 431.
pub const SETTINGS_OVERSIZE_PASS: u32 = 1 << 2;
/// [`Settings::flags`]: `paths = "normalize"`: a path that is not in normal form is
/// canonicalized and judged under every reading `crate::canon` reports (else, `paths =
/// "strict"`, it is refused with 400).
pub const SETTINGS_PATHS_NORMALIZE: u32 = 1 << 3;
/// Ring buffer size in bytes (a power-of-two number of pages).
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Value of a policy map entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// [`crate::MethodSet`] bits of the methods the path allows.
    pub allow: u32,
    /// `RULE_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<RuleValue>() == 8);

/// Run-time switches, entry 0 of `SETTINGS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Index into [`MAP_RULES`] of the policy map in force.
    pub active_rules: u32,
    /// [`crate::MethodSet`] bits allowed on paths no rule names.
    pub default_allow: u32,
    /// `SETTINGS_*` bits.
    pub flags: u32,
    /// Until this time (`CLOCK_MONOTONIC` seconds, the clock of `bpf_ktime_get_ns`) a segment
    /// of a connection with no state is adopted: followed from that segment on, as a request
    /// boundary. The daemon sets it when it loads the classifier, so connections open before
    /// then are picked up. Afterwards a connection without state lost it to the full table's
    /// eviction, and its segment is refused (`conn_table_full`): reading it as a request
    /// boundary would let a client that evicts its own state smuggle a request in a body.
    pub adopt_until: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 16);

/// Values fixed when the program is loaded (a read-only global, `FILTER_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoadConfig {
    /// SipHash key for path hashes, drawn at random by the daemon.
    pub hash_key: [u64; 2],
    /// Bitmap of inspected TCP destination ports: bit `p % 64` of word `p / 64`.
    pub ports: [u64; 1024],
}
const _: () = assert!(core::mem::size_of::<LoadConfig>() == 16 + 8192);

impl LoadConfig {
    pub const fn zeroed() -> LoadConfig {
        LoadConfig {
            hash_key: [0; 2],
            ports: [0; 1024],
        }
    }

    pub fn add_port(&mut self, port: u16) {
        self.ports[(port / 64) as usize] |= 1 << (port % 64);
    }

    #[inline(always)]
    pub fn has_port(&self, port: u16) -> bool {
        self.ports[(port >> 6) as usize] & (1 << (port & 63)) != 0
    }
}

/// `skb->mark` of the frames the responder sends (its packet socket's `SO_MARK`). The egress
/// classifier passes them without a look: they are the filter's own answers, not the server's
/// bytes, so its view of the server's stream (position, next sequence number) stays where the
/// backend left it, and a client that lost the answer and sends the refused request again gets
/// it again at the same sequence number. Other `tc` filters on the interface see this mark too.
pub const RESPONDER_MARK: u32 = 0x4d05_f405;

/// Address family tags in [`RejectEvent::family`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// What the kernel tells the responder about a rejected request: enough to forge the answer
/// on the client's connection without any other state.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RejectEvent {
    /// Interface the request arrived on; the answer leaves through it.
    pub ifindex: u32,
    /// [`crate::Reason`] of the event; it says what the responder answers: `Rejected` 405,
    /// `OptionsAnswered` 204, `BadPath` 400, `LineTooLong` 414, `HeadersTooLarge` 431,
    /// `Monitored` nothing (log only).
    pub reason: u32,
    /// [`crate::MethodSet`] the path allows: the `Allow` header.
    pub allow: u32,
    /// Sequence number of the rejected segment (host order).
    pub seq: u32,
    /// Its acknowledgement number: the server's next sequence number (host order).
    pub ack: u32,
    /// TCP payload bytes of the rejected segment.
    pub payload_len: u32,
    pub client_port: u16,
    pub server_port: u16,
    /// Valid bytes in `line`.
    pub line_len: u16,
    /// Length of the path the kernel decided on.
    pub path_len: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// [`crate::Method`] of the request.
    pub method: u8,
    pub _pad0: [u8; 2],
    pub client_mac: [u8; 6],
    pub server_mac: [u8; 6],
    /// IPv4 addresses use the first 4 bytes; network byte order.
    pub client_addr_be: [u8; 16],
    pub server_addr_be: [u8; 16],
    /// The canonical path the decision was made on (its first `EVENT_LINE_MAX` bytes;
    /// `line_len` of them are valid).
    pub line: [u8; EVENT_LINE_MAX],
}
const _: () = assert!(core::mem::size_of::<RejectEvent>() == 80 + EVENT_LINE_MAX);
const _: () = assert!(core::mem::size_of::<RejectEvent>().is_multiple_of(8));

/// The classifier's per-CPU working memory: too big for the 512-byte BPF stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    /// The first `LINE_WINDOW` bytes of the TCP payload.
    pub line: [u8; crate::LINE_WINDOW],
    /// The canonical path of the current request (what the policy lookup and the event use).
    pub path: [u8; crate::PATH_MAX],
    /// The raw path the request-line parser extracted (canonicalized into `path` by a second
    /// pass).
    pub raw: [u8; crate::PATH_MAX],
    pub event: RejectEvent,
    /// The connection's stream state while a segment is processed (copied in and out of
    /// `CONNS`), stepped by the `bpf_loop` callback a word or a byte at a time; `replies` is
    /// only the not-followed state a new entry starts with (`CONNS` is inserted from here).
    pub conn: Conn,
    /// The connection's key.
    pub key: ConnKey,
    /// Valid bytes in `line`.
    pub window_len: u32,
    /// Bytes of `line` the callback consumed.
    pub consumed: u32,
    /// The segment being processed by the round callback: payload offset in the frame, its
    /// length, how far processing got, and whether a window was parsed.
    pub payload_off: u32,
    pub payload_len: u32,
    /// Where the current segment's headers are.
    pub hdr: HdrSlots,
    pub off: u32,
    pub decided: u32,
    /// Why the callback stopped (`STOP_*`), and for refusals the reason, method and allow set.
    pub stop: u32,
    pub stop_reason: u32,
    pub stop_method: u32,
    pub stop_allow: u32,
    /// Canonicalization under way (a word or a raw byte per `bpf_loop` callback): state,
    /// length so far, raw bytes to feed, and the first error (`Reason`, or `u32::MAX` for
    /// none).
    pub canon: crate::canon::Canon,
    pub canon_len: u16,
    pub _pad2: u16,
    pub canon_raw_len: u32,
    pub canon_err: u32,
    /// Path hash under way (fed up to `HASH_WORDS_PER_CALL` words per `bpf_loop` callback),
    /// and its word count.
    pub sip: crate::hash::SipState,
    pub sip_words: u32,
    pub _pad1: u32,
    /// All ones when the current request's raw path is already canonical
    /// (`LineParser::plain_mask`): the canonicalizer pass is skipped and the hash copies the
    /// raw path's words into `path` as it reads them; else 0. A copy of what `stream.line`
    /// says, kept as a whole word: computing the mask from the parser's byte inside the hash
    /// callback costs the verifier about 40k more instructions.
    pub plain: u64,
    /// Lookup key for the prefix-rule maps (map memory: too big for the stack).
    pub prefix_key: PrefixKey,
    /// The responses' half of the connection's entry as it was when the segment arrived (the
    /// egress side may move on meanwhile; nothing here needs it fresher): the server's next
    /// sequence number, responses the egress side counted, and `REP_*` bits.
    pub rep_snd_nxt: u32,
    pub rep_done: u32,
    pub rep_state: u32,
    pub _pad3: u32,
    /// Raw path bytes the canonicalizer has taken so far (a word or a byte per callback).
    pub canon_pos: u32,
    /// Payload offset of `line`'s first byte (with `window_len`: the window a later round of
    /// the same segment may go on in instead of loading it again).
    pub win_off: u32,
    /// The segment's TCP header as received (a refusal rewrites it into the reset).
    pub tcp: [u8; crate::TCP_HLEN_MIN],
    /// Sequence number of the segment's first payload byte (after a SYN's own).
    pub seg_seq: u32,
    /// The connection's next expected byte when the segment arrived: the backend's `rcv_nxt`.
    pub seg_pos: u32,
    /// The segment's TCP flags.
    pub seg_flags: u32,
    /// Paths canonicalized in this segment so far (see [`CANONS_MAX`]).
    pub canons: u32,
    pub _pad4: u32,
    /// The segment's TCP option block, and the walk over it.
    pub opts: [u8; crate::tcp::OPTIONS_MAX],
    pub walk: crate::tcp::OptionWalk,
    pub _pad5: u32,
    /// The running sum of a checksum over the segment (`bpf_loop` over chunks of `line`).
    pub sum: SumJob,
    /// The judgement of the current request, written and read back so that what follows the
    /// lookups is one state for the verifier: the methods every reading of its path allows,
    /// the methods every reading whose rule enforces (is not in monitor mode; the default
    /// always does) allows, the canonical path's rule flags, nonzero if the canonical path has
    /// a rule.
    pub judge_allow: u32,
    pub judge_enforced: u32,
    pub judge_flags: u32,
    pub judge_rule: u32,
    /// The same two sets for the other readings of a path stage `INGRESS_CANON`
    /// canonicalized (`crate::canon`: the path as sent, `;` as text), looked up there
    /// (`MethodSet::ANY` both if there are none).
    pub other_allow: u32,
    pub other_enforced: u32,
    /// The rule set (`Settings::active_rules`) and default (`Settings::default_allow`) that
    /// stage read the other readings under: the canonical path is judged under the same ones,
    /// so that a policy switched meanwhile never mixes into one request.
    pub rules_active: u32,
    pub rules_default: u32,
    /// The canonical path's exact rule, if `exact_found` is 1 (written by the exact lookup,
    /// read back by the judgement).
    pub exact: RuleValue,
    pub exact_found: u32,
    pub _pad6: u32,
}
const _: () = assert!(core::mem::size_of::<Scratch>().is_multiple_of(8));

/// [`Scratch::rep_state`]: the responses are followed (`Replies::followed`).
pub const REP_FOLLOWED: u32 = 1 << 0;
/// … in lockstep, not framed (`Replies::is_idle`).
pub const REP_IDLE: u32 = 1 << 1;
/// … no longer framed (`Replies::is_lost`).
pub const REP_LOST: u32 = 1 << 2;
/// … switched protocols (`Replies::is_switched`).
pub const REP_SWITCHED: u32 = 1 << 3;
/// The server sent its FIN.
pub const REP_FIN: u32 = 1 << 4;

/// Why the `bpf_loop` callback stopped before the end of the window.
pub const STOP_NONE: u32 = 0;
/// Body bytes follow: consume them in bulk.
pub const STOP_BULK: u32 = 1;
/// The connection is no longer HTTP/1.1.
pub const STOP_TUNNEL: u32 = 2;
/// A monitor-mode violation: send a `Monitored` event, then go on.
pub const STOP_MONITOR: u32 = 3;
/// Refuse the current request (`stop_reason`: what the responder answers).
pub const STOP_REFUSE: u32 = 4;
/// The current request's path is complete: look it up, then go on.
pub const STOP_DECIDE: u32 = 5;
/// A method-override header ended: check the method it names, then go on.
pub const STOP_OVERRIDE: u32 = 6;
/// A window of the payload could not be loaded.
pub const STOP_LOAD_FAILED: u32 = 7;
/// The stream waits for the server's answer to an `Upgrade` / `CONNECT` request: the bytes
/// from here are held.
pub const STOP_AWAIT: u32 = 8;
/// The current request must wait (too many requests outstanding): the bytes from its start
/// are held.
pub const STOP_HOLD: u32 = 9;
/// The current request's path is not plain: canonicalize it (stage `INGRESS_CANON`), then
/// judge it.
pub const STOP_CANON: u32 = 10;
/// The current request's path is canonical in `Scratch::path`: judge it, then go on.
pub const STOP_JUDGE: u32 = 11;

/// A tracked connection (`CONNS`), keyed from the client's side: where the client's byte
/// stream is (written by the ingress classifier) and where the server's responses are
/// (written by the egress classifier, read by the ingress one to time refusals and settle
/// upgrades). One entry, so one lookup per packet on each side and both halves evicted
/// together; each side writes only its own half.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub stream: crate::stream::Stream,
    pub replies: crate::reply::Replies,
    /// What the server's TCP knows of the client (ingress side; see [`crate::tcp`]).
    pub client: crate::tcp::ClientView,
    /// The server's receive window (egress side).
    pub server: crate::tcp::ServerView,
}
const _: () = assert!(core::mem::size_of::<Conn>().is_multiple_of(8));
const _: () = assert!(core::mem::align_of::<Conn>() >= 8);

/// The egress classifier's per-CPU working memory.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ReplyScratch {
    /// A window of the server's payload.
    pub window: [u8; crate::LINE_WINDOW],
    /// The connection's response state while a segment is processed (copied in and out of
    /// its `CONNS` entry).
    pub replies: crate::reply::Replies,
    /// What the ingress state says about the requests the backend got.
    pub view: crate::reply::ReqView,
    pub key: ConnKey,
    /// Payload offset in the frame, payload length, bytes framed so far.
    pub payload_off: u32,
    pub payload_len: u32,
    pub off: u32,
    /// Valid bytes in `window`.
    pub window_len: u32,
    /// The byte callback's position in `window` (a body run moves it by the run's length).
    pub widx: u32,
    /// Non-zero when the segment carries the server's FIN.
    pub fin: u32,
    /// Where the current segment's headers are.
    pub hdr: HdrSlots,
    /// The segment's TCP option block, and the walk over it (the server's SYN|ACK).
    pub opts: [u8; crate::tcp::OPTIONS_MAX],
    pub walk: crate::tcp::OptionWalk,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ReplyScratch>().is_multiple_of(8));

/// A one's-complement sum over part of the frame, chunk by chunk (a `bpf_loop` in the kernel):
/// where the part starts and how long it is, and the sum so far.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SumJob {
    pub off: u32,
    pub len: u32,
    /// `bpf_csum_diff`'s running value (byte order as the helper keeps it).
    pub sum: u32,
    /// 0 while good; 1 once a chunk could not be read or summed.
    pub failed: u32,
}

/// Where a segment's headers are (`crate::packet::Segment`), parked in a classifier's scratch:
/// written after the header walk and read back, so that every layout the walk can take (VLAN
/// tags, IPv4 options, IPv6 extension headers) reaches the rest of the program as one state
/// for the verifier, and so later stages find them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HdrSlots {
    pub l3: u32,
    pub l4: u32,
    pub ip_end: u32,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<HdrSlots>() == 16);

/// A connection, from the client's side. Addresses in network order (IPv4 in the first four
/// bytes); ports in host order; zero padding. 8-aligned, so the classifiers write it as five
/// words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    pub client_addr_be: [u8; 16],
    pub server_addr_be: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 40);

/// Key of a prefix-rule map, laid out as the kernel's LPM trie key: the prefix length in
/// bits, then the bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PrefixKey {
    pub prefixlen: u32,
    pub data: PrefixData,
}
const _: () = assert!(core::mem::size_of::<PrefixKey>() == 4 + PREFIX_MAX);

/// Slots in `STATS`.
pub const STATS_SLOTS: u32 = REASON_COUNT_U32;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no padding the compiler inserts.
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::LoadConfig {}
    unsafe impl aya::Pod for super::RejectEvent {}
    unsafe impl aya::Pod for super::ConnKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_length_has_its_own_bit() {
        let mut lens = ExactLens::default();
        for len in 1..=crate::PATH_MAX {
            assert!(!has_exact_len(&lens, len), "length {len} shares a bit");
            add_exact_len(&mut lens, len);
            assert!(has_exact_len(&lens, len));
        }
        assert!(lens.iter().all(|&w| w == u64::MAX));
    }

    #[test]
    fn port_bitmap() {
        let mut c = LoadConfig::zeroed();
        for p in [0u16, 80, 8080, 65535] {
            assert!(!c.has_port(p));
            c.add_port(p);
            assert!(c.has_port(p));
        }
        assert!(!c.has_port(81));
    }
}
