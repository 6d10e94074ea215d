//! `cargo xtask bench --profile TRAFFIC`: where the programs spend their time on one kind of
//! steady-state traffic. The daemon runs in the bench's lab with 10 rules; `perf record -a`
//! samples the whole machine while the traffic's packets go through the programs
//! (`BPF_PROG_TEST_RUN`, one packet per call, as section 2 sends them); each sample inside a
//! JIT-compiled program is mapped to its BPF function and, through the program's
//! `jited_line_info` and `line_info` (`BPF_OBJ_GET_INFO_BY_FD`), to the source line `bpftool
//! prog dump xlated` shows for that instruction. This is how the changes in
//! docs/BENCHMARKS.md were found.
//!
//! Must not: leave perf running (it is stopped with SIGINT, by PID, and reaped).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use filter_tests::lab::Lab;

use super::kernel::{prog_named, prog_of};
use super::procs::output_bounded;
use super::steady::{drive, prog_fd, prog_info, Traffic};
use super::{Filter, FilterState, Results};

/// Packets sent while perf samples (a few seconds of test runs).
const PACKETS: usize = 200_000;
/// Sampling frequency (Hz, per CPU).
const FREQUENCY: &str = "20000";
/// Source lines listed per program.
const TOP_LINES: usize = 25;

pub fn run(filterd: &Path, traffic: Traffic) -> Result<()> {
    ensure!(
        Command::new("perf")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "--profile needs perf: apt-get install -y linux-perf"
    );
    let lab = Lab::new().context("building the profiling lab")?;
    let mut results = Results::default();
    let mut filter = Filter::new(&lab, filterd);
    filter.ensure(FilterState::Rules(10), &mut results)?;
    let pid = filter.pid().context("filterd is not running")?;
    let programs = [
        (
            "http_ingress",
            prog_of(pid)?["id"].as_u64().context("prog id")?,
        ),
        (
            "http_egress",
            prog_named(pid, "http_egress")?["id"]
                .as_u64()
                .context("egress prog id")?,
        ),
    ];
    let data = lab.dir().join("perf.data");
    let mut perf = Command::new("perf")
        .args(["record", "-a", "-F", FREQUENCY, "-o"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record")?;
    std::thread::sleep(Duration::from_millis(500));
    let driven = drive(programs[0].1, programs[1].1, traffic, PACKETS);
    // Stop perf (our own child, by PID) so it writes its file, then reap it.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let status = perf.wait().context("waiting for perf record")?;
    driven?;
    // perf ends on the SIGINT it was sent, after writing its file.
    use std::os::unix::process::ExitStatusExt as _;
    ensure!(
        (status.success() || status.signal() == Some(libc::SIGINT)) && data.exists(),
        "perf record failed ({status})"
    );
    let script = output_bounded(
        Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(&data),
        Duration::from_secs(300),
    )?;
    let samples: Vec<(u64, &str)> = script
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let ip = u64::from_str_radix(it.next()?, 16).ok()?;
            let sym = it.next()?;
            sym.starts_with("bpf_prog_").then_some((ip, sym))
        })
        .collect();
    println!(
        "profile of {traffic:?} traffic: {PACKETS} packets, {} samples in BPF programs",
        samples.len()
    );
    for (name, id) in programs {
        let prog = JitMap::load(id)?;
        let mine: Vec<&(u64, &str)> = samples
            .iter()
            .filter(|(ip, _)| prog.contains(*ip))
            .collect();
        println!("\n{name} (id {id}): {} samples", mine.len());
        if mine.is_empty() {
            continue;
        }
        let pct = |n: usize| 100.0 * n as f64 / mine.len() as f64;
        let mut by_fn: BTreeMap<&str, usize> = BTreeMap::new();
        let mut by_line: BTreeMap<usize, usize> = BTreeMap::new();
        for (ip, sym) in &mine {
            // bpf_prog_<tag>_<function>
            let function = sym.splitn(4, '_').nth(3).unwrap_or(sym);
            *by_fn.entry(function).or_default() += 1;
            if let Some(insn) = prog.insn_at(*ip) {
                *by_line.entry(insn).or_default() += 1;
            }
        }
        let mut fns: Vec<_> = by_fn.into_iter().collect();
        fns.sort_by_key(|f| std::cmp::Reverse(f.1));
        println!("  by function:");
        for (f, n) in fns {
            println!("  {:5.1} %  {f}", pct(n));
        }
        let mut lines: Vec<_> = by_line.into_iter().collect();
        lines.sort_by_key(|l| std::cmp::Reverse(l.1));
        println!("  by source line (instruction: line):");
        for (insn, n) in lines.into_iter().take(TOP_LINES) {
            let text = prog.source.get(&insn).map_or("?", String::as_str);
            println!("  {:5.1} %  {insn:5}: {}", pct(n), clip(text, 110));
        }
    }
    filter.ensure(FilterState::Off, &mut results)
}

fn clip(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A loaded program's JIT image: its functions' address ranges, the JIT address of each
/// `line_info` record with the instruction it starts, and the source line of each instruction.
struct JitMap {
    ranges: Vec<(u64, u64)>,
    /// (JIT address, translated instruction index), sorted by address.
    lines: Vec<(u64, usize)>,
    /// Translated instruction index → the source line `bpftool prog dump xlated` shows for it.
    source: BTreeMap<usize, String>,
}

// Offsets in `struct bpf_prog_info` (include/uapi/linux/bpf.h).
const NR_JITED_KSYMS: usize = 104;
const NR_JITED_FUNC_LENS: usize = 108;
const JITED_KSYMS: usize = 112;
const JITED_FUNC_LENS: usize = 120;
const NR_LINE_INFO: usize = 148;
const LINE_INFO: usize = 152;
const JITED_LINE_INFO: usize = 160;
const NR_JITED_LINE_INFO: usize = 168;
const LINE_INFO_REC_SIZE: usize = 172;
const JITED_LINE_INFO_REC_SIZE: usize = 176;
const INFO_LEN: usize = 232;

impl JitMap {
    fn load(id: u64) -> Result<JitMap> {
        let fd = prog_fd(id)?;
        let mut info = [0u8; INFO_LEN];
        prog_info(&fd, &mut info)?;
        let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        let (nks, nfl) = (
            u32_at(&info, NR_JITED_KSYMS) as usize,
            u32_at(&info, NR_JITED_FUNC_LENS) as usize,
        );
        let (nli, njli) = (
            u32_at(&info, NR_LINE_INFO) as usize,
            u32_at(&info, NR_JITED_LINE_INFO) as usize,
        );
        let (lrs, jlrs) = (
            u32_at(&info, LINE_INFO_REC_SIZE) as usize,
            u32_at(&info, JITED_LINE_INFO_REC_SIZE) as usize,
        );
        ensure!(
            nks > 0 && nli > 0 && njli > 0 && lrs >= 4 && jlrs == 8,
            "program {id} has no JIT line information (JIT off, or no BTF)"
        );
        let mut ksyms = vec![0u64; nks];
        let mut lens = vec![0u32; nfl];
        let mut line_info = vec![0u8; nli * lrs];
        let mut jited = vec![0u64; njli];
        let mut ask = [0u8; INFO_LEN];
        let put32 = |b: &mut [u8], o: usize, v: usize| {
            b[o..o + 4].copy_from_slice(&(v as u32).to_ne_bytes())
        };
        let put64 = |b: &mut [u8], o: usize, p: u64| b[o..o + 8].copy_from_slice(&p.to_ne_bytes());
        put32(&mut ask, NR_JITED_KSYMS, nks);
        put32(&mut ask, NR_JITED_FUNC_LENS, nfl);
        put64(&mut ask, JITED_KSYMS, ksyms.as_mut_ptr() as u64);
        put64(&mut ask, JITED_FUNC_LENS, lens.as_mut_ptr() as u64);
        put32(&mut ask, NR_LINE_INFO, nli);
        put64(&mut ask, LINE_INFO, line_info.as_mut_ptr() as u64);
        put64(&mut ask, JITED_LINE_INFO, jited.as_mut_ptr() as u64);
        put32(&mut ask, NR_JITED_LINE_INFO, njli);
        put32(&mut ask, LINE_INFO_REC_SIZE, lrs);
        put32(&mut ask, JITED_LINE_INFO_REC_SIZE, jlrs);
        prog_info(&fd, &mut ask)?;
        let ranges = ksyms
            .iter()
            .zip(&lens)
            .map(|(&a, &l)| (a, a + l as u64))
            .collect();
        // `struct bpf_line_info` starts with the translated instruction's index.
        let mut lines: Vec<(u64, usize)> = jited
            .iter()
            .enumerate()
            .take(nli)
            .map(|(k, &addr)| (addr, u32_at(&line_info, k * lrs) as usize))
            .collect();
        lines.sort_unstable();
        Ok(JitMap {
            ranges,
            lines,
            source: xlated_source(id)?,
        })
    }

    fn contains(&self, ip: u64) -> bool {
        self.ranges.iter().any(|&(a, e)| a <= ip && ip < e)
    }

    /// The translated instruction whose line record covers JIT address `ip`.
    fn insn_at(&self, ip: u64) -> Option<usize> {
        let k = self.lines.partition_point(|&(a, _)| a <= ip);
        k.checked_sub(1).map(|k| self.lines[k].1)
    }
}

/// Each translated instruction's source line, from `bpftool prog dump xlated` (a `; line`
/// before the instructions it covers).
fn xlated_source(id: u64) -> Result<BTreeMap<usize, String>> {
    let dump = output_bounded(
        Command::new("bpftool").args(["prog", "dump", "xlated", "id", &id.to_string()]),
        Duration::from_secs(60),
    )?;
    let mut out = BTreeMap::new();
    let mut current = String::from("?");
    for line in dump.lines() {
        if let Some(src) = line.strip_prefix("; ") {
            current = src.trim().to_owned();
        } else if let Some((insn, _)) = line.trim_start().split_once(": ") {
            if let Ok(i) = insn.parse::<usize>() {
                out.insert(i, current.clone());
            }
        }
    }
    Ok(out)
}
