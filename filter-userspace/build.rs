//! Embeds the kernel object that `cargo xtask build` produced, if there is one.
//!
//! A plain `cargo build` without the BPF toolchain still works: the daemon is then built with
//! an empty object and says at start how to get a real one.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("filter-ebpf.o");
    let object = env::var_os("FILTER_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/filter-ebpf"));
    println!("cargo:rerun-if-env-changed=FILTER_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no kernel object at {}: filterd will refuse to start (run `cargo xtask build`)",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
