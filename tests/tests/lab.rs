//! Tier-3 scaffolding check without filterd: the lab's network, the recording
//! backend and both clients work over IPv4 and IPv6, and the lab leaves
//! nothing behind. Needs root; runs only with FILTER_E2E=1.

use std::process::Command;

use filter_tests::lab::{self, Lab, Recorded};

fn gate(test: &str) -> bool {
    if !lab::e2e_enabled(test) {
        return false;
    }
    lab::check_prerequisites().expect("FILTER_E2E=1 but a prerequisite is missing");
    true
}

fn netns_list() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn backend_answers_curl_and_h11_over_both_families() {
    if !gate("backend_answers_curl_and_h11_over_both_families") {
        return;
    }
    let lab = Lab::new().expect("building the lab");
    let backend = lab.start_backend(80).expect("starting the backend");
    for addr in lab.server_addrs() {
        let host = match addr {
            std::net::IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        };
        let path = format!("/probe-{}", if addr.is_ipv4() { "v4" } else { "v6" });
        let out = lab
            .client_cmd("curl")
            .args(["-sS", "--max-time", "5", "-X", "DELETE"])
            .arg(format!("http://{host}{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {addr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("backend saw DELETE {path}\n")
        );

        let reply = lab
            .h11_request(addr, 80, "delete", &path, &["Connection: close"])
            .expect("h11 client");
        assert!(reply.h11_ok, "{reply:?}");
        assert_eq!(reply.status, Some(200));
        assert_eq!(reply.eof, "clean", "backend closes after Connection: close");
        assert_eq!(reply.body, format!("backend saw delete {path}\n"));
        assert!(
            reply.raw.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{:?}",
            reply.raw
        );
        assert_eq!(
            reply.header_values("content-length"),
            [reply.body.len().to_string()]
        );

        let seen = backend.requests().unwrap();
        for method in ["DELETE", "delete"] {
            let want = Recorded {
                method: method.into(),
                path: path.clone(),
                version: "HTTP/1.1".into(),
            };
            assert!(seen.contains(&want), "backend log {seen:?} lacks {want:?}");
        }
    }
    // The client namespace cannot reach anything but the lab.
    let out = lab
        .client_cmd("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        links.lines().count(),
        2,
        "client netns should hold only lo and the veth: {links}"
    );
}

#[test]
fn drop_removes_namespaces_and_kills_backend() {
    if !gate("drop_removes_namespaces_and_kills_backend") {
        return;
    }
    let lab = Lab::new().expect("building the lab");
    let (c, s) = (lab.client_netns().to_owned(), lab.server_netns().to_owned());
    let dir = lab.dir().to_owned();
    let backend = lab.start_backend(8080).unwrap();
    assert!(netns_list().contains(&s));
    // A second lab in the same process gets distinct names.
    let other = Lab::new().expect("second lab");
    assert_ne!(other.server_netns(), s);
    assert_ne!(other.server_iface(), lab.server_iface());
    assert!(other.server_iface().len() <= 15);
    drop(other);
    drop(backend);
    assert!(lab.server_established(8080).unwrap().is_empty());
    drop(lab);
    let list = netns_list();
    assert!(
        !list.contains(&c) && !list.contains(&s),
        "namespaces left behind: {list}"
    );
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
}

#[test]
fn without_e2e_env_tests_skip_loudly() {
    // Documents the gate: this test runs everywhere.
    if std::env::var(lab::E2E_ENV).as_deref() != Ok("1") {
        assert!(!lab::e2e_enabled(
            "without_e2e_env_tests_skip_loudly (gate check)"
        ));
    }
}

#[test]
fn server_established_sees_an_open_connection() {
    // The e2e tests assert this list is empty after a 405; prove it can be non-empty.
    if !gate("server_established_sees_an_open_connection") {
        return;
    }
    let lab = Lab::new().expect("building the lab");
    let _backend = lab.start_backend(80).expect("starting the backend");
    let mut idle = lab
        .client_cmd("python3")
        .args([
            "-c",
            "import socket,sys,time; s=socket.create_connection((sys.argv[1],80)); time.sleep(10)",
        ])
        .arg(lab.server_v6().to_string())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let open = loop {
        let open = lab.server_established(80).unwrap();
        if !open.is_empty() || std::time::Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    idle.kill().unwrap();
    idle.wait().unwrap();
    assert_eq!(
        open.len(),
        1,
        "expected the idle client's connection: {open:?}"
    );
    assert!(open[0].contains("[fd77::1]"), "{open:?}");
}
