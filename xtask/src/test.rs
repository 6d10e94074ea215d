//! `cargo xtask test`: the test tiers, on the host and on the kernel matrix.
//!
//! On the host (`--kernel host`):
//! 1. Host unit tests (no root): parsers, hash, policy, response builder, API router, xtask.
//! 2. and 3. As root, with `FILTER_E2E=1` and one test thread, the test binaries of
//!    `filter-tests`: its unit tests, the verifier budget (`verifier.rs`) and the kernel
//!    fixtures (`kernel.rs`, `BPF_PROG_TEST_RUN`) first, then the end-to-end ones in network
//!    namespaces. Every binary runs even when an earlier one failed.
//!
//! On another kernel (`--kernel 6.1`, `6.12`, or a `vmlinuz`): the verifier budget and the
//! kernel fixtures, the same binaries built once on the host, in a guest under QEMU
//! (`vm.rs`). End to end needs the daemon's TCX links (6.6+) and costs minutes per test under
//! emulation: it runs on the host only.
//!
//! Without `--kernel`, all of it: the host, then 6.1 and 6.12 (what CI runs). Each kernel's
//! verifier records (`FILTER_VERIFIER_REPORT`) are kept in `target/verifier/<release>.jsonl`
//! for `cargo xtask verifier-table`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::build::Built;
use crate::vm::{self, KernelArg};

/// The test binaries every kernel of the matrix runs, in order.
const MATRIX_TESTS: [&str; 2] = ["verifier", "kernel"];

/// The result of one test binary (or tier) on one kernel.
struct Part {
    name: String,
    /// `None`: it never finished (the guest failed).
    passed: Option<bool>,
    seconds: Option<f64>,
}

/// One kernel's run.
struct Leg {
    label: String,
    release: Option<String>,
    boot: Option<f64>,
    parts: Vec<Part>,
    /// Why the leg did not get through every part, if it did not.
    error: Option<String>,
}

impl Leg {
    fn passed(&self) -> bool {
        self.error.is_none() && self.parts.iter().all(|p| p.passed == Some(true))
    }
}

pub fn run(b: &Built, kernels: &[String], timeout: Duration) -> Result<()> {
    let legs = if kernels.is_empty() {
        vm::parse_kernels(&["host".into(), "6.1".into(), "6.12".into()])?
    } else {
        vm::parse_kernels(kernels)?
    };
    if !crate::build::is_root() {
        bail!("the kernel tiers need root: run `sudo -E cargo xtask test`");
    }
    // Provision first (the tools before the kernels: unpacking one runs depmod): a missing
    // tool or kernel fails before any test runs.
    let tools = if legs.iter().any(|l| *l != KernelArg::Host) {
        Some(crate::kernels::ensure_tools()?)
    } else {
        None
    };
    let mut guests = Vec::new();
    for arg in &legs {
        guests.extend(vm::provision(arg)?);
    }
    let bins = test_binaries(b)?;
    let records = b.root.join("target/verifier");
    std::fs::create_dir_all(&records)?;

    let mut done = Vec::new();
    if legs.contains(&KernelArg::Host) {
        done.push(host(b, &bins, &records)?);
    }
    for kernel in &guests {
        done.push(guest(
            b,
            &bins,
            kernel,
            tools.as_deref().unwrap(),
            timeout,
            &records,
        )?);
    }

    eprintln!("\nxtask: summary");
    for leg in &done {
        eprintln!("{}", summary_line(leg));
        if let Some(e) = &leg.error {
            eprintln!("    {}", e.replace('\n', "\n    "));
        }
    }
    match crate::verifier_table::load(&records) {
        Ok(recs) if !recs.is_empty() => eprintln!(
            "\nxtask: verifier records in {} (`cargo xtask verifier-table` puts them into ARCHITECTURE.md):\n{}",
            records.display(),
            crate::verifier_table::render(&recs)
        ),
        Ok(_) => {}
        Err(e) => eprintln!("xtask: verifier records: {e:#}"),
    }
    let failed: Vec<&str> = done
        .iter()
        .filter(|l| !l.passed())
        .map(|l| l.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("tests failed on: {}", failed.join(", "));
    }
    Ok(())
}

fn summary_line(leg: &Leg) -> String {
    let secs = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.1} s"));
    let parts: Vec<String> = leg
        .parts
        .iter()
        .map(|p| {
            let verdict = match p.passed {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "not run",
            };
            format!("{} {verdict} ({})", p.name, secs(p.seconds))
        })
        .collect();
    format!(
        "  {:<6} {:<24} {} boot {:<8} {}",
        leg.label,
        leg.release.as_deref().unwrap_or("?"),
        if leg.passed() { "ok    " } else { "FAILED" },
        secs(leg.boot),
        parts.join(", ")
    )
}

/// The test binaries of `filter-tests`, built (as `cargo test` builds them) but not run:
/// target name → path.
fn test_binaries(b: &Built) -> Result<BTreeMap<String, PathBuf>> {
    let out = Command::new(env!("CARGO"))
        .current_dir(&b.root)
        .args([
            "test",
            "-p",
            "filter-tests",
            "--no-run",
            "--message-format=json",
        ])
        .env("FILTER_EBPF_OBJECT", &b.object)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot start cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed (cargo's output above)");
    }
    parse_test_binaries(&String::from_utf8_lossy(&out.stdout))
}

/// The test executables in cargo's `--message-format=json` output.
fn parse_test_binaries(json_lines: &str) -> Result<BTreeMap<String, PathBuf>> {
    let mut bins = BTreeMap::new();
    for line in json_lines.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            bins.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    for t in MATRIX_TESTS {
        if !bins.contains_key(t) {
            bail!("cargo built no `{t}` test binary of filter-tests");
        }
    }
    Ok(bins)
}

/// Moves a run's verifier records to `target/verifier/<release>.jsonl`.
fn keep_records(report: &Path, release: &str, records: &Path) -> Result<()> {
    if report.exists() {
        let to = records.join(format!("{release}.jsonl"));
        std::fs::copy(report, &to).with_context(|| format!("copying to {}", to.display()))?;
        let _ = std::fs::remove_file(report);
    }
    Ok(())
}

fn host(b: &Built, bins: &BTreeMap<String, PathBuf>, records: &Path) -> Result<Leg> {
    let release = filter_tests::verifier::kernel_release();
    let mut leg = Leg {
        label: "host".into(),
        release: Some(release.clone()),
        boot: None,
        parts: Vec::new(),
        error: None,
    };
    eprintln!("xtask: host ({release}): tier 1: host unit tests");
    let start = Instant::now();
    let unit = crate::build::run(
        Command::new(env!("CARGO"))
            .current_dir(&b.root)
            .args([
                "test",
                "-p",
                "filter-common",
                "-p",
                "filter-userspace",
                "-p",
                "xtask",
            ])
            .env("FILTER_EBPF_OBJECT", &b.object),
    );
    leg.parts.push(Part {
        name: "unit".into(),
        passed: Some(unit.is_ok()),
        seconds: Some(start.elapsed().as_secs_f64()),
    });

    // The Debian package an operator installs, for `dist`'s test of what it ships.
    eprintln!("xtask: host ({release}): the .deb (cargo xtask dist --deb)");
    let start = Instant::now();
    let out = b.root.join("target/dist");
    let deb = crate::dist::generate(&out).and_then(|gen| crate::dist::deb(b, &gen, &out));
    if let Err(e) = &deb {
        eprintln!("xtask: the .deb: {e:#}");
    }
    leg.parts.push(Part {
        name: "deb".into(),
        passed: Some(deb.is_ok()),
        seconds: Some(start.elapsed().as_secs_f64()),
    });

    // The library's own tests, the matrix's tests, then the rest (end to end).
    let mut order: Vec<&str> = vec!["filter_tests"];
    order.extend(MATRIX_TESTS);
    let rest: Vec<&str> = bins
        .keys()
        .map(String::as_str)
        .filter(|n| !order.contains(n))
        .collect();
    order.extend(rest);
    let report =
        std::env::temp_dir().join(format!("filterd-verifier-{}.jsonl", std::process::id()));
    let tests_dir = b.root.join("tests");
    for name in order {
        let Some(exe) = bins.get(name) else {
            continue;
        };
        eprintln!("xtask: host ({release}): {name} (root, FILTER_E2E=1)");
        let start = Instant::now();
        let mut cmd = Command::new(exe);
        if let Ok(deb) = &deb {
            cmd.env("FILTER_DEB", deb);
        }
        let status = cmd
            .arg("--test-threads=1")
            .current_dir(&tests_dir)
            .env("FILTER_E2E", "1")
            .env("FILTER_EBPF_OBJECT", &b.object)
            .env("FILTERD_BIN", &b.filterd)
            .env("FILTER_VERIFIER_REPORT", &report)
            .status()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        leg.parts.push(Part {
            name: name.into(),
            passed: Some(status.success()),
            seconds: Some(start.elapsed().as_secs_f64()),
        });
    }
    keep_records(&report, &release, records)?;
    Ok(leg)
}

fn guest(
    b: &Built,
    bins: &BTreeMap<String, PathBuf>,
    kernel: &crate::kernels::Kernel,
    tools: &Path,
    timeout: Duration,
    records: &Path,
) -> Result<Leg> {
    eprintln!(
        "xtask: {}: booting {} under QEMU (TCG): {} (deadline {} s)",
        kernel.label,
        kernel.image.display(),
        MATRIX_TESTS.join(", "),
        timeout.as_secs()
    );
    let report_name = format!("filterd-verifier-{}.jsonl", std::process::id());
    let report = Path::new("/tmp").join(&report_name);
    let mut env = vm::passed_env();
    env.push(("FILTER_E2E".into(), "1".into()));
    env.push((
        "FILTER_VERIFIER_REPORT".into(),
        report.display().to_string(),
    ));
    let steps = MATRIX_TESTS
        .iter()
        .map(|t| vm::Step {
            name: (*t).into(),
            command: format!(
                "{} --test-threads=1",
                vm::shell_quote(&bins[*t].display().to_string())
            ),
            merge_stderr: true,
        })
        .collect();
    let outcome = vm::run(&vm::Run {
        kernel,
        tools,
        cwd: &b.root.join("tests"),
        env,
        steps,
        timeout,
        stream: true,
    })?;
    let release = outcome.release.clone();
    if let Some(r) = &release {
        keep_records(&report, r, records)?;
    }
    let leg = Leg {
        label: kernel.label.clone(),
        release,
        boot: outcome.boot,
        parts: outcome
            .steps
            .iter()
            .map(|s| Part {
                name: s.name.clone(),
                passed: s.status.map(|c| c == 0),
                seconds: s.seconds,
            })
            .collect(),
        error: outcome.failure(),
    };
    eprintln!("{}", summary_line(&leg));
    if leg.error.is_none() {
        let _ = std::fs::remove_dir_all(&outcome.dir);
    }
    Ok(leg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_test_executables_in_cargos_messages() {
        let lines = r#"{"reason":"compiler-artifact","target":{"name":"filter_tests","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"verifier","kind":["test"]},"profile":{"test":true},"executable":"/t/debug/deps/verifier-1"}
{"reason":"compiler-artifact","target":{"name":"kernel","kind":["test"]},"profile":{"test":true},"executable":"/t/debug/deps/kernel-2"}
{"reason":"build-finished","success":true}
not json"#;
        let bins = parse_test_binaries(lines).unwrap();
        assert_eq!(bins.len(), 2);
        assert_eq!(bins["kernel"], PathBuf::from("/t/debug/deps/kernel-2"));
        assert!(
            parse_test_binaries("").is_err(),
            "the matrix's tests are required"
        );
    }
}
