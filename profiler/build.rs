//! Builds the eBPF object (`profiler-ebpf`) with aya-build and leaves it in OUT_DIR, where
//! `src/probes` embeds it. Which compiler builds it is decided here; see TOOLCHAIN.md.

use std::{env, path::Path, process::Command};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

/// The rustup toolchain name `cargo xtask setup` links to Debian's rustc-web (which ships the
/// Rust source needed by `-Z build-std=core`).
const LINKED_TOOLCHAIN: &str = "profiler-bpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PROFILER_BPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed=../profiler-common/src");
    let toolchain = choose_toolchain()?;
    let ebpf = Package {
        name: "profiler-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../profiler-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], toolchain)
        .context("building the eBPF programs failed; `cargo xtask setup` installs what they need")
}

fn choose_toolchain() -> anyhow::Result<Toolchain<'static>> {
    if let Ok(name) = env::var("PROFILER_BPF_TOOLCHAIN") {
        if !has_rust_src(&name) {
            bail!("PROFILER_BPF_TOOLCHAIN={name} has no Rust source (rust-src) for build-std");
        }
        if !name.starts_with("nightly") {
            allow_unstable();
        }
        return Ok(Toolchain::Custom(Box::leak(name.into_boxed_str())));
    }
    if has_rust_src(LINKED_TOOLCHAIN) {
        allow_unstable();
        return Ok(Toolchain::Custom(LINKED_TOOLCHAIN));
    }
    if has_rust_src("nightly") {
        return Ok(Toolchain::Nightly);
    }
    bail!(
        "no toolchain can build the eBPF programs: neither the rustup toolchain \
         `{LINKED_TOOLCHAIN}` nor `nightly` has rust-src. Run `cargo xtask setup`."
    )
}

/// The Debian compiler is a stable one; `-Z build-std` needs RUSTC_BOOTSTRAP, for the eBPF
/// build only (aya-build passes our environment to the child cargo).
fn allow_unstable() {
    // SAFETY: the build script is single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
}

fn has_rust_src(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
}
