//! Toolchain bootstrap and builds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The nightly channel the kernel object is built with. bpf-linker is built against this
/// toolchain's own libLLVM, so the two always agree on the LLVM version.
const NIGHTLY: &str = "nightly";
const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub struct Built {
    pub root: PathBuf,
    pub filterd: PathBuf,
    pub filterctl: PathBuf,
    pub object: PathBuf,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Run a command, failing with its command line if it does not succeed.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A cargo/rustc command for the nightly toolchain, free of the variables the outer stable
/// `cargo xtask` set.
fn nightly(program: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", NIGHTLY, program]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(var);
    }
    c
}

/// Make sure the nightly toolchain, its rust-src and a matching bpf-linker exist. Idempotent:
/// each step checks first and does nothing when its result is already there.
fn bootstrap() -> anyhow::Result<PathBuf> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly-")) {
        eprintln!("xtask: installing the {NIGHTLY} toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let sysroot = PathBuf::from(output(nightly("rustc").args(["--print", "sysroot"]))?.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: adding rust-src to {NIGHTLY}");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }

    // One bpf-linker per nightly build: a different nightly means a different LLVM.
    let version = output(nightly("rustc").arg("-vV"))?;
    let commit = version
        .lines()
        .find_map(|l| l.strip_prefix("commit-hash: "))
        .context("rustc -vV printed no commit-hash")?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home)
        .join(".cache/filterd-tools")
        .join(&commit[..commit.len().min(12)]);
    let linker = prefix.join("bin/bpf-linker");
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        let lib = sysroot.join("lib");
        let llvm = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM.so."))
            .with_context(|| {
                format!(
                    "no libLLVM.so.* in {}: is the nightly toolchain complete?",
                    lib.display()
                )
            })?;
        let major = llvm
            .trim_start_matches("libLLVM.so.")
            .split(['.', '-'])
            .next()
            .unwrap_or("")
            .to_owned();
        std::fs::create_dir_all(prefix.join("lib"))?;
        for name in ["libLLVM.so".to_owned(), llvm.clone()] {
            let link = prefix.join("lib").join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(lib.join(&llvm), &link)?;
        }
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (about 90 s, once)"
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}"), "--root"])
            .arg(&prefix)
            .env("LLVM_PREFIX", &prefix)
            .env_remove("CARGO_TARGET_DIR"))?;
    }
    Ok(prefix.join("bin"))
}

/// Build the kernel object and the userspace binaries (release), the object embedded.
pub fn build_all() -> anyhow::Result<Built> {
    let root = workspace_root();
    let bin = bootstrap()?;
    let tool_path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    run(nightly("cargo")
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "filter-ebpf",
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .args(["--target-dir", "target/ebpf"])
        // BTF for the object and for build-std's memcpy alike (aya #1649); bpf_loop needs it.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env("PATH", &tool_path))?;
    let object = root
        .join("target/ebpf")
        .join(BPF_TARGET)
        .join("release/filter-ebpf");

    run(Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--release", "-p", "filter-userspace", "--bins"])
        .env("FILTER_EBPF_OBJECT", &object))?;
    Ok(Built {
        filterd: root.join("target/release/filterd"),
        filterctl: root.join("target/release/filterctl"),
        object,
        root,
    })
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// A command that runs as root: directly when we are root, else through `sudo -E`.
pub fn as_root(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(program);
        c
    }
}

pub fn run_as_root(filterd: &Path, args: &[String]) -> anyhow::Result<()> {
    run(as_root(filterd).args(args))
}
