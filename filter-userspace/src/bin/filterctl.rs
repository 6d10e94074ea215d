//! `filterctl`: manage a running `filterd` over its REST API.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use filter_userspace::policy::{RuleSetSpec, RuleSpec};

#[derive(Parser, Debug)]
#[command(version, about = "Manage a running filterd")]
struct Args {
    /// Base URL of filterd's API.
    #[arg(long, default_value = "http://127.0.0.1:9405", global = true)]
    api: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage rules.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Show the verdict counters.
    Stats,
    /// Check that the daemon answers.
    Status,
}

#[derive(Subcommand, Debug)]
enum RulesCommand {
    /// List the rules in force.
    List,
    /// Add or replace the rule for PATH.
    Add {
        path: String,
        #[arg(required = true)]
        methods: Vec<String>,
    },
    /// Remove the rule for PATH.
    Remove { path: String },
    /// Replace every rule with those in a policy file (TOML, `[[rules]]`).
    Replace {
        #[arg(short = 'f', long = "file")]
        file: std::path::PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("filterctl: {e:#}");
        std::process::exit(1);
    }
}

fn call(
    args: &Args,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{}", args.api.trim_end_matches('/'), path);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = match (method, body) {
        ("GET", _) => agent.get(&url).call(),
        ("DELETE", _) => agent.delete(&url).call(),
        ("POST", Some(b)) => agent.post(&url).content_type("application/json").send(b),
        ("PUT", Some(b)) => agent.put(&url).content_type("application/json").send(b),
        _ => unreachable!("every call site passes a body with POST and PUT"),
    }
    .with_context(|| {
        format!(
            "cannot reach filterd at {} (is it running? see --api)",
            args.api
        )
    })?;
    let status = resp.status();
    let text = resp.into_body().read_to_string().unwrap_or_default();
    let json: serde_json::Value = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    if !status.is_success() {
        bail!(
            "{} {}: {}",
            status.as_u16(),
            path,
            json.get("error").and_then(|e| e.as_str()).unwrap_or(&text)
        );
    }
    Ok(json)
}

fn run(args: &Args) -> anyhow::Result<()> {
    match &args.command {
        Command::Status => {
            call(args, "GET", "/healthz", None)?;
            println!("filterd at {} is up", args.api);
        }
        Command::Stats => {
            let v = call(args, "GET", "/v1/stats", None)?;
            if args.json {
                println!("{v}");
            } else if let Some(c) = v["counters"].as_object() {
                for (name, n) in c {
                    println!("{name:<20} {n}");
                }
            }
        }
        Command::Rules(RulesCommand::List) => {
            let v = call(args, "GET", "/v1/rules", None)?;
            if args.json {
                println!("{v}");
            } else {
                let set: RuleSetSpec = serde_json::from_value(v)?;
                println!("{:<40} METHODS", "PATH");
                for r in set.rules {
                    println!("{:<40} {}", r.path, r.methods.join(", "));
                }
            }
        }
        Command::Rules(RulesCommand::Add { path, methods }) => {
            let body = serde_json::to_string(&RuleSpec {
                path: path.clone(),
                methods: methods.clone(),
            })?;
            call(args, "POST", "/v1/rules", Some(body))?;
            println!("rule for {path} set: {}", methods.join(", "));
        }
        Command::Rules(RulesCommand::Remove { path }) => {
            let q: String = url_encode(path);
            call(args, "DELETE", &format!("/v1/rules?path={q}"), None)?;
            println!("rule for {path} removed");
        }
        Command::Rules(RulesCommand::Replace { file }) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let parsed: filter_userspace::policy::PolicyFile = toml::from_str(&text)
                .with_context(|| format!("{} is not a valid policy file", file.display()))?;
            let body = serde_json::to_string(&RuleSetSpec {
                rules: parsed.rules,
            })?;
            let v = call(args, "PUT", "/v1/rules", Some(body))?;
            println!(
                "{} rules in force",
                v["rules"].as_array().map_or(0, |r| r.len())
            );
        }
    }
    Ok(())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
