//! `Dataplane`: the only code that touches the kernel program and its maps.
//!
//! It loads the embedded object with the load-time configuration, writes the policy into the
//! maps, attaches the classifier to each interface (TCX links from kernel 6.6, netlink tc
//! before), and hands the event ring to the responder. Every map write's result is checked and
//! failures are counted; a failed write leaves the policy in force unchanged and is reported to
//! the caller. A program the kernel refuses is reported in one line ([`crate::verifier`]).
//!
//! A whole policy is written into the inactive pair of maps (`RULES_x` for exact rules,
//! `PREFIX_x` for prefix rules) and switched in with one `SETTINGS` write, so traffic sees the
//! old rule set or the new one, never a mix.
//!
//! Two programs go on each interface: the ingress classifier (`http_ingress`, the decision)
//! and the egress one (`http_egress`, which follows the server's responses for it); they share
//! the maps of one object. Both get the same lifecycle.
//!
//! Lifecycle and fail mode ([`Dataplane::attach_kept`], [`Dataplane::release`]), in one of two
//! [`AttachMode`]s:
//! - **TCX** (kernel ≥ 6.6): with a pin directory on bpffs, each interface's TCX links are
//!   pinned at `<pin>/links/<iface>` (ingress) and `<pin>/links-egress/<iface>` (egress), so the
//!   classifier keeps enforcing the last policy when the daemon exits or crashes (fail-closed).
//!   A restarted daemon loads a fresh program, writes the policy into its maps, and swaps it
//!   into the pinned link with `bpf_link_update`: no gap, no second attachment.
//! - **Netlink** (any kernel; the only way before 6.6): a `cls_bpf` filter in direct-action
//!   mode on the interface's `clsact` qdisc, ingress and egress, at a fixed place
//!   ([`tc_netlink::PRIORITY`], [`tc_netlink::HANDLE`]). A netlink filter belongs to no process:
//!   it stays when the daemon exits or crashes. A restarted daemon finds its predecessor's
//!   filter there (by place and program name) and replaces the program in place (a
//!   `RTM_NEWTFILTER` without `NLM_F_CREATE`: `cls_bpf` swaps the program atomically), so
//!   again no gap and never two. `<pin>/netlink/<iface>` (a directory on bpffs) records that
//!   this pin root's daemon put filters on the interface.
//!
//! An interface never keeps both kinds: after attaching one, the other kind of an earlier run
//! is removed (attached first, removed second: for that moment both run, rather than neither).
//! The verdict counters (`STATS`) are pinned under a directory named after their layout
//! version, so they survive restarts and a layout change never reuses a stale pin. With
//! `--fail-open` ([`Dataplane::detach_at_exit`]) TCX links belong to the process (the kernel
//! detaches them however it exits) and netlink filters are deleted when the daemon exits
//! cleanly (a crash leaves them: nothing ties them to the process).

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, IterableMap as _, LpmTrie, MapData, MapError, PerCpuArray,
        ProgramArray, RingBuf,
    },
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcError},
        ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use filter_common::{
    add_exact_len, hash, Conn, ConnKey, ExactLens, LoadConfig, PrefixData, Reason, RuleValue,
    Settings, CONNS_MAX, GLOBAL_CONFIG, MAP_CONNS, MAP_EVENTS, MAP_EXACT_LENS, MAP_PREFIX,
    MAP_RULES, MAP_SETTINGS, MAP_STAGES, MAP_STATS, PREFIX_MAX, PREFIX_RULES_MAX, PROG_EGRESS,
    PROG_INGRESS, REASON_COUNT, RULES_MAX, RULE_MONITOR, RULE_PREFIX, SETTINGS_DRY_RUN,
    SETTINGS_OPTIONS_ANSWER, SETTINGS_OVERSIZE_PASS, SETTINGS_PATHS_NORMALIZE, STAGE_PROGS,
};

use crate::policy::{MatchKind, Mode, OptionsMode, Oversize, PathsMode, Policy, Rule, RuleKey};
use crate::tc_netlink::{self, TcNetlinkError, HANDLE as TC_HANDLE, PRIORITY as TC_PRIORITY};
use crate::verifier;

/// Rules one exact-rule map holds.
pub const RULES_CAPACITY: usize = RULES_MAX as usize;
/// Rules one prefix-rule map holds.
pub const PREFIX_CAPACITY: usize = PREFIX_RULES_MAX as usize;

/// Default root of the daemon's pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/filterd";
/// Name of the directory (under the pin root) holding pinned maps. Bump the version whenever a
/// pinned map's key, value or size changes: aya silently reuses a pinned map whose layout no
/// longer matches (the stale-pin hazard), so a new layout must get a new directory.
pub fn pinned_maps_dir() -> String {
    format!("maps-v1-stats{REASON_COUNT}")
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The programs attached to each interface: name, TC attach point, and the directory (under
/// the pin root) of their pinned links.
const PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (PROG_INGRESS, TcAttachType::Ingress, "links"),
    (PROG_EGRESS, TcAttachType::Egress, "links-egress"),
];
const LINK_DIRS: [&str; 2] = [PROGRAMS[0].2, PROGRAMS[1].2];
/// Directory (under the pin root) of the netlink markers: `<pin>/netlink/<iface>` says this pin
/// root's daemon put its filters on `iface`.
const NETLINK_DIR: &str = "netlink";

/// Directory (under the pin root) of the pinned stage tables (`STAGES`), one per load, named
/// after the load's ingress program id. A program array loses its entries when its last
/// user-space reference goes, so the table of the programs in the pinned links is pinned as
/// long as they are attached: then the filter keeps all its stages after the daemon exits.
const STAGES_DIR: &str = "stages";

/// Every program of the object: the two attached classifiers, then their tail-call stages
/// (`filter_common::stage`).
pub const ALL_PROGRAMS: [&str; 2 + STAGE_PROGS.len()] = {
    let mut all = [""; 2 + STAGE_PROGS.len()];
    all[0] = PROGRAMS[0].0;
    all[1] = PROGRAMS[1].0;
    let mut i = 0;
    while i < STAGE_PROGS.len() {
        all[2 + i] = STAGE_PROGS[i];
        i += 1;
    }
    all
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filter-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this filterd was built without the kernel object; build it with `cargo xtask build`")]
    NoObject,
    #[error("loading the kernel object failed: {} (filterd needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_NET_RAW)", one_line(.0))]
    Load(#[source] aya::EbpfError),
    #[error("{0}")]
    BadOption(String),
    #[error("the kernel object has no {0}")]
    Missing(&'static str),
    #[error("prefix rules need the {} maps, which this kernel object does not have; rebuild with `cargo xtask build`", MAP_PREFIX.join("/"))]
    NoPrefixMaps,
    /// The kernel refused a program (one line: program, kernel, verdict, where the log is).
    #[error("{0}")]
    Verifier(Box<verifier::Refusal>),
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: ProgramError,
    },
    #[error("interface {iface}: cannot attach the classifier: {source}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("interface {iface}: pinned link {path}: {source}")]
    Link {
        iface: String,
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pin directory {path}: {why}")]
    PinDir { path: PathBuf, why: String },
    #[error("interface {iface}: no TCX on this kernel (Linux {kernel}; TCX links need 6.6): use `--attach netlink` or `--attach auto`")]
    NoTcx { iface: String, kernel: String },
    #[error("interface {iface}, tc {hook}: {what}: {source}")]
    Netlink {
        iface: String,
        hook: &'static str,
        what: &'static str,
        #[source]
        source: Box<NetlinkFailure>,
    },
    #[error("interface {iface}, tc {hook}: `{filter}` holds the place of filterd's filter (pref {TC_PRIORITY} handle {TC_HANDLE:#x}) and is not filterd's; remove it (`tc filter del dev {iface} {hook} pref {TC_PRIORITY}`) or move it")]
    ForeignFilter {
        iface: String,
        hook: &'static str,
        filter: Box<tc_netlink::Filter>,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// What went wrong in a netlink tc step.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkFailure {
    #[error(transparent)]
    Tc(#[from] TcError),
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error(transparent)]
    Dump(#[from] TcNetlinkError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the filter there runs program {found:?}, not the new one ({want})")]
    NotInPlace { want: u32, found: Option<u32> },
}

/// A message on one line (aya's BTF errors carry the kernel's multi-line log).
fn one_line(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    let mut lines = s.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default().to_owned();
    match lines.count() {
        0 => first,
        n => format!("{first} [{n} more lines]"),
    }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

fn prog_err(what: &str) -> impl FnOnce(ProgramError) -> DataplaneError + '_ {
    move |source| DataplaneError::Program {
        what: what.into(),
        source,
    }
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug)]
pub struct TestRunOutput {
    /// The TC action (`-1` pass on, `2` drop).
    pub action: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean run time per repetition, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// How [`Dataplane::attach_kept`] attached an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// A new TCX link or netlink filter.
    Fresh,
    /// The link or filter an earlier run left now runs this program (`bpf_link_update`, or a
    /// netlink replace in place).
    Adopted,
}

/// How the classifiers are attached to an interface so that they outlive the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (kernel ≥ 6.6), pinned under the pin root.
    Tcx,
    /// Netlink tc: `cls_bpf` filters in the `clsact` qdisc at a fixed place (any kernel).
    Netlink,
}

/// `filterd --attach`: a mode, or the best this kernel has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachChoice {
    /// TCX where the kernel has it (6.6 and later), else netlink.
    #[default]
    Auto,
    Tcx,
    Netlink,
}

impl AttachMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "netlink",
        }
    }

    /// The mode for `choice` on this kernel (asked on `iface`). `Tcx` on a kernel without
    /// TCX is an error that says so.
    pub fn choose(choice: AttachChoice, iface: &str) -> Result<AttachMode, DataplaneError> {
        match choice {
            AttachChoice::Netlink => Ok(AttachMode::Netlink),
            AttachChoice::Tcx if tcx_supported(iface) => Ok(AttachMode::Tcx),
            AttachChoice::Tcx => Err(DataplaneError::NoTcx {
                iface: iface.into(),
                kernel: verifier::kernel_release(),
            }),
            AttachChoice::Auto if tcx_supported(iface) => Ok(AttachMode::Tcx),
            AttachChoice::Auto => Ok(AttachMode::Netlink),
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether this kernel has TCX: a `BPF_PROG_QUERY` of `iface`'s TCX ingress hook succeeds
/// (kernels before 6.6 do not know the attach type). Asked of the kernel rather than read from
/// its version, so backports count.
pub fn tcx_supported(iface: &str) -> bool {
    match SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(iface, error = %e, "no TCX");
            false
        }
    }
}

fn hook_name(point: TcAttachType) -> &'static str {
    match point {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

fn ifindex(iface: &str) -> Result<u32, std::io::Error> {
    let c = std::ffi::CString::new(iface)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: if_nametoindex(3) with a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// What keeps one program attached to one hook.
enum Hold {
    /// The link stays inside the program: dropping the `Ebpf` detaches it.
    Process,
    /// A TCX link, pinned (it outlives the daemon) or not.
    Tcx { link: FdLink, pin: Option<PathBuf> },
    /// A netlink filter at the fixed place, running program `prog_id`. It stays when the
    /// daemon exits unless `remove_at_exit` (`--fail-open`).
    Netlink { prog_id: u32, remove_at_exit: bool },
}

/// One attached program on an interface and what keeps it attached.
struct Attached {
    iface: String,
    /// The egress program (else the ingress one).
    egress: bool,
    hold: Hold,
}

impl Attached {
    fn point(&self) -> TcAttachType {
        PROGRAMS[usize::from(self.egress)].1
    }
}

/// Entries and capacity of one map, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: usize,
}

/// Load-time choices (`filterd --max-connections`, `--adopt-window`).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Size of the connection table (`CONNS`); when it is full the least recently active
    /// connection's state is evicted.
    pub max_connections: u32,
    /// How long after the load a connection the classifier has no state for is adopted at
    /// its next segment (connections open before the load); after it, such a segment is
    /// refused (its state was evicted).
    pub adopt_window: std::time::Duration,
    /// Where the full verifier log of a refused program goes (`None`: [`verifier::LOG_DIR`],
    /// else the temporary directory).
    pub verifier_log_dir: Option<PathBuf>,
    /// The classifiers' own diagnostics (`filterd --bpf-log`, [`crate::kernel_log`]); off, the
    /// verifier removes them from the programs.
    pub bpf_log: bool,
}

/// Default of [`LoadOptions::adopt_window`]: longer than common keep-alive timeouts (nginx 75 s),
/// so idle keep-alive connections open at a restart are adopted at their next request.
pub const DEFAULT_ADOPT_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            max_connections: CONNS_MAX,
            adopt_window: DEFAULT_ADOPT_WINDOW,
            verifier_log_dir: None,
            bpf_log: false,
        }
    }
}

/// `CLOCK_MONOTONIC` in whole seconds: the clock of the classifier's `bpf_ktime_get_ns`.
fn monotonic_secs() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime(2) with a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

pub struct Dataplane {
    // Keeps the program loaded; dropping it detaches links still inside it.
    ebpf: Ebpf,
    rules: [HashMap<MapData, u64, RuleValue>; 2],
    /// `None` until the kernel object has prefix-rule maps.
    prefix: Option<[LpmTrie<MapData, PrefixData, RuleValue>; 2]>,
    settings: Array<MapData, Settings>,
    /// The lengths of each rule set's exact rule paths (`EXACT_LENS`), and what was written.
    exact_lens: Array<MapData, ExactLens>,
    lens_now: [ExactLens; 2],
    stats: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    /// The classifiers' log records, with `LoadOptions::bpf_log` (for the daemon, once).
    kernel_log: Option<crate::kernel_log::KernelLog>,
    key: [u64; 2],
    active: u32,
    /// Whether the inactive maps may hold entries (they are cleared before the next apply).
    inactive_dirty: bool,
    /// The switches last written, so a dry-run change keeps them.
    settings_now: Settings,
    /// The connection table, read for its fill level.
    conns: HashMap<MapData, ConnKey, [u8; size_of::<Conn>()]>,
    max_connections: u32,
    dry_run: bool,
    /// Entries in the active maps (exact, prefix) and map writes that failed, ever: shared
    /// with the [`Observer`]s.
    shared: Arc<Shared>,
    pin_root: Option<PathBuf>,
    attached: Vec<Attached>,
    /// The stage table (a `ProgramArray`), held so its entries stay (see [`STAGES_DIR`]).
    stages: aya::maps::Map,
    /// Where this load pinned it, once a link was pinned.
    stages_pin: Option<PathBuf>,
}

fn bpffs(path: &Path) -> Option<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs(2) with a NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Make sure `dir` exists on bpffs. Under `/sys/fs/bpf` a missing bpffs is mounted (as
/// systemd and most distributions do at boot); anywhere else it is an error with a hint.
pub fn ensure_pin_dir(dir: &Path) -> Result<(), DataplaneError> {
    let err = |why: String| DataplaneError::PinDir {
        path: dir.to_owned(),
        why,
    };
    let sys = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys) && bpffs(sys) != Some(true) {
        // SAFETY: mount(2) with NUL-terminated literals.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(err(format!(
                "/sys/fs/bpf is not bpffs and mounting it failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    for links in LINK_DIRS {
        std::fs::create_dir_all(dir.join(links))
            .map_err(|e| err(format!("cannot create it: {e}")))?;
    }
    if bpffs(dir) != Some(true) {
        return Err(err(
            "is not on a BPF filesystem (mount one with `mount -t bpf bpf DIR`)".into(),
        ));
    }
    Ok(())
}

impl Dataplane {
    /// Load and verify the classifier with a fresh random hash key. Nothing is pinned, nothing
    /// is attached yet, and the policy is empty (default `any`) until [`Dataplane::apply`].
    pub fn load(ports: &[u16]) -> Result<Dataplane, DataplaneError> {
        Dataplane::load_with(ports, None)
    }

    /// As [`Dataplane::load`]; with `pin_root`, the verdict counters are pinned (and an
    /// earlier run's reused) under `<pin_root>/<pinned_maps_dir()>`, and
    /// [`Dataplane::attach_pinned`] pins links under `<pin_root>/links`.
    pub fn load_with(ports: &[u16], pin_root: Option<&Path>) -> Result<Dataplane, DataplaneError> {
        Dataplane::load_opts(ports, pin_root, &LoadOptions::default())
    }

    /// As [`Dataplane::load_with`], with the connection table's size and the adoption window
    /// of `opts`.
    pub fn load_opts(
        ports: &[u16],
        pin_root: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Dataplane, DataplaneError> {
        if opts.max_connections == 0 {
            return Err(DataplaneError::BadOption(
                "the connection table needs room for at least one connection".into(),
            ));
        }
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).expect("the kernel's random source is available");
        let key = [
            u64::from_le_bytes(key[..8].try_into().unwrap()),
            u64::from_le_bytes(key[8..].try_into().unwrap()),
        ];
        let mut config = Box::new(LoadConfig::zeroed());
        config.hash_key = key;
        for &p in ports {
            config.add_port(p);
        }
        let mut loader = EbpfLoader::new();
        loader.override_global(GLOBAL_CONFIG, &*config, true);
        let log_level = crate::kernel_log::level(opts.bpf_log);
        loader.override_global(crate::kernel_log::LEVEL_GLOBAL, &log_level, true);
        loader.map_max_entries(MAP_CONNS, opts.max_connections);
        let stats_pin;
        if let Some(root) = pin_root {
            ensure_pin_dir(root)?;
            let maps = root.join(pinned_maps_dir());
            std::fs::create_dir_all(&maps).map_err(|e| DataplaneError::PinDir {
                path: maps.clone(),
                why: format!("cannot create it: {e}"),
            })?;
            remove_stale_map_dirs(root);
            stats_pin = maps.join(MAP_STATS);
            loader.map_pin_path(MAP_STATS, stats_pin.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(DataplaneError::Load)?;
        for name in ALL_PROGRAMS {
            load_program(&mut ebpf, name, opts.verifier_log_dir.as_deref())?;
        }
        let stages = fill_stages(&mut ebpf)?;
        let kernel_log = if opts.bpf_log {
            let log =
                aya_log::EbpfLogger::init_with_logger(&mut ebpf, crate::kernel_log::ToTracing)
                    .map_err(|e| DataplaneError::BadOption(format!("--bpf-log: {e}")))?;
            Some(log)
        } else {
            None
        };

        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::Missing(name));
        let rules = [
            HashMap::try_from(take(MAP_RULES[0])?).map_err(map_err(MAP_RULES[0]))?,
            HashMap::try_from(take(MAP_RULES[1])?).map_err(map_err(MAP_RULES[1]))?,
        ];
        let prefix = match (take(MAP_PREFIX[0]), take(MAP_PREFIX[1])) {
            (Ok(a), Ok(b)) => Some([
                LpmTrie::try_from(a).map_err(map_err(MAP_PREFIX[0]))?,
                LpmTrie::try_from(b).map_err(map_err(MAP_PREFIX[1]))?,
            ]),
            _ => {
                tracing::warn!(
                    "the kernel object has no prefix-rule maps: prefix rules are refused"
                );
                None
            }
        };
        let settings = Array::try_from(take(MAP_SETTINGS)?).map_err(map_err(MAP_SETTINGS))?;
        let exact_lens = Array::try_from(take(MAP_EXACT_LENS)?).map_err(map_err(MAP_EXACT_LENS))?;
        let stats = PerCpuArray::try_from(take(MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let events = RingBuf::try_from(take(MAP_EVENTS)?).map_err(map_err(MAP_EVENTS))?;
        let conns = HashMap::try_from(take(MAP_CONNS)?).map_err(map_err(MAP_CONNS))?;
        let adopt_until = monotonic_secs().saturating_add(opts.adopt_window.as_secs());
        let mut dp = Dataplane {
            ebpf,
            rules,
            prefix,
            settings,
            exact_lens,
            lens_now: [ExactLens::default(); 2],
            stats,
            events: Some(events),
            kernel_log,
            key,
            active: 0,
            // A fresh program's maps are empty.
            inactive_dirty: false,
            settings_now: Settings {
                adopt_until: u32::try_from(adopt_until).unwrap_or(u32::MAX),
                ..Settings::default()
            },
            conns,
            max_connections: opts.max_connections,
            dry_run: false,
            shared: Arc::default(),
            pin_root: pin_root.map(Path::to_owned),
            attached: Vec::new(),
            stages,
            stages_pin: None,
        };
        dp.apply(&Policy::default())?;
        Ok(dp)
    }

    fn program_named(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DataplaneError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing(name))?
            .try_into()
            .map_err(prog_err(name))
    }

    /// Attach the classifiers to `iface` (ingress and egress); the links live as long as this
    /// process (aya's choice of TCX from 6.6, else netlink, with a `clsact` qdisc added).
    pub fn attach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let tcx = tcx_supported(iface);
        for (name, point, _) in PROGRAMS {
            if !tcx {
                ensure_clsact(iface, point)?;
            }
            self.program_named(name)?
                .attach(iface, point)
                .map_err(|source| DataplaneError::Attach {
                    iface: iface.into(),
                    source,
                })?;
            self.attached.push(Attached {
                iface: iface.to_owned(),
                egress: point == TcAttachType::Egress,
                hold: Hold::Process,
            });
        }
        Ok(())
    }

    fn link_pin(&self, dir: &str, iface: &str) -> Option<PathBuf> {
        self.pin_root.as_ref().map(|r| r.join(dir).join(iface))
    }

    fn netlink_marker(&self, iface: &str) -> Option<PathBuf> {
        self.link_pin(NETLINK_DIR, iface)
    }

    /// Attach to `iface` (ingress and egress) in `mode` so that the classifiers outlive the
    /// daemon: adopt what an earlier run left (the new program swapped in, no gap, no second
    /// attachment), or attach afresh; then remove what an earlier run left there in the other
    /// mode, so the interface never keeps the filter twice (logged). Write the policy first.
    /// TCX needs [`Dataplane::load_with`] with a pin root. The egress program goes first, so
    /// the ingress program never runs on an interface without it. Returns how the ingress
    /// program was attached.
    pub fn attach_kept(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<Adoption, DataplaneError> {
        match mode {
            AttachMode::Tcx => {
                let how = self.attach_pinned(iface)?;
                self.remove_netlink_filters(iface);
                Ok(how)
            }
            AttachMode::Netlink => {
                let how = self.attach_netlink(iface)?;
                self.remove_tcx_links(iface);
                Ok(how)
            }
        }
    }

    /// Attach to `iface` (ingress and egress) through pinned TCX links: adopt the links an
    /// earlier run pinned (atomic program swap, no gap, no second attachment), or create and
    /// pin them. Needs [`Dataplane::load_with`] with a pin root; write the policy first. The
    /// egress link goes first, so the ingress program never runs on an interface without it.
    /// Returns how the ingress link was attached. [`Dataplane::attach_kept`] also removes
    /// netlink filters an earlier run left.
    pub fn attach_pinned(&mut self, iface: &str) -> Result<Adoption, DataplaneError> {
        self.pin_stages()?;
        let egress = self.attach_pinned_one(iface, PROGRAMS[1])?;
        let ingress = self.attach_pinned_one(iface, PROGRAMS[0])?;
        if egress != ingress {
            tracing::info!(
                iface,
                ?ingress,
                ?egress,
                "the two links were attached differently"
            );
        }
        Ok(ingress)
    }

    fn prog_id(&mut self, name: &'static str) -> Result<u32, DataplaneError> {
        Ok(self
            .program_named(name)?
            .info()
            .map_err(prog_err(name))?
            .id())
    }

    fn attach_pinned_one(
        &mut self,
        iface: &str,
        (name, point, dir): (&'static str, TcAttachType, &str),
    ) -> Result<Adoption, DataplaneError> {
        let egress = point == TcAttachType::Egress;
        let path = self
            .link_pin(dir, iface)
            .ok_or_else(|| DataplaneError::PinDir {
                path: PathBuf::new(),
                why: "no pin directory configured".into(),
            })?;
        let link_err = |source| DataplaneError::Link {
            iface: iface.into(),
            path: path.clone(),
            source,
        };
        let prog_id = self.prog_id(name)?;
        if path.exists() {
            match self.adopt(iface, &path, prog_id, name, point) {
                Ok(link) => {
                    self.attached.push(Attached {
                        iface: iface.to_owned(),
                        egress,
                        hold: Hold::Tcx {
                            link,
                            pin: Some(path),
                        },
                    });
                    return Ok(Adoption::Adopted);
                }
                Err(e) => {
                    // A link whose interface went away, or a pin of something else: drop it
                    // and attach afresh.
                    tracing::warn!(iface, pin = %path.display(), error = %e, "cannot adopt the pinned link; replacing it");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let prog = self.program_named(name)?;
        let id = prog
            .attach(iface, point)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.into(),
                source,
            })?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        let fd = FdLink::try_from(link).map_err(link_err)?;
        let pinned = fd.pin(&path).map_err(|e| DataplaneError::PinDir {
            path: path.clone(),
            why: format!("cannot pin the link: {e}"),
        })?;
        self.attached.push(Attached {
            iface: iface.to_owned(),
            egress,
            hold: Hold::Tcx {
                link: pinned.into(),
                pin: Some(path),
            },
        });
        Ok(Adoption::Fresh)
    }

    fn adopt(
        &mut self,
        iface: &str,
        path: &Path,
        prog_id: u32,
        name: &'static str,
        point: TcAttachType,
    ) -> Result<FdLink, String> {
        let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
        let link =
            SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
        let prog = self.program_named(name).map_err(|e| e.to_string())?;
        let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
        let link = prog.take_link(id).map_err(|e| e.to_string())?;
        let fd = FdLink::try_from(link).map_err(|e| e.to_string())?;
        // The swap succeeds on a link whose interface is gone; make sure it is live here.
        let (_, progs) = SchedClassifier::query_tcx(iface, point)
            .map_err(|e| format!("querying {iface}'s TCX programs: {e}"))?;
        if !progs.iter().any(|p| p.id() == prog_id) {
            return Err(format!("the link is not attached to {iface}"));
        }
        Ok(fd)
    }

    /// Pin this load's stage table (once), before the first pinned link runs its programs.
    fn pin_stages(&mut self) -> Result<(), DataplaneError> {
        if self.stages_pin.is_some() {
            return Ok(());
        }
        let root = self
            .pin_root
            .as_ref()
            .ok_or_else(|| DataplaneError::PinDir {
                path: PathBuf::new(),
                why: "no pin directory configured".into(),
            })?;
        let dir = root.join(STAGES_DIR);
        let err = |why: String| DataplaneError::PinDir {
            path: dir.clone(),
            why,
        };
        std::fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create it: {e}")))?;
        let id = self
            .program_named(PROG_INGRESS)?
            .info()
            .map_err(prog_err(PROG_INGRESS))?
            .id();
        let path = dir.join(id.to_string());
        let _ = std::fs::remove_file(&path);
        self.stages
            .pin(&path)
            .map_err(|e| err(format!("cannot pin {MAP_STAGES}: {e}")))?;
        self.stages_pin = Some(path);
        Ok(())
    }

    /// Attach to `iface` (egress, then ingress) through netlink `cls_bpf` filters at the fixed
    /// place, replacing the program of the filters an earlier run left there.
    fn attach_netlink(&mut self, iface: &str) -> Result<Adoption, DataplaneError> {
        // A netlink filter outlives the process whatever the fail mode: its stage table must too.
        self.pin_stages()?;
        if let Some(marker) = self.netlink_marker(iface) {
            // Before the filters: a crash in between still leaves the record.
            std::fs::create_dir_all(&marker).map_err(|e| DataplaneError::PinDir {
                path: marker.clone(),
                why: format!("cannot create it: {e}"),
            })?;
        }
        let egress = self.attach_netlink_one(iface, PROGRAMS[1])?;
        let ingress = match self.attach_netlink_one(iface, PROGRAMS[0]) {
            Ok(how) => how,
            Err(e) => {
                // An egress filter this start added goes again; one it adopted was there
                // before and stays.
                if egress == Adoption::Fresh {
                    if let Some(Attached {
                        hold: Hold::Netlink { prog_id, .. },
                        ..
                    }) = self.attached.pop()
                    {
                        Dataplane::delete_own_filter(iface, TcAttachType::Egress, prog_id);
                    }
                }
                return Err(e);
            }
        };
        if egress != ingress {
            tracing::info!(
                iface,
                ?ingress,
                ?egress,
                "the two filters were attached differently"
            );
        }
        Ok(ingress)
    }

    fn attach_netlink_one(
        &mut self,
        iface: &str,
        (name, point, _): (&'static str, TcAttachType, &str),
    ) -> Result<Adoption, DataplaneError> {
        let hook = hook_name(point);
        let index = ifindex(iface).map_err(nl_err(iface, hook, "finding the interface"))?;
        let prog_id = self.prog_id(name)?;
        ensure_clsact(iface, point)?;
        let before = tc_netlink::filters(index, point).map_err(nl_err(
            iface,
            hook,
            "listing the filters",
        ))?;
        let prog = self.program_named(name)?;
        let how = match before.iter().find(|f| f.at_our_place()) {
            Some(f) if !f.runs(name) => {
                return Err(DataplaneError::ForeignFilter {
                    iface: iface.into(),
                    hook,
                    filter: Box::new(f.clone()),
                })
            }
            Some(f) => match tc_netlink::replace(prog, iface, point) {
                Ok(()) => {
                    tracing::debug!(iface, hook, old = %f, "replaced the program of the filter an earlier run left");
                    Adoption::Adopted
                }
                // Deleted since the dump: add it.
                Err(e) if tc_netlink::errno(&e) == Some(libc::ENOENT) => {
                    tc_netlink::create(prog, iface, point).map_err(nl_err(
                        iface,
                        hook,
                        "adding the filter",
                    ))?;
                    Adoption::Fresh
                }
                Err(e) => {
                    return Err(nl_err(iface, hook, "replacing the program of the filter")(
                        e,
                    ))
                }
            },
            None => {
                tc_netlink::create(prog, iface, point).map_err(nl_err(
                    iface,
                    hook,
                    "adding the filter",
                ))?;
                Adoption::Fresh
            }
        };
        let after = tc_netlink::filters(index, point).map_err(nl_err(
            iface,
            hook,
            "listing the filters",
        ))?;
        let found = after
            .iter()
            .find(|f| f.at_our_place())
            .and_then(|f| f.prog_id);
        if found != Some(prog_id) {
            return Err(nl_err(iface, hook, "checking the filter")(
                NetlinkFailure::NotInPlace {
                    want: prog_id,
                    found,
                },
            ));
        }
        self.attached.push(Attached {
            iface: iface.to_owned(),
            egress: point == TcAttachType::Egress,
            hold: Hold::Netlink {
                prog_id,
                remove_at_exit: false,
            },
        });
        // Another filter running this program's name (not at our place): a second copy.
        for f in after.iter().filter(|f| f.runs(name) && !f.at_our_place()) {
            match tc_netlink::delete(iface, point, f) {
                Ok(()) => {
                    tracing::warn!(iface, hook, filter = %f, "removed a second filter running {name}: the interface must not run it twice")
                }
                Err(e) => {
                    tracing::warn!(iface, hook, filter = %f, error = %e, "cannot remove a second filter running {name}: the interface runs it twice until it goes")
                }
            }
        }
        Ok(how)
    }

    /// Netlink mode: detach the TCX links an earlier run pinned for `iface` under this pin
    /// root, and warn of any other TCX program of ours still attached there.
    fn remove_tcx_links(&self, iface: &str) {
        let mut removed = false;
        for dir in LINK_DIRS {
            let Some(pin) = self.link_pin(dir, iface) else {
                continue;
            };
            if !pin.exists() {
                continue;
            }
            match std::fs::remove_file(&pin) {
                Ok(()) => {
                    removed = true;
                    tracing::info!(iface, pin = %pin.display(), "detached the TCX link an earlier run pinned: the interface runs the netlink filters only");
                }
                Err(e) => {
                    tracing::warn!(iface, pin = %pin.display(), error = %e, "cannot remove the TCX link an earlier run pinned: the interface runs the filter twice until it goes")
                }
            }
        }
        if !tcx_supported(iface) {
            return;
        }
        // The kernel lets go of an unpinned link a moment later (a deferred put).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let left: Vec<(u32, &str)> = PROGRAMS
                .iter()
                .filter_map(|(name, point, _)| {
                    let (_, progs) = SchedClassifier::query_tcx(iface, *point).ok()?;
                    progs
                        .iter()
                        .find(|p| p.name_as_str() == Some(*name))
                        .map(|p| (p.id(), *name))
                })
                .collect();
            if left.is_empty() {
                return;
            }
            if !removed || std::time::Instant::now() >= deadline {
                for (id, name) in left {
                    tracing::warn!(iface, id, "a TCX program named {name} is still attached (held by a running process, or pinned outside this pin directory): the interface runs the filter twice until it goes");
                }
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// TCX mode: delete the netlink filters running our programs on `iface` (an earlier run in
    /// netlink mode), and its record.
    fn remove_netlink_filters(&self, iface: &str) {
        let Ok(index) = ifindex(iface) else {
            return;
        };
        for (name, point, _) in PROGRAMS {
            let filters = match tc_netlink::filters(index, point) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(iface, hook = hook_name(point), error = %e, "cannot list the netlink filters");
                    continue;
                }
            };
            for f in filters.iter().filter(|f| f.runs(name)) {
                match tc_netlink::delete(iface, point, f) {
                    Ok(()) => {
                        tracing::info!(iface, hook = hook_name(point), filter = %f, "removed the netlink filter an earlier run left: the interface runs the TCX links only")
                    }
                    Err(e) => {
                        tracing::warn!(iface, hook = hook_name(point), filter = %f, error = %e, "cannot remove the netlink filter an earlier run left: the interface runs the filter twice until it goes")
                    }
                }
            }
        }
        if let Some(marker) = self.netlink_marker(iface) {
            let _ = std::fs::remove_dir(marker);
        }
    }

    /// Delete our filter at the fixed place on `point` of `iface` if it still runs `prog_id`
    /// (a later daemon may have put its own program there since).
    fn delete_own_filter(iface: &str, point: TcAttachType, prog_id: u32) {
        let hook = hook_name(point);
        let filters = ifindex(iface)
            .map_err(TcNetlinkError::Socket)
            .and_then(|i| tc_netlink::filters(i, point));
        let filters = match filters {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(iface, hook, error = %e, "cannot list the netlink filters; the filter may stay");
                return;
            }
        };
        let Some(f) = filters.iter().find(|f| f.at_our_place()) else {
            return;
        };
        if f.prog_id != Some(prog_id) {
            tracing::info!(iface, hook, filter = %f, "left the filter in place: it runs another daemon's program now");
            return;
        }
        if let Err(e) = tc_netlink::delete(iface, point, f) {
            tracing::warn!(iface, hook, filter = %f, error = %e, "cannot delete the netlink filter");
        }
    }

    /// Detach what an earlier run attached to interfaces not in `keep` (the configuration no
    /// longer filters them): pinned TCX links under the pin root, and the netlink filters its
    /// records name; and unpin the stage tables of earlier loads (once every kept interface
    /// runs this load's programs, nothing uses them). Returns the interfaces detached.
    pub fn unpin_others(&self, keep: &[String]) -> Vec<String> {
        let Some(root) = &self.pin_root else {
            return Vec::new();
        };
        if let (Some(ours), Ok(dir)) = (&self.stages_pin, std::fs::read_dir(root.join(STAGES_DIR)))
        {
            for entry in dir.flatten() {
                if entry.path() != *ours {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let mut gone = Vec::new();
        for links in LINK_DIRS {
            let Ok(dir) = std::fs::read_dir(root.join(links)) else {
                continue;
            };
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name)
                    && std::fs::remove_file(entry.path()).is_ok()
                    && !gone.contains(&name)
                {
                    gone.push(name);
                }
            }
        }
        let Ok(dir) = std::fs::read_dir(root.join(NETLINK_DIR)) else {
            return gone;
        };
        for entry in dir.flatten() {
            let iface = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&iface) {
                continue;
            }
            if let Ok(index) = ifindex(&iface) {
                for (name, point, _) in PROGRAMS {
                    let Ok(filters) = tc_netlink::filters(index, point) else {
                        continue;
                    };
                    for f in filters.iter().filter(|f| f.at_our_place() && f.runs(name)) {
                        if let Err(e) = tc_netlink::delete(&iface, point, f) {
                            tracing::warn!(iface, filter = %f, error = %e, "cannot delete the netlink filter");
                        }
                    }
                }
            }
            let _ = std::fs::remove_dir(entry.path());
            if !gone.contains(&iface) {
                gone.push(iface);
            }
        }
        gone
    }

    /// End this daemon's hold on the classifiers. `fail_open`: detach them (remove the TCX
    /// pins, so the links go as the process exits; delete the netlink filters that still run
    /// this daemon's programs). Otherwise the pinned links and the netlink filters keep
    /// enforcing the last policy until a restarted daemon adopts them or an operator removes
    /// them.
    pub fn release(mut self, fail_open: bool) {
        self.let_go(fail_open);
    }

    fn let_go(&mut self, fail_open: bool) {
        // Whether a classifier of this load stays attached after the process.
        let mut stays = false;
        for a in std::mem::take(&mut self.attached) {
            let point = a.point();
            match a.hold {
                Hold::Process => {}
                Hold::Tcx { link, pin } => {
                    if let (true, Some(pin)) = (fail_open, &pin) {
                        if let Err(e) = std::fs::remove_file(pin) {
                            tracing::warn!(iface = a.iface, pin = %pin.display(), error = %e, "cannot remove the pinned link");
                        }
                    } else if pin.is_some() {
                        stays = true;
                    }
                    drop(link);
                }
                Hold::Netlink {
                    prog_id,
                    remove_at_exit,
                } => {
                    if fail_open || remove_at_exit {
                        Dataplane::delete_own_filter(&a.iface, point, prog_id);
                        if let Some(marker) = self.netlink_marker(&a.iface) {
                            // Empty once both hooks are done; the first try may fail.
                            let _ = std::fs::remove_dir(marker);
                        }
                    } else {
                        stays = true;
                    }
                }
            }
        }
        if !stays {
            self.unpin_stages();
        }
    }

    /// Remove this load's stage-table pin: no classifier of this load outlives the process.
    fn unpin_stages(&mut self) {
        if let Some(pin) = self.stages_pin.take() {
            let _ = std::fs::remove_file(pin);
        }
    }

    /// From now on the classifiers detach when this daemon exits (`--fail-open`): the TCX
    /// links' pins are removed now (the links belong to the process alone, and go however it
    /// exits; also those adopted from a fail-closed run), and the netlink filters are deleted
    /// when it exits cleanly ([`Dataplane::release`], or dropping the `Dataplane`). A crash
    /// leaves netlink filters attached: nothing ties them to a process.
    pub fn detach_at_exit(&mut self) {
        let mut netlink = false;
        for a in &mut self.attached {
            match &mut a.hold {
                Hold::Tcx { pin, .. } => {
                    if let Some(pin) = pin.take() {
                        let _ = std::fs::remove_file(pin);
                    }
                }
                Hold::Netlink { remove_at_exit, .. } => {
                    *remove_at_exit = true;
                    netlink = true;
                }
                Hold::Process => {}
            }
        }
        // TCX links go with the process, their stage table with them; a netlink filter left by
        // a crash keeps its own (it keeps enforcing, see above).
        if !netlink {
            self.unpin_stages();
        }
    }

    /// The interfaces the classifiers are attached to.
    pub fn attached(&self) -> Vec<String> {
        self.attached
            .iter()
            .filter(|a| !a.egress)
            .map(|a| a.iface.clone())
            .collect()
    }

    /// How the classifiers are attached (`None` before [`Dataplane::attach_kept`], or when
    /// they belong to the process through [`Dataplane::attach`]).
    pub fn attach_mode(&self) -> Option<AttachMode> {
        self.attached.iter().find_map(|a| match a.hold {
            Hold::Tcx { .. } => Some(AttachMode::Tcx),
            Hold::Netlink { .. } => Some(AttachMode::Netlink),
            Hold::Process => None,
        })
    }

    /// Whether the classifiers outlive the daemon (pinned TCX links, or netlink filters not
    /// deleted at exit).
    pub fn pinned(&self) -> bool {
        self.attached.iter().any(|a| match &a.hold {
            Hold::Tcx { pin, .. } => pin.is_some(),
            Hold::Netlink { remove_at_exit, .. } => !remove_at_exit,
            Hold::Process => false,
        })
    }

    /// Whether the kernel object has the prefix-rule maps.
    pub fn supports_prefix(&self) -> bool {
        self.prefix.is_some()
    }

    /// The event ring, for the responder (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The classifiers' log records (`LoadOptions::bpf_log`), for [`crate::kernel_log::run`]
    /// (once).
    pub fn take_kernel_log(&mut self) -> Option<crate::kernel_log::KernelLog> {
        self.kernel_log.take()
    }

    fn key_of(&self, path: &str) -> u64 {
        // Validated rule paths are at most PATH_MAX bytes.
        hash::hash_slice(&self.key, path.as_bytes()).expect("rule paths are validated")
    }

    fn prefix_key(path: &str) -> Key<PrefixData> {
        let mut data = [0u8; PREFIX_MAX];
        // Validated prefix paths are at most PREFIX_MAX bytes.
        data[..path.len()].copy_from_slice(path.as_bytes());
        Key::new((path.len() * 8) as u32, data)
    }

    fn value_of(rule: &Rule) -> RuleValue {
        let mut flags = 0;
        if rule.kind == MatchKind::Prefix {
            flags |= RULE_PREFIX;
        }
        if rule.mode == Mode::Monitor {
            flags |= RULE_MONITOR;
        }
        RuleValue {
            allow: rule.effective().0,
            flags,
        }
    }

    fn counted<T>(&mut self, r: Result<T, DataplaneError>) -> Result<T, DataplaneError> {
        if r.is_err() {
            self.shared.write_failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn clear_inactive(&mut self, next: usize) -> Result<(), DataplaneError> {
        let map = &mut self.rules[next];
        let keys = map.keys().collect::<Result<Vec<_>, _>>();
        remove_all(MAP_RULES[next], keys, |k| map.remove(k))?;
        if let Some(prefix) = &mut self.prefix {
            let map = &mut prefix[next];
            let keys = map.keys().collect::<Result<Vec<_>, _>>();
            remove_all(MAP_PREFIX[next], keys, |k| map.remove(k))?;
        }
        Ok(())
    }

    fn write_inactive(&mut self, next: usize, policy: &Policy) -> Result<(), DataplaneError> {
        if self.inactive_dirty {
            self.clear_inactive(next)?;
        }
        self.inactive_dirty = true;
        let mut lens = ExactLens::default();
        for rule in policy.rules.values() {
            let v = Self::value_of(rule);
            match rule.kind {
                MatchKind::Exact => {
                    add_exact_len(&mut lens, rule.path.len());
                    let k = self.key_of(&rule.path);
                    self.rules[next]
                        .insert(k, v, 0)
                        .map_err(map_err(MAP_RULES[next]))?;
                }
                MatchKind::Prefix => {
                    let prefix = self.prefix.as_mut().ok_or(DataplaneError::NoPrefixMaps)?;
                    prefix[next]
                        .insert(&Self::prefix_key(&rule.path), v, 0)
                        .map_err(map_err(MAP_PREFIX[next]))?;
                }
            }
        }
        self.write_lens(next, lens)
    }

    /// Write the lengths of rule set `set`'s exact rules.
    fn write_lens(&mut self, set: usize, lens: ExactLens) -> Result<(), DataplaneError> {
        self.exact_lens
            .set(set as u32, lens, 0)
            .map_err(map_err(MAP_EXACT_LENS))?;
        self.lens_now[set] = lens;
        Ok(())
    }

    fn flags(&self, policy: &Policy) -> u32 {
        let mut flags = 0;
        if self.dry_run {
            flags |= SETTINGS_DRY_RUN;
        }
        if policy.options == OptionsMode::Answer {
            flags |= SETTINGS_OPTIONS_ANSWER;
        }
        if policy.oversize == Oversize::Pass {
            flags |= SETTINGS_OVERSIZE_PASS;
        }
        if policy.paths == PathsMode::Normalize {
            flags |= SETTINGS_PATHS_NORMALIZE;
        }
        flags
    }

    /// Replace the whole policy atomically: the new rules go into the inactive maps, then one
    /// `SETTINGS` write switches the classifier over. On error the old policy stays in force.
    pub fn apply(&mut self, policy: &Policy) -> Result<(), DataplaneError> {
        if self.prefix.is_none() && policy.count(MatchKind::Prefix) > 0 {
            return Err(DataplaneError::NoPrefixMaps);
        }
        let next = 1 - self.active;
        let r = self.write_inactive(next as usize, policy);
        self.counted(r)?;
        let s = Settings {
            active_rules: next,
            default_allow: policy.default.effective().0,
            flags: self.flags(policy),
            adopt_until: self.settings_now.adopt_until,
        };
        let r = self.settings.set(0, s, 0).map_err(map_err(MAP_SETTINGS));
        self.counted(r)?;
        // The old maps keep their entries until the next full apply clears them, so a packet
        // that read the old index just before the switch still finds the old policy complete.
        self.active = next;
        self.settings_now = s;
        self.set_fill(
            policy.count(MatchKind::Exact),
            policy.count(MatchKind::Prefix),
        );
        Ok(())
    }

    /// Turn the global dry run on or off (every rule and the default behave as monitor).
    pub fn set_dry_run(&mut self, on: bool) -> Result<(), DataplaneError> {
        let mut s = self.settings_now;
        if on {
            s.flags |= SETTINGS_DRY_RUN;
        } else {
            s.flags &= !SETTINGS_DRY_RUN;
        }
        let r = self.settings.set(0, s, 0).map_err(map_err(MAP_SETTINGS));
        self.counted(r)?;
        self.settings_now = s;
        self.dry_run = on;
        Ok(())
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// Add or replace one rule in the policy in force (one atomic map update). The caller
    /// reports the new entry counts with [`Dataplane::set_fill`].
    pub fn upsert(&mut self, rule: &Rule) -> Result<(), DataplaneError> {
        let active = self.active as usize;
        let v = Self::value_of(rule);
        let r = match rule.kind {
            MatchKind::Exact => {
                // The length first: a packet that finds the rule hashes its path.
                let mut lens = self.lens_now[active];
                add_exact_len(&mut lens, rule.path.len());
                if lens != self.lens_now[active] {
                    let r = self.write_lens(active, lens);
                    self.counted(r)?;
                }
                let k = self.key_of(&rule.path);
                self.rules[active]
                    .insert(k, v, 0)
                    .map_err(map_err(MAP_RULES[active]))
            }
            MatchKind::Prefix => match self.prefix.as_mut() {
                None => Err(DataplaneError::NoPrefixMaps),
                Some(p) => p[active]
                    .insert(&Self::prefix_key(&rule.path), v, 0)
                    .map_err(map_err(MAP_PREFIX[active])),
            },
        };
        self.counted(r)
    }

    /// Remove one exact rule from the policy in force.
    pub fn remove(&mut self, path: &str) -> Result<(), DataplaneError> {
        self.remove_rule(&RuleKey::exact(path))
    }

    /// Remove one rule from the policy in force. An exact rule's length stays in `EXACT_LENS`
    /// until the next [`Dataplane::apply`]: a length no rule has any more only costs the hash.
    pub fn remove_rule(&mut self, key: &RuleKey) -> Result<(), DataplaneError> {
        let active = self.active as usize;
        let r = match key.kind {
            MatchKind::Exact => {
                let k = self.key_of(&key.path);
                match self.rules[active].remove(&k) {
                    Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                    Err(e) => Err(map_err(MAP_RULES[active])(e)),
                }
            }
            MatchKind::Prefix => match self.prefix.as_mut() {
                None => Ok(()),
                Some(p) => match p[active].remove(&Self::prefix_key(&key.path)) {
                    Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                    Err(e) => Err(map_err(MAP_PREFIX[active])(e)),
                },
            },
        };
        self.counted(r)
    }

    /// Record the active maps' entry counts after incremental changes.
    pub fn set_fill(&mut self, exact: usize, prefix: usize) {
        self.shared.fill[0].store(exact, Ordering::Relaxed);
        self.shared.fill[1].store(prefix, Ordering::Relaxed);
    }

    /// Entries and capacity of the policy in force and of the connection table, under stable
    /// names (`rules_exact`, `rules_prefix`, `connections`; which of the two map pairs is
    /// active changes with every replace).
    pub fn map_fill(&self) -> Vec<MapFill> {
        map_fill(
            &self.shared,
            self.prefix.is_some(),
            count_entries(&self.conns),
            self.max_connections,
        )
    }

    /// Connections the classifier follows now: a few batch lookups (`BPF_MAP_LOOKUP_BATCH`),
    /// not one syscall per connection.
    pub fn tracked_connections(&self) -> usize {
        count_entries(&self.conns)
    }

    /// Connections the classifier follows now, counted with batch lookups only (no fallback):
    /// the kernel fixture tier checks the batch path works on every kernel of the matrix.
    pub fn tracked_connections_batched(&self) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        batch_count(
            self.conns.map().fd().as_fd().as_raw_fd(),
            size_of::<ConnKey>(),
            size_of::<Conn>(),
        )
    }

    /// Connections the classifier follows now, walked key by key (one syscall each): what
    /// [`Dataplane::tracked_connections`] is checked against.
    pub fn tracked_connections_walked(&self) -> usize {
        self.conns.keys().filter(Result::is_ok).count()
    }

    /// A reader of this dataplane's counters, fill levels and attachments with handles of its
    /// own, for the API to use without the policy lock. `ifaces` are the interfaces the daemon
    /// is configured with (`/readyz` asks the kernel about each).
    pub fn observer(&mut self, ifaces: &[String]) -> Result<DataplaneObserver, DataplaneError> {
        let dup = |m: &MapData, name: &'static str| {
            m.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| DataplaneError::PinDir {
                    path: PathBuf::from(name),
                    why: format!("cannot duplicate the map's descriptor: {e}"),
                })
                .and_then(|fd| MapData::from_fd(fd).map_err(map_err(name)))
        };
        let stats = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(dup(
            self.stats.map(),
            MAP_STATS,
        )?))
        .map_err(map_err(MAP_STATS))?;
        let conns = HashMap::try_from(aya::maps::Map::LruHashMap(dup(
            self.conns.map(),
            MAP_CONNS,
        )?))
        .map_err(map_err(MAP_CONNS))?;
        let mode = self.attach_mode();
        let progs = match mode {
            Some(_) => Some((self.prog_id(PROG_INGRESS)?, self.prog_id(PROG_EGRESS)?)),
            None => None,
        };
        Ok(DataplaneObserver {
            stats,
            conns,
            shared: self.shared.clone(),
            max_connections: self.max_connections,
            prefix: self.prefix.is_some(),
            ifaces: ifaces.to_vec(),
            mode,
            progs,
            pinned: self.pinned(),
            dry_run: self.dry_run,
        })
    }

    /// Change the adoption window (see [`LoadOptions::adopt_window`]), counted from now.
    pub fn set_adopt_window(&mut self, window: std::time::Duration) -> Result<(), DataplaneError> {
        let mut s = self.settings_now;
        let until = monotonic_secs().saturating_add(window.as_secs());
        s.adopt_until = u32::try_from(until).unwrap_or(u32::MAX);
        let r = self.settings.set(0, s, 0).map_err(map_err(MAP_SETTINGS));
        self.counted(r)?;
        self.settings_now = s;
        Ok(())
    }

    /// Map writes that failed since the daemon started.
    pub fn write_failures(&self) -> u64 {
        self.shared.write_failures.load(Ordering::Relaxed)
    }

    /// Run one frame through the loaded classifier with `BPF_PROG_TEST_RUN` (no attachment
    /// needed): the kernel fixture tests and the per-packet cost benchmark use this.
    pub fn test_run(&mut self, frame: &[u8], repeat: u32) -> Result<TestRunOutput, DataplaneError> {
        self.test_run_prog(PROG_INGRESS, frame, repeat, 0)
    }

    /// As [`Dataplane::test_run`], through the egress classifier (a server-to-client frame).
    pub fn test_run_egress(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput, DataplaneError> {
        self.test_run_prog(PROG_EGRESS, frame, repeat, 0)
    }

    /// As [`Dataplane::test_run_egress`], the frame carrying `skb->mark` = `mark` (the
    /// responder marks its answers with [`filter_common::RESPONDER_MARK`]).
    pub fn test_run_egress_marked(
        &mut self,
        frame: &[u8],
        mark: u32,
    ) -> Result<TestRunOutput, DataplaneError> {
        self.test_run_prog(PROG_EGRESS, frame, 1, mark)
    }

    fn test_run_prog(
        &mut self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
        mark: u32,
    ) -> Result<TestRunOutput, DataplaneError> {
        use aya::programs::TestRun as _;
        let prog = self.program_named(name)?;
        let mut out = vec![0u8; frame.len() + 256];
        // The head of a `struct __sk_buff`: `len` and `pkt_type` (must be zero), then `mark`.
        let mut ctx = [0u8; 12];
        ctx[8..].copy_from_slice(&mark.to_ne_bytes());
        let opts = aya::programs::TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: (mark != 0).then_some(&ctx[..]),
            repeat,
            ..Default::default()
        };
        let r = prog.test_run(opts).map_err(prog_err("BPF_PROG_TEST_RUN"))?;
        out.truncate(r.data_size_out as usize);
        Ok(TestRunOutput {
            action: r.return_value as i32,
            frame: out,
            duration: r.duration,
        })
    }

    /// Instructions the verifier processed to accept the ingress classifier.
    pub fn verified_instructions(&self) -> Result<u32, DataplaneError> {
        self.verified_instructions_of(PROG_INGRESS)
    }

    /// Instructions the verifier processed to accept the egress classifier.
    pub fn verified_instructions_egress(&self) -> Result<u32, DataplaneError> {
        self.verified_instructions_of(PROG_EGRESS)
    }

    /// Instructions the verifier processed to accept program `name` (one of
    /// [`ALL_PROGRAMS`]).
    pub fn verified_instructions_of(&self, name: &'static str) -> Result<u32, DataplaneError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(DataplaneError::Missing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: name.into(),
                source,
            })?;
        let info = prog.info().map_err(|source| DataplaneError::Program {
            what: name.into(),
            source,
        })?;
        Ok(info.verified_instruction_count().unwrap_or(0))
    }

    /// Verdict counters summed over CPUs, by reason.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let per_cpu = self.stats.get(&(r as u32), 0).map_err(map_err(MAP_STATS))?;
                Ok((r, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// Load (verify) one program of the object. A refusal's whole verifier log goes to a file in
/// `log_dir` (see [`verifier::Refusal`]), its last words into the error.
fn load_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    log_dir: Option<&Path>,
) -> Result<(), DataplaneError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::Missing(name))?
        .try_into()
        .map_err(prog_err(name))?;
    prog.load().map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => DataplaneError::Verifier(Box::new(verifier::Refusal::new(
            name,
            io_error,
            &verifier_log.to_string(),
            log_dir,
        ))),
        source => DataplaneError::Program {
            what: name.into(),
            source,
        },
    })
}

/// Put the loaded stage programs into the stage table (`STAGES`, by `filter_common::stage`
/// index), where the classifiers' tail calls find them.
fn fill_stages(ebpf: &mut Ebpf) -> Result<aya::maps::Map, DataplaneError> {
    let mut map = ebpf
        .take_map(MAP_STAGES)
        .ok_or(DataplaneError::Missing(MAP_STAGES))?;
    let mut stages = ProgramArray::try_from(&mut map).map_err(map_err(MAP_STAGES))?;
    for (index, name) in STAGE_PROGS.into_iter().enumerate() {
        let prog: &SchedClassifier = ebpf
            .program(name)
            .ok_or(DataplaneError::Missing(name))?
            .try_into()
            .map_err(prog_err(name))?;
        let fd = prog.fd().map_err(prog_err(name))?;
        stages
            .set(index as u32, fd, 0)
            .map_err(map_err(MAP_STAGES))?;
    }
    Ok(map)
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // After `release` nothing is left here. Otherwise (an error after attaching) the fail
        // mode chosen so far holds: fail-open netlink filters are deleted, the rest stays.
        self.let_go(false);
    }
}

fn nl_err<'a, E: Into<NetlinkFailure>>(
    iface: &'a str,
    hook: &'static str,
    what: &'static str,
) -> impl FnOnce(E) -> DataplaneError + 'a {
    move |e| DataplaneError::Netlink {
        iface: iface.into(),
        hook,
        what,
        source: Box::new(e.into()),
    }
}

/// Add a `clsact` qdisc to `iface` unless it has one (netlink filters hang off it).
fn ensure_clsact(iface: &str, point: TcAttachType) -> Result<(), DataplaneError> {
    let hook = hook_name(point);
    let index = ifindex(iface).map_err(nl_err(iface, hook, "finding the interface"))?;
    match tc_netlink::ensure_clsact(iface, index) {
        Ok(true) => {
            tracing::info!(iface, "added a clsact qdisc");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => Err(nl_err(iface, hook, "adding the clsact qdisc")(e)),
    }
}

/// Remove pinned-map directories of other layout versions: their maps stay alive for as long
/// as a program still uses them, and a new layout must never reuse them.
fn remove_stale_map_dirs(root: &Path) {
    let ours = pinned_maps_dir();
    let Ok(dir) = std::fs::read_dir(root) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("maps-") && name != ours {
            tracing::info!(dir = %entry.path().display(), "removing pinned maps of another layout version");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Remove every key of a map (listed first, since the listing borrows the map); keys already
/// gone are fine.
fn remove_all<K>(
    name: &'static str,
    keys: Result<Vec<K>, MapError>,
    mut remove: impl FnMut(&K) -> Result<(), MapError>,
) -> Result<(), DataplaneError> {
    for k in keys.map_err(map_err(name))? {
        match remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The verifier's answer for every program (the verifier test, the kernel matrix).

/// What the verifier said about one program of the kernel object.
#[derive(Debug)]
pub struct ProgramVerdict {
    /// The program's name in the object (`http_ingress`, …).
    pub program: String,
    /// Accepted: the instructions the verifier processed (`bpf_prog_info.verified_insns`).
    /// Refused: the error and the last lines of the verifier's log.
    pub result: Result<u32, String>,
}

/// Load every program of the embedded object on its own (the classifiers and their stages:
/// [`ALL_PROGRAMS`] first, in its order, then any other), with the load-time globals
/// [`Dataplane::load`] gives them (`bpf_log`: with the classifiers' diagnostics on, as
/// `filterd --bpf-log` loads them), and report what the verifier said about each. Unlike
/// `load`, a refused program does not keep the others from being tried. Nothing is attached
/// or joined by tail calls, and the programs are unloaded again on return.
pub fn verify_each(ports: &[u16], bpf_log: bool) -> Result<Vec<ProgramVerdict>, DataplaneError> {
    if OBJECT.is_empty() {
        return Err(DataplaneError::NoObject);
    }
    // The verifier reads the globals (they are frozen rodata), so they are those of a real
    // load; the hash key's value does not matter to it.
    let mut config = Box::new(LoadConfig::zeroed());
    for &p in ports {
        config.add_port(p);
    }
    let log_level = crate::kernel_log::level(bpf_log);
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_CONFIG, &*config, true)
        .override_global(crate::kernel_log::LEVEL_GLOBAL, &log_level, true)
        .load(OBJECT)
        .map_err(DataplaneError::Load)?;
    // Every program of the object, those of `ALL_PROGRAMS` first in its order.
    let mut names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    names.sort_by_key(|n| {
        let known = ALL_PROGRAMS.iter().position(|p| p == n);
        (known.unwrap_or(usize::MAX), n.clone())
    });
    let mut verdicts = Vec::new();
    for program in names {
        let result = match ebpf.program_mut(&program) {
            Some(aya::programs::Program::SchedClassifier(prog)) => match prog.load() {
                Ok(()) => prog
                    .info()
                    .map(|info| info.verified_instruction_count().unwrap_or(0))
                    .map_err(|e| format!("accepted, but its program info is unreadable: {e}")),
                Err(ProgramError::LoadError {
                    io_error,
                    verifier_log,
                }) => {
                    let log = verifier_log.to_string();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    Err(format!("{io_error}\n{}", tail.join("\n")))
                }
                Err(e) => Err(e.to_string()),
            },
            Some(other) => Err(format!(
                "program type {:?} is not handled here (only TC classifiers)",
                other.prog_type()
            )),
            None => Err("missing from the object".into()),
        };
        verdicts.push(ProgramVerdict { program, result });
    }
    Ok(verdicts)
}

// ---------------------------------------------------------------------------
// Reading the dataplane without holding it (the API's /metrics, /v1/status, /readyz).

/// What a [`Dataplane`] shares with its observers.
#[derive(Debug, Default)]
struct Shared {
    fill: [AtomicUsize; 2],
    write_failures: AtomicU64,
}

fn map_fill(shared: &Shared, prefix: bool, conns: usize, max_connections: u32) -> Vec<MapFill> {
    let mut out = vec![MapFill {
        map: "rules_exact",
        entries: shared.fill[0].load(Ordering::Relaxed),
        capacity: RULES_CAPACITY,
    }];
    if prefix {
        out.push(MapFill {
            map: "rules_prefix",
            entries: shared.fill[1].load(Ordering::Relaxed),
            capacity: PREFIX_CAPACITY,
        });
    }
    out.push(MapFill {
        map: "connections",
        entries: conns,
        capacity: max_connections as usize,
    });
    out
}

/// A [`Dataplane`]'s counters, fill levels and attachments, read through map handles of its
/// own: safe to use from the API while the dataplane is busy with a policy change.
pub struct DataplaneObserver {
    stats: PerCpuArray<MapData, u64>,
    conns: HashMap<MapData, ConnKey, [u8; size_of::<Conn>()]>,
    shared: Arc<Shared>,
    max_connections: u32,
    prefix: bool,
    ifaces: Vec<String>,
    mode: Option<AttachMode>,
    /// The program ids of this load's ingress and egress classifiers.
    progs: Option<(u32, u32)>,
    pinned: bool,
    dry_run: bool,
}

impl DataplaneObserver {
    /// Verdict counters summed over CPUs, by reason.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let per_cpu = self.stats.get(&(r as u32), 0).map_err(map_err(MAP_STATS))?;
                Ok((r, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn map_fill(&self) -> Vec<MapFill> {
        map_fill(
            &self.shared,
            self.prefix,
            count_entries(&self.conns),
            self.max_connections,
        )
    }

    pub fn write_failures(&self) -> u64 {
        self.shared.write_failures.load(Ordering::Relaxed)
    }

    pub fn interfaces(&self) -> &[String] {
        &self.ifaces
    }

    pub fn attach_mode(&self) -> Option<AttachMode> {
        self.mode
    }

    pub fn pinned(&self) -> bool {
        self.pinned
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn supports_prefix(&self) -> bool {
        self.prefix
    }

    /// Whether every configured interface runs this load's two classifiers, asked of the
    /// kernel (TCX: `BPF_PROG_QUERY`; netlink: a filter dump). `Err` names each missing one.
    pub fn ready(&self) -> Result<(), Vec<String>> {
        let (Some(mode), Some((ingress, egress))) = (self.mode, self.progs) else {
            return Err(vec!["the classifiers are not attached yet".into()]);
        };
        let mut missing = Vec::new();
        for iface in &self.ifaces {
            for (point, id) in [
                (TcAttachType::Ingress, ingress),
                (TcAttachType::Egress, egress),
            ] {
                if let Err(why) = attached_here(iface, point, mode, id) {
                    missing.push(format!("{iface} {}: {why}", hook_name(point)));
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }
}

/// Whether program `prog_id` runs on `point` of `iface`, attached in `mode`.
fn attached_here(
    iface: &str,
    point: TcAttachType,
    mode: AttachMode,
    prog_id: u32,
) -> Result<(), String> {
    match mode {
        AttachMode::Tcx => {
            let (_, progs) = SchedClassifier::query_tcx(iface, point)
                .map_err(|e| format!("cannot query its TCX programs: {e}"))?;
            if progs.iter().any(|p| p.id() == prog_id) {
                Ok(())
            } else {
                Err(format!("program {prog_id} is not attached (TCX)"))
            }
        }
        AttachMode::Netlink => {
            let index = ifindex(iface).map_err(|e| format!("no such interface: {e}"))?;
            let filters = tc_netlink::filters(index, point)
                .map_err(|e| format!("cannot list its tc filters: {e}"))?;
            match filters.iter().find(|f| f.at_our_place()) {
                Some(f) if f.prog_id == Some(prog_id) => Ok(()),
                Some(f) => Err(format!(
                    "the filter at pref {TC_PRIORITY} runs another program ({f})"
                )),
                None => Err(format!("no filter at pref {TC_PRIORITY} (netlink tc)")),
            }
        }
    }
}

/// Entries in a hash map, counted with `BPF_MAP_LOOKUP_BATCH` (a few syscalls for the whole
/// table, the values copied into a reused buffer and dropped); key by key where the kernel
/// has no batch lookups for the map.
pub fn count_entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> usize {
    use std::os::fd::AsRawFd as _;
    let fd = map.map().fd().as_fd().as_raw_fd();
    match batch_count(fd, size_of::<K>(), size_of::<V>()) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "no batch lookups for the map; counting key by key");
            map.keys().filter(Result::is_ok).count()
        }
    }
}

/// `union bpf_attr`'s `batch` member (`BPF_MAP_*_BATCH` commands).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per batch lookup.
const BATCH: usize = 1024;

fn batch_count(fd: i32, key_size: usize, value_size: usize) -> std::io::Result<usize> {
    let mut per_call = BATCH;
    let mut keys = vec![0u8; per_call * key_size];
    let mut values = vec![0u8; per_call * value_size];
    // Hash maps' batch cursor is a bucket index (u32).
    let (mut cursor_in, mut cursor_out) = (0u64, 0u64);
    let mut first = true;
    let mut total = 0usize;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor_in as *const u64 as u64
            },
            out_batch: &mut cursor_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: per_call as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: bpf(2) with a batch attr whose buffers hold `count` keys and values.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if rc == 0 {
            total += attr.count as usize;
            cursor_in = cursor_out;
            first = false;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // The end: the last entries came with it.
            Some(libc::ENOENT) => return Ok(total + attr.count as usize),
            // A bucket holds more than one call takes: ask for more at once.
            Some(libc::ENOSPC) if per_call < (1 << 20) => {
                per_call *= 4;
                keys.resize(per_call * key_size, 0);
                values.resize(per_call * value_size, 0);
            }
            _ => return Err(e),
        }
    }
}
