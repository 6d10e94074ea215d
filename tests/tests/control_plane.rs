//! Tier 3, the control plane end to end: the real `filterd` in a [`Lab`], driven through its
//! REST API, its policy file, signals and restarts, with real traffic from the client
//! namespace. What an operator relies on: the API needs the token, a stale revision changes
//! nothing, a restart restores the policy and adopts the pinned classifier without a second
//! attachment, SIGHUP with a broken file keeps the policy, `kill -9` keeps enforcing (default)
//! or opens the gate (`--fail-open`), monitor mode blocks nothing and counts everything (by rule
//! and method in `/metrics`), an API connection that never finishes its headers is closed, and a
//! 100k-rule policy switches atomically under traffic.
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
use filter_tests::lab::{self, Backend, Daemon, Lab};
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

    /// TCX programs on the server interface's ingress, asked of the kernel from a thread
    /// that enters the server namespace (independent of filterd's own view).
    fn tcx_programs(&self) -> usize {
        use std::os::fd::AsRawFd as _;
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.lab.server_netns()))
            .expect("opening the server namespace");
        let iface = self.lab.server_iface().to_owned();
        std::thread::spawn(move || {
            // SAFETY: setns(2) on this thread only, with an open namespace fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
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
        .expect("the query thread")
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
    assert_eq!(e.tcx_programs(), 1);

    // A clean stop keeps the classifier (fail-closed): DELETE /admin still never reaches
    // the backend while no daemon runs.
    e.daemon.take().unwrap().stop().unwrap();
    assert_eq!(e.tcx_programs(), 1, "the pinned link outlives the daemon");
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
    assert_eq!(e.tcx_programs(), 1, "adopted, not attached a second time");
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
        e.daemon().log().contains("line 5"),
        "the log names the line"
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
    e.wait_log("policy file reloaded");
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
    assert!(
        msg.contains("bad.toml, line 1") && msg.contains("rules[0].methods"),
        "{msg}"
    );
}

fn kill9_under_traffic(test: &str, extra: &[&str], expect_enforcing: bool) {
    let Some(mut e) = env(test, POLICY, extra) else {
        return;
    };
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
        e.request(e.v4(), "DELETE", &format!("/admin?try={i}"));
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
            "fail-closed: a DELETE reached the backend after kill -9"
        );
        assert_eq!(e.tcx_programs(), 1);
    } else {
        assert!(leaked, "fail-open: DELETE should pass once filterd is gone");
        assert_eq!(e.tcx_programs(), 0, "fail-open: nothing stays attached");
    }
}

#[test]
fn kill9_under_traffic_keeps_enforcing_by_default() {
    kill9_under_traffic(
        "control_plane::kill9_under_traffic_keeps_enforcing_by_default",
        &[],
        true,
    );
}

#[test]
fn kill9_under_traffic_with_fail_open_opens_the_gate() {
    kill9_under_traffic(
        "control_plane::kill9_under_traffic_with_fail_open_opens_the_gate",
        &["--fail-open"],
        false,
    );
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
    e.wait_log("policy file reloaded");
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
