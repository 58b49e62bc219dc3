//! `cargo xtask dist`: what to copy to a host that has no Rust, LLVM or bpf-linker — the
//! host in trouble. The release binary embeds its eBPF object, so one file runs anywhere with
//! glibc 2.34 or newer (Debian 12, Ubuntu 22.04, RHEL 9) and a BTF kernel. Two forms, in
//! `target/dist/`:
//!
//! - `profiler-VERSION-ARCH-linux-gnu.tar.gz`: `bin/profiler`, the systemd unit, the README;
//! - `profiler_VERSION_DEBARCH.deb`: `/usr/bin/profiler`, the unit in `/lib/systemd/system/`
//!   (not enabled), the README in `/usr/share/doc/profiler/`; built with `dpkg-deb`.
//!
//! The binary is stripped of debug info (about 8 MB remain), not of its symbols: a profiler
//! that profiles itself should still name its own functions.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run_checked, workspace_root};

/// The oldest glibc the binary runs on: the newest symbol version it links (checked by the
/// dist test with `objdump -T`).
pub const MIN_GLIBC: &str = "2.34";

pub fn run() -> Result<()> {
    println!("[dist] release build");
    run_checked(
        cargo().args(["build", "--release", "-p", "profiler"]),
        "cargo build --release",
    )?;
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = std::env::consts::ARCH;
    let dist = root.join("target/dist");
    let _ = std::fs::remove_dir_all(&dist);
    std::fs::create_dir_all(&dist).with_context(|| format!("cannot create {}", dist.display()))?;

    let binary = dist.join("profiler");
    std::fs::copy(root.join("target/release/profiler"), &binary)
        .context("cannot copy target/release/profiler")?;
    run_checked(
        Command::new("strip").arg("--strip-debug").arg(&binary),
        "strip --strip-debug",
    )?;
    let unit = std::fs::read_to_string(root.join("profiler/contrib/profiler.service"))
        .context("cannot read profiler/contrib/profiler.service")?;
    let readme = root.join("README.md");

    // The tarball: copy `bin/profiler` to /usr/local/bin, the unit as it is.
    let name = format!("profiler-{version}-{arch}-linux-gnu");
    let staging = dist.join(&name);
    install(&binary, &staging.join("bin/profiler"), 0o755)?;
    write(&staging.join("profiler.service"), &unit, 0o644)?;
    install(&readme, &staging.join("README.md"), 0o644)?;
    let tarball = dist.join(format!("{name}.tar.gz"));
    run_checked(
        Command::new("tar")
            .args(["--owner=0", "--group=0", "-czf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&dist)
            .arg(&name),
        "tar",
    )?;

    // The Debian package: the binary in /usr/bin, so the unit points there.
    let deb_arch = debian_arch()?;
    let deb_root = dist.join("deb");
    install(&binary, &deb_root.join("usr/bin/profiler"), 0o755)?;
    write(
        &deb_root.join("lib/systemd/system/profiler.service"),
        &unit.replace("/usr/local/bin/profiler", "/usr/bin/profiler"),
        0o644,
    )?;
    install(
        &readme,
        &deb_root.join("usr/share/doc/profiler/README.md"),
        0o644,
    )?;
    let installed_kb = std::fs::metadata(&binary)?.len() / 1024 + 64;
    write(
        &deb_root.join("DEBIAN/control"),
        &format!(
            "Package: profiler\n\
             Version: {version}\n\
             Architecture: {deb_arch}\n\
             Maintainer: profiler developers <profiler@localhost>\n\
             Depends: libc6 (>= {MIN_GLIBC}), libgcc-s1\n\
             Installed-Size: {installed_kb}\n\
             Section: utils\n\
             Priority: optional\n\
             Description: eBPF kernel-level latency profiler\n \
             Off-CPU time with stacks, on-CPU samples, syscall, TCP and database-query\n \
             latency for any process or the whole host, with no code changes; flamegraphs,\n \
             pprof, Prometheus metrics and regression verdicts. Needs root (or CAP_BPF and\n \
             CAP_PERFMON) and a kernel with BTF.\n"
        ),
        0o644,
    )?;
    let deb = dist.join(format!("profiler_{version}_{deb_arch}.deb"));
    run_checked(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&deb_root)
            .arg(&deb),
        "dpkg-deb --build",
    )?;
    println!("[dist] wrote {}", tarball.display());
    println!("[dist] wrote {}", deb.display());
    Ok(())
}

fn debian_arch() -> Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("dpkg --print-architecture (the .deb needs dpkg-deb)")?;
    if !out.status.success() {
        bail!("dpkg --print-architecture failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    make_parent(to)?;
    std::fs::copy(from, to).with_context(|| format!("cannot copy {}", from.display()))?;
    set_mode(to, mode)
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    make_parent(to)?;
    std::fs::write(to, text).with_context(|| format!("cannot write {}", to.display()))?;
    set_mode(to, mode)
}

fn make_parent(path: &Path) -> Result<()> {
    let parent: PathBuf = path.parent().context("a path with a parent")?.to_path_buf();
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}
