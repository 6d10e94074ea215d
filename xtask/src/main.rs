//! `cargo xtask`: what cargo alone cannot do for this workspace.
//!
//! Bootstraps the BPF toolchain (the nightly's `rust-src` and a `bpf-linker` built against
//! that nightly's own libLLVM), builds the kernel object and the daemon with the object
//! embedded, and runs the privileged things: the daemon, the demo, the test tiers that need
//! root, and the kernel matrix (other kernels under QEMU, provisioned here). It must stay
//! plain Rust with few dependencies: no shell scripts.

mod bench;
mod build;
mod demo;
mod kernels;
mod test;
mod vm;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, demo and test the HTTP method firewall")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bootstrap the BPF toolchain if needed, then build the kernel object and the binaries.
    Build,
    /// Build, then run filterd as root with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then show the filter working between two throwaway network namespaces.
    Demo,
    /// Build, then run every test tier (host unit tests, kernel fixtures, end to end).
    Test,
    /// Boot a kernel under QEMU and run a command in it (the host's files, read-only but /tmp;
    /// no network): `cargo xtask vm --kernel 6.1 -- uname -r`. One argument is a shell command
    /// line; several are a command and its arguments. Prints its output and exits with its
    /// exit status (125 if the guest itself failed).
    Vm {
        /// `6.1`, `6.12`, `host` (no VM), or the path of a kernel image.
        #[arg(long, value_name = "KERNEL")]
        kernel: String,
        /// Deadline, boot to power-off, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = vm::DEFAULT_TIMEOUT.as_secs())]
        timeout: u64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Build, then run the benchmarks and write docs/BENCHMARKS.md and docs/bench/ (~12 min, root).
    Bench(Box<bench::Args>),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build => build::build_all().map(|_| ()),
        Command::Run { args } => {
            build::build_all().and_then(|b| build::run_as_root(&b.filterd, &args))
        }
        Command::Demo => build::build_all().and_then(|b| demo::run(&b)),
        Command::Test => build::build_all().and_then(|b| test::run(&b)),
        Command::Vm {
            kernel,
            timeout,
            command,
        } => match vm::main(&kernel, Duration::from_secs(timeout), &command) {
            Ok(status) => std::process::exit(status),
            Err(e) => Err(e),
        },
        Command::Bench(args) => bench::main(&args),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
