//! `cargo xtask bench busy-host`: what recording costs a host that is already saturated.
//!
//! pgbench -S with 2 clients saturates a local PostgreSQL on this 2-CPU machine. The measure
//! is CPU per transaction, traced ÷ untraced, in alternating pairs (the order flips every
//! round), medians with the range shown. CPU is counted two ways:
//! - **host**: every CPU's busy time from /proc/stat (the figure; other load on the
//!   machine lands in it too);
//! - **cgroup**: the CPU time of a cgroup holding this bench, PostgreSQL, pgbench and the
//!   profiler (`cpu.stat` usage_usec) — eBPF programs run in the context of the task that hit
//!   the hook, so their cost is in it, while other work on the machine is not.
//!
//! After the pairs, one more run per configuration with `--measure-overhead` gives each eBPF
//! program's runs and ns per run from the kernel's own statistics (bpftool), per transaction.
//!
//! Environment: BENCH_ROUNDS (7), BENCH_SECONDS (6), BENCH_CONFIGS (comma list of the names
//! below; all by default).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use profiler_tests::pg::PgCluster;
use profiler_tests::*;

/// A configuration: its name and what runs while traced.
struct Config {
    name: &'static str,
    tracer: Tracer,
}

enum Tracer {
    Record(&'static [&'static str]),
    Daemon,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "default",
        tracer: Tracer::Record(&[]),
    },
    Config {
        name: "offcpu",
        tracer: Tracer::Record(&["--events", "offcpu"]),
    },
    Config {
        name: "offcpu-fp",
        tracer: Tracer::Record(&["--events", "offcpu", "--unwind", "fp"]),
    },
    Config {
        name: "offcpu-no-runqueue-split",
        tracer: Tracer::Record(&["--events", "offcpu", "--no-runqueue-split"]),
    },
    Config {
        name: "db",
        tracer: Tracer::Record(&["--events", "db"]),
    },
    Config {
        name: "syscalls",
        tracer: Tracer::Record(&["--events", "syscalls"]),
    },
    Config {
        name: "oncpu",
        tracer: Tracer::Record(&["--events", "oncpu"]),
    },
    Config {
        name: "tcp",
        tracer: Tracer::Record(&["--events", "tcp"]),
    },
    Config {
        name: "daemon",
        tracer: Tracer::Daemon,
    },
];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (busy, total) jiffies over all CPUs.
fn host_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().expect("jiffies"))
        .collect();
    let total: u64 = cpu.iter().take(8).sum();
    // idle and iowait are not busy.
    (total - cpu[3] - cpu[4], total)
}

fn cgroup_usage_us(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join("cpu.stat"))
        .expect("cpu.stat")
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .expect("usage_usec")
        .trim()
        .parse()
        .expect("usage_usec number")
}

/// One measured pgbench run: transactions, host busy seconds, cgroup CPU seconds.
struct Run {
    transactions: f64,
    host_s: f64,
    cgroup_s: f64,
}

fn pgbench_run(cluster: &PgCluster, cgroup: &Path, seconds: &str) -> Run {
    let hz = 100.0; // USER_HZ
    let (busy0, _) = host_jiffies();
    let cg0 = cgroup_usage_us(cgroup);
    let out = cluster.pgbench(&["-S", "-n", "-c", "2", "-j", "2", "-T", seconds]);
    let cg1 = cgroup_usage_us(cgroup);
    let (busy1, _) = host_jiffies();
    let transactions: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in {out}"));
    Run {
        transactions,
        host_s: (busy1 - busy0) as f64 / hz,
        cgroup_s: (cg1 - cg0) as f64 / 1e6,
    }
}

/// A running tracer; stopping it ends the capture (outside the measured interval).
enum Running {
    Record(Recording),
    Daemon(Child),
}

fn start_tracer(tracer: &Tracer, dir: &Path, extra: &[&str]) -> Running {
    match tracer {
        Tracer::Record(args) => {
            let mut all: Vec<&str> = vec!["--duration", "1h"];
            all.extend_from_slice(args);
            all.extend_from_slice(extra);
            Running::Record(Recording::start(&dir.join("out"), &all))
        }
        Tracer::Daemon => {
            // The daemon always keeps the kernel's run-time statistics on.
            let _ = extra;
            let mut child = Command::new(profiler_bin())
                .args(["daemon", "--data-dir"])
                .arg(dir.join("data"))
                .args(["--listen", "127.0.0.1:0"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start daemon");
            // Running once its first window is recording.
            let _lines = wait_for_stderr_line(
                &mut child,
                Duration::from_secs(60),
                |line| line.contains("window") || line.contains("listening"),
                "daemon did not start",
            );
            std::thread::sleep(Duration::from_secs(3));
            Running::Daemon(child)
        }
    }
}

fn stop_tracer(running: Running) {
    match running {
        Running::Record(recording) => {
            let _ = recording.interrupt();
        }
        Running::Daemon(mut child) => {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// Per-program (runs, run time ns) of the loaded eBPF programs, by name.
fn bpf_program_stats() -> BTreeMap<String, (u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    let mut stats = BTreeMap::new();
    for p in progs.as_array().into_iter().flatten() {
        let (Some(name), Some(cnt), Some(ns)) = (
            p["name"].as_str(),
            p["run_cnt"].as_u64(),
            p["run_time_ns"].as_u64(),
        ) else {
            continue;
        };
        let e = stats.entry(name.to_string()).or_insert((0, 0));
        e.0 += cnt;
        e.1 += ns;
    }
    stats
}

#[test]
#[ignore = "benchmark: cargo xtask bench busy-host"]
fn bench_busy_host_cpu_per_transaction() {
    require_root();
    let rounds = env_number("BENCH_ROUNDS", 7) as usize;
    let seconds = env_number("BENCH_SECONDS", 6).to_string();
    let wanted: Option<Vec<String>> = std::env::var("BENCH_CONFIGS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let configs: Vec<&Config> = CONFIGS
        .iter()
        .filter(|c| {
            wanted
                .as_ref()
                .is_none_or(|w| w.iter().any(|n| n == c.name))
        })
        .collect();
    assert!(
        !configs.is_empty(),
        "BENCH_CONFIGS names none of the configurations"
    );

    // Everything this bench starts (PostgreSQL, pgbench, the profiler) runs in one cgroup.
    let cgroup = cgroup2_root().join(format!("profiler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("create the bench cgroup");
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .expect("join the bench cgroup");

    let cluster = PgCluster::start("busy-host");
    cluster.pgbench(&["-i", "-q", "-s", "10"]);
    cluster.pgbench(&["-S", "-n", "-c", "2", "-j", "2", "-T", "3"]); // warm the cache
    println!(
        "[bench busy-host] pgbench -S -c 2 -j 2 -T {seconds} on a local PostgreSQL (scale 10), \
         whole-host tracing vs none, {rounds} alternating pairs per configuration; CPU per \
         transaction, traced / untraced"
    );
    let mut summary = Vec::new();
    for config in &configs {
        let (mut host, mut cgroup_ratio, mut added_us) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let traced_first = round % 2 == 1;
            let mut pair: [Option<Run>; 2] = [None, None];
            for traced in [traced_first, !traced_first] {
                let dir = temp_dir(&format!("bench-busy-{}", config.name));
                let tracer = traced.then(|| start_tracer(&config.tracer, &dir, &[]));
                let run = pgbench_run(&cluster, &cgroup, &seconds);
                if let Some(tracer) = tracer {
                    stop_tracer(tracer);
                }
                let _ = std::fs::remove_dir_all(&dir);
                pair[usize::from(traced)] = Some(run);
            }
            let [Some(off), Some(on)] = pair else {
                unreachable!()
            };
            let per = |r: &Run, s: f64| s / r.transactions * 1e6;
            let h = per(&on, on.host_s) / per(&off, off.host_s);
            let c = per(&on, on.cgroup_s) / per(&off, off.cgroup_s);
            let added = per(&on, on.cgroup_s) - per(&off, off.cgroup_s);
            println!(
                "  {:<26} round {round}: untraced {:>6.0} tx/s {:>6.1} us/tx (cgroup {:>6.1}), \
                 traced {:>6.0} tx/s {:>6.1} us/tx (cgroup {:>6.1}): host {h:.3}x, cgroup \
                 {c:.3}x",
                config.name,
                off.transactions / seconds.parse::<f64>().unwrap(),
                per(&off, off.host_s),
                per(&off, off.cgroup_s),
                on.transactions / seconds.parse::<f64>().unwrap(),
                per(&on, on.host_s),
                per(&on, on.cgroup_s),
            );
            host.push(h);
            cgroup_ratio.push(c);
            added_us.push(added);
        }
        summary.push((config.name, host, cgroup_ratio, added_us));
    }

    // Where the eBPF time goes: one more traced run per configuration with the kernel's
    // run-time statistics on.
    println!("[bench busy-host] eBPF programs per transaction (one run with --measure-overhead):");
    for config in &configs {
        let dir = temp_dir(&format!("bench-busy-stats-{}", config.name));
        let tracer = start_tracer(&config.tracer, &dir, &["--measure-overhead"]);
        let before = bpf_program_stats();
        let run = pgbench_run(&cluster, &cgroup, &seconds);
        let after = bpf_program_stats();
        stop_tracer(tracer);
        let _ = std::fs::remove_dir_all(&dir);
        let mut total_ns = 0.0;
        let mut lines = Vec::new();
        for (name, (cnt, ns)) in &after {
            let (cnt0, ns0) = before.get(name).copied().unwrap_or((0, 0));
            let (runs, ns) = (cnt.saturating_sub(cnt0), ns.saturating_sub(ns0));
            if runs == 0 {
                continue;
            }
            total_ns += ns as f64 / run.transactions;
            lines.push(format!(
                "    {name:<16} {:>7.2} runs/tx {:>6.0} ns/run {:>7.0} ns/tx",
                runs as f64 / run.transactions,
                ns as f64 / runs as f64,
                ns as f64 / run.transactions
            ));
        }
        println!(
            "  {}: {total_ns:.0} ns of eBPF per transaction",
            config.name
        );
        lines.iter().for_each(|l| println!("{l}"));
    }

    println!("[bench busy-host] medians of {rounds} pairs (range):");
    for (name, host, cgroup_ratio, added) in &summary {
        let (hl, hh) = range(host);
        let (cl, ch) = range(cgroup_ratio);
        let (al, ah) = range(added);
        println!(
            "  {name:<26} host {:.3}x ({hl:.3}-{hh:.3})  cgroup {:.3}x ({cl:.3}-{ch:.3})  \
             added {:.1} us/tx ({al:.1}-{ah:.1})",
            median(host),
            median(cgroup_ratio),
            median(added)
        );
    }
    drop(cluster);
    std::fs::write(
        cgroup2_root().join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("leave the bench cgroup");
    let _ = std::fs::remove_dir(&cgroup);
}
