//! Tier 1, the deployment files in `dist/` against the daemon they deploy: every flag the
//! Kubernetes DaemonSet, the container image and the systemd unit pass to filterd is one
//! `filterd --help` lists; the paths agree with each other and with filterd's defaults
//! (policy from the ConfigMap's mount, pins on the host's bpffs, the token on the state
//! volume), the probes hit the unauthenticated health routes on the API's address, and the
//! example policies check. No root, no cluster: the manifest is read as YAML.
//!
//! Under `cargo xtask test` (`FILTER_E2E=1`, `FILTER_DEB`: the package it assembles) the
//! `.deb` is opened as an operator would find it installed: its file list, its conffiles, the
//! extracted binaries' `--version` and `--check` of the policy it ships, man pages that are
//! man pages, and guides whose links resolve inside the package.

use std::path::{Path, PathBuf};

use filter_userspace::{api, auth, cli, dataplane, document};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `filterd --help`, as the binary prints it.
fn filterd_help() -> String {
    cli::filterd_command().render_long_help().to_string()
}

/// Whether `filterd --help` lists the flag `name` (followed by its value or the line's end).
fn listed(help: &str, name: &str) -> bool {
    help.lines().any(|l| {
        let l = l.trim_start();
        l.strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' ') || rest.starts_with(','))
    })
}

/// The long flags among `args` (`--name` or `--name=value`), with their values.
fn flags(args: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some(f) = a.strip_prefix("--") {
            match f.split_once('=') {
                Some((n, v)) => out.push((format!("--{n}"), Some(v.to_owned()))),
                None => {
                    let v = args.get(i + 1).filter(|v| !v.starts_with("--")).cloned();
                    if v.is_some() {
                        i += 1;
                    }
                    out.push((a.clone(), v));
                }
            }
        }
        i += 1;
    }
    out
}

fn value<'a>(flags: &'a [(String, Option<String>)], name: &str) -> &'a str {
    flags
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
        .unwrap_or_else(|| panic!("{name} is not passed"))
}

fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_daemonset_passes_only_flags_filterd_has_and_its_paths_agree() {
    let text = read("dist/k8s/filterd.yaml");
    let docs = YamlLoader::load_from_str(&text).expect("the manifest is YAML");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("no {k} in the manifest"))
    };
    let ds = kind("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "host network");
    let c = &pod["containers"][0];
    let args = strs(&c["args"]);
    let help = filterd_help();
    let fl = flags(&args);
    assert!(!fl.is_empty());
    for (name, _) in &fl {
        assert!(
            listed(&help, name),
            "the DaemonSet passes {name}, which `filterd --help` does not list"
        );
    }
    // The container runs the binary the image holds.
    let entry = read("dist/Containerfile")
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .map(|e| e.trim().to_owned())
        .expect("the Containerfile has an ENTRYPOINT");
    assert_eq!(strs(&c["command"]), [serde_entry(&entry)]);

    // Volumes: name -> (mountPath, readOnly); and what backs them.
    let mounts: Vec<(String, String, bool)> = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["mountPath"].as_str().unwrap().to_owned(),
                m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let volume = |name: &str| {
        pod["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|(_, m, _)| Path::new(path).starts_with(m))
            .max_by_key(|(_, m, _)| m.len())
            .unwrap_or_else(|| panic!("{path} is on no volume"))
            .clone()
    };
    // The policy: the ConfigMap's mount, read-only, as a directory source.
    let policy = value(&fl, "--policy");
    let (name, mount, ro) = mount_of(policy);
    assert_eq!(mount, policy, "--policy is the ConfigMap's mount itself");
    assert!(ro, "the policy is mounted read-only");
    let cm_name = volume(&name)["configMap"]["name"]
        .as_str()
        .expect("the policy volume is a ConfigMap")
        .to_owned();
    let cm = kind("ConfigMap");
    assert_eq!(cm["metadata"]["name"].as_str(), Some(cm_name.as_str()));
    let mut keys = 0;
    for (k, v) in cm["data"].as_hash().unwrap() {
        let k = k.as_str().unwrap();
        assert!(
            k.ends_with(".toml"),
            "a ConfigMap key filterd would skip: {k}"
        );
        document::check_text(k, v.as_str().unwrap())
            .unwrap_or_else(|d| panic!("the ConfigMap's {k} does not check: {d:?}"));
        keys += 1;
    }
    assert!(keys > 0);
    assert!(
        !fl.iter().any(|(n, _)| n == "--state"),
        "one owner of the policy"
    );
    // Pins on the host's bpffs, at filterd's default place.
    let pin = value(&fl, "--pin-dir");
    assert_eq!(pin, dataplane::DEFAULT_PIN_DIR);
    let (name, _, _) = mount_of(pin);
    assert_eq!(
        volume(&name)["hostPath"]["path"].as_str(),
        Some("/sys/fs/bpf")
    );
    // The token (and the socket) on the state volume, the token at filterd's default path.
    let token = value(&fl, "--token-file");
    assert_eq!(token, auth::DEFAULT_TOKEN_FILE);
    let (state, _, ro) = mount_of(token);
    assert!(!ro, "filterd writes its token there");
    assert!(volume(&state)["hostPath"].as_hash().is_some());
    let (sock_volume, _, _) = mount_of(value(&fl, "--api-socket"));
    assert_eq!(sock_volume, state);
    // Probes: the unauthenticated health routes, on the API's address.
    let listen: std::net::SocketAddr = value(&fl, "--api").parse().unwrap();
    assert_eq!(listen.to_string(), cli::DEFAULT_API);
    let routes = api::routes();
    for (probe, want) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
    ] {
        let g = &c[probe]["httpGet"];
        assert_eq!(g["path"].as_str(), Some(want), "{probe}");
        assert_eq!(
            g["port"].as_i64(),
            Some(i64::from(listen.port())),
            "{probe}"
        );
        assert_eq!(
            g["host"].as_str(),
            Some(listen.ip().to_string().as_str()),
            "{probe}"
        );
        let route = routes
            .iter()
            .find(|r| r.method == "GET" && r.path == want)
            .unwrap_or_else(|| panic!("{probe}: filterd serves no {want}"));
        assert!(!route.auth, "{probe}: {want} must not need the token");
    }
    // It runs as root with what it needs (see README, Requirements).
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"].as_i64(), Some(0));
    let caps = strs(&sc["capabilities"]["add"]);
    for cap in ["BPF", "NET_ADMIN", "NET_RAW", "SYS_ADMIN"] {
        assert!(caps.iter().any(|c| c == cap), "capability {cap}");
    }
    // The interface comes from the environment it names.
    let iface = value(&fl, "--iface");
    let var = iface
        .strip_prefix("$(")
        .and_then(|v| v.strip_suffix(')'))
        .expect("--iface=$(VAR)");
    assert!(c["env"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|e| e["name"].as_str() == Some(var)));
}

/// `["/usr/bin/filterd"]` -> `/usr/bin/filterd`.
fn serde_entry(entry: &str) -> String {
    let v: Vec<String> = serde_json::from_str(entry).expect("ENTRYPOINT in exec form");
    assert_eq!(v.len(), 1);
    v[0].clone()
}

#[test]
fn the_systemd_unit_passes_only_flags_filterd_has_and_checks_before_reloading() {
    let unit = read("dist/filterd.service");
    // Join continued lines.
    let joined = unit.replace("\\\n", " ");
    let line = |key: &str| -> Vec<String> {
        joined
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(line("Type"), ["notify"]);
    let help = filterd_help();
    let start = line("ExecStart");
    let reload = line("ExecReload");
    assert_eq!(start.len(), 1);
    for cmd in start.iter().chain(&reload) {
        let words: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
        if !words[0].ends_with("/filterd") {
            continue;
        }
        for (name, _) in flags(&words) {
            assert!(
                listed(&help, &name),
                "the unit passes {name}, which `filterd --help` does not list"
            );
        }
    }
    // Reload checks first, then signals; the check reads what the daemon reads.
    assert_eq!(reload.len(), 2, "{reload:?}");
    assert!(reload[0].contains("--check") && reload[0].contains("--policy ${FILTERD_POLICY}"));
    assert!(start[0].contains("--policy ${FILTERD_POLICY}"));
    assert!(reload[1].contains("kill -HUP $MAINPID"));
    let start_flags = flags(
        &start[0]
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    );
    assert_eq!(value(&start_flags, "--pin-dir"), dataplane::DEFAULT_PIN_DIR);
    assert_eq!(
        value(&start_flags, "--token-file"),
        auth::DEFAULT_TOKEN_FILE
    );
    assert_eq!(value(&start_flags, "--api"), cli::DEFAULT_API);
}

#[test]
fn the_example_policy_checks() {
    let (p, _) = document::check_text("dist/policy.toml", &read("dist/policy.toml"))
        .unwrap_or_else(|d| panic!("{d:?}"));
    assert_eq!(p, filter_userspace::policy::Policy::default());
}

/// `dpkg-deb ARGS...`, its output.
fn dpkg_deb(args: &[&str]) -> String {
    let out = std::process::Command::new("dpkg-deb")
        .args(args)
        .output()
        .expect("dpkg-deb runs");
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Every relative link target of the Markdown `text` (the anchors cut off).
fn relative_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = &rest[..end];
        let file = target.split('#').next().unwrap_or("");
        if !file.is_empty() && !file.contains(':') && !target.contains(char::is_whitespace) {
            out.push(file.to_owned());
        }
    }
    out
}

#[test]
fn the_deb_ships_what_an_operator_installs() {
    if !filter_tests::lab::e2e_enabled("the_deb_ships_what_an_operator_installs") {
        return;
    }
    let deb =
        std::env::var("FILTER_DEB").expect("FILTER_DEB: the .deb `cargo xtask test` assembles");
    let fields = dpkg_deb(&["-f", &deb]);
    assert!(fields.contains("Package: filterd\n"), "{fields}");
    assert!(
        fields.contains(&format!("Version: {}\n", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );
    let list = dpkg_deb(&["-c", &deb]);
    let files: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    for want in [
        "/usr/bin/filterd",
        "/usr/bin/filterctl",
        "/lib/systemd/system/filterd.service",
        "/etc/filterd/policy.toml",
        "/etc/default/filterd",
        "/usr/share/man/man8/filterd.8.gz",
        "/usr/share/man/man1/filterctl.1.gz",
        "/usr/share/man/man1/filterctl-explain.1.gz",
        "/usr/share/bash-completion/completions/filterd",
        "/usr/share/bash-completion/completions/filterctl",
        "/usr/share/zsh/vendor-completions/_filterctl",
        "/usr/share/fish/vendor_completions.d/filterctl.fish",
        "/usr/share/doc/filterd/README.md",
        "/usr/share/doc/filterd/docs/control-plane.md",
        "/usr/share/doc/filterd/copyright",
        "/usr/share/doc/filterd/examples/filterd.yaml",
    ] {
        assert!(
            files.contains(&want),
            "{want} is not in the package:\n{list}"
        );
    }
    let tmp = std::env::temp_dir().join(format!("filterd-deb-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let control = tmp.join("DEBIAN");
    dpkg_deb(&["-e", &deb, control.to_str().unwrap()]);
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/filterd/policy.toml"),
        "{conffiles}"
    );
    assert!(
        conffiles.lines().any(|l| l == "/etc/default/filterd"),
        "{conffiles}"
    );
    let root = tmp.join("root");
    dpkg_deb(&["-x", &deb, root.to_str().unwrap()]);

    // The installed daemon names its version, and checks the policy the package installs.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(root.join("usr/bin/filterd"))
            .args(args)
            .output()
            .expect("the packaged filterd runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, version) = run(&["--version"]);
    assert!(
        ok && version.contains(env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    let policy = root.join("etc/filterd/policy.toml");
    let (ok, check) = run(&["--check", "--policy", policy.to_str().unwrap()]);
    assert!(ok, "the packaged policy does not check: {check}");
    let (ok, check) = run(&[
        "--check",
        "--policy",
        root.join("etc/default/filterd").to_str().unwrap(),
    ]);
    assert!(!ok, "--check accepted a file that is not a policy: {check}");

    // Man pages are roff pages.
    let man = std::process::Command::new("gzip")
        .args(["-dc"])
        .arg(root.join("usr/share/man/man8/filterd.8.gz"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&man.stdout).contains(".TH filterd 8"));

    // The guides' links resolve inside the package.
    let doc = root.join("usr/share/doc/filterd");
    let mut guides = vec![doc.join("README.md"), doc.join("ARCHITECTURE.md")];
    guides.extend(
        std::fs::read_dir(doc.join("docs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    for guide in &guides {
        let text = std::fs::read_to_string(guide).unwrap();
        for link in relative_links(&text) {
            let target = guide.parent().unwrap().join(&link);
            assert!(
                target.exists(),
                "{} links {link}, which the package does not ship",
                guide.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
