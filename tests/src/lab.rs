//! A throwaway two-host network built with iproute2: a client and a server
//! network namespace joined by a veth pair, plus the processes the tests run
//! in it (the recording backend, `filterd`, curl, the strict h11 client).
//!
//! Owns: namespace and veth creation/deletion, the per-lab temp directory, and
//! the lifetime of the processes it starts (each is killed by its own PID).
//! Must not: touch the root namespace's interfaces, kill anything it did not
//! start, or judge HTTP behaviour — assertions belong to the tests.
//!
//! Needs root, `ip`, `sysctl`, `ss`, `curl` and `python3` (with `h11` for [`Lab::h11_request`]).
//!
//! ```text
//!  netns fwl-<pid>-<n>-c              netns fwl-<pid>-<n>-s
//!  fwc<pid>-<n> 10.77.0.1/24  <-veth->  fws<pid>-<n> 10.77.0.2/24
//!               fd77::1/64                           fd77::2/64
//!  (curl, h11_client.py)                (backend.py :80, filterd, API 127.0.0.1:9405)
//! ```

use std::fs::{self, File};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

/// The policy the demo and the tests run with: `/api/items` takes GET and POST, `/admin` is
/// read-only, every other path allows any method.
pub const SAMPLE_POLICY: &str = r#"[[rules]]
path = "/api/items"
methods = ["GET", "POST"]

[[rules]]
path = "/admin"
methods = ["GET"]
"#;
/// `Allow` for `/api/items` and `/admin` under [`SAMPLE_POLICY`] (GET implies HEAD).
pub const ITEMS_ALLOW: &str = "GET, HEAD, POST";
pub const ADMIN_ALLOW: &str = "GET, HEAD";

/// Address the daemon's REST API listens on inside the server namespace.
pub const API_ADDR: &str = "127.0.0.1:9405";
/// Environment variable that enables the privileged tests.
pub const E2E_ENV: &str = "FILTER_E2E";

/// The lab's client and server IPv4 addresses (also those of [`crate::frames`]).
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);

const LINK_TIMEOUT: Duration = Duration::from_secs(5);
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);
/// From filterd's "loaded" line to its `/healthz` answering.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(20);
/// From the start to filterd's "loaded" line: the kernel verifies both classifiers first, which
/// takes seconds, or half a minute and more when it ends in a refusal (the verifier walks up to
/// its limit several times while aya grows the log buffer), longer under emulation.
const DAEMON_LOAD_TIMEOUT: Duration = Duration::from_secs(180);
/// What filterd logs once the kernel has accepted both classifiers.
const LOADED_LINE: &str = "classifiers verified and loaded";
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------
// Process-global registry, so a Ctrl-C handler can undo what is still alive.

#[derive(Default)]
struct Registry {
    netns: Vec<String>,
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    netns: Vec::new(),
    pids: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    // A test that panicked while holding the lock must not stop cleanup.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget<T: PartialEq>(list: &mut Vec<T>, item: &T) {
    list.retain(|x| x != item);
}

/// Kills every process and deletes every namespace and temp dir that any
/// [`Lab`] in this process created and has not cleaned up yet. Safe to call
/// from a signal handler thread and more than once.
pub fn cleanup_all() {
    let Registry { netns, pids, dirs } = std::mem::take(&mut *registry());
    for pid in pids {
        // SAFETY: kill(2) with a PID this module spawned and has not reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    for ns in netns {
        kill_netns_pids(&ns);
        let _ = quiet(Command::new("ip").args(["netns", "del", &ns]));
    }
    for dir in dirs {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Installs a Ctrl-C / SIGTERM handler that runs [`cleanup_all`] and exits
/// with status 130. Only the first call installs; later calls are no-ops.
/// Fails if someone else already installed a `ctrlc` handler.
pub fn install_ctrlc_cleanup() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = ctrlc::set_handler(|| {
            // The handler thread inherits libtest's capture; write to the handle.
            let _ = writeln!(
                std::io::stderr(),
                "lab: interrupted, deleting network namespaces"
            );
            cleanup_all();
            std::process::exit(130);
        })
        .context("installing the Ctrl-C cleanup handler (is another ctrlc handler set?)");
    });
    result
}

// ---------------------------------------------------------------------------
// Gate and paths.

/// Returns true when the privileged tests should run (`FILTER_E2E=1`).
/// Otherwise prints a loud `SKIPPED` line naming `test` and returns false.
pub fn e2e_enabled(test: &str) -> bool {
    if std::env::var(E2E_ENV).as_deref() == Ok("1") {
        return true;
    }
    // Written to the stderr handle, not with eprintln!, so libtest's output
    // capture does not swallow it: a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (set {E2E_ENV}=1 or run cargo xtask test): {test} needs root, network namespaces and a built filterd"
    );
    false
}

/// Checks the tools the lab needs; an error names what is missing.
pub fn check_prerequisites() -> Result<()> {
    check_root()?;
    for (tool, args) in [
        ("ip", &["-V"][..]),
        ("ss", &["-V"][..]),
        ("curl", &["--version"][..]),
        ("python3", &["-c", "import h11"][..]),
    ] {
        let ok = Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ensure!(
            ok,
            "`{tool} {}` failed: install {tool} (python3 needs `pip install h11`)",
            args.join(" ")
        );
    }
    Ok(())
}

/// What the kernel tiers need (loading programs, `BPF_PROG_TEST_RUN`): root, nothing else (they
/// also run inside the kernel matrix's guests, which have no Python packages).
pub fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the lab needs root (eBPF, network namespaces, veth, TC); run `cargo xtask test`"
    );
    Ok(())
}

/// `tests/py/<name>` in this crate.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// The `filterd` binary under test: `$FILTERD_BIN` if set, else
/// `<target dir>/release/filterd` (`$CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn filterd_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("FILTERD_BIN") {
        return PathBuf::from(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir), // join keeps an absolute dir as is
        None => workspace.join("target"),
    };
    target.join("release").join("filterd")
}

// ---------------------------------------------------------------------------
// Command helpers.

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; fails (with its stderr) unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning `{}`", describe(cmd)))?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn quiet(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null()).output()
}

fn netns_cmd(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// SIGKILLs whatever still runs inside `ns` (all of it was started by a lab).
fn kill_netns_pids(ns: &str) {
    let Ok(out) = quiet(Command::new("ip").args(["netns", "pids", ns])) else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<libc::pid_t>().ok())
    {
        // SAFETY: kill(2); the PID lives in a namespace only this lab uses.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn poll_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// The lab.

/// Two network namespaces joined by a veth pair. Dropping it kills what still
/// runs inside, deletes both namespaces (which removes the veth) and its temp dir.
#[derive(Debug)]
pub struct Lab {
    client_ns: String,
    server_ns: String,
    client_iface: String,
    server_iface: String,
    dir: PathBuf,
}

impl Lab {
    /// Builds the network; waits until both IPv6 addresses are usable.
    pub fn new() -> Result<Lab> {
        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        // Interface names are at most 15 bytes: "fwc" + 6 hex digits of the
        // PID (pid_max <= 2^22) + "-" + the counter stays within that up to n=99999.
        let tag = format!("{:x}-{n}", pid & 0xff_ffff);
        let lab = Lab {
            client_ns: format!("fwl-{pid}-{n}-c"),
            server_ns: format!("fwl-{pid}-{n}-s"),
            client_iface: format!("fwc{tag}"),
            server_iface: format!("fws{tag}"),
            dir: std::env::temp_dir().join(format!("fwl-{pid}-{n}")),
        };
        debug_assert!(lab.server_iface.len() <= 15);
        {
            // Register before creating, so an interrupt mid-way still cleans up.
            let mut reg = registry();
            reg.netns.push(lab.client_ns.clone());
            reg.netns.push(lab.server_ns.clone());
            reg.dirs.push(lab.dir.clone());
        }
        fs::create_dir_all(&lab.dir)
            .with_context(|| format!("creating lab temp dir {}", lab.dir.display()))?;
        lab.build().with_context(|| {
            format!(
                "building lab {} / {} (stale namespaces? see `ip netns list`)",
                lab.client_ns, lab.server_ns
            )
        })?;
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        for ns in [&self.client_ns, &self.server_ns] {
            run(Command::new("ip").args(["netns", "add", ns]))?;
        }
        // Created directly inside the namespaces: never visible in the root one.
        run(Command::new("ip").args([
            "link",
            "add",
            &self.client_iface,
            "netns",
            &self.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            &self.server_iface,
            "netns",
            &self.server_ns,
        ]))?;
        for (ns, iface, v4, v6) in [
            (&self.client_ns, &self.client_iface, CLIENT_V4, CLIENT_V6),
            (&self.server_ns, &self.server_iface, SERVER_V4, SERVER_V6),
        ] {
            let ip = |args: &[&str]| run(netns_cmd(ns, "ip").args(args));
            ip(&["link", "set", "lo", "up"])?;
            // No DAD on a two-host link we own: link-local addresses would
            // otherwise stay tentative for ~2 s after the link comes up.
            run(netns_cmd(ns, "sysctl")
                .args(["-qw", &format!("net.ipv6.conf.{iface}.accept_dad=0")]))?;
            ip(&["addr", "add", &format!("{v4}/24"), "dev", iface])?;
            ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                iface,
                "nodad",
            ])?;
            ip(&["link", "set", iface, "up"])?;
        }
        for (ns, iface) in [
            (&self.client_ns, &self.client_iface),
            (&self.server_ns, &self.server_iface),
        ] {
            poll_until(
                LINK_TIMEOUT,
                &format!("{iface} in {ns} to be up with IPv6"),
                || {
                    let link = run(netns_cmd(ns, "ip").args(["-o", "link", "show", iface]))?;
                    let pending = run(netns_cmd(ns, "ip").args([
                        "-6",
                        "-o",
                        "addr",
                        "show",
                        "dev",
                        iface,
                        "tentative",
                    ]))?;
                    let global = run(netns_cmd(ns, "ip")
                        .args(["-6", "-o", "addr", "show", "dev", iface, "scope", "global"]))?;
                    let ready = link.contains("LOWER_UP")
                        && pending.trim().is_empty()
                        && global.contains("fd77::");
                    Ok(ready.then_some(()))
                },
            )?;
        }
        Ok(())
    }

    pub fn client_netns(&self) -> &str {
        &self.client_ns
    }
    pub fn server_netns(&self) -> &str {
        &self.server_ns
    }
    pub fn client_iface(&self) -> &str {
        &self.client_iface
    }
    /// The interface `filterd` attaches to.
    pub fn server_iface(&self) -> &str {
        &self.server_iface
    }
    pub fn client_v4(&self) -> Ipv4Addr {
        CLIENT_V4
    }
    pub fn server_v4(&self) -> Ipv4Addr {
        SERVER_V4
    }
    pub fn client_v6(&self) -> Ipv6Addr {
        CLIENT_V6
    }
    pub fn server_v6(&self) -> Ipv6Addr {
        SERVER_V6
    }
    /// Both server addresses, IPv4 first: loop over this to test both families.
    pub fn server_addrs(&self) -> [IpAddr; 2] {
        [IpAddr::V4(SERVER_V4), IpAddr::V6(SERVER_V6)]
    }
    /// The per-lab temp directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ip netns exec <client ns> program`; add arguments with `.arg(..)`.
    pub fn client_cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_cmd(&self.client_ns, program)
    }
    /// `ip netns exec <server ns> program`; add arguments with `.arg(..)`.
    pub fn server_cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_cmd(&self.server_ns, program)
    }

    /// Established TCP connections with local port `port` in the server
    /// namespace, one `ss` line each (empty when none).
    pub fn server_established(&self, port: u16) -> Result<Vec<String>> {
        let out = run(self.server_cmd("ss").args([
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ]))?;
        Ok(out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Starts `tests/py/backend.py` on `port` (all addresses, dual stack) in the
    /// server namespace and waits until it listens.
    pub fn start_backend(&self, port: u16) -> Result<Backend> {
        let log = self.dir.join(format!("backend-{port}.jsonl"));
        File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stderr_path = self.dir.join(format!("backend-{port}.stderr"));
        let stderr = File::create(&stderr_path)?;
        let child = self
            .server_cmd("python3")
            .arg(py_script("backend.py"))
            .arg("--port")
            .arg(port.to_string())
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("spawning python3 backend.py in the server namespace")?;
        let mut backend = Backend {
            child: Tracked::new(child),
            log,
            port,
        };
        let listening = format!("( sport = :{port} )");
        poll_until(
            BACKEND_TIMEOUT,
            &format!("the backend to listen on :{port}"),
            || {
                if let Some(status) = backend.child.0.try_wait()? {
                    bail!(
                        "backend.py exited early ({status}): {}",
                        fs::read_to_string(&stderr_path).unwrap_or_default().trim()
                    );
                }
                let out = run(self.server_cmd("ss").args(["-Hltn", &listening]))?;
                Ok((!out.trim().is_empty()).then_some(()))
            },
        )?;
        Ok(backend)
    }

    /// Writes `policy_toml` to a file and runs
    /// `binary --iface <server iface> --port 80 --state FILE --api 127.0.0.1:9405
    /// --token-file <lab dir>/token-N <extra_args>` in the server namespace, output to a log
    /// file; waits until `/healthz` answers 200. An early exit or timeout is an error carrying
    /// the log. [`Daemon::api`] sends the token filterd generated.
    pub fn start_filterd(
        &self,
        binary: &Path,
        policy_toml: &str,
        extra_args: &[&str],
    ) -> Result<Daemon> {
        let n = fs::read_dir(&self.dir)?.count();
        let policy = self.dir.join(format!("policy-{n}.toml"));
        fs::write(&policy, policy_toml).with_context(|| format!("writing {}", policy.display()))?;
        self.start_filterd_with_file(binary, &policy, extra_args)
    }

    /// As [`Lab::start_filterd`], with an existing policy file, the daemon's own (`--state`: a
    /// restart reads the file the previous run persisted). A `--policy` or `--state` in
    /// `extra_args` replaces it (then `policy` is not passed); a `--token-file` in `extra_args`
    /// replaces the lab's; with `--no-auth` none is passed.
    pub fn start_filterd_with_file(
        &self,
        binary: &Path,
        policy: &Path,
        extra_args: &[&str],
    ) -> Result<Daemon> {
        ensure!(
            binary.is_file(),
            "filterd binary {} not found: build it with `cargo xtask build` (or set FILTERD_BIN)",
            binary.display()
        );
        let n = fs::read_dir(&self.dir)?.count();
        let log = self.dir.join(format!("filterd-{n}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let token_file = match extra_args.iter().position(|a| *a == "--token-file") {
            Some(i) => extra_args.get(i + 1).map(PathBuf::from),
            None if extra_args.contains(&"--no-auth") => None,
            None => Some(self.dir.join("api-token")),
        };
        let mut cmd = self.server_cmd(binary);
        cmd.args(["--iface", &self.server_iface, "--port", "80"]);
        if !extra_args
            .iter()
            .any(|a| *a == "--policy" || *a == "--state")
        {
            cmd.arg("--state").arg(policy);
        }
        cmd.args(["--api", API_ADDR]);
        if let (Some(t), false) = (&token_file, extra_args.contains(&"--token-file")) {
            cmd.arg("--token-file").arg(t);
        }
        let child = cmd
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {} in the server namespace", binary.display()))?;
        let mut daemon = Daemon {
            child: Some(Tracked::new(child)),
            log,
            server_ns: self.server_ns.clone(),
            token_file,
        };
        // The kernel's verdict first (long), then the API (short); an exit at any point ends
        // the wait with filterd's own last words.
        let exited = |daemon: &mut Daemon| -> Result<()> {
            if let Some(status) = daemon.child.as_mut().unwrap().0.try_wait()? {
                let log = daemon.log();
                return Err(DaemonExited {
                    status,
                    last: last_words(&log),
                    log,
                }
                .into());
            }
            Ok(())
        };
        let loaded = poll_until(
            DAEMON_LOAD_TIMEOUT,
            "filterd to load its classifiers",
            || {
                exited(&mut daemon)?;
                Ok(daemon.log().contains(LOADED_LINE).then_some(()))
            },
        );
        let ready = loaded.and_then(|()| {
            poll_until(DAEMON_TIMEOUT, "filterd's /healthz to answer 200", || {
                exited(&mut daemon)?;
                let code = quiet(self.server_cmd("curl").args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "1",
                    &format!("http://{API_ADDR}/healthz"),
                ]))?;
                Ok((String::from_utf8_lossy(&code.stdout) == "200").then_some(()))
            })
        });
        if let Err(e) = ready {
            // An early exit already carries the log; a timeout does not.
            if e.is::<DaemonExited>() {
                return Err(e);
            }
            bail!("{e:#}; filterd's log so far:\n{}", daemon.log());
        }
        Ok(daemon)
    }

    /// Sends one request with `tests/py/h11_client.py` from the client
    /// namespace and returns what it saw (raw bytes included).
    pub fn h11_request(
        &self,
        host: IpAddr,
        port: u16,
        method: &str,
        target: &str,
        headers: &[&str],
    ) -> Result<H11Reply> {
        let mut cmd = self.client_cmd("python3");
        cmd.arg(py_script("h11_client.py"))
            .args(["--host", &host.to_string(), "--port", &port.to_string()])
            .args(["--method", method, "--target", target]);
        for h in headers {
            cmd.args(["--header", h]);
        }
        let out = run(&mut cmd)?;
        let mut reply: H11Reply = serde_json::from_str(out.trim()).with_context(|| {
            format!("h11_client.py printed something that is not its JSON: {out}")
        })?;
        reply.raw = base64_decode(&reply.raw_b64).context("decoding raw_b64")?;
        Ok(reply)
    }
}

impl Lab {
    /// Writes `parts` on one TCP connection from the client namespace with the kernel's own
    /// TCP stack (`tests/py/raw_client.py`), `delay` apart, and returns every byte the server
    /// sent until it closed, and how it closed (`clean`, `reset`, `timeout`).
    pub fn raw_exchange(
        &self,
        host: IpAddr,
        port: u16,
        delay: Duration,
        parts: &[&[u8]],
    ) -> Result<(Vec<u8>, String)> {
        #[derive(Deserialize)]
        struct Out {
            raw_b64: String,
            eof: String,
        }
        let mut cmd = self.client_cmd("python3");
        cmd.arg(py_script("raw_client.py"))
            .args([host.to_string(), port.to_string()])
            .arg(format!("{}", delay.as_secs_f64()));
        for p in parts {
            cmd.arg(p.iter().map(|b| format!("{b:02x}")).collect::<String>());
        }
        let out = run(&mut cmd)?;
        let o: Out = serde_json::from_str(out.trim()).with_context(|| {
            format!("raw_client.py printed something that is not its JSON: {out}")
        })?;
        Ok((
            base64_decode(&o.raw_b64).context("decoding raw_b64")?,
            o.eof,
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut reg = registry();
        for ns in [&self.client_ns, &self.server_ns] {
            kill_netns_pids(ns);
            let _ = quiet(Command::new("ip").args(["netns", "del", ns]));
            forget(&mut reg.netns, ns);
        }
        let _ = fs::remove_dir_all(&self.dir);
        forget(&mut reg.dirs, &self.dir);
    }
}

// ---------------------------------------------------------------------------
// Processes.

/// A child whose PID is in the registry until it is reaped. Dropping it
/// SIGKILLs and reaps the child (std never signals an already reaped PID).
#[derive(Debug)]
struct Tracked(Child);

impl Tracked {
    fn new(child: Child) -> Tracked {
        registry().pids.push(child.id());
        Tracked(child)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        forget(&mut registry().pids, &self.0.id());
    }
}

/// One request as `backend.py` recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub version: String,
}

/// The recording backend; dropping it kills it (SIGKILL by PID) and reaps it.
#[derive(Debug)]
pub struct Backend {
    child: Tracked,
    log: PathBuf,
    port: u16,
}

impl Backend {
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Every request the backend has answered so far, oldest first. The log is
    /// flushed before each response, so a request whose answer a client has
    /// seen is already in here.
    pub fn requests(&self) -> Result<Vec<Recorded>> {
        let text = fs::read_to_string(&self.log)
            .with_context(|| format!("reading backend log {}", self.log.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("backend log line {l:?}")))
            .collect()
    }
    /// True if the backend recorded a request with this method and path.
    pub fn saw(&self, method: &str, path: &str) -> Result<bool> {
        Ok(self
            .requests()?
            .iter()
            .any(|r| r.method == method && r.path == path))
    }
}

/// `filterd` exited while starting. Its `Display` is the exit status and filterd's last words
/// on the first line, then the whole log (for a test's failure message); a front end that wants
/// only the reason prints [`DaemonExited::last`].
#[derive(Debug)]
pub struct DaemonExited {
    pub status: std::process::ExitStatus,
    /// filterd's last words: its closing error line (`filterd: ...`) and what follows it, else
    /// its last lines.
    pub last: String,
    pub log: String,
}

impl std::fmt::Display for DaemonExited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "filterd exited early ({}): {}", self.status, self.last)?;
        if self.log.trim() != self.last {
            write!(
                f,
                "\n---- filterd's output ----\n{}---- end of filterd's output ----",
                self.log
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for DaemonExited {}

/// The end of filterd's output that says why it stopped: from its last `filterd: ` line (the
/// error it exits with) on, else its last three lines.
pub fn last_words(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    let from = lines
        .iter()
        .rposition(|l| l.starts_with("filterd: "))
        .unwrap_or(lines.len().saturating_sub(3));
    lines[from..].join("\n")
}

/// A running `filterd`. Dropping it sends SIGTERM, waits up to 5 s, then SIGKILL.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Tracked>,
    log: PathBuf,
    server_ns: String,
    /// The API token file filterd was given (`None` with `--no-auth`).
    token_file: Option<PathBuf>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.0.id()).unwrap_or(0)
    }
    /// Everything filterd wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<no log {}: {e}>", self.log.display()))
    }
    /// The API token filterd uses (read from its token file).
    pub fn token(&self) -> Result<Option<String>> {
        self.token_file
            .as_ref()
            .map(|f| {
                fs::read_to_string(f)
                    .map(|t| t.trim().to_owned())
                    .with_context(|| format!("reading filterd's token file {}", f.display()))
            })
            .transpose()
    }
    /// Calls the REST API from inside the server namespace with curl, with
    /// filterd's bearer token. `body`, if any, is sent as `application/json`.
    /// Returns (status, body).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let auth = self.token()?.map(|t| format!("Authorization: Bearer {t}"));
        let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
        self.api_with_headers(method, path, body, &headers)
    }
    /// As [`Daemon::api`], but sends exactly `headers` (`"Name: value"`) and no
    /// token of its own: for auth and `If-Match` tests.
    pub fn api_with_headers(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[&str],
    ) -> Result<(u16, String)> {
        let mut cmd = netns_cmd(&self.server_ns, "curl");
        cmd.args([
            "-sS",
            "--max-time",
            "30",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        cmd.arg(format!("http://{API_ADDR}{path}"));
        let out = run(&mut cmd)?;
        let (text, code) = out
            .rsplit_once('\n')
            .with_context(|| format!("curl output without a status line: {out:?}"))?;
        let code = code
            .trim()
            .parse()
            .with_context(|| format!("curl printed status {code:?} for {method} {path}"))?;
        Ok((code, text.to_owned()))
    }
    /// Sends `signal` (e.g. `libc::SIGHUP`) to filterd.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.pid();
        ensure!(pid != 0, "filterd already stopped");
        // SAFETY: kill(2) on our own unreaped child.
        ensure!(
            unsafe { libc::kill(pid as libc::pid_t, signal) } == 0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
    /// SIGKILLs filterd (no cleanup of its own) and reaps it.
    pub fn kill9(&mut self) -> Result<std::process::ExitStatus> {
        let mut tracked = self.child.take().context("filterd already stopped")?;
        tracked.0.kill()?;
        let status = tracked.0.wait()?;
        Ok(status)
    }
    /// Sends SIGTERM and waits (bounded) for exit; returns the exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        // Dropping `tracked` on any path below SIGKILLs (if still running) and reaps.
        let mut tracked = self.child.take().context("filterd already stopped")?;
        let pid = tracked.0.id();
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
        let status = loop {
            if let Some(s) = tracked.0.try_wait()? {
                break Some(s);
            }
            if Instant::now() >= deadline {
                break None;
            }
            sleep(POLL);
        };
        drop(tracked);
        match status {
            Some(s) => Ok(s),
            None => {
                bail!("filterd (pid {pid}) ignored SIGTERM for {DAEMON_STOP_TIMEOUT:?}; killed it")
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- filterd log ({}) ----\n{}\n---- end of filterd log ----",
                self.log.display(),
                self.log()
            );
        }
        if self.child.is_some() {
            if let Err(e) = self.stop() {
                eprintln!("lab: {e:#}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The strict client's answer.

/// What `h11_client.py` saw. `raw` is `raw_b64` decoded.
#[derive(Debug, Clone, Deserialize)]
pub struct H11Reply {
    pub raw_b64: String,
    #[serde(skip)]
    pub raw: Vec<u8>,
    /// "clean", "reset" or "timeout".
    pub eof: String,
    pub h11_ok: bool,
    pub status: Option<u16>,
    /// `[name, value]`, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub h11_error: Option<String>,
}

impl H11Reply {
    /// Values of every header called `name` (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim().trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        ensure!(chunk.len() > 1, "truncated base64");
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c).with_context(|| format!("bad base64 byte {c:#x}"))? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Segment-level clients (the evasion suite): MACs, a client address no
// interface owns, and a liveness check.

impl Lab {
    /// The MAC address of the client veth, `aa:bb:..` lowercase.
    pub fn client_mac(&self) -> Result<String> {
        iface_mac(&self.client_ns, &self.client_iface)
    }
    /// The MAC address of the server veth, `aa:bb:..` lowercase.
    pub fn server_mac(&self) -> Result<String> {
        iface_mac(&self.server_ns, &self.server_iface)
    }

    /// Adds (or replaces) a permanent neighbour entry in the server namespace:
    /// `addr` lives at `mac` behind `dev`. With it the server can answer a
    /// client address no interface owns (a raw-socket client's), so the client
    /// kernel never sees the connection and never resets it.
    pub fn add_server_neighbour(&self, dev: &str, addr: IpAddr, mac: &str) -> Result<()> {
        run(netns_cmd(&self.server_ns, "ip").args([
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]))?;
        Ok(())
    }
}

fn iface_mac(ns: &str, iface: &str) -> Result<String> {
    let out = run(netns_cmd(ns, "cat").arg(format!("/sys/class/net/{iface}/address")))?;
    let mac = out.trim().to_ascii_lowercase();
    ensure!(mac.len() == 17, "{iface} in {ns}: odd MAC address {mac:?}");
    Ok(mac)
}

impl Daemon {
    /// True while the daemon process has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.0.try_wait(), Ok(None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrips_known_vectors() {
        for (enc, dec) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
            ("SFRUUC8xLjEgNDA1DQo=", "HTTP/1.1 405\r\n"),
        ] {
            assert_eq!(base64_decode(enc).unwrap(), dec.as_bytes(), "{enc}");
        }
        assert!(base64_decode("Zm9v!").is_err());
    }

    #[test]
    fn last_words_are_filterds_closing_error() {
        let log = "2026-12-06T07:42:29Z  WARN no --policy file\nfilterd: the kernel (Linux 6.18.44) refused http_ingress: BPF program is too large. Processed 1000001 insn (Argument list too long (os error 7)); full verifier log: /run/filterd/verifier-http_ingress.log\n";
        assert!(last_words(log).starts_with("filterd: the kernel (Linux 6.18.44) refused"));
        assert!(!last_words(log).contains('\n'));
        assert_eq!(last_words("a\nb\n\nc\nd\n"), "b\nc\nd");
        assert_eq!(last_words(""), "");
    }

    #[test]
    fn filterd_binary_honours_override() {
        // Only reads the env; the default path is <workspace>/target/release/filterd.
        if std::env::var_os("FILTERD_BIN").is_none()
            && std::env::var_os("CARGO_TARGET_DIR").is_none()
        {
            let p = filterd_binary();
            assert!(p.ends_with("target/release/filterd"), "{}", p.display());
        }
    }
}
