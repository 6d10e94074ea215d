//! `cargo xtask`: what cargo alone cannot do for this workspace.
//!
//! Bootstraps the BPF toolchain (the nightly's `rust-src` and a `bpf-linker` built against
//! that nightly's own libLLVM), builds the kernel object and the daemon with the object
//! embedded, and runs the privileged things: the daemon, the demo, the test tiers that need
//! root. It must stay plain Rust with few dependencies: no shell scripts.

mod bench;
mod build;
mod demo;
mod test;

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
        Command::Bench(args) => bench::main(&args),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
