//! When the kernel refuses a program: one line that says why, and the whole log kept on disk.
//!
//! The verifier's log runs to megabytes (every state it walked); its verdict is in the last
//! few lines, above the statistics it always ends with. [`last_words`] finds those lines,
//! [`save_log`] writes the whole log where an operator can read it, and [`Refusal`] is the
//! one-line report of both, with the program's name and the kernel it ran on.
//!
//! Must not: interpret the verdict or guess a fix; the line quotes the kernel.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Where the full verifier log goes first; the temporary directory when this is not writable.
pub const LOG_DIR: &str = "/run/filterd";

/// At most this many lines of the verdict are quoted, and at most this many characters.
const MAX_LINES: usize = 3;
const MAX_CHARS: usize = 400;

/// The statistics every log ends with (`BPF_LOG_STATS`), and what libbpf wraps a log in.
fn is_trailer(line: &str) -> bool {
    line.starts_with("verification time ")
        || line.starts_with("stack depth ")
        || (line.starts_with("processed ") && line.contains(" insns (limit "))
        || line.starts_with("-- END PROG LOAD LOG --")
}

/// A line of the verifier's walk rather than its verdict: an instruction with its register
/// state (`5710: (bf) r3 = r7`, `0: R1=ctx() R10=fp0`), a source line (`; ... @ file.rs:19`),
/// a branch it took up (`from 12 to 15: ...`), precision tracking.
fn is_walk(line: &str) -> bool {
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    (digits > 0 && line[digits..].starts_with(':'))
        || line.starts_with(';')
        || line.starts_with("from ")
        || line.starts_with("mark_precise")
        || line.starts_with("last_idx ")
        || line.starts_with("regs=")
        || line.starts_with("parent ")
}

/// The verifier's verdict: the last lines of `log` that are neither its closing statistics nor
/// its walk, in their order, joined by ` / ` (e.g. `BPF program is too large. Processed 1000001
/// insn`, `combined stack size of 3 calls is 576. Too large`). `None` when the log has none:
/// empty, or cut short before the verdict (a log longer than its buffer on a kernel that
/// keeps the head, before 6.4).
pub fn last_words(log: &str) -> Option<String> {
    let mut lines = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .rev()
        .skip_while(|l| is_trailer(l))
        .take_while(|l| !is_walk(l) && !is_trailer(l))
        .take(MAX_LINES)
        .collect::<Vec<_>>();
    if lines.is_empty() {
        return None;
    }
    lines.reverse();
    let mut words = lines.join(" / ");
    if words.len() > MAX_CHARS {
        let mut cut = MAX_CHARS;
        while !words.is_char_boundary(cut) {
            cut -= 1;
        }
        words.truncate(cut);
        words.push('…');
    }
    Some(words)
}

/// `uname -r`: the running kernel's release.
pub fn kernel_release() -> String {
    // SAFETY: uname(2) fills a zeroed struct of fixed-size, NUL-terminated arrays.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `u` is a valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: the kernel NUL-terminates `release` within the array.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

/// Write the whole log to `verifier-<prog>.log` in `dir`, else in [`LOG_DIR`], else in the
/// temporary directory (`$TMPDIR`, `/tmp`): the first that takes it. The file starts with a
/// line naming the program, the kernel and the error. Returns the file, or why none took it.
pub fn save_log(
    dir: Option<&Path>,
    prog: &str,
    headline: &str,
    log: &str,
) -> Result<PathBuf, String> {
    let mut dirs: Vec<PathBuf> = dir.map(Path::to_owned).into_iter().collect();
    if dir.is_none() {
        dirs.push(PathBuf::from(LOG_DIR));
        dirs.push(std::env::temp_dir());
    }
    let mut why = Vec::new();
    for d in dirs {
        let file = d.join(format!("verifier-{prog}.log"));
        let write = || -> io::Result<()> {
            std::fs::create_dir_all(&d)?;
            std::fs::write(&file, format!("# {headline}\n{log}"))
        };
        match write() {
            Ok(()) => return Ok(file),
            Err(e) => why.push(format!("{}: {e}", file.display())),
        }
    }
    Err(why.join("; "))
}

/// A program the kernel refused to load, reported in one line.
#[derive(Debug)]
pub struct Refusal {
    pub prog: &'static str,
    /// `uname -r`.
    pub kernel: String,
    /// What `BPF_PROG_LOAD` returned.
    pub error: io::Error,
    /// [`last_words`] of the log.
    pub verdict: Option<String>,
    /// Where the whole log went, or why it went nowhere.
    pub log_file: Result<PathBuf, String>,
}

impl Refusal {
    /// Summarize `log` and save it (see [`save_log`]).
    pub fn new(prog: &'static str, error: io::Error, log: &str, dir: Option<&Path>) -> Refusal {
        let kernel = kernel_release();
        let headline = format!("{prog} refused by the verifier of Linux {kernel}: {error}");
        Refusal {
            prog,
            log_file: if log.is_empty() {
                Err("the kernel wrote no log".into())
            } else {
                save_log(dir, prog, &headline, log)
            },
            kernel,
            error,
            verdict: last_words(log),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the kernel (Linux {}) refused {}: ",
            self.kernel, self.prog
        )?;
        match &self.verdict {
            Some(v) => write!(f, "{v} ({})", self.error)?,
            None => write!(f, "{} (no verdict in the verifier's log)", self.error)?,
        }
        match &self.log_file {
            Ok(p) => write!(f, "; full verifier log: {}", p.display()),
            Err(why) => write!(f, "; the full verifier log was not saved: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real log tails, captured on Linux 6.18 (the first two from this project's classifiers,
    /// the rest from small programs made to fail).
    const LOGS: &[(&str, &str, Option<&str>)] = &[
        (
            "too_large_ingress",
            include_str!("testdata/verifier/too_large_ingress_6.18.log"),
            Some("BPF program is too large. Processed 1000001 insn"),
        ),
        (
            "too_large_egress",
            include_str!("testdata/verifier/too_large_egress_6.18.log"),
            Some("BPF program is too large. Processed 1000001 insn"),
        ),
        (
            "combined_stack",
            include_str!("testdata/verifier/combined_stack_6.18.log"),
            Some("combined stack size of 3 calls is 576. Too large"),
        ),
        (
            "map_value_range",
            include_str!("testdata/verifier/map_value_range_6.18.log"),
            Some("invalid access to map value, value_size=8 off=15 size=8 / R0 max value is outside of the allowed memory range"),
        ),
        (
            "ctx_access",
            include_str!("testdata/verifier/ctx_access_6.18.log"),
            Some("invalid bpf_context access off=10000 size=8"),
        ),
        (
            "r0_not_read",
            include_str!("testdata/verifier/r0_not_read_6.18.log"),
            Some("R0 !read_ok"),
        ),
        (
            "unreachable",
            include_str!("testdata/verifier/unreachable_6.18.log"),
            Some("unreachable insn 2"),
        ),
    ];

    #[test]
    fn the_verdict_is_found_above_the_statistics() {
        for (name, log, want) in LOGS {
            assert_eq!(last_words(log).as_deref(), *want, "{name}");
        }
    }

    #[test]
    fn a_log_cut_before_its_verdict_has_none() {
        assert_eq!(last_words(""), None);
        // The 6.18 ingress log cut short in the walk (what a kernel before 6.4 keeps when the
        // log outgrows its buffer): no verdict, not an instruction passed off as one.
        let log = LOGS[0].1;
        let cut = &log[..log.find("BPF program is too large").unwrap()];
        assert_eq!(last_words(cut), None);
        // Only statistics.
        assert_eq!(
            last_words("verification time 5 usec\nstack depth 0\nprocessed 0 insns (limit 1000000) max_states_per_insn 0\n"),
            None
        );
    }

    #[test]
    fn the_verdict_is_short_and_on_one_line() {
        let long = format!("{}\nprocessed 1 insns (limit 1000000)\n", "x".repeat(2000));
        let v = last_words(&long).unwrap();
        assert!(
            v.chars().count() <= MAX_CHARS + 1 && !v.contains('\n'),
            "{v}"
        );
        let many = "one\ntwo\nthree\nfour\nfive\nverification time 1 usec\n";
        assert_eq!(last_words(many).unwrap(), "three / four / five");
    }

    #[test]
    fn a_refusal_is_one_line_naming_program_kernel_verdict_and_log() {
        let dir =
            std::env::temp_dir().join(format!("filterd-verifier-test-{}", std::process::id()));
        let log = LOGS[2].1;
        let r = Refusal::new(
            "http_ingress",
            io::Error::from_raw_os_error(libc::EACCES),
            log,
            Some(&dir),
        );
        let line = r.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("http_ingress"), "{line}");
        assert!(
            line.contains(&format!("Linux {}", kernel_release())),
            "{line}"
        );
        assert!(
            line.contains("combined stack size of 3 calls is 576. Too large"),
            "{line}"
        );
        let file = dir.join("verifier-http_ingress.log");
        assert!(
            line.ends_with(&format!("full verifier log: {}", file.display())),
            "{line}"
        );
        let saved = std::fs::read_to_string(&file).unwrap();
        assert!(saved.starts_with("# http_ingress refused by the verifier of Linux "));
        assert!(saved.ends_with(log));
        std::fs::remove_dir_all(&dir).unwrap();

        let r = Refusal::new(
            "http_egress",
            io::Error::from_raw_os_error(libc::EINVAL),
            "",
            None,
        );
        assert!(
            r.to_string().ends_with("(no verdict in the verifier's log); the full verifier log was not saved: the kernel wrote no log"),
            "{r}"
        );
    }
}
