//! Tier 3, the control plane end to end: the real `filterd` in a [`Lab`], driven through its
//! REST API, its policy file, signals and restarts, with real traffic from the client
//! namespace. What an operator relies on: the API needs the token, a stale revision changes
//! nothing, a restart restores the policy and adopts the pinned classifier without a second
//! attachment, SIGHUP with a broken file keeps the policy, `kill -9` keeps enforcing (default)
//! or opens the gate (`--fail-open`), monitor mode blocks nothing and counts everything (by rule
//! and method in `/metrics`), an API connection that never finishes its headers is closed, and a
//! 100k-rule policy switches atomically under traffic. The lifecycle holds for both attach
//! modes: TCX links and netlink tc filters (`--attach netlink`; what `auto` picks before 6.6) —
//! a 405, `kill -9`, a restart that replaces the filter in place (`tc filter show` lists one),
//! `--fail-open`, and a switch between the modes that never leaves both attached.
//!
//! Each test mounts its own bpffs in the lab directory and passes it as `--pin-dir`, so pins
//! outlive a daemon (as `/sys/fs/bpf` does on a host) but not the test.
//!
//! Run: `FILTER_E2E=1 cargo test -p filter-tests --test control_plane -- --test-threads=1`

use std::ffi::CString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};
use filter_common::{PROG_EGRESS, PROG_INGRESS};
use filter_tests::lab::{self, Backend, Daemon, Lab};
use filter_userspace::{dataplane, tc_netlink};
use serde_json::{json, Value};

const POLICY: &str = r#"
[[rules]]
path = "/admin"
methods = ["GET"]

[[rules]]
path = "/api/items"
methods = ["GET", "POST"]
"#;

// ---------------------------------------------------------------------------
// Setup

/// A bpffs mounted in the lab directory; unmounted (which drops its pins) on drop.
struct BpfMount(PathBuf);

impl BpfMount {
    fn new(dir: &Path) -> BpfMount {
        std::fs::create_dir_all(dir).unwrap();
        let c = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mount(2) with NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting bpffs at {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        BpfMount(dir.to_owned())
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let c = CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2(2) of the mount made above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Fields drop in declaration order: daemon, traffic, backend, pins, lab.
struct Env {
    daemon: Option<Daemon>,
    backend: Backend,
    pins: BpfMount,
    policy: PathBuf,
    lab: Lab,
}

fn env(test: &str, policy: &str, extra: &[&str]) -> Option<Env> {
    if !lab::e2e_enabled(test) {
        return None;
    }
    let fail = |what: &str, e: anyhow::Error| -> ! { panic!("{test}: {what}: {e:#}") };
    lab::check_prerequisites()
        .unwrap_or_else(|e| fail("FILTER_E2E=1 but a prerequisite is missing", e));
    lab::install_ctrlc_cleanup().unwrap_or_else(|e| fail("installing Ctrl-C cleanup", e));
    let lab = Lab::new().unwrap_or_else(|e| fail("building the lab", e));
    let backend = lab
        .start_backend(80)
        .unwrap_or_else(|e| fail("starting the backend", e));
    let pins = BpfMount::new(&lab.dir().join("bpf"));
    let policy_file = lab.dir().join("policy.toml");
    std::fs::write(&policy_file, policy).unwrap();
    let mut env = Env {
        daemon: None,
        backend,
        pins,
        policy: policy_file,
        lab,
    };
    env.start(extra);
    Some(env)
}

impl Env {
    fn start(&mut self, extra: &[&str]) {
        let pin = self.pins.0.display().to_string();
        let mut args = vec!["--pin-dir", pin.as_str()];
        args.extend_from_slice(extra);
        let d = self
            .lab
            .start_filterd_with_file(&lab::filterd_binary(), &self.policy, &args)
            .unwrap_or_else(|e| panic!("starting filterd: {e:#}"));
        self.daemon = Some(d);
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("filterd is running")
    }

    fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (code, text) = self
            .daemon()
            .api(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn api_h(&self, method: &str, path: &str, body: Option<&str>, h: &[&str]) -> (u16, Value) {
        let (code, text) = self
            .daemon()
            .api_with_headers(method, path, body, h)
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn auth(&self) -> String {
        format!(
            "Authorization: Bearer {}",
            self.daemon().token().unwrap().expect("a token")
        )
    }

    /// One request with curl from the client namespace: the status, or 0 when no answer came
    /// (a reset, or the classifier reset the backend and nobody answered).
    fn request(&self, addr: IpAddr, method: &str, path: &str) -> u16 {
        let host = match addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let out = self
            .lab
            .client_cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .args(["-X", method, &format!("http://{host}{path}")])
            .stdin(Stdio::null())
            .output()
            .expect("running curl");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    fn v4(&self) -> IpAddr {
        IpAddr::V4(self.lab.server_v4())
    }

    /// Our classifiers on the server interface, asked of the kernel (independent of filterd's
    /// own view): TCX programs (`BPF_PROG_QUERY` from a thread in the server namespace; none
    /// on a kernel without TCX) and netlink filters (`tc filter show`). An ingress and egress
    /// pair counts once; each kind must have as many on egress as on ingress.
    fn attachments(&self) -> Attachments {
        use std::os::fd::AsRawFd as _;
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.lab.server_netns()))
            .expect("opening the server namespace");
        let iface = self.lab.server_iface().to_owned();
        let tcx = std::thread::spawn(move || {
            // SAFETY: setns(2) on this thread only, with an open namespace fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            if !dataplane::tcx_supported(&iface) {
                return 0;
            }
            let (_, progs) = SchedClassifier::query_tcx(&iface, TcAttachType::Ingress)
                .unwrap_or_else(|e| panic!("querying {iface}'s TCX programs: {e}"));
            let (_, egress) = SchedClassifier::query_tcx(&iface, TcAttachType::Egress)
                .unwrap_or_else(|e| panic!("querying {iface}'s TCX egress programs: {e}"));
            // The egress classifier shares the ingress one's lifecycle.
            assert_eq!(
                egress.len(),
                progs.len(),
                "one egress program per ingress program"
            );
            progs.len()
        })
        .join()
        .expect("the query thread");
        let ingress = self.tc_filters("ingress");
        let egress = self.tc_filters("egress");
        assert_eq!(
            ingress.len(),
            egress.len(),
            "one egress filter per ingress filter: {ingress:?} / {egress:?}"
        );
        Attachments {
            tcx,
            netlink: ingress.len(),
        }
    }

    /// `tc filter show dev <server iface> <hook>` in the server namespace: one line per filter
    /// (the per-priority head lines without a handle left out). Every one must be filterd's,
    /// at its place, in direct-action mode.
    fn tc_filters(&self, hook: &str) -> Vec<String> {
        let out = lab::run(self.lab.server_cmd("tc").args([
            "filter",
            "show",
            "dev",
            self.lab.server_iface(),
            hook,
        ]))
        .unwrap_or_else(|e| panic!("tc filter show: {e:#}"));
        let prog = if hook == "ingress" {
            PROG_INGRESS
        } else {
            PROG_EGRESS
        };
        let place = format!(
            "pref {} bpf chain 0 handle {:#x} {prog} direct-action",
            tc_netlink::PRIORITY,
            tc_netlink::HANDLE
        );
        let filters: Vec<String> = out
            .lines()
            .filter(|l| l.contains(" handle "))
            .map(str::to_owned)
            .collect();
        for f in &filters {
            assert!(f.contains(&place), "not filterd's filter ({place}): {f}");
        }
        filters
    }

    /// The program id of the one netlink filter on the server interface's ingress.
    fn netlink_prog_id(&self) -> u32 {
        let filters = self.tc_filters("ingress");
        assert_eq!(filters.len(), 1, "{filters:?}");
        let id = filters[0]
            .split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .and_then(|id| id.parse().ok());
        id.unwrap_or_else(|| panic!("no program id in {}", filters[0]))
    }

    /// What one kept attachment looks like in the mode `--attach auto` picks on this kernel.
    fn one_kept(&self) -> Attachments {
        if self.tcx_supported() {
            Attachments { tcx: 1, netlink: 0 }
        } else {
            Attachments { tcx: 0, netlink: 1 }
        }
    }

    fn tcx_supported(&self) -> bool {
        let iface = self.lab.server_iface().to_owned();
        self.in_server_ns(move || dataplane::tcx_supported(&iface))
            .join()
            .expect("the query thread")
    }

    /// The attach mode the running daemon reports (`tcx` or `netlink`).
    fn attach_mode(&self) -> String {
        let (code, status) = self.api("GET", "/v1/status", None);
        assert_eq!(code, 200, "{status}");
        status["dataplane"]["attach"]
            .as_str()
            .unwrap_or_else(|| panic!("no attach mode in {status}"))
            .to_owned()
    }

    fn counter(&self, name: &str) -> u64 {
        let (code, v) = self.api("GET", "/v1/stats", None);
        assert_eq!(code, 200, "{v}");
        v["counters"][name].as_u64().unwrap_or(0)
    }

    /// Waits (bounded) until `/metrics` has every line of `want`; returns the text.
    fn wait_metrics(&self, want: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (code, text) = self.daemon().api("GET", "/metrics", None).unwrap();
            assert_eq!(code, 200, "{text}");
            let missing: Vec<&&str> = want
                .iter()
                .filter(|w| !text.lines().any(|l| l == **w))
                .collect();
            if missing.is_empty() {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "/metrics lacks {missing:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `f` on a thread inside the server namespace (where the API listens).
    fn in_server_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        use std::os::fd::AsRawFd as _;
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.lab.server_netns()))
            .expect("opening the server namespace");
        std::thread::spawn(move || {
            // SAFETY: setns(2) on this thread only, with an open namespace fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.daemon().log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "filterd never logged {needle:?}; log:\n{}",
                self.daemon().log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Our classifiers on the server interface, by kind (see [`Env::attachments`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attachments {
    tcx: usize,
    netlink: usize,
}

const NONE: Attachments = Attachments { tcx: 0, netlink: 0 };
const ONE_NETLINK: Attachments = Attachments { tcx: 0, netlink: 1 };
const ONE_TCX: Attachments = Attachments { tcx: 1, netlink: 0 };

/// A process in the client namespace sending requests until dropped (killed by PID).
struct Traffic(Child);

impl Traffic {
    /// `curl` in a bounded loop: `rounds` times each of `paths` with `method`, printing
    /// `<code> <path>` per request into `out`.
    fn start(lab: &Lab, method: &str, paths: &[&str], rounds: u32, out: &Path) -> Traffic {
        let host = lab.server_v4();
        let mut script = format!("for i in $(seq 1 {rounds}); do ");
        for p in paths {
            script.push_str(&format!(
                "curl -s -o /dev/null -w '%{{http_code}} {p}\\n' --max-time 2 -X {method} http://{host}{p}; "
            ));
        }
        script.push_str("done");
        let child = lab
            .client_cmd("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the traffic loop");
        Traffic(child)
    }

    fn wait(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the traffic loop did not finish in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines(path: &Path) -> Vec<(u16, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (c, p) = l.split_once(' ')?;
            Some((c.parse().ok()?, p.to_owned()))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// API security

#[test]
fn the_api_needs_the_token() {
    let Some(e) = env("control_plane::the_api_needs_the_token", POLICY, &[]) else {
        return;
    };
    for h in [&[][..], &["Authorization: Bearer wrong"][..]] {
        for (m, p, b) in [
            ("GET", "/v1/rules", None),
            (
                "POST",
                "/v1/rules",
                Some(r#"{"path":"/x","methods":["GET"]}"#),
            ),
            ("GET", "/metrics", None),
        ] {
            let (code, v) = e.api_h(m, p, b, h);
            assert_eq!(code, 401, "{m} {p} with {h:?}: {v}");
        }
    }
    let (code, _) = e.api_h("GET", "/healthz", None, &[]);
    assert_eq!(code, 200, "health needs no token");
    let (code, v) = e.api_h("GET", "/v1/rules", None, &[&e.auth()]);
    assert_eq!((code, v["rules"].as_array().map(Vec::len)), (200, Some(2)));
    assert!(
        e.daemon()
            .api_with_headers(
                "POST",
                "/v1/rules",
                Some(r#"{"path":"/x","methods":["GET"]}"#),
                &[]
            )
            .unwrap()
            .0
            == 401
            && e.api("GET", "/v1/rules", None).1["rules"]
                .as_array()
                .unwrap()
                .len()
                == 2,
        "an unauthenticated write changed nothing"
    );

    // The token file is private.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(e.lab.dir().join("api-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // No token on a non-loopback address is refused before anything is loaded.
    let out = e
        .lab
        .server_cmd(lab::filterd_binary())
        .args([
            "--iface",
            e.lab.server_iface(),
            "--no-auth",
            "--api",
            "10.77.0.2:9406",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--no-auth"), "{err}");
}

#[test]
fn a_stale_revision_changes_nothing() {
    let Some(e) = env(
        "control_plane::a_stale_revision_changes_nothing",
        POLICY,
        &[],
    ) else {
        return;
    };
    let auth = e.auth();
    let (_, v) = e.api("GET", "/v1/rules", None);
    let rev = v["revision"].as_u64().unwrap();
    let if_match = format!("If-Match: \"{rev}\"");
    let ct = "Content-Type: application/json";
    let body = r#"{"path":"/new","methods":["GET"]}"#;
    let (code, v) = e.api_h("POST", "/v1/rules", Some(body), &[&auth, ct, &if_match]);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["revision"].as_u64(), Some(rev + 1));
    // A second writer with the same stale view.
    let other = r#"{"path":"/other","methods":["PUT"]}"#;
    let (code, v) = e.api_h("POST", "/v1/rules", Some(other), &[&auth, ct, &if_match]);
    assert_eq!(code, 412, "{v}");
    let put = format!(r#"{{"revision":{rev},"rules":[]}}"#);
    let (code, v) = e.api_h("PUT", "/v1/rules", Some(&put), &[&auth, ct]);
    assert_eq!(code, 409, "{v}");
    let (_, v) = e.api("GET", "/v1/rules", None);
    let paths: Vec<&str> = v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/admin", "/api/items", "/new"]);
    assert_eq!(v["revision"].as_u64(), Some(rev + 1));
    // And the kernel still enforces the rule set the API reports.
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 405);
    assert!(!e.backend.saw("DELETE", "/admin").unwrap());
}

// ---------------------------------------------------------------------------
// Persistence and lifecycle

#[test]
fn a_restart_restores_the_policy_and_adopts_the_pinned_classifier() {
    let Some(mut e) = env(
        "control_plane::a_restart_restores_the_policy_and_adopts_the_pinned_classifier",
        POLICY,
        &[],
    ) else {
        return;
    };
    let (code, _) = e.api(
        "POST",
        "/v1/rules",
        Some(r#"{"path":"/report","methods":["POST"]}"#),
    );
    assert_eq!(code, 201);
    let (_, before) = e.api("GET", "/v1/policy", None);
    assert!(
        std::fs::read_to_string(&e.policy)
            .unwrap()
            .contains("/report"),
        "persisted"
    );
    let kept = e.one_kept();
    assert_eq!(e.attachments(), kept);

    // A clean stop keeps the classifier (fail-closed): DELETE /admin still never reaches
    // the backend while no daemon runs.
    e.daemon.take().unwrap().stop().unwrap();
    assert_eq!(e.attachments(), kept, "the pinned link outlives the daemon");
    e.request(e.v4(), "DELETE", "/admin");
    e.request(e.v4(), "GET", "/report");
    assert!(
        !e.backend.saw("DELETE", "/admin").unwrap(),
        "enforcing without a daemon"
    );
    assert!(
        !e.backend.saw("GET", "/report").unwrap(),
        "the API-added rule is enforced too"
    );

    e.start(&[]);
    e.wait_log("Adopted");
    let (_, after) = e.api("GET", "/v1/policy", None);
    assert_eq!(after, before, "policy and revision restored exactly");
    assert_eq!(e.attachments(), kept, "adopted, not attached a second time");
    assert_eq!(
        e.request(e.v4(), "DELETE", "/admin"),
        405,
        "the new responder answers"
    );
    assert_eq!(e.request(e.v4(), "GET", "/admin"), 200);
    let (_, status) = e.api("GET", "/v1/status", None);
    assert_eq!(status["fail_mode"], "closed");
    assert_eq!(status["dataplane"]["pinned"], true);
}

#[test]
fn sighup_with_a_broken_file_keeps_the_policy() {
    let Some(e) = env(
        "control_plane::sighup_with_a_broken_file_keeps_the_policy",
        POLICY,
        &[],
    ) else {
        return;
    };
    let (_, before) = e.api("GET", "/v1/policy", None);
    std::fs::write(
        &e.policy,
        "[[rules]]\npath = \"/admin\"\nmethods = [\"GET\"]\n\n[[rules]]\npath = \"admin\"\nmethods = [\"GET\"]\n",
    )
    .unwrap();
    e.daemon().signal(libc::SIGHUP).unwrap();
    e.wait_log("not reloaded");
    assert!(
        e.daemon().log().contains("policy.toml:6:8: rules[1].path"),
        "the log names the place"
    );
    let (_, after) = e.api("GET", "/v1/policy", None);
    assert_eq!(after, before);
    assert_eq!(e.request(e.v4(), "POST", "/api/items"), 200);
    assert_eq!(e.request(e.v4(), "DELETE", "/api/items"), 405);

    // A valid file is taken, and the daemon keeps running.
    std::fs::write(
        &e.policy,
        "[[rules]]\npath = \"/api/items\"\nmethods = [\"DELETE\"]\n",
    )
    .unwrap();
    e.daemon().signal(libc::SIGHUP).unwrap();
    e.wait_log("SIGHUP: policy reloaded");
    let deadline = Instant::now() + Duration::from_secs(5);
    while e.api("GET", "/v1/rules", None).1["rules"]
        .as_array()
        .unwrap()
        .len()
        != 1
    {
        assert!(Instant::now() < deadline, "the valid file was not loaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(e.request(e.v4(), "DELETE", "/api/items"), 200);
    assert_eq!(e.request(e.v4(), "POST", "/api/items"), 405);
}

#[test]
fn an_invalid_file_stops_the_start_with_its_line() {
    if !lab::e2e_enabled("control_plane::an_invalid_file_stops_the_start_with_its_line") {
        return;
    }
    let lab = Lab::new().unwrap();
    let policy = lab.dir().join("bad.toml");
    std::fs::write(&policy, "[[rules]]\npath = \"/a\"\nmethods = [\"FETCH\"]\n").unwrap();
    let err = lab
        .start_filterd_with_file(&lab::filterd_binary(), &policy, &[])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("bad.toml:3:12: rules[0].methods"), "{msg}");
}

/// `kill -9` under allowed traffic: allowed requests keep flowing either way. Fail-closed the
/// classifier keeps enforcing: a refused request is reset (no answer: the responder died with
/// filterd) and never reaches the backend. `--fail-open` on TCX: the link goes with the process
/// and DELETE passes. `--fail-open` on netlink tc: nothing ties a filter to a process, so a
/// crash leaves it enforcing (documented; only a clean exit removes it).
fn kill9_under_traffic(test: &str, extra: &[&str]) {
    let fail_open = extra.contains(&"--fail-open");
    let Some(mut e) = env(test, POLICY, extra) else {
        return;
    };
    let mode = e.attach_mode();
    let kept = if mode == "tcx" { ONE_TCX } else { ONE_NETLINK };
    assert_eq!(e.attachments(), kept, "{mode}");
    let expect_enforcing = !fail_open || mode == "netlink";
    let out = e.lab.dir().join("traffic.txt");
    let traffic = Traffic::start(&e.lab, "GET", &["/admin", "/api/items"], 2000, &out);
    // Traffic is flowing before the kill.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines(&out).len() < 10 {
        assert!(Instant::now() < deadline, "no traffic");
        std::thread::sleep(Duration::from_millis(20));
    }
    e.daemon.as_mut().unwrap().kill9().unwrap();
    let seen = lines(&out).len();
    // Allowed traffic keeps flowing either way.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines(&out).len() < seen + 10 {
        assert!(Instant::now() < deadline, "traffic stopped after kill -9");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(traffic);
    assert!(
        lines(&out).iter().all(|(c, _)| *c == 200),
        "allowed requests were disturbed: {:?}",
        lines(&out)
            .iter()
            .filter(|(c, _)| *c != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    for i in 0..5 {
        let code = e.request(e.v4(), "DELETE", &format!("/admin?try={i}"));
        if expect_enforcing {
            assert_eq!(
                code, 0,
                "{mode}: a refused request without a daemon is reset and nobody answers it"
            );
        }
    }
    let leaked = e
        .backend
        .requests()
        .unwrap()
        .iter()
        .any(|r| r.method == "DELETE");
    if expect_enforcing {
        assert!(
            !leaked,
            "{mode}: a DELETE reached the backend after kill -9"
        );
        assert_eq!(e.attachments(), kept, "{mode}");
    } else {
        assert!(leaked, "fail-open: DELETE should pass once filterd is gone");
        assert_eq!(e.attachments(), NONE, "fail-open: nothing stays attached");
    }
}

#[test]
fn kill9_under_traffic_keeps_enforcing_by_default() {
    kill9_under_traffic(
        "control_plane::kill9_under_traffic_keeps_enforcing_by_default",
        &[],
    );
}

/// On a kernel without TCX, `auto` is netlink: the gate stays closed after a crash.
#[test]
fn kill9_under_traffic_with_fail_open_opens_the_gate() {
    kill9_under_traffic(
        "control_plane::kill9_under_traffic_with_fail_open_opens_the_gate",
        &["--fail-open"],
    );
}

#[test]
fn netlink_kill9_under_traffic_keeps_enforcing() {
    kill9_under_traffic(
        "control_plane::netlink_kill9_under_traffic_keeps_enforcing",
        &["--attach", "netlink"],
    );
}

#[test]
fn netlink_kill9_with_fail_open_leaves_the_filter_enforcing() {
    kill9_under_traffic(
        "control_plane::netlink_kill9_with_fail_open_leaves_the_filter_enforcing",
        &["--attach", "netlink", "--fail-open"],
    );
}

// ---------------------------------------------------------------------------
// Netlink tc (kernels before 6.6, or `--attach netlink`)

/// A policy where `/admin` allows `DELETE` too: after a restart with it, the old program
/// (which refuses it) must be gone.
const POLICY_ADMIN_DELETE: &str = r#"
[[rules]]
path = "/admin"
methods = ["GET", "DELETE"]

[[rules]]
path = "/api/items"
methods = ["GET", "POST"]
"#;

#[test]
fn netlink_filters_answer_405_and_a_restart_replaces_them_in_place() {
    let test = "control_plane::netlink_filters_answer_405_and_a_restart_replaces_them_in_place";
    let Some(mut e) = env(test, POLICY, &["--attach", "netlink"]) else {
        return;
    };
    assert_eq!(e.attach_mode(), "netlink");
    assert_eq!(e.attachments(), ONE_NETLINK);
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 405);
    assert_eq!(e.request(e.v4(), "GET", "/admin"), 200);
    assert!(!e.backend.saw("DELETE", "/admin").unwrap());
    let (_, status) = e.api("GET", "/v1/status", None);
    assert_eq!(status["fail_mode"], "closed");
    assert_eq!(
        status["dataplane"]["pinned"], true,
        "the filters outlive it"
    );
    let first = e.netlink_prog_id();

    // A clean stop leaves the filters (fail-closed): still enforcing without a daemon.
    e.daemon.take().unwrap().stop().unwrap();
    assert_eq!(
        e.attachments(),
        ONE_NETLINK,
        "the filters outlive the daemon"
    );
    assert_eq!(e.netlink_prog_id(), first);
    assert_eq!(
        e.request(e.v4(), "DELETE", "/admin"),
        0,
        "reset, and no responder to answer"
    );
    assert!(
        !e.backend.saw("DELETE", "/admin").unwrap(),
        "enforcing without a daemon"
    );

    // A restart with a new policy: the new program replaces the old one at the same place.
    std::fs::write(&e.policy, POLICY_ADMIN_DELETE).unwrap();
    e.start(&["--attach", "netlink"]);
    e.wait_log("Adopted");
    assert_eq!(
        e.attachments(),
        ONE_NETLINK,
        "replaced in place, not added a second time"
    );
    let second = e.netlink_prog_id();
    assert_ne!(second, first, "the filter runs the new program");
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 200, "the new policy");
    assert!(e.backend.saw("DELETE", "/admin").unwrap());
    assert_eq!(e.request(e.v4(), "DELETE", "/api/items"), 405);
}

#[test]
fn netlink_fail_open_exit_leaves_no_filter() {
    let test = "control_plane::netlink_fail_open_exit_leaves_no_filter";
    let Some(mut e) = env(test, POLICY, &["--attach", "netlink", "--fail-open"]) else {
        return;
    };
    assert_eq!(e.attachments(), ONE_NETLINK);
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 405);
    let (_, status) = e.api("GET", "/v1/status", None);
    assert_eq!(status["fail_mode"], "open");
    assert_eq!(status["dataplane"]["attach"], "netlink");
    assert_eq!(status["dataplane"]["pinned"], false);
    e.daemon.take().unwrap().stop().unwrap();
    assert_eq!(e.attachments(), NONE, "fail-open: nothing stays attached");
    assert_eq!(
        e.request(e.v4(), "DELETE", "/admin"),
        200,
        "the gate is open"
    );
    assert!(e.backend.saw("DELETE", "/admin").unwrap());
}

/// Someone else's tc setup is left alone: a filter at filterd's place, or an `ingress` qdisc
/// where `clsact` goes (it has no egress hook), stops the start with a message that says what
/// to do, and filterd leaves nothing of its own behind.
#[test]
fn netlink_leaves_other_tc_setups_alone() {
    let test = "control_plane::netlink_leaves_other_tc_setups_alone";
    if !lab::e2e_enabled(test) {
        return;
    }
    lab::install_ctrlc_cleanup().unwrap();
    let lab = Lab::new().unwrap();
    let iface = lab.server_iface().to_owned();
    let policy = lab.dir().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let tc = |args: &[&str]| {
        lab::run(lab.server_cmd("tc").args(args)).unwrap_or_else(|e| panic!("tc: {e:#}"))
    };
    let show = |hook: &str| tc(&["filter", "show", "dev", &iface, hook]);
    let start = || {
        lab.start_filterd_with_file(&lab::filterd_binary(), &policy, &["--attach", "netlink"])
            .map(|_| ())
            .expect_err("filterd must not start")
    };

    // A classic BPF filter (`ret 0`) at filterd's place on ingress.
    tc(&["qdisc", "add", "dev", &iface, "clsact"]);
    let handle = format!("{:#x}", tc_netlink::HANDLE);
    let pref = tc_netlink::PRIORITY.to_string();
    tc(&[
        "filter",
        "add",
        "dev",
        &iface,
        "ingress",
        "pref",
        &pref,
        "handle",
        &handle,
        "bpf",
        "bytecode",
        "1,6 0 0 0",
    ]);
    let err = start();
    let exited = err
        .downcast_ref::<lab::DaemonExited>()
        .expect("an early exit");
    assert!(
        exited.last.contains("holds the place of filterd's filter")
            && exited
                .last
                .contains(&format!("tc filter del dev {iface} ingress pref {pref}")),
        "{}",
        exited.last
    );
    assert!(
        show("ingress").contains("bytecode '1,6 0 0 0'"),
        "untouched"
    );
    assert!(
        !show("ingress").contains(PROG_INGRESS) && !show("egress").contains(PROG_EGRESS),
        "nothing of filterd's left: {}{}",
        show("ingress"),
        show("egress")
    );

    // An `ingress` qdisc where `clsact` goes.
    tc(&["qdisc", "del", "dev", &iface, "clsact"]);
    tc(&["qdisc", "add", "dev", &iface, "ingress"]);
    let err = start();
    let exited = err
        .downcast_ref::<lab::DaemonExited>()
        .expect("an early exit");
    assert!(
        exited
            .last
            .contains("has an `ingress` qdisc where `clsact` goes"),
        "{}",
        exited.last
    );
    assert_eq!(show("ingress").trim(), "", "nothing attached");
}

/// Switching modes across restarts: each start removes what the earlier run left in the other
/// mode, so the interface never keeps the filter twice, and says so in its log.
#[test]
fn switching_between_tcx_and_netlink_never_keeps_both() {
    let test = "control_plane::switching_between_tcx_and_netlink_never_keeps_both";
    let Some(mut e) = env(test, POLICY, &["--attach", "netlink"]) else {
        return;
    };
    if !e.tcx_supported() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test}: this kernel has no TCX (6.6 and later), so there is nothing to switch to"
        );
        return;
    }
    assert_eq!(e.attachments(), ONE_NETLINK);
    e.daemon.take().unwrap().stop().unwrap();

    e.start(&["--attach", "tcx"]);
    e.wait_log("removed the netlink filter an earlier run left");
    assert_eq!(e.attachments(), ONE_TCX, "the netlink filters are gone");
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 405);
    e.daemon.as_mut().unwrap().kill9().unwrap();
    assert_eq!(e.attachments(), ONE_TCX, "pinned");

    e.start(&["--attach", "netlink"]);
    e.wait_log("detached the TCX link an earlier run pinned");
    assert_eq!(e.attachments(), ONE_NETLINK, "the TCX links are gone");
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 405);
    assert_eq!(e.request(e.v4(), "GET", "/admin"), 200);
    assert!(!e.backend.saw("DELETE", "/admin").unwrap());
}

// ---------------------------------------------------------------------------
// Policy semantics the kernel enforces

/// The kernel object in this filterd predates monitor mode and prefix rules: say so loudly.
fn kernel_lacks_policy_features(e: &Env, test: &str) -> bool {
    let (_, s) = e.api("GET", "/v1/status", None);
    if s["dataplane"]["prefix_rules_supported"] == json!(true) {
        return false;
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test}: this filterd's kernel object has no prefix-rule maps, so it predates monitor mode and prefix rules; rebuild with `cargo xtask build`"
    );
    true
}

#[test]
fn monitor_mode_blocks_nothing_and_counts_everything() {
    let test = "control_plane::monitor_mode_blocks_nothing_and_counts_everything";
    let policy = r#"
[[rules]]
path = "/watched"
methods = ["GET"]
mode = "monitor"

[[rules]]
path = "/admin"
methods = ["GET"]
"#;
    let Some(e) = env(test, policy, &[]) else {
        return;
    };
    if kernel_lacks_policy_features(&e, test) {
        return;
    }
    let before = e.counter("monitored");
    for i in 0..20 {
        assert_eq!(e.request(e.v4(), "DELETE", &format!("/watched?{i}")), 200);
    }
    assert_eq!(
        e.request(e.v4(), "DELETE", "/admin"),
        405,
        "enforce rules still enforce"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while e.counter("monitored") < before + 20 {
        assert!(
            Instant::now() < deadline,
            "monitored = {}",
            e.counter("monitored")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        e.counter("monitored"),
        before + 20,
        "each violation counted once"
    );
    let seen = e
        .backend
        .requests()
        .unwrap()
        .iter()
        .filter(|r| r.method == "DELETE" && r.path.starts_with("/watched"))
        .count();
    assert_eq!(seen, 20, "every monitored request reached the backend");
    let metrics = e.daemon().api("GET", "/metrics", None).unwrap().1;
    assert!(
        metrics.contains(&format!(
            "filterd_packets_total{{reason=\"monitored\"}} {}",
            before + 20
        )),
        "{metrics}"
    );
    // By rule and method: the monitored DELETEs under their monitor rule, the refused one
    // under its enforce rule, nothing under the other outcome.
    let metrics = e.wait_metrics(&[
        r#"filterd_monitor_hits_total{rule="/watched",match="exact",method="DELETE"} 20"#,
        r#"filterd_rejections_total{rule="/admin",match="exact",method="DELETE"} 1"#,
    ]);
    for absent in [
        r#"filterd_rejections_total{rule="/watched""#,
        r#"filterd_monitor_hits_total{rule="/admin""#,
    ] {
        assert!(!metrics.contains(absent), "{absent}\n{metrics}");
    }
    let (_, stats) = e.api("GET", "/v1/stats", None);
    assert!(
        stats["by_rule"]
            .as_array()
            .unwrap()
            .contains(&json!({"rule": "/watched", "match": "exact", "method": "DELETE", "outcome": "monitored", "count": 20})),
        "{stats}"
    );
}

#[test]
fn dry_run_blocks_nothing() {
    let test = "control_plane::dry_run_blocks_nothing";
    let Some(e) = env(test, POLICY, &["--dry-run"]) else {
        return;
    };
    if kernel_lacks_policy_features(&e, test) {
        return;
    }
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 200);
    assert!(e.backend.saw("DELETE", "/admin").unwrap());
    assert_eq!(
        e.api("GET", "/v1/status", None).1["dataplane"]["dry_run"],
        true
    );
    // A dry run counts what the policy would have refused, by rule and method.
    e.wait_metrics(&[
        r#"filterd_monitor_hits_total{rule="/admin",match="exact",method="DELETE"} 1"#,
        "filterd_dry_run 1",
    ]);
}

#[test]
fn prefix_rules_exact_beats_prefix_and_longest_prefix_wins() {
    let test = "control_plane::prefix_rules_exact_beats_prefix_and_longest_prefix_wins";
    let policy = r#"
[[rules]]
path = "/api/"
match = "prefix"
methods = ["GET"]

[[rules]]
path = "/api/admin/"
match = "prefix"
methods = ["DELETE"]

[[rules]]
path = "/api/upload"
methods = ["PUT"]
"#;
    let Some(e) = env(test, POLICY, &[]) else {
        return;
    };
    if kernel_lacks_policy_features(&e, test) {
        return;
    }
    std::fs::write(&e.policy, policy).unwrap();
    e.daemon().signal(libc::SIGHUP).unwrap();
    e.wait_log("SIGHUP: policy reloaded");
    for (m, p, want) in [
        ("GET", "/api/x/y", 200),
        ("POST", "/api/x", 405),
        ("DELETE", "/api/admin/users", 200),
        ("GET", "/api/admin/users", 405),
        ("PUT", "/api/upload", 200),
        ("GET", "/api/upload", 405),
        ("GET", "/apix", 200),
        ("DELETE", "/other", 200),
    ] {
        assert_eq!(e.request(e.v4(), m, p), want, "{m} {p}");
    }
    // Each 405 is counted under the rule that refused it.
    e.wait_metrics(&[
        r#"filterd_rejections_total{rule="/api/",match="prefix",method="POST"} 1"#,
        r#"filterd_rejections_total{rule="/api/admin/",match="prefix",method="GET"} 1"#,
        r#"filterd_rejections_total{rule="/api/upload",match="exact",method="GET"} 1"#,
    ]);
}

#[test]
fn rejections_without_a_rule_count_under_the_default() {
    let test = "control_plane::rejections_without_a_rule_count_under_the_default";
    let policy = r#"
default = ["GET"]

[[rules]]
path = "/admin"
methods = ["GET"]
"#;
    let Some(e) = env(test, policy, &[]) else {
        return;
    };
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 405);
    assert_eq!(e.request(e.v4(), "DELETE", "/elsewhere"), 405);
    assert_eq!(e.request(e.v4(), "DELETE", "/elsewhere/too"), 405);
    assert_eq!(e.request(e.v4(), "GET", "/elsewhere"), 200);
    e.wait_metrics(&[
        r#"filterd_rejections_total{rule="/admin",match="exact",method="DELETE"} 1"#,
        r#"filterd_rejections_total{rule="(default)",match="none",method="DELETE"} 2"#,
    ]);
    // filterctl stats prints the same rows after the counters.
    let filterctl = lab::filterd_binary().with_file_name("filterctl");
    let out = e
        .lab
        .server_cmd(&filterctl)
        .arg("--token-file")
        .arg(e.lab.dir().join("api-token"))
        .arg("stats")
        .output()
        .expect("running filterctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    for want in [
        ["/admin", "exact", "DELETE", "rejected", "1"],
        ["(default)", "none", "DELETE", "rejected", "2"],
    ] {
        assert!(rows.iter().any(|r| r == &want), "{want:?} in\n{text}");
    }
}

// ---------------------------------------------------------------------------
// API connections

#[test]
fn the_api_closes_connections_that_do_not_finish_their_headers() {
    let test = "control_plane::the_api_closes_connections_that_do_not_finish_their_headers";
    const TIMEOUT: Duration = Duration::from_secs(2);
    let timeout = TIMEOUT.as_secs().to_string();
    let Some(e) = env(test, POLICY, &["--api-header-timeout", &timeout]) else {
        return;
    };
    // Slowloris: a partial request line, then a byte of header now and then, never the end.
    let slow = e.in_server_ns(|| {
        use std::io::{Read as _, Write as _};
        // Before connect: the daemon's clock starts at accept, after this.
        let t0 = Instant::now();
        let mut s = std::net::TcpStream::connect(lab::API_ADDR).expect("connecting to the API");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.write_all(b"GET /v1/status HT").unwrap();
        let trickle = b"TP/1.1\r\nHost: filterd\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut buf = [0u8; 256];
        for byte in trickle.iter().cycle() {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(format!("still open after {:?}", t0.elapsed()));
            }
            match s.read(&mut buf) {
                Ok(0) => return Ok(t0.elapsed()),
                Ok(n) => {
                    return Err(format!(
                        "answered: {:?}",
                        String::from_utf8_lossy(&buf[..n])
                    ))
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Ok(t0.elapsed()),
            }
            if s.write_all(std::slice::from_ref(byte)).is_err() {
                return Ok(t0.elapsed());
            }
        }
        unreachable!("cycle() never ends")
    });
    // Meanwhile, whole requests are served.
    let (code, status) = e.api("GET", "/v1/status", None);
    assert_eq!(code, 200, "{status}");
    let took = slow
        .join()
        .expect("the slow client's thread")
        .unwrap_or_else(|err| panic!("slowloris connection: {err}"));
    assert!(
        took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(4),
        "closed after {took:?}, header timeout {TIMEOUT:?}"
    );
    // And afterwards.
    let (code, status) = e.api("GET", "/v1/status", None);
    assert_eq!(code, 200, "{status}");
}

// ---------------------------------------------------------------------------
// Scale

#[test]
fn a_hundred_thousand_rules_switch_atomically_under_traffic() {
    let test = "control_plane::a_hundred_thousand_rules_switch_atomically_under_traffic";
    const N: usize = 100_000;
    let mut old = String::with_capacity(N * 50);
    for i in 0..N {
        old.push_str(&format!(
            "[[rules]]\npath = \"/r/{i}\"\nmethods = [\"GET\"]\n"
        ));
    }
    let Some(e) = env(test, &old, &[]) else {
        return;
    };
    // The new set allows DELETE everywhere. Written in path order, /r/0 is among the first
    // entries and /r/99999 the last: a non-atomic switch would show /r/0 new and /r/99999 old.
    let new = json!({
        "rules": (0..N).map(|i| json!({"path": format!("/r/{i}"), "methods": ["GET", "DELETE"]})).collect::<Vec<_>>()
    })
    .to_string();
    let out = e.lab.dir().join("traffic.txt");
    let traffic = Traffic::start(
        &e.lab,
        "DELETE",
        &["/r/0", "/r/99999", "/r/50000"],
        400,
        &out,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines(&out).len() < 6 {
        assert!(Instant::now() < deadline, "no traffic");
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = e.lab.dir().join("new.json");
    std::fs::write(&body, &new).unwrap();
    let t0 = Instant::now();
    let (code, v) = e.api("PUT", "/v1/rules", Some(&format!("@{}", body.display())));
    let took = t0.elapsed();
    assert_eq!(code, 200, "{v}");
    assert!(
        took < Duration::from_secs(30),
        "applying {N} rules took {took:?}"
    );
    traffic.wait(Duration::from_secs(120));
    let seen = lines(&out);
    assert!(seen.len() > 100, "too little traffic: {}", seen.len());
    // Old verdict 405, new verdict 200; once any request saw the new set, none saw the old.
    let first_new = seen
        .iter()
        .position(|(c, _)| *c == 200)
        .expect("the new set took effect");
    assert!(first_new > 0, "traffic started before the switch");
    let mixed: Vec<_> = seen[first_new..]
        .iter()
        .filter(|(c, _)| *c != 200)
        .collect();
    assert!(
        mixed.is_empty(),
        "after the switch, old verdicts: {mixed:?}"
    );
    assert!(
        seen[..first_new].iter().all(|(c, _)| *c == 405),
        "before: {:?}",
        &seen[..first_new]
    );
    assert_eq!(e.api("GET", "/v1/status", None).1["rules"]["exact"], N);
}

// ---------------------------------------------------------------------------
// Operators' tooling: systemd, the Unix socket, explain, diff, events, audit, sources

/// `filterctl` beside the filterd under test.
fn filterctl_binary() -> PathBuf {
    lab::filterd_binary().with_file_name("filterctl")
}

/// `filterctl --api-socket SOCK --token-file TOKEN ARGS` (the socket needs no namespace).
fn filterctl(sock: &Path, token: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(filterctl_binary())
        .arg("--api-socket")
        .arg(sock)
        .arg("--token-file")
        .arg(token)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running filterctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn recv_notify(s: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = s.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Under systemd: READY=1 only once the classifiers are attached and the API serves, a
/// reload bracketed by RELOADING=1 / READY=1; /readyz asks the kernel and names the hook a
/// deleted filter left bare; JSON logs with one audit line per change naming the Unix
/// socket's uid; filterctl over the socket: status, explain, policy diff, events.
/// `--bpf-log`: the classifiers' own diagnostics reach the daemon's log. A stage missing from
/// the pinned stage table (removed from outside) makes the ingress classifier drop the
/// segment it cannot read, and say so, as a JSON line under the target `filterd::kernel`.
#[test]
fn bpf_log_puts_the_classifiers_cold_path_messages_in_the_log() {
    let test = "control_plane::bpf_log_puts_the_classifiers_cold_path_messages_in_the_log";
    let Some(e) = env(test, POLICY, &["--bpf-log", "--log-format", "json"]) else {
        return;
    };
    let addr = e.lab.server_addrs()[0];
    // A path with an escape (of a byte every backend reads escaped): not plain, so its request
    // goes through the canonicalizing stage (a plain one is read and passed by the entry
    // program alone).
    const ESCAPED: &str = "/api/items%20x";
    assert_eq!(e.request(addr, "GET", "/api/items"), 200);
    assert_eq!(e.request(addr, "GET", ESCAPED), 200);
    assert!(
        !e.daemon().log().contains("filterd::kernel"),
        "kernel messages with nothing wrong:\n{}",
        e.daemon().log()
    );
    // The stage table this load pinned: take the canonicalizing stage out of it.
    let dir = e.pins.0.join("stages");
    let pin = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .next()
        .expect("the stage table is pinned")
        .unwrap()
        .path();
    let map = aya::maps::MapData::from_pin(&pin).expect("opening the pinned stage table");
    let mut stages = aya::maps::ProgramArray::try_from(aya::maps::Map::ProgramArray(map))
        .expect("a program array");
    stages
        .clear_index(&filter_common::stage::INGRESS_CANON)
        .expect("removing a stage");
    // A plain request still passes; the escaped one's segment cannot be read: dropped (curl
    // gives up), and reported.
    assert_eq!(e.request(addr, "GET", "/api/items"), 200);
    assert_eq!(e.request(addr, "GET", ESCAPED), 0);
    e.wait_log("stage_failed: a tail call into a stage failed");
    let line = e
        .daemon()
        .log()
        .lines()
        .find(|l| l.contains("stage_failed: a tail call"))
        .map(str::to_owned)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|err| panic!("{line}: {err}"));
    assert_eq!(v["target"], "filterd::kernel", "{line}");
    assert_eq!(v["level"], "WARN", "{line}");
}

#[test]
fn systemd_readiness_audit_and_filterctl_over_the_socket() {
    let test = "control_plane::systemd_readiness_audit_and_filterctl_over_the_socket";
    if !lab::e2e_enabled(test) {
        return;
    }
    // The notify socket is a file in a directory of our own; the daemon inherits its name.
    let notify_dir =
        std::env::temp_dir().join(format!("filterd-notify-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&notify_dir);
    std::fs::create_dir_all(&notify_dir).unwrap();
    let notify_path = notify_dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // SAFETY: the tier runs with one test thread; nothing else reads the environment now.
    unsafe { std::env::set_var("NOTIFY_SOCKET", &notify_path) };
    let sock_holder = std::env::temp_dir().join(format!("filterd-e2e-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&sock_holder);
    std::fs::create_dir_all(&sock_holder).unwrap();
    let sock = sock_holder.join("api.sock");
    let sock_arg = sock.display().to_string();
    let e = env(
        test,
        POLICY,
        &[
            "--attach",
            "netlink",
            "--log-format",
            "json",
            "--api-socket",
            &sock_arg,
        ],
    );
    unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    let Some(e) = e else { return };
    let ready = recv_notify(&notify);
    assert!(
        ready.starts_with("READY=1\nSTATUS=filtering 80 on "),
        "{ready}"
    );
    // Ready came after the attachment and the API: both are there now.
    assert!(e.daemon().log().contains("classifier attached"));
    let token = e.lab.dir().join("api-token");

    // Every log line is a JSON object.
    for line in e.daemon().log().lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<Value>(line).unwrap_or_else(|err| panic!("{line}: {err}"));
    }

    // filterctl over the Unix socket.
    let (code, out, err) = filterctl(&sock, &token, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("netlink") && out.contains("POLICY"), "{out}");
    let (code, out, err) = filterctl(&sock, &token, &["explain", "DELETE", "/api/items?y"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("canonical  /api/items"), "{out}");
    assert!(
        out.contains("405: rule /api/items (exact) allows GET, HEAD, POST, not DELETE"),
        "{out}"
    );
    // paths = "strict" (the default): a path not in normal form is answered 400.
    let (code, out, err) = filterctl(
        &sock,
        &token,
        &["explain", "DELETE", "/api/%61dmin/../items?y"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("canonical  /api/items"), "{out}");
    assert!(!out.contains("rule "), "{out}");
    assert!(
        out.contains("400: the path is refused: not in normal form"),
        "{out}"
    );
    // A change over the socket: one audit line, naming the peer's uid.
    let (code, _, err) = filterctl(
        &sock,
        &token,
        &["rules", "add", "/beta/", "GET", "--prefix"],
    );
    assert_eq!(code, 0, "{err}");
    let audit: Vec<Value> = e
        .daemon()
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "filterd::audit")
        .collect();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let who = audit[0]["who"].as_str().unwrap_or_default();
    assert!(
        who.starts_with("uid 0 (pid ") && who.ends_with(" on the Unix socket"),
        "{}",
        audit[0]
    );
    assert_eq!(
        (&audit[0]["via"], &audit[0]["change"]),
        (&json!("api"), &json!("upsert"))
    );

    // A diff against the running policy: the daemon answers a dry run, nothing changes.
    let file = e.lab.dir().join("next.toml");
    std::fs::write(
        &file,
        "[[rules]]\npath = \"/admin\"\nmethods = [\"GET\", \"DELETE\"]\n",
    )
    .unwrap();
    let (code, out, err) = filterctl(
        &sock,
        &token,
        &["policy", "diff", "-f", file.to_str().unwrap()],
    );
    assert_eq!(code, 1, "differences: exit 1; {out}{err}");
    assert!(out.contains("~ /admin exact: GET -> GET, DELETE"), "{out}");
    assert!(out.contains("- /api/items exact: GET, POST"), "{out}");
    assert!(out.contains("- /beta/ prefix: GET"), "{out}");
    assert_eq!(
        e.request(e.v4(), "DELETE", "/admin"),
        405,
        "the dry run changed nothing"
    );

    // The live feed: a refusal shows up as it happens.
    let mut feed = std::process::Command::new(filterctl_binary())
        .arg("--api-socket")
        .arg(&sock)
        .arg("--token-file")
        .arg(&token)
        .args(["events", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = feed.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(stdout)
            .lines()
            .next()
            .map(|l| l.unwrap())
    });
    // The subscription is in place once the daemon counts a reader.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !e
        .daemon()
        .api("GET", "/metrics", None)
        .unwrap()
        .1
        .contains("filterd_event_readers 1\n")
    {
        assert!(Instant::now() < deadline, "the feed has no reader");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(e.request(e.v4(), "DELETE", "/admin?feed"), 405);
    let line = reader.join().unwrap().expect("an event line");
    let _ = feed.kill();
    let _ = feed.wait();
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (
            &ev["type"],
            &ev["method"],
            &ev["path"],
            &ev["rule"],
            &ev["answer"],
            &ev["result"]
        ),
        (
            &json!("rejected"),
            &json!("DELETE"),
            &json!("/admin"),
            &json!("/admin"),
            &json!(405),
            &json!("sent")
        ),
        "{line}"
    );
    assert!(
        ev["client"]
            .as_str()
            .unwrap()
            .starts_with(&e.lab.client_v4().to_string()),
        "{line}"
    );

    // Reload: RELOADING=1, then READY=1.
    std::fs::write(&e.policy, POLICY).unwrap();
    e.daemon().signal(libc::SIGHUP).unwrap();
    assert!(recv_notify(&notify).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert!(recv_notify(&notify).starts_with("READY=1\nSTATUS=filtering"));

    // /readyz asks the kernel: without the egress filter the daemon is not ready.
    let ready = |e: &Env| {
        let (code, body) = e
            .daemon()
            .api_with_headers("GET", "/readyz", None, &[])
            .unwrap();
        (
            code,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    assert_eq!(ready(&e).0, 200);
    lab::run(e.lab.server_cmd("tc").args([
        "filter",
        "del",
        "dev",
        e.lab.server_iface(),
        "egress",
        "pref",
        &tc_netlink::PRIORITY.to_string(),
    ]))
    .unwrap();
    let (code, body) = ready(&e);
    assert_eq!(code, 503, "{body}");
    let missing = body["missing"][0].as_str().unwrap();
    assert!(
        missing.starts_with(&format!("{} egress: no filter", e.lab.server_iface())),
        "{body}"
    );
    drop(e);
    let _ = std::fs::remove_dir_all(&notify_dir);
    let _ = std::fs::remove_dir_all(&sock_holder);
}

/// The operator's policy, read-only from a directory laid out as a ConfigMap volume
/// (`..data` swapped to a new version): API writes refused, a new version applied when the
/// watch sees it, a bad one refused with the policy in force kept and the reason in the log
/// and /v1/status.
#[test]
fn a_read_only_policy_directory_is_watched_and_refuses_api_writes() {
    let test = "control_plane::a_read_only_policy_directory_is_watched_and_refuses_api_writes";
    if !lab::e2e_enabled(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("filterd-cm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The kubelet's layout: the key is a symlink through `..data` to a versioned directory.
    let version = |n: u32, text: &str| {
        let v = dir.join(format!("..v{n}"));
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("policy.toml"), text).unwrap();
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..v{n}"), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    version(1, POLICY);
    std::os::unix::fs::symlink("..data/policy.toml", dir.join("policy.toml")).unwrap();
    let d = dir.display().to_string();
    let Some(e) = env(test, "", &["--policy", &d, "--watch-interval", "1"]) else {
        return;
    };
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 405);
    let (code, body) = e.api(
        "POST",
        "/v1/rules",
        Some(r#"{"path":"/x","methods":["GET"]}"#),
    );
    assert_eq!(code, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("read-only"),
        "{body}"
    );
    let (_, st) = e.api("GET", "/v1/status", None);
    assert_eq!(
        (&st["policy"]["source"], &st["policy"]["read_only"]),
        (&json!("directory"), &json!(true))
    );

    // A bad version: refused, the policy in force kept, the reason placed.
    version(2, "[[rules]]\npath = \"/admin\"\nmethods = [\"FETCH\"]\n");
    e.wait_log("policy not reloaded");
    let (_, st) = e.api("GET", "/v1/status", None);
    assert_eq!(st["policy"]["health"]["ok"], false, "{st}");
    assert!(
        st["policy"]["health"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("policy.toml:3:12: rules[0].methods"),
        "{st}"
    );
    assert_eq!(e.request(e.v4(), "DELETE", "/admin"), 405);
    assert_eq!(e.request(e.v4(), "POST", "/api/items"), 200);

    // A good one: applied.
    version(
        3,
        "[[rules]]\npath = \"/admin\"\nmethods = [\"GET\", \"DELETE\"]\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.api("GET", "/v1/status", None).1["policy"]["health"]["ok"] != true
        || e.request(e.v4(), "DELETE", "/admin") != 200
    {
        assert!(
            Instant::now() < deadline,
            "the new version was not applied:\n{}",
            e.daemon().log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, st) = e.api("GET", "/v1/status", None);
    assert!(
        st["last_change"]["who"]
            .as_str()
            .unwrap()
            .starts_with("the watch on "),
        "{st}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("policy.toml"))
            .unwrap()
            .lines()
            .count(),
        3,
        "never written"
    );
    drop(e);
    let _ = std::fs::remove_dir_all(&dir);
}
