//! The run: the lab, the arms of each section interleaved round by round, and the files it
//! writes (`BENCHMARKS.md`, `bench/results.json`, `bench/wrk-runs.csv`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use filter_tests::lab::{self, Lab};

use crate::flood::FloodSpec;
use crate::procs::{self, CpuSnapshot, Filterd, Nginx, WrkResult, WrkSpec};
use crate::{
    env, kernel, progress, report, rotated, Args, Results, Run, BACKEND_PORT, FRONT_PORT, PATH,
};

/// Rules `filterd` starts with (the policy file); other sizes are applied through the API.
const START_RULES: usize = 10;

/// Everything `filter-bench` does without a subcommand.
pub fn main(args: &Args) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::workspace_root().join("docs"));
    if let Some(json) = &args.report_from {
        let text =
            fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let results: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench results.json", json.display()))?;
        write_report(&out, &results, false)?;
        eprintln!(
            "bench: rewrote {} from {}",
            out.join("BENCHMARKS.md").display(),
            json.display()
        );
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks create network namespaces and load eBPF: run `sudo -E cargo xtask bench`");
    }
    let filterd = match &args.filterd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("filterd"),
    };
    anyhow::ensure!(
        filterd.is_file(),
        "no filterd at {} (`cargo xtask build` puts it beside this binary)",
        filterd.display()
    );
    env::ensure_tools(!args.no_install)?;
    lab::install_ctrlc_cleanup()?;
    let t0 = Instant::now();
    let mut results = Results {
        env: env::Environment::collect(&filterd),
        args: Some(args.clone()),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ..Results::default()
    };
    let r = bench(args, &filterd, &mut results, t0);
    results.total_seconds = t0.elapsed().as_secs_f64();
    if let Err(e) = &r {
        progress(t0, format!("bench stopped early: {e:#}"));
        results.sanity.push(format!("the run stopped early: {e:#}"));
    }
    write_report(&out, &results, true)?;
    progress(
        t0,
        format!(
            "wrote {} and {}",
            out.join("BENCHMARKS.md").display(),
            out.join("bench").display()
        ),
    );
    r
}

/// BENCHMARKS.md and the CSV (and, for a new run, results.json), the only raw data kept: a
/// new run replaces the last one's (history lives in git).
fn write_report(out: &Path, results: &Results, json: bool) -> Result<()> {
    let dir = out.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if json {
        fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(results)? + "\n",
        )?;
    }
    fs::write(dir.join("wrk-runs.csv"), report::runs_csv(results))?;
    fs::write(out.join("BENCHMARKS.md"), report::markdown(results))?;
    Ok(())
}

/// What is attached to the server's interface for an arm.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FilterState {
    /// No classifier: the daemon is stopped (it runs fail-open).
    Off,
    /// `filterd` running with this many rules.
    Rules(usize),
}

/// The daemon under test, started and stopped as the arms need.
struct Filter<'a> {
    lab: &'a Lab,
    bin: PathBuf,
    pin_dir: PathBuf,
    daemon: Option<Filterd>,
    rules: usize,
}

/// The same rules as `PUT /v1/rules` takes them.
fn rules_json(n: usize) -> String {
    let mut rules = vec![serde_json::json!({"path": PATH, "methods": ["GET", "POST"]})];
    for i in 1..n {
        rules.push(serde_json::json!({"path": format!("/bench/r{i}"), "methods": ["GET"]}));
    }
    serde_json::json!({ "rules": rules }).to_string()
}

impl<'a> Filter<'a> {
    fn new(lab: &'a Lab, bin: &Path) -> Filter<'a> {
        Filter {
            lab,
            bin: bin.to_owned(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/fwbench-{}", std::process::id())),
            daemon: None,
            rules: 0,
        }
    }

    fn ensure(&mut self, want: FilterState) -> Result<()> {
        match want {
            FilterState::Off => {
                if let Some(mut d) = self.daemon.take() {
                    d.stop().context("stopping filterd")?;
                }
            }
            FilterState::Rules(n) => {
                if self.daemon.is_none() {
                    let d = Filterd::start(
                        self.lab,
                        &self.bin,
                        &kernel::rules_toml(START_RULES),
                        &self.pin_dir,
                        Duration::from_secs(180),
                    )
                    .context("starting filterd")?;
                    self.daemon = Some(d);
                    self.rules = START_RULES;
                }
                if self.rules != n {
                    let file = self.lab.dir().join(format!("rules-{n}.json"));
                    if !file.exists() {
                        fs::write(&file, rules_json(n))?;
                    }
                    let d = self.daemon.as_ref().context("filterd is not running")?;
                    let (code, _) = d.api_file("PUT", "/v1/rules", &file)?;
                    if code != 200 {
                        bail!("PUT /v1/rules with {n} rules answered {code} (expected 200)");
                    }
                    self.rules = n;
                }
            }
        }
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
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

struct Ctx<'a> {
    args: &'a Args,
    lab: &'a Lab,
    pinning: Option<procs::Pinning>,
    backend: &'a Nginx,
    front: &'a Nginx,
    /// PID of the client veth's receive thread, while it has one.
    client_rx: std::cell::Cell<Option<u32>>,
    t0: Instant,
}

impl Ctx<'_> {
    fn url(&self, port: u16) -> String {
        format!("http://{}:{port}{PATH}", self.lab.server_v4())
    }

    fn wrk(&self, method: &str, port: u16, seconds: u64) -> WrkSpec {
        WrkSpec {
            method: method.into(),
            url: self.url(port),
            threads: self.args.threads,
            connections: self.args.connections,
            seconds,
            cpu: None,
        }
    }

    /// The allowed load: keep-alive GETs to the backend, from one wrk thread on the client's
    /// CPU when the sides are pinned.
    fn allowed(&self, seconds: u64) -> WrkSpec {
        let spec = self.wrk("GET", BACKEND_PORT, seconds);
        match self.pinning {
            Some(p) => WrkSpec {
                threads: 1,
                cpu: Some(p.client),
                ..spec
            },
            None => spec,
        }
    }

    fn flood(&self, port: u16) -> FloodSpec {
        FloodSpec {
            addr: (self.lab.server_v4(), port).into(),
            method: "DELETE".into(),
            path: PATH.into(),
            rate: self.args.flood_rate,
            seconds: self.args.duration,
            max_in_flight: 1000,
        }
    }

    /// One bounded load run (plus an optional flood next to it), with CPU accounting.
    fn measure(
        &self,
        filter: &Filter,
        main: &WrkSpec,
        flood: Option<&FloodSpec>,
    ) -> Result<(WrkResult, Option<crate::flood::FloodResult>, CpuSnapshot)> {
        let before = procs::cpu_now(self.backend, self.front, filter.pid(), self.client_rx.get());
        let (a, b) = procs::run_load(self.lab, main, flood)?;
        let after = procs::cpu_now(self.backend, self.front, filter.pid(), self.client_rx.get());
        Ok((a, b, procs::cpu_delta(&before, &after)))
    }

    /// The daemon's verdict counters, when it runs.
    fn counters(&self, filter: &Filter) -> Option<BTreeMap<String, u64>> {
        let (code, body) = filter.daemon.as_ref()?.api("GET", "/v1/stats", None).ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(
            v["counters"]
                .as_object()?
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect(),
        )
    }

    /// Measure `main` (and `flood`) for `arm` after putting the filter in `state`, and record
    /// the run (or its error).
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        filter: &mut Filter,
        results: &mut Results,
        (section, arm, round, slot): (&str, &str, usize, usize),
        state: FilterState,
        main: &WrkSpec,
        flood: Option<&FloodSpec>,
    ) {
        let mut counters = None;
        let r = filter.ensure(state).and_then(|_| {
            counters = self.counters(filter);
            self.measure(filter, main, flood)
        });
        let counters = match (counters, self.counters(filter)) {
            (Some(a), Some(b)) => b
                .into_iter()
                .filter_map(|(k, v)| {
                    let d = v.saturating_sub(a.get(&k).copied().unwrap_or(0));
                    (d > 0).then_some((k, d))
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        let mut run = Run {
            section: section.into(),
            arm: arm.into(),
            round,
            slot,
            counters,
            ..Default::default()
        };
        match r {
            Ok((a, b, cpu)) => {
                run.wrk = Some(a);
                run.flood = b;
                run.cpu = cpu;
            }
            Err(e) => run.error = Some(format!("{e:#}")),
        }
        progress(
            self.t0,
            format!("  {section} r{round} {arm}: {}", report::run_line(&run)),
        );
        results.runs.push(run);
    }
}

fn bench(args: &Args, filterd: &Path, results: &mut Results, t0: Instant) -> Result<()> {
    let s = &args.sections;
    // The test runs need no lab: first, while nothing else of the bench runs.
    if s.contains(&2) {
        let k = kernel::test_runs(args.rounds.clamp(1, 3), args.repeat, t0)?;
        results.kernel = Some(k);
    }
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
    let pinning = procs::Pinning::of(std::thread::available_parallelism().map_or(1, |n| n.get()));
    results.pinning = pinning;
    let backend = Nginx::start(
        &lab,
        "backend",
        &procs::backend_conf(BACKEND_PORT, pinning.map(|p| p.backend)),
    )?;
    let front = Nginx::start(&lab, "front", &procs::front_conf(FRONT_PORT))?;
    progress(
        t0,
        format!("nginx backend on :{BACKEND_PORT}, nginx 405 front on :{FRONT_PORT} (closing)"),
    );
    let ctx = Ctx {
        args,
        lab: &lab,
        pinning,
        backend: &backend,
        front: &front,
        client_rx: Default::default(),
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
            let _ = filter.ensure(FilterState::Off);
            false
        }
    };
    // Warm-up, unmeasured.
    filter.ensure(FilterState::Off)?;
    let _ = procs::run_load(&lab, &ctx.allowed(3), None);

    if s.contains(&1) {
        let mut arms = vec![("no filter", FilterState::Off)];
        if filter_ok {
            for n in kernel::RULE_COUNTS {
                arms.push((arm_name(n), FilterState::Rules(n)));
            }
        }
        let spec = ctx.allowed(args.allowed_duration);
        let rounds = args.allowed_rounds;
        for round in 0..rounds {
            progress(
                t0,
                format!("section 1 (allowed) round {}/{rounds}", round + 1),
            );
            for (slot, (arm, state)) in rotated(&arms, round).into_iter().enumerate() {
                ctx.record(
                    &mut filter,
                    results,
                    ("allowed", arm, round, slot),
                    state,
                    &spec,
                    None,
                );
            }
        }
    }
    if s.contains(&2) && filter_ok {
        filter.ensure(FilterState::Rules(START_RULES))?;
        let pid = filter.pid().context("filterd is not running")?;
        let spec = ctx.allowed(args.duration.min(8));
        progress(t0, "section 2 (kernel cost): bpf_stats under wrk's GETs");
        let stats = kernel::bpf_stats(&lab, pid, &spec, args.rounds.clamp(1, 3), t0);
        if let Some(k) = results.kernel.as_mut() {
            match stats {
                Ok(v) => k.bpf_stats = v,
                Err(e) => {
                    progress(t0, format!("  bpf_stats failed: {e:#}"));
                    k.bpf_stats_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    if s.contains(&3) {
        // (arm, filter, port, the client's receive thread): `filterd`'s CPU per 405 is taken
        // where the client's receive is not charged to it, the rates where the lab is as in
        // the other sections.
        let mut arms = vec![("nginx 405 close", FilterState::Off, FRONT_PORT, false)];
        if filter_ok {
            arms.insert(0, (REJECT_RX, FilterState::Rules(10), BACKEND_PORT, true));
            arms.insert(
                0,
                ("filterd 405", FilterState::Rules(10), BACKEND_PORT, false),
            );
        }
        let mut no_thread = false;
        for round in 0..args.rounds {
            progress(
                t0,
                format!("section 3 (rejection) round {}/{}", round + 1, args.rounds),
            );
            for (slot, (arm, state, port, rx)) in rotated(&arms, round).into_iter().enumerate() {
                if rx && no_thread {
                    continue;
                }
                if ctx.client_rx.get().is_some() != rx {
                    match procs::client_receive_thread(&lab, rx) {
                        Ok(pid) => ctx.client_rx.set(pid),
                        Err(e) if rx => {
                            // The other arms go on without it; the CPU target is then not
                            // measured.
                            progress(
                                t0,
                                format!("  no client receive thread, arm skipped: {e:#}"),
                            );
                            no_thread = true;
                            let _ = procs::client_receive_thread(&lab, false);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let spec = ctx.wrk("DELETE", port, args.duration);
                ctx.record(
                    &mut filter,
                    results,
                    ("rejection", arm, round, slot),
                    state,
                    &spec,
                    None,
                );
            }
        }
        if ctx.client_rx.get().is_some() {
            ctx.client_rx
                .set(procs::client_receive_thread(&lab, false)?);
        }
    }
    if s.contains(&4) && filter_ok {
        let arms = [
            ("clean", None),
            ("+ flood to filterd", Some(ctx.flood(BACKEND_PORT))),
            ("+ flood to nginx 405", Some(ctx.flood(FRONT_PORT))),
        ];
        let spec = ctx.allowed(args.duration);
        for round in 0..args.rounds {
            progress(
                t0,
                format!("section 4 (flood) round {}/{}", round + 1, args.rounds),
            );
            for (slot, (arm, flood)) in rotated(&arms, round).into_iter().enumerate() {
                ctx.record(
                    &mut filter,
                    results,
                    ("flood", arm, round, slot),
                    FilterState::Rules(10),
                    &spec,
                    flood.as_ref(),
                );
            }
        }
    }
    filter.ensure(FilterState::Off)?;
    Ok(())
}

/// Section 3's arm in which the client's veth has a receive thread of its own
/// ([`procs::client_receive_thread`]).
pub const REJECT_RX: &str = "filterd 405, client receive thread";

/// Section 1's arm name for `n` rules.
pub fn arm_name(n: usize) -> &'static str {
    match n {
        10 => "10 rules",
        100_000 => "100k rules",
        _ => "rules",
    }
}

fn preflight(ctx: &Ctx, filter: &mut Filter, results: &mut Results) -> Result<()> {
    progress(ctx.t0, "preflight: starting filterd");
    filter.ensure(FilterState::Rules(START_RULES))?;
    let checks = [
        ("GET", BACKEND_PORT, "200"),
        ("DELETE", BACKEND_PORT, "405"),
        ("DELETE", FRONT_PORT, "405"),
    ];
    for (method, port, want) in checks {
        let head = procs::curl_head(ctx.lab, method, &ctx.url(port))?;
        let status = head.lines().next().unwrap_or("").to_owned();
        results
            .sanity
            .push(format!("{method} :{port}{PATH} -> {status}"));
        if !status.contains(want) {
            bail!("preflight: {method} :{port}{PATH} answered {status:?}, expected {want}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_and_the_api_carry_the_same_rules() {
        let toml = filter_userspace::policy::parse_toml(&kernel::rules_toml(10)).unwrap();
        let json: filter_userspace::policy::RuleSetSpec =
            serde_json::from_str(&rules_json(10)).unwrap();
        assert_eq!(toml.rules.len(), 10);
        assert_eq!(json.rules.len(), 10);
        assert_eq!(toml, kernel::policy(10).unwrap());
    }
}
