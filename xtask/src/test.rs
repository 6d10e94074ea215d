//! `cargo xtask test`: every test tier, in order, failing on the first red one.
//!
//! 1. Host unit tests (no root): parsers, hash, policy, response builder, API router.
//! 2. and 3. Kernel fixture tests (`BPF_PROG_TEST_RUN`) and end-to-end tests in network
//!    namespaces: they need root, so they run as root with `FILTER_E2E=1` and one test thread.

use std::process::Command;

use anyhow::bail;

use crate::build::Built;

pub fn run(b: &Built) -> anyhow::Result<()> {
    let cargo = env!("CARGO");
    eprintln!("xtask: tier 1: host unit tests");
    crate::build::run(
        Command::new(cargo)
            .current_dir(&b.root)
            .args([
                "test",
                "-p",
                "filter-common",
                "-p",
                "filter-userspace",
                "-p",
                "xtask",
            ])
            .env("FILTER_EBPF_OBJECT", &b.object),
    )?;

    eprintln!("xtask: tiers 2 and 3: kernel fixtures and end to end (root)");
    if !crate::build::is_root() {
        bail!("the kernel and end-to-end tiers need root: run `sudo -E cargo xtask test`");
    }
    crate::build::run(
        Command::new(cargo)
            .current_dir(&b.root)
            .args(["test", "-p", "filter-tests", "--", "--test-threads=1"])
            .env("FILTER_E2E", "1")
            .env("FILTER_EBPF_OBJECT", &b.object)
            .env("FILTERD_BIN", &b.filterd),
    )?;
    Ok(())
}
