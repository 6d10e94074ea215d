//! Running commands in another kernel: QEMU (TCG: KVM aborts on these machines) started by
//! virtme-ng with the host's root file system read-only and `/tmp` writable, no network
//! device. `cargo xtask vm` runs one command; the kernel matrix of `cargo xtask test` runs
//! the test binaries with it.
//!
//! How a command's results come back: this virtme-ng starts the guest's command on the serial
//! console (no udev on these hosts, so it finds none of its virtio-serial ports), where it
//! neither separates the command's output from the kernel's nor returns its exit status. So
//! the command runs from a script in a run directory under `/tmp`
//! (`/tmp/filterd-vm-<pid>-<n>/`): it touches `booted`, then runs each step with its output in
//! `<i>.out` (and `<i>.err`) and writes the exit status to `<i>.rc`. The host streams the
//! output files while the guest runs, times each step by when its files appear, and keeps
//! the console (kernel log) in `console.log` for when the guest fails.
//!
//! Owns: the run directory and the `vng` process group it starts (killed, by its id, at the
//! deadline). Must not: give the guest a network device or write access to anything but `/tmp`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::kernels::{self, Kernel, SERIES};

/// Default deadline of one guest, boot to power-off.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Exit status of `cargo xtask vm` when the guest itself failed (no boot, deadline).
pub const GUEST_FAILED: i32 = 125;

/// A kernel named by `--kernel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelArg {
    /// The running kernel: no VM.
    Host,
    /// A Debian kernel of the matrix (`6.1`, `6.12`).
    Debian(&'static str),
    /// A kernel image (`vmlinuz`); its modules are looked for at `../lib/modules/<release>`.
    Image(PathBuf),
}

/// Parses `--kernel` values: each a comma list of `6.1`, `6.12`, `host`, `all` (= 6.1, 6.12,
/// host) or a path to a kernel image; duplicates are dropped, the order kept.
pub fn parse_kernels(values: &[String]) -> Result<Vec<KernelArg>> {
    let mut out = Vec::new();
    for item in values.iter().flat_map(|v| v.split(',')).map(str::trim) {
        let args = match item {
            "" => continue,
            "all" => SERIES
                .iter()
                .map(|s| KernelArg::Debian(s.label))
                .chain([KernelArg::Host])
                .collect(),
            "host" => vec![KernelArg::Host],
            _ => match SERIES.iter().find(|s| s.label == item) {
                Some(s) => vec![KernelArg::Debian(s.label)],
                None if item.contains('/') || Path::new(item).is_file() => {
                    vec![KernelArg::Image(PathBuf::from(item))]
                }
                None => bail!(
                    "--kernel {item}: expected {}, host, all or the path of a kernel image",
                    SERIES.map(|s| s.label).join(", ")
                ),
            },
        };
        for a in args {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    Ok(out)
}

/// Provision (if needed) a kernel to boot; `None` for the host.
pub fn provision(arg: &KernelArg) -> Result<Option<Kernel>> {
    match arg {
        KernelArg::Host => Ok(None),
        KernelArg::Debian(label) => {
            let series = SERIES.iter().find(|s| s.label == *label).unwrap();
            kernels::ensure_debian(series).map(Some)
        }
        KernelArg::Image(path) => {
            if !path.is_file() {
                bail!("--kernel {}: no such kernel image", path.display());
            }
            let image = path
                .canonicalize()
                .with_context(|| format!("resolving {}", path.display()))?;
            Ok(Some(Kernel {
                label: path.display().to_string(),
                image,
            }))
        }
    }
}

/// One command of a guest run.
pub struct Step {
    pub name: String,
    /// A shell command line.
    pub command: String,
    /// Its stderr goes into the same file as its stdout (kept in order), else to the host's
    /// stderr.
    pub merge_stderr: bool,
}

/// A guest run to make.
pub struct Run<'a> {
    pub kernel: &'a Kernel,
    /// Directory of `vng` and `virtme-run` ([`kernels::ensure_tools`]).
    pub tools: &'a Path,
    /// The guest's working directory (a host path: the guest sees the host's tree).
    pub cwd: &'a Path,
    /// Environment of the steps (the guest's own is almost empty).
    pub env: Vec<(String, String)>,
    pub steps: Vec<Step>,
    pub timeout: Duration,
    /// Print the steps' output as it comes; else it is only kept in the run directory.
    pub stream: bool,
}

/// What happened to one step.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub name: String,
    /// Its exit status; `None` if it never finished.
    pub status: Option<i32>,
    /// From its start (the previous step's end, or the boot) to its end.
    pub seconds: Option<f64>,
}

/// What happened to a guest.
#[derive(Debug)]
pub struct Outcome {
    /// The guest's kernel release (`uname -r`), once it booted.
    pub release: Option<String>,
    /// Seconds from starting `vng` to the guest's script starting.
    pub boot: Option<f64>,
    pub steps: Vec<StepOutcome>,
    /// Seconds from starting `vng` to its exit (or the deadline).
    pub total: f64,
    pub timed_out: bool,
    pub dir: PathBuf,
}

impl Outcome {
    /// The last lines of the guest's console, for a failure report.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the guest's kernel stopped before it started the command, by itself (not
    /// killed at the deadline): a boot that failed before anything of the caller's ran.
    pub fn stopped_before_start(&self) -> bool {
        self.boot.is_none() && !self.timed_out
    }

    /// Why the guest did not run every step to its end, if it did not.
    pub fn failure(&self) -> Option<String> {
        let unfinished = self.steps.iter().find(|s| s.status.is_none())?;
        let what = if self.timed_out {
            format!("the guest was killed at the {:.0} s deadline", self.total)
        } else if self.boot.is_none() {
            "the guest never started its command (no boot?)".to_owned()
        } else {
            "the guest stopped before the command ended (crash or panic?)".to_owned()
        };
        Some(format!(
            "{what}: step `{}` did not finish; console log {}:\n{}",
            unfinished.name,
            self.dir.join("console.log").display(),
            self.console_tail(25)
        ))
    }
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs.
fn script(run: &Run<'_>, dir: &Path) -> String {
    let d = shell_quote(&dir.display().to_string());
    let mut s =
        String::from("#!/bin/sh\n# Written by cargo xtask (xtask/src/vm.rs); run by the guest.\n");
    s += &format!("touch {d}/booted\nuname -r > {d}/release\n");
    for (k, v) in &run.env {
        s += &format!("export {k}={}\n", shell_quote(v));
    }
    s += &format!(
        "cd {} || exit 1\n",
        shell_quote(&run.cwd.display().to_string())
    );
    for (i, step) in run.steps.iter().enumerate() {
        let err = if step.merge_stderr {
            "2>&1".to_owned()
        } else {
            format!("2> {d}/{i}.err")
        };
        s += &format!(
            "( {} ) > {d}/{i}.out {err} < /dev/null\necho $? > {d}/{i}.rc\n",
            step.command
        );
    }
    s
}

/// Copies what was added to `path` since `pos` to `to`.
fn follow(path: &Path, pos: &mut u64, to: &mut dyn Write) {
    let Ok(mut f) = File::open(path) else {
        return;
    };
    if f.seek(SeekFrom::Start(*pos)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
        *pos += buf.len() as u64;
        let _ = to.write_all(&buf);
        let _ = to.flush();
    }
}

static NEXT_RUN: AtomicU32 = AtomicU32::new(0);

/// Boots `run.kernel`, runs the steps, and waits for the guest to power off (or kills it at
/// the deadline). A guest whose kernel dies before it starts the steps is booted once more:
/// under TCG one sometimes does (6.12 enabling a static key while its other CPU runs the
/// patched code, `Oops: int3` in `sched_clock_cpu`: seen once in ten boots on an AMD EPYC
/// host). A second such failure is the outcome.
pub fn run(run: &Run<'_>) -> Result<Outcome> {
    let outcome = boot(run)?;
    if !outcome.stopped_before_start() {
        return Ok(outcome);
    }
    eprintln!(
        "xtask: {}: the guest's kernel died while booting, before anything ran in it; \
         booting it once more. Its console's end:\n{}",
        run.kernel.label,
        outcome.console_tail(12)
    );
    let _ = std::fs::remove_dir_all(&outcome.dir);
    boot(run)
}

/// One boot of [`run`].
fn boot(run: &Run<'_>) -> Result<Outcome> {
    let dir = PathBuf::from(format!(
        "/tmp/filterd-vm-{}-{}",
        std::process::id(),
        NEXT_RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script_path = dir.join("run.sh");
    std::fs::write(&script_path, script(run, &dir))?;
    let console = File::create(dir.join("console.log"))?;

    let path = format!(
        "{}:{}",
        run.tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(run.tools.join("vng"));
    cmd.arg("--verbose") // the kernel's console into console.log
        .arg("--run")
        .arg(&run.kernel.image)
        .args(["--disable-kvm", "--memory", "4G", "--cpus", "2"])
        .args(["--rwdir", "/tmp"])
        .arg("--exec")
        .arg(format!(
            "sh {}",
            shell_quote(&script_path.display().to_string())
        ))
        .current_dir(run.cwd)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        // Its own process group: at the deadline the group (vng, virtme-run, QEMU) is killed.
        .process_group(0);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", run.tools.join("vng").display()))?;
    let pgid = child.id() as i32;

    let mut boot = None;
    let mut ends: Vec<Option<f64>> = vec![None; run.steps.len()];
    let mut current = 0;
    let (mut out_pos, mut err_pos) = (0u64, 0u64);
    let mut timed_out = false;
    let stream = |i: usize, out_pos: &mut u64, err_pos: &mut u64| {
        if run.stream {
            follow(
                &dir.join(format!("{i}.out")),
                out_pos,
                &mut std::io::stdout(),
            );
            follow(
                &dir.join(format!("{i}.err")),
                err_pos,
                &mut std::io::stderr(),
            );
        }
    };
    loop {
        let exited = child.try_wait()?.is_some();
        let now = start.elapsed().as_secs_f64();
        if boot.is_none() && dir.join("booted").exists() {
            boot = Some(now);
        }
        while current < run.steps.len() {
            stream(current, &mut out_pos, &mut err_pos);
            if !dir.join(format!("{current}.rc")).exists() {
                break;
            }
            ends[current] = Some(now);
            current += 1;
            (out_pos, err_pos) = (0, 0);
        }
        if exited {
            break;
        }
        if start.elapsed() > run.timeout {
            // SAFETY: kill(2) on the process group of the child we started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            // QEMU is vng's grandchild: wait (bounded) until the whole group is gone.
            let gone = Instant::now();
            // SAFETY: signal 0 only checks that the group still exists.
            while unsafe { libc::kill(-pgid, 0) } == 0 && gone.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(100));
            }
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let total = start.elapsed().as_secs_f64();
    if current < run.steps.len() {
        stream(current, &mut out_pos, &mut err_pos);
    }

    let steps = run
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let status = std::fs::read_to_string(dir.join(format!("{i}.rc")))
                .ok()
                .and_then(|t| t.trim().parse().ok());
            let began = if i == 0 { boot } else { ends[i - 1] };
            StepOutcome {
                name: s.name.clone(),
                status,
                seconds: ends[i].zip(began).map(|(e, b)| e - b),
            }
        })
        .collect();
    let release = std::fs::read_to_string(dir.join("release"))
        .ok()
        .map(|s| s.trim().to_owned());
    Ok(Outcome {
        release,
        boot,
        steps,
        total,
        timed_out,
        dir,
    })
}

/// The host's environment the guest gets: what the tools and tests read (the guest's own
/// has little more than a minimal `PATH`).
pub fn passed_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            matches!(
                k.as_str(),
                "PATH" | "HOME" | "LANG" | "LC_ALL" | "TERM" | "PYENV_ROOT" | "CARGO_TARGET_DIR"
            ) || k.starts_with("FILTER")
                || k.starts_with("RUST_")
        })
        .collect();
    // Python writes its output into files inside the guest: unbuffered, so it streams.
    env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    env
}

/// `cargo xtask vm --kernel K -- command...`: boots K, runs the command, prints its output,
/// and returns its exit status ([`GUEST_FAILED`] if the guest failed).
pub fn main(kernel: &str, timeout: Duration, command: &[String]) -> Result<i32> {
    if command.is_empty() {
        bail!("no command: cargo xtask vm --kernel 6.1 -- uname -r");
    }
    // One argument is a shell command line (like `vng --exec`); several are a command and its
    // arguments.
    let line = if command.len() == 1 {
        command[0].clone()
    } else {
        command
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let arg = match parse_kernels(&[kernel.to_owned()])?.as_slice() {
        [one] => one.clone(),
        _ => bail!("--kernel names one kernel here"),
    };
    if arg == KernelArg::Host {
        let status = Command::new("sh").args(["-c", &line]).status()?;
        return Ok(status.code().unwrap_or(GUEST_FAILED));
    }
    if !crate::build::is_root() {
        bail!("booting a kernel with virtme-ng needs root here: run it with sudo -E");
    }
    // The tools first: unpacking a kernel runs depmod.
    let tools = kernels::ensure_tools()?;
    let kernel = provision(&arg)?.expect("not the host");
    let cwd = std::env::current_dir()?;
    let outcome = run(&Run {
        kernel: &kernel,
        tools: &tools,
        cwd: &cwd,
        env: passed_env(),
        steps: vec![Step {
            name: line.clone(),
            command: line,
            merge_stderr: false,
        }],
        timeout,
        stream: true,
    })?;
    if let Some(why) = outcome.failure() {
        eprintln!("xtask: {}: {why}", kernel.label);
        return Ok(GUEST_FAILED);
    }
    let step = &outcome.steps[0];
    eprintln!(
        "xtask: {} ({}): exit status {}; boot {:.1} s, command {:.1} s",
        kernel.label,
        outcome.release.as_deref().unwrap_or("?"),
        step.status.unwrap_or(GUEST_FAILED),
        outcome.boot.unwrap_or(0.0),
        step.seconds.unwrap_or(0.0)
    );
    let _ = std::fs::remove_dir_all(&outcome.dir);
    Ok(step.status.unwrap_or(GUEST_FAILED))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kernel_lists_expand_and_deduplicate() {
        assert_eq!(
            parse_kernels(&strings(&["all"])).unwrap(),
            vec![
                KernelArg::Debian("6.1"),
                KernelArg::Debian("6.12"),
                KernelArg::Host
            ]
        );
        assert_eq!(
            parse_kernels(&strings(&["6.12,host", "6.12", "/boot/vmlinuz-x"])).unwrap(),
            vec![
                KernelArg::Debian("6.12"),
                KernelArg::Host,
                KernelArg::Image("/boot/vmlinuz-x".into())
            ]
        );
        assert!(parse_kernels(&strings(&["6.2"])).is_err());
    }

    #[test]
    fn the_script_marks_the_boot_and_each_steps_status() {
        let kernel = Kernel {
            label: "6.1".into(),
            image: "/k/boot/vmlinuz-6.1".into(),
        };
        let run = Run {
            kernel: &kernel,
            tools: Path::new("/t"),
            cwd: Path::new("/work/my tree"),
            env: vec![
                ("FILTER_E2E".into(), "1".into()),
                ("X".into(), "a'b".into()),
            ],
            steps: vec![
                Step {
                    name: "a".into(),
                    command: "./a --x".into(),
                    merge_stderr: true,
                },
                Step {
                    name: "b".into(),
                    command: "echo b".into(),
                    merge_stderr: false,
                },
            ],
            timeout: DEFAULT_TIMEOUT,
            stream: false,
        };
        let s = script(&run, Path::new("/tmp/r"));
        let lines: Vec<&str> = s.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "touch /tmp/r/booted",
                "uname -r > /tmp/r/release",
                "export FILTER_E2E=1",
                r"export X='a'\''b'",
                "cd '/work/my tree' || exit 1",
                "( ./a --x ) > /tmp/r/0.out 2>&1 < /dev/null",
                "echo $? > /tmp/r/0.rc",
                "( echo b ) > /tmp/r/1.out 2> /tmp/r/1.err < /dev/null",
                "echo $? > /tmp/r/1.rc",
            ]
        );
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("./target/x-1"), "./target/x-1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
