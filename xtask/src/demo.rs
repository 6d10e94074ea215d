//! `cargo xtask demo`: the filter at work between two throwaway network namespaces.
//!
//! A recording backend listens on port 80 in the server namespace, `filterd` guards the
//! server's interface with a sample policy, and curl in the client namespace sends allowed and
//! disallowed requests over IPv4 and IPv6. Every step says what happened and checks it; the
//! namespaces go away at the end, on error, and on Ctrl-C.

use anyhow::{bail, Context};
use filter_tests::lab::{self, Lab};

use crate::build::Built;

use filter_tests::lab::SAMPLE_POLICY as POLICY;

struct Step {
    method: &'static str,
    url: String,
    /// `None`: expect the backend's 200; `Some(allow)`: expect 405 with this `Allow`.
    expect_405: Option<&'static str>,
    why: &'static str,
}

pub fn run(b: &Built) -> anyhow::Result<()> {
    if !crate::build::is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run `sudo -E cargo xtask demo`");
    }
    lab::check_prerequisites()?;
    lab::install_ctrlc_cleanup()?;
    let lab = Lab::new()?;
    println!("== HTTP method firewall demo ==");
    println!(
        "client namespace {} ({}, {})  <-- veth -->  server namespace {} ({}, {})",
        lab.client_netns(),
        lab.client_v4(),
        lab.client_v6(),
        lab.server_netns(),
        lab.server_v4(),
        lab.server_v6()
    );
    let backend = lab.start_backend(80)?;
    println!("backend: a recording HTTP/1.1 server on port 80 in the server namespace");
    println!(
        "filterd: starting (the kernel verifies both classifiers first: seconds, up to a minute)"
    );
    let daemon = match lab.start_filterd(&b.filterd, POLICY, &[]) {
        Ok(d) => d,
        // Its own one-line reason, not its whole log.
        Err(e) => match e.downcast_ref::<lab::DaemonExited>() {
            Some(exited) => bail!("filterd did not start ({}): {}", exited.status, exited.last),
            None => return Err(e),
        },
    };
    println!(
        "filterd: classifier attached to {} (ingress, TCP port 80), policy:",
        lab.server_iface()
    );
    for line in POLICY
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        println!("    {line}");
    }
    println!("  paths without a rule allow every method (default \"any\")\n");

    let (v4, v6) = (lab.server_v4(), lab.server_v6());
    let steps = [
        Step {
            method: "GET",
            url: format!("http://{v4}/api/items"),
            expect_405: None,
            why: "GET is allowed on /api/items",
        },
        Step {
            method: "POST",
            url: format!("http://[{v6}]/api/items"),
            expect_405: None,
            why: "POST is allowed, over IPv6 too",
        },
        Step {
            method: "HEAD",
            url: format!("http://{v4}/admin"),
            expect_405: None,
            why: "GET implies HEAD",
        },
        Step {
            method: "DELETE",
            url: format!("http://{v4}/api/items"),
            expect_405: Some("GET, HEAD, POST"),
            why: "DELETE is not in the rule",
        },
        Step {
            method: "PUT",
            url: format!("http://[{v6}]/admin"),
            expect_405: Some("GET, HEAD"),
            why: "/admin is read-only",
        },
        Step {
            method: "DELETE",
            url: format!("http://{v4}/elsewhere"),
            expect_405: None,
            why: "no rule for this path",
        },
    ];
    let mut failures = 0;
    for step in &steps {
        let seen_before = backend.requests()?.len();
        let out = lab
            .client_cmd("curl")
            .args(["-sS", "-i", "--max-time", "5", "-X", step.method, &step.url])
            .output()
            .context("running curl in the client namespace")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text
            .lines()
            .next()
            .unwrap_or("(no response)")
            .trim()
            .to_owned();
        let allow = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("Allow: ")
                    .or_else(|| l.strip_prefix("allow: "))
            })
            .map(|v| v.trim().to_owned());
        let reached = backend.requests()?.len() > seen_before;
        let ok = match step.expect_405 {
            None => status.contains(" 200") && reached,
            Some(want) => {
                status == "HTTP/1.1 405 Method Not Allowed"
                    && allow.as_deref() == Some(want)
                    && !reached
            }
        };
        failures += usize::from(!ok);
        let verdict = match (step.expect_405.is_some(), ok) {
            (false, true) => "ALLOWED  reached the backend".to_owned(),
            (true, true) => format!(
                "BLOCKED  Allow: {}; the backend never saw it",
                allow.unwrap_or_default()
            ),
            (_, false) => format!(
                "UNEXPECTED (backend reached: {reached}, curl: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        };
        println!(
            "{:<7} {:<28} -> {:<34} {}",
            step.method, step.url, status, verdict
        );
        println!("        ({})", step.why);
    }

    println!("\nThe full answer to a blocked request, as the client receives it:");
    let out = lab
        .client_cmd("curl")
        .args([
            "-sS",
            "-i",
            "--max-time",
            "5",
            "-X",
            "DELETE",
            &format!("http://{v4}/admin"),
        ])
        .output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    println!("\nWhat the backend received (every request it parsed):");
    for r in backend.requests()? {
        println!("    {} {}", r.method, r.path);
    }
    let (_, stats) = daemon.api("GET", "/v1/stats", None)?;
    println!("\nfilterd's counters (GET /v1/stats): {stats}");
    println!("\n$ filterctl rules list");
    let out = lab
        .server_cmd(&b.filterctl)
        .arg("--token-file")
        .arg(lab.dir().join("api-token"))
        .args(["rules", "list"])
        .output()?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    failures += usize::from(!out.status.success());
    drop(daemon);
    drop(backend);
    drop(lab);
    println!("\nnamespaces removed.");
    if failures > 0 {
        bail!("{failures} demo step(s) did not behave as expected");
    }
    println!("demo ok: allowed requests reached the backend; disallowed ones got 405 with Allow and never reached it.");
    Ok(())
}
