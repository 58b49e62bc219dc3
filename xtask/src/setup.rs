//! `cargo xtask setup`: installs what building and testing need on Debian/Ubuntu, one
//! progress line per step. Safe to re-run: each step first checks whether it is done.
//! The recipe is the verified one in shared/TOOLCHAIN.md.
//!
//! Two sets: `build` and `run` install only what building the profiler and running it need
//! (`BUILD_PACKAGES`): nothing else lands on a host that is only to be profiled. `test`,
//! `bench` and `setup` add the peers and servers the tests and benchmarks run against
//! (`TEST_PACKAGES`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::run_checked;

/// What a setup is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Build and run the profiler.
    Run,
    /// Also run the tests and benchmarks.
    Test,
}

/// Debian packages to build the profiler: the eBPF compiler (Debian's rustc with its
/// source) and the LLVM that bpf-linker links.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "Rust compiler whose sysroot has the source for -Z build-std",
    ),
    ("cargo-web", "cargo matching rustc-web"),
    ("rust-web-src", "Rust library source for build-std=core"),
    (
        "llvm-22-dev",
        "LLVM 22 for bpf-linker (same major as rustc-web)",
    ),
    ("libzstd-dev", "bpf-linker's LLVM link dependency"),
    ("zlib1g-dev", "bpf-linker's LLVM link dependency"),
    (
        "gcc",
        "the C compiler ring (rustls's cryptography, for https pushes) builds with",
    ),
    (
        "ca-certificates",
        "the CA store https pushes trust by default",
    ),
];

/// Debian packages the tests and benchmarks use: peers, servers and oracles.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("linux-perf", "perf bench sched pipe for benchmarks"),
    (
        "libbpf-tools",
        "offcputime, the peer benchmarks compare with",
    ),
    ("bpftool", "inspecting loaded programs"),
    (
        "systemd",
        "systemd-analyze, which checks that the daemon's unit file loads",
    ),
    (
        "binutils",
        "objcopy, strip, readelf, objdump: cargo xtask dist and its test",
    ),
    (
        "man-db",
        "man, which reads the packaged man pages in the dist test",
    ),
    (
        "util-linux",
        "setpriv and unshare, for the unprivileged-user and no-tracefs tests",
    ),
    (
        "strace",
        "strace -c, the oracle of the no-tracefs test's syscall counts",
    ),
    (
        "iproute2",
        "ip netns, for the TCP retransmit tests; ss, for the export tests",
    ),
    (
        "openssl",
        "openssl, which makes the test CA and certificate of the https push test",
    ),
    (
        "nftables",
        "nft, which drops packets in the TCP retransmit tests",
    ),
    (
        "redis-server",
        "Redis server, for the db family's wire-protocol tests",
    ),
    (
        "redis-tools",
        "redis-cli and redis-benchmark, for the db family's wire-protocol tests",
    ),
    (
        "mariadb-server",
        "MariaDB server (mariadbd, mariadb-install-db), for the db family's MySQL tests",
    ),
    ("mariadb-client", "the mariadb client, for the MySQL tests"),
    (
        "sysbench",
        "sysbench's OLTP scripts (prepared statements on libmariadb), for the MySQL tests",
    ),
    (
        "python3-mysqldb",
        "Python's MySQLdb (on libmariadb), the MySQL test workload",
    ),
    (
        "python3",
        "Python with its sqlite3 module (libsqlite3), the SQLite test workload",
    ),
    (
        "python3-psycopg2",
        "psycopg2 (on libpq), the ORM-shaped PostgreSQL workload",
    ),
    (
        "python3-venv",
        "a venv for the PyPI tools the tests use (py-spy)",
    ),
    (
        "postgresql",
        "PostgreSQL server (with USDT probes), pgbench and pg_stat_statements for the db tests",
    ),
    (
        "golang-go",
        "go tool pprof, which the pprof-output tests read with",
    ),
    (
        "prometheus",
        "a real Prometheus server, which the daemon tests scrape /metrics with",
    ),
    (
        "chromium",
        "headless Chromium, which the daemon tests open the /flamegraph SVG in",
    ),
];

/// The rustup toolchain name linked to Debian's compiler; profiler/build.rs uses it.
const TOOLCHAIN_NAME: &str = "profiler-bpf";

struct Steps {
    total: usize,
    current: usize,
}

impl Steps {
    fn step(&mut self, what: &str) {
        self.current += 1;
        println!("[setup {}/{}] {what}", self.current, self.total);
    }
}

pub fn run(purpose: Purpose) -> Result<()> {
    let mut steps = Steps {
        total: if purpose == Purpose::Test { 7 } else { 5 },
        current: 0,
    };
    let packages: Vec<(&str, &str)> = match purpose {
        Purpose::Run => BUILD_PACKAGES.to_vec(),
        Purpose::Test => [BUILD_PACKAGES, TEST_PACKAGES].concat(),
    };
    steps.step(match purpose {
        Purpose::Run => "Debian packages (to build and run; tests add more)",
        Purpose::Test => "Debian packages (to build, and the tests' peers and servers)",
    });
    install_packages(&packages)?;
    if purpose == Purpose::Test {
        steps.step("npm packages the tests' clients use");
        install_npm_packages()?;
        steps.step("PyPI tools the tests use, in a venv of their own");
        install_pypi_tools()?;
    }
    steps.step("bpf-linker (links the eBPF object)");
    install_bpf_linker()?;
    steps.step(&format!(
        "rustup toolchain `{TOOLCHAIN_NAME}` for the eBPF build"
    ));
    link_toolchain()?;
    steps.step("tracefs at /sys/kernel/tracing");
    mount_tracefs()?;
    steps.step("kernel BTF");
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        println!("      ok: /sys/kernel/btf/vmlinux");
    } else {
        bail!("this kernel has no /sys/kernel/btf/vmlinux (needs CONFIG_DEBUG_INFO_BTF=y)");
    }
    Ok(())
}

/// Where the tests find their npm packages (`NODE_PATH`); see `tests/src/lib.rs`.
const NPM_PREFIX: &str = "/usr/local/lib/profiler-tests";
/// npm packages the tests run: node-postgres, a pure-JavaScript PostgreSQL client on libuv
/// (it writes with writev), for the db family's wire tests.
const NPM_PACKAGES: &[&str] = &["pg@8.23.1"];

fn install_npm_packages() -> Result<()> {
    if Command::new("npm").arg("--version").output().is_err() {
        // Only when there is no npm at all: a Node.js from elsewhere brings its own.
        install_packages(&[
            ("nodejs", "Node.js, which runs the npm test clients"),
            ("npm", "npm, which installs them"),
        ])?;
    }
    for package in NPM_PACKAGES {
        let (name, version) = package.split_once('@').unwrap_or((package, ""));
        let manifest = Path::new(NPM_PREFIX).join(format!("node_modules/{name}/package.json"));
        let have = std::fs::read_to_string(&manifest).unwrap_or_default();
        if have.contains(&format!("\"version\": \"{version}\"")) {
            println!("      ok: {package}");
            continue;
        }
        println!("      running npm install {package}");
        crate::run_checked(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--prefix", NPM_PREFIX])
                .arg(package),
            "npm install",
        )?;
    }
    Ok(())
}

/// The tests' venv (`tests/tests/jit.rs` runs its py-spy).
const VENV: &str = "/usr/local/lib/profiler-tests/venv";
/// PyPI tools the tests run: py-spy, a third-party Python profiler, the oracle of the Python
/// call chains (issue 16).
const PYPI_TOOLS: &[(&str, &str)] = &[("py-spy", "0.4.3")];
/// PyPI libraries the tests' receivers import: the official OTLP message classes and gRPC
/// stubs (generated from opentelemetry-proto v1.10.0, the version the profiler encodes;
/// issue 18), the protobuf runtime they need (Debian's python3-protobuf is too old for
/// them) and grpcio for the OTLP/gRPC receiver.
const PYPI_LIBRARIES: &[(&str, &str)] = &[
    ("protobuf", "6.33.6"),
    ("opentelemetry-proto", "1.44.0"),
    ("grpcio", "1.85.3"),
];

fn install_pypi_tools() -> Result<()> {
    let venv = Path::new(VENV);
    if !venv.join("bin/pip").exists() {
        println!("      creating the venv {VENV}");
        run_checked(
            Command::new("/usr/bin/python3").args(["-m", "venv", VENV]),
            "python3 -m venv",
        )?;
    }
    for (name, version) in PYPI_TOOLS {
        let have = Command::new(venv.join("bin").join(name))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if have.split_whitespace().nth(1) == Some(version) {
            println!("      ok: {name} {version}");
            continue;
        }
        pip_install(venv, name, version)?;
    }
    for (name, version) in PYPI_LIBRARIES {
        let shown = Command::new(venv.join("bin/pip"))
            .args(["show", "--disable-pip-version-check", name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if shown
            .lines()
            .any(|l| l.strip_prefix("Version: ") == Some(version))
        {
            println!("      ok: {name} {version}");
            continue;
        }
        pip_install(venv, name, version)?;
    }
    Ok(())
}

fn pip_install(venv: &Path, name: &str, version: &str) -> Result<()> {
    println!("      running pip install {name}=={version}");
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("{name}=={version}")),
        "pip install",
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(name, _)| !installed(name))
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        println!("      ok: all {} already installed", packages.len());
        return Ok(());
    }
    for (name, why) in packages.iter().filter(|(n, _)| missing.contains(n)) {
        println!("      missing: {name} ({why})");
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!("apt-get not found: install {} by hand", missing.join(" "));
    }
    if !is_root() {
        bail!("installing {} needs root; run as root", missing.join(" "));
    }
    println!("      running apt-get update");
    run_checked(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    println!("      running apt-get install {}", missing.join(" "));
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )?;
    println!("      installed: {}", missing.join(" "));
    Ok(())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
        .join("bin")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn install_bpf_linker() -> Result<()> {
    let existing = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = existing
        && out.status.success()
    {
        println!("      ok: {}", String::from_utf8_lossy(&out.stdout).trim());
        return Ok(());
    }
    println!("      building bpf-linker 0.13 against /usr/lib/llvm-22 (takes a few minutes)");
    run_checked(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                "~0.13",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        "cargo install bpf-linker",
    )?;
    let bin = cargo_bin_dir().join("bpf-linker");
    if !bin.exists() {
        bail!("bpf-linker was built but {} is missing", bin.display());
    }
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|dir| Path::new(dir).join("bpf-linker").exists());
    if !on_path {
        bail!(
            "bpf-linker is in {} which is not on PATH; add it to PATH",
            cargo_bin_dir().display()
        );
    }
    println!("      installed: {}", bin.display());
    Ok(())
}

fn has_rust_src(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    out.status.success()
        && Path::new(String::from_utf8_lossy(&out.stdout).trim())
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
}

fn link_toolchain() -> Result<()> {
    if has_rust_src(TOOLCHAIN_NAME) {
        println!("      ok: `{TOOLCHAIN_NAME}` is linked to a compiler with rust-src");
        return Ok(());
    }
    let dir = home().join(".local/share/profiler/bpf-toolchain");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    // rustup only checks that a linked toolchain has bin/ and lib/.
    std::fs::create_dir_all(dir.join("lib"))?;
    for tool in ["rustc", "cargo", "rustdoc"] {
        let target = Path::new("/usr/bin").join(tool);
        if !target.exists() {
            bail!(
                "{} is missing (package rustc-web/cargo-web)",
                target.display()
            );
        }
        let link = bin.join(tool);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    run_checked(
        Command::new("rustup")
            .args(["toolchain", "link", TOOLCHAIN_NAME])
            .arg(&dir),
        "rustup toolchain link",
    )?;
    if !has_rust_src(TOOLCHAIN_NAME) {
        bail!(
            "`{TOOLCHAIN_NAME}` is linked but its sysroot has no rust-src (package rust-web-src)"
        );
    }
    println!(
        "      linked `{TOOLCHAIN_NAME}` -> {} (/usr/bin/rustc)",
        dir.display()
    );
    Ok(())
}

fn mount_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        println!("      ok: mounted");
        return Ok(());
    }
    if !is_root() {
        bail!("tracefs is not mounted and mounting it needs root");
    }
    run_checked(
        Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]),
        "mount tracefs",
    )?;
    println!("      mounted");
    Ok(())
}
