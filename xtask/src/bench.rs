//! `cargo xtask bench [offcpu|all|db|daemon|diff|busy-host|syscalls|python|export]`: overhead measured as ratios against a baseline run in the
//! same invocation, alternating the variants so drift hits them all alike.
//!
//! offcpu: cost per operation of `perf bench sched pipe` (two tasks ping-ponging through a
//! pipe: two context switches per operation, the worst case for a sched_switch probe) with
//! nothing attached, with `profiler record` on the whole host (tp_btf with user stacks walked
//! from .eh_frame tables — the default — and with frame pointers only; the tracepoint
//! fallback), and with libbpf-tools' `offcputime` (the peer) on the whole host. Each is
//! measured twice per round: free to use both CPUs (cross-CPU wakeups dominate the cost), and
//! pinned to one CPU with `taskset -c 0` (the cost is then mostly the context switch itself,
//! so the probe's own cost per switch shows undiluted). Judge by the pinned added cost per
//! operation (variant − nothing attached): unpinned ratios on this 2-CPU VM are mostly noise.
//! Separate untimed runs measure the programs' kernel run time (`--measure-overhead`): ns
//! per program run, i.e. per context switch, DWARF walk vs frame pointers.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::workspace_root;

mod python;
mod syscalls;

pub fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("offcpu") => offcpu(),
        Some("diff") => diff(),
        Some("all") => all_families(),
        Some("db") => db(),
        Some("daemon") => daemon(),
        Some("busy-host") => busy_host(),
        Some("syscalls") => syscalls::run(),
        Some("python") => python::run(),
        Some("export") => export(),
        None => {
            offcpu()?;
            all_families()?;
            db()?;
            diff()
        }
        Some(other) => {
            bail!(
                "unknown benchmark {other:?} (available: offcpu, all, db, daemon, diff, \
                 busy-host, syscalls, python, export)"
            )
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Baseline,
    Profiler,
    ProfilerFp,
    ProfilerNoSplit,
    ProfilerTracepoint,
    Offcputime,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "nothing attached",
            Self::Profiler => "profiler (tp_btf, DWARF unwind)",
            Self::ProfilerFp => "profiler (tp_btf, frame pointers)",
            Self::ProfilerNoSplit => "profiler (tp_btf, no runq split)",
            Self::ProfilerTracepoint => "profiler record (tracepoint)",
            Self::Offcputime => "libbpf-tools offcputime",
        }
    }
}

/// How perf bench runs: on both CPUs, or pinned to CPU 0.
const MODES: [(&str, Option<&str>); 2] = [("2 CPUs", None), ("pinned", Some("0"))];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn offcpu() -> Result<()> {
    let rounds = env_number("BENCH_ROUNDS", 5) as usize;
    let loops = env_number("BENCH_LOOPS", 200_000);
    let variants = [
        Variant::Baseline,
        Variant::Profiler,
        Variant::ProfilerFp,
        Variant::ProfilerNoSplit,
        Variant::ProfilerTracepoint,
        Variant::Offcputime,
    ];
    println!(
        "[bench offcpu] perf bench sched pipe -l {loops}, {rounds} rounds, variants alternating"
    );
    // results[mode][variant] = usecs/op of each round
    let mut results = vec![vec![Vec::new(); variants.len()]; MODES.len()];
    for round in 0..rounds {
        for i in 0..variants.len() {
            // Rotate the order each round so no variant always runs first or last.
            let index = (i + round) % variants.len();
            let variant = variants[index];
            let usecs = measure(variant, loops)
                .with_context(|| format!("round {round}: {}", variant.name()))?;
            for (mode, value) in usecs.iter().enumerate() {
                println!(
                    "  round {round}: {:<30} {:<7} {value:>8.3} usecs/op",
                    variant.name(),
                    MODES[mode].0
                );
                results[mode][index].push(*value);
            }
        }
    }
    println!(
        "[bench offcpu] medians over {rounds} rounds (ratio = cost per op / nothing attached):"
    );
    for (mode, (mode_name, _)) in MODES.iter().enumerate() {
        let medians: Vec<f64> = results[mode].iter_mut().map(|r| median(r)).collect();
        for (i, variant) in variants.iter().enumerate() {
            let (low, high) = range(&results[mode][i]);
            println!(
                "  {mode_name:<7} {:<34} {:>8.3} usecs/op (range {low:.3}–{high:.3})  ratio \
                 {:.3}x  added {:+.3} usecs/op",
                variant.name(),
                medians[i],
                medians[i] / medians[0],
                medians[i] - medians[0]
            );
        }
    }
    // The programs' own kernel run time per run (per context switch), in separate untimed
    // runs: BPF statistics add ~20 ns per run, which the timed runs above must not carry.
    let mut run_ns = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, unwind) in ["dwarf", "fp"].iter().enumerate() {
            let tracer = start_profiler(&[
                "--events",
                "offcpu",
                "--attach",
                "tp-btf",
                "--unwind",
                unwind,
                "--measure-overhead",
            ])?;
            let ran = perf_bench(loops, Some("0"));
            stop(tracer, Variant::Profiler)?;
            ran.with_context(|| format!("round {round}: eBPF run time, --unwind {unwind}"))?;
            if let Some(ns) = ebpf_ns_per_run()? {
                run_ns[i].push(ns);
            }
        }
    }
    for (i, unwind) in ["dwarf", "fp"].iter().enumerate() {
        if !run_ns[i].is_empty() {
            let (low, high) = range(&run_ns[i]);
            println!(
                "  eBPF run time per sched_switch, --unwind {unwind:<5} {:>7.0} ns (range \
                 {low:.0}–{high:.0}, {} runs)",
                median(&mut run_ns[i]),
                run_ns[i].len()
            );
        }
    }
    Ok(())
}

/// Verdict quality of `profiler diff` over 20 pairs of real recordings: A-vs-A (the same
/// workload twice) must be flagged at most once, A-vs-B (+5 ms of blocking per request in
/// `stage_query`) at least 19 times with `stage_query` named first. The harness is the
/// ignored test `diff_quality_twenty_pairs` in tests/tests/diff.rs.
fn diff() -> Result<()> {
    println!("[bench diff] 20 pairs of A-vs-A and A-vs-B recordings (a few minutes)");
    crate::run_checked(
        crate::cargo().args([
            "test",
            "-p",
            "profiler-tests",
            "--test",
            "diff",
            "--",
            "--ignored",
            "--exact",
            "diff_quality_twenty_pairs",
            "--nocapture",
        ]),
        "diff quality benchmark",
    )
}

/// The daemon's steady and startup-peak memory and its CPU under a pgbench load (release).
fn daemon() -> Result<()> {
    release_ignored_test("daemon", "bench_daemon_memory_and_cpu_under_pgbench")
}

/// CPU per transaction of a saturated local PostgreSQL, whole-host tracing vs none, per
/// family and for the daemon (release build); see `tests/tests/busy_host.rs`.
fn busy_host() -> Result<()> {
    release_ignored_test("busy_host", "bench_busy_host_cpu_per_transaction")
}

/// What pushing each 60 s window to Pyroscope and OTLP costs: encode CPU against the
/// daemon's, bytes against the window's pprof (release build); see `tests/tests/export.rs`.
fn export() -> Result<()> {
    release_ignored_test("export", "bench_export_cost_per_window")
}

/// pgbench select-only TPS with the db family's probes on vs off (release build).
fn db() -> Result<()> {
    release_ignored_test("db", "bench_db_select_only_tps")
}

/// Builds the workspace in release and runs one ignored benchmark test of `tests/` there.
fn release_ignored_test(test_file: &str, test_name: &str) -> Result<()> {
    crate::run_checked(crate::cargo().args(["build", "--release"]), "release build")?;
    crate::run_checked(
        crate::cargo().args([
            "test",
            "--release",
            "-p",
            "profiler-tests",
            "--test",
            test_file,
            "--",
            "--ignored",
            "--exact",
            test_name,
            "--nocapture",
        ]),
        &format!("{test_file} benchmark"),
    )
}

/// `record` with every family on (off-CPU + run-queue split, on-CPU at 99 Hz, syscalls,
/// tcp), whole host, against nothing attached: perf bench sched pipe (context switches), a
/// syscall-heavy loop (dd copying 1-byte blocks: two syscalls per block) and loopback TCP
/// connection churn (connect, 1-byte request and answer, close), alternating.
fn all_families() -> Result<()> {
    let rounds = env_number("BENCH_ROUNDS", 5) as usize;
    let loops = env_number("BENCH_LOOPS", 200_000);
    let blocks = env_number("BENCH_DD_BLOCKS", 500_000);
    let connections = env_number("BENCH_TCP_CONNECTIONS", 5_000);
    println!(
        "[bench all] record (all families, whole host) vs nothing: perf bench sched pipe -l \
         {loops}, dd bs=1 count={blocks} and {connections} loopback TCP connections, {rounds} \
         rounds"
    );
    // Configurations: what `record` attaches (None: nothing).
    let configs: [(&str, Option<&[&str]>); 4] = [
        ("nothing attached", None),
        ("all families", Some(&[])),
        ("all + db wire", Some(&["--db-wire"])),
        ("tcp family only", Some(&["--events", "tcp"])),
    ];
    // [config][workload] = values over rounds
    let mut results = vec![vec![Vec::new(); 3]; configs.len()];
    for round in 0..rounds {
        for i in 0..configs.len() {
            let c = (i + round) % configs.len();
            let (label, args) = configs[c];
            let tracer = match args {
                Some(args) => Some(start_profiler(args)?),
                None => None,
            };
            let pipe = perf_bench(loops, None);
            let dd = dd_ns_per_syscall(blocks);
            let tcp = tcp_us_per_connection(connections);
            if let Some(tracer) = tracer {
                stop(tracer, Variant::Profiler)?;
            }
            let (pipe, dd, tcp) = (pipe?, dd?, tcp?);
            println!(
                "  round {round}: {label:<18} pipe {pipe:>8.3} usecs/op   dd {dd:>7.1} ns/syscall   \
                 tcp {tcp:>7.2} us/connection"
            );
            results[c][0].push(pipe);
            results[c][1].push(dd);
            results[c][2].push(tcp);
        }
    }
    let m = |config: usize, workload: usize| median(&mut results[config][workload].clone());
    println!("[bench all] medians over {rounds} rounds (ratio to nothing attached):");
    for (c, (label, _)) in configs.iter().enumerate().skip(1) {
        println!(
            "  {label}: perf bench sched pipe {:.3} -> {:.3} usecs/op = {:.3}x; dd bs=1 {:.1} -> \
             {:.1} ns/syscall = {:.3}x; TCP churn {:.2} -> {:.2} us/connection = {:.3}x",
            m(0, 0),
            m(c, 0),
            m(c, 0) / m(0, 0),
            m(0, 1),
            m(c, 1),
            m(c, 1) / m(0, 1),
            m(0, 2),
            m(c, 2),
            m(c, 2) / m(0, 2)
        );
    }
    Ok(())
}

/// Wall time per loopback TCP connection: connect, 1-byte request, 1-byte answer, close
/// (the server answers from a thread of this process).
fn tcp_us_per_connection(connections: u64) -> Result<f64> {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let mut byte = [0u8; 1];
        for _ in 0..connections {
            let (mut stream, _) = listener.accept()?;
            stream.read_exact(&mut byte)?;
            stream.write_all(&byte)?;
        }
        Ok(())
    });
    let start = std::time::Instant::now();
    let mut byte = [1u8; 1];
    for _ in 0..connections {
        let mut stream = TcpStream::connect(addr).context("connect")?;
        stream.write_all(&byte)?;
        stream.read_exact(&mut byte)?;
    }
    let elapsed = start.elapsed();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?
        .context("server")?;
    Ok(elapsed.as_secs_f64() * 1e6 / connections as f64)
}

/// Wall time per syscall of `dd if=/dev/zero of=/dev/null bs=1 count=N` (2N syscalls).
fn dd_ns_per_syscall(blocks: u64) -> Result<f64> {
    let start = std::time::Instant::now();
    let status = Command::new("dd")
        .args([
            "if=/dev/zero",
            "of=/dev/null",
            "bs=1",
            &format!("count={blocks}"),
        ])
        .stderr(Stdio::null())
        .status()
        .context("cannot run dd")?;
    if !status.success() {
        bail!("dd failed ({status})");
    }
    Ok(start.elapsed().as_nanos() as f64 / (2 * blocks) as f64)
}

fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// Round-by-round ratios of `values` to `base` (the run of the same round): their median
/// and range.
fn paired_ratio(values: &[f64], base: &[f64]) -> (f64, f64, f64) {
    let mut ratios: Vec<f64> = values.iter().zip(base).map(|(v, b)| v / b).collect();
    let (low, high) = range(&ratios);
    (median(&mut ratios), low, high)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// usecs/op in each of `MODES`, with the variant's tracer attached.
fn measure(variant: Variant, loops: u64) -> Result<Vec<f64>> {
    let tracer = match variant {
        Variant::Baseline => None,
        Variant::Profiler => Some(start_profiler(&[
            "--events", "offcpu", "--attach", "tp-btf", "--unwind", "dwarf",
        ])?),
        Variant::ProfilerFp => Some(start_profiler(&[
            "--events", "offcpu", "--attach", "tp-btf", "--unwind", "fp",
        ])?),
        Variant::ProfilerNoSplit => Some(start_profiler(&[
            "--events",
            "offcpu",
            "--attach",
            "tp-btf",
            "--no-runqueue-split",
        ])?),
        Variant::ProfilerTracepoint => Some(start_profiler(&[
            "--events",
            "offcpu",
            "--attach",
            "tracepoint",
        ])?),
        Variant::Offcputime => Some(start_offcputime()?),
    };
    let result: Result<Vec<f64>> = MODES
        .iter()
        .map(|(_, cpu)| perf_bench(loops, *cpu))
        .collect();
    if let Some(tracer) = tracer {
        stop(tracer, variant)?;
    }
    result
}

/// `bpf_run_ns / bpf_runs` of the last capture `start_profiler` wrote.
fn ebpf_ns_per_run() -> Result<Option<f64>> {
    let path = bench_output_dir().join("capture.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let capture: serde_json::Value = serde_json::from_str(&text).context("capture.json")?;
    let counter = |name: &str| capture["metadata"]["counters"][name].as_f64();
    Ok(match (counter("bpf_run_ns"), counter("bpf_runs")) {
        (Some(ns), Some(runs)) if runs > 0.0 => Some(ns / runs),
        _ => None,
    })
}

fn bench_output_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("profiler-bench-{}", std::process::id()))
}

fn perf_bench(loops: u64, cpu: Option<&str>) -> Result<f64> {
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", cpu, "perf"]);
            cmd
        }
        None => Command::new("perf"),
    };
    let out = cmd
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

/// Starts `profiler record --duration 1h ARGS -o TMP` and waits until it is recording.
fn start_profiler(args: &[&str]) -> Result<Child> {
    let out_dir = bench_output_dir();
    let mut child = Command::new(workspace_root().join("target/release/profiler"))
        .args(["record", "--duration", "1h"])
        .args(args)
        .arg("-o")
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
            Some(Ok(line)) if line.starts_with("recording ") && line.contains("Ctrl-C") => break,
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
    if variant != Variant::Offcputime && !status.success() {
        bail!("the profiler failed after SIGINT ({status})");
    }
    Ok(())
}
