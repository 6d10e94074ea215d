//! `filterctl`: manage a running `filterd` over its REST API (TCP or its Unix socket), check
//! policy files, explain decisions (online, or offline against a policy file) and follow the
//! live feed of refusals.

use anyhow::{bail, Context};
use clap::Parser;
use filter_userspace::cli::{Command, ExplainArgs, Filterctl as Args, PolicyCommand, RulesCommand};
use filter_userspace::client::{self, Client};
use filter_userspace::policy::{self, RuleSetSpec, RuleSpec};
use filter_userspace::{auth, document, explain};
use serde_json::Value;

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("filterctl: {e:#}");
            // `policy diff` keeps 1 for "differs", as diff(1) does.
            let trouble = matches!(args.command, Command::Policy(PolicyCommand::Diff { .. }));
            std::process::exit(if trouble { 2 } else { 1 });
        }
    }
}

struct Api<'a> {
    args: &'a Args,
    client: Client,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, body: Option<String>) -> anyhow::Result<Value> {
        let resp = self
            .client
            .call(method, path, body.as_deref().map(str::as_bytes))?;
        let text = String::from_utf8_lossy(&resp.body).into_owned();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        check_status(self.args, resp.status, path, &json, &text)?;
        Ok(json)
    }
}

fn check_status(
    args: &Args,
    status: u16,
    path: &str,
    json: &Value,
    text: &str,
) -> anyhow::Result<()> {
    if status == 401 {
        bail!(
            "filterd refused the token from {} (401): is it the file filterd uses as --token-file?",
            args.token_file.display()
        );
    }
    if !(200..300).contains(&status) {
        bail!(
            "{status} {path}: {}",
            json.get("error").and_then(|e| e.as_str()).unwrap_or(text)
        );
    }
    Ok(())
}

fn api(args: &Args) -> anyhow::Result<Api<'_>> {
    let token = match auth::read(&args.token_file) {
        Ok(t) => Some(t),
        // A daemon started with --no-auth needs none; say why a 401 happens if it does.
        Err(auth::TokenError::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            None
        }
        Err(e) => return Err(e).context("reading the API token (see --token-file)"),
    };
    let endpoint = client::endpoint(&args.api, args.api_socket.as_deref())?;
    Ok(Api {
        args,
        client: Client::new(endpoint, token),
    })
}

/// A policy file or directory checked locally, with the daemon's own checker: every error,
/// placed.
fn checked_file(file: &std::path::Path) -> anyhow::Result<policy::Policy> {
    document::check_source(file).map(|(p, _)| p).map_err(|d| {
        anyhow::anyhow!(
            "{}\n{} error{} in {}",
            document::render_all(&d),
            d.len(),
            if d.len() == 1 { "" } else { "s" },
            file.display()
        )
    })
}

fn run(args: &Args) -> anyhow::Result<i32> {
    match &args.command {
        Command::Status => {
            let v = api(args)?.call("GET", "/v1/status", None)?;
            if args.json {
                println!("{v}");
                return Ok(0);
            }
            let dp = &v["dataplane"];
            let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
            let ifaces: Vec<&str> = dp["interfaces"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let api_shown = match &args.api_socket {
                Some(p) => p.display().to_string(),
                None => args.api.clone(),
            };
            println!("{:<16} {}", "API", api_shown);
            println!(
                "{:<16} {} (git {})",
                "VERSION",
                s(&v["version"]),
                s(&v["build"]["revision"])
            );
            println!("{:<16} {}", "INTERFACES", ifaces.join(", "));
            println!("{:<16} {}", "FAIL MODE", s(&v["fail_mode"]));
            println!("{:<16} {}", "ATTACH", s(&dp["attach"]));
            println!("{:<16} {}", "PINNED", dp["pinned"]);
            println!("{:<16} {}", "DRY RUN", dp["dry_run"]);
            println!("{:<16} {}", "REVISION", v["revision"]);
            println!(
                "{:<16} {} exact, {} prefix",
                "RULES", v["rules"]["exact"], v["rules"]["prefix"]
            );
            let p = &v["policy"];
            println!(
                "{:<16} {}{}",
                "POLICY",
                match p["source"].as_str() {
                    Some("memory") | None => "in memory (changes are not persisted)".to_owned(),
                    Some(kind) => format!("{kind} {}", s(&p["path"])),
                },
                if p["read_only"] == true {
                    " (read-only: change the file)"
                } else {
                    ""
                }
            );
            if p["health"]["ok"] == false {
                println!(
                    "{:<16} the source's current version is refused:",
                    "POLICY ERROR"
                );
                for e in p["health"]["errors"].as_array().into_iter().flatten() {
                    println!("{:<16} {}", "", e.as_str().unwrap_or(""));
                }
            }
            if let Some(c) = v["last_change"].as_object() {
                println!(
                    "{:<16} revision {} by {} ({}) at {}: {}",
                    "LAST CHANGE",
                    c["revision"],
                    s(&c["who"]),
                    s(&c["via"]),
                    s(&c["at"]),
                    s(&c["summary"])
                );
            }
        }
        Command::Stats => {
            let v = api(args)?.call("GET", "/v1/stats", None)?;
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
            let v = api(args)?.call("GET", "/v1/rules", None)?;
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
            let v = api(args)?.call("POST", "/v1/rules", Some(serde_json::to_string(&spec)?))?;
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
            api(args)?.call("DELETE", &format!("/v1/rules?path={q}{m}"), None)?;
            println!("rule for {path} removed");
        }
        Command::Rules(RulesCommand::Replace { file }) => {
            let p = checked_file(file)?;
            let v = api(args)?.call(
                "PUT",
                "/v1/policy",
                Some(serde_json::to_string(&p.to_file(None))?),
            )?;
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
        Command::Policy(PolicyCommand::Check { file }) => match document::check_source(file) {
            Ok((p, _)) => println!(
                "{} is valid: {} rules ({} exact, {} prefix)",
                file.display(),
                p.rules.len(),
                p.count(policy::MatchKind::Exact),
                p.count(policy::MatchKind::Prefix)
            ),
            Err(d) => {
                eprintln!("{}", document::render_all(&d));
                eprintln!(
                    "{} error{} in {}",
                    d.len(),
                    if d.len() == 1 { "" } else { "s" },
                    file.display()
                );
                return Ok(1);
            }
        },
        Command::Policy(PolicyCommand::Diff { file }) => {
            let p = checked_file(file)?;
            let v = api(args)?.call(
                "PUT",
                "/v1/policy?dry_run=true",
                Some(serde_json::to_string(&p.to_file(None))?),
            )?;
            let changes: filter_userspace::diff::PolicyDiff =
                serde_json::from_value(v["changes"].clone())
                    .context("the daemon's dry run answer")?;
            if args.json {
                println!("{v}");
            } else if changes.is_empty() {
                println!(
                    "no changes: {} holds the policy in force (revision {})",
                    file.display(),
                    v["revision"]
                );
            } else {
                println!("{}", changes.render());
                println!(
                    "(dry run: revision {} would become {}; nothing changed)",
                    v["revision"], v["would_be_revision"]
                );
            }
            return Ok(i32::from(!changes.is_empty()));
        }
        Command::Explain(e) => return explain_cmd(args, e),
        Command::Events => {
            let a = api(args)?;
            let mut c = a.client.clone();
            c.timeout = None;
            let mut s = c.send("GET", "/v1/events", None)?;
            if s.status != 200 {
                let status = s.status;
                let text = String::from_utf8_lossy(&s.rest()?).into_owned();
                let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                check_status(args, status, "/v1/events", &json, &text)?;
                bail!("{status} /v1/events");
            }
            if !args.json {
                eprintln!("following refusals and monitor hits (Ctrl-C to stop)");
            }
            while let Some(line) = s.next_line().context("reading the event feed")? {
                if line.is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["type"] == "heartbeat" {
                    continue;
                }
                if args.json {
                    println!("{line}");
                } else {
                    println!("{}", event_line(&v));
                }
            }
            eprintln!("filterctl: the daemon ended the feed (it is stopping)");
        }
    }
    Ok(0)
}

/// One event as a line: time, client, method, path, answer, rule.
fn event_line(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    if v["type"] == "lost" {
        return format!("... {} events lost (this reader fell behind)", v["count"]);
    }
    let answer = match v["answer"].as_u64() {
        Some(a) if v["result"] == "sent" => a.to_string(),
        Some(a) => format!("{a} ({})", s("result")),
        None => "monitor (passed)".into(),
    };
    let rule = match (s("rule"), s("match")) {
        (r, _) if r.is_empty() => String::new(),
        (r, m) => format!("  rule {r} ({m})"),
    };
    format!(
        "{}  {:<22} {:<7} {:<30} -> {answer}  [{}]{rule}",
        s("time"),
        s("client"),
        s("method"),
        s("path"),
        s("reason")
    )
}

fn explain_cmd(args: &Args, e: &ExplainArgs) -> anyhow::Result<i32> {
    let v: Value = match &e.policy {
        Some(file) => {
            let p = checked_file(file)?;
            let opts = explain::Options { dry_run: e.dry_run };
            serde_json::to_value(explain::explain(
                &p, &opts, &e.method, &e.target, &e.headers,
            )?)?
        }
        None => {
            let mut q = format!(
                "/v1/explain?method={}&target={}",
                url_encode(&e.method),
                url_encode(&e.target)
            );
            for h in &e.headers {
                q.push_str(&format!("&header={}", url_encode(h)));
            }
            api(args)?.call("GET", &q, None)?
        }
    };
    if args.json {
        println!("{v}");
        return Ok(0);
    }
    let s = |k: &str| v[k].as_str().map(str::to_owned);
    let list = |k: &str| {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!("{:<10} {} {}", "request", e.method, e.target);
    for h in &e.headers {
        println!("{:<10} {h}", "");
    }
    if let Some(p) = s("path") {
        println!("{:<10} {p}", "path");
    }
    match (s("canonical"), s("path_refused")) {
        (Some(c), _) => println!("{:<10} {c}", "canonical"),
        (None, Some(why)) => println!("{:<10} refused: {why}", "canonical"),
        _ => {}
    }
    // A path refused before any rule was looked up (`paths = "strict"`) shows no rule.
    if v["canonical"].is_string() && v["path_refused"].is_null() {
        match v["rule"].as_object() {
            Some(r) => println!(
                "{:<10} {} ({}, {}): {}",
                "rule",
                r["path"].as_str().unwrap_or(""),
                r["match"].as_str().unwrap_or(""),
                r["mode"].as_str().unwrap_or(""),
                r["methods"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            ),
            None => println!("{:<10} none: the policy's default applies", "rule"),
        }
        let allow = list("allow");
        println!(
            "{:<10} {}",
            "allow",
            if allow == "*" {
                "any method".into()
            } else {
                allow
            }
        );
    }
    if let Some(m) = s("override_method") {
        println!("{:<10} {m} (a method-override header)", "override");
    }
    println!("{:<10} {}", "counted", list("reasons"));
    let answer = match (s("verdict").as_deref(), v["answer"].as_u64()) {
        (Some("refuse"), Some(a)) => format!("{a}: the backend is reset, the client answered {a}"),
        (Some("monitor"), _) => "passes (monitor: counted and logged as a refusal)".into(),
        _ => "passes to the backend".into(),
    };
    println!("{:<10} {answer}", "answer");
    println!("{}", s("summary").unwrap_or_default());
    Ok(0)
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
