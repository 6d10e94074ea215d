//! Every map and load-time global of the classifier. Names, key and value types come from
//! `filter-common`; the static names here must match `filter_common::MAP_*` (the kernel
//! fixture tests open each map by those names).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use filter_common::{
    tcp::Handshake, Conn, ConnKey, ExactLens, LoadConfig, PrefixData, ReplyScratch, RuleValue,
    Scratch, Settings, CONNS_MAX, EVENTS_BYTES, PATH_MAX, PENDING_MAX, PREFIX_RULES_MAX, RULES_MAX,
    STATS_SLOTS, SYNS_MAX,
};

/// The classifiers' later stages, index `filter_common::stage::*` → program. Filled by the
/// daemon's `Dataplane` after loading; read by every `tail_call`. Pinned with the links (a
/// program array loses its entries when the last user-space reference goes, and the filter
/// must keep enforcing after the daemon exits).
#[map]
pub static STAGES: ProgramArray = ProgramArray::with_max_entries(filter_common::stage::COUNT, 0);

/// Policy A: key `u64` path hash, value `RuleValue`. Written by the daemon's `Dataplane`,
/// read by the classifier when `SETTINGS.active_rules == 0`. `RULES_MAX` entries: room for
/// a 100k-rule policy.
#[map]
pub static RULES_A: HashMap<u64, RuleValue> = HashMap::with_max_entries(RULES_MAX, 0);

/// Policy B: as `RULES_A`, in force when `SETTINGS.active_rules == 1`. A whole new policy is
/// written into the inactive map and switched in with one `SETTINGS` write.
#[map]
pub static RULES_B: HashMap<u64, RuleValue> = HashMap::with_max_entries(RULES_MAX, 0);

/// Prefix rules A: LPM trie, key `{prefixlen bits, path bytes}`, value `RuleValue`; paired
/// with `RULES_A` (same active index). Written by the `Dataplane`, read when no exact rule
/// matches. `PREFIX_RULES_MAX` entries: prefix rules are few (subtrees), each costs a trie node.
#[map]
pub static PREFIX_A: LpmTrie<PrefixData, RuleValue> =
    LpmTrie::with_max_entries(PREFIX_RULES_MAX, 0);

/// Prefix rules B: as `PREFIX_A`, paired with `RULES_B`.
#[map]
pub static PREFIX_B: LpmTrie<PrefixData, RuleValue> =
    LpmTrie::with_max_entries(PREFIX_RULES_MAX, 0);

/// The lengths of each rule set's exact rule paths (`ExactLens`, entry `i` for `RULES_A|B[i]`),
/// written by the daemon with the set: a path of another length is not hashed.
#[map]
pub static EXACT_LENS: Array<ExactLens> = Array::with_max_entries(2, 0);

/// Connection table: key `ConnKey` (the client's side), value `Conn`: the client's byte
/// stream (next sequence number, parse state, current request's verdict), written by the
/// ingress classifier, which creates the entry at the client's SYN and removes it at its FIN
/// or RST; and the server's responses (next sequence number, responses completed, framing
/// state), written by the egress classifier from the server's SYN|ACK on and read by the
/// ingress one to time refusals and settle upgrades. LRU so that a full table evicts the
/// stalest connection, both halves together.
#[map]
pub static CONNS: LruHashMap<ConnKey, Conn> = LruHashMap::with_max_entries(CONNS_MAX, 0);

/// Handshakes under way: key `ConnKey` (the client's side), value `Handshake`. Written by the
/// ingress classifier at the client's SYN and by the egress one at the server's SYN|ACK; read
/// by the ingress one at the ACK that completes the handshake (which gives the connection its
/// `CONNS` entry and removes this one). LRU and apart from `CONNS`: a flood of SYNs evicts only
/// other half-open handshakes.
#[map]
pub static SYNS: LruHashMap<ConnKey, Handshake> = LruHashMap::with_max_entries(SYNS_MAX, 0);

/// One `ReplyScratch` per CPU: the egress classifier's payload window and state copy.
#[map]
pub static REPLY_SCRATCH: PerCpuArray<ReplyScratch> = PerCpuArray::with_max_entries(1, 0);

/// Paths of request lines split across segments, key `ConnKey`, value the path buffer.
/// Separate from `CONNS` so that the 1 KiB buffer is only held while a line is in flight.
#[map]
pub static PENDING: LruHashMap<ConnKey, [u8; PATH_MAX]> =
    LruHashMap::with_max_entries(PENDING_MAX, 0);

/// One `Settings` entry: active policy map and default for ungoverned paths. Written by the
/// daemon before it attaches the program, read per candidate request.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Per-CPU `u64` counters indexed by `Reason`. Written by the classifier, summed by the daemon.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

/// `RejectEvent`s for the responder. 1 MiB holds ~3000 events: bursts far beyond what the
/// responder drains between wakeups; overflow is counted as `EventLost`.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// One `Scratch` per CPU: payload window, path buffer and event under construction (the BPF
/// stack is 512 bytes). Only the classifier uses it, within one invocation.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Load-time configuration (hash key, inspected ports), set by the loader.
#[unsafe(no_mangle)]
pub static FILTER_CONFIG: LoadConfig = LoadConfig::zeroed();
