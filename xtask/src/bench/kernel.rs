//! Kernel-side probes: per-packet cost of the running daemon's classifier with
//! `BPF_PROG_TEST_RUN` (`bpftool prog run ... repeat N`, the same syscall as
//! `Dataplane::test_run`, on the program and maps the daemon really loaded), `bpf_stats`
//! under real traffic, the program's size, and its maps' memory.
//!
//! The program is found by name and by the daemon's PID in `bpftool prog show` (several
//! daemons may run on a shared machine). Which path each test frame took is read from the
//! daemon's own verdict counters (`GET /v1/stats`) before and after.
//!
//! Must not: leave `kernel.bpf_stats_enabled` changed ([`BpfStatsGuard`] restores it), or
//! send a frame that makes the daemon answer someone (no rejected frames through test runs).

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use filter_common::csum;
use filter_tests::lab::Lab;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::procs::{output_bounded, run_wrk_pair, WrkResult, WrkSpec};
use super::{progress, rotated, Filter, FilterState, Results};

/// Repeats of the calibration call, and the least any measured call gets.
const CALIBRATE_REPEAT: u32 = 10_000;
/// About how long one measured `BPF_PROG_TEST_RUN` call should take.
const CALL_BUDGET: Duration = Duration::from_millis(500);

pub struct KCtx<'a> {
    pub lab: &'a Lab,
    pub t0: Instant,
    pub repeat: u32,
    pub rounds: usize,
    pub stats_seconds: u64,
    pub allowed: WrkSpec,
    pub rejected: WrkSpec,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TestRun {
    pub frame: String,
    pub frame_bytes: usize,
    pub rules: usize,
    pub round: usize,
    pub repeat: u32,
    /// Mean ns per run as the kernel measured it (integer ns).
    pub ns: u64,
    pub retval: i64,
    /// Verdict counters that moved during this call, by name.
    pub reasons: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StatsRun {
    pub traffic: String,
    pub round: usize,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub ns_per_run: f64,
    pub wrk: WrkResult,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct KernelResults {
    /// `bpftool prog show` for the daemon's classifier (JSON as bpftool printed it).
    pub prog: Value,
    pub test_runs: Vec<TestRun>,
    /// Keep-alive connections' packets, one test run each (`steady`).
    pub steady: Vec<super::steady::SteadyRun>,
    pub steady_error: Option<String>,
    pub bpf_stats: Vec<StatsRun>,
    pub bpf_stats_error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct MapMem {
    pub id: u64,
    pub name: String,
    pub kind: String,
    pub max_entries: u64,
    pub bytes_key: u64,
    pub bytes_value: u64,
    pub bytes_memlock: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct Memory {
    pub daemon_rss_kib_start: Option<u64>,
    pub daemon_rss_kib_100k: Option<u64>,
    pub daemon_hwm_kib: Option<u64>,
    pub maps: Vec<MapMem>,
}

// ---------------------------------------------------------------------------
// bpftool.

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = output_bounded(
        std::process::Command::new("bpftool")
            .arg("--json")
            .args(args),
        Duration::from_secs(30),
    )?;
    serde_json::from_str(&out).with_context(|| format!("bpftool {args:?} printed no JSON"))
}

/// Program ids of the BPF fds `pid` holds, from `/proc/<pid>/fdinfo` (works without
/// bpftool's pid support, which Debian's build lacks).
fn prog_ids_of(pid: u32) -> Vec<u64> {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = rd
        .filter_map(|e| fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A numeric field of the fdinfo of the fd through which `pid` holds program `id`.
fn fdinfo_field(pid: u32, id: u64, field: &str) -> Option<u64> {
    fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .filter_map(|e| fs::read_to_string(e.ok()?.path()).ok())
        .find(|t| {
            t.lines()
                .any(|l| l.strip_prefix("prog_id:").map(str::trim) == Some(&id.to_string()))
        })?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .parse()
        .ok()
}

/// The daemon's classifier in `bpftool prog show`.
pub fn prog_of(pid: u32) -> Result<Value> {
    prog_named(pid, filter_name())
}

/// The daemon's program named `name` (the first 15 bytes of its symbol) in `bpftool prog show`.
pub fn prog_named(pid: u32, name: &str) -> Result<Value> {
    let mut found = Vec::new();
    for id in prog_ids_of(pid) {
        let mut p = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
        if p["name"] == name {
            // Older bpftool does not print it; the kernel's fdinfo does (5.16+).
            if p["verified_insns"].is_null() {
                if let Some(v) = fdinfo_field(pid, id, "verified_insns:") {
                    p["verified_insns"] = v.into();
                }
            }
            found.push(p);
        }
    }
    match found.len() {
        0 => bail!("filterd (pid {pid}) holds no program named {name} (per /proc/{pid}/fdinfo)"),
        _ => Ok(found.pop().unwrap()),
    }
}

fn filter_name() -> &'static str {
    // The kernel keeps the first 15 bytes of the ELF symbol name.
    "http_ingress"
}

pub fn maps_of(pid: u32) -> Result<Vec<MapMem>> {
    let prog = prog_of(pid)?;
    let ids: Vec<u64> = prog["map_ids"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let mut maps = Vec::new();
    for id in ids {
        let m = bpftool_json(&["map", "show", "id", &id.to_string()])?;
        maps.push(MapMem {
            id,
            name: m["name"].as_str().unwrap_or("").to_owned(),
            kind: m["type"].as_str().unwrap_or("").to_owned(),
            max_entries: m["max_entries"].as_u64().unwrap_or(0),
            bytes_key: m["bytes_key"].as_u64().unwrap_or(0),
            bytes_value: m["bytes_value"].as_u64().unwrap_or(0),
            bytes_memlock: m["bytes_memlock"].as_u64().unwrap_or(0),
        });
    }
    Ok(maps)
}

/// `bpftool prog run id ID data_in FILE repeat N`: (return value, mean ns).
fn prog_run(lab: &Lab, id: u64, file: &std::path::Path, repeat: u32) -> Result<(i64, u64)> {
    let out = output_bounded(
        lab.server_cmd("bpftool")
            .args(["prog", "run", "id", &id.to_string(), "data_in"])
            .arg(file)
            .args(["repeat", &repeat.to_string()]),
        Duration::from_secs(120),
    )?;
    // "Return value: 4294967295, duration (average): 35ns"
    let ret = out
        .split("Return value:")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .with_context(|| format!("bpftool prog run printed no return value: {out}"))?;
    let ns = out
        .split("duration (average):")
        .nth(1)
        .and_then(|s| s.trim().strip_suffix("ns").or(Some(s.trim())))
        .and_then(|s| s.trim().trim_end_matches("ns").parse::<u64>().ok())
        .with_context(|| format!("bpftool prog run printed no duration: {out}"))?;
    Ok((ret as u32 as i32 as i64, ns))
}

/// A classifier that only returns `TC_ACT_UNSPEC` (`r0 = -1; exit`), loaded by the bench for
/// the run: what the test-run loop and the kernel's call of any classifier cost, measured the
/// same way as the daemon's program. It is the zero point of the per-packet figures: no
/// classifier can measure below it.
pub struct EmptyClassifier {
    fd: std::os::fd::OwnedFd,
    pub id: u64,
}

/// The test-run frame name of the empty classifier's row.
pub const EMPTY_CLASSIFIER: &str = "empty classifier (zero point; the other-port frame)";

impl EmptyClassifier {
    pub fn load() -> Result<EmptyClassifier> {
        use std::os::fd::FromRawFd;
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
        // mov64 r0, -1; exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, then zeros.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
        attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..59].copy_from_slice(b"bench_empty"); // prog_name
        let fd = super::steady::bpf(BPF_PROG_LOAD, &mut attr, "loading the empty classifier")?;
        // SAFETY: the kernel just returned this descriptor to us.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        // struct bpf_prog_info: type, id, ...
        let mut info = [0u8; 256];
        super::steady::prog_info(&fd, &mut info)?;
        let id = u32::from_ne_bytes(info[4..8].try_into().unwrap()) as u64;
        Ok(EmptyClassifier { fd, id })
    }

    /// Attach it (TCX, as `filterd` attaches) to the ingress and the egress of `iface` in the
    /// network namespace `netns`: section 1's "empty classifier" arm, what any TC classifier
    /// on both hooks costs the allowed traffic. The attachments last as long as the returned
    /// links.
    pub fn attach(&self, netns: &str, iface: &str) -> Result<Vec<std::os::fd::OwnedFd>> {
        use std::os::fd::{AsRawFd, FromRawFd};
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_TCX_INGRESS: u32 = 46;
        const BPF_TCX_EGRESS: u32 = 47;
        let prog = self.fd.as_raw_fd() as u32;
        // setns(2) moves only the calling thread: a thread of its own, which ends with it.
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<Vec<std::os::fd::OwnedFd>> {
                    let ns = fs::File::open(format!("/run/netns/{netns}"))
                        .with_context(|| format!("opening network namespace {netns}"))?;
                    // SAFETY: setns on a descriptor we own, for this thread only.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("entering {netns}: {}", std::io::Error::last_os_error());
                    }
                    let name = std::ffi::CString::new(iface)?;
                    // SAFETY: a NUL-terminated name.
                    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
                    if ifindex == 0 {
                        bail!("no interface {iface} in {netns}");
                    }
                    [BPF_TCX_INGRESS, BPF_TCX_EGRESS]
                        .into_iter()
                        .map(|hook| {
                            // link_create: prog_fd, target_ifindex, attach_type, flags, then
                            // the TCX fields (relative_fd, expected_revision) left at zero.
                            let mut attr = [0u8; 64];
                            attr[0..4].copy_from_slice(&prog.to_ne_bytes());
                            attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
                            attr[8..12].copy_from_slice(&hook.to_ne_bytes());
                            let fd = super::steady::bpf(
                                BPF_LINK_CREATE,
                                &mut attr,
                                &format!("attaching the empty classifier to {iface} (TCX {hook})"),
                            )?;
                            // SAFETY: the kernel just returned this descriptor to us.
                            Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
                        })
                        .collect()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))?
        })
    }
}

fn counters(filter: &Filter) -> Result<BTreeMap<String, u64>> {
    let d = filter.daemon.as_ref().context("filterd is not running")?;
    let (code, body) = d.api("GET", "/v1/stats", None)?;
    anyhow::ensure!(code == 200, "GET /v1/stats answered {code}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["counters"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default())
}

fn moved(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .filter_map(|(k, &v)| {
            let d = v.saturating_sub(a.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// bpf_stats.

/// Turns `kernel.bpf_stats_enabled` on for its lifetime and restores the previous value.
pub struct BpfStatsGuard {
    before: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsGuard {
    pub fn enable() -> Result<BpfStatsGuard> {
        let before = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_owned();
        fs::write(BPF_STATS, "1").with_context(|| format!("writing 1 to {BPF_STATS}"))?;
        Ok(BpfStatsGuard {
            before: Some(before),
        })
    }
}

impl Drop for BpfStatsGuard {
    fn drop(&mut self) {
        if let Some(b) = self.before.take() {
            if let Err(e) = fs::write(BPF_STATS, &b) {
                eprintln!("bench: could not restore {BPF_STATS} to {b}: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Test frames: Ethernet + IPv4 + TCP (with the timestamp option Linux clients send).

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_IP: [u8; 4] = [10, 77, 0, 1];
const SERVER_IP: [u8; 4] = [10, 77, 0, 2];

/// A TCP segment from 10.77.0.1:40000 to 10.77.0.2:`dport` with PSH|ACK (or ACK when empty).
pub fn tcp_frame(dport: u16, payload: &[u8]) -> Vec<u8> {
    tcp_frame_flags(
        40000,
        dport,
        payload,
        if payload.is_empty() { 0x10 } else { 0x18 },
    )
}

/// A request segment that also carries FIN: the classifier follows connections, so a replayed
/// frame is decided only once (later runs are retransmissions); with FIN it forgets the
/// connection after each run, and every `repeat` is a fresh decision (plus the connection
/// table insert and delete).
pub fn request_frame(payload: &[u8]) -> Vec<u8> {
    // Its own client port: the body frame's connection is untracked after its first run.
    tcp_frame_flags(40001, 80, payload, 0x19)
}

fn tcp_frame_flags(sport: u16, dport: u16, payload: &[u8], flags: u8) -> Vec<u8> {
    let ends = (CLIENT_IP, SERVER_IP, CLIENT_MAC, SERVER_MAC);
    tcp_segment(
        ends,
        (sport, dport),
        0x1000_0000,
        0x2000_0000,
        flags,
        payload,
    )
}

/// Which way a segment of the lab's client connection goes.
pub enum Dir {
    /// Client to server (the ingress program's side).
    In,
    /// Server (port 80) to client (the egress program's side).
    Out,
}

/// A segment of the connection between the client's `port` and the server's port 80.
pub fn segment(dir: Dir, port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    match dir {
        Dir::In => tcp_segment(
            (CLIENT_IP, SERVER_IP, CLIENT_MAC, SERVER_MAC),
            (port, 80),
            seq,
            ack,
            flags,
            payload,
        ),
        Dir::Out => tcp_segment(
            (SERVER_IP, CLIENT_IP, SERVER_MAC, CLIENT_MAC),
            (80, port),
            seq,
            ack,
            flags,
            payload,
        ),
    }
}

/// An Ethernet + IPv4 + TCP (with a timestamp option) frame from `ends.0` to `ends.1` with
/// valid checksums.
fn tcp_segment(
    ends: ([u8; 4], [u8; 4], [u8; 6], [u8; 6]),
    (sport, dport): (u16, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst, src_mac, dst_mac) = ends;
    let mut l4 = Vec::with_capacity(32 + payload.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    l4.push(8 << 4);
    l4.push(flags);
    l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    l4.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    l4.extend_from_slice(payload);
    let c = csum::finish(csum::add(csum::pseudo_v4(&src, &dst, l4.len() as u16), &l4));
    l4[16..18].copy_from_slice(&c.to_be_bytes());

    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum::finish(csum::add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut f = Vec::with_capacity(14 + 20 + l4.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// An ARP request: the classifier's first check (EtherType) sends it on.
pub fn arp_frame() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&CLIENT_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&SERVER_IP);
    f
}

/// `GET <path of path_len bytes> HTTP/1.1` with typical curl headers.
pub fn request(path_len: usize) -> Vec<u8> {
    let mut path = String::from("/api/");
    while path.len() < path_len {
        path.push((b'a' + (path.len() % 26) as u8) as char);
    }
    path.truncate(path_len);
    request_to(&path)
}

/// `GET <path> HTTP/1.1` with typical curl headers.
pub fn request_to(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 10.77.0.2\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    )
    .into_bytes()
}

/// Index in [`frames`] of the other-port frame (also run through the empty classifier).
const OTHER_PORT_FRAME: usize = 1;

/// The frames whose cost is reported, named as in the report, with their repeat divisor.
pub fn frames() -> Vec<(&'static str, Vec<u8>, u32)> {
    let body: Vec<u8> = (0..512).map(|i| b"0123456789abcdef"[i % 16]).collect();
    vec![
        ("ARP (exits at the first check)", arp_frame(), 1),
        (
            "TCP, other port (:22), 100 B payload",
            tcp_frame(22, &[b'x'; 100]),
            1,
        ),
        ("TCP :80, pure ACK (no payload)", tcp_frame(80, &[]), 1),
        (
            "TCP :80, mid-stream (512 B of body)",
            tcp_frame(80, &body),
            1,
        ),
        (
            "TCP :80, GET /api/items (rule hit)",
            request_frame(&request_to(super::PATH)),
            1,
        ),
        (
            "TCP :80, GET, 20 B path (no rule)",
            request_frame(&request(20)),
            1,
        ),
        ("TCP :80, GET, 1 KiB path", request_frame(&request(1024)), 4),
        (
            "TCP :80, GET, 1009 B path (line = 1 KiB)",
            request_frame(&request(1009)),
            4,
        ),
    ]
}

// ---------------------------------------------------------------------------
// The section.

pub fn section_kernel(
    k: &KCtx,
    filter: &mut Filter,
    mut baseline: Option<&mut Filter>,
    results: &mut Results,
) -> Result<KernelResults> {
    let mut out = KernelResults::default();
    let pid = filter.pid().context("filterd is not running")?;
    out.prog = prog_of(pid)?;
    let id = out.prog["id"].as_u64().context("prog id")?;
    progress(
        k.t0,
        format!(
            "section 2 (kernel cost): prog id {id}, xlated {} B, jited {} B, verified_insns {}",
            out.prog["bytes_xlated"], out.prog["bytes_jited"], out.prog["verified_insns"]
        ),
    );
    let frames = frames();
    anyhow::ensure!(frames[OTHER_PORT_FRAME].0.contains("other port"));
    for (i, (_, f, _)) in frames.iter().enumerate() {
        fs::write(k.lab.dir().join(format!("frame-{i}.bin")), f)?;
    }
    let mut calibrated: BTreeMap<usize, u32> = BTreeMap::new();
    let empty_id = filter
        .empty_classifier()
        .map(|e| e.id)
        .map_err(|e| progress(k.t0, format!("  no empty classifier: {e:#}")))
        .ok();
    let egress_id = prog_named(pid, "http_egress")
        .ok()
        .and_then(|p| p["id"].as_u64());
    // Both rule counts in every round (their order rotated), so that the machine's state at
    // one moment does not pass for a difference between them.
    for (round, rules) in (0..k.rounds).flat_map(|round| {
        rotated(&[10usize, 100_000], round)
            .into_iter()
            .map(move |rules| (round, rules))
    }) {
        filter.ensure(FilterState::Rules(rules), results)?;
        // The baseline build's programs, for the steady-state comparison.
        let base_ids = match baseline.as_deref_mut() {
            Some(b) => {
                b.ensure(FilterState::Rules(rules), results)?;
                let pid = b.pid().context("the baseline filterd is not running")?;
                let ingress = prog_of(pid)?["id"].as_u64().context("baseline prog id")?;
                let egress = prog_named(pid, "http_egress")?["id"]
                    .as_u64()
                    .context("baseline egress prog id")?;
                Some((ingress, egress))
            }
            None => None,
        };
        let idx: Vec<usize> = (0..frames.len()).collect();
        for i in rotated(&idx, round) {
            let (name, f, div) = &frames[i];
            let file = k.lab.dir().join(format!("frame-{i}.bin"));
            // Calibrate once per frame so that one call takes about CALL_BUDGET: a frame
            // that costs 10 us would otherwise take 10 s per million repeats.
            let repeat = match calibrated.get(&i) {
                Some(&r) => r,
                None => {
                    let (_, ns) = prog_run(k.lab, id, &file, CALIBRATE_REPEAT)?;
                    let fit = (CALL_BUDGET.as_nanos() as u64 / ns.max(1)) as u32;
                    let r = fit.clamp(CALIBRATE_REPEAT, (k.repeat / div).max(1));
                    calibrated.insert(i, r);
                    r
                }
            };
            // One row of the table: this frame through a program, `repeat` runs.
            let row = |frame: &str, (retval, ns): (i64, u64), reasons| TestRun {
                frame: frame.to_owned(),
                frame_bytes: f.len(),
                rules,
                round,
                repeat,
                ns,
                retval,
                reasons,
            };
            let before = counters(filter)?;
            let (retval, ns) = prog_run(k.lab, id, &file, repeat)?;
            let after = counters(filter)?;
            let reasons = moved(&before, &after);
            progress(
                k.t0,
                format!("  {rules} rules r{round} {name}: {ns} ns (ret {retval}, {reasons:?})"),
            );
            out.test_runs.push(row(name, (retval, ns), reasons));
            if let (OTHER_PORT_FRAME, Some(empty)) = (i, empty_id) {
                // The same frame and repeat count through the empty classifier, right after:
                // the zero point of this round.
                let run = prog_run(k.lab, empty, &file, repeat)?;
                out.test_runs
                    .push(row(EMPTY_CLASSIFIER, run, BTreeMap::new()));
            }
        }
        // Keep-alive connections in steady state, both programs.
        let Some(egress_id) = egress_id else { continue };
        if out.steady_error.is_some() {
            continue;
        }
        let base = 45_000 + if rules == 10 { 0 } else { 500 } + 4 * round as u16;
        let mut arms = vec![(super::steady::THIS_BUILD, id, egress_id)];
        if let Some((i, e)) = base_ids {
            arms.push((super::steady::BASELINE, i, e));
        }
        match super::steady::round(&arms, rules, round, base) {
            Ok(runs) => {
                for r in &runs {
                    progress(
                        k.t0,
                        format!(
                            "  {rules} rules r{round} steady {} ({}): p50 {:.0} ns, p10 {:.0} ns",
                            r.kind, r.build, r.p50, r.p10
                        ),
                    );
                }
                out.steady.extend(runs);
            }
            Err(e) => {
                progress(k.t0, format!("  steady state failed: {e:#}"));
                out.steady_error = Some(format!("{e:#}"));
            }
        }
    }

    // bpf_stats under real traffic: 10 rules, allowed keep-alive GETs, then the DELETE flood.
    filter.ensure(FilterState::Rules(10), results)?;
    let pid = filter.pid().context("filterd is not running")?;
    let id = prog_of(pid)?["id"].as_u64().context("prog id")?;
    // The egress program (the server's responses), when this filterd has one.
    let egress = prog_named(pid, "http_egress")
        .ok()
        .and_then(|p| p["id"].as_u64());
    match bpf_stats(k, id, egress, &mut out) {
        Ok(()) => {}
        Err(e) => {
            progress(k.t0, format!("  bpf_stats failed: {e:#}"));
            out.bpf_stats_error = Some(format!("{e:#}"));
        }
    }
    Ok(out)
}

fn run_stats(id: u64) -> Result<(u64, u64)> {
    let p = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
    Ok((
        p["run_cnt"].as_u64().unwrap_or(0),
        p["run_time_ns"].as_u64().unwrap_or(0),
    ))
}

fn bpf_stats(k: &KCtx, id: u64, egress: Option<u64>, out: &mut KernelResults) -> Result<()> {
    let _guard = BpfStatsGuard::enable()?;
    let traffic = [
        ("allowed GET keep-alive", &k.allowed),
        ("DELETE flood (405)", &k.rejected),
    ];
    for round in 0..k.rounds.min(3) {
        for (name, spec) in rotated(&traffic, round) {
            let spec = WrkSpec {
                seconds: k.stats_seconds,
                ..spec.clone()
            };
            let progs: Vec<(u64, String)> = std::iter::once((id, name.to_owned()))
                .chain(egress.map(|e| (e, format!("{name}, egress (responses)"))))
                .collect();
            let mut before = Vec::new();
            for (pid, _) in &progs {
                before.push(run_stats(*pid)?);
            }
            let (w, _) = run_wrk_pair(k.lab, &spec, None)?;
            for ((prog, label), (c0, t0)) in progs.iter().zip(before) {
                let (c1, t1) = run_stats(*prog)?;
                let (dc, dt) = (c1.saturating_sub(c0), t1.saturating_sub(t0));
                let per = if dc > 0 {
                    dt as f64 / dc as f64
                } else {
                    f64::NAN
                };
                progress(
                    k.t0,
                    format!(
                        "  bpf_stats r{round} {label}: {dc} runs, {per:.0} ns/run, {:.0} req/s",
                        w.rps()
                    ),
                );
                out.bpf_stats.push(StatsRun {
                    traffic: label.clone(),
                    round,
                    run_cnt: dc,
                    run_time_ns: dt,
                    ns_per_run: per,
                    wrk: w.clone(),
                });
            }
        }
    }
    Ok(())
}
