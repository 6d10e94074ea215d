//! `cargo xtask bench`: build the kernel object, `filterd` and the benchmark (`filter-bench`,
//! the `bench/` crate) from this tree, then run the benchmark as root with the given arguments.
//!
//! The benchmark is a binary of its own rather than part of xtask: it measures the kernel
//! object embedded in it (through `filter_userspace::dataplane::Dataplane`), so it must be
//! built after the object, as `filterd` is.

use std::process::Command;

use anyhow::Result;

use crate::build;

pub fn main(args: &[String]) -> Result<()> {
    let b = build::build_all()?;
    build::run(
        Command::new(env!("CARGO"))
            .current_dir(&b.root)
            .args(["build", "--release", "-p", "filter-bench"])
            .env("FILTER_EBPF_OBJECT", &b.object),
    )?;
    let bench = b.root.join("target/release/filter-bench");
    let mut cmd = if args
        .iter()
        .any(|a| a == "--report-from" || a == "--help" || a == "-h")
    {
        Command::new(&bench)
    } else {
        build::as_root(&bench)
    };
    build::run(cmd.arg("--filterd").arg(&b.filterd).args(args))
}
