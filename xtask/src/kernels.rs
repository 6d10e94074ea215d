//! Provisioning of the kernel matrix: the tools that boot another kernel under QEMU and the
//! Debian kernels the matrix runs (`cargo xtask test --kernel`, `cargo xtask vm`).
//!
//! Owns, idempotently (each step checks first and does nothing when its result is there):
//! the system packages `qemu-system-x86` (the emulator), `kmod` (`depmod`, which virtme-ng
//! runs), `busybox-static` (its initramfs) and `file` (it reads the kernel's version with it),
//! installed with apt; virtme-ng in a venv of its own under `~/.cache/filterd-tools/vng`;
//! and each Debian kernel package, downloaded with `apt-get download` and unpacked with
//! `dpkg-deb -x` into `~/.cache/filterd-kernels/<package>/`, its modules' index built with
//! `depmod`. virtme-ng finds the modules of an image at `<root>/lib/modules/<release>` next
//! to `<root>/boot/vmlinuz-<release>` (it loads the 9p and virtio modules from there into the
//! guest), so nothing is copied into the host's `/lib/modules`.
//!
//! Must not: install anything but the packages named here, or touch files outside its caches.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

/// virtme-ng, pinned: the runner relies on how it starts the guest's command (`vm.rs`).
const VIRTME_NG: &str = "virtme-ng==1.42";
/// System packages the runner needs, and what for.
const APT_PACKAGES: [(&str, &str); 4] = [
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("kmod", "depmod, run by virtme-ng on a kernel's modules"),
    ("busybox-static", "virtme-ng's initramfs"),
    ("file", "virtme-ng reads a kernel image's version with it"),
];

/// A series of Debian 12 kernels the matrix runs: the package it was set up with, and the
/// pattern of its other versions (`<prefix><number><suffix>`), the newest of which is taken
/// when that exact one is no longer in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    /// What `--kernel` calls it.
    pub label: &'static str,
    pub exact: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

/// The Debian kernels of the matrix: the stock 6.1 (no TCX; 512 bytes of stack across
/// BPF-to-BPF calls) and the backported 6.12.
pub const SERIES: [Series; 2] = [
    Series {
        label: "6.1",
        exact: "linux-image-6.1.0-54-amd64-unsigned",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
    },
    Series {
        label: "6.12",
        exact: "linux-image-6.12.111+deb12-amd64-unsigned",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
];

impl Series {
    /// The number that orders this series' packages, if `name` is one of them.
    fn number(&self, name: &str) -> Option<u64> {
        let middle = name.strip_prefix(self.prefix)?.strip_suffix(self.suffix)?;
        if middle.is_empty() || !middle.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        middle.parse().ok()
    }
}

/// The packages of `series` among `names`, newest first.
pub fn candidates(series: &Series, names: &[String]) -> Vec<String> {
    let mut found: Vec<(u64, &String)> = names
        .iter()
        .filter_map(|n| Some((series.number(n)?, n)))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.dedup_by(|a, b| a.1 == b.1);
    found.into_iter().map(|(_, n)| n.clone()).collect()
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `6.1`, `6.12`, or the image's path.
    pub label: String,
    pub image: PathBuf,
}

/// The caches: `~/.cache/filterd-kernels` and `~/.cache/filterd-tools`.
fn cache(name: &str) -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache").join(name))
}

fn output(cmd: &mut Command) -> Result<std::process::Output> {
    cmd.output()
        .with_context(|| format!("cannot start {cmd:?}"))
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// `apt-get update`, at most once per run (a fresh machine has no package lists).
fn apt_update() -> Result<()> {
    if APT_UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    eprintln!("xtask: apt-get update");
    crate::build::run(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get update failed: check the machine's apt sources and its network")
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Install the missing ones of `packages` with apt (root only).
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::build::is_root() {
        bail!(
            "the kernel matrix needs {}: install them (`sudo apt-get install -y {}`) or run as root",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let install = |quiet: bool| {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        if quiet {
            ok(&mut c)
        } else {
            crate::build::run(&mut c).is_ok()
        }
    };
    // The package lists may be missing or stale: update once and retry.
    if !install(true) {
        apt_update()?;
        if !install(false) {
            bail!(
                "apt-get install {} failed (output above): check the machine's apt sources",
                missing.join(" ")
            );
        }
    }
    Ok(())
}

/// Make sure QEMU, the tools virtme-ng runs and virtme-ng itself are there; returns the
/// directory holding `vng` (it must also be on the `PATH` of `vng`: it starts `virtme-run`).
pub fn ensure_tools() -> Result<PathBuf> {
    let packages: Vec<&str> = APT_PACKAGES.iter().map(|(p, _)| *p).collect();
    apt_install(&packages).with_context(|| {
        let why: Vec<String> = APT_PACKAGES
            .iter()
            .map(|(p, w)| format!("{p} ({w})"))
            .collect();
        format!("needed: {}", why.join(", "))
    })?;

    let venv = cache("filterd-tools")?.join("vng");
    let bin = venv.join("bin");
    if ok(Command::new(bin.join("vng")).arg("--version")) {
        return Ok(bin);
    }
    eprintln!("xtask: installing {VIRTME_NG} into {}", venv.display());
    std::fs::create_dir_all(venv.parent().unwrap())?;
    let make_venv = || ok(Command::new("python3").arg("-m").arg("venv").arg(&venv));
    if !make_venv() {
        // Debian's python3 has no venv module without this package.
        apt_install(&["python3-venv"])?;
        let _ = std::fs::remove_dir_all(&venv);
        crate::build::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("cannot create a Python venv for virtme-ng (is python3 installed?)")?;
    }
    crate::build::run(
        Command::new(bin.join("pip"))
            .args(["install", "-q", VIRTME_NG])
            .env_remove("PIP_REQUIRE_VIRTUALENV"),
    )
    .with_context(|| format!("pip install {VIRTME_NG} failed: PyPI must be reachable"))?;
    if !ok(Command::new(bin.join("vng")).arg("--version")) {
        bail!(
            "{} does not run after installing {VIRTME_NG}; delete {} and retry",
            bin.join("vng").display(),
            venv.display()
        );
    }
    Ok(bin)
}

/// A kernel package unpacked in the cache, if it is complete: its image.
fn unpacked(dir: &Path) -> Option<PathBuf> {
    let release = std::fs::read_to_string(dir.join(".complete")).ok()?;
    let image = dir.join("boot").join(format!("vmlinuz-{}", release.trim()));
    image.is_file().then_some(image)
}

/// Whether apt can fetch `package` (it has a candidate version).
fn available(package: &str) -> bool {
    output(Command::new("apt-cache").args(["policy", package])).is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Candidate:"))
            .any(|c| c.trim() != "(none)")
    })
}

/// The package of `series` to download: the exact one if apt has it, else its newest other
/// version apt has.
fn choose_package(series: &Series) -> Result<String> {
    for attempt in 0..2 {
        if attempt == 1 {
            apt_update()?;
        }
        if available(series.exact) {
            return Ok(series.exact.to_owned());
        }
        let names = output(Command::new("apt-cache").args(["pkgnames", series.prefix]))?;
        let names: Vec<String> = String::from_utf8_lossy(&names.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        if let Some(p) = candidates(series, &names)
            .into_iter()
            .find(|p| available(p))
        {
            eprintln!(
                "xtask: {} is not in the archive; using {p} (the newest {}*{})",
                series.exact, series.prefix, series.suffix
            );
            return Ok(p);
        }
    }
    bail!(
        "apt has neither {} nor any other {}*{}: check that the machine's apt sources include \
         Debian 12 (bookworm) and bookworm-security",
        series.exact,
        series.prefix,
        series.suffix
    )
}

/// The kernel of `series`, downloaded and unpacked if it is not in the cache yet.
pub fn ensure_debian(series: &Series) -> Result<Kernel> {
    let root = cache("filterd-kernels")?;
    let kernel = |image| Kernel {
        label: series.label.to_owned(),
        image,
    };
    if let Some(image) = unpacked(&root.join(series.exact)) {
        return Ok(kernel(image));
    }
    // A fallback version unpacked by an earlier run.
    if let Ok(dir) = std::fs::read_dir(&root) {
        let names: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if let Some(image) = candidates(series, &names)
            .iter()
            .find_map(|n| unpacked(&root.join(n)))
        {
            return Ok(kernel(image));
        }
    }

    if !crate::build::is_root() {
        bail!(
            "the {} kernel is not in {} yet, and fetching it needs root (apt): run as root once",
            series.label,
            root.display()
        );
    }
    let package = choose_package(series)?;
    let debs = root.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let find_deb = || -> Option<PathBuf> {
        std::fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if find_deb().is_none() {
        eprintln!("xtask: downloading {package}");
        crate::build::run(
            Command::new("apt-get")
                .current_dir(&debs)
                // As root into root's directory: no need to drop to the _apt user.
                .args(["-o", "APT::Sandbox::User=root", "download", "-q", &package]),
        )
        .with_context(|| format!("apt-get download {package} failed"))?;
    }
    let deb = find_deb().with_context(|| {
        format!(
            "apt-get download {package} left no {package}_*.deb in {}",
            debs.display()
        )
    })?;

    // Unpack beside the final place and rename, so a broken run leaves no half directory.
    let dir = root.join(&package);
    let partial = root.join(format!("{package}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("xtask: unpacking {}", deb.display());
    crate::build::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial)).with_context(
        || {
            format!(
                "dpkg-deb -x {} failed (is the file complete?)",
                deb.display()
            )
        },
    )?;
    let modules = partial.join("lib/modules");
    let release = std::fs::read_dir(&modules)
        .with_context(|| format!("{package} has no lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{package} has no lib/modules/<release>"))?;
    if !partial.join(format!("boot/vmlinuz-{release}")).is_file() {
        bail!("{package} has no boot/vmlinuz-{release}");
    }
    // The package ships no modules.dep (its postinst builds it); virtme-ng finds the 9p and
    // virtio modules through it.
    crate::build::run(
        Command::new("depmod")
            .arg("-a")
            .arg("-b")
            .arg(&partial)
            .arg(&release),
    )
    .context("depmod failed (package kmod)")?;
    std::fs::write(partial.join(".complete"), &release)?;
    std::fs::rename(&partial, &dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
    let image = unpacked(&dir).context("the unpacked kernel is incomplete")?;
    Ok(kernel(image))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_the_newest_version_of_the_series_only() {
        let apt = names(&[
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-rt-amd64-unsigned",
            "linux-image-6.1.0-54-amd64-unsigned",
            "linux-image-6.1.0-54-amd64",
            "linux-image-6.12.118+deb12-amd64-unsigned",
            "linux-image-6.12.9+deb12-amd64-unsigned",
            "linux-image-6.12.118+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.113+deb12-amd64-unsigned",
            "linux-image-6.12.113+deb12-amd64-unsigned",
            "linux-image-6.1.0-x-amd64-unsigned",
        ]);
        assert_eq!(
            candidates(&SERIES[0], &apt),
            names(&[
                "linux-image-6.1.0-57-amd64-unsigned",
                "linux-image-6.1.0-54-amd64-unsigned",
                "linux-image-6.1.0-9-amd64-unsigned",
            ])
        );
        assert_eq!(
            candidates(&SERIES[1], &apt),
            names(&[
                "linux-image-6.12.118+deb12-amd64-unsigned",
                "linux-image-6.12.113+deb12-amd64-unsigned",
                "linux-image-6.12.9+deb12-amd64-unsigned",
            ])
        );
        assert!(candidates(&SERIES[1], &names(&["linux-image-6.12.1"])).is_empty());
    }

    #[test]
    fn the_exact_packages_belong_to_their_series() {
        for s in SERIES {
            assert!(s.number(s.exact).is_some(), "{}", s.exact);
        }
    }
}
