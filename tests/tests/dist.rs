//! `cargo xtask dist`: the package an SRE copies to a host with no Rust toolchain. Oracles are
//! Debian's own tools: `dpkg-deb` reads the package's control data and contents and unpacks
//! it, `objdump -T` lists the glibc symbol versions the binary really needs, `tar` lists the
//! tarball, `dpkg -i` installs the package and `dpkg --purge` removes it, `man`, bash's
//! `complete` and `systemd-analyze verify` read what it installed; the binary records the real
//! kernel from the package and alone in an empty directory, with no cargo on its PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use profiler_tests::{require_root, temp_dir};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn output(command: &mut Command) -> String {
    let out = command.output().expect("command starts");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Numeric glibc version, e.g. "2.34" → (2, 34).
fn version(text: &str) -> (u32, u32) {
    let (major, minor) = text.split_once('.').expect("major.minor");
    (major.parse().unwrap(), minor.parse().unwrap())
}

#[test]
fn dist_builds_a_deb_and_a_tarball_whose_binary_records_without_a_toolchain() {
    require_root();
    let root = workspace_root();
    output(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["xtask", "dist"])
            .current_dir(&root),
    );
    let dist = root.join("target/dist");
    let version_text = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"));
    let deb = dist.join(format!("profiler_{version_text}_{}.deb", arch.trim()));

    // The control data, as dpkg reads it.
    let info = output(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains(" Package: profiler\n"), "{info}");
    assert!(
        info.contains(&format!(" Version: {version_text}\n")),
        "{info}"
    );
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends in {info}"));
    let min_glibc = depends
        .split(',')
        .find_map(|d| d.trim().strip_prefix("libc6 (>= "))
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no libc6 version in {depends:?}"));

    // Its files, as dpkg lists them.
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/profiler",
        "./lib/systemd/system/profiler.service",
        "./etc/profiler.toml",
        "./usr/share/doc/profiler/README.md",
        "./usr/share/man/man1/profiler.1.gz",
        "./usr/share/man/man1/profiler-record.1.gz",
        "./usr/share/man/man1/profiler-daemon.1.gz",
        "./usr/share/bash-completion/completions/profiler",
        "./usr/share/zsh/vendor-completions/_profiler",
        "./usr/share/fish/vendor_completions.d/profiler.fish",
    ] {
        assert!(
            contents.contains(path),
            "{path} not in the package:\n{contents}"
        );
    }
    assert!(
        contents
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x root/root") && l.ends_with("./usr/bin/profiler")),
        "the binary is not root-owned 0755:\n{contents}"
    );

    let unpacked = temp_dir("dist-deb");
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked));
    let binary = unpacked.join("usr/bin/profiler");
    let unit =
        std::fs::read_to_string(unpacked.join("lib/systemd/system/profiler.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/profiler daemon --config /etc/profiler.toml"),
        "the unit must start the packaged binary with the packaged config:\n{unit}"
    );
    // The debug info is apart, and the binary says where.
    assert!(dist.join("profiler.debug").is_file());
    let link = output(
        Command::new("readelf")
            .args(["--string-dump=.gnu_debuglink"])
            .arg(&binary),
    );
    assert!(link.contains("profiler.debug"), "{link}");

    // The glibc it needs is no newer than the package says.
    let symbols = output(Command::new("objdump").arg("-T").arg(&binary));
    let newest = symbols
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.') && v.contains('.'))
        .map(|v| {
            let mut parts = v.split('.');
            let major = parts.next().unwrap();
            let minor = parts.next().unwrap();
            version(&format!("{major}.{minor}"))
        })
        .max()
        .expect("the binary links glibc");
    assert!(
        newest <= version(min_glibc),
        "the binary needs glibc {newest:?} but the package depends on libc6 >= {min_glibc}"
    );

    // Installed with dpkg: the binary records, man finds its pages, bash completes it, the
    // unit verifies, the config is a conffile; purged, nothing of it stays.
    let _purge = Purge;
    output(Command::new("dpkg").arg("-i").arg(&deb));
    let installed = Path::new("/usr/bin/profiler");
    records_alone(installed, &unpacked.join("installed-capture"), &unpacked);
    let page = output(
        Command::new("man")
            .args(["-P", "cat", "profiler-record"])
            .env("MANWIDTH", "100"),
    );
    assert!(page.contains("--duration"), "{page}");
    let complete = output(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/profiler && complete -p profiler",
    ]));
    assert!(complete.contains("profiler"), "{complete}");
    output(
        Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/profiler.service"]),
    );
    let conffiles = output(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "profiler"]));
    assert!(conffiles.contains("/etc/profiler.toml"), "{conffiles:?}");
    output(Command::new("dpkg").args(["--purge", "profiler"]));
    for gone in [
        "/usr/bin/profiler",
        "/etc/profiler.toml",
        "/lib/systemd/system/profiler.service",
        "/usr/share/man/man1/profiler.1.gz",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after dpkg --purge");
    }

    // The tarball holds the same binary, the unit and the README.
    let tarball = dist.join(format!(
        "profiler-{version_text}-{}-linux-gnu.tar.gz",
        std::env::consts::ARCH
    ));
    let listing = output(Command::new("tar").arg("-tzf").arg(&tarball));
    let name = format!(
        "profiler-{version_text}-{}-linux-gnu",
        std::env::consts::ARCH
    );
    for file in [
        "bin/profiler",
        "profiler.service",
        "profiler.toml",
        "README.md",
        "share/man/man1/profiler.1.gz",
        "share/bash-completion/completions/profiler",
    ] {
        assert!(
            listing.lines().any(|l| l == format!("{name}/{file}")),
            "{file} not in the tarball:\n{listing}"
        );
    }
    // Its binary, copied alone into an empty directory, records from there.
    let untarred = temp_dir("dist-tar");
    output(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&untarred),
    );
    let alone = temp_dir("dist-alone");
    std::fs::copy(
        untarred.join(&name).join("bin/profiler"),
        alone.join("profiler"),
    )
    .unwrap();
    records_alone(&alone.join("profiler"), &untarred.join("capture"), &alone);
    assert_eq!(
        std::fs::read_dir(&alone).unwrap().count(),
        1,
        "the binary wrote next to itself"
    );
}

/// `binary record` of the whole host for a second, run from `cwd` with nothing but a plain
/// PATH (no cargo, no toolchain), writes a capture with off-CPU stacks into `out_dir`.
fn records_alone(binary: &Path, out_dir: &Path, cwd: &Path) {
    let status = Command::new(binary)
        .args(["record", "--duration", "1s", "--events", "offcpu", "-o"])
        .arg(out_dir)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&status.stderr)
    );
    let capture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("capture.json")).unwrap()).unwrap();
    assert!(
        !capture["offcpu"]["stacks"].as_array().unwrap().is_empty(),
        "a whole-host second with no off-CPU stacks"
    );
}

/// Removes the package if a test installed it and failed before purging it.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if Path::new("/var/lib/dpkg/info/profiler.list").exists() {
            let _ = Command::new("dpkg").args(["--purge", "profiler"]).output();
        }
    }
}
