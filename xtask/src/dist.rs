//! `cargo xtask dist`: what a package ships beside the binaries, generated from the clap
//! definitions (`filter_userspace::cli`): shell completions (bash, zsh, fish) and man pages
//! (`filterd(8)`, `filterctl(1)`), into `target/dist/`. With `--deb`, also a Debian package
//! assembled with `dpkg-deb`: both binaries, the systemd unit, the docs, the completions and
//! man pages, and the example policy as a conffile (`/etc/filterd/policy.toml`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap_complete::Shell;

use crate::build::{run, Built};

/// Completions and man pages under `out`.
pub struct Generated {
    pub completions: Vec<(Shell, String, PathBuf)>,
    pub man: Vec<PathBuf>,
}

/// Write the completions and man pages of both commands under `out`.
pub fn generate(out: &Path) -> anyhow::Result<Generated> {
    let comp_dir = out.join("completions");
    let man_dir = out.join("man");
    std::fs::create_dir_all(&comp_dir)?;
    std::fs::create_dir_all(&man_dir)?;
    let mut completions = Vec::new();
    let mut man = Vec::new();
    for (mut cmd, section) in [
        (filter_userspace::cli::filterd_command(), "8"),
        (filter_userspace::cli::filterctl_command(), "1"),
    ] {
        let name = cmd.get_name().to_owned();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let path = clap_complete::generate_to(shell, &mut cmd, &name, &comp_dir)
                .with_context(|| format!("{shell} completions of {name}"))?;
            completions.push((shell, name.clone(), path));
        }
        cmd.build();
        // The command's page, and one per subcommand (`filterctl-explain(1)`, ...).
        let mut pages = vec![(name.clone(), cmd.clone())];
        let mut stack: Vec<(String, clap::Command)> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .map(|s| (format!("{name}-{}", s.get_name()), s.clone()))
            .collect();
        while let Some((page_name, sub)) = stack.pop() {
            stack.extend(
                sub.get_subcommands()
                    .filter(|s| s.get_name() != "help")
                    .map(|s| (format!("{page_name}-{}", s.get_name()), s.clone())),
            );
            let bin = page_name.replace('-', " ");
            pages.push((
                page_name.clone(),
                sub.clone().display_name(page_name).bin_name(bin),
            ));
        }
        for (page_name, page_cmd) in pages {
            let page = man_dir.join(format!("{page_name}.{section}"));
            let mut buf = Vec::new();
            clap_mangen::Man::new(page_cmd)
                .section(section)
                .manual("filterd")
                .source(format!("filterd {}", env!("CARGO_PKG_VERSION")))
                .render(&mut buf)?;
            std::fs::write(&page, buf)?;
            man.push(page);
        }
    }
    Ok(Generated { completions, man })
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::copy(from, to).with_context(|| format!("{} -> {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(to: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(to, text)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn arch() -> anyhow::Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("dpkg --print-architecture (the .deb is built with dpkg-deb)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Assemble the `.deb` from the built binaries and the generated files; returns its path.
pub fn deb(built: &Built, gen: &Generated, out: &Path) -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let arch = arch()?;
    let name = format!("filterd_{version}_{arch}");
    let root = out.join("deb").join(&name);
    let _ = std::fs::remove_dir_all(&root);
    let src = &built.root;
    copy(&built.filterd, &root.join("usr/bin/filterd"), 0o755)?;
    copy(&built.filterctl, &root.join("usr/bin/filterctl"), 0o755)?;
    copy(
        &src.join("dist/filterd.service"),
        &root.join("lib/systemd/system/filterd.service"),
        0o644,
    )?;
    copy(
        &src.join("dist/policy.toml"),
        &root.join("etc/filterd/policy.toml"),
        0o644,
    )?;
    copy(
        &src.join("dist/deb/default"),
        &root.join("etc/default/filterd"),
        0o644,
    )?;
    let doc = root.join("usr/share/doc/filterd");
    // The guides keep the source tree's layout, so their links to each other resolve; a link to
    // anything not shipped becomes text naming the file in the source tree.
    for from in SHIPPED_DOCS {
        let text =
            std::fs::read_to_string(src.join(from)).with_context(|| format!("reading {from}"))?;
        write(&doc.join(from), &unlink_unshipped(&text, from), 0o644)?;
    }
    for (from, to) in [
        ("dist/deb/copyright", "copyright"),
        ("dist/k8s/filterd.yaml", "examples/filterd.yaml"),
    ] {
        copy(&src.join(from), &doc.join(to), 0o644)?;
    }
    for page in &gen.man {
        let section = page
            .extension()
            .and_then(|e| e.to_str())
            .context("man page without a section")?;
        let dest = root
            .join(format!("usr/share/man/man{section}"))
            .join(page.file_name().unwrap());
        copy(page, &dest, 0o644)?;
        run(Command::new("gzip").args(["-9nf"]).arg(&dest))?;
    }
    for (shell, cmd, path) in &gen.completions {
        let dest = match shell {
            Shell::Bash => root.join("usr/share/bash-completion/completions").join(cmd),
            Shell::Zsh => root
                .join("usr/share/zsh/vendor-completions")
                .join(format!("_{cmd}")),
            Shell::Fish => root
                .join("usr/share/fish/vendor_completions.d")
                .join(format!("{cmd}.fish")),
            _ => continue,
        };
        copy(path, &dest, 0o644)?;
    }
    let size_kib = dir_size(&root)? / 1024;
    let control = format!(
        "Package: filterd\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: filterd maintainers <filterd@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6 (>= 2.34)\n\
         Recommends: systemd\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: file:///usr/share/doc/filterd/README.md\n\
         Description: HTTP method firewall in the Linux kernel (eBPF TC classifiers)\n \
         filterd loads a TC classifier onto network interfaces that reads every\n \
         plaintext HTTP/1.x request line, canonicalizes the path and refuses methods\n \
         the path does not allow: the backend never sees the request and the client\n \
         gets 405 Method Not Allowed with the Allow header. filterctl manages it:\n \
         rules, policy checks and diffs, explanations of decisions, a live feed of\n \
         refusals. Needs Linux 6.1 or newer with BTF.\n"
    );
    let debian = root.join("DEBIAN");
    write(&debian.join("control"), &control, 0o644)?;
    write(
        &debian.join("conffiles"),
        "/etc/filterd/policy.toml\n/etc/default/filterd\n",
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &src.join("dist/deb").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    let deb = out.join(format!("{name}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb))?;
    Ok(deb)
}

/// The Markdown guides the package ships under `/usr/share/doc/filterd`, at their paths in the
/// source tree.
const SHIPPED_DOCS: [&str; 4] = [
    "README.md",
    "ARCHITECTURE.md",
    "docs/control-plane.md",
    "docs/BENCHMARKS.md",
];

/// `text` (the Markdown file at `path` in the source tree) with every relative link to a file
/// the package does not ship turned into text: `[label](target)` becomes `label (target in
/// the source tree)`. Links to web addresses, to anchors and to shipped guides stay.
pub fn unlink_unshipped(text: &str, path: &str) -> String {
    let dir = Path::new(path).parent().unwrap_or(Path::new(""));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open..];
        let Some((label, target, len)) = link_at(after) else {
            out.push('[');
            rest = &after[1..];
            continue;
        };
        let file = target.split('#').next().unwrap_or("");
        let external = file.is_empty() || file.contains(':') || file.starts_with('/');
        let shown = normalize(&dir.join(file));
        if external || SHIPPED_DOCS.contains(&shown.as_str()) {
            out.push_str(&after[..len]);
        } else {
            if label.trim_matches('`') == file {
                out.push_str(&format!("{label} (in the source tree)"));
            } else {
                out.push_str(&format!("{label} (`{shown}` in the source tree)"));
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// The inline link `[label](target)` at the start of `s`: its label, target and length.
fn link_at(s: &str) -> Option<(&str, &str, usize)> {
    let mut depth = 0;
    let mut close = None;
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            '\n' => return None,
            _ => {}
        }
    }
    let close = close?;
    let tail = s[close + 1..].strip_prefix('(')?;
    let end = tail.find(')')?;
    let target = &tail[..end];
    if target.is_empty() || target.contains(char::is_whitespace) {
        return None;
    }
    Some((&s[1..close], target, close + 1 + 1 + end + 1))
}

/// `a/./b/../c` as `a/c` (no file system access).
fn normalize(p: &Path) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                parts.pop();
            }
            c => parts.push(c.as_os_str().to_str().unwrap_or("")),
        }
    }
    parts.join("/")
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// `cargo xtask dist [--deb]`.
pub fn main(deb_too: bool) -> anyhow::Result<()> {
    let root = crate::build::workspace_root();
    let out = root.join("target/dist");
    let gen = generate(&out)?;
    for (_, _, p) in &gen.completions {
        println!("{}", p.display());
    }
    for p in &gen.man {
        println!("{}", p.display());
    }
    if deb_too {
        let built = crate::build::build_all()?;
        if !built.filterd.is_file() {
            bail!("{} was not built", built.filterd.display());
        }
        let deb = deb(&built, &gen, &out)?;
        println!("{}", deb.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unlink_unshipped;

    #[test]
    fn links_to_unshipped_files_become_text_and_the_rest_stay() {
        let md = "See [the guide](docs/control-plane.md#rest-api), [CI](.ci/run), \
                  [`tests/README.md`](tests/README.md), [web](https://example.org/x) and \
                  [top](#top); a [bracket] alone.";
        assert_eq!(
            unlink_unshipped(md, "README.md"),
            "See [the guide](docs/control-plane.md#rest-api), CI (`.ci/run` in the source \
             tree), `tests/README.md` (in the source tree), [web](https://example.org/x) and \
             [top](#top); a [bracket] alone."
        );
        assert_eq!(
            unlink_unshipped(
                "[raw](bench/results.json) [up](../README.md)",
                "docs/BENCHMARKS.md"
            ),
            "raw (`docs/bench/results.json` in the source tree) [up](../README.md)"
        );
    }
}
