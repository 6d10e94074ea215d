//! The verifier budget: every program of the kernel object must be accepted by the running
//! kernel's verifier with fewer than `INSN_BUDGET` processed instructions (30 % of the 1M
//! limit) and a stack well inside 512 bytes (`filter_tests::verifier`). Prints one line per
//! program, and with `FILTER_VERIFIER_REPORT=FILE` writes one JSON line per program there
//! (`cargo xtask test` collects them per kernel; `cargo xtask verifier-table` renders them).

use filter_tests::lab;
use filter_tests::verifier::{self, Record, INSN_BUDGET, STACK_BUDGET};
use filter_userspace::dataplane;

/// The environment variable naming the report file.
const REPORT_ENV: &str = "FILTER_VERIFIER_REPORT";

#[test]
fn every_program_verifies_within_budget() {
    if !lab::e2e_enabled("verifier::every_program_verifies_within_budget") {
        return;
    }
    lab::check_root().expect("prerequisites");
    let kernel = verifier::kernel_release();
    let mut records = Vec::new();
    // As `filterd` loads them, and with `filterd --bpf-log` (the classifiers' diagnostics on:
    // their records show as `PROGRAM (--bpf-log)`).
    for bpf_log in [false, true] {
        records.extend(verify(&kernel, bpf_log));
    }

    if let Some(path) = std::env::var_os(REPORT_ENV) {
        let lines: String = records
            .iter()
            .map(|r| serde_json::to_string(r).expect("a record serializes") + "\n")
            .collect();
        std::fs::write(&path, lines)
            .unwrap_or_else(|e| panic!("{REPORT_ENV}={}: {e}", path.to_string_lossy()));
    }

    let failures: Vec<String> = records
        .iter()
        .filter_map(|r| r.failure().map(|f| format!("{}: {f}", r.program)))
        .collect();
    assert!(
        failures.is_empty(),
        "kernel {kernel}: {} of {} programs break the verifier budget:\n{}",
        failures.len(),
        records.len(),
        failures.join("\n")
    );
}

/// Every program of the object through the verifier (`bpf_log`: with the classifiers'
/// diagnostics on), one record each.
fn verify(kernel: &str, bpf_log: bool) -> Vec<Record> {
    let (verdicts, logs) = verifier::capture_stats(|| dataplane::verify_each(&[80], bpf_log))
        .expect("collecting the verifier's statistics");
    let verdicts = verdicts.expect("the kernel object loads (maps, BTF)");
    assert!(!verdicts.is_empty(), "the kernel object has no programs");

    let mut records = Vec::new();
    for v in &verdicts {
        let name = if bpf_log {
            format!("{} (--bpf-log)", v.program)
        } else {
            v.program.clone()
        };
        // The kernel keeps 15 bytes of a program's name.
        let short: String = v.program.chars().take(15).collect();
        let load = logs.iter().rev().find(|l| l.name == short);
        let stats = load
            .map(|l| verifier::parse_log(&l.log))
            .unwrap_or_default();
        let calls = load.and_then(|l| l.calls.as_deref());
        let chain = |frames: &Option<Vec<u32>>| {
            frames
                .as_deref()
                .and_then(|f| verifier::deepest_chain(f, calls))
        };
        let record = match &v.result {
            Ok(insns) => Record {
                kernel: kernel.to_owned(),
                program: name.clone(),
                accepted: true,
                insns: Some(*insns).filter(|&n| n > 0).or(stats.insns),
                insn_budget: INSN_BUDGET,
                stack_chain: chain(&stats.stack),
                stack: stats.stack,
                stack_budget: STACK_BUDGET,
                reason: None,
            },
            Err(text) => {
                let refusal = verifier::parse_log(text);
                let stack = refusal.stack.or(stats.stack);
                Record {
                    kernel: kernel.to_owned(),
                    program: name.clone(),
                    accepted: false,
                    insns: refusal.insns.or(stats.insns),
                    insn_budget: INSN_BUDGET,
                    stack_chain: chain(&stack),
                    stack,
                    stack_budget: STACK_BUDGET,
                    reason: refusal
                        .reason
                        .or_else(|| text.lines().next().map(str::to_owned)),
                }
            }
        };
        eprintln!("verifier: {}", describe(&record));
        records.push(record);
    }

    records
}

fn describe(r: &Record) -> String {
    let insns = r.insns.map_or("? insns".into(), |n| {
        format!(
            "{n} insns ({:.0} % of the {} budget)",
            f64::from(n) * 100.0 / f64::from(r.insn_budget),
            r.insn_budget
        )
    });
    let stack = match (&r.stack, r.stack_chain) {
        (Some(frames), Some(chain)) => {
            let frames: Vec<String> = frames.iter().map(u32::to_string).collect();
            format!(
                "stack {} (deepest chain {chain} of the {} budget)",
                frames.join("+"),
                r.stack_budget
            )
        }
        _ => "stack unknown".into(),
    };
    let verdict = if r.accepted {
        "accepted".to_owned()
    } else {
        format!("REFUSED ({})", r.reason.as_deref().unwrap_or("?"))
    };
    format!("{} on {}: {verdict}, {insns}, {stack}", r.program, r.kernel)
}
