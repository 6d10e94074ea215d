//! `cargo xtask verifier-table`: the verifier records of the kernel matrix as one markdown
//! table (a row per program, a column per kernel), written between the
//! `<!-- verifier-table:begin -->` and `<!-- verifier-table:end -->` markers of
//! `ARCHITECTURE.md`.
//!
//! The records are the JSON lines `tests/tests/verifier.rs` writes
//! (`filter_tests::verifier::Record`), which `cargo xtask test` keeps per kernel in
//! `target/verifier/<release>.jsonl`. Owns: the table's layout and that region of the
//! document, nothing else in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use filter_tests::verifier::{Record, INSN_BUDGET, INSN_LIMIT, STACK_BUDGET, STACK_LIMIT};

pub const BEGIN: &str = "<!-- verifier-table:begin -->";
pub const END: &str = "<!-- verifier-table:end -->";

/// Every record in the `*.jsonl` files of `dir`.
pub fn load(dir: &Path) -> Result<Vec<Record>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    load_files(&files)
}

/// Every record in `files` (JSON lines).
pub fn load_files(files: &[PathBuf]) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        records.extend(parse(&text).with_context(|| format!("in {}", f.display()))?);
    }
    Ok(records)
}

/// The records of JSON lines (blank lines skipped).
pub fn parse(text: &str) -> Result<Vec<Record>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("line {}", i + 1)))
        .collect()
}

/// Orders kernel releases by their numbers (`6.1.0-54-amd64` before `6.12.111+deb12-amd64`).
fn release_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect()
}

/// `1234567` as `1,234,567`.
fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cell(r: &Record) -> String {
    let insns = r
        .insns
        .map_or("? insns".into(), |n| format!("{} insns", thousands(n)));
    let text = if r.accepted {
        let stack = r
            .stack_chain
            .map_or("stack ?".into(), |s| format!("stack {s} B"));
        match r.failure() {
            None => format!("{insns}, {stack}"),
            Some(_) => format!("{insns}, {stack}: **over budget**"),
        }
    } else {
        format!(
            "**refused**: {}",
            r.reason.as_deref().unwrap_or("(no reason in the log)")
        )
    };
    text.replace('|', "\\|")
}

/// The markdown table of `records`: a row per program (in the order the records first name
/// them), a column per kernel (by version; a later record of the same program and kernel
/// replaces an earlier one).
pub fn render(records: &[Record]) -> String {
    let mut kernels: Vec<&str> = records.iter().map(|r| r.kernel.as_str()).collect();
    kernels.sort_by_key(|k| release_key(k));
    kernels.dedup();
    // Programs in the order the records first name them (the test writes them in the
    // object's pipeline order).
    let mut programs: Vec<&str> = Vec::new();
    let mut by: BTreeMap<(&str, &str), &Record> = BTreeMap::new();
    for r in records {
        if !programs.contains(&r.program.as_str()) {
            programs.push(&r.program);
        }
        by.insert((r.program.as_str(), r.kernel.as_str()), r);
    }
    let mut s = format!(
        "Processed instructions (budget {}: {} % of the verifier's {}) and the stack of the\n\
         deepest call chain (budget {STACK_BUDGET} of {STACK_LIMIT} bytes), per program and kernel:\n\n",
        thousands(INSN_BUDGET),
        u64::from(INSN_BUDGET) * 100 / u64::from(INSN_LIMIT),
        thousands(INSN_LIMIT),
    );
    s += "| program |";
    for k in &kernels {
        s += &format!(" {k} |");
    }
    s += "\n|---|";
    s += &"---|".repeat(kernels.len());
    s += "\n";
    for program in &programs {
        s += &format!("| `{program}` |");
        for k in &kernels {
            s += &format!(
                " {} |",
                by.get(&(*program, *k)).map_or("—".into(), |r| cell(r))
            );
        }
        s += "\n";
    }
    s
}

/// `doc` with the text between the markers replaced by `table`.
pub fn replace_region(doc: &str, table: &str) -> Result<String> {
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        bail!("no `{BEGIN}` … `{END}` region: put the two markers where the table belongs");
    };
    if e < b {
        bail!("`{END}` comes before `{BEGIN}`");
    }
    let head = &doc[..b + BEGIN.len()];
    let tail = &doc[e..];
    Ok(format!(
        "{head}\n{}{tail}",
        table.trim_end().to_owned() + "\n"
    ))
}

/// Renders the records of `files` (default: `target/verifier/*.jsonl`) and writes the table
/// into `ARCHITECTURE.md` (or only prints it).
pub fn main(root: &Path, files: &[PathBuf], print_only: bool) -> Result<()> {
    let dir = root.join("target/verifier");
    let records = if files.is_empty() {
        load(&dir).with_context(|| {
            "no verifier records: run `cargo xtask test` (or `--kernel …`) first".to_string()
        })?
    } else {
        load_files(files)?
    };
    if records.is_empty() {
        bail!(
            "no verifier records in {}: run `cargo xtask test` first",
            dir.display()
        );
    }
    let table = render(&records);
    println!("{table}");
    if print_only {
        return Ok(());
    }
    let path = root.join("ARCHITECTURE.md");
    let doc = std::fs::read_to_string(&path)?;
    let new = replace_region(&doc, &table).with_context(|| format!("in {}", path.display()))?;
    if new != doc {
        std::fs::write(&path, new)?;
        eprintln!("xtask: wrote the table into {}", path.display());
    } else {
        eprintln!("xtask: {} already has this table", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"kernel":"6.12.111+deb12-amd64","program":"http_ingress","accepted":true,"insns":177691,"insn_budget":300000,"stack":[8,304],"stack_chain":352,"stack_budget":384,"reason":null}
{"kernel":"6.12.111+deb12-amd64","program":"http_egress","accepted":true,"insns":128002,"insn_budget":300000,"stack":[240,0],"stack_chain":576,"stack_budget":384,"reason":null}

{"kernel":"6.18.44-fc-v1300","program":"http_ingress","accepted":false,"insns":1000001,"insn_budget":300000,"stack":null,"stack_chain":null,"stack_budget":384,"reason":"BPF program is too large. Processed 1000001 insn"}
{"kernel":"6.1.0-54-amd64","program":"http_ingress","accepted":false,"insns":null,"insn_budget":300000,"stack":null,"stack_chain":null,"stack_budget":384,"reason":"combined stack size of 3 calls is 544. Too large"}
"#;

    #[test]
    fn renders_one_row_per_program_and_a_column_per_kernel_in_version_order() {
        let records = parse(LINES).unwrap();
        assert_eq!(records.len(), 4);
        let table = render(&records);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with(
            "Processed instructions (budget 300,000: 30 % of the verifier's 1,000,000)"
        ));
        assert!(lines[1].starts_with("deepest call chain (budget 384 of 512 bytes)"));
        assert_eq!(
            lines[3],
            "| program | 6.1.0-54-amd64 | 6.12.111+deb12-amd64 | 6.18.44-fc-v1300 |"
        );
        assert_eq!(lines[4], "|---|---|---|---|");
        assert_eq!(
            lines[5],
            "| `http_ingress` | **refused**: combined stack size of 3 calls is 544. Too large \
             | 177,691 insns, stack 352 B \
             | **refused**: BPF program is too large. Processed 1000001 insn |"
        );
        assert_eq!(
            lines[6],
            "| `http_egress` | — | 128,002 insns, stack 576 B: **over budget** | — |"
        );
        assert_eq!(lines.len(), 7);
    }

    #[test]
    fn rewrites_only_the_marked_region() {
        let doc = format!("# A\n\ntext\n\n{BEGIN}\nold table\n{END}\n\nafter\n");
        let new = replace_region(&doc, "| t |\n").unwrap();
        assert_eq!(
            new,
            format!("# A\n\ntext\n\n{BEGIN}\n| t |\n{END}\n\nafter\n")
        );
        assert_eq!(replace_region(&new, "| t |\n").unwrap(), new, "idempotent");
        assert!(replace_region("no markers", "x").is_err());
        assert!(replace_region(&format!("{END}{BEGIN}"), "x").is_err());
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_000_001), "1,000,001");
    }
}
