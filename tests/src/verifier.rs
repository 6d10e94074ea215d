//! The verifier budget and its record: what `tests/tests/verifier.rs` asserts for every program
//! of the kernel object, the JSON line it writes per program (`FILTER_VERIFIER_REPORT`) for
//! `cargo xtask verifier-table`, and how the stack depth of an accepted program is obtained.
//!
//! The stack depth is only in the verifier's log, and aya asks for the log only after a
//! refusal. [`capture_stats`] runs a closure on a thread of its own under a seccomp filter
//! that hands every `bpf(BPF_PROG_LOAD)` made without a log to the calling thread (a seccomp
//! user notification); that thread makes the same call with a small log at the statistics
//! level (`BPF_LOG_STATS`: the last lines, `stack depth …` and `processed … insns`), returns
//! its result as the call's (the program's descriptor: the descriptor table is the process's,
//! so it is the caller's as if it had made the call), and keeps the log. A load that already
//! carries a log (aya's retry after a refusal) goes to the kernel unchanged.
//!
//! Owns: the budget figures, the record's layout, the filter and its listener for the
//! closure's duration. Must not: change what any load returns, or filter any other thread.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The verifier's own limit on processed instructions (`BPF_COMPLEXITY_LIMIT_INSNS`).
pub const INSN_LIMIT: u32 = 1_000_000;
/// What a program may use of it: 30 %, so that a kernel that verifies less cleverly than the
/// one it was measured on (the same program took 649k on one 6.18 build and over 1M on
/// another) still accepts it.
pub const INSN_BUDGET: u32 = 300_000;
/// The verifier's limit on the stack of a chain of BPF-to-BPF calls (`MAX_BPF_STACK`).
pub const STACK_LIMIT: u32 = 512;
/// What the deepest chain of calls may use of it (75 %): frames rounded up to 32 bytes as the
/// verifier adds them up, a `bpf_loop` callback counted as called by the function that passes
/// it.
pub const STACK_BUDGET: u32 = 384;

/// One program on one kernel: a line of the report `FILTER_VERIFIER_REPORT` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `uname -r` of the kernel that verified it.
    pub kernel: String,
    /// The program's name in the object.
    pub program: String,
    pub accepted: bool,
    /// Instructions the verifier processed (also for a refusal, from its log), if known.
    pub insns: Option<u32>,
    pub insn_budget: u32,
    /// The stack depth of each of the program's functions, main program first, if known.
    pub stack: Option<Vec<u32>>,
    /// The stack of the deepest chain of calls ([`deepest_chain`]), if known.
    pub stack_chain: Option<u32>,
    pub stack_budget: u32,
    /// Refused: the verifier's reason (its last line before the statistics).
    pub reason: Option<String>,
}

impl Record {
    /// Why this record breaks the budget, if it does.
    pub fn failure(&self) -> Option<String> {
        if !self.accepted {
            return Some(format!(
                "refused: {}",
                self.reason.as_deref().unwrap_or("no reason in the log")
            ));
        }
        let mut over = Vec::new();
        match self.insns {
            Some(n) if n >= self.insn_budget => over.push(format!(
                "{n} processed instructions, budget {} ({} % of the {INSN_LIMIT} limit)",
                self.insn_budget,
                u64::from(self.insn_budget) * 100 / u64::from(INSN_LIMIT)
            )),
            Some(_) => {}
            None => over.push("the processed instruction count is unknown".into()),
        }
        match self.stack_chain {
            Some(s) if s > self.stack_budget => over.push(format!(
                "deepest call chain uses {s} bytes of stack, budget {} of the {STACK_LIMIT}-byte limit",
                self.stack_budget
            )),
            Some(_) => {}
            None => over.push("the stack depth is unknown".into()),
        }
        (!over.is_empty()).then(|| format!("over budget: {}", over.join("; ")))
    }
}

/// What the statistics lines of a verifier log say.
#[derive(Debug, Default, PartialEq)]
pub struct Stats {
    /// `processed N insns (limit …)`.
    pub insns: Option<u32>,
    /// `stack depth A+B+…`: each function's frame.
    pub stack: Option<Vec<u32>>,
    /// The verifier's reason for a refusal: the last line before the statistics.
    pub reason: Option<String>,
}

/// Reads the statistics and the refusal reason out of (the tail of) a verifier log.
pub fn parse_log(log: &str) -> Stats {
    let mut stats = Stats::default();
    let mut reason = None;
    for line in log.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("processed ") {
            stats.insns = rest.split(' ').next().and_then(|n| n.parse().ok());
        } else if let Some(rest) = line.strip_prefix("stack depth ") {
            stats.stack = rest
                .split('+')
                .map(|n| n.trim().parse().ok())
                .collect::<Option<Vec<u32>>>();
        } else if line.starts_with("verification time ") || line.is_empty() {
        } else {
            reason = Some(line.to_owned());
        }
    }
    stats.reason = reason;
    stats
}

/// A frame as the verifier counts it in a chain of calls: rounded up to 32 bytes, at least 32.
fn rounded(frame: u32) -> u32 {
    frame.max(1).div_ceil(32) * 32
}

/// The stack of the deepest chain of calls from the main program (function 0): `frames[f]` is
/// function `f`'s frame, `calls[f]` the functions it calls or passes as a callback. Without
/// the calls (`None`), all frames added up: an upper bound. `None` if the calls name a
/// function without a frame, or loop (the verifier refuses recursion).
pub fn deepest_chain(frames: &[u32], calls: Option<&[Vec<usize>]>) -> Option<u32> {
    let Some(calls) = calls else {
        return Some(frames.iter().map(|&f| rounded(f)).sum());
    };
    fn walk(f: usize, frames: &[u32], calls: &[Vec<usize>], depth: usize) -> Option<u32> {
        if depth > frames.len() {
            return None; // a loop
        }
        let mut deepest = 0;
        for &c in calls.get(f).map(Vec::as_slice).unwrap_or_default() {
            deepest = deepest.max(walk(c, frames, calls, depth + 1)?);
        }
        Some(rounded(*frames.get(f)?) + deepest)
    }
    if frames.is_empty() {
        return None;
    }
    walk(0, frames, calls, 0)
}

/// `uname -r` of the running kernel.
pub fn kernel_release() -> String {
    // SAFETY: uname(2) fills the zeroed struct; its fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------
// The statistics of accepted loads, through a seccomp user notification.

/// The statistics log of one `BPF_PROG_LOAD`.
#[derive(Debug, Clone)]
pub struct LoadLog {
    /// The program name the load carried (at most 15 bytes: the kernel's `BPF_OBJ_NAME_LEN`).
    pub name: String,
    pub accepted: bool,
    pub log: String,
    /// For each function of the program (as the load's BTF function records split it, the
    /// verifier's order), the functions it calls or passes as a callback; `None` without
    /// function records.
    pub calls: Option<Vec<Vec<usize>>>,
}

const BPF_PROG_LOAD: u32 = 5;
const BPF_LOG_STATS: u32 = 4;
// Offsets in `union bpf_attr` of the BPF_PROG_LOAD fields read or set (uapi/linux/bpf.h).
const ATTR_INSN_CNT: usize = 4;
const ATTR_INSNS: usize = 8;
const ATTR_LOG_LEVEL: usize = 24;
const ATTR_LOG_SIZE: usize = 28;
const ATTR_LOG_BUF: usize = 32;
const ATTR_PROG_NAME: usize = 48;
const ATTR_FUNC_INFO_REC_SIZE: usize = 76;
const ATTR_FUNC_INFO: usize = 80;
const ATTR_FUNC_INFO_CNT: usize = 88;
const ATTR_MIN: usize = ATTR_FUNC_INFO_CNT + 4;
/// `BPF_JMP | BPF_CALL` and `BPF_LD | BPF_IMM | BPF_DW`, and the source registers that make
/// them a call of a function of the program and a function's address.
const OP_CALL: u8 = 0x85;
const OP_LD_IMM64: u8 = 0x18;
const PSEUDO_CALL: u8 = 1;
const PSEUDO_FUNC: u8 = 4;
/// Room for the statistics: three lines, the stack line one number per function.
const STATS_LOG_SIZE: usize = 64 * 1024;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
/// Elsewhere the filter matches nothing: loads keep no statistics, and the stack is unknown.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: u32 = 0;

/// Runs `f` on a thread of its own and returns its result with the statistics log of every
/// program it loaded (see the module's documentation). A panic in `f` is resumed here.
pub fn capture_stats<T: Send>(f: impl FnOnce() -> T + Send) -> Result<(T, Vec<LoadLog>)> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = s.spawn(move || {
            let listener = install_filter();
            let ok = listener.is_ok();
            let _ = tx.send(listener);
            ok.then(f)
        });
        let listener = match rx.recv() {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) => {
                let _ = worker.join();
                return Err(e);
            }
            Err(_) => bail!("the loading thread ended before it installed its filter"),
        };
        let mut logs = Vec::new();
        while !worker.is_finished() {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one valid descriptor.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n > 0 && pfd.revents & libc::POLLIN != 0 {
                if let Some(log) = answer_one(&listener) {
                    logs.push(log);
                }
            } else if n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                // The filtered thread is gone.
                break;
            }
        }
        match worker.join() {
            Ok(Some(v)) => Ok((v, logs)),
            Ok(None) => unreachable!("the filter was installed"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Installs, on the calling thread only, the filter that turns its `bpf(BPF_PROG_LOAD)` calls
/// into user notifications; returns the listener.
fn install_filter() -> Result<OwnedFd> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: 0,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low word on little-endian).
    let mut prog = [
        stmt(load, 4),
        jeq(AUDIT_ARCH, 5),
        stmt(load, 0),
        jeq(libc::SYS_bpf as u32, 3),
        stmt(load, 16),
        jeq(BPF_PROG_LOAD, 1),
        stmt(ret, libc::SECCOMP_RET_USER_NOTIF),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    let install = || {
        // SAFETY: seccomp(2) with a valid filter program that outlives the call.
        unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &fprog as *const libc::sock_fprog,
            )
        }
    };
    let mut fd = install();
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
        // Without CAP_SYS_ADMIN a filter needs no_new_privs (this thread's only; it ends
        // with the closure).
        // SAFETY: prctl(2) with constant arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        fd = install();
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("installing the seccomp filter that collects the verifier's statistics");
    }
    // SAFETY: seccomp returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Receives one notification and answers it; the statistics log if it made the load.
fn answer_one(listener: &OwnedFd) -> Option<LoadLog> {
    // SAFETY: zeroed plain C structs, filled or read by the kernel.
    let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    let mut resp: libc::seccomp_notif_resp = unsafe { std::mem::zeroed() };
    // SAFETY: SECCOMP_IOCTL_NOTIF_RECV writes one seccomp_notif.
    if unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut req,
        )
    } != 0
    {
        return None; // interrupted, or the caller is gone
    }
    resp.id = req.id;
    let ptr = req.data.args[1] as *const u8;
    let size = req.data.args[2] as usize;
    let mut result = None;
    if ptr.is_null() || !(ATTR_MIN..=4096).contains(&size) {
        resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
    } else {
        // SAFETY: the caller is a thread of this process, blocked in bpf(2) with `size` bytes
        // of attributes at `ptr`; they stay put until we answer.
        let mut attr = unsafe { std::slice::from_raw_parts(ptr, size) }.to_vec();
        let field =
            |attr: &[u8], at: usize| u32::from_ne_bytes(attr[at..at + 4].try_into().unwrap());
        if field(&attr, ATTR_LOG_LEVEL) != 0 || field(&attr, ATTR_LOG_SIZE) != 0 {
            resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
        } else {
            let mut log = vec![0u8; STATS_LOG_SIZE];
            attr[ATTR_LOG_LEVEL..ATTR_LOG_LEVEL + 4].copy_from_slice(&BPF_LOG_STATS.to_ne_bytes());
            attr[ATTR_LOG_SIZE..ATTR_LOG_SIZE + 4]
                .copy_from_slice(&(STATS_LOG_SIZE as u32).to_ne_bytes());
            attr[ATTR_LOG_BUF..ATTR_LOG_BUF + 8]
                .copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
            // SAFETY: bpf(2) with the caller's own attributes plus a log buffer that outlives
            // the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_LOAD as libc::c_long,
                    attr.as_mut_ptr(),
                    attr.len(),
                )
            };
            if rc >= 0 {
                resp.val = rc;
            } else {
                resp.error = -std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EINVAL);
            }
            let name = &attr[ATTR_PROG_NAME..ATTR_PROG_NAME + 16];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(16)];
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            result = Some((
                rc,
                LoadLog {
                    name: String::from_utf8_lossy(name).into_owned(),
                    accepted: rc >= 0,
                    log: String::from_utf8_lossy(&log[..end]).into_owned(),
                    // SAFETY: as for `attr`: the caller's instructions and function records.
                    calls: unsafe { call_graph(&attr) },
                },
            ));
        }
    }
    // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one seccomp_notif_resp.
    let sent = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &mut resp,
        )
    };
    let (rc, log) = result?;
    if sent != 0 && rc >= 0 {
        // The caller never got the descriptor (it was interrupted): do not leak the program.
        // SAFETY: rc is the descriptor bpf(2) just returned to us.
        drop(unsafe { OwnedFd::from_raw_fd(rc as i32) });
    }
    Some(log)
}

/// The calls between the functions of the program a `BPF_PROG_LOAD` attribute block loads.
///
/// # Safety
/// `attr`'s instruction and function-record pointers must be valid for their counts.
unsafe fn call_graph(attr: &[u8]) -> Option<Vec<Vec<usize>>> {
    let u32_at = |at: usize| u32::from_ne_bytes(attr[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_ne_bytes(attr[at..at + 8].try_into().unwrap());
    let (rec_size, count) = (
        u32_at(ATTR_FUNC_INFO_REC_SIZE) as usize,
        u32_at(ATTR_FUNC_INFO_CNT) as usize,
    );
    let (records, insns) = (
        u64_at(ATTR_FUNC_INFO) as *const u8,
        u64_at(ATTR_INSNS) as *const u8,
    );
    if records.is_null() || insns.is_null() || rec_size < 8 || count == 0 {
        return None;
    }
    // SAFETY: per the caller; a record starts with its function's first instruction (u32).
    let records = unsafe { std::slice::from_raw_parts(records, rec_size * count) };
    let starts: Vec<usize> = records
        .chunks(rec_size)
        .map(|r| u32::from_ne_bytes(r[..4].try_into().unwrap()) as usize)
        .collect();
    // SAFETY: per the caller; an instruction is 8 bytes.
    let insns = unsafe { std::slice::from_raw_parts(insns, u32_at(ATTR_INSN_CNT) as usize * 8) };
    Some(calls_of(insns, &starts))
}

/// For each function (starting at the instruction indices `starts`, ascending), the functions
/// its instructions (`insns`, 8 bytes each) call or take the address of.
pub fn calls_of(insns: &[u8], starts: &[usize]) -> Vec<Vec<usize>> {
    let function_at = |i: usize| starts.iter().rposition(|&s| s <= i);
    let mut calls = vec![Vec::new(); starts.len()];
    for (i, insn) in insns.chunks_exact(8).enumerate() {
        let src = insn[1] >> 4;
        let target = match (insn[0], src) {
            (OP_CALL, PSEUDO_CALL) | (OP_LD_IMM64, PSEUDO_FUNC) => {
                let imm = i32::from_ne_bytes(insn[4..8].try_into().unwrap());
                (i as i64 + 1 + i64::from(imm)) as usize
            }
            _ => continue,
        };
        if let (Some(from), Some(to)) = (function_at(i), starts.iter().position(|&s| s == target)) {
            if !calls[from].contains(&to) {
                calls[from].push(to);
            }
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_statistics_of_an_accepted_load() {
        let log = "verification time 1032211 usec\nstack depth 0+24+8+0\n\
                   processed 177691 insns (limit 1000000) max_states_per_insn 8 total_states 9786 peak_states 2010 mark_read 401\n";
        assert_eq!(
            parse_log(log),
            Stats {
                insns: Some(177691),
                stack: Some(vec![0, 24, 8, 0]),
                reason: None,
            }
        );
        // Without the calls, every frame counts (at least 32 bytes each).
        assert_eq!(deepest_chain(&[0, 24, 8, 0], None), Some(128));
    }

    #[test]
    fn reads_the_reason_of_a_refusal() {
        let log = "; some source line\n12345: (85) call bpf_loop#181\n\
                   BPF program is too large. Processed 1000001 insn\n\
                   verification time 31000000 usec\nstack depth 16+0\n\
                   processed 1000001 insns (limit 1000000) max_states_per_insn 20 total_states 50000 peak_states 9000 mark_read 10\n";
        let s = parse_log(log);
        assert_eq!(s.insns, Some(1_000_001));
        assert_eq!(s.stack, Some(vec![16, 0]));
        assert_eq!(
            s.reason.as_deref(),
            Some("BPF program is too large. Processed 1000001 insn")
        );
        let s = parse_log(
            "combined stack size of 3 calls is 544. Too large\nprocessed 9 insns (limit 1000000)",
        );
        assert_eq!(
            s.reason.as_deref(),
            Some("combined stack size of 3 calls is 544. Too large")
        );
    }

    #[test]
    fn the_deepest_chain_follows_calls_and_callbacks() {
        // main (8) calls 1 (304) and passes 2 (80) to bpf_loop; 1 calls 3 (72); 2 calls 3.
        let frames = [8, 304, 80, 72];
        let calls = vec![vec![1, 2], vec![3], vec![3], vec![]];
        assert_eq!(deepest_chain(&frames, Some(&calls)), Some(32 + 320 + 96));
        assert_eq!(
            deepest_chain(&frames, Some(&[vec![1], vec![0]])),
            None,
            "recursion"
        );
        assert_eq!(deepest_chain(&[], Some(&[])), None);
    }

    #[test]
    fn calls_are_read_from_the_instructions() {
        let insn = |code: u8, src: u8, imm: i32| {
            let mut b = vec![code, src << 4, 0, 0];
            b.extend_from_slice(&imm.to_ne_bytes());
            b
        };
        // 0: call pc+3 (-> 4); 1-2: r1 = func 5 (ld_imm64, two slots); 3: exit;
        // 4: call helper 1 (not a function of the program); 5: exit.
        let mut insns = Vec::new();
        insns.extend(insn(OP_CALL, PSEUDO_CALL, 3));
        insns.extend(insn(OP_LD_IMM64, PSEUDO_FUNC, 3));
        insns.extend(insn(0, 0, 0));
        insns.extend(insn(0x95, 0, 0));
        insns.extend(insn(OP_CALL, 0, 1));
        insns.extend(insn(0x95, 0, 0));
        assert_eq!(
            calls_of(&insns, &[0, 4, 5]),
            vec![vec![1, 2], vec![], vec![]]
        );
    }

    fn record(accepted: bool, insns: u32, stack: u32) -> Record {
        Record {
            kernel: "6.12.111+deb12-amd64".into(),
            program: "http_ingress".into(),
            accepted,
            insns: Some(insns),
            insn_budget: INSN_BUDGET,
            stack: Some(vec![stack]),
            stack_chain: deepest_chain(&[stack], None),
            stack_budget: STACK_BUDGET,
            reason: (!accepted).then(|| "BPF program is too large".into()),
        }
    }

    #[test]
    fn a_record_fails_over_either_budget_or_when_refused() {
        assert_eq!(record(true, 177_691, 200).failure(), None);
        assert!(record(true, 300_000, 200)
            .failure()
            .unwrap()
            .contains("300000 processed"));
        assert!(record(true, 1000, 400)
            .failure()
            .unwrap()
            .contains("chain uses 416 bytes"));
        assert!(record(false, 1_000_001, 0)
            .failure()
            .unwrap()
            .starts_with("refused: BPF program"));
        let mut unknown = record(true, 1, 1);
        unknown.stack_chain = None;
        assert!(unknown
            .failure()
            .unwrap()
            .contains("stack depth is unknown"));
    }
}
