//! `docs/BENCHMARKS.md` and `docs/bench/wrk-runs.csv` from one run's results: the method, one
//! table with the targets (this run's figure and the verdict), the figures behind them, what
//! remains and why (derived from the same figures), and where it ran. Nothing else: the
//! history of the figures is in git.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::kernel::{kind, KernelResults, RULE_COUNTS};
use crate::procs::WrkResult;
use crate::run::{arm_name, REJECT_RX};
use crate::stats::{judge, level, spread, Goal, Spread, Verdict};
use crate::{Results, Run, PATH};
use filter_common::{PROG_EGRESS, PROG_INGRESS, STAGE_PROGS};

// ---------------------------------------------------------------------------
// Selecting figures.

fn runs<'a>(r: &'a Results, section: &str, arm: &str) -> Vec<&'a Run> {
    r.runs
        .iter()
        .filter(|x| x.section == section && x.arm == arm && x.error.is_none())
        .collect()
}

/// Per-round values of `f` for `arm`.
fn values(r: &Results, section: &str, arm: &str, f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
    runs(r, section, arm).into_iter().filter_map(f).collect()
}

/// Per-round ratios `arm / base` of `f`, paired by round.
fn ratios(
    r: &Results,
    section: &str,
    arm: &str,
    base: &str,
    f: impl Fn(&Run) -> Option<f64>,
) -> Vec<f64> {
    ratios_where(r, section, arm, base, f, |_| true)
}

/// As [`ratios`], for the rounds whose `arm` run passes `keep`.
fn ratios_where(
    r: &Results,
    section: &str,
    arm: &str,
    base: &str,
    f: impl Fn(&Run) -> Option<f64>,
    keep: impl Fn(&Run) -> bool,
) -> Vec<f64> {
    let b: BTreeMap<usize, f64> = runs(r, section, base)
        .into_iter()
        .filter_map(|x| Some((x.round, f(x)?)))
        .collect();
    runs(r, section, arm)
        .into_iter()
        .filter(|x| keep(x))
        .filter_map(|x| Some(f(x)? / b.get(&x.round)?))
        .collect()
}

fn rps(x: &Run) -> Option<f64> {
    x.wrk.as_ref().map(WrkResult::rps)
}

fn non2xx_rps(x: &Run) -> Option<f64> {
    x.wrk.as_ref().map(WrkResult::non2xx_rps)
}

/// `median [min..max]`.
fn fmt(s: Option<Spread>, digits: usize) -> String {
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

/// A judged figure: `median [min..max]`, and the median's interval with its coverage.
fn fmt_ci(s: &Spread, digits: usize, unit: &str) -> String {
    format!(
        "{}{unit}; median's {} CI {:.d$}–{:.d$}",
        fmt(Some(*s), digits),
        level(s.ci_level),
        s.ci_lo,
        s.ci_hi,
        d = digits
    )
}

/// `filterd`'s CPU per 405 it answered in a run, µs.
fn cpu_per_405_us(x: &Run) -> Option<f64> {
    let rps = non2xx_rps(x)?;
    (rps > 0.0).then(|| x.cpu.filterd_cores / rps * 1e6)
}

/// What the load generator's own CPU allows in the rejection runs: wrk's CPU per 405 in the
/// `filterd` arm, and the most 405s a second the machine's CPUs could then give it if nothing
/// else ran, against nginx's rate.
fn client_bound(r: &Results) -> Option<String> {
    let wrk_us = spread(&values(r, "rejection", "filterd 405", |x| {
        let w = x.wrk.as_ref()?;
        (w.non2xx > 0).then(|| w.cpu_s / w.non2xx as f64 * 1e6)
    }))?
    .median;
    let nginx = spread(&values(r, "rejection", "nginx 405 close", non2xx_rps))?.median;
    let most = r.env.cpus as f64 / wrk_us * 1e6;
    Some(format!(
        "**The client's share.** In the `filterd` arm wrk's own process used {wrk_us:.1} µs of \
         CPU per 405: its system calls, and the receive work they run on the same CPU over veth \
         (the server's TCP and the filter's ingress programs among it). At that cost {} CPUs \
         give wrk at most {most:.0} connections a second even if nothing else ran: {:.2}× \
         nginx's {nginx:.0}. The 2× target needs a client on CPUs of its own.",
        r.env.cpus,
        most / nginx
    ))
}

/// One row of the targets table.
struct Target {
    name: &'static str,
    figure: String,
    verdict: Option<Verdict>,
}

fn target(
    name: &'static str,
    s: Option<Spread>,
    limit: f64,
    goal: Goal,
    show: impl Fn(&Spread) -> String,
) -> Target {
    match s {
        Some(s) => Target {
            name,
            figure: show(&s),
            verdict: Some(judge(&s, limit, goal)),
        },
        None => Target {
            name,
            figure: "not measured in this run".into(),
            verdict: None,
        },
    }
}

/// Section 4's arm whose allowed throughput is judged.
const FLOODED: &str = "+ flood to filterd";

/// Whether a flood run delivered its flood: at least 90 % of the requests due were answered
/// 405. Where they were not (refused connections, hanging ones), the allowed side did not
/// run next to the flood the target names, and the round does not count.
fn delivered(x: &Run) -> bool {
    x.flood
        .as_ref()
        .is_some_and(|f| f.status_405 as f64 >= 0.9 * f.scheduled as f64)
}

// Kernel figures.

fn steady(k: &KernelResults, kind: &str, rules: usize) -> Vec<f64> {
    k.steady
        .iter()
        .filter(|s| s.kind == kind && s.rules == rules)
        .map(|s| s.p50)
        .collect()
}

fn above_empty(k: &KernelResults, rules: usize) -> Vec<f64> {
    k.other_port
        .iter()
        .filter(|r| r.rules == rules)
        .map(|r| r.filter_ns - r.empty_ns)
        .collect()
}

/// Of the two rule counts' spreads, the one with the higher median (the figure judged).
fn worse(a: Option<Spread>, b: Option<Spread>) -> Option<Spread> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.median > a.median { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Kernel time per request of one `bpf_stats` round, (ingress, egress): as measured, and net
/// of `bpf_stats`' own floor per run where it was measured.
struct PerRequest {
    raw: (f64, f64),
    net: Option<(f64, f64)>,
    floor: Option<f64>,
}

impl PerRequest {
    /// The figure the target is judged on: net where the floor was measured.
    fn judged(&self) -> f64 {
        let (i, e) = self.net.unwrap_or(self.raw);
        i + e
    }
}

/// The programs of each direction: the entry program and its stages (`STAGE_PROGS`: the
/// ingress stages, then `egress_frame`; asserted below).
const INGRESS: [&str; 4] = [PROG_INGRESS, STAGE_PROGS[0], STAGE_PROGS[1], STAGE_PROGS[2]];
const EGRESS: [&str; 2] = [PROG_EGRESS, STAGE_PROGS[3]];
const _: () = assert!(STAGE_PROGS.len() == 4);

fn stats_per_request(k: &KernelResults) -> Vec<PerRequest> {
    k.bpf_stats
        .iter()
        .map(|s| PerRequest {
            raw: (s.ns_of(&INGRESS), s.ns_of(&EGRESS)),
            net: s.net_ns_of(&INGRESS).zip(s.net_ns_of(&EGRESS)),
            floor: s.floor_ns(),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The document.

pub fn markdown(r: &Results) -> String {
    let mut m = String::new();
    let args = r.args.clone().unwrap_or_else(default_args);
    let empty = KernelResults::default();
    let k = r.kernel.as_ref().unwrap_or(&empty);
    let load = spread(&r.runs.iter().map(|x| x.cpu.loadavg_1m).collect::<Vec<_>>());
    let _ = writeln!(m, "# Benchmarks\n");
    let _ = writeln!(
        m,
        "Written by `cargo xtask bench` (root, about ten minutes) on {} in {:.0} s, from `{}`. \
         A run rewrites this file and its raw data, [`bench/results.json`](bench/results.json) \
         (everything) and [`bench/wrk-runs.csv`](bench/wrk-runs.csv) (one line per load run); \
         earlier runs are in git history. `cargo xtask bench --help` lists the options (rounds, \
         durations, `--sections`, `--flood-rate`); `--report-from docs/bench/results.json` \
         rewrites this file from the raw data without root.\n",
        start_utc(r.started_unix),
        r.total_seconds,
        r.env.git_head.split_whitespace().next().unwrap_or("?"),
    );
    let _ = writeln!(
        m,
        "> **Noise.** A {}-CPU virtual machine, shared with other engineers' builds and tests while \
         this ran (1-minute load average {} during the load runs); the clients, nginx, `filterd` and \
         the packet path share the same CPUs. Absolute figures move by tens of percent between \
         runs: targets are ratios measured side by side in one run, or kernel times.\n",
        r.env.cpus,
        fmt(load, 1)
    );

    // -- Method.
    let _ = writeln!(m, "## Method\n");
    let _ = writeln!(
        m,
        "- **Lab.** Two network namespaces joined by a veth pair (`filter_tests::lab`): the \
         clients in one; nginx and `filterd` in the other, `filterd` on the server veth's ingress \
         and egress (TCX). Backend: nginx answering `200 ok` (a 3-byte body: the worst case \
         for a filter's share) on :{}, listening `deferred`, {}; a second nginx on :{} \
         (2 workers) answers `405` with `Allow` itself and closes each connection.\n\
         - **Policy.** `{PATH}` allows GET and POST; 10 rules = that and 9 others, 100k rules = \
         that and 99,999 others (`PUT /v1/rules`).\n\
         - **Rounds.** The arms of a section are interleaved in every round, their order rotated \
         from round to round; a ratio is taken per round against the baseline arm of the same \
         round. A figure is the median of its rounds `[min..max]`; a verdict is **established** \
         when the median's distribution-free confidence interval (95 % from six rounds on, else \
         the whole range at its own coverage) lies wholly on one side of the target.\n\
         - **Allowed throughput** (section 1): wrk, keep-alive GETs, `-t{} -c{}`{}, {} of \
         {} s per arm: no filter, 10 rules, 100k rules.\n\
         - **Kernel cost** (section 2). Test runs (`BPF_PROG_TEST_RUN`) through a `Dataplane` \
         the bench loads itself from the same object as `filterd` (not attached), the policy \
         applied with `Dataplane::apply`, through the entry programs: `http_ingress` and \
         `http_egress`, their tail calls into the stages included. *Repeated*: a 100-byte \
         segment to port 22, {} runs per call, and the same through an empty classifier \
         (`r0 = -1; exit`, loaded by the bench), alternating, {} pairs per round. *Steady \
         state*: keep-alive connections opened with a real handshake, one packet per call, \
         sequence numbers, acknowledgements and timestamps moving on as a connection's do, {} \
         packets of each kind per round, median per round; a test run's packet carries no \
         checksum state (`CHECKSUM_NONE`), so these figures include the filter's own sum of \
         each segment's TCP checksum, which a local sender's segments (veth, under wrk) and \
         those a device verified skip. `bpf_stats`: run time of every \
         program of the running daemon (`ALL_PROGRAMS`; a tail-called stage's time counts in \
         its entry program's) over {}-s wrk runs of the section-1 load, per request{}.\n\
         - **Rejection** (section 3): wrk sending only `DELETE {PATH}` (`-t{} -c{}`, placed \
         by the scheduler), {} of {} s: \
         `filterd` answering 405 and closing, against the closing nginx, and a third arm for \
         `filterd`'s CPU: over veth a frame is received in the softirq of the task that sent \
         it, which a kernel without `CONFIG_IRQ_TIME_ACCOUNTING` charges to that task, so in \
         the first two arms the client's TCP taking each answer counts as the CPU of \
         `filterd` (or nginx). In the third the client's veth takes the responder's frames in a \
         receive thread of its own (GRO with `rx-gro-list`, threaded NAPI), as the client's \
         host would behind a NIC; the thread's CPU is reported apart, and the thread is gone \
         again after this section.\n\
         - **Flood** (section 4): the section-1 load with 10 rules, alone and next to a flood \
         of DELETEs at a fixed {} requests/s, each on its own connection (this crate's \
         `flood` client, paced per millisecond, so its own CPU is small and the same in every \
         arm), sent to `filterd` or to the closing nginx; {} of {} s.\n",
        crate::BACKEND_PORT,
        match r.pinning {
            Some(p) => format!("one worker on CPU {}", p.backend),
            None => "2 workers".to_string(),
        },
        crate::FRONT_PORT,
        if r.pinning.is_some() { 1 } else { args.threads },
        args.connections,
        match r.pinning {
            Some(p) => format!(
                " on CPU {} (each side on a CPU of its own: left to the scheduler, two wrk \
                 threads and two nginx workers share the CPUs differently from run to run, \
                 and one arm's throughput moved by up to 2x between runs)",
                p.client
            ),
            None => String::new(),
        },
        rounds(args.allowed_rounds),
        args.allowed_duration,
        args.repeat,
        crate::kernel::PAIRS,
        crate::kernel::PACKETS,
        args.duration.min(8),
        if r.kernel
            .as_ref()
            .is_some_and(|k| k.bpf_stats.iter().any(|s| s.floor.is_some()))
        {
            "; `bpf_stats` reads the clock around every run, a cost of the measurement that any \
             program pays: an empty classifier attached after the daemon's on the same hooks \
             (TCX, last) runs on every packet they pass, and its mean run time is taken off each \
             entry program's run"
        } else {
            " (this run did not measure `bpf_stats`' own cost per run: the figures include it)"
        },
        args.threads,
        args.connections,
        rounds(args.rounds),
        args.duration,
        args.flood_rate,
        rounds(args.rounds),
        args.duration,
    );
    if let Some(e) = &r.filter_error {
        let first = e.lines().next().unwrap_or("");
        let _ = writeln!(
            m,
            "**The filter did not run in this run**; only the baselines did: `{first}` (all of \
             it in `bench/results.json`).\n"
        );
    }

    // -- Targets.
    let mut rows = Vec::new();
    for n in RULE_COUNTS {
        let s = spread(&ratios(r, "allowed", arm_name(n), "no filter", rps));
        rows.push(target(
            if n == 10 {
                "allowed throughput, 10 rules ≥ 0.98 × no filter"
            } else {
                "allowed throughput, 100k rules ≥ 0.98 × no filter"
            },
            s,
            0.98,
            Goal::AtLeast,
            |s| fmt_ci(s, 3, ""),
        ));
    }
    let per_req = stats_per_request(k);
    let col = |f: fn(&PerRequest) -> Option<f64>| {
        spread(&per_req.iter().filter_map(f).collect::<Vec<_>>())
    };
    let med = |s: Option<Spread>| s.map_or(f64::NAN, |x| x.median);
    let net_measured = !per_req.is_empty() && per_req.iter().all(|p| p.net.is_some());
    rows.push(target(
        "kernel time per allowed request ≤ 650 ns (`bpf_stats`, ingress + egress)",
        col(|p| Some(p.judged())),
        650.0,
        Goal::AtMost,
        |s| {
            if net_measured {
                format!(
                    "{} net of `bpf_stats`' own {:.0} ns per run (ingress {:.0}, egress {:.0}); \
                     as measured {:.0} (ingress {:.0}, egress {:.0})",
                    fmt_ci(s, 0, " ns"),
                    med(col(|p| p.floor)),
                    med(col(|p| p.net.map(|n| n.0))),
                    med(col(|p| p.net.map(|n| n.1))),
                    med(col(|p| Some(p.raw.0 + p.raw.1))),
                    med(col(|p| Some(p.raw.0))),
                    med(col(|p| Some(p.raw.1))),
                )
            } else {
                format!(
                    "{} as measured, `bpf_stats`' own cost included (ingress {:.0}, egress {:.0})",
                    fmt_ci(s, 0, " ns"),
                    med(col(|p| Some(p.raw.0))),
                    med(col(|p| Some(p.raw.1))),
                )
            }
        },
    ));
    let long = |n| spread(&steady(k, kind::LONG, n));
    rows.push(target(
        "a 1 KiB request line ≤ 1 µs (test run, steady state)",
        worse(long(10), long(100_000)),
        1000.0,
        Goal::AtMost,
        |s| {
            format!(
                "{} (10 rules {}, 100k rules {})",
                fmt_ci(s, 0, " ns"),
                fmt(long(10), 0),
                fmt(long(100_000), 0)
            )
        },
    ));
    let above = |n| spread(&above_empty(k, n));
    rows.push(target(
        "other-port packets ≤ 10 ns above an empty classifier",
        worse(above(10), above(100_000)),
        10.0,
        Goal::AtMost,
        |s| {
            format!(
                "{} (10 rules {}, 100k rules {}; empty classifier {} ns)",
                fmt_ci(s, 1, " ns"),
                fmt(above(10), 1),
                fmt(above(100_000), 1),
                fmt(
                    spread(&k.other_port.iter().map(|x| x.empty_ns).collect::<Vec<_>>()),
                    1
                )
            )
        },
    ));
    rows.push(target(
        "405s ≥ 2 × nginx closing each connection",
        spread(&ratios(
            r,
            "rejection",
            "filterd 405",
            "nginx 405 close",
            non2xx_rps,
        )),
        2.0,
        Goal::AtLeast,
        |s| fmt_ci(s, 2, ""),
    ));
    rows.push(target(
        "`filterd` CPU per 405 under a pure 405 flood ≤ 4 µs",
        spread(&values(r, "rejection", REJECT_RX, cpu_per_405_us)),
        4.0,
        Goal::AtMost,
        |s| fmt_ci(s, 1, " µs"),
    ));
    let flood_runs = runs(r, "flood", FLOODED).len();
    let delivered = spread(&ratios_where(r, "flood", FLOODED, "clean", rps, delivered));
    let mut row = target(
        "allowed traffic next to a fixed-rate flood ≥ 0.9 × clean",
        delivered,
        0.9,
        Goal::AtLeast,
        |s| {
            format!(
                "{}{}",
                fmt_ci(s, 3, ""),
                if s.n < flood_runs {
                    format!(
                        " (the {} of {flood_runs} rounds whose flood was delivered)",
                        s.n
                    )
                } else {
                    String::new()
                }
            )
        },
    );
    if delivered.is_none() && flood_runs > 0 {
        row.figure = format!(
            "not measurable: the flood was not delivered in any round (`filterd` answered {} of \
             its {}/s, below)",
            fmt(
                spread(&values(r, "flood", FLOODED, |x| {
                    x.flood.as_ref().map(|f| f.rps_405())
                })),
                0
            ),
            args.flood_rate
        );
    }
    rows.push(row);
    let _ = writeln!(m, "## Results\n");
    let _ = writeln!(m, "| target | this run | verdict |\n|---|---|---|");
    for t in &rows {
        let _ = writeln!(
            m,
            "| {} | {} | {} |",
            t.name,
            t.figure,
            t.verdict.map_or("not judged", Verdict::words)
        );
    }
    let _ = writeln!(m);

    // -- The figures behind them.
    let _ = writeln!(
        m,
        "The figures behind them (median `[min..max]` over rounds):\n"
    );
    let arm_rps = |sec: &str, arm: &str| fmt(spread(&values(r, sec, arm, rps)), 0);
    let _ = writeln!(
        m,
        "- Allowed throughput, req/s: no filter {}, 10 rules {}, 100k rules {}.",
        arm_rps("allowed", "no filter"),
        arm_rps("allowed", "10 rules"),
        arm_rps("allowed", "100k rules")
    );
    if !k.steady.is_empty() {
        let mut parts = Vec::new();
        for kd in kind::ALL {
            parts.push(format!(
                "{kd} {} / {}",
                fmt(spread(&steady(k, kd, 10)), 0),
                fmt(spread(&steady(k, kd, 100_000)), 0)
            ));
        }
        let _ = writeln!(
            m,
            "- Steady state, ns per packet (10 rules / 100k rules): {}.",
            parts.join("; ")
        );
    }
    if let Some(s) = k.bpf_stats.first() {
        let runs: Vec<String> = s
            .programs
            .iter()
            .map(|(p, (c, _))| format!("`{p}` {:.2}", *c as f64 / s.requests.max(1) as f64))
            .collect();
        let _ = writeln!(
            m,
            "- `bpf_stats`, runs per request (first round): {}.",
            runs.join(", ")
        );
    }
    let f405 = spread(&values(r, "rejection", "filterd 405", non2xx_rps));
    let fcores = spread(&values(r, "rejection", "filterd 405", |x| {
        Some(x.cpu.filterd_cores)
    }));
    let _ = writeln!(
        m,
        "- Rejection, 405/s: `filterd` {} (`filterd` {} cores, backend {} cores), nginx closing {} \
         ({} cores); with the client's receive thread, `filterd` {} ({} cores, the thread {} \
         cores).",
        fmt(f405, 0),
        fmt(fcores, 3),
        fmt(
            spread(&values(r, "rejection", "filterd 405", |x| Some(
                x.cpu.backend_cores
            ))),
            3
        ),
        fmt(
            spread(&values(r, "rejection", "nginx 405 close", non2xx_rps)),
            0
        ),
        fmt(
            spread(&values(r, "rejection", "nginx 405 close", |x| Some(
                x.cpu.front_cores
            ))),
            2
        ),
        fmt(spread(&values(r, "rejection", REJECT_RX, non2xx_rps)), 0),
        fmt(
            spread(&values(r, "rejection", REJECT_RX, |x| Some(x.cpu.filterd_cores))),
            3
        ),
        fmt(
            spread(&values(r, "rejection", REJECT_RX, |x| Some(x.cpu.client_rx_cores))),
            3
        ),
    );
    let flood_of = |arm: &str, f: fn(&crate::flood::FloodResult) -> f64| {
        fmt(
            spread(&values(r, "flood", arm, |x| x.flood.as_ref().map(f))),
            2,
        )
    };
    let _ = writeln!(
        m,
        "- Flood at {}/s: allowed req/s clean {}, next to the flood to `filterd` {}, to nginx {}; \
         the flood's answers per second {} / {}, its generator's CPU {} / {} cores; nginx as \
         the flood's target: {} × clean.",
        args.flood_rate,
        arm_rps("flood", "clean"),
        arm_rps("flood", "+ flood to filterd"),
        arm_rps("flood", "+ flood to nginx 405"),
        flood_of("+ flood to filterd", |f| f.rps_405()),
        flood_of("+ flood to nginx 405", |f| f.rps_405()),
        flood_of("+ flood to filterd", |f| f.cores()),
        flood_of("+ flood to nginx 405", |f| f.cores()),
        fmt(
            spread(&ratios(r, "flood", "+ flood to nginx 405", "clean", rps)),
            3
        ),
    );
    if !k.verified_insns.is_empty() {
        let v: Vec<String> = k
            .verified_insns
            .iter()
            .map(|(p, n)| format!("`{p}` {n}"))
            .collect();
        let _ = writeln!(m, "- Verified instructions: {}.", v.join(", "));
    }
    let _ = writeln!(m);

    // -- What remains.
    let _ = writeln!(m, "## What remains, and why\n");
    let notes = remains(r, k, &rows, &args);
    if notes.is_empty() {
        let _ = writeln!(m, "Every target was met in this run.\n");
    }
    for n in notes {
        let _ = writeln!(m, "- {n}");
    }
    let _ = writeln!(m);

    // -- Environment.
    let e = &r.env;
    let _ = writeln!(m, "## Where it ran\n\n| | |\n|---|---|");
    let _ = writeln!(
        m,
        "| CPU | {} × {} ({}) |",
        e.cpus, e.cpu_model, e.virtualization
    );
    let _ = writeln!(m, "| Memory | {} |", e.mem_total);
    let _ = writeln!(
        m,
        "| OS, kernel | {}, `{}` |",
        e.os,
        kernel_release(&e.kernel)
    );
    for (t, v) in &e.tools {
        let _ = writeln!(m, "| {t} | `{v}` |");
    }
    let _ = writeln!(
        m,
        "| Source | `{}`{} |",
        e.git_head,
        if e.git_dirty.is_empty() {
            String::new()
        } else {
            format!(
                ", with {} uncommitted: {}",
                if e.git_dirty.len() == 1 {
                    "a path".to_owned()
                } else {
                    format!("{} paths", e.git_dirty.len())
                },
                e.git_dirty
                    .iter()
                    .take(3)
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    let _ = writeln!(m, "| Load average at start | `{}` |", e.loadavg_start);
    for s in &r.sanity {
        let _ = writeln!(m, "| Preflight | `{s}` |");
    }
    m
}

/// The missed targets, each with what this run's figures say about why.
fn remains(r: &Results, k: &KernelResults, rows: &[Target], args: &crate::Args) -> Vec<String> {
    let missed = |i: usize| {
        rows.get(i)
            .and_then(|t| t.verdict)
            .is_some_and(|v| !v.met())
    };
    let mut out = Vec::new();
    // Whether `syn_in_stream` was explained already.
    let mut explained = false;
    let per_req = stats_per_request(k);
    let ns = spread(&per_req.iter().map(PerRequest::judged).collect::<Vec<_>>());
    let busy = spread(&values(r, "allowed", "no filter", |x| {
        Some(x.cpu.machine_busy_cores)
    }));
    let rate = spread(
        &k.bpf_stats
            .iter()
            .map(|s| s.requests as f64 / (s.duration_us.max(1) as f64 / 1e6))
            .collect::<Vec<_>>(),
    );
    if missed(0) || missed(1) {
        if let (Some(ns), Some(busy), Some(rate)) = (ns, busy, rate) {
            let cores = ns.median * rate.median / 1e9;
            out.push(format!(
                "**Allowed throughput.** wrk, nginx and the kernel keep this machine's {:.2} busy \
                 cores saturated, so every nanosecond the programs run is taken from them: at \
                 {:.0} ns per request and {:.0} req/s the programs take {:.3} cores, which bounds \
                 throughput at about {:.3} of no filter. 0.98 needs the programs under 2 % of the \
                 machine: about {:.0} ns per request at this rate (the kernel-time target says \
                 650).",
                busy.median,
                ns.median,
                rate.median,
                cores,
                1.0 - cores / busy.median,
                0.02 * busy.median / rate.median * 1e9
            ));
        }
    }
    if missed(2) {
        let get = spread(&steady(k, kind::GET, 10));
        let resp = spread(&steady(k, kind::RESPONSE, 10));
        let up = spread(&steady(k, kind::UP, 10));
        let down = spread(&steady(k, kind::DOWN, 10));
        let empty = spread(&steady(k, kind::EMPTY, 10));
        let med = |s: Option<Spread>| s.map_or(f64::NAN, |s| s.median);
        let get100k = spread(&steady(k, kind::GET, 100_000));
        let (head_in, head_out) = (med(get) - med(up), med(resp) - med(down));
        let mut text = format!(
            "**Kernel time per request.** In steady state wrk's GET costs {:.0} ns on ingress \
             (10 rules; {:.0} with 100k: the rule count barely matters) and nginx's response \
             {:.0} ns on egress. A body segment of the same connections, the per-packet part, is \
             {:.0} / {:.0} ns, and one test-run call of an empty classifier {:.0} ns: the rest, \
             {:.0} ns on ingress, is reading the request's line and headers{}",
            med(get),
            med(get100k),
            med(resp),
            med(up),
            med(down),
            med(empty),
            head_in,
            if head_out > 0.0 {
                format!("; the {head_out:.0} ns on egress, framing the response's head.")
            } else {
                "; on egress the response's head costs no more than a body segment (in lockstep \
                 its head is not framed)."
                    .to_owned()
            }
        );
        if let Some(ns) = ns {
            let test_run = med(get) + med(resp);
            let _ = write!(
                text,
                " Under wrk the same request and response took {:.0} ns, {:.2}× their {:.0} ns \
                 in test runs, where the programs run back to back with their code and data in \
                 the CPU's caches; in this load, nginx, wrk and the kernel's TCP run on the same \
                 two CPUs between two packets of a connection.",
                ns.median,
                ns.median / test_run,
                test_run
            );
        }
        out.push(text);
    }
    if missed(3) {
        let get = spread(&steady(k, kind::GET, 10)).map_or(f64::NAN, |s| s.median);
        let long = spread(&steady(k, kind::LONG, 10)).map_or(f64::NAN, |s| s.median);
        let extra = (crate::kernel::LONG_PATH - PATH.len()) as f64;
        let per_byte = (long - get) / extra;
        out.push(if get >= 1000.0 {
            format!(
                "**The 1 KiB request line**: wrk's GET with a {}-byte path already costs {get:.0} \
                 ns, and the 1 KiB line {:.0} ns more ({per_byte:.2} ns per path byte).",
                PATH.len(),
                long - get
            )
        } else {
            format!(
                "**The 1 KiB request line** costs {:.0} ns more than wrk's {}-byte path: {:.2} ns \
             per path byte, so the line's length sets the figure. Within 1 µs, at wrk's GET's \
             {:.0} ns for the rest, a path byte may cost {:.2} ns: {:.1}× less.",
                long - get,
                PATH.len(),
                per_byte,
                get,
                (1000.0 - get) / extra,
                per_byte / ((1000.0 - get) / extra)
            )
        });
    }
    if missed(4) {
        out.push(
            "**A packet to another port** leaves before any map: an untagged IPv4 frame with a \
             20-byte header, or an IPv6 frame with TCP next, after four word loads \
             (`packet::other_port`), any other after the header walk to the TCP ports; what is \
             above the empty classifier is those loads and compares, the verdict counter and \
             the program's own entry and exit."
                .into(),
        );
    }
    if missed(5) {
        let cpu = spread(&values(r, "rejection", "filterd 405", cpu_per_405_us));
        let own = spread(&values(r, "rejection", REJECT_RX, cpu_per_405_us));
        let busy = spread(&values(r, "rejection", "filterd 405", |x| {
            Some(x.cpu.machine_busy_cores)
        }));
        if let (Some(cpu), Some(busy)) = (cpu, busy) {
            let dropped = drops(r, "rejection", "filterd 405");
            out.push(format!(
                "**405s.** Each refusal is a whole connection (handshake, the request turned into \
                 a reset, the answer and the close); `filterd` spent {:.1} µs of CPU on each \
                 ({} with the client's receive in a thread of its own: the difference is the \
                 client's TCP taking the answer in the softirq of the responder's send), and the \
                 machine kept {:.2} of its {} CPUs busy. The \
                 daemon counted {} in that arm{}{}",
                cpu.median,
                own.map_or("none measured".into(), |o| format!("{:.1} µs", o.median)),
                busy.median,
                r.env.cpus,
                dropped,
                if dropped == "no drop" {
                    "."
                } else {
                    ": segments of wrk's new connections dropped, which the clients wait out \
                     (a stall, not a cost)."
                },
                if dropped.contains("syn_in_stream") {
                    explained = true;
                    SYN_IN_STREAM
                } else {
                    ""
                }
            ));
        }
        if let Some(bound) = client_bound(r) {
            out.push(bound);
        }
    }
    let flood_runs = runs(r, "flood", FLOODED);
    let undelivered: Vec<&&Run> = flood_runs.iter().filter(|x| !delivered(x)).collect();
    if !undelivered.is_empty() {
        let sum = |f: fn(&crate::flood::FloodResult) -> u64| -> u64 {
            undelivered
                .iter()
                .filter_map(|x| x.flood.as_ref())
                .map(f)
                .sum()
        };
        out.push(format!(
            "**The flood was not delivered** in {} of {} rounds: of {} requests due, `filterd` \
             answered {} with 405; {} connections failed (no answer within 2 s) and {} were never \
             opened (1000 were hanging). The daemon counted {} in that arm.{}",
            undelivered.len(),
            flood_runs.len(),
            sum(|f| f.scheduled),
            sum(|f| f.status_405),
            sum(|f| f.errors),
            sum(|f| f.skipped),
            drops(r, "flood", FLOODED),
            if explained || !drops(r, "flood", FLOODED).contains("syn_in_stream") {
                ""
            } else {
                SYN_IN_STREAM
            }
        ));
    } else if missed(7) {
        let g = spread(&values(r, "flood", FLOODED, |x| {
            x.flood.as_ref().map(|f| f.cores())
        }));
        let fd = spread(&values(r, "flood", FLOODED, |x| Some(x.cpu.filterd_cores)));
        out.push(format!(
            "**Next to a flood** of {}/s the generator itself took {} cores and `filterd` {} \
             cores; the rest of the drop is the flood's connections in the kernel (handshakes, \
             resets, answers) on the same CPUs as the allowed traffic. The daemon counted {} \
             in that arm.",
            args.flood_rate,
            fmt(g, 2),
            fmt(fd, 3),
            drops(r, "flood", FLOODED)
        ));
    }
    let clean = drops(r, "flood", "clean");
    if clean != "no drop" {
        out.push(format!(
            "**Allowed connections are caught too** once the daemon has refused connections: in \
             section 4's `clean` arm (only wrk's keep-alive GETs, after earlier rounds' floods) \
             it counted {clean}, so some of wrk's connections stalled there as well."
        ));
    }
    if let Some(e) = &k.steady_error {
        out.push(format!(
            "The steady-state figures could not be measured: `{e}`."
        ));
    }
    if let Some(e) = &k.bpf_stats_error {
        out.push(format!("`bpf_stats` could not be measured: `{e}`."));
    }
    for x in r.runs.iter().filter(|x| x.error.is_some()) {
        out.push(format!(
            "Run {} / {} / round {} failed: `{}`.",
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
    out
}

/// `1 round`, `5 rounds`.
fn rounds(n: usize) -> String {
    format!("{n} round{}", if n == 1 { "" } else { "s" })
}

/// The verdict counters of an arm's runs that are neither a pass nor a refusal the client is
/// answered for (drops and anomalies), summed over its rounds: `out_of_order 300, ...`.
fn drops(r: &Results, section: &str, arm: &str) -> String {
    const ANSWERED: [&str; 8] = [
        "allowed_by_rule",
        "allowed_by_default",
        "no_payload",
        "rejected",
        "responses_sent",
        "mid_stream",
        "not_tcp",
        "not_ip",
    ];
    let mut sum: BTreeMap<&str, u64> = BTreeMap::new();
    for x in runs(r, section, arm) {
        for (k, v) in &x.counters {
            if !ANSWERED.contains(&k.as_str()) {
                *sum.entry(k).or_default() += v;
            }
        }
    }
    if sum.is_empty() {
        return "no drop".into();
    }
    sum.iter()
        .map(|(k, v)| format!("`{k}` {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `syn_in_stream` with `out_of_order` means for a client.
const SYN_IN_STREAM: &str = " `syn_in_stream` is a SYN on the addresses and ports of a \
    connection the filter still follows (here: an earlier connection that ended in a refusal, \
    its port now reused by the client); the new connection's data is then out of order against \
    the old stream and dropped (`out_of_order`), and its client waits until it gives up.";

fn default_args() -> crate::Args {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct A {
        #[command(flatten)]
        args: crate::Args,
    }
    A::parse_from(["filter-bench"]).args
}

/// `6.18.44-fc-v782` from `/proc/version`.
fn kernel_release(version: &str) -> &str {
    version.split_whitespace().nth(2).unwrap_or(version)
}

fn start_utc(unix: u64) -> String {
    std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{unix}"), "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
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
            "; flood {:.0} 405/s of {} due ({} other, {} errors, {} skipped), {:.2} cores",
            f.rps_405(),
            f.scheduled,
            f.status_other,
            f.errors,
            f.skipped,
            f.cores()
        );
    }
    let c = &x.cpu;
    let _ = write!(
        s,
        "; cores: backend {:.2} front {:.2} filterd {:.2} client rx {:.2} machine {:.2} (steal \
         {:.2}, load {:.1})",
        c.backend_cores,
        c.front_cores,
        c.filterd_cores,
        c.client_rx_cores,
        c.machine_busy_cores,
        c.machine_steal_cores,
        c.loadavg_1m
    );
    s
}

/// One line per load run.
pub fn runs_csv(r: &Results) -> String {
    let mut s = String::from(
        "section,arm,round,slot,method,url,threads,connections,seconds,responses,non2xx,socket_errors,resp_per_s,non2xx_per_s,p50_us,p99_us,client_cores,flood_rate,flood_scheduled,flood_405,flood_other,flood_errors,flood_skipped,flood_p99_us,flood_cores,backend_cores,front_cores,filterd_cores,client_rx_cores,machine_busy_cores,machine_steal_cores,loadavg_1m,error\n",
    );
    for x in &r.runs {
        let d = WrkResult::default();
        let a = x.wrk.as_ref().unwrap_or(&d);
        let fd = crate::flood::FloodResult::default();
        let f = x.flood.as_ref().unwrap_or(&fd);
        let c = &x.cpu;
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{:.3},{},{},{},{:.1},{:.1},{},{},{:.3},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.2},{}",
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
            a.socket_errors(),
            a.rps(),
            a.non2xx_rps(),
            a.p50_us,
            a.p99_us,
            a.cores(),
            f.rate,
            f.scheduled,
            f.status_405,
            f.status_other,
            f.errors,
            f.skipped,
            f.p99_us,
            f.cores(),
            c.backend_cores,
            c.front_cores,
            c.filterd_cores,
            c.client_rx_cores,
            c.machine_busy_cores,
            c.machine_steal_cores,
            c.loadavg_1m,
            x.error.as_deref().unwrap_or("").replace([',', '\n'], ";")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results with section 1 runs: (arm, round, requests in one second).
    fn allowed(runs: &[(&str, usize, u64)]) -> Results {
        Results {
            runs: runs
                .iter()
                .map(|&(arm, round, n)| Run {
                    section: "allowed".into(),
                    arm: arm.into(),
                    round,
                    wrk: Some(WrkResult {
                        duration_us: 1_000_000,
                        requests: n,
                        ..WrkResult::default()
                    }),
                    ..Run::default()
                })
                .collect(),
            ..Results::default()
        }
    }

    #[test]
    fn ratios_pair_the_arms_by_round() {
        let r = allowed(&[
            ("no filter", 0, 100),
            ("10 rules", 0, 90),
            ("no filter", 1, 200),
            ("10 rules", 1, 160),
            // A round whose baseline failed has no ratio.
            ("10 rules", 2, 50),
        ]);
        let mut v = ratios(&r, "allowed", "10 rules", "no filter", rps);
        v.sort_by(f64::total_cmp);
        assert_eq!(v, [0.8, 0.9]);
    }

    #[test]
    fn a_flood_that_was_not_delivered_is_not_judged() {
        let flood = |round, arm: &str, req, answered| Run {
            section: "flood".into(),
            arm: arm.into(),
            round,
            wrk: Some(WrkResult {
                duration_us: 1_000_000,
                requests: req,
                ..WrkResult::default()
            }),
            flood: (arm != "clean").then(|| crate::flood::FloodResult {
                scheduled: 100,
                status_405: answered,
                duration_us: 1_000_000,
                ..Default::default()
            }),
            ..Run::default()
        };
        let mut r = Results {
            args: Some(default_args()),
            runs: vec![
                flood(0, "clean", 100, 0),
                flood(0, FLOODED, 95, 99),
                flood(1, "clean", 100, 0),
                flood(1, FLOODED, 100, 10),
            ],
            ..Results::default()
        };
        let md = markdown(&r);
        // Round 1's flood was mostly not answered: only round 0 counts.
        assert!(
            md.contains("| 0.950 [0.950..0.950]; median's 0 % CI 0.950–0.950 (the 1 of 2 rounds whose flood was delivered) |"),
            "{md}"
        );
        assert!(
            md.contains("**The flood was not delivered** in 1 of 2 rounds"),
            "{md}"
        );
        r.runs.remove(1);
        let md = markdown(&r);
        assert!(
            md.contains("not measurable: the flood was not delivered in any round"),
            "{md}"
        );
    }

    #[test]
    fn the_client_share_bounds_the_405_rate() {
        // Round 0: wrk spent 25 µs per 405 beside filterd, 40 µs in round 1; nginx answered
        // 40000 and 50000 a second.
        let run = |round, arm: &str, non2xx, cpu_s| Run {
            section: "rejection".into(),
            arm: arm.into(),
            round,
            wrk: Some(WrkResult {
                duration_us: 1_000_000,
                requests: non2xx,
                non2xx,
                cpu_s,
                ..WrkResult::default()
            }),
            ..Run::default()
        };
        let mut r = Results {
            runs: vec![
                run(0, "filterd 405", 60000, 1.5),
                run(0, "nginx 405 close", 40000, 1.0),
                run(1, "filterd 405", 40000, 1.6),
                run(1, "nginx 405 close", 50000, 1.0),
            ],
            ..Results::default()
        };
        r.env.cpus = 2;
        // The median of 25 and 40 µs: 32.5 µs, so 2 CPUs give at most 61538 a second, 1.37×
        // nginx's median of 45000.
        let text = client_bound(&r).expect("both arms ran");
        assert!(text.contains("used 32.5 µs of CPU per 405"), "{text}");
        assert!(
            text.contains(
                "at most 61538 connections a second even if nothing else ran: 1.37× nginx's 45000."
            ),
            "{text}"
        );
        // No nginx arm: nothing to compare with.
        r.runs.retain(|x| x.arm == "filterd 405");
        assert_eq!(client_bound(&r), None);
    }

    #[test]
    fn the_report_judges_every_target_and_stays_short() {
        let mut r = allowed(&[
            ("no filter", 0, 100),
            ("10 rules", 0, 99),
            ("100k rules", 0, 90),
        ]);
        r.args = Some(default_args());
        let md = markdown(&r);
        assert!(
            md.contains("| allowed throughput, 10 rules ≥ 0.98 × no filter | 0.990 [0.990..0.990]"),
            "{md}"
        );
        assert!(md.contains("| allowed throughput, 100k rules ≥ 0.98 × no filter | 0.900"));
        assert!(md.contains(
            "| 405s ≥ 2 × nginx closing each connection | not measured in this run | not judged |"
        ));
        assert!(md.contains(
            "| `filterd` CPU per 405 under a pure 405 flood ≤ 4 µs | not measured in this run | not judged |"
        ));
        assert!(md.lines().count() < 150, "{} lines", md.lines().count());
    }
}
