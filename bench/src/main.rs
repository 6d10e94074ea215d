//! `filter-bench`: run the benchmarks and write `docs/BENCHMARKS.md` (root; `cargo xtask bench`
//! builds and runs it), or, as `filter-bench flood`, be the flood's generator inside the lab.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Benchmark the HTTP method firewall and judge its targets (docs/BENCHMARKS.md)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: filter_bench::Args,
}

#[derive(Subcommand)]
enum Command {
    /// The flood's generator (run by the bench in the lab's client namespace): refused requests
    /// at a fixed rate, one connection each; prints one BENCH_JSON line.
    #[command(hide = true)]
    Flood(filter_bench::flood::FloodSpec),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Flood(spec)) => filter_bench::flood::generate(&spec).and_then(|r| {
            println!("BENCH_JSON {}", serde_json::to_string(&r)?);
            Ok(())
        }),
        None => filter_bench::run::main(&cli.args),
    };
    if let Err(e) = result {
        eprintln!("filter-bench: {e:#}");
        std::process::exit(1);
    }
}
