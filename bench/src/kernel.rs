//! Section 2, the kernel's cost per packet and per request, measured three ways:
//!
//! - **Test runs, repeated**: a packet to another port through the bench's own [`Dataplane`]
//!   (`BPF_PROG_TEST_RUN` with `repeat`, the kernel's mean per run) and, right after it, the
//!   same frame through an empty classifier ([`EmptyClassifier`], `r0 = -1; exit`): the zero
//!   point no classifier measures below.
//! - **Test runs, steady state**: the packets of long-lived keep-alive connections, one test
//!   run each, through the entry programs (`http_ingress`, `http_egress`: their tail calls into
//!   the stages included), with sequence numbers, acknowledgements and timestamps moving on as a
//!   real connection's do after a real handshake, so each packet takes the path it takes under
//!   traffic.
//! - **`bpf_stats` under real traffic**: the run time of every program of the running daemon
//!   ([`ALL_PROGRAMS`]) while wrk sends keep-alive GETs, per request. `bpf_stats` reads the
//!   clock around every run, which costs the same whatever the program: an empty classifier
//!   attached after the daemon's on the same hooks (TCX, last) runs on every packet they pass
//!   and measures that floor in the same runs.
//!
//! The test runs use a `Dataplane` the bench loads itself (the object embedded in this
//! binary, which `cargo xtask bench` builds from the same tree as `filterd`), not attached to
//! any interface, with the policy of each arm applied through `Dataplane::apply`.
//!
//! Must not: send a frame any program refuses (every one must pass), or leave the run-time
//! statistics on (aya's `enable_stats` keeps them on only while its descriptor lives).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use aya::programs::{
    loaded_programs, tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType, TestRun as _,
    TestRunOptions,
};
use filter_common::tcp_flags::{ACK, FIN, SYN};
use filter_common::{PROG_EGRESS, PROG_INGRESS};
use filter_tests::frames::{syn_opts, ts_opt, Segment};
use filter_userspace::dataplane::{Dataplane, LoadOptions, ALL_PROGRAMS};
use filter_userspace::policy::Policy;
use serde::{Deserialize, Serialize};

use crate::procs::{run_load, WrkSpec};
use crate::{progress, rotated, BACKEND_PORT, PATH};

/// `TC_ACT_UNSPEC`: pass (under TCX: on to the next program). Every frame here must get it.
const PASS: i32 = -1;

/// The rule counts whose cost is measured.
pub const RULE_COUNTS: [usize; 2] = [10, 100_000];

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct KernelResults {
    /// Instructions the verifier processed for each program of the bench's load.
    pub verified_insns: BTreeMap<String, u32>,
    pub other_port: Vec<RepeatRun>,
    pub steady: Vec<SteadyRun>,
    pub steady_error: Option<String>,
    pub bpf_stats: Vec<StatsRun>,
    pub bpf_stats_error: Option<String>,
}

/// One pair of repeated test runs of the other-port frame: the filter's entry program, then
/// the empty classifier.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RepeatRun {
    pub rules: usize,
    pub round: usize,
    pub repeat: u32,
    /// Mean ns per run, as the kernel measured it.
    pub filter_ns: f64,
    pub empty_ns: f64,
    /// Verdict counters that moved during the filter's call.
    pub reasons: BTreeMap<String, u64>,
}

/// One kind of steady-state packet in one round: the median and 10th percentile of its test
/// runs' durations.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SteadyRun {
    pub kind: String,
    pub rules: usize,
    pub round: usize,
    pub packets: usize,
    pub p50: f64,
    pub p10: f64,
}

/// `bpf_stats` of the daemon's programs over one wrk run.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct StatsRun {
    pub round: usize,
    pub requests: u64,
    pub duration_us: u64,
    /// Per program: (runs, run time in ns) during the run.
    pub programs: BTreeMap<String, (u64, u64)>,
    /// The empty classifier attached after them: (runs, run time in ns) during the run.
    #[serde(default)]
    pub floor: Option<(u64, u64)>,
}

impl StatsRun {
    /// Kernel time per request: every program's run time, summed, over the requests.
    pub fn ns_per_request(&self) -> f64 {
        self.ns_of(&ALL_PROGRAMS)
    }

    /// Kernel time per request, net of the floor of each entry program's run.
    pub fn net_ns_per_request(&self) -> Option<f64> {
        self.net_ns_of(&ALL_PROGRAMS)
    }

    /// Run time per request of the programs `names`.
    pub fn ns_of(&self, names: &[&str]) -> f64 {
        let ns: u64 = self.picked(names).map(|(_, v)| v.1).sum();
        ns as f64 / self.requests.max(1) as f64
    }

    /// [`Self::ns_of`] net of the floor: each run of an entry program among `names` (a
    /// tail-called stage runs inside its entry's run) pays it once.
    pub fn net_ns_of(&self, names: &[&str]) -> Option<f64> {
        let floor = self.floor_ns()?;
        let runs: u64 = self
            .picked(names)
            .filter(|(p, _)| [PROG_INGRESS, PROG_EGRESS].contains(&p.as_str()))
            .map(|(_, v)| v.0)
            .sum();
        Some(self.ns_of(names) - floor * runs as f64 / self.requests.max(1) as f64)
    }

    /// What `bpf_stats` charges any run, the empty classifier's mean run time.
    pub fn floor_ns(&self) -> Option<f64> {
        self.floor
            .filter(|&(runs, _)| runs > 0)
            .map(|(runs, ns)| ns as f64 / runs as f64)
    }

    fn picked<'a>(
        &'a self,
        names: &'a [&str],
    ) -> impl Iterator<Item = (&'a String, &'a (u64, u64))> + Clone + 'a {
        self.programs
            .iter()
            .filter(move |(p, _)| names.contains(&p.as_str()))
    }
}

// ---------------------------------------------------------------------------
// The empty classifier.

/// A classifier that only returns `TC_ACT_UNSPEC` (`r0 = -1; exit`), loaded by the bench
/// through aya from an ELF object written in memory: what the test-run loop and the kernel's
/// call of any classifier cost, measured the same way as the filter's programs.
pub struct EmptyClassifier {
    ebpf: aya::Ebpf,
}

const EMPTY_NAME: &str = "bench_empty";

impl EmptyClassifier {
    pub fn load() -> Result<EmptyClassifier> {
        let mut ebpf = aya::Ebpf::load(&empty_object()?).context("parsing the empty classifier")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(EMPTY_NAME)
            .context("the empty classifier's object has no program")?
            .try_into()?;
        prog.load().context("loading the empty classifier")?;
        Ok(EmptyClassifier { ebpf })
    }

    /// Attach it to `iface` of the network namespace `netns`, ingress and egress, after every
    /// program there (TCX, 6.6 on); detached when `self` goes.
    pub fn attach_last(&mut self, netns: &str, iface: &str) -> Result<()> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(EMPTY_NAME)
            .context("the empty classifier")?
            .try_into()?;
        let ns = std::fs::File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening network namespace {netns}"))?;
        // A thread of its own enters the namespace (the interface's name is looked up there);
        // the links it makes are descriptors of the whole process.
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<()> {
                    use std::os::fd::AsRawFd as _;
                    // SAFETY: `setns` on this thread only, with a namespace descriptor we hold
                    // open; the thread ends right after.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
                    for point in [TcAttachType::Ingress, TcAttachType::Egress] {
                        prog.attach_with_options(
                            iface,
                            point,
                            TcAttachOptions::TcxOrder(LinkOrder::last()),
                        )
                        .with_context(|| format!("attaching the empty classifier ({point:?})"))?;
                    }
                    Ok(())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))?
        })
    }

    /// (runs, run time in ns) so far, as `bpf_stats` counts them.
    pub fn stats(&self) -> Result<(u64, u64)> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(EMPTY_NAME)
            .context("the empty classifier")?
            .try_into()?;
        let info = prog.info()?;
        Ok((info.run_count(), info.run_time().as_nanos() as u64))
    }

    /// `frame` through it `repeat` times: the kernel's mean per run.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<Duration> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(EMPTY_NAME)
            .context("the empty classifier")?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })?;
        ensure!(
            r.return_value as i32 == PASS,
            "the empty classifier returned {}",
            r.return_value
        );
        Ok(r.duration)
    }
}

/// A relocatable BPF ELF object with one classifier, `bench_empty`: `mov64 r0, -1; exit`.
fn empty_object() -> Result<Vec<u8>> {
    use object::write::{Object, Symbol, SymbolSection};
    use object::{
        Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
    };
    let insns: [u8; 16] = [
        0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, // mov64 r0, -1
        0x95, 0, 0, 0, 0, 0, 0, 0, // exit
    ];
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    let text = obj.add_section(Vec::new(), b"classifier".to_vec(), SectionKind::Text);
    let at = obj.append_section_data(text, &insns, 8);
    obj.add_symbol(Symbol {
        name: EMPTY_NAME.as_bytes().to_vec(),
        value: at,
        size: insns.len() as u64,
        kind: SymbolKind::Text,
        scope: SymbolScope::Linkage,
        weak: false,
        section: SymbolSection::Section(text),
        flags: SymbolFlags::None,
    });
    let license = obj.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
    obj.append_section_data(license, b"GPL\0", 1);
    obj.write().context("writing the empty classifier's object")
}

// ---------------------------------------------------------------------------
// The bench's own load of the filter.

/// The filter's programs loaded by the bench: never attached, fed by test runs.
pub struct Bench {
    pub dp: Dataplane,
    pub empty: EmptyClassifier,
    rules: usize,
}

/// The policy of an arm with `n` rules, as a policy file: `/api/items` allows GET and POST,
/// plus `n - 1` others.
pub fn rules_toml(n: usize) -> String {
    let mut s = format!("[[rules]]\npath = \"{PATH}\"\nmethods = [\"GET\", \"POST\"]\n");
    for i in 1..n {
        s.push_str(&format!(
            "[[rules]]\npath = \"/bench/r{i}\"\nmethods = [\"GET\"]\n"
        ));
    }
    s
}

/// [`rules_toml`] validated.
pub fn policy(n: usize) -> Result<Policy> {
    filter_userspace::policy::parse_toml(&rules_toml(n))
        .map_err(|e| anyhow::anyhow!("the bench's policy of {n} rules: {e:?}"))
}

impl Bench {
    pub fn load() -> Result<Bench> {
        let opts = LoadOptions {
            // The repeated frames carry no handshake: adopted for the whole run.
            adopt_window: Duration::from_secs(365 * 24 * 3600),
            ..LoadOptions::default()
        };
        let dp = Dataplane::load_opts(&[BACKEND_PORT], None, &opts)
            .context("loading the filter's programs (the object embedded in filter-bench)")?;
        Ok(Bench {
            dp,
            empty: EmptyClassifier::load()?,
            rules: 0,
        })
    }

    pub fn set_rules(&mut self, n: usize) -> Result<()> {
        if self.rules != n {
            self.dp.apply(&policy(n)?)?;
            self.rules = n;
        }
        Ok(())
    }

    fn counters(&self) -> Result<BTreeMap<String, u64>> {
        Ok(self
            .dp
            .counters()?
            .into_iter()
            .map(|(r, n)| (format!("{r:?}"), n))
            .collect())
    }

    /// Client bytes through the ingress entry program, once: its duration; the frame must pass.
    /// (No counter is read around it: dozens of map reads before each packet would measure it
    /// on colder caches than traffic does.)
    fn ingress(&mut self, what: &str, frame: &[u8]) -> Result<f64> {
        let r = self.dp.test_run(frame, 1)?;
        if r.action != PASS {
            let counted: BTreeMap<String, u64> = self
                .counters()?
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect();
            bail!(
                "steady state: {what} was not passed (action {}; counters since the load: {counted:?})",
                r.action
            );
        }
        Ok(r.duration.as_nanos() as f64)
    }

    /// Server bytes through the egress entry program, once: its duration.
    fn egress(&mut self, what: &str, frame: &[u8]) -> Result<f64> {
        let r = self.dp.test_run_egress(frame, 1)?;
        ensure!(
            r.action == PASS,
            "steady state: {what} (egress) returned {}",
            r.action
        );
        Ok(r.duration.as_nanos() as f64)
    }
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
// Repeated test runs: a packet to another port.

/// A 100-byte TCP segment to port 22: the filter's first checks send it on.
pub fn other_port_frame() -> Vec<u8> {
    Segment::client(40000, 22, 0x1000_0000, 0x2000_0000, &[b'x'; 100])
        .opts(ts_opt(1, 1))
        .build()
}

/// Calls of each program per round (alternating), for the repeated figure.
pub const PAIRS: usize = 5;

fn other_port(b: &mut Bench, rules: usize, round: usize, repeat: u32) -> Result<Vec<RepeatRun>> {
    let frame = other_port_frame();
    let mut out = Vec::new();
    for _ in 0..PAIRS {
        let before = b.counters()?;
        let r = b.dp.test_run(&frame, repeat)?;
        ensure!(
            r.action == PASS,
            "the other-port frame returned {}",
            r.action
        );
        let reasons = moved(&before, &b.counters()?);
        let empty = b.empty.test_run(&frame, repeat)?;
        out.push(RepeatRun {
            rules,
            round,
            repeat,
            filter_ns: r.duration.as_nanos() as f64,
            empty_ns: empty.as_nanos() as f64,
            reasons,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Steady state.

/// Packets per round and kind.
pub const PACKETS: usize = 2000;

/// What wrk sends (its default request: no header but `Host`).
const REQUEST: &[u8] = b"GET /api/items HTTP/1.1\r\nHost: 10.77.0.2\r\n\r\n";
/// What the bench's nginx answers (its response head, a 3-byte body).
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 10:28:15 GMT\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n";
/// An upload and a download whose bodies outlast the round.
const UPLOAD: &[u8] =
    b"POST /api/items HTTP/1.1\r\nHost: 10.77.0.2\r\nContent-Length: 1000000000\r\n\r\n";
const DOWNLOAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n";
/// Body segments: a request body of 512 B per segment, a response body of a full 1500-byte
/// MTU's payload (less the timestamp option).
const UP_SEGMENT: usize = 512;
const DOWN_SEGMENT: usize = 1436;
/// The long request line's path: with `GET `, ` HTTP/1.1` and its CRLF, the line is 1 KiB.
pub const LONG_PATH: usize = 1009;

/// The steady-state rows, in the report's order.
pub mod kind {
    pub const GET: &str = "keep-alive GET (wrk's request), ingress";
    pub const RESPONSE: &str = "its response (nginx's 200, 3 B body), egress";
    pub const LONG: &str = "keep-alive GET, 1 KiB request line, ingress";
    pub const QUERY: &str =
        "keep-alive GET, 1 KiB request line of ~20-byte query parameters, ingress";
    pub const BROWSER: &str = "keep-alive GET with a browser's headers (587 B), ingress";
    pub const UP: &str = "request body segment (512 B), ingress";
    pub const DOWN: &str = "response body segment (1436 B), egress";
    pub const EMPTY: &str = "empty classifier, one call (the GET's frame)";
    pub const ALL: [&str; 8] = [GET, RESPONSE, LONG, QUERY, BROWSER, UP, DOWN, EMPTY];
}

/// A GET as a browser sends it: long header lines the filter does not act on.
const BROWSER_REQUEST: &[u8] = b"GET /api/items HTTP/1.1\r\nHost: 10.77.0.2\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.9,de;q=0.8\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nCookie: session=3f2a9c0e7b5d4e1f8a6b2c9d0e3f4a5b; theme=dark; consent=functional,analytics; _ga=GA1.1.123456789.1700000000\r\nUpgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Site: none\r\nSec-Fetch-User: ?1\r\nPriority: u=0, i\r\n\r\n";

/// A GET of a path of `len` bytes, with wrk's `Host` header.
pub fn long_request(len: usize) -> Vec<u8> {
    let mut path = String::from("/api/");
    while path.len() < len {
        path.push((b'a' + (path.len() % 26) as u8) as char);
    }
    get(&path)
}

/// A GET of `target` with wrk's `Host` header.
fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: 10.77.0.2\r\n\r\n").into_bytes()
}

/// A GET of `/api/items` whose target is `len` bytes with its query of ~20-byte parameters
/// (`p1=value-of-param-1&`, ...), with wrk's `Host` header.
pub fn query_request(len: usize) -> Vec<u8> {
    let mut target = String::from("/api/items?");
    let mut i = 0;
    while target.len() < len {
        i += 1;
        target.push_str(&format!("p{i}=value-of-param-{i}&"));
    }
    target.truncate(len);
    get(&target)
}

/// One connection as both programs see it, after a handshake through them: the client's and
/// the server's next sequence numbers and timestamp clocks.
struct Conn {
    port: u16,
    client: u32,
    server: u32,
    ts_client: u32,
    ts_server: u32,
}

/// Window scale both ends announce: the upload's body stays inside the server's window.
const WSCALE: u8 = 7;

impl Conn {
    /// SYN in, SYN|ACK out, ACK in: followed from its first byte in both directions.
    fn open(b: &mut Bench, port: u16) -> Result<Conn> {
        let (client, server) = (0x1000_0000u32, 0x7000_0000u32);
        let syn = Segment::client(port, BACKEND_PORT, client, 0, &[])
            .flags(SYN)
            .opts(syn_opts(100, 0, WSCALE));
        b.ingress("the client's SYN", &syn.build())?;
        let synack = Segment::server(port, BACKEND_PORT, server, client + 1, &[])
            .flags(SYN | ACK)
            .opts(syn_opts(500, 100, WSCALE));
        b.egress("the server's SYN|ACK", &synack.build())?;
        let mut c = Conn {
            port,
            client: client + 1,
            server: server + 1,
            ts_client: 101,
            ts_server: 500,
        };
        let ack = c.client_segment(&[]);
        b.ingress("the handshake's last ACK", &ack)?;
        Ok(c)
    }

    fn client_segment(&mut self, payload: &[u8]) -> Vec<u8> {
        let f = Segment::client(self.port, BACKEND_PORT, self.client, self.server, payload)
            .opts(ts_opt(self.ts_client, self.ts_server))
            .build();
        self.client = self.client.wrapping_add(payload.len() as u32);
        self.ts_client += 1;
        f
    }

    fn server_segment(&mut self, payload: &[u8]) -> Vec<u8> {
        let f = Segment::server(self.port, BACKEND_PORT, self.server, self.client, payload)
            .opts(ts_opt(self.ts_server, self.ts_client))
            .build();
        self.server = self.server.wrapping_add(payload.len() as u32);
        self.ts_server += 1;
        f
    }

    /// A request and its answer: the ns of each.
    fn exchange(&mut self, b: &mut Bench, request: &[u8], response: &[u8]) -> Result<(f64, f64)> {
        let f = self.client_segment(request);
        let t = b.ingress("a keep-alive request", &f)?;
        let f = self.server_segment(response);
        Ok((t, b.egress("a response", &f)?))
    }

    /// The client's FIN: the filter forgets the connection.
    fn close(mut self, b: &mut Bench) -> Result<()> {
        let f = Segment::client(self.port, BACKEND_PORT, self.client, self.server, &[])
            .flags(FIN | ACK)
            .opts(ts_opt(self.ts_client, self.ts_server))
            .build();
        self.ts_client += 1;
        b.ingress("the client's FIN", &f)?;
        Ok(())
    }
}

/// One round of steady state: `PACKETS` of each kind, the kinds in an order rotated at every
/// step (the first packet after the bench's own code runs on colder caches than the rest).
fn steady_round(b: &mut Bench, rules: usize, round: usize, base: u16) -> Result<Vec<SteadyRun>> {
    let mut keep = Conn::open(b, base)?;
    let mut long = Conn::open(b, base + 1)?;
    let mut up = Conn::open(b, base + 2)?;
    let mut down = Conn::open(b, base + 3)?;
    let mut browser = Conn::open(b, base + 4)?;
    let mut query = Conn::open(b, base + 5)?;
    let f = up.client_segment(UPLOAD);
    b.ingress("the upload's head", &f)?;
    let f = down.client_segment(REQUEST);
    b.ingress("the download's request", &f)?;
    let f = down.server_segment(DOWNLOAD);
    b.egress("the download's head", &f)?;
    let (long_line, query_line, up_body, down_body) = (
        long_request(LONG_PATH),
        query_request(LONG_PATH),
        vec![b'u'; UP_SEGMENT],
        vec![b'd'; DOWN_SEGMENT],
    );
    let empty_frame = Segment::client(base, BACKEND_PORT, 1, 1, REQUEST).build();
    let mut ns: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    const GROUPS: usize = 7;
    for step in 0..PACKETS {
        for g in 0..GROUPS {
            match (g + step) % GROUPS {
                0 => {
                    let (get, response) = keep.exchange(b, REQUEST, RESPONSE)?;
                    ns.entry(kind::GET).or_default().push(get);
                    ns.entry(kind::RESPONSE).or_default().push(response);
                }
                1 => {
                    let (t, _) = long.exchange(b, &long_line, RESPONSE)?;
                    ns.entry(kind::LONG).or_default().push(t);
                }
                2 => {
                    let f = up.client_segment(&up_body);
                    let t = b.ingress("a request body segment", &f)?;
                    ns.entry(kind::UP).or_default().push(t);
                    // The server's ACK, unmeasured: it moves the window's edge on, as the
                    // server's TCP does.
                    let f = up.server_segment(&[]);
                    b.egress("the server's ACK", &f)?;
                }
                5 => {
                    let (t, _) = browser.exchange(b, BROWSER_REQUEST, RESPONSE)?;
                    ns.entry(kind::BROWSER).or_default().push(t);
                }
                6 => {
                    let (t, _) = query.exchange(b, &query_line, RESPONSE)?;
                    ns.entry(kind::QUERY).or_default().push(t);
                }
                3 => {
                    let f = down.server_segment(&down_body);
                    let t = b.egress("a response body segment", &f)?;
                    ns.entry(kind::DOWN).or_default().push(t);
                }
                _ => {
                    let t = b.empty.test_run(&empty_frame, 1)?;
                    ns.entry(kind::EMPTY).or_default().push(t.as_nanos() as f64);
                }
            }
        }
    }
    for c in [keep, long, up, down, browser, query] {
        c.close(b)?;
    }
    Ok(kind::ALL
        .iter()
        .map(|k| {
            let mut v = ns.remove(k).unwrap_or_default();
            SteadyRun {
                kind: (*k).to_owned(),
                rules,
                round,
                packets: v.len(),
                p50: crate::stats::quantile(&mut v, 0.5),
                p10: crate::stats::quantile(&mut v, 0.1),
            }
        })
        .collect())
}

/// The test-run parts of section 2: `rounds` rounds, both rule counts in each (their order
/// rotated, so that the machine's state at one moment does not pass for a difference).
pub fn test_runs(rounds: usize, repeat: u32, t0: std::time::Instant) -> Result<KernelResults> {
    let mut out = KernelResults::default();
    let mut b = Bench::load()?;
    for name in ALL_PROGRAMS {
        out.verified_insns
            .insert(name.to_owned(), b.dp.verified_instructions_of(name)?);
    }
    progress(
        t0,
        format!(
            "section 2 (kernel cost): loaded the filter, verified instructions {:?}",
            out.verified_insns
        ),
    );
    for round in 0..rounds {
        for rules in rotated(&RULE_COUNTS, round) {
            b.set_rules(rules)?;
            let runs = other_port(&mut b, rules, round, repeat)?;
            for r in &runs {
                progress(
                    t0,
                    format!(
                        "  {rules} rules r{round} other port: {:.1} ns, empty classifier {:.1} ns ({:?})",
                        r.filter_ns, r.empty_ns, r.reasons
                    ),
                );
            }
            out.other_port.extend(runs);
            if out.steady_error.is_some() {
                continue;
            }
            let base = 45_000 + 16 * round as u16 + if rules == 10 { 0 } else { 8 };
            match steady_round(&mut b, rules, round, base) {
                Ok(runs) => {
                    for r in &runs {
                        progress(
                            t0,
                            format!(
                                "  {rules} rules r{round} steady {}: p50 {:.0} ns, p10 {:.0} ns",
                                r.kind, r.p50, r.p10
                            ),
                        );
                    }
                    out.steady.extend(runs);
                }
                Err(e) => {
                    progress(t0, format!("  steady state failed: {e:#}"));
                    out.steady_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// bpf_stats.

/// Program ids of the BPF descriptors `pid` holds, from `/proc/<pid>/fdinfo`.
fn prog_ids_of(pid: u32) -> BTreeSet<u32> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return BTreeSet::new();
    };
    rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// (runs, run time in ns) of each program of the daemon `pid`, by name; every program of
/// [`ALL_PROGRAMS`] must be there (several daemons may run on a shared machine: only the
/// programs this one holds count).
fn daemon_stats(pid: u32) -> Result<BTreeMap<String, (u64, u64)>> {
    let ids = prog_ids_of(pid);
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        let info = info.context("listing the loaded BPF programs")?;
        if !ids.contains(&info.id()) {
            continue;
        }
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if let Some(full) = ALL_PROGRAMS.iter().find(|p| p.starts_with(name)) {
            out.insert(
                (*full).to_owned(),
                (info.run_count(), info.run_time().as_nanos() as u64),
            );
        }
    }
    for p in ALL_PROGRAMS {
        ensure!(
            out.contains_key(p),
            "filterd (pid {pid}) holds no program named {p}"
        );
    }
    Ok(out)
}

/// `bpf_stats` of the daemon `pid` over `rounds` runs of `spec` (allowed keep-alive GETs).
pub fn bpf_stats(
    lab: &filter_tests::lab::Lab,
    pid: u32,
    spec: &WrkSpec,
    rounds: usize,
    t0: std::time::Instant,
) -> Result<Vec<StatsRun>> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling the kernel's BPF run-time statistics")?;
    // The floor: where it cannot be attached (no TCX before 6.6), the figures are raw.
    let floor = EmptyClassifier::load().and_then(|mut e| {
        e.attach_last(lab.server_netns(), lab.server_iface())?;
        Ok(e)
    });
    if let Err(e) = &floor {
        progress(t0, format!("  bpf_stats: no floor: {e:#}"));
    }
    let floor = floor.ok();
    let floor_stats = || floor.as_ref().and_then(|f| f.stats().ok());
    let mut out = Vec::new();
    for round in 0..rounds {
        let before = daemon_stats(pid)?;
        let floor0 = floor_stats();
        let (w, _) = run_load(lab, spec, None)?;
        let after = daemon_stats(pid)?;
        let floor1 = floor_stats();
        let programs = after
            .iter()
            .map(|(name, &(c1, t1))| {
                let (c0, t0) = before.get(name).copied().unwrap_or((0, 0));
                (name.clone(), (c1.saturating_sub(c0), t1.saturating_sub(t0)))
            })
            .collect();
        let run = StatsRun {
            round,
            requests: w.requests,
            duration_us: w.duration_us,
            programs,
            floor: floor0
                .zip(floor1)
                .map(|((c0, t0), (c1, t1))| (c1.saturating_sub(c0), t1.saturating_sub(t0))),
        };
        progress(
            t0,
            format!(
                "  bpf_stats r{round}: {:.0} ns per request ({:.0} net of the floor) over {} requests ({:?}; floor {:?})",
                run.ns_per_request(),
                run.net_ns_per_request().unwrap_or(f64::NAN),
                run.requests,
                run.programs,
                run.floor
            ),
        );
        out.push(run);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_request_line_is_one_kib() {
        let r = long_request(LONG_PATH);
        let line = r.split(|&b| b == b'\n').next().unwrap();
        assert_eq!(line.len() + 1, 1024);
        assert!(line.starts_with(b"GET /api/") && line.ends_with(b" HTTP/1.1\r"));
    }

    #[test]
    fn kernel_time_per_request_sums_every_program() {
        let run = StatsRun {
            requests: 1000,
            programs: [
                ("http_ingress".to_owned(), (1000, 400_000)),
                ("http_egress".to_owned(), (1000, 300_000)),
                // Tail-called stages: their time is in their entry program's.
                ("ingress_parse".to_owned(), (0, 0)),
            ]
            .into(),
            ..StatsRun::default()
        };
        assert_eq!(run.ns_per_request(), 700.0);
        assert_eq!(run.net_ns_per_request(), None);
        // The floor, 100 ns a run, comes off each of the 2000 entry runs.
        let run = StatsRun {
            floor: Some((5000, 500_000)),
            ..run
        };
        assert_eq!(run.floor_ns(), Some(100.0));
        assert_eq!(run.net_ns_per_request(), Some(500.0));
    }

    #[test]
    fn the_empty_classifier_is_an_elf_aya_can_parse() {
        let obj = empty_object().unwrap();
        let parsed = aya_obj_parse(&obj);
        assert_eq!(parsed, vec![EMPTY_NAME.to_owned()]);
    }

    /// The program names aya finds in an object (no kernel needed).
    fn aya_obj_parse(obj: &[u8]) -> Vec<String> {
        let ebpf = aya::EbpfLoader::new().load(obj);
        // Loading maps needs no kernel for an object without maps; programs are only parsed.
        ebpf.map(|e| e.programs().map(|(n, _)| n.to_owned()).collect())
            .unwrap_or_else(|e| panic!("aya cannot parse the empty classifier: {e}"))
    }
}
