//! The benchmark's prerequisites and the record of where it ran: machine, kernel, tool
//! versions, the source revision (and whether the tree was dirty, since other work may be in
//! progress in it).
//!
//! Installs missing Debian packages with `apt-get install -y` (no service is started here:
//! nginx is only ever run with the bench's own config), or names exactly what is missing.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// (binary, Debian package, version arguments).
const TOOLS: &[(&str, &str, &[&str])] = &[
    ("wrk", "wrk", &["-v"]),
    ("nginx", "nginx", &["-v"]),
    ("curl", "curl", &["--version"]),
    ("ip", "iproute2", &["-V"]),
    ("ss", "iproute2", &["-V"]),
    ("sysctl", "procps", &["--version"]),
    ("ethtool", "ethtool", &["--version"]),
];

fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()))
        || Path::new("/usr/sbin").join(bin).is_file()
}

fn missing() -> Vec<(&'static str, &'static str)> {
    TOOLS
        .iter()
        .filter(|(b, _, _)| !have(b))
        .map(|(b, p, _)| (*b, *p))
        .collect()
}

/// Makes sure every tool is there, installing the Debian packages if allowed.
pub fn ensure_tools(install: bool) -> Result<()> {
    let miss = missing();
    if miss.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = miss.iter().map(|(_, p)| *p).collect();
    pkgs.dedup();
    let names: Vec<&str> = miss.iter().map(|(b, _)| *b).collect();
    if !install {
        bail!(
            "missing {}: run `apt-get install -y {}`",
            names.join(", "),
            pkgs.join(" ")
        );
    }
    eprintln!(
        "bench: installing {} (apt-get install -y {})",
        names.join(", "),
        pkgs.join(" ")
    );
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut install_args = vec!["install", "-y", "--no-install-recommends"];
    install_args.extend(&pkgs);
    if !apt(&install_args) {
        // A stale package index is the usual cause (404 on a superseded version).
        let _ = apt(&["update"]);
        let _ = apt(&install_args);
    }
    let still = missing();
    if !still.is_empty() {
        let n: Vec<&str> = still.iter().map(|(b, _)| *b).collect();
        let p: Vec<&str> = still.iter().map(|(_, p)| *p).collect();
        bail!(
            "still missing after apt-get: {} (packages: {})",
            n.join(", "),
            p.join(" ")
        );
    }
    Ok(())
}

fn first_line(program: &str, args: &[&str]) -> String {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_owned()
        }
        Err(e) => format!("<{program}: {e}>"),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(default)]
pub struct Environment {
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_total: String,
    pub kernel: String,
    pub os: String,
    pub virtualization: String,
    pub tools: Vec<(String, String)>,
    pub git_head: String,
    /// `git status --porcelain` lines at start: the build may include uncommitted work.
    pub git_dirty: Vec<String>,
    pub filterd: String,
    pub filterd_sha256: String,
    pub loadavg_start: String,
}

impl Environment {
    pub fn collect(filterd: &Path) -> Environment {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|s| s.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        let hypervisor = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
        let mem_total = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .unwrap_or("")
            .trim()
            .to_owned();
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .unwrap_or("")
            .trim_matches('"')
            .to_owned();
        let root = crate::workspace_root();
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let mut tools: Vec<(String, String)> = TOOLS
            .iter()
            .filter(|(b, _, _)| ["wrk", "nginx"].contains(b))
            .map(|(b, _, a)| (b.to_string(), first_line(b, a)))
            .collect();
        tools.push(("rustc".into(), first_line("rustc", &["--version"])));
        tools.push((
            "rustc (BPF)".into(),
            first_line("rustup", &["run", "nightly", "rustc", "--version"]),
        ));
        Environment {
            cpu_model,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            mem_total,
            kernel: read("/proc/version"),
            os,
            virtualization: if hypervisor {
                "virtual machine (cpuinfo flag `hypervisor`)".into()
            } else {
                "no hypervisor flag".into()
            },
            tools,
            git_head: git(&["log", "-1", "--format=%H %s"]).trim().to_owned(),
            git_dirty: git(&["status", "--porcelain"])
                .lines()
                .map(str::to_owned)
                .collect(),
            filterd: filterd.display().to_string(),
            filterd_sha256: first_line("sha256sum", &[&filterd.display().to_string()])
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_owned(),
            loadavg_start: read("/proc/loadavg"),
        }
    }
}
