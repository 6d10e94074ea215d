//! The processes the benchmarks run inside the lab: nginx (backend and 405 front, each with
//! its own config and prefix in the lab's temp dir), wrk, the flood generator (this binary's
//! `flood` command, [`crate::flood`]), curl, `filterd`; and what they cost in CPU
//! (`/proc/<pid>/stat` utime+stime of a process and its children, `/proc/stat` for the
//! whole machine).
//!
//! Must not: use or touch the system nginx's config, logs, pid file or service; signal any
//! process it did not spawn.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use filter_tests::lab::Lab;
use serde::{Deserialize, Serialize};

use crate::flood::{FloodResult, FloodSpec};

// ---------------------------------------------------------------------------
// Bounded commands.

/// Runs `cmd` with a deadline; its stdout if it exits 0, else an error with its stderr.
pub fn output_bounded(cmd: &mut Command, limit: Duration) -> Result<String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {desc}"))?;
    let (out, err, status, _) = wait_bounded(&mut child, limit)
        .with_context(|| format!("{desc} did not finish within {limit:?}"))?;
    ensure!(status.success(), "{desc} failed ({status}): {}", err.trim());
    Ok(out)
}

/// Waits for `child` up to `limit` (SIGKILL and reap after it), collecting its output and the
/// CPU it used (user + system seconds, from `wait4`'s resource usage).
pub fn wait_bounded(
    child: &mut Child,
    limit: Duration,
) -> Result<(String, String, std::process::ExitStatus, f64)> {
    // Readers on threads, so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let ho = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = so.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let he = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = se.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + limit;
    let pid = child.id() as libc::pid_t;
    let (status, cpu) = loop {
        let mut raw = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // Reaps our own child, by PID, like `try_wait`, and reads what it used.
        let r = unsafe { libc::wait4(pid, &mut raw, libc::WNOHANG, &mut usage) };
        if r == pid {
            use std::os::unix::process::ExitStatusExt as _;
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            break (
                std::process::ExitStatus::from_raw(raw),
                secs(usage.ru_utime) + secs(usage.ru_stime),
            );
        }
        if r < 0 {
            bail!("waiting for {pid}: {}", std::io::Error::last_os_error());
        }
        if Instant::now() >= deadline {
            let _ = child.kill(); // our own child, by PID
            let _ = child.wait();
            bail!("killed after {limit:?}");
        }
        sleep(Duration::from_millis(20));
    };
    Ok((
        ho.join().unwrap_or_default(),
        he.join().unwrap_or_default(),
        status,
        cpu,
    ))
}

/// Per-namespace sysctls for many short connections (only inside the lab's namespaces).
pub fn tune_namespaces(lab: &Lab) -> Result<()> {
    let lim = Duration::from_secs(10);
    output_bounded(
        lab.client_cmd("sysctl").args([
            "-qw",
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ]),
        lim,
    )?;
    output_bounded(
        lab.server_cmd("sysctl").args([
            "-qw",
            "net.core.somaxconn=4096",
            "net.ipv4.tcp_max_syn_backlog=4096",
        ]),
        lim,
    )?;
    Ok(())
}

/// Gives the client's veth a receive thread of its own (GRO with fraglist, threaded NAPI;
/// `on`) and returns its PID, or takes it away (`!on`: the veth's defaults, all three off).
/// Over veth a frame's receive runs in the softirq of whoever sent it, and a kernel without
/// `CONFIG_IRQ_TIME_ACCOUNTING` charges it to that task: without the thread the client's TCP
/// taking each 405 and its FIN counts as `filterd`'s CPU. veth hands a frame to the receiver's
/// NAPI thread only when GRO may take it: the responder's frames (an `AF_PACKET` socket's,
/// `sock_wfree`) with `rx-gro-list` on; the server's TCP segments (segmentation offload on)
/// still run in their sender's softirq.
pub fn client_receive_thread(lab: &Lab, on: bool) -> Result<Option<u32>> {
    let lim = Duration::from_secs(10);
    let iface = lab.client_iface();
    let onoff = if on { "on" } else { "off" };
    let features = |lab: &Lab| {
        output_bounded(
            lab.client_cmd("ethtool")
                .args(["-K", iface, "gro", onoff, "rx-gro-list", onoff]),
            lim,
        )
    };
    // `ip netns exec` mounts the namespace's own sysfs. The thread needs the veth's NAPI,
    // which GRO brings: GRO first on the way on, last on the way off.
    let threaded = |lab: &Lab| {
        output_bounded(
            lab.client_cmd("sh").args([
                "-c",
                &format!("echo {} > /sys/class/net/{iface}/threaded", on as u8),
            ]),
            lim,
        )
    };
    if !on {
        threaded(lab)?;
        features(lab)?;
        return Ok(None);
    }
    features(lab)?;
    threaded(lab)?;
    // The thread is `napi/<iface>-<id>` (a task name is cut at 15 bytes).
    let name = format!("napi/{iface}-");
    let name = &name[..name.len().min(15)];
    let found = fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with(name))
        })
        .collect::<Vec<_>>();
    match found[..] {
        [pid] => Ok(Some(pid)),
        _ => bail!(
            "{} threads named {name}* after enabling threaded NAPI",
            found.len()
        ),
    }
}

/// `curl -i` from the client namespace; the response head (status line and headers).
pub fn curl_head(lab: &Lab, method: &str, url: &str) -> Result<String> {
    let out = output_bounded(
        lab.client_cmd("curl")
            .args(["-sS", "-i", "--max-time", "5", "-X", method, url]),
        Duration::from_secs(10),
    )?;
    Ok(out
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .replace("\r\n", "\n"))
}

// ---------------------------------------------------------------------------
// nginx.

/// Where the allowed load's two sides run: wrk on CPU `client`, the backend's one worker on
/// CPU `backend` (CPUs numbered from 0). Left to the scheduler, two wrk threads and two nginx
/// workers shared the two CPUs differently from run to run, and one arm's throughput, and a
/// round's ratio with it, moved by up to 2x within a run; pinned, an arm moves by a few
/// percent.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Pinning {
    pub client: usize,
    pub backend: usize,
}

impl Pinning {
    /// The first CPU for the client, the last for the backend; `None` on one CPU.
    pub fn of(cpus: usize) -> Option<Pinning> {
        (cpus >= 2).then(|| Pinning {
            client: 0,
            backend: cpus - 1,
        })
    }
}

/// One worker on CPU `cpu`, else two placed by the scheduler.
fn common_conf(dir: &std::path::Path, name: &str, cpu: Option<usize>) -> String {
    let d = dir.display();
    let workers = match cpu {
        // `worker_cpu_affinity` takes a bit mask written as binary digits.
        Some(c) => format!(
            "worker_processes 1;\nworker_cpu_affinity 1{};\n",
            "0".repeat(c)
        ),
        None => "worker_processes 2;\n".to_string(),
    };
    format!(
        "# Written by filter-bench; nothing here refers to the system nginx.\n\
         daemon off;\n\
         master_process on;\n\
         {workers}\
         pid {d}/{name}.pid;\n\
         error_log {d}/{name}-error.log warn;\n\
         events {{ worker_connections 4096; }}\n"
    )
}

fn http_common(dir: &std::path::Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "    access_log off;\n\
         \x20   client_body_temp_path {d}/{name}-tmp/body;\n\
         \x20   proxy_temp_path {d}/{name}-tmp/proxy;\n\
         \x20   fastcgi_temp_path {d}/{name}-tmp/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/{name}-tmp/uwsgi;\n\
         \x20   scgi_temp_path {d}/{name}-tmp/scgi;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   keepalive_timeout 65;\n\
         \x20   default_type text/plain;\n"
    )
}

/// The backend: answers every request with 200 and a 3-byte body. It listens with
/// `deferred` (TCP_DEFER_ACCEPT), as README advises for a backend behind the filter: nginx
/// accepts a connection when its first data arrives, so a connection whose first request the
/// filter refuses (turned into a reset) never reaches nginx at all. One worker on CPU `cpu`,
/// if given ([`Pinning`]).
pub fn backend_conf(port: u16, cpu: Option<usize>) -> impl Fn(&std::path::Path, &str) -> String {
    move |dir, name| {
        format!(
            "{}http {{\n{}    server {{\n        listen {port} deferred backlog=4096;\n        location / {{ return 200 \"ok\\n\"; }}\n    }}\n}}\n",
            common_conf(dir, name, cpu),
            http_common(dir, name)
        )
    }
}

/// The 405 front: the same method check as the filter's policy for /api/items (GET, HEAD,
/// POST), answered by nginx itself with `Allow`, closing every connection after its answer
/// (`keepalive_timeout 0`: the connection shape of `filterd`'s 405 + FIN); allowed methods get
/// the backend's answer.
pub fn front_conf(port: u16) -> impl Fn(&std::path::Path, &str) -> String {
    move |dir, name| {
        let loc = "        location / {\n            if ($request_method !~ ^(GET|HEAD|POST)$) {\n                add_header Allow \"GET, HEAD, POST\" always;\n                return 405;\n            }\n            return 200 \"ok\\n\";\n        }\n";
        format!(
            "{}http {{\n{}    server {{\n        listen {port} backlog=4096;\n        keepalive_timeout 0;\n{loc}    }}\n}}\n",
            common_conf(dir, name, None),
            http_common(dir, name)
        )
    }
}

/// An nginx master started by us in the server namespace. Dropping it sends SIGTERM to the
/// master (which stops its workers), waits, then SIGKILLs it; the lab's own cleanup kills
/// whatever still runs in the namespace.
pub struct Nginx {
    child: Child,
}

impl Nginx {
    pub fn start(
        lab: &Lab,
        name: &str,
        conf: &dyn Fn(&std::path::Path, &str) -> String,
    ) -> Result<Nginx> {
        let dir = lab.dir().join("nginx");
        fs::create_dir_all(dir.join(format!("{name}-tmp")))?;
        let text = conf(&dir, name);
        let path = dir.join(format!("{name}.conf"));
        fs::write(&path, &text)?;
        let errlog = dir.join(format!("{name}-error.log"));
        // Syntax check first, so a bad config fails with nginx's own words.
        output_bounded(
            lab.server_cmd("nginx")
                .arg("-t")
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(&errlog)
                .arg("-c")
                .arg(&path),
            Duration::from_secs(10),
        )
        .with_context(|| format!("nginx -t for {}", path.display()))?;
        let child = lab
            .server_cmd("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(&errlog)
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning nginx in the server namespace")?;
        let mut n = Nginx { child };
        let ports: Vec<u16> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("listen "))
            .filter_map(|l| {
                l.split_whitespace()
                    .next()?
                    .trim_end_matches(';')
                    .parse()
                    .ok()
            })
            .collect();
        let workers = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("worker_processes "))
            .and_then(|n| n.trim_end_matches(';').parse::<usize>().ok())
            .unwrap_or(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        'wait: loop {
            if let Some(s) = n.child.try_wait()? {
                bail!(
                    "nginx {name} exited ({s}): {}",
                    fs::read_to_string(&errlog).unwrap_or_default()
                );
            }
            let mut all = n.workers().len() >= workers;
            for p in &ports {
                let out = output_bounded(
                    lab.server_cmd("ss")
                        .args(["-Hltn", &format!("( sport = :{p} )")]),
                    Duration::from_secs(5),
                )?;
                all &= !out.trim().is_empty();
            }
            if all {
                break 'wait;
            }
            ensure!(
                Instant::now() < deadline,
                "nginx {name} did not listen on {ports:?} in 10 s"
            );
            sleep(Duration::from_millis(50));
        }
        Ok(n)
    }

    pub fn master(&self) -> u32 {
        self.child.id()
    }

    /// The worker PIDs (children of our master).
    pub fn workers(&self) -> Vec<u32> {
        children_of(self.master())
    }

    /// CPU seconds of master + workers.
    pub fn cpu_seconds(&self) -> f64 {
        let mut t = cpu_seconds(self.master());
        for w in self.workers() {
            t += cpu_seconds(w);
        }
        t
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// /proc.

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime+stime ticks) from /proc/<pid>/stat.
fn stat_of(pid: u32) -> Option<(u32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The comm field may hold spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

pub fn cpu_seconds(pid: u32) -> f64 {
    stat_of(pid)
        .map(|(_, t)| t as f64 / clk_tck())
        .unwrap_or(0.0)
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_of(p).is_some_and(|(pp, _)| pp == parent))
        .collect()
}

/// (busy, steal, total) jiffies over all CPUs from /proc/stat.
fn machine_jiffies() -> (u64, u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(l) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let steal = v.get(7).copied().unwrap_or(0);
    (total - idle, steal, total)
}

/// CPU used during a run, in cores (CPU seconds per second of wall time).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct CpuSnapshot {
    pub wall_s: f64,
    pub backend_cores: f64,
    pub front_cores: f64,
    pub filterd_cores: f64,
    /// The client veth's receive thread, where it has one ([`client_receive_thread`]).
    #[serde(default)]
    pub client_rx_cores: f64,
    /// Whole machine, all processes (ours and everyone else's), in cores.
    pub machine_busy_cores: f64,
    pub machine_steal_cores: f64,
    pub loadavg_1m: f64,
}

pub struct CpuRaw {
    at: Instant,
    backend: f64,
    front: f64,
    filterd: f64,
    client_rx: f64,
    machine: (u64, u64, u64),
}

pub fn cpu_now(
    backend: &Nginx,
    front: &Nginx,
    filterd: Option<u32>,
    client_rx: Option<u32>,
) -> CpuRaw {
    CpuRaw {
        at: Instant::now(),
        backend: backend.cpu_seconds(),
        front: front.cpu_seconds(),
        filterd: filterd.map(cpu_seconds).unwrap_or(0.0),
        client_rx: client_rx.map(cpu_seconds).unwrap_or(0.0),
        machine: machine_jiffies(),
    }
}

pub fn cpu_delta(a: &CpuRaw, b: &CpuRaw) -> CpuSnapshot {
    let wall = (b.at - a.at).as_secs_f64().max(1e-6);
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let dt = (b.machine.2.saturating_sub(a.machine.2)) as f64;
    let frac = |x: u64| if dt > 0.0 { x as f64 / dt * ncpu } else { 0.0 };
    CpuSnapshot {
        wall_s: wall,
        backend_cores: (b.backend - a.backend) / wall,
        front_cores: (b.front - a.front) / wall,
        filterd_cores: (b.filterd - a.filterd) / wall,
        client_rx_cores: (b.client_rx - a.client_rx) / wall,
        machine_busy_cores: frac(b.machine.0.saturating_sub(a.machine.0)),
        machine_steal_cores: frac(b.machine.1.saturating_sub(a.machine.1)),
        loadavg_1m: fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0),
    }
}

// ---------------------------------------------------------------------------
// wrk.

#[derive(Clone, Debug)]
pub struct WrkSpec {
    pub method: String,
    pub url: String,
    pub threads: u32,
    pub connections: u32,
    pub seconds: u64,
    /// The CPU wrk runs on (`None`: any).
    pub cpu: Option<usize>,
}

/// What one wrk run reported (its Lua `done()` prints this as one JSON line).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct WrkResult {
    pub method: String,
    pub url: String,
    pub threads: u32,
    pub connections: u32,
    pub duration_us: u64,
    /// Complete responses, any status.
    pub requests: u64,
    pub bytes: u64,
    /// Responses that were not 2xx/3xx (405s in the rejection runs).
    pub non2xx: u64,
    pub err_connect: u64,
    pub err_read: u64,
    pub err_write: u64,
    pub err_timeout: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// CPU seconds (user + system) the wrk process used; softirq work done on its behalf
    /// while another task ran is not in it.
    pub cpu_s: f64,
}

impl WrkResult {
    pub fn seconds(&self) -> f64 {
        (self.duration_us as f64 / 1e6).max(1e-6)
    }
    /// Responses per second, any status.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds()
    }
    /// Non-2xx responses per second (405s in the rejection runs).
    pub fn non2xx_rps(&self) -> f64 {
        self.non2xx as f64 / self.seconds()
    }
    /// CPUs the load generator itself kept busy.
    pub fn cores(&self) -> f64 {
        self.cpu_s / self.seconds()
    }
    pub fn socket_errors(&self) -> u64 {
        self.err_connect + self.err_read + self.err_write + self.err_timeout
    }
}

const WRK_LUA_DONE: &str = r#"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"non2xx":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.duration, summary.requests, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"#;

fn spawn_wrk(lab: &Lab, spec: &WrkSpec, tag: &str) -> Result<Child> {
    let script = lab.dir().join(format!("wrk-{tag}-{}.lua", spec.method));
    fs::write(
        &script,
        format!(
            "-- written by filter-bench\nwrk.method = \"{}\"\n{WRK_LUA_DONE}",
            spec.method
        ),
    )?;
    let mut cmd = match spec.cpu {
        Some(cpu) => {
            let mut c = lab.client_cmd("taskset");
            c.args(["-c", &cpu.to_string(), "wrk"]);
            c
        }
        None => lab.client_cmd("wrk"),
    };
    cmd.arg(format!("-t{}", spec.threads))
        .arg(format!("-c{}", spec.connections))
        .arg(format!("-d{}s", spec.seconds))
        .args(["--latency", "--timeout", "2s", "-s"])
        .arg(&script)
        .arg(&spec.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning wrk in the client namespace (apt-get install wrk)")
}

fn parse_wrk(spec: &WrkSpec, out: &str, err: &str) -> Result<WrkResult> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_JSON "))
        .with_context(|| format!("wrk printed no BENCH_JSON line:\n{out}\n{err}"))?;
    let mut r: WrkResult =
        serde_json::from_str(line).with_context(|| format!("wrk's JSON line: {line}"))?;
    r.method = spec.method.clone();
    r.url = spec.url.clone();
    r.threads = spec.threads;
    r.connections = spec.connections;
    Ok(r)
}

/// Runs wrk as `main` (and the flood generator at the same time, if given), each bounded to
/// its duration + 20 s.
pub fn run_load(
    lab: &Lab,
    main: &WrkSpec,
    flood: Option<&FloodSpec>,
) -> Result<(WrkResult, Option<FloodResult>)> {
    let mut a = spawn_wrk(lab, main, "main")?;
    let mut b = match flood {
        Some(f) => Some(crate::flood::spawn(lab, f)?),
        None => None,
    };
    let limit = Duration::from_secs(main.seconds.max(flood.map_or(0, |f| f.seconds)) + 20);
    let ra = wait_bounded(&mut a, limit);
    let rb = b.as_mut().map(|c| wait_bounded(c, limit));
    let (oa, ea, sa, ca) = ra.context("wrk")?;
    ensure!(sa.success(), "wrk failed ({sa}): {}", ea.trim());
    let mut wa = parse_wrk(main, &oa, &ea)?;
    wa.cpu_s = ca;
    let fb = match rb {
        Some(r) => {
            let (ob, eb, sb, cb) = r.context("the flood generator")?;
            ensure!(
                sb.success(),
                "the flood generator failed ({sb}): {}",
                eb.trim()
            );
            let mut fb = crate::flood::parse(&ob, &eb)?;
            fb.cpu_s = cb;
            Some(fb)
        }
        None => None,
    };
    Ok((wa, fb))
}

// ---------------------------------------------------------------------------
// filterd.

/// `filterd` run by the bench in the server namespace. The bench starts it itself rather than
/// through `Lab::start_filterd` so that it can wait as long as a slow verifier needs, with its
/// own pin directory and fail-open. Dropping it stops it (SIGTERM, then SIGKILL by PID).
pub struct Filterd {
    child: Option<Child>,
    pub log: PathBuf,
    server_ns_api: String,
}

/// Address of the API inside the server namespace.
pub const API: &str = "127.0.0.1:9405";

impl Filterd {
    pub fn start(
        lab: &Lab,
        bin: &Path,
        policy_toml: &str,
        pin_dir: &Path,
        limit: Duration,
    ) -> Result<Filterd> {
        ensure!(
            bin.is_file(),
            "filterd binary {} not found (cargo xtask build)",
            bin.display()
        );
        let n = fs::read_dir(lab.dir())?.count();
        let policy = lab.dir().join(format!("bench-policy-{n}.toml"));
        fs::write(&policy, policy_toml)?;
        let log = lab.dir().join(format!("bench-filterd-{n}.log"));
        let file = fs::File::create(&log)?;
        let mut cmd = lab.server_cmd(bin);
        cmd.args(["--iface", lab.server_iface(), "--port", "80", "--state"])
            .arg(&policy)
            .args(["--api", API])
            // No token: the API listens only on the namespace's loopback.
            .arg("--no-auth")
            // Fail-open, so that stopping the daemon removes the filter (the `no filter` arms).
            .arg("--fail-open")
            // Our own pins: the default directory is shared by every filterd on the machine.
            .arg("--pin-dir")
            .arg(pin_dir);
        let child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut d = Filterd {
            child: Some(child),
            log,
            server_ns_api: lab.server_netns().to_owned(),
        };
        let t = Instant::now();
        loop {
            if let Some(s) = d.child.as_mut().unwrap().try_wait()? {
                d.child = None;
                bail!(
                    "filterd exited ({s}) after {:.1} s; its log:\n{}",
                    t.elapsed().as_secs_f64(),
                    d.log_text()
                );
            }
            if d.api("GET", "/healthz", None).is_ok_and(|(c, _)| c == 200) {
                return Ok(d);
            }
            if t.elapsed() >= limit {
                bail!(
                    "filterd did not answer /healthz within {limit:?}; its log:\n{}",
                    d.log_text()
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn log_text(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// curl to the API from the server namespace; `body` is a file sent as JSON.
    /// Returns (status, curl's time_total in s).
    pub fn api_file(&self, method: &str, path: &str, body: &Path) -> Result<(u16, f64)> {
        let out = output_bounded(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.server_ns_api,
                    "curl",
                    "-sS",
                    "--max-time",
                    "300",
                ])
                .args([
                    "-X",
                    method,
                    "-H",
                    "Content-Type: application/json",
                    "--data-binary",
                ])
                .arg(format!("@{}", body.display()))
                .args(["-o", "/dev/null", "-w", "%{http_code} %{time_total}"])
                .arg(format!("http://{API}{path}")),
            Duration::from_secs(320),
        )?;
        let mut it = out.split_whitespace();
        Ok((
            it.next().and_then(|c| c.parse().ok()).unwrap_or(0),
            it.next().and_then(|c| c.parse().ok()).unwrap_or(f64::NAN),
        ))
    }

    /// curl to the API from the server namespace. Returns (status, body).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.server_ns_api,
            "curl",
            "-sS",
            "--max-time",
            "10",
        ])
        .args(["-X", method, "-w", "\n%{http_code}"]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        cmd.arg(format!("http://{API}{path}"));
        let out = output_bounded(&mut cmd, Duration::from_secs(15))?;
        let (text, code) = out.rsplit_once('\n').context("curl printed no status")?;
        Ok((code.trim().parse().unwrap_or(0), text.to_owned()))
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("filterd ignored SIGTERM for 10 s; killed it")
    }
}

impl Drop for Filterd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("bench: {e:#}");
        }
    }
}

/// Removes terminal colour sequences (`ESC [ ... m`) from a log.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
