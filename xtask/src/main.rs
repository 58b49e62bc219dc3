//! Project tasks: `cargo xtask setup | build | run -- ARGS | test | bench [offcpu|all|db|daemon|diff|busy-host]
//! | soak [--minutes N] | dist`.
//!
//! `setup` is idempotent and prints one progress line per step; every other task runs it
//! first, so a fresh Debian/Ubuntu machine needs nothing but `cargo xtask run` or
//! `cargo xtask test`.

mod bench;
mod dist;
mod setup;
mod soak;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <setup | build | run -- PROFILER_ARGS | test | bench [offcpu|all|db|daemon|diff|busy-host] \
     | soak [--minutes N] | dist>";

fn dispatch(args: &[String]) -> Result<()> {
    let Some(task) = args.first() else {
        bail!("{USAGE}");
    };
    let rest = &args[1..];
    match task.as_str() {
        "setup" => setup::run(setup::Purpose::Test),
        "build" => {
            setup::run(setup::Purpose::Run)?;
            build(true)
        }
        "run" => {
            setup::run(setup::Purpose::Run)?;
            build(true)?;
            let rest = rest.strip_prefix(&["--".to_string()]).unwrap_or(rest);
            let status = Command::new(workspace_root().join("target/release/profiler"))
                .args(rest)
                .status()
                .context("cannot start the profiler")?;
            if !status.success() {
                bail!("profiler exited with {status}");
            }
            Ok(())
        }
        "test" => {
            setup::run(setup::Purpose::Test)?;
            test()
        }
        "dist" => {
            setup::run(setup::Purpose::Run)?;
            dist::run()
        }
        "bench" => {
            setup::run(setup::Purpose::Test)?;
            build(true)?;
            bench::run(rest)
        }
        "soak" => {
            setup::run(setup::Purpose::Test)?;
            soak::run(rest)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task {other:?}; {USAGE}"),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs a command, failing with its description when it fails.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn build(release: bool) -> Result<()> {
    println!(
        "[build] profiler and test programs ({})",
        if release { "release" } else { "debug" }
    );
    let mut cmd = cargo();
    // Default members only: the eBPF crate builds for the bpf target from profiler/build.rs.
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    run_checked(&mut cmd, "cargo build")
}

fn test() -> Result<()> {
    println!("[test] formatting and lints");
    run_checked(
        cargo().args(["fmt", "--all", "--", "--check"]),
        "cargo fmt --check",
    )?;
    run_checked(
        cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]),
        "cargo clippy",
    )?;
    build(false)?;
    println!("[test] unit and end-to-end tests (as root, against the running kernel)");
    // One test at a time: end-to-end tests measure blocked time on a 2-CPU machine and must
    // not compete with each other for CPUs. Every test file runs even after one fails, so a
    // CI log shows all that failed.
    let mut child = cargo()
        .args(["test", "--no-fail-fast", "--", "--test-threads=1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    // cargo's last "test result" line is often an empty doc-test crate; this is the total.
    println!("tests: {passed} passed, {failed} failed");
    println!("[test] a 3-minute soak of the release daemon (cargo xtask soak --minutes 3)");
    let soak = soak::short();
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    soak.context("the 3-minute soak failed")
}

/// The number just before `word` in a cargo `test result:` line.
fn count_before(text: &str, word: &str) -> u64 {
    text.find(word)
        .and_then(|end| text[..end].rsplit([' ', '.', ';']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
