//! `filter-bench`: the benchmarks of the HTTP method firewall, and the report that judges its
//! performance targets (`docs/BENCHMARKS.md`, raw data in `docs/bench/`). `cargo xtask bench`
//! builds the kernel object, `filterd` and this binary, then runs it as root.
//!
//! Owns: the benchmark lab (client and server network namespaces from `filter_tests::lab`, an
//! nginx backend on :80, an nginx "405 front" on :8081, `filterd` started and stopped as each
//! arm needs), the load generators (wrk; a fixed-rate flood client, [`flood`]), the kernel
//! probes (test runs through a [`filter_userspace::dataplane::Dataplane`] of its own, and aya's
//! run-time statistics of the daemon's programs, [`kernel`]), and the report ([`report`],
//! with the statistics in [`stats`]).
//!
//! Method: every throughput figure is a ratio against a baseline measured in the same run. The
//! arms of a section are interleaved inside each round (their order rotates from round to
//! round), and a target is judged on the median of the per-round figures with the median's
//! confidence interval. Every run is bounded in time; progress goes to stderr.
//!
//! Must not: touch the system nginx (its config, service or logs), kill what it did not start,
//! tune anything outside its own namespaces, or decide anything about packets itself (the
//! classifier's constants and frames come from `filter_common` and `filter_tests::frames`).

pub mod env;
pub mod flood;
pub mod kernel;
pub mod procs;
pub mod report;
pub mod run;
pub mod stats;

use std::time::Instant;

use serde::{Deserialize, Serialize};

use procs::{CpuSnapshot, WrkResult};

/// Port the filtered backend listens on (the port `filterd` guards).
pub const BACKEND_PORT: u16 = 80;
/// nginx answering 405 itself and closing the connection (the same shape as filterd's answer).
pub const FRONT_PORT: u16 = 8081;
/// The path every allowed and refused request uses; the policy allows GET and POST on it.
pub const PATH: &str = "/api/items";

/// Section names, as `--sections` numbers them.
pub const SECTIONS: [&str; 4] = ["allowed", "kernel", "rejection", "flood"];

#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct Args {
    /// Rounds of sections 3 and 4; the arms of a section are interleaved inside each round
    /// (section 2 runs min(rounds, 3)).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per load run in sections 3 and 4 (section 2's `bpf_stats` runs: at most 8).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Rounds of section 1 (allowed traffic), whose 0.98 target needs a narrower interval than
    /// five rounds give: with 15, the median's 95 % confidence interval runs from the 4th to
    /// the 12th of the sorted ratios.
    #[arg(long, default_value_t = 15)]
    pub allowed_rounds: usize,
    /// Seconds per wrk run in section 1.
    #[arg(long, default_value_t = 4)]
    pub allowed_duration: u64,
    /// wrk threads for the rejection load (section 3); the allowed load runs one, on a CPU of
    /// its own, on a machine with two CPUs or more.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// wrk connections for the measured client.
    #[arg(long, default_value_t = 50)]
    pub connections: u32,
    /// Repetitions per repeated `BPF_PROG_TEST_RUN` call (the other-port packet).
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Refused requests per second of the flood in section 4 (each on its own connection).
    #[arg(long, default_value_t = 2000)]
    pub flood_rate: u32,
    /// Sections to run: 1 allowed traffic, 2 kernel cost, 3 rejection, 4 flood.
    #[arg(long, value_delimiter = ',', default_values_t = [1u8, 2, 3, 4])]
    pub sections: Vec<u8>,
    /// The filterd binary (default: `filterd` beside this binary, as `cargo xtask build` puts it).
    #[arg(long)]
    pub filterd: Option<std::path::PathBuf>,
    /// Where BENCHMARKS.md and bench/ go (default: the workspace's docs/).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Only rewrite BENCHMARKS.md and the CSV from an earlier run's results.json (no root).
    #[arg(long)]
    pub report_from: Option<std::path::PathBuf>,
    /// Do not apt-get install missing tools; fail naming them instead.
    #[arg(long)]
    pub no_install: bool,
}

/// One measured load run of one arm.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct Run {
    pub section: String,
    pub arm: String,
    pub round: usize,
    /// Position inside the round (the order rotates).
    pub slot: usize,
    pub wrk: Option<WrkResult>,
    /// The flood next to it (section 4).
    pub flood: Option<flood::FloodResult>,
    pub cpu: CpuSnapshot,
    /// The daemon's verdict counters that moved during the run (`GET /v1/stats`), when it ran.
    pub counters: std::collections::BTreeMap<String, u64>,
    pub error: Option<String>,
}

/// Everything one run measured: `docs/bench/results.json`.
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
pub struct Results {
    pub env: env::Environment,
    pub args: Option<Args>,
    pub started_unix: u64,
    pub total_seconds: f64,
    /// Why the filter arms could not run, if they could not.
    pub filter_error: Option<String>,
    pub sanity: Vec<String>,
    pub runs: Vec<Run>,
    pub kernel: Option<kernel::KernelResults>,
    /// Where the allowed load ran (`None`: placed by the scheduler).
    pub pinning: Option<procs::Pinning>,
}

/// A progress line on stderr, with the seconds since `t0`.
pub fn progress(t0: Instant, msg: impl AsRef<str>) {
    eprintln!("[{:6.1}s] {}", t0.elapsed().as_secs_f64(), msg.as_ref());
}

/// `items` rotated left by `round`: each arm takes each position in turn.
pub fn rotated<T: Clone>(items: &[T], round: usize) -> Vec<T> {
    let n = items.len().max(1);
    (0..items.len())
        .map(|i| items[(i + round) % n].clone())
        .collect()
}

/// The workspace root (this crate is `bench/` in it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the bench crate lives in the workspace")
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rotation_gives_every_arm_every_slot() {
        assert_eq!(super::rotated(&[1, 2, 3], 0), [1, 2, 3]);
        assert_eq!(super::rotated(&[1, 2, 3], 1), [2, 3, 1]);
        assert_eq!(super::rotated(&[1, 2, 3], 5), [3, 1, 2]);
        assert!(super::rotated::<u8>(&[], 3).is_empty());
    }
}
