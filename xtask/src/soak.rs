//! `cargo xtask soak [--minutes N]` (default 30): the release daemon in full mode under a
//! mixed load for N minutes, sampled every 10 s, with a pass/fail verdict. The harness is
//! the ignored test `soak` in tests/tests/soak.rs (it reuses the suite's throwaway
//! PostgreSQL); `SOAK_WINDOW` (s, default 10), `SOAK_SAMPLE_MS` (default 10000) and
//! `SOAK_TPS` (default 500) tune it.
//!
//! `cargo xtask test` ends with a 3-minute one (`short`), sampled every 700 ms — a period
//! that is not the windows', so the samples fall at every phase of a window and the spans'
//! medians compare like with like. (Its windows stay 10 s: at 2 s the full-mode daemon
//! reloading every family per window could not keep up with this load, issue 13.)

use anyhow::{Context as _, Result, bail};

pub fn run(args: &[String]) -> Result<()> {
    let mut minutes: u64 = 30;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let value = match arg.strip_prefix("--minutes=") {
            Some(v) => v.to_string(),
            None if arg == "--minutes" => rest.next().context("--minutes needs a number")?.clone(),
            None => bail!("unknown soak option {arg:?} (usage: cargo xtask soak [--minutes N])"),
        };
        minutes = value.parse().ok().filter(|m| *m >= 1).with_context(|| {
            format!("--minutes {value:?}: a whole number of minutes, at least 1")
        })?;
    }
    soak(minutes, &[])
}

/// The suite's 3-minute soak (see the module's documentation).
pub fn short() -> Result<()> {
    soak(3, &[("SOAK_SAMPLE_MS", "700")])
}

fn soak(minutes: u64, env: &[(&str, &str)]) -> Result<()> {
    println!("[soak] {minutes} minutes (release build)");
    crate::run_checked(crate::cargo().args(["build", "--release"]), "release build")?;
    crate::run_checked(
        crate::cargo()
            .env("SOAK_MINUTES", minutes.to_string())
            .envs(env.iter().copied())
            .args([
                "test",
                "--release",
                "-p",
                "profiler-tests",
                "--test",
                "soak",
                "--",
                "--ignored",
                "--exact",
                "soak",
                "--nocapture",
            ]),
        "soak",
    )
}
