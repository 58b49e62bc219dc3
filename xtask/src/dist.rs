//! `cargo xtask dist`: what to copy to a host that has no Rust, LLVM or bpf-linker — the
//! host in trouble. The release binary embeds its eBPF object, so one file runs anywhere with
//! glibc 2.34 or newer (Debian 12, Ubuntu 22.04, RHEL 9) and a BTF kernel. Two forms, in
//! `target/dist/`:
//!
//! - `profiler-VERSION-ARCH-linux-gnu.tar.gz`: `bin/profiler`, the systemd unit, a commented
//!   `profiler.toml`, man pages and shell completions under `share/`, the README;
//! - `profiler_VERSION_DEBARCH.deb`: `/usr/bin/profiler`, the unit in `/lib/systemd/system/`
//!   (not enabled) reading `/etc/profiler.toml` (a conffile), man pages, bash/zsh/fish
//!   completions, the README in `/usr/share/doc/profiler/`; built with `dpkg-deb`.
//!
//! The binary is stripped of debug info (about 8 MB remain; the debug info is kept apart in
//! `profiler.debug`, linked with `.gnu_debuglink`), not of its symbols: a profiler that
//! profiles itself should still name its own functions.

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

    // The debug info goes to profiler.debug, beside the packages (gdb and perf find it
    // through the binary's .gnu_debuglink); the binary keeps its symbols.
    let binary = dist.join("profiler");
    std::fs::copy(root.join("target/release/profiler"), &binary)
        .context("cannot copy target/release/profiler")?;
    run_checked(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&binary)
            .arg(dist.join("profiler.debug")),
        "objcopy --only-keep-debug",
    )?;
    run_checked(
        Command::new("strip").arg("--strip-debug").arg(&binary),
        "strip --strip-debug",
    )?;
    run_checked(
        Command::new("objcopy")
            .arg("--add-gnu-debuglink=profiler.debug")
            .arg(&binary)
            .current_dir(&dist),
        "objcopy --add-gnu-debuglink",
    )?;
    let unit = std::fs::read_to_string(root.join("profiler/contrib/profiler.service"))
        .context("cannot read profiler/contrib/profiler.service")?;
    let config = root.join("profiler/contrib/profiler.toml");
    let readme = root.join("README.md");

    // Man pages (gzipped) and shell completions, from the binary's own command line.
    let generated = dist.join("generated");
    let man = generated.join("man1");
    run_checked(
        Command::new(&binary).arg("manpage").arg(&man),
        "profiler manpage",
    )?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .filter_map(|e| Some(e.ok()?.path()))
        .collect();
    pages.sort();
    for page in &pages {
        run_checked(Command::new("gzip").arg("-9n").arg(page), "gzip")?;
    }
    let completions = [
        ("bash", "profiler"),
        ("zsh", "_profiler"),
        ("fish", "profiler.fish"),
    ];
    for (shell, file) in completions {
        let out = Command::new(&binary)
            .args(["completions", shell])
            .output()
            .context("profiler completions")?;
        if !out.status.success() {
            bail!("profiler completions {shell} failed");
        }
        make_parent(&generated.join(shell).join(file))?;
        std::fs::write(generated.join(shell).join(file), &out.stdout)?;
    }
    // Files shared by both forms, under (tarball prefix, Debian prefix).
    let shared = |prefix: &Path, zsh: &str| -> Result<()> {
        for page in &pages {
            let gz = format!("{}.gz", page.file_name().unwrap().to_string_lossy());
            install(
                &man.join(&gz),
                &prefix.join("share/man/man1").join(&gz),
                0o644,
            )?;
        }
        install(
            &generated.join("bash/profiler"),
            &prefix.join("share/bash-completion/completions/profiler"),
            0o644,
        )?;
        install(
            &generated.join("zsh/_profiler"),
            &prefix.join(zsh).join("_profiler"),
            0o644,
        )?;
        install(
            &generated.join("fish/profiler.fish"),
            &prefix.join("share/fish/vendor_completions.d/profiler.fish"),
            0o644,
        )
    };

    // The tarball: copy `bin/profiler` to /usr/local/bin, the unit as it is.
    let name = format!("profiler-{version}-{arch}-linux-gnu");
    let staging = dist.join(&name);
    install(&binary, &staging.join("bin/profiler"), 0o755)?;
    write(&staging.join("profiler.service"), &unit, 0o644)?;
    install(&config, &staging.join("profiler.toml"), 0o644)?;
    install(&readme, &staging.join("README.md"), 0o644)?;
    shared(&staging, "share/zsh/site-functions")?;
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

    // The Debian package: the binary in /usr/bin; the unit reads /etc/profiler.toml (a
    // conffile: an edit survives upgrades).
    let deb_arch = debian_arch()?;
    let deb_root = dist.join("deb");
    install(&binary, &deb_root.join("usr/bin/profiler"), 0o755)?;
    // Its settings come from the config file; the flags' comment goes with the flags.
    let deb_unit: String = unit
        .lines()
        .filter(|line| !line.starts_with("# --max-cpu 1") && !line.starts_with("# written without"))
        .map(|line| match line.starts_with("ExecStart=") {
            true => "ExecStart=/usr/bin/profiler daemon --config /etc/profiler.toml\n".to_string(),
            false => format!("{line}\n"),
        })
        .collect();
    write(
        &deb_root.join("lib/systemd/system/profiler.service"),
        &deb_unit,
        0o644,
    )?;
    install(&config, &deb_root.join("etc/profiler.toml"), 0o644)?;
    install(
        &readme,
        &deb_root.join("usr/share/doc/profiler/README.md"),
        0o644,
    )?;
    shared(&deb_root.join("usr"), "share/zsh/vendor-completions")?;
    write(
        &deb_root.join("DEBIAN/conffiles"),
        "/etc/profiler.toml\n",
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
    println!(
        "[dist] wrote {} (debug info)",
        dist.join("profiler.debug").display()
    );
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
