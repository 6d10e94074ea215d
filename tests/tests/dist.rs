//! Tier 1, the deployment files in `dist/` against the daemon they deploy: every flag the
//! Kubernetes DaemonSet, the container image and the systemd unit pass to filterd is one
//! `filterd --help` lists; the paths agree with each other and with filterd's defaults
//! (policy from the ConfigMap's mount, pins on the host's bpffs, the token on the state
//! volume), the probes hit the unauthenticated health routes on the API's address, and the
//! example policies check. No root, no cluster: the manifest is read as YAML.

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
