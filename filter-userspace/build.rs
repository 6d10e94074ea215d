//! Embeds the kernel object that `cargo xtask build` produced, if there is one, and records
//! what `--version` and `filterd_build_info` report: the git revision the binaries were built
//! from and the SHA-256 of the embedded object.
//!
//! A plain `cargo build` without the BPF toolchain still works: the daemon is then built with
//! an empty object and says at start how to get a real one. Outside a git checkout (a source
//! package) the revision comes from `FILTERD_GIT_REVISION`, else it is `unknown`.

use std::process::Command;
use std::{env, fs, path::PathBuf};

use sha2::{Digest, Sha256};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("filter-ebpf.o");
    let object = env::var_os("FILTER_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/filter-ebpf"));
    println!("cargo:rerun-if-env-changed=FILTER_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let bytes = match fs::read(&object) {
        Ok(bytes) => bytes,
        Err(_) => {
            println!(
                "cargo:warning=no kernel object at {}: filterd will refuse to start (run `cargo xtask build`)",
                object.display()
            );
            Vec::new()
        }
    };
    fs::write(&out, &bytes).unwrap();
    let digest = if bytes.is_empty() {
        "none".to_owned()
    } else {
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    println!("cargo:rustc-env=FILTERD_BPF_SHA256={digest}");
    println!(
        "cargo:rustc-env=FILTERD_GIT_REVISION={}",
        git_revision(&manifest)
    );
}

/// `git describe`-like: the commit, `-dirty` when the tree has changes. Rebuilt when HEAD or
/// the branch it points at moves.
fn git_revision(manifest: &std::path::Path) -> String {
    println!("cargo:rerun-if-env-changed=FILTERD_GIT_REVISION");
    if let Ok(r) = env::var("FILTERD_GIT_REVISION") {
        return r;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(manifest)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    for file in ["HEAD", "index"] {
        if let Some(p) = git(&["rev-parse", "--git-path", file]) {
            let p = manifest.join(p);
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &reference]) {
            println!("cargo:rerun-if-changed={}", manifest.join(p).display());
        }
    }
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}
