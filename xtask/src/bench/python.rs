//! `cargo xtask bench python`: what walking CPython's frames adds on top of native unwinding,
//! on a busy Python process — `tests/workloads/python_requests.py` under Debian's python3:
//! one Python thread sending requests through a pipe to `cat` and reading each answer back,
//! routed through a few layers of Python (every request blocks it once: an off-CPU event with
//! a walked stack, plus on-CPU samples). The figure is the Python process's own CPU time per
//! request (user + system, measured by the script around its loop): the probes run in its
//! context, so their cost is in it, and other load on the host (cat included) is not.
//!
//! Variants alternate, rotated each round: nothing attached; `record --events offcpu,oncpu`
//! on the whole host with `--no-python-frames` (native unwinding only); the same with Python
//! frames (the default). Medians with range; the ratio that matters is Python frames against
//! native only (target ≤ 1.05×). The workload is pinned to CPU 0 (cat with it): each request
//! is two direct context switches. Separate runs with `--measure-overhead -p PID` time the
//! Python walks in the kernel (`python_walk_ns`): the cost of one Python walk.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use super::{Variant, bench_output_dir, env_number, median, paired_ratio, range};
use crate::workspace_root;

const VARIANTS: [(&str, Option<&[&str]>); 3] = [
    ("nothing attached", None),
    (
        "native frames (--no-python-frames)",
        Some(&["--events", "offcpu,oncpu", "--no-python-frames"]),
    ),
    (
        "Python frames (default)",
        Some(&["--events", "offcpu,oncpu"]),
    ),
];

pub(super) fn run() -> Result<()> {
    let rounds = env_number("BENCH_ROUNDS", 7) as usize;
    let requests = env_number("BENCH_PY_REQUESTS", 50_000);
    println!(
        "[bench python] python_requests.py {requests} (Debian python3, requests through a pipe \
         to cat), whole host, {rounds} rounds, variants alternating"
    );
    let mut results = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for i in 0..VARIANTS.len() {
            let index = (i + round) % VARIANTS.len();
            let (label, args) = VARIANTS[index];
            let cpu = run_workload(requests, |_| match args {
                None => Ok(None),
                Some(args) => super::start_profiler(args).map(Some),
            })?;
            println!("  round {round}: {label:<36} {cpu:>8.0} CPU ns/request");
            results[index].push(cpu);
        }
    }
    println!("[bench python] the process's CPU time per request, medians over {rounds} rounds:");
    for (i, (label, _)) in VARIANTS.iter().enumerate() {
        let (ratio, r_low, r_high) = paired_ratio(&results[i], &results[0]);
        let (low, high) = range(&results[i]);
        let m = median(&mut results[i].clone());
        println!(
            "  {label:<36} {m:>8.0} ns/request (range {low:.0}–{high:.0})  ratio {ratio:.3}x \
             (range {r_low:.3}–{r_high:.3}) against nothing attached"
        );
    }
    // The pairs that matter: Python frames against native only, round by round.
    let (ratio, low, high) = paired_ratio(&results[2], &results[1]);
    println!(
        "  Python frames / native frames: {ratio:.3}x (range {low:.3}–{high:.3}; target ≤ 1.05x)"
    );
    // The Python walk's own run time (timed in the kernel with --measure-overhead).
    let mut per_walk = Vec::new();
    for _ in 0..rounds.min(3) {
        let args = VARIANTS[2].1.expect("a profiler variant");
        run_workload(requests, |pid| {
            let pid = pid.to_string();
            let mut with: Vec<&str> = args.to_vec();
            with.extend(["--measure-overhead", "-p", &pid]);
            super::start_profiler(&with).map(Some)
        })?;
        let counters = capture_counters()?;
        if counters.walks > 0.0 {
            per_walk.push(counters.walk_ns / counters.walks);
            println!(
                "  {:.0} Python walks, {:.1} frames each, {:.0} ns each",
                counters.walks,
                counters.frames / counters.walks,
                counters.walk_ns / counters.walks
            );
        }
    }
    if per_walk.is_empty() {
        bail!("no Python walk was counted: is the workload's interpreter one the walker knows?");
    }
    let (low, high) = range(&per_walk);
    println!(
        "  cost of one Python walk: {:.0} ns of eBPF run time (median; range {low:.0}–{high:.0})",
        median(&mut per_walk)
    );
    Ok(())
}

/// Runs the workload: `tracer(pid)` is started once the process is ready and before it
/// works, stopped after. Returns the script's CPU ns per request.
fn run_workload(
    requests: u64,
    tracer: impl FnOnce(u32) -> Result<Option<std::process::Child>>,
) -> Result<f64> {
    let script = workspace_root().join("tests/workloads/python_requests.py");
    // Pinned to one CPU (cat too, by inheritance): each request is then two direct
    // switches, and the probes' cost is not drowned in cross-CPU wake-up noise.
    let mut child = Command::new("taskset")
        .args(["-c", "0", "/usr/bin/python3"])
        .arg(&script)
        .arg(requests.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run taskset -c 0 /usr/bin/python3 (packages util-linux, python3)")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let ready = lines.next().context("the workload said nothing")??;
    let pid: u32 = ready
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("unexpected first line from the workload: {ready}"))?;
    let tracer = tracer(pid)?;
    writeln!(child.stdin.as_mut().context("no stdin")?, "go")?;
    let result = lines.next().context("the workload gave no result")??;
    let status = child.wait()?;
    if let Some(tracer) = tracer {
        super::stop(tracer, Variant::Profiler)?;
    }
    if !status.success() {
        bail!("the workload failed ({status})");
    }
    result
        .trim()
        .parse()
        .with_context(|| format!("unexpected result from the workload: {result}"))
}

struct Counters {
    walk_ns: f64,
    walks: f64,
    frames: f64,
}

/// The Python walk counters of the last capture `start_profiler` wrote.
fn capture_counters() -> Result<Counters> {
    let path = bench_output_dir().join("capture.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let capture: serde_json::Value = serde_json::from_str(&text).context("capture.json")?;
    let counter = |name: &str| {
        capture["metadata"]["counters"][name]
            .as_f64()
            .unwrap_or(0.0)
    };
    Ok(Counters {
        walk_ns: counter("python_walk_ns"),
        walks: counter("python_walks"),
        frames: counter("python_frames"),
    })
}
