//! `cargo xtask soak [--minutes N]` (default 30): the release daemon in full mode under a
//! mixed load for N minutes, sampled every 10 s, with a pass/fail verdict. The harness is
//! the ignored test `soak` in tests/tests/soak.rs (it reuses the suite's throwaway
//! PostgreSQL); `SOAK_WINDOW` (s, default 10) and `SOAK_TPS` (default 500) tune it.

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
    println!("[soak] {minutes} minutes (release build)");
    crate::run_checked(crate::cargo().args(["build", "--release"]), "release build")?;
    crate::run_checked(
        crate::cargo()
            .env("SOAK_MINUTES", minutes.to_string())
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
