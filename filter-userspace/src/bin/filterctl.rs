//! `filterctl`: manage a running `filterd` over its REST API.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use filter_userspace::auth;
use filter_userspace::policy::{self, RuleSetSpec, RuleSpec};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(version, about = "Manage a running filterd")]
struct Args {
    /// Base URL of filterd's API.
    #[arg(long, default_value = "http://127.0.0.1:9405", global = true)]
    api: String,
    /// File holding the API token (filterd's --token-file).
    #[arg(long, default_value = auth::DEFAULT_TOKEN_FILE, global = true)]
    token_file: std::path::PathBuf,
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
    /// Show the verdict and responder counters.
    Stats,
    /// Show the daemon's status: interfaces, fail mode, dry run, revision.
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
        /// Match the subtree under PATH (which must end in '/').
        #[arg(long)]
        prefix: bool,
        /// Count and log violations instead of blocking them.
        #[arg(long)]
        monitor: bool,
        /// Do not let GET imply HEAD.
        #[arg(long)]
        no_head: bool,
    },
    /// Remove the rule for PATH.
    Remove {
        path: String,
        /// Remove the prefix rule (default: the exact rule).
        #[arg(long)]
        prefix: bool,
    },
    /// Replace the whole policy (switches and rules) with a policy file (TOML).
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

struct Client<'a> {
    args: &'a Args,
    token: Option<String>,
}

impl Client<'_> {
    fn call(&self, method: &str, path: &str, body: Option<String>) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.args.api.trim_end_matches('/'), path);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .into();
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        macro_rules! with_auth {
            ($req:expr) => {{
                let r = $req;
                match &auth {
                    Some(a) => r.header("Authorization", a),
                    None => r,
                }
            }};
        }
        let resp = match (method, body) {
            ("GET", _) => with_auth!(agent.get(&url)).call(),
            ("DELETE", _) => with_auth!(agent.delete(&url)).call(),
            ("POST", Some(b)) => with_auth!(agent.post(&url))
                .content_type("application/json")
                .send(b),
            ("PUT", Some(b)) => with_auth!(agent.put(&url))
                .content_type("application/json")
                .send(b),
            _ => unreachable!("every call site passes a body with POST and PUT"),
        }
        .with_context(|| {
            format!(
                "cannot reach filterd at {} (is it running? `systemctl status filterd`; see --api)",
                self.args.api
            )
        })?;
        let status = resp.status();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.as_u16() == 401 {
            bail!(
                "filterd refused the token from {} (401): is it the file filterd uses as --token-file?",
                self.args.token_file.display()
            );
        }
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
}

fn run(args: &Args) -> anyhow::Result<()> {
    let token = match auth::read(&args.token_file) {
        Ok(t) => Some(t),
        // A daemon started with --no-auth needs none; say why a 401 happens if it does.
        Err(auth::TokenError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => return Err(e).context("reading the API token (see --token-file)"),
    };
    let client = Client { args, token };
    match &args.command {
        Command::Status => {
            let v = client.call("GET", "/v1/status", None)?;
            if args.json {
                println!("{v}");
            } else {
                let dp = &v["dataplane"];
                let ifaces: Vec<&str> = dp["interfaces"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                println!("{:<16} {}", "API", args.api);
                println!("{:<16} {}", "VERSION", v["version"].as_str().unwrap_or("?"));
                println!("{:<16} {}", "INTERFACES", ifaces.join(", "));
                println!(
                    "{:<16} {}",
                    "FAIL MODE",
                    v["fail_mode"].as_str().unwrap_or("?")
                );
                println!("{:<16} {}", "ATTACH", dp["attach"].as_str().unwrap_or("-"));
                println!("{:<16} {}", "PINNED", dp["pinned"]);
                println!("{:<16} {}", "DRY RUN", dp["dry_run"]);
                println!("{:<16} {}", "REVISION", v["revision"]);
                println!(
                    "{:<16} {} exact, {} prefix",
                    "RULES", v["rules"]["exact"], v["rules"]["prefix"]
                );
                println!(
                    "{:<16} {}",
                    "POLICY FILE",
                    v["policy_file"]
                        .as_str()
                        .unwrap_or("(none: changes are not persisted)")
                );
            }
        }
        Command::Stats => {
            let v = client.call("GET", "/v1/stats", None)?;
            if args.json {
                println!("{v}");
            } else if let Some(c) = v["counters"].as_object() {
                println!("{:<24} COUNT", "COUNTER");
                for (name, n) in c {
                    println!("{name:<24} {n}");
                }
                let rows = v["by_rule"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                if !rows.is_empty() {
                    println!();
                    println!(
                        "{:<40} {:<7} {:<10} {:<10} COUNT",
                        "RULE", "MATCH", "METHOD", "OUTCOME"
                    );
                    let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_owned();
                    for r in rows {
                        println!(
                            "{:<40} {:<7} {:<10} {:<10} {}",
                            s(r, "rule"),
                            s(r, "match"),
                            s(r, "method"),
                            s(r, "outcome"),
                            r["count"]
                        );
                    }
                }
            }
        }
        Command::Rules(RulesCommand::List) => {
            let v = client.call("GET", "/v1/rules", None)?;
            if args.json {
                println!("{v}");
            } else {
                let set: RuleSetSpec = serde_json::from_value(v)?;
                println!("{:<40} {:<7} {:<8} METHODS", "PATH", "MATCH", "MODE");
                for r in set.rules {
                    let head = if r.head == Some(false) {
                        " (GET without HEAD)"
                    } else {
                        ""
                    };
                    println!(
                        "{:<40} {:<7} {:<8} {}{head}",
                        r.path,
                        r.match_kind.as_deref().unwrap_or("exact"),
                        r.mode.as_deref().unwrap_or("enforce"),
                        r.methods.join(", ")
                    );
                }
                println!("revision {}", set.revision.unwrap_or(0));
            }
        }
        Command::Rules(RulesCommand::Add {
            path,
            methods,
            prefix,
            monitor,
            no_head,
        }) => {
            let spec = RuleSpec {
                path: path.clone(),
                methods: methods.clone(),
                match_kind: prefix.then(|| "prefix".to_owned()),
                mode: monitor.then(|| "monitor".to_owned()),
                head: no_head.then_some(false),
            };
            // Validate locally first: the same messages, without a round trip.
            policy::Rule::from_spec(0, &spec)
                .map_err(|e| anyhow::anyhow!("{}", e.to_string().replacen("rules[0].", "", 1)))?;
            let v = client.call("POST", "/v1/rules", Some(serde_json::to_string(&spec)?))?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "rule for {path} set: {} (revision {})",
                    methods.join(", "),
                    v["revision"]
                );
            }
        }
        Command::Rules(RulesCommand::Remove { path, prefix }) => {
            let q = url_encode(path);
            let m = if *prefix { "&match=prefix" } else { "" };
            client.call("DELETE", &format!("/v1/rules?path={q}{m}"), None)?;
            println!("rule for {path} removed");
        }
        Command::Rules(RulesCommand::Replace { file }) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            // Validate locally with the daemon's own parser: errors carry the file's line.
            policy::parse_toml(&text).map_err(|e| match e {
                policy::TomlError::Syntax { line, message } => {
                    anyhow::anyhow!("{}, line {line}: {message}", file.display())
                }
                policy::TomlError::Invalid { line, source } => anyhow::anyhow!(
                    "{}{}: {source}",
                    file.display(),
                    line.map(|l| format!(", line {l}")).unwrap_or_default()
                ),
            })?;
            let mut doc: policy::PolicyFile = toml::from_str(&text)?;
            // The file's own revision is the daemon's bookkeeping, not a precondition.
            doc.revision = None;
            let v = client.call("PUT", "/v1/policy", Some(serde_json::to_string(&doc)?))?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "{} rules in force (revision {})",
                    v["rules"].as_array().map_or(0, |r| r.len()),
                    v["revision"]
                );
            }
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
