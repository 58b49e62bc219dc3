//! `cargo xtask bench [offcpu]`: overhead measured as ratios against a baseline run in the
//! same invocation, alternating the variants so drift hits them all alike.
//!
//! offcpu: cost per operation of `perf bench sched pipe` (two threads ping-ponging through a
//! pipe: two context switches per operation, the worst case for a sched_switch probe) with
//! nothing attached, with `profiler record` on the whole host, and with libbpf-tools'
//! `offcputime` (the peer) on the whole host.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::workspace_root;

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        None | Some("offcpu") => offcpu(),
        Some(other) => bail!("unknown benchmark {other:?} (available: offcpu)"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Baseline,
    Profiler,
    Offcputime,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "nothing attached",
            Self::Profiler => "profiler record (whole host)",
            Self::Offcputime => "libbpf-tools offcputime (whole host)",
        }
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn offcpu() -> Result<()> {
    let rounds = env_number("BENCH_ROUNDS", 7) as usize;
    let loops = env_number("BENCH_LOOPS", 200_000);
    let variants = [Variant::Baseline, Variant::Profiler, Variant::Offcputime];
    println!(
        "[bench offcpu] perf bench sched pipe -l {loops}, {rounds} rounds, variants alternating"
    );
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for i in 0..variants.len() {
            // Rotate the order each round so no variant always runs first or last.
            let index = (i + round) % variants.len();
            let variant = variants[index];
            let usecs = measure(variant, loops)
                .with_context(|| format!("round {round}: {}", variant.name()))?;
            println!(
                "  round {round}: {:<40} {usecs:.3} usecs/op",
                variant.name()
            );
            results[index].push(usecs);
        }
    }
    let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
    println!("[bench offcpu] medians over {rounds} rounds (ratio = cost per op / baseline):");
    for (i, variant) in variants.iter().enumerate() {
        println!(
            "  {:<40} {:>8.3} usecs/op  ratio {:.3}x",
            variant.name(),
            medians[i],
            medians[i] / medians[0]
        );
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn measure(variant: Variant, loops: u64) -> Result<f64> {
    let tracer = match variant {
        Variant::Baseline => None,
        Variant::Profiler => Some(start_profiler()?),
        Variant::Offcputime => Some(start_offcputime()?),
    };
    let result = perf_bench(loops);
    if let Some(tracer) = tracer {
        stop(tracer, variant)?;
    }
    result
}

fn perf_bench(loops: u64) -> Result<f64> {
    let out = Command::new("perf")
        .args(["bench", "sched", "pipe", "-l", &loops.to_string()])
        .output()
        .context("cannot run perf (package linux-perf)")?;
    if !out.status.success() {
        bail!(
            "perf bench failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("usecs/op"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no usecs/op in perf output: {text}"))
}

fn start_profiler() -> Result<Child> {
    let out_dir = std::env::temp_dir().join(format!("profiler-bench-{}", std::process::id()));
    let mut child = Command::new(workspace_root().join("target/release/profiler"))
        .args(["record", "--duration", "1h", "-o"])
        .arg(&out_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the profiler")?;
    // Attached once it announces the recording.
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("recording off-CPU time") => break,
            Some(Ok(_)) => continue,
            _ => {
                let status = child.wait()?;
                bail!("the profiler exited before attaching ({status})");
            }
        }
    }
    // Keep draining stderr so progress lines never block the profiler.
    std::thread::spawn(move || for _ in lines {});
    Ok(child)
}

fn start_offcputime() -> Result<Child> {
    let child = Command::new("offcputime")
        .arg("3600")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start offcputime (package libbpf-tools)")?;
    // offcputime prints nothing we can wait on through a pipe (stdout is block-buffered);
    // give it time to load and attach.
    std::thread::sleep(Duration::from_secs(3));
    Ok(child)
}

fn stop(mut child: Child, variant: Variant) -> Result<()> {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    if variant == Variant::Profiler && !status.success() {
        bail!("the profiler failed after SIGINT ({status})");
    }
    Ok(())
}
