//! `cargo xtask bench`: the published benchmarks (issue 5), run on this machine.
//!
//! Owns: the benchmark lab (one client and one server network namespace from
//! `filter_tests::lab`, an nginx backend on :80, an nginx "405 front" on :8080/:8081, `filterd`
//! started and stopped as each arm needs), the load generators (wrk), the kernel probes
//! (`bpftool prog run` = `BPF_PROG_TEST_RUN`, `bpf_stats`, map memory), and the results:
//! `docs/BENCHMARKS.md` plus raw data under `docs/bench/`.
//!
//! Method: every figure is a ratio against a baseline measured in the same run. The arms of a
//! section are interleaved inside each round (their order rotates from round to round), the
//! rounds are repeated, and the report gives the median and the spread (min..max) of the
//! per-round ratios. Every run is bounded in time; progress goes to stderr.
//!
//! Must not: touch the system nginx (its config, service or logs), kill what it did not start,
//! tune anything outside its own namespaces, or leave `kernel.bpf_stats_enabled` changed.

mod env;
mod kernel;
mod procs;
mod profile;
mod report;
mod steady;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use filter_tests::lab::{self, Lab};
use serde::{Deserialize, Serialize};

use procs::{CpuSnapshot, Filterd, Nginx, WrkResult, WrkSpec};

/// Port the filtered backend listens on (the port `filterd` guards).
pub const BACKEND_PORT: u16 = 80;
/// nginx answering 405 itself, keep-alive (what nginx does by default).
pub const FRONT_KA_PORT: u16 = 8080;
/// nginx answering 405 itself and closing the connection (the same shape as filterd's answer).
pub const FRONT_CLOSE_PORT: u16 = 8081;
/// The path every allowed and rejected request uses; the policy allows GET and POST on it.
pub const PATH: &str = "/api/items";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Rounds of sections 2 to 4; the arms of a section are interleaved inside each round.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per wrk run in sections 2 to 4 (section 2: its `bpf_stats` runs, at most 8).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Rounds of section 1 (allowed traffic), whose 0.98 target needs a narrower interval than
    /// five rounds give: with 15, the median's 95 % confidence interval runs from the 4th to
    /// the 12th of the sorted ratios (with 5, it is the whole range).
    #[arg(long, default_value_t = 15)]
    pub allowed_rounds: usize,
    /// Seconds per wrk run in section 1 (more, shorter runs: the VM's speed drifts over
    /// seconds, and each round's arms share the drift).
    #[arg(long, default_value_t = 4)]
    pub allowed_duration: u64,
    /// wrk threads for the measured client.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// wrk connections for the measured client.
    #[arg(long, default_value_t = 50)]
    pub connections: u32,
    /// Repetitions per BPF_PROG_TEST_RUN call.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Sections to run (1 allowed, 2 kernel cost, 3 rejection, 4 flood, 5 policy ops).
    #[arg(long, value_delimiter = ',', default_values_t = [1u8, 2, 3, 4, 5])]
    pub sections: Vec<u8>,
    /// Benchmark this filterd binary instead of building the workspace.
    #[arg(long)]
    pub filterd: Option<PathBuf>,
    /// Another filterd binary (e.g. the previous commit's build): section 2's steady-state
    /// packets alternate between its programs and the measured build's, in the same run
    /// (new ÷ baseline per packet kind). Runs in a lab of its own, for section 2 only.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Where BENCHMARKS.md and bench/ go (default: <workspace>/docs).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only rewrite BENCHMARKS.md and the CSV from an earlier run's results.json (no root).
    #[arg(long)]
    pub report_from: Option<PathBuf>,
    /// Instead of the benchmarks: section 1's ratios of several earlier runs' results.json,
    /// per run and pooled over all their rounds (median and its 95 % interval), as a
    /// Markdown table on stdout. Pool only runs of the same programs.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub pool: Vec<PathBuf>,
    /// Do not apt-get install missing tools; fail naming them instead.
    #[arg(long)]
    pub no_install: bool,
    /// What the measured filterd is, when it is not this tree's build (e.g. "built from 4288020").
    #[arg(long)]
    pub label: Option<String>,
    /// A note to print in the report (repeatable), e.g. what was observed about another build.
    #[arg(long)]
    pub note: Vec<String>,
    /// Instead of the benchmarks: profile the programs on this traffic (`perf record -a`,
    /// samples mapped to BPF functions and source lines) and print where the time goes.
    #[arg(long, value_enum)]
    pub profile: Option<steady::Traffic>,
}

/// One measured run of one arm.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct Run {
    pub section: String,
    pub arm: String,
    pub round: usize,
    /// Position inside the round (the order rotates).
    pub slot: usize,
    pub wrk: Option<WrkResult>,
    /// The second load generator (the flood in section 4).
    pub flood: Option<WrkResult>,
    pub cpu: CpuSnapshot,
    pub error: Option<String>,
}

/// One policy apply through the API.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Apply {
    pub rules: usize,
    /// Rules the previous policy had (the apply clears the older inactive map first).
    pub after_rules: usize,
    pub http_code: u16,
    /// curl's time_total: upload, parse, validate, map writes, switch, answer.
    pub seconds: f64,
    pub context: String,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
pub struct Results {
    pub env: env::Environment,
    pub args: String,
    pub rounds: usize,
    pub duration_s: u64,
    /// Section 1's own rounds and run length (0: older results, where it used the above).
    pub allowed_rounds: usize,
    pub allowed_duration_s: u64,
    pub threads: u32,
    pub connections: u32,
    pub repeat: u32,
    pub started_unix: u64,
    pub total_seconds: f64,
    /// Why the filter arms could not run, if they could not.
    pub filter_error: Option<String>,
    /// `--label`: what the measured filterd is, if not this tree's build.
    pub label: Option<String>,
    /// `--note`s.
    pub notes: Vec<String>,
    pub daemon_starts: Vec<f64>,
    pub sanity: Vec<String>,
    pub runs: Vec<Run>,
    pub applies: Vec<Apply>,
    pub kernel: Option<kernel::KernelResults>,
    pub memory: Option<kernel::Memory>,
}

/// An earlier run's results.json.
fn load_results(json: &Path) -> Result<Results> {
    let text = fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench results.json", json.display()))
}

pub fn main(args: &Args) -> Result<()> {
    if !args.pool.is_empty() {
        let runs = args
            .pool
            .iter()
            .map(|p| Ok((p.display().to_string(), load_results(p)?)))
            .collect::<Result<Vec<_>>>()?;
        print!("{}", report::pooled_allowed(&runs));
        return Ok(());
    }
    if let Some(json) = &args.report_from {
        let results = load_results(json)?;
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| crate::build::workspace_root().join("docs"));
        fs::create_dir_all(out.join("bench"))?;
        fs::write(
            out.join("bench").join("wrk-runs.csv"),
            report::runs_csv(&results),
        )?;
        fs::write(out.join("BENCHMARKS.md"), report::markdown(&results))?;
        eprintln!(
            "bench: rewrote {} from {}",
            out.join("BENCHMARKS.md").display(),
            json.display()
        );
        return Ok(());
    }
    if !crate::build::is_root() {
        bail!("the benchmarks create network namespaces and load eBPF: run `sudo -E cargo xtask bench`");
    }
    let filterd = match &args.filterd {
        Some(p) => p.clone(),
        None => crate::build::build_all()?.filterd,
    };
    if let Some(traffic) = args.profile {
        env::ensure_tools(!args.no_install)?;
        lab::install_ctrlc_cleanup()?;
        return profile::run(&filterd, traffic);
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::build::workspace_root().join("docs"));
    env::ensure_tools(!args.no_install)?;
    lab::install_ctrlc_cleanup()?;
    let mut results = Results {
        env: env::Environment::collect(&filterd),
        args: format!("{args:?}"),
        rounds: args.rounds,
        duration_s: args.duration,
        allowed_rounds: args.allowed_rounds,
        allowed_duration_s: args.allowed_duration,
        threads: args.threads,
        connections: args.connections,
        repeat: args.repeat,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ..Default::default()
    };
    let t0 = Instant::now();
    let outcome = bench(args, &filterd, &mut results, t0);
    results.total_seconds = t0.elapsed().as_secs_f64();
    if let Err(e) = &outcome {
        results.filter_error.get_or_insert_with(|| format!("{e:#}"));
        eprintln!("bench: stopped early: {e:#}");
    }
    write_outputs(&out, &results)?;
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        out.join("BENCHMARKS.md").display(),
        out.join("bench").display(),
        results.total_seconds
    );
    outcome
}

fn write_outputs(out: &Path, results: &Results) -> Result<()> {
    let raw = out.join("bench");
    fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;
    fs::write(
        raw.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    fs::write(raw.join("wrk-runs.csv"), report::runs_csv(results))?;
    fs::write(out.join("BENCHMARKS.md"), report::markdown(results))?;
    Ok(())
}

/// Progress line with the elapsed time.
pub fn progress(t0: Instant, msg: impl AsRef<str>) {
    eprintln!("[{:>5.0}s] {}", t0.elapsed().as_secs_f64(), msg.as_ref());
}

/// The arms of round `round`, rotated so that no arm always goes first.
fn rotated<T: Clone>(arms: &[T], round: usize) -> Vec<T> {
    let mut v = arms.to_vec();
    let n = v.len();
    v.rotate_left(round % n);
    v
}

// ---------------------------------------------------------------------------
// The filter's state, changed only through `ensure`.

/// What the filter should look like for an arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterState {
    Off,
    /// No daemon; only an empty classifier (`r0 = -1; exit`) attached where the daemon attaches
    /// its programs: what having any classifier there costs.
    Empty,
    Rules(usize),
}

/// Section 1's arm with only the empty classifier attached.
pub const EMPTY_ARM: &str = "empty classifier";

pub struct Filter<'a> {
    lab: &'a Lab,
    bin: PathBuf,
    /// Our own bpffs pin directory: the default one is shared by every filterd on the machine.
    pin_dir: PathBuf,
    pub daemon: Option<Filterd>,
    pub rules: usize,
    files: BTreeMap<usize, PathBuf>,
    /// `FilterState::Empty`: the program (loaded once) and its attachments while in that state.
    empty: Option<kernel::EmptyClassifier>,
    empty_links: Vec<std::os::fd::OwnedFd>,
}

/// The rule set with `n` rules: `/api/items` (GET, POST) first, then `/r/NNNNNN/items` (GET).
pub fn rules_json(n: usize) -> String {
    let mut s = String::with_capacity(n * 48 + 16);
    s.push_str("{\"rules\":[");
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        if i == 0 {
            s.push_str(&format!(
                "{{\"path\":\"{PATH}\",\"methods\":[\"GET\",\"POST\"]}}"
            ));
        } else {
            s.push_str(&format!(
                "{{\"path\":\"/r/{i:06}/items\",\"methods\":[\"GET\"]}}"
            ));
        }
    }
    s.push_str("]}");
    s
}

/// The same rule set as a policy file (for the daemon's start).
pub fn rules_toml(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i == 0 {
            s.push_str(&format!(
                "[[rules]]\npath = \"{PATH}\"\nmethods = [\"GET\", \"POST\"]\n"
            ));
        } else {
            s.push_str(&format!(
                "[[rules]]\npath = \"/r/{i:06}/items\"\nmethods = [\"GET\"]\n"
            ));
        }
    }
    s
}

/// Rules the daemon starts with.
pub const START_RULES: usize = 10;

impl<'a> Filter<'a> {
    pub fn new(lab: &'a Lab, bin: &Path) -> Filter<'a> {
        Filter::named(lab, bin, "")
    }

    /// A second daemon of the same run (its own pin directory).
    pub fn named(lab: &'a Lab, bin: &Path, name: &str) -> Filter<'a> {
        Filter {
            lab,
            bin: bin.to_owned(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/fwbench-{}{name}", std::process::id())),
            daemon: None,
            rules: 0,
            files: BTreeMap::new(),
            empty: None,
            empty_links: Vec::new(),
        }
    }

    pub fn ensure(&mut self, want: FilterState, results: &mut Results) -> Result<()> {
        if want != FilterState::Empty {
            // Dropping the links detaches the empty classifier.
            self.empty_links.clear();
        }
        match want {
            FilterState::Off => self.stop_daemon()?,
            FilterState::Empty => {
                self.stop_daemon()?;
                if self.empty_links.is_empty() {
                    let (netns, iface) = (self.lab.server_netns(), self.lab.server_iface());
                    self.empty_links = self.empty_classifier()?.attach(netns, iface)?;
                }
            }
            FilterState::Rules(n) => {
                if self.daemon.is_none() {
                    let t = Instant::now();
                    let d = Filterd::start(
                        self.lab,
                        &self.bin,
                        &rules_toml(START_RULES),
                        &self.pin_dir,
                        Duration::from_secs(180),
                    )
                    .context("starting filterd")?;
                    results.daemon_starts.push(t.elapsed().as_secs_f64());
                    self.daemon = Some(d);
                    self.rules = START_RULES;
                }
                if self.rules != n {
                    self.apply(n, "arm change", results)?;
                }
            }
        }
        Ok(())
    }

    /// The bench's empty classifier, loaded on first use and kept for the run: section 1
    /// attaches it, section 2 test-runs it.
    pub fn empty_classifier(&mut self) -> Result<&kernel::EmptyClassifier> {
        if self.empty.is_none() {
            self.empty = Some(kernel::EmptyClassifier::load()?);
        }
        self.empty.as_ref().context("empty classifier")
    }

    fn stop_daemon(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.stop().context("stopping filterd")?;
        }
        Ok(())
    }

    /// PUT /v1/rules with `n` rules; records and returns the apply.
    pub fn apply(&mut self, n: usize, context: &str, results: &mut Results) -> Result<Apply> {
        let file = match self.files.get(&n) {
            Some(f) => f.clone(),
            None => {
                let f = self.lab.dir().join(format!("rules-{n}.json"));
                fs::write(&f, rules_json(n)).with_context(|| format!("writing {}", f.display()))?;
                self.files.insert(n, f.clone());
                f
            }
        };
        let daemon = self.daemon.as_ref().context("filterd is not running")?;
        let (code, seconds) = daemon.api_file("PUT", "/v1/rules", &file)?;
        let a = Apply {
            rules: n,
            after_rules: self.rules,
            http_code: code,
            seconds,
            context: context.to_owned(),
        };
        results.applies.push(a.clone());
        if code != 200 {
            bail!("PUT /v1/rules with {n} rules answered {code} (expected 200)");
        }
        self.rules = n;
        Ok(a)
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.pid())
    }
}

impl Drop for Filter<'_> {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.stop();
        }
        // Only our own directory (pinned counters; links are unpinned with --fail-open).
        if self.pin_dir.exists() {
            if let Err(e) = fs::remove_dir_all(&self.pin_dir) {
                eprintln!("bench: could not remove {}: {e}", self.pin_dir.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The sections.

struct Ctx<'a> {
    args: &'a Args,
    lab: &'a Lab,
    backend: &'a Nginx,
    front: &'a Nginx,
    t0: Instant,
}

impl Ctx<'_> {
    fn url(&self, port: u16) -> String {
        format!("http://{}:{port}{PATH}", self.lab.server_v4())
    }
    fn wrk(&self, method: &str, port: u16) -> WrkSpec {
        WrkSpec {
            method: method.into(),
            url: self.url(port),
            threads: self.args.threads,
            connections: self.args.connections,
            seconds: self.args.duration,
        }
    }
    /// Section 1's run: as `wrk`, for its own run length.
    fn wrk_allowed(&self) -> WrkSpec {
        WrkSpec {
            seconds: self.args.allowed_duration,
            ..self.wrk("GET", BACKEND_PORT)
        }
    }
    /// One bounded wrk run (plus an optional concurrent one), with CPU accounting.
    fn measure(
        &self,
        filter: &Filter,
        main: &WrkSpec,
        flood: Option<&WrkSpec>,
    ) -> Result<(Option<WrkResult>, Option<WrkResult>, CpuSnapshot)> {
        let before = procs::cpu_now(self.backend, self.front, filter.pid());
        let (a, b) = procs::run_wrk_pair(self.lab, main, flood)?;
        let after = procs::cpu_now(self.backend, self.front, filter.pid());
        Ok((Some(a), b, procs::cpu_delta(&before, &after)))
    }
}

fn bench(args: &Args, filterd: &Path, results: &mut Results, t0: Instant) -> Result<()> {
    let lab = Lab::new().context("building the benchmark lab")?;
    progress(
        t0,
        format!(
            "lab: client {} <-> server {} ({})",
            lab.client_netns(),
            lab.server_netns(),
            lab.server_iface()
        ),
    );
    procs::tune_namespaces(&lab)?;
    let backend = Nginx::start(&lab, "backend", &procs::backend_conf(BACKEND_PORT))?;
    let front = Nginx::start(
        &lab,
        "front",
        &procs::front_conf(FRONT_KA_PORT, FRONT_CLOSE_PORT),
    )?;
    progress(
        t0,
        "nginx backend on :80, nginx 405 front on :8080 (keep-alive) and :8081 (close)",
    );
    let ctx = Ctx {
        args,
        lab: &lab,
        backend: &backend,
        front: &front,
        t0,
    };
    let mut filter = Filter::new(&lab, filterd);

    // Preflight: does the filter load and behave? If not, the baselines still run.
    let filter_ok = match preflight(&ctx, &mut filter, results) {
        Ok(()) => true,
        Err(e) => {
            let msg = format!("{e:#}");
            progress(
                t0,
                format!("FILTER UNAVAILABLE, running baselines only: {msg}"),
            );
            results.filter_error = Some(msg);
            let _ = filter.ensure(FilterState::Off, results);
            false
        }
    };
    // Warm-up, unmeasured.
    filter.ensure(FilterState::Off, results)?;
    let warm = WrkSpec {
        seconds: 3,
        ..ctx.wrk("GET", BACKEND_PORT)
    };
    let _ = procs::run_wrk_pair(&lab, &warm, None);

    let s = &args.sections;
    if s.contains(&1) {
        section_allowed(&ctx, &mut filter, results, filter_ok)?;
    }
    if s.contains(&3) {
        section_rejection(&ctx, &mut filter, results, filter_ok)?;
    }
    if s.contains(&4) && filter_ok {
        section_flood(&ctx, &mut filter, results)?;
    }
    if s.contains(&2) && filter_ok {
        filter.ensure(FilterState::Rules(START_RULES), results)?;
        let k = match &args.baseline {
            Some(bin) => {
                let lab = Lab::new().context("building the baseline's lab")?;
                let mut base = Filter::named(&lab, bin, "-baseline");
                let k = kernel::section_kernel(
                    &ctx_kernel(&ctx),
                    &mut filter,
                    Some(&mut base),
                    results,
                );
                base.ensure(FilterState::Off, results)?;
                k?
            }
            None => kernel::section_kernel(&ctx_kernel(&ctx), &mut filter, None, results)?,
        };
        results.kernel = Some(k);
    }
    if s.contains(&5) && filter_ok {
        section_policy(&ctx, &mut filter, results)?;
    }
    filter.ensure(FilterState::Off, results)?;
    Ok(())
}

fn ctx_kernel<'a>(ctx: &'a Ctx<'a>) -> kernel::KCtx<'a> {
    kernel::KCtx {
        lab: ctx.lab,
        t0: ctx.t0,
        repeat: ctx.args.repeat,
        rounds: ctx.args.rounds.clamp(1, 3),
        stats_seconds: ctx.args.duration.min(8),
        allowed: ctx.wrk("GET", BACKEND_PORT),
        rejected: ctx.wrk("DELETE", BACKEND_PORT),
    }
}

fn preflight(ctx: &Ctx, filter: &mut Filter, results: &mut Results) -> Result<()> {
    progress(
        ctx.t0,
        "preflight: starting filterd (load + verify + attach)",
    );
    filter.ensure(FilterState::Rules(START_RULES), results)?;
    progress(
        ctx.t0,
        format!(
            "preflight: filterd up in {:.2} s",
            results.daemon_starts.last().copied().unwrap_or(0.0)
        ),
    );
    let checks = [
        ("GET", BACKEND_PORT, "200"),
        ("DELETE", BACKEND_PORT, "405"),
        ("DELETE", FRONT_KA_PORT, "405"),
        ("DELETE", FRONT_CLOSE_PORT, "405"),
    ];
    for (method, port, want) in checks {
        let head = procs::curl_head(ctx.lab, method, &ctx.url(port))?;
        let status = head.lines().next().unwrap_or("").to_owned();
        results.sanity.push(format!(
            "{method} :{port}{PATH} (filterd running) ->\n{}",
            head.trim_end()
        ));
        if !status.contains(want) {
            bail!("preflight: {method} :{port}{PATH} answered {status:?}, expected {want}");
        }
    }
    Ok(())
}

fn record(
    results: &mut Results,
    section: &str,
    arm: &str,
    round: usize,
    slot: usize,
    r: Result<(Option<WrkResult>, Option<WrkResult>, CpuSnapshot)>,
    t0: Instant,
) {
    let mut run = Run {
        section: section.into(),
        arm: arm.into(),
        round,
        slot,
        ..Default::default()
    };
    match r {
        Ok((a, b, cpu)) => {
            run.wrk = a;
            run.flood = b;
            run.cpu = cpu;
        }
        Err(e) => run.error = Some(format!("{e:#}")),
    }
    progress(
        t0,
        format!("  {section} r{round} {arm}: {}", report::run_line(&run)),
    );
    results.runs.push(run);
}

fn section_allowed(
    ctx: &Ctx,
    filter: &mut Filter,
    results: &mut Results,
    filter_ok: bool,
) -> Result<()> {
    let mut arms = vec![
        ("no filter", FilterState::Off),
        (EMPTY_ARM, FilterState::Empty),
    ];
    if filter_ok {
        arms.push(("10 rules", FilterState::Rules(10)));
        arms.push(("100k rules", FilterState::Rules(100_000)));
    }
    let rounds = ctx.args.allowed_rounds;
    for round in 0..rounds {
        progress(
            ctx.t0,
            format!("section 1 (allowed traffic) round {}/{rounds}", round + 1),
        );
        for (slot, (arm, state)) in rotated(&arms, round).into_iter().enumerate() {
            let r = filter
                .ensure(state, results)
                .and_then(|_| ctx.measure(filter, &ctx.wrk_allowed(), None));
            record(results, "allowed", arm, round, slot, r, ctx.t0);
        }
    }
    Ok(())
}

fn section_rejection(
    ctx: &Ctx,
    filter: &mut Filter,
    results: &mut Results,
    filter_ok: bool,
) -> Result<()> {
    let mut arms = vec![
        ("nginx 405 keep-alive", FilterState::Off, FRONT_KA_PORT),
        ("nginx 405 close", FilterState::Off, FRONT_CLOSE_PORT),
    ];
    if filter_ok {
        arms.insert(0, ("filterd 405", FilterState::Rules(10), BACKEND_PORT));
    }
    for round in 0..ctx.args.rounds {
        progress(
            ctx.t0,
            format!(
                "section 3 (rejection) round {}/{}",
                round + 1,
                ctx.args.rounds
            ),
        );
        for (slot, (arm, state, port)) in rotated(&arms, round).into_iter().enumerate() {
            let r = filter
                .ensure(state, results)
                .and_then(|_| ctx.measure(filter, &ctx.wrk("DELETE", port), None));
            record(results, "rejection", arm, round, slot, r, ctx.t0);
        }
    }
    Ok(())
}

fn section_flood(ctx: &Ctx, filter: &mut Filter, results: &mut Results) -> Result<()> {
    // The flood generator: one thread, so that it can take at most one of the two CPUs.
    let flood = |port| WrkSpec {
        threads: 1,
        ..ctx.wrk("DELETE", port)
    };
    let arms: Vec<(&str, Option<WrkSpec>)> = vec![
        ("clean", None),
        ("+ flood to filterd", Some(flood(BACKEND_PORT))),
        ("+ flood to nginx 405", Some(flood(FRONT_CLOSE_PORT))),
    ];
    filter.ensure(FilterState::Rules(10), results)?;
    for round in 0..ctx.args.rounds {
        progress(
            ctx.t0,
            format!(
                "section 4 (flood next to allowed) round {}/{}",
                round + 1,
                ctx.args.rounds
            ),
        );
        for (slot, (arm, fl)) in rotated(&arms, round).into_iter().enumerate() {
            let r = filter
                .ensure(FilterState::Rules(10), results)
                .and_then(|_| ctx.measure(filter, &ctx.wrk("GET", BACKEND_PORT), fl.as_ref()));
            record(results, "flood", arm, round, slot, r, ctx.t0);
        }
    }
    Ok(())
}

fn section_policy(ctx: &Ctx, filter: &mut Filter, results: &mut Results) -> Result<()> {
    progress(ctx.t0, "section 5 (policy operations)");
    // A fresh daemon, so that RSS and the first apply start from a known state.
    filter.ensure(FilterState::Off, results)?;
    filter.ensure(FilterState::Rules(START_RULES), results)?;
    let pid = filter.pid().context("filterd pid")?;
    let rss_start = procs::rss_kib(pid);
    let sizes = [1usize, 1_000, 100_000];
    let rounds = ctx.args.rounds.clamp(1, 3);
    for round in 0..rounds {
        for n in rotated(&sizes, round) {
            // Three in a row: the first two still empty an inactive map holding the previous
            // size; the third is the steady state (the inactive map holds the same size).
            for context in ["first", "second", "steady"] {
                let a = filter.apply(n, context, results)?;
                progress(
                    ctx.t0,
                    format!(
                        "  apply {n} rules (previous {}): {:.1} ms",
                        a.after_rules,
                        a.seconds * 1e3
                    ),
                );
            }
        }
    }
    filter.apply(100_000, "for memory", results)?;
    let rss_100k = procs::rss_kib(pid);
    let maps = kernel::maps_of(pid).unwrap_or_default();
    results.memory = Some(kernel::Memory {
        daemon_rss_kib_start: rss_start,
        daemon_rss_kib_100k: rss_100k,
        daemon_hwm_kib: procs::hwm_kib(pid),
        maps,
    });
    Ok(())
}
