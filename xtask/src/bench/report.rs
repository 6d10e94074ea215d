//! `docs/BENCHMARKS.md` and `docs/bench/wrk-runs.csv` from the results of one run.
//!
//! Every throughput and latency figure is reported as the median and the spread (min..max)
//! over rounds of the per-round ratio against the baseline arm of the same round; absolute
//! figures are shown beside them. Targets are judged on the median ratio and said plainly, with
//! the median's distribution-free confidence interval: a verdict is established only when the
//! whole interval is on its side of the target.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::kernel::{TestRun, EMPTY_CLASSIFIER};
use super::procs::{CpuSnapshot, WrkResult};
use super::{Results, Run};

// ---------------------------------------------------------------------------
// Small statistics.

#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The median's confidence interval (`median_ci`) and its coverage.
    pub ci_lo: f64,
    pub ci_hi: f64,
    pub ci_level: f64,
    pub n: usize,
}

pub fn spread(v: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let at = |p: f64| {
        let x = p * (n - 1) as f64;
        let i = x.floor() as usize;
        match v.get(i + 1) {
            Some(next) => v[i] + (next - v[i]) * (x - i as f64),
            None => v[i],
        }
    };
    let (ci_lo, ci_hi, ci_level) = median_ci(&v);
    Some(Spread {
        median: at(0.5),
        min: v[0],
        max: v[n - 1],
        ci_lo,
        ci_hi,
        ci_level,
        n,
    })
}

/// The distribution-free confidence interval of the median of `sorted` (ascending, not
/// empty): the order statistics `x(k)..x(n+1-k)` (1-based) for the largest `k` whose coverage,
/// `1 - 2 P(B < k)` with `B ~ Binomial(n, 1/2)`, is at least 95 %. It assumes only that the
/// rounds are independent draws. Below six rounds no `k` reaches 95 %: the interval is then
/// the whole range, at its own coverage (93.75 % for five rounds, 0 for one). Returns
/// `(low, high, coverage)`.
fn median_ci(sorted: &[f64]) -> (f64, f64, f64) {
    let n = sorted.len();
    let p = 0.5f64.powi(n as i32);
    // k = 1: P(B < 1) = P(B = 0) = p.
    let (mut k, mut coverage) = (1, 1.0 - 2.0 * p);
    let (mut choose, mut below) = (1.0, p);
    for i in 1..n / 2 {
        // k = i + 1: P(B < k) = P(B <= i).
        choose = choose * (n - i + 1) as f64 / i as f64;
        below += choose * p;
        let c = 1.0 - 2.0 * below;
        if c < 0.95 {
            break;
        }
        (k, coverage) = (i + 1, c);
    }
    (sorted[k - 1], sorted[n - k], coverage)
}

/// A confidence level as the report says it: `95 %`, `93.8 %`.
fn level(c: f64) -> String {
    let pct = c * 100.0;
    if (pct - pct.round()).abs() < 0.05 {
        format!("{pct:.0} %")
    } else {
        format!("{pct:.1} %")
    }
}

/// A ratio target's figure: the median and spread, and the median's confidence interval.
fn fmt_target(s: Spread, digits: usize) -> String {
    format!(
        "{}, median's {} CI {:.d$}–{:.d$}",
        fmt_spread(Some(s), digits),
        level(s.ci_level),
        s.ci_lo,
        s.ci_hi,
        d = digits
    )
}

fn fmt_spread(s: Option<Spread>, digits: usize) -> String {
    match s {
        Some(s) => format!(
            "{:.d$} [{:.d$}..{:.d$}]",
            s.median,
            s.min,
            s.max,
            d = digits
        ),
        None => "n/a".into(),
    }
}

fn runs<'a>(r: &'a Results, section: &str, arm: &str) -> Vec<&'a Run> {
    r.runs
        .iter()
        .filter(|x| x.section == section && x.arm == arm && x.error.is_none())
        .collect()
}

fn arms(r: &Results, section: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for x in r.runs.iter().filter(|x| x.section == section) {
        if !v.contains(&x.arm) {
            v.push(x.arm.clone());
        }
    }
    v
}

/// Per-round values of `f` for `arm`.
fn values(r: &Results, section: &str, arm: &str, f: &dyn Fn(&Run) -> Option<f64>) -> Vec<f64> {
    runs(r, section, arm).into_iter().filter_map(f).collect()
}

/// Per-round ratios arm/base of `f`, paired by round.
fn ratios(
    r: &Results,
    section: &str,
    arm: &str,
    base: &str,
    f: &dyn Fn(&Run) -> Option<f64>,
) -> Vec<f64> {
    let b: BTreeMap<usize, f64> = runs(r, section, base)
        .into_iter()
        .filter_map(|x| Some((x.round, f(x)?)))
        .collect();
    runs(r, section, arm)
        .into_iter()
        .filter_map(|x| Some(f(x)? / b.get(&x.round)?))
        .collect()
}

fn w(f: fn(&WrkResult) -> f64) -> impl Fn(&Run) -> Option<f64> {
    move |x: &Run| x.wrk.as_ref().map(f)
}

fn fl(f: fn(&WrkResult) -> f64) -> impl Fn(&Run) -> Option<f64> {
    move |x: &Run| x.flood.as_ref().map(f)
}

fn cpu(f: fn(&CpuSnapshot) -> f64) -> impl Fn(&Run) -> Option<f64> {
    move |x: &Run| Some(f(&x.cpu))
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**MISSED**"
    }
}

/// A ratio target judged on the median, and established only when the median's confidence
/// interval is on the same side of the target: with a few noisy rounds a miss (or a pass) can
/// be the machine's luck, and the verdict says so rather than counting it either way.
fn verdict_ratio(s: Spread, target: f64) -> String {
    match (s.median >= target, s.ci_lo >= target, s.ci_hi >= target) {
        (true, true, _) => "**met** (the whole interval is above the target)".into(),
        (true, false, _) => {
            "**met on the median**, not established: the interval reaches below the target".into()
        }
        (false, _, true) => {
            "**MISSED on the median**, not established: the interval reaches the target".into()
        }
        (false, _, false) => "**MISSED** (the whole interval is below the target)".into(),
    }
}

/// Section 1's throughput ratios of several runs (`--pool`): each arm against `no filter` (and
/// the filter's arms against the empty classifier), per run and over all the runs' rounds
/// together, as the median and its confidence interval.
pub fn pooled_allowed(runs: &[(String, Results)]) -> String {
    let sec = "allowed";
    let base = "no filter";
    let mut columns: Vec<(String, String)> = Vec::new();
    for (_, r) in runs {
        for arm in arms(r, sec) {
            let mut add = |a: &str, b: &str| {
                let c = (a.to_owned(), b.to_owned());
                if a != b && !columns.contains(&c) {
                    columns.push(c);
                }
            };
            add(&arm, base);
            if arm != super::EMPTY_ARM && arm != base {
                add(&arm, super::EMPTY_ARM);
            }
        }
    }
    let rps = w(WrkResult::rps);
    let cell = |v: &[f64]| match spread(v) {
        Some(s) => format!(
            "{:.3}, {:.3}–{:.3} ({}, n = {})",
            s.median,
            s.ci_lo,
            s.ci_hi,
            level(s.ci_level),
            s.n
        ),
        None => "n/a".into(),
    };
    let mut m = String::new();
    let _ = writeln!(
        m,
        "Throughput ratios of section 1: median, its confidence interval (coverage, rounds).\n"
    );
    let _ = write!(m, "| run |");
    for (a, b) in &columns {
        let _ = write!(m, " {a} ÷ {b} |");
    }
    let _ = writeln!(m, "\n|---|{}", "---|".repeat(columns.len()));
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); columns.len()];
    for (name, r) in runs {
        let _ = write!(m, "| {name} |");
        for (i, (a, b)) in columns.iter().enumerate() {
            let v = ratios(r, sec, a, b, &rps);
            let _ = write!(m, " {} |", cell(&v));
            all[i].extend(v);
        }
        let _ = writeln!(m);
    }
    let _ = write!(m, "| **pooled** |");
    for v in &all {
        let _ = write!(m, " **{}** |", cell(v));
    }
    let _ = writeln!(m);
    m
}

/// One progress line for a run.
pub fn run_line(x: &Run) -> String {
    if let Some(e) = &x.error {
        return format!("ERROR {e}");
    }
    let mut s = String::new();
    if let Some(w) = &x.wrk {
        let _ = write!(
            s,
            "{:.0} resp/s ({:.0} non-2xx/s), p50 {:.2} ms, p99 {:.2} ms, sock err {}",
            w.rps(),
            w.non2xx_rps(),
            w.p50_us / 1e3,
            w.p99_us / 1e3,
            w.socket_errors()
        );
    }
    if let Some(f) = &x.flood {
        let _ = write!(
            s,
            "; flood {:.0} resp/s ({:.0} non-2xx/s)",
            f.rps(),
            f.non2xx_rps()
        );
    }
    let c = &x.cpu;
    let _ = write!(
        s,
        "; cores: backend {:.2} front {:.2} filterd {:.2} machine {:.2} (steal {:.2}, load {:.1})",
        c.backend_cores,
        c.front_cores,
        c.filterd_cores,
        c.machine_busy_cores,
        c.machine_steal_cores,
        c.loadavg_1m
    );
    s
}

pub fn runs_csv(r: &Results) -> String {
    let mut s = String::from(
        "section,arm,round,slot,method,url,threads,connections,seconds,responses,non2xx,err_connect,err_read,err_write,err_timeout,resp_per_s,non2xx_per_s,p50_us,p90_us,p99_us,max_us,flood_responses,flood_non2xx,flood_seconds,backend_cores,front_cores,filterd_cores,machine_busy_cores,machine_steal_cores,loadavg_1m,error\n",
    );
    for x in &r.runs {
        let d = WrkResult::default();
        let a = x.wrk.as_ref().unwrap_or(&d);
        let f = x.flood.as_ref();
        let c = &x.cpu;
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{:.3},{},{},{},{},{},{},{:.1},{:.1},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.2},{}",
            x.section,
            x.arm,
            x.round,
            x.slot,
            a.method,
            a.url,
            a.threads,
            a.connections,
            a.seconds(),
            a.requests,
            a.non2xx,
            a.err_connect,
            a.err_read,
            a.err_write,
            a.err_timeout,
            a.rps(),
            a.non2xx_rps(),
            a.p50_us,
            a.p90_us,
            a.p99_us,
            a.max_us,
            f.map_or(0, |f| f.requests),
            f.map_or(0, |f| f.non2xx),
            f.map_or(0.0, |f| f.seconds()),
            c.backend_cores,
            c.front_cores,
            c.filterd_cores,
            c.machine_busy_cores,
            c.machine_steal_cores,
            c.loadavg_1m,
            x.error.as_deref().unwrap_or("").replace([',', '\n'], ";")
        );
    }
    s
}

/// The first 3 and the last 8 lines of a long message (verifier logs run to pages).
fn abridge(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= 14 {
        return s.to_owned();
    }
    let mut v: Vec<&str> = lines[..3].to_vec();
    v.push("[...]");
    v.extend_from_slice(&lines[lines.len() - 8..]);
    v.join("\n")
}

fn start_utc(unix: u64) -> String {
    std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{unix}"), "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The document.

pub fn markdown(r: &Results) -> String {
    let mut m = String::new();
    let mut targets: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let _ = writeln!(m, "# Benchmarks\n");
    let _ = writeln!(
        m,
        "Written by `cargo xtask bench` on {} in {:.0} s. Raw data: [`bench/results.json`](bench/results.json) \
         (everything, per run) and [`bench/wrk-runs.csv`](bench/wrk-runs.csv) (one line per wrk run). \
         Rerun with `sudo -E cargo xtask bench` (`--help` for rounds, duration, sections).\n",
        start_utc(r.started_unix),
        r.total_seconds
    );
    let _ = writeln!(
        m,
        "> **Noise.** This machine is a 2-CPU VM shared with other builds while these figures were taken; \
         the client (wrk), the server (nginx, filterd) and the kernel's packet path all share the same two CPUs. \
         Absolute figures move by tens of percent from run to run. The arms of a section are therefore \
         interleaved within each round (order rotated per round), and every figure is given as the median \
         and the spread `[min..max]` of the per-round ratio against the baseline arm of the same round; \
         ratio targets also give the median's confidence interval (distribution-free, from the order \
         statistics: 95 % where there are at least six rounds, else the whole range at its own coverage), \
         and a verdict is called established only when that whole interval is on its side of the target. \
         The `machine` and `steal` columns in the CSV show how busy the whole machine was during each run.\n"
    );

    if let Some(l) = &r.label {
        let _ = writeln!(m, "**Measured build:** {l} (`{}`).\n", r.env.filterd);
    }
    if !r.notes.is_empty() {
        let _ = writeln!(m, "## Notes\n");
        for n in &r.notes {
            let _ = writeln!(m, "- {n}");
        }
        let _ = writeln!(m);
    }
    if let Some(e) = &r.filter_error {
        let _ = writeln!(
            m,
            "## The filter did not run\n\nThe arms that need `filterd` were skipped or stopped; only the baselines ran. \
             The error (all of it is in `bench/results.json`):\n\n```text\n{}\n```\n",
            abridge(e.trim())
        );
        notes.push("The filter could not be benchmarked in this run (see above).".into());
    }

    // -- Method.
    let _ = writeln!(m, "## Method\n");
    let _ = writeln!(
        m,
        "- Two network namespaces joined by a veth pair (`filter_tests::lab`): wrk in the client namespace, \
         nginx and `filterd` in the server namespace; `filterd` attaches its TC classifiers (TCX) to the \
         server veth's ingress (requests to port 80) and egress (their responses).\n\
         - Backend: nginx {} (2 workers, own config in the lab's temp dir) answering `200 ok` (3-byte body) on :80, \
         listening with `deferred` (TCP_DEFER_ACCEPT, as README advises behind the filter). Its CPU is the utime+stime of its master and workers from `/proc/<pid>/stat`.\n\
         - 405 front for comparison: a second nginx answering `405` with `Allow: GET, HEAD, POST` for any other \
         method on :8080 (keep-alive, nginx's default) and on :8081 (`keepalive_timeout 0`: closes after each \
         answer, the same connection shape as `filterd`'s 405 + FIN).\n\
         - Policy: `{}` allows GET and POST (HEAD implied); 10 rules = that plus 9 others; 100k rules = that plus \
         99,999 others, applied with `PUT /v1/rules`. Load: wrk, keep-alive, `-t{} -c{} -d{}s`, \
         `--timeout 2s`, one run per arm per round, {} rounds{}.\n\
         - Kernel cost: `bpftool prog run` (`BPF_PROG_TEST_RUN`) on the program the running daemon loaded, \
         with its real maps, up to {} repeats per call (the count of each call is in `results.json`); the daemon's verdict counters before and after tell which \
         path each frame took. `bpf_stats` (`kernel.bpf_stats_enabled=1`, restored afterwards): \
         `run_time_ns / run_cnt` of the same program under wrk traffic.\n",
        r.env
            .tools
            .iter()
            .find(|t| t.0 == "nginx")
            .map(|t| t.1.trim_start_matches("nginx version: "))
            .unwrap_or("?"),
        super::PATH,
        r.threads,
        r.connections,
        r.duration_s,
        r.rounds,
        if r.allowed_rounds > 0 {
            format!(
                " (section 1: {} rounds of `-d{}s` runs)",
                r.allowed_rounds, r.allowed_duration_s
            )
        } else {
            String::new()
        },
        r.repeat
    );

    // -- Environment.
    let e = &r.env;
    let _ = writeln!(m, "## Environment\n");
    let _ = writeln!(m, "| | |\n|---|---|");
    let _ = writeln!(
        m,
        "| CPU | {} × {} ({}) |",
        e.cpus, e.cpu_model, e.virtualization
    );
    let _ = writeln!(m, "| Memory | {} |", e.mem_total);
    let _ = writeln!(m, "| OS | {} |", e.os);
    let _ = writeln!(m, "| Kernel | `{}` |", e.kernel);
    for (t, v) in &e.tools {
        let _ = writeln!(m, "| {t} | `{v}` |");
    }
    let _ = writeln!(m, "| Source | `{}` |", e.git_head);
    let _ = writeln!(
        m,
        "| Uncommitted changes at start | {} |",
        if e.git_dirty.is_empty() {
            "none".to_owned()
        } else {
            format!(
                "{} paths (others' work in progress): `{}`",
                e.git_dirty.len(),
                e.git_dirty.join("`, `")
            )
        }
    );
    let _ = writeln!(
        m,
        "| filterd | `{}` sha256 `{}` |",
        e.filterd, e.filterd_sha256
    );
    let _ = writeln!(m, "| Load average at start | `{}` |", e.loadavg_start);
    let _ = writeln!(m, "| Arguments | `{}` |", r.args.replace('|', "\\|"));
    if let Some(s) = spread(&r.daemon_starts) {
        let _ = writeln!(
            m,
            "| filterd start (load, verify, attach, /healthz) | {} s over {} starts |",
            fmt_spread(Some(s), 2),
            s.n
        );
    }
    let _ = writeln!(m);
    if !r.sanity.is_empty() {
        let _ = writeln!(
            m,
            "What the clients get (preflight, curl from the client namespace):\n"
        );
        let _ = writeln!(m, "```text\n{}\n```\n", r.sanity.join("\n\n"));
    }

    section_allowed(r, &mut m, &mut targets, &mut notes);
    section_kernel(r, &mut m, &mut targets, &mut notes);
    section_rejection(r, &mut m, &mut targets, &mut notes);
    section_flood(r, &mut m, &mut targets, &mut notes);
    section_policy(r, &mut m);

    // How busy the machine was: the 1-minute load average during the runs, against its CPUs.
    if let Some(load) = spread(&r.runs.iter().map(|x| x.cpu.loadavg_1m).collect::<Vec<_>>()) {
        let cpus = r.env.cpus.max(1) as f64;
        if load.median > cpus {
            notes.push(format!(
                "The machine was oversubscribed: the 1-minute load average during the runs was {} on {} CPUs \
                 (this bench itself accounts for about {} of it), so other work took CPU from the client, the server \
                 and the packet path at random moments. Per-round ratios of throughput therefore spread widely; \
                 a difference of a few percent (the 0.98 target) cannot be resolved in such a run. Rerun on a quiet \
                 machine, or with more rounds (`--allowed-rounds 30 --allowed-duration 3`) to narrow the intervals.",
                fmt_spread(Some(load), 1),
                r.env.cpus,
                cpus as u64 + 1
            ));
        }
    }

    // Errors in runs.
    let errs: Vec<&Run> = r.runs.iter().filter(|x| x.error.is_some()).collect();
    for x in errs {
        notes.push(format!(
            "Run {} / {} / round {} failed: `{}`",
            x.section,
            x.arm,
            x.round,
            x.error
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
        ));
    }

    let mut head = String::new();
    let _ = writeln!(head, "## Targets at a glance\n");
    if targets.is_empty() {
        let _ = writeln!(head, "No target could be judged in this run.\n");
    } else {
        let _ = writeln!(head, "| target | this run | |\n|---|---|---|");
        for t in &targets {
            let _ = writeln!(head, "{t}");
        }
        let _ = writeln!(head);
    }
    if !notes.is_empty() {
        let _ = writeln!(head, "## What the harness noticed\n");
        for n in &notes {
            let _ = writeln!(head, "- {n}");
        }
        let _ = writeln!(head);
    }
    // Targets and notes go right after the noise caveat and the method.
    match m.find("## Environment") {
        Some(i) => m.insert_str(i, &head),
        None => m.push_str(&head),
    }
    m
}

fn section_allowed(
    r: &Results,
    m: &mut String,
    targets: &mut Vec<String>,
    notes: &mut Vec<String>,
) {
    let sec = "allowed";
    let all = arms(r, sec);
    if all.is_empty() {
        return;
    }
    let base = "no filter";
    let _ = writeln!(
        m,
        "## 1. Allowed traffic\n\nGET {} over keep-alive connections, all answered 200 by the backend. \
         Ratios are against `{base}` in the same round (throughput: higher is better; latency: lower is better).\n",
        super::PATH
    );
    let _ = writeln!(
        m,
        "| arm | req/s | ratio | p50 ms | p50 ratio | p99 ms | p99 ratio | non-2xx | socket errors | backend cores |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for arm in &all {
        let rps = w(WrkResult::rps);
        let p50 = w(|x| x.p50_us / 1e3);
        let p99 = w(|x| x.p99_us / 1e3);
        let rr = spread(&ratios(r, sec, arm, base, &rps));
        let non2xx: u64 = runs(r, sec, arm)
            .iter()
            .filter_map(|x| x.wrk.as_ref())
            .map(|w| w.non2xx)
            .sum();
        let serr: u64 = runs(r, sec, arm)
            .iter()
            .filter_map(|x| x.wrk.as_ref())
            .map(|w| w.socket_errors())
            .sum();
        let _ = writeln!(
            m,
            "| {arm} | {} | {} | {} | {} | {} | {} | {non2xx} | {serr} | {} |",
            fmt_spread(spread(&values(r, sec, arm, &rps)), 0),
            if arm == base {
                "1".into()
            } else {
                fmt_spread(rr, 3)
            },
            fmt_spread(spread(&values(r, sec, arm, &p50)), 2),
            if arm == base {
                "1".into()
            } else {
                fmt_spread(spread(&ratios(r, sec, arm, base, &p50)), 2)
            },
            fmt_spread(spread(&values(r, sec, arm, &p99)), 2),
            if arm == base {
                "1".into()
            } else {
                fmt_spread(spread(&ratios(r, sec, arm, base, &p99)), 2)
            },
            fmt_spread(spread(&values(r, sec, arm, &cpu(|c| c.backend_cores))), 2),
        );
        if non2xx > 0 {
            notes.push(format!(
                "Allowed traffic, {arm}: {non2xx} responses were not 2xx/3xx (expected none)."
            ));
        }
        if arm != base && arm != super::EMPTY_ARM {
            if let Some(s) = rr {
                targets.push(format!(
                    "| allowed throughput, {arm}, ≥ 0.98 × no filter | {} | {} |",
                    fmt_target(s, 3),
                    verdict_ratio(s, 0.98)
                ));
            }
        }
    }
    if all.iter().any(|a| a == super::EMPTY_ARM) {
        let _ = writeln!(
            m,
            "\n`{}`: no daemon, only a classifier that returns at once (`r0 = -1; exit`) attached \
             with TCX to the same hooks as `filterd`'s programs (the server veth's ingress and egress): \
             what any TC classifier there costs this traffic, the floor no filter on these hooks goes below.",
            super::EMPTY_ARM
        );
        let rps = w(WrkResult::rps);
        let empty = spread(&ratios(r, sec, super::EMPTY_ARM, base, &rps));
        let above: Vec<String> = all
            .iter()
            .filter(|a| *a != base && *a != super::EMPTY_ARM)
            .filter_map(|a| {
                let s = spread(&ratios(r, sec, a, super::EMPTY_ARM, &rps))?;
                Some(format!("{a} {}", fmt_spread(Some(s), 3)))
            })
            .collect();
        if let Some(e) = empty {
            notes.push(format!(
                "Allowed throughput with only an empty classifier attached (ingress and egress): {} of no filter ({}); the filter's arms against that arm in the same rounds: {}.",
                fmt_target(e, 3),
                if e.ci_hi >= 1.0 {
                    "its interval reaches 1: this run resolves no cost of the hooks themselves"
                } else {
                    "its interval lies below 1: in this run the hooks themselves cost something"
                },
                if above.is_empty() { "n/a".into() } else { above.join(", ") }
            ));
        }
    }
    let _ = writeln!(m);
}

fn section_kernel(r: &Results, m: &mut String, targets: &mut Vec<String>, notes: &mut Vec<String>) {
    let Some(k) = &r.kernel else {
        return;
    };
    let p = &k.prog;
    let _ = writeln!(
        m,
        "## 2. Kernel cost per packet\n\nProgram `{}` id {}: {} B translated, {} B JIT-compiled, \
         verifier processed {} instructions (`verified_insns`).\n",
        p["name"].as_str().unwrap_or("?"),
        p["id"],
        p["bytes_xlated"],
        p["bytes_jited"],
        p["verified_insns"]
    );
    let _ = writeln!(
        m,
        "`BPF_PROG_TEST_RUN` (mean ns per run over `repeat` runs, as the kernel reports it; median [min..max] over rounds). \
         The ARP frame leaves at the program's first check, so its figure is the floor: the test-run loop's own \
         overhead plus the program's entry. `− floor` subtracts it (median of the differences per round). \
         `path taken` is what the daemon's verdict counters recorded for that frame.\n"
    );
    let _ = writeln!(
        m,
        "| frame | bytes | ns, 10 rules | − floor | ns, 100k rules | path taken | target |\n|---|---|---|---|---|---|---|"
    );
    let mut names: Vec<&str> = Vec::new();
    for t in &k.test_runs {
        if !names.contains(&t.frame.as_str()) {
            names.push(&t.frame);
        }
    }
    let floor = names.first().copied().unwrap_or("");
    names.retain(|n| *n != EMPTY_CLASSIFIER);
    let sel = |name: &str, rules: usize| -> Vec<&TestRun> {
        k.test_runs
            .iter()
            .filter(|t| t.frame == name && t.rules == rules)
            .collect()
    };
    for name in &names {
        let ten = sel(name, 10);
        let big = sel(name, 100_000);
        let ns = |v: &[&TestRun]| spread(&v.iter().map(|t| t.ns as f64).collect::<Vec<_>>());
        let floor_runs = sel(floor, 10);
        let minus: Vec<f64> = ten
            .iter()
            .filter_map(|t| {
                let f = floor_runs.iter().find(|f| f.round == t.round)?;
                Some(t.ns as f64 - f.ns as f64)
            })
            .collect();
        let reasons = ten
            .first()
            .map(|t| {
                t.reasons
                    .iter()
                    .map(|(k, v)| {
                        if *v == t.repeat as u64 {
                            k.clone()
                        } else {
                            format!("{k} ×{v}")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let (target, limit) = if name.contains("other port") {
            ("≤ 50 ns", Some(50.0))
        } else if name.contains("1 KiB path") {
            ("≤ 1000 ns", Some(1000.0))
        } else {
            ("", None)
        };
        let _ = writeln!(
            m,
            "| {name} | {} | {} | {} | {} | {} | {target} |",
            ten.first().map(|t| t.frame_bytes).unwrap_or(0),
            fmt_spread(ns(&ten), 0),
            if *name == floor {
                "0".into()
            } else {
                fmt_spread(spread(&minus), 0)
            },
            fmt_spread(ns(&big), 0),
            if reasons.is_empty() {
                "(no counter moved)".into()
            } else {
                format!("`{reasons}`")
            },
        );
        if let (Some(limit), Some(s)) = (limit, ns(&ten)) {
            let worst = ns(&big).map_or(s.median, |b| b.median.max(s.median));
            // The program's own cost: above the empty classifier's run of the same frame in
            // the same round (only the other-port frame has one).
            let above = |rules: usize| {
                let empty = sel(EMPTY_CLASSIFIER, rules);
                let d: Vec<f64> = sel(name, rules)
                    .iter()
                    .filter_map(|t| {
                        let e = empty.iter().find(|e| e.round == t.round)?;
                        Some(t.ns as f64 - e.ns as f64)
                    })
                    .collect();
                spread(&d)
            };
            let (above_ten, above_big) = (above(10), above(100_000));
            let empty_ns = ns(&sel(EMPTY_CLASSIFIER, 10));
            let (figure, judged) = match (above_ten, empty_ns) {
                (Some(a), Some(e)) => {
                    let worst_above = above_big.map_or(a.median, |b| b.median.max(a.median));
                    let judged = if worst <= limit {
                        verdict(true).to_owned()
                    } else if worst_above <= limit {
                        format!(
                            "{} on the raw figure; {} above the zero point (an empty classifier, which no classifier measures below)",
                            verdict(false),
                            verdict(true)
                        )
                    } else {
                        verdict(false).to_owned()
                    };
                    (
                        format!(
                            "; {:.0} ns (10 rules), {} (100k rules) above an empty classifier ({:.0} ns)",
                            a.median,
                            above_big.map_or("n/a".into(), |b| format!("{:.0} ns", b.median)),
                            e.median
                        ),
                        judged,
                    )
                }
                _ => (String::new(), verdict(worst <= limit).to_owned()),
            };
            targets.push(format!(
                "| kernel cost, {name}, {target} | {:.0} ns (10 rules), {} (100k rules){figure} | {judged} |",
                s.median,
                ns(&big).map_or("n/a".into(), |b| format!("{:.0} ns", b.median)),
            ));
        }
        if name.contains("1 KiB path") && !reasons.contains("allowed") {
            notes.push(format!(
                "The 1 KiB-path request line took `{reasons}`, not a rule lookup: its line is longer than the inspection window, so this figure is the cost of giving up on it, not of deciding it."
            ));
        }
    }
    let empty_ten = sel(EMPTY_CLASSIFIER, 10);
    if !empty_ten.is_empty() {
        let ns = |v: &[&TestRun]| spread(&v.iter().map(|t| t.ns as f64).collect::<Vec<_>>());
        let _ = writeln!(
            m,
            "| {EMPTY_CLASSIFIER} | {} | {} | zero point | {} | (`r0 = -1; exit`: no map, no counter) | |",
            empty_ten[0].frame_bytes,
            fmt_spread(ns(&empty_ten), 0),
            fmt_spread(ns(&sel(EMPTY_CLASSIFIER, 100_000)), 0),
        );
        let _ = writeln!(
            m,
            "\nThe empty classifier is loaded by the bench and run on the other-port frame with the same repeat count right after it, in every round: the test-run loop's own overhead and the kernel's call of a classifier (an indirect call, a retpoline on this machine), which any classifier pays. The targets table gives the other-port figure both as measured and above it."
        );
    }
    let _ = writeln!(m);
    if !k.steady.is_empty() {
        use super::steady::{SteadyRun, BASELINE, THIS_BUILD};
        let with_base = k.steady.iter().any(|r| r.build == BASELINE);
        let _ = writeln!(
            m,
            "Steady state: the packets of keep-alive connections, one `BPF_PROG_TEST_RUN` call each with the \
             sequence numbers moving on as a real connection's do, so each takes the path it takes under traffic \
             (a replayed frame is new only once). Both programs, {} packets per kind and round, interleaved (the kinds \
             in an order rotated at every step: the first packet after the bench's own code meets colder caches); the \
             figure is the median over a round's calls (the kernel's own timer around one run), then median \
             `[min..max]` over rounds. `− floor` subtracts the same round's ARP median (the cost of one call).{}\n",
            k.steady.first().map_or(0, |r| r.packets),
            if with_base {
                " The baseline build (`--baseline`) ran in the same rounds, its packets alternating with this \
                 build's one by one; `÷ baseline` is this build's `− floor` over the baseline's, per round."
            } else {
                ""
            }
        );
        let _ = writeln!(
            m,
            "| packet | ns, 10 rules | − floor | ns, 100k rules |{}\n|---|---|---|---|{}",
            if with_base {
                " baseline ns, 10 rules | ÷ baseline, 10 rules | ÷ baseline, 100k rules |"
            } else {
                ""
            },
            if with_base { "---|---|---|" } else { "" }
        );
        let mut kinds: Vec<&str> = Vec::new();
        for r in &k.steady {
            if !kinds.contains(&r.kind.as_str()) {
                kinds.push(&r.kind);
            }
        }
        let floor = kinds.first().copied().unwrap_or("");
        let sel = |kind: &str, build: &str, rules: usize| -> Vec<&SteadyRun> {
            k.steady
                .iter()
                .filter(|r| r.kind == kind && r.build == build && r.rules == rules)
                .collect()
        };
        // Per round: the median minus the same build's ARP median.
        let net = |kind: &str, build: &str, rules: usize| -> Vec<(usize, f64)> {
            sel(kind, build, rules)
                .iter()
                .filter_map(|r| {
                    let f = sel(floor, build, rules)
                        .into_iter()
                        .find(|f| f.round == r.round)?;
                    Some((r.round, r.p50 - f.p50))
                })
                .collect()
        };
        let p50 = |v: &[&SteadyRun]| spread(&v.iter().map(|r| r.p50).collect::<Vec<_>>());
        for kind in &kinds {
            let mut row = format!(
                "| {kind} | {} | {} | {} |",
                fmt_spread(p50(&sel(kind, THIS_BUILD, 10)), 0),
                if *kind == floor {
                    "0".into()
                } else {
                    let v: Vec<f64> = net(kind, THIS_BUILD, 10).iter().map(|x| x.1).collect();
                    fmt_spread(spread(&v), 0)
                },
                fmt_spread(p50(&sel(kind, THIS_BUILD, 100_000)), 0),
            );
            if with_base {
                let ratio = |rules: usize| -> String {
                    if *kind == floor {
                        return "".into();
                    }
                    let base = net(kind, BASELINE, rules);
                    let v: Vec<f64> = net(kind, THIS_BUILD, rules)
                        .iter()
                        .filter_map(|(round, n)| {
                            let (_, b) = base.iter().find(|(r, _)| r == round)?;
                            (*b > 0.0).then(|| n / b)
                        })
                        .collect();
                    fmt_spread(spread(&v), 2)
                };
                row.push_str(&format!(
                    " {} | {} | {} |",
                    fmt_spread(p50(&sel(kind, BASELINE, 10)), 0),
                    ratio(10),
                    ratio(100_000)
                ));
            }
            let _ = writeln!(m, "{row}");
        }
        let _ = writeln!(m);
        // The rows that differ by one part of a request or a response, per round.
        use super::steady::{kind, KINDS};
        let part = |a: usize, b: Option<usize>| -> String {
            let (a, b) = (
                net(KINDS[a], THIS_BUILD, 10),
                b.map(|b| net(KINDS[b], THIS_BUILD, 10)),
            );
            let v: Vec<f64> = a
                .iter()
                .filter_map(|(round, x)| match &b {
                    None => Some(*x),
                    Some(b) => b.iter().find(|(r, _)| r == round).map(|(_, y)| x - y),
                })
                .collect();
            fmt_spread(spread(&v), 0)
        };
        if !net(KINDS[kind::LINE_ONLY], THIS_BUILD, 10).is_empty() {
            let _ = writeln!(
                m,
                "Where a request's and a response's cost goes (10 rules, ns, per-round differences of the rows \
                 above, median `[min..max]`). Ingress: every packet of a followed connection (the request body \
                 segment's row) {}; the request line and its decision (wrk's line alone, minus that) {}; wrk's \
                 `Host` header line (its request minus its line alone) {}. Egress: every packet (the response \
                 body segment's row) {}; a status line and the end of the head (the 204, minus that) {}; a \
                 `Content-Length` line and a 3-byte body (the 200 with only that header, minus the 204) {}; \
                 nginx's five other header lines (its response minus that) {}.\n",
                part(kind::UP, None),
                part(kind::LINE_ONLY, Some(kind::UP)),
                part(kind::GET, Some(kind::LINE_ONLY)),
                part(kind::DOWN, None),
                part(kind::STATUS_ONLY, Some(kind::DOWN)),
                part(kind::LENGTH_ONLY, Some(kind::STATUS_ONLY)),
                part(kind::RESPONSE, Some(kind::LENGTH_ONLY)),
            );
        }
    }
    if let Some(e) = &k.steady_error {
        notes.push(format!(
            "The steady-state kernel figures could not be measured: `{e}`"
        ));
    }
    if !k.bpf_stats.is_empty() {
        let _ = writeln!(
            m,
            "`bpf_stats` under real traffic (10 rules; `run_time_ns / run_cnt` over the run; every packet into the \
             server's veth counts, ACKs and handshakes included; the egress rows are the responses' program on the \
             same veth; enabling the stats itself adds two clock reads per run):\n"
        );
        let _ = writeln!(
            m,
            "| traffic | ns per run | runs per request | req/s during |\n|---|---|---|---|"
        );
        let mut kinds: Vec<&str> = Vec::new();
        for s in &k.bpf_stats {
            if !kinds.contains(&s.traffic.as_str()) {
                kinds.push(&s.traffic);
            }
        }
        for kind in kinds {
            let v: Vec<_> = k.bpf_stats.iter().filter(|s| s.traffic == kind).collect();
            let _ = writeln!(
                m,
                "| {kind} | {} | {} | {} |",
                fmt_spread(
                    spread(&v.iter().map(|s| s.ns_per_run).collect::<Vec<_>>()),
                    0
                ),
                fmt_spread(
                    spread(
                        &v.iter()
                            .map(|s| s.run_cnt as f64 / s.wrk.requests.max(1) as f64)
                            .collect::<Vec<_>>()
                    ),
                    2
                ),
                fmt_spread(
                    spread(&v.iter().map(|s| s.wrk.rps()).collect::<Vec<_>>()),
                    0
                ),
            );
        }
        let _ = writeln!(m);
        // What the two programs took of the machine under wrk's keep-alive GETs, per round:
        // their run time over the run's wall time (cores), and per request (ns).
        let per_round: Vec<(f64, f64)> = k
            .bpf_stats
            .iter()
            .filter(|s| s.traffic == "allowed GET keep-alive")
            .filter_map(|i| {
                let e = k.bpf_stats.iter().find(|e| {
                    e.round == i.round && e.traffic == "allowed GET keep-alive, egress (responses)"
                })?;
                let ns = (i.run_time_ns + e.run_time_ns) as f64;
                Some((
                    ns / (i.wrk.duration_us.max(1) as f64 * 1e3),
                    ns / i.wrk.requests.max(1) as f64,
                ))
            })
            .collect();
        let cores = spread(&per_round.iter().map(|p| p.0).collect::<Vec<_>>());
        let per_request = spread(&per_round.iter().map(|p| p.1).collect::<Vec<_>>());
        let busy = spread(&values(
            r,
            "allowed",
            "no filter",
            &cpu(|c| c.machine_busy_cores),
        ));
        if let (Some(c), Some(ns), Some(b)) = (cores, per_request, busy) {
            if b.median > 0.0 && c.median > 0.0 {
                notes.push(format!(
                    "Allowed throughput: under wrk's keep-alive GETs the two programs took {:.3} cores (`bpf_stats`: their run time over the run's wall time, ingress and egress, {:.0} ns per request) of the {:.2} the no-filter run kept busy. wrk, nginx and the kernel saturate this machine's CPUs, so a filter that takes that much CPU keeps at most about {:.3} of the no-filter throughput; 0.98 needs the programs under 2 % of the machine: about {:.0} ns per request at this rate.",
                    c.median,
                    ns.median,
                    b.median,
                    1.0 - c.median / b.median,
                    ns.median * 0.02 * b.median / c.median
                ));
            }
        }
    }
    if let Some(e) = &k.bpf_stats_error {
        notes.push(format!("bpf_stats could not be measured: `{e}`"));
    }
}

fn section_rejection(
    r: &Results,
    m: &mut String,
    targets: &mut Vec<String>,
    notes: &mut Vec<String>,
) {
    let sec = "rejection";
    let all = arms(r, sec);
    if all.is_empty() {
        return;
    }
    let _ = writeln!(
        m,
        "## 3. Rejection\n\nClients send only `DELETE {}` (wrk script `wrk.method = \"DELETE\"`). `filterd` answers 405 and \
         closes each connection (the backend's side is reset), so wrk reconnects for every request: that is the \
         realistic figure. nginx answers the same 405 with `Allow` itself, once with keep-alive (its default) \
         and once closing like `filterd`. Ratios are per round against each nginx arm.\n",
        super::PATH
    );
    let _ = writeln!(
        m,
        "| arm | 405/s | vs nginx keep-alive | vs nginx close | 2xx (leaked) | socket errors | p50 ms | p99 ms | backend cores | nginx-405 cores | filterd cores |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let r405 = w(WrkResult::non2xx_rps);
    for arm in &all {
        let leaked: u64 = runs(r, sec, arm)
            .iter()
            .filter_map(|x| x.wrk.as_ref())
            .map(|w| w.requests.saturating_sub(w.non2xx))
            .sum();
        let serr: u64 = runs(r, sec, arm)
            .iter()
            .filter_map(|x| x.wrk.as_ref())
            .map(|w| w.socket_errors())
            .sum();
        let vs_ka = spread(&ratios(r, sec, arm, "nginx 405 keep-alive", &r405));
        let vs_close = spread(&ratios(r, sec, arm, "nginx 405 close", &r405));
        let _ = writeln!(
            m,
            "| {arm} | {} | {} | {} | {leaked} | {serr} | {} | {} | {} | {} | {} |",
            fmt_spread(spread(&values(r, sec, arm, &r405)), 0),
            fmt_spread(vs_ka, 2),
            fmt_spread(vs_close, 2),
            fmt_spread(spread(&values(r, sec, arm, &w(|x| x.p50_us / 1e3))), 2),
            fmt_spread(spread(&values(r, sec, arm, &w(|x| x.p99_us / 1e3))), 2),
            fmt_spread(spread(&values(r, sec, arm, &cpu(|c| c.backend_cores))), 3),
            fmt_spread(spread(&values(r, sec, arm, &cpu(|c| c.front_cores))), 3),
            fmt_spread(spread(&values(r, sec, arm, &cpu(|c| c.filterd_cores))), 3),
        );
        if arm.starts_with("filterd") {
            if leaked > 0 {
                notes.push(format!(
                    "Rejection: {leaked} DELETE requests got a 2xx, i.e. reached the backend through the filter."
                ));
            }
            if let Some(s) = vs_ka {
                targets.push(format!(
                    "| 405/s ≥ 1.0 × nginx (keep-alive) | {} | {} |",
                    fmt_target(s, 2),
                    verdict_ratio(s, 1.0)
                ));
            }
            if let Some(s) = vs_close {
                targets.push(format!(
                    "| 405/s ≥ 1.0 × nginx (closing, same connection shape) | {} | {} |",
                    fmt_target(s, 2),
                    verdict_ratio(s, 1.0)
                ));
            }
            let be = spread(&values(r, sec, arm, &cpu(|c| c.backend_cores)));
            let allowed_be = spread(&values(
                r,
                "allowed",
                "no filter",
                &cpu(|c| c.backend_cores),
            ));
            if let Some(be) = be {
                targets.push(format!(
                    "| backend CPU stays flat under a 405 flood | {:.3} cores (allowed traffic: {}) | {} |",
                    be.median,
                    allowed_be.map_or("n/a".into(), |a| format!("{:.2} cores", a.median)),
                    verdict(be.median < 0.05)
                ));
                if be.median >= 0.05 {
                    notes.push(format!(
                        "The backend nginx used {:.3} cores while only rejected requests arrived, although it listens with \
                         `deferred` (a connection reaches nginx only with its first data, which the filter turns into a reset).",
                        be.median
                    ));
                }
            }
        }
    }
    let _ = writeln!(m);
}

fn section_flood(r: &Results, m: &mut String, targets: &mut Vec<String>, notes: &mut Vec<String>) {
    let sec = "flood";
    let all = arms(r, sec);
    if all.is_empty() {
        return;
    }
    let base = "clean";
    let _ = writeln!(
        m,
        "## 4. Flood of disallowed requests next to allowed traffic\n\nThe allowed client as in section 1 (10 rules), \
         alone (`clean`) and with a second wrk (1 thread, same connection count) sending only DELETEs, \
         either through `filterd` on :80 or to the nginx 405 front on :8081 (closing, same connection shape). \
         Note that on this 2-CPU machine the flood's own load generator competes with the allowed client and the \
         server for the same CPUs, so part of any drop is the generator's cost, not the filter's; the nginx arm \
         shows what the same flood costs when a userspace server rejects it. `client cores` are the CPU time \
         (user + system) of each wrk process over the run: what the load generators themselves took of the two CPUs.\n"
    );
    let _ = writeln!(
        m,
        "| arm | allowed req/s | ratio vs clean | allowed p99 ms | flood 405/s | backend cores | filterd cores | allowed client cores | flood client cores |\n|---|---|---|---|---|---|---|---|---|"
    );
    let rps = w(WrkResult::rps);
    for arm in &all {
        let rr = spread(&ratios(r, sec, arm, base, &rps));
        let filterd = spread(&values(r, sec, arm, &cpu(|c| c.filterd_cores)));
        let flood_client = spread(&values(r, sec, arm, &fl(WrkResult::cores)));
        let _ = writeln!(
            m,
            "| {arm} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_spread(spread(&values(r, sec, arm, &rps)), 0),
            if arm == base {
                "1".into()
            } else {
                fmt_spread(rr, 3)
            },
            fmt_spread(spread(&values(r, sec, arm, &w(|x| x.p99_us / 1e3))), 2),
            fmt_spread(spread(&values(r, sec, arm, &fl(WrkResult::non2xx_rps))), 0),
            fmt_spread(spread(&values(r, sec, arm, &cpu(|c| c.backend_cores))), 2),
            fmt_spread(filterd, 3),
            fmt_spread(spread(&values(r, sec, arm, &w(WrkResult::cores))), 2),
            if arm == base {
                "n/a".into()
            } else {
                fmt_spread(flood_client, 2)
            },
        );
        if arm.contains("filterd") {
            if let Some(s) = rr {
                targets.push(format!(
                    "| allowed throughput under a 405 flood ≥ 0.9 × clean | {} | {} |",
                    fmt_target(s, 3),
                    verdict_ratio(s, 0.9)
                ));
            }
            let busy = spread(&values(r, sec, base, &cpu(|c| c.machine_busy_cores)));
            if let (Some(c), Some(b), Some(f)) = (flood_client, busy, filterd) {
                if b.median > 0.0 && c.median > 0.0 {
                    notes.push(format!(
                        "Flood next to allowed traffic: the flood's own load generator took {:.2} cores of the {:.2} the clean run kept busy, so even a rejection that cost nothing would leave the allowed side at most {:.2} of its clean throughput on this machine; the rest of the drop is the rejection's (filterd {:.3} cores, and the kernel's handshakes, resets and answers). In a deployment the flood's clients are other machines.",
                        c.median,
                        b.median,
                        (b.median - c.median) / b.median,
                        f.median
                    ));
                }
            }
        }
    }
    let _ = writeln!(m);
}

fn section_policy(r: &Results, m: &mut String) {
    if r.applies.is_empty() {
        return;
    }
    let _ = writeln!(
        m,
        "## 5. Policy operations\n\n`PUT /v1/rules` with the whole rule set, timed by curl (`time_total`: upload, \
         JSON parse, validation, writing the inactive map, the switch, and the answer, which echoes the rule set). \
         An apply first empties the inactive map, which still holds the policy from two applies ago, so the time \
         depends on what came before. Each size is applied three times in a row: `first` and `second` still \
         empty a map holding a policy of the previous size, `steady` empties one of the same size; \
         `arm change` = applies made while switching benchmark arms.\n"
    );
    let _ = writeln!(
        m,
        "| rules | context | ms | µs per rule | n |\n|---|---|---|---|---|"
    );
    // The second apply of a triple still empties a map that held the other size (two applies
    // ago); runs written before the harness said so call it `steady`: relabel it here.
    let mut applies = r.applies.clone();
    for i in 1..applies.len() {
        if applies[i].context == "steady" && applies[i - 1].context == "first" {
            applies[i].context = "second".into();
        }
    }
    let mut keys: Vec<(usize, String)> = Vec::new();
    for a in &applies {
        let k = (a.rules, a.context.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.sort();
    for (n, ctx) in keys {
        let v: Vec<f64> = applies
            .iter()
            .filter(|a| a.rules == n && a.context == ctx && a.http_code == 200)
            .map(|a| a.seconds * 1e3)
            .collect();
        let s = spread(&v);
        let _ = writeln!(
            m,
            "| {n} | {ctx} | {} | {} | {} |",
            fmt_spread(s, 1),
            s.map_or("n/a".into(), |s| format!(
                "{:.2}",
                s.median * 1e3 / n.max(1) as f64
            )),
            v.len()
        );
    }
    let _ = writeln!(m);
    if let Some(mem) = &r.memory {
        let kib =
            |x: Option<u64>| x.map_or("n/a".into(), |v| format!("{:.1} MiB", v as f64 / 1024.0));
        let _ = writeln!(
            m,
            "Daemon memory: RSS {} after start with 10 rules, {} with 100k rules, peak (VmHWM) {}.\n",
            kib(mem.daemon_rss_kib_start),
            kib(mem.daemon_rss_kib_100k),
            kib(mem.daemon_hwm_kib)
        );
        if !mem.maps.is_empty() {
            let _ = writeln!(
                m,
                "Maps of the loaded program (`bpftool map show`, `bytes_memlock`; hash and array maps are preallocated, \
                 so their figure does not depend on how many rules are loaded; LPM tries are not):\n"
            );
            let _ = writeln!(
                m,
                "| map | type | max entries | key B | value B | memlock |\n|---|---|---|---|---|---|"
            );
            let mut total = 0u64;
            for x in &mem.maps {
                total += x.bytes_memlock;
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {:.1} KiB |",
                    x.name,
                    x.kind,
                    x.max_entries,
                    x.bytes_key,
                    x.bytes_value,
                    x.bytes_memlock as f64 / 1024.0
                );
            }
            let _ = writeln!(
                m,
                "| **total** | | | | | **{:.1} MiB** |\n",
                total as f64 / 1048576.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_gives_median_and_range() {
        let s = spread(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 5.0));
        let s = spread(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.median, 2.5);
        let s = spread(&[7.0, f64::NAN]).unwrap();
        assert_eq!((s.n, s.min, s.median, s.max), (1, 7.0, 7.0, 7.0));
        assert_eq!((s.ci_lo, s.ci_hi, s.ci_level), (7.0, 7.0, 0.0));
        assert!(spread(&[]).is_none());
    }

    #[test]
    fn the_median_interval_is_the_order_statistics_of_the_binomial_table() {
        let ci = |n: usize| {
            let v: Vec<f64> = (1..=n).map(|i| i as f64).collect();
            median_ci(&v)
        };
        // Five rounds: no interval reaches 95 %; the whole range covers 1 - 2/32.
        assert_eq!(ci(5), (1.0, 5.0, 0.9375));
        // Published tables: n = 10 -> x(2)..x(9) (97.9 %), 15 -> x(4)..x(12) (96.5 %),
        // 30 -> x(10)..x(21) (95.7 %).
        let (lo, hi, c) = ci(10);
        assert_eq!((lo, hi), (2.0, 9.0));
        assert!((c - 0.9785).abs() < 1e-3, "{c}");
        let (lo, hi, c) = ci(15);
        assert_eq!((lo, hi), (4.0, 12.0));
        assert!((c - 0.9648).abs() < 1e-3, "{c}");
        let (lo, hi, c) = ci(30);
        assert_eq!((lo, hi), (10.0, 21.0));
        assert!((c - 0.9572).abs() < 1e-3, "{c}");
        assert_eq!(level(0.9375), "93.8 %");
        assert_eq!(level(0.95), "95 %");
    }

    #[test]
    fn a_verdict_is_established_only_when_the_interval_is_on_its_side() {
        // 30 rounds, one of them lucky: a miss all the same.
        let mut v = vec![0.9; 29];
        v.push(1.2);
        assert!(verdict_ratio(spread(&v).unwrap(), 0.98).starts_with("**MISSED** ("));
        // Five rounds whose best reaches the target: the median misses, not established.
        let v = [0.9, 0.9, 0.95, 0.96, 1.0];
        assert!(verdict_ratio(spread(&v).unwrap(), 0.98)
            .starts_with("**MISSED on the median**, not established"));
        // Met on every round of fifteen: established.
        let v = [1.0; 15];
        assert!(verdict_ratio(spread(&v).unwrap(), 0.98).starts_with("**met** ("));
        // Met on the median of two, one of them below.
        assert!(verdict_ratio(spread(&[0.97, 0.99]).unwrap(), 0.98)
            .starts_with("**met on the median**"));
    }

    /// A results.json with section 1 runs: (arm, round, requests in one second).
    fn allowed(runs: &[(&str, usize, u64)]) -> Results {
        let runs: Vec<String> = runs
            .iter()
            .map(|(arm, round, n)| {
                format!(
                    r#"{{"section": "allowed", "arm": "{arm}", "round": {round},
                        "wrk": {{"duration_us": 1000000, "requests": {n}}}}}"#
                )
            })
            .collect();
        serde_json::from_str(&format!(r#"{{"runs": [{}]}}"#, runs.join(","))).unwrap()
    }

    #[test]
    fn pooling_takes_every_round_of_every_run() {
        let a = allowed(&[
            ("no filter", 0, 100),
            ("10 rules", 0, 90),
            ("no filter", 1, 100),
            ("10 rules", 1, 80),
        ]);
        let b = allowed(&[("no filter", 0, 200), ("10 rules", 0, 140)]);
        let md = pooled_allowed(&[("a".into(), a), ("b".into(), b)]);
        // Per run: medians 0.85 (two rounds) and 0.70; pooled over 0.9, 0.8, 0.7: 0.8.
        assert!(
            md.contains("| a | 0.850, 0.800–0.900 (50 %, n = 2) |"),
            "{md}"
        );
        assert!(
            md.contains("| b | 0.700, 0.700–0.700 (0 %, n = 1) |"),
            "{md}"
        );
        assert!(
            md.contains("| **pooled** | **0.800, 0.700–0.900 (75 %, n = 3)** |"),
            "{md}"
        );
    }
}
