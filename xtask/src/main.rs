//! `cargo xtask`: what cargo alone cannot do for this workspace.
//!
//! Bootstraps the BPF toolchain (the nightly's `rust-src` and a `bpf-linker` built against
//! that nightly's own libLLVM), builds the kernel object and the daemon with the object
//! embedded, and runs the privileged things: the daemon, the demo, the test tiers that need
//! root, the kernel matrix (other kernels under QEMU, provisioned here) and the benchmarks
//! (built here, run from their own crate, `bench/`). It must stay
//! plain Rust with few dependencies: no shell scripts.

mod bench;
mod build;
mod demo;
mod dist;
mod kernels;
mod test;
mod verifier_table;
mod vm;

use std::path::PathBuf;
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
    /// Build, then run every test tier on the host and the verifier and kernel fixture tiers
    /// on the kernel matrix (6.1 and 6.12 under QEMU): what CI runs.
    Test {
        /// Only these kernels: `host` (every tier on the running kernel), `6.1`, `6.12` or the
        /// path of a kernel image (the verifier and kernel fixture tiers in a QEMU guest), `all`
        /// (6.1, 6.12, host: the default). Repeatable, or a comma list.
        #[arg(long, value_name = "KERNEL")]
        kernel: Vec<String>,
        /// Deadline of one guest, boot to power-off, in seconds; a guest still running then is
        /// killed and reported.
        #[arg(long, value_name = "SECS", default_value_t = vm::DEFAULT_TIMEOUT.as_secs())]
        vm_timeout: u64,
    },
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
    /// Render the verifier records of `cargo xtask test` (target/verifier/*.jsonl, or FILES)
    /// as one table (program x kernel) and write it into ARCHITECTURE.md.
    VerifierTable {
        /// Print the table only; leave ARCHITECTURE.md alone.
        #[arg(long)]
        print: bool,
        files: Vec<PathBuf>,
    },
    /// Build, then run the benchmarks (`filter-bench`, the `bench/` crate) and write
    /// docs/BENCHMARKS.md and docs/bench/ (~10 min, root). Arguments go to the benchmark:
    /// `cargo xtask bench --help` lists them.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Generate shell completions and man pages from the clap definitions (target/dist/);
    /// with --deb, build and assemble the Debian package (dpkg-deb).
    Dist {
        /// Also build the binaries and the .deb (target/dist/filterd_VERSION_ARCH.deb).
        #[arg(long)]
        deb: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build => build::build_all().map(|_| ()),
        Command::Run { args } => {
            build::build_all().and_then(|b| build::run_as_root(&b.filterd, &args))
        }
        Command::Demo => build::build_all().and_then(|b| demo::run(&b)),
        Command::Test { kernel, vm_timeout } => {
            build::build_all().and_then(|b| test::run(&b, &kernel, Duration::from_secs(vm_timeout)))
        }
        Command::Vm {
            kernel,
            timeout,
            command,
        } => match vm::main(&kernel, Duration::from_secs(timeout), &command) {
            Ok(status) => std::process::exit(status),
            Err(e) => Err(e),
        },
        Command::VerifierTable { print, files } => {
            verifier_table::main(&build::workspace_root(), &files, print)
        }
        Command::Bench { args } => bench::main(&args),
        Command::Dist { deb } => dist::main(deb),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
