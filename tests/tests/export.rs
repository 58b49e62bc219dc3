//! Profiles leaving the host: the daemon's push to a Pyroscope-shaped receiver and the pull
//! endpoint Parca's and Grafana Alloy's scrapers use (`/debug/pprof/profile?seconds=N`).
//!
//! Oracles: what is pushed is decoded by a receiver not written in Rust (Python's JSON and
//! base64) and by Go's own `go tool pprof`; its times are checked against the workload's
//! own clock and against the daemon's windows; the scrape endpoint is fetched by
//! `go tool pprof` itself and checked against the kernel's CPU accounting of the burner
//! (/proc/PID/stat), sampled by the test while the capture ran.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use profiler_tests::daemon::{Daemon, call, free_port, metric, window_captures};
use profiler_tests::*;
use serde_json::Value;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tests' venv (cargo xtask setup), with PyPI's opentelemetry-proto.
const VENV_PYTHON: &str = "/usr/local/lib/profiler-tests/venv/bin/python";

/// A Python receiver (tests/workloads/), killed on drop.
struct Receiver(Child);

impl Receiver {
    /// The Pyroscope-shaped one, refusing the first `fail_first` requests.
    fn start(port: u16, dir: &Path, fail_first: u32) -> Self {
        Self::spawn(
            "/usr/bin/python3",
            "pyroscope_receiver.py",
            port,
            dir,
            &["--fail-first", &fail_first.to_string()],
        )
    }

    /// The OTLP one, decoding with the official classes: OTLP/HTTP, or OTLP/gRPC (grpcio)
    /// with `--grpc`; over TLS with `--tls CERT KEY`.
    fn otlp(port: u16, dir: &Path, args: &[&str]) -> Self {
        Self::spawn(VENV_PYTHON, "otlp_receiver.py", port, dir, args)
    }

    fn spawn(python: &str, script: &str, port: u16, dir: &Path, args: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(python)
            .arg(format!("{}/workloads/{script}", env!("CARGO_MANIFEST_DIR")))
            .arg(port.to_string())
            .arg(dir)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{python} (cargo xtask setup): {e}"));
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), format!("listening {port}"));
        Receiver(child)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the receiver kept: (labels, pprof file) per series, in the order received.
fn received(dir: &Path) -> Vec<(BTreeMap<String, String>, PathBuf)> {
    let mut stems: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    stems.sort();
    stems
        .into_iter()
        .map(|json| {
            let meta: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
            let labels = meta["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            (labels, json.with_extension("pb.gz"))
        })
        .collect()
}

/// One pprof sample as `go tool pprof -raw` prints it: values, frames (leaf first), labels.
#[derive(Debug)]
struct RawSample {
    values: Vec<u64>,
    frames: Vec<String>,
    labels: BTreeMap<String, String>,
}

/// A pprof file read by Go's own tool: its sample types and samples.
fn go_pprof_raw(file: &Path) -> (Vec<String>, Vec<RawSample>) {
    let out = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(file)
        .env("PPROF_TMPDIR", std::env::temp_dir())
        .output()
        .expect("go tool pprof (package golang-go)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof -raw {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_raw(&text)
}

/// `go tool pprof -raw`'s text: a `Samples:` header of `type/unit` names, then per sample
/// `VALUES: LOCATION-IDS` and label lines `key:[value] …`; `Locations` maps ids to
/// functions (`ID: 0xADDR M=N FUNCTION FILE:LINE s=0`).
fn parse_raw(text: &str) -> (Vec<String>, Vec<RawSample>) {
    let mut lines = text.lines().peekable();
    let mut types = Vec::new();
    while let Some(line) = lines.next() {
        if line.trim() == "Samples:" {
            // `type/unit`, the default one marked `[dflt]`.
            types = lines
                .next()
                .unwrap()
                .split_whitespace()
                .map(|t| t.trim_end_matches("[dflt]").to_string())
                .collect();
            break;
        }
    }
    // Each sample with its location ids, resolved once the locations are read.
    let mut samples: Vec<(RawSample, Vec<u64>)> = Vec::new();
    let mut locations: BTreeMap<u64, String> = BTreeMap::new();
    let mut in_locations = false;
    for line in lines {
        let trimmed = line.trim();
        if trimmed.starts_with("Locations") {
            in_locations = true;
            continue;
        }
        if trimmed.starts_with("Mappings") {
            break;
        }
        if in_locations {
            // "     1: 0x0 M=0 name :0:0 s=0" — the name may hold spaces: up to " :" or " s=".
            if let Some((id, rest)) = trimmed.split_once(": ")
                && let Ok(id) = id.trim().parse::<u64>()
            {
                let rest = rest
                    .split_whitespace()
                    .skip(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                let name = rest
                    .rsplit_once(" s=")
                    .map_or(rest.as_str(), |(n, _)| n)
                    .to_string();
                let name = name
                    .rsplit_once(' ')
                    .filter(|(_, file)| file.contains(':'))
                    .map_or(name.clone(), |(n, _)| n.to_string());
                locations.insert(id, name);
            }
            continue;
        }
        if trimmed.contains(":[") {
            // Label lines: `key:[value] key:[value]` (strings on one line, numbers on another).
            if let Some(last) = samples.last_mut() {
                for pair in trimmed.trim_end_matches(']').split("] ") {
                    if let Some((key, value)) = pair.split_once(":[") {
                        last.0
                            .labels
                            .insert(key.trim().to_string(), value.to_string());
                    }
                }
            }
            continue;
        }
        if let Some((values, ids)) = trimmed.split_once(':') {
            let values: Option<Vec<u64>> =
                values.split_whitespace().map(|v| v.parse().ok()).collect();
            let ids: Option<Vec<u64>> = ids.split_whitespace().map(|v| v.parse().ok()).collect();
            if let (Some(values), Some(ids)) = (values, ids)
                && values.len() == types.len()
            {
                let sample = RawSample {
                    values,
                    frames: Vec::new(),
                    labels: BTreeMap::new(),
                };
                samples.push((sample, ids));
            }
        }
    }
    let samples = samples
        .into_iter()
        .map(|(mut sample, ids)| {
            sample.frames = ids
                .iter()
                .map(|id| locations.get(id).cloned().unwrap_or_default())
                .collect();
            sample
        })
        .collect();
    (types, samples)
}

/// The sum of value `index` over samples with `function` among their frames.
fn total_in(samples: &[RawSample], index: usize, function: &str) -> u64 {
    samples
        .iter()
        .filter(|s| s.frames.iter().any(|f| is_function(f, function)))
        .map(|s| s.values[index])
        .sum()
}

/// A cgroup named like a systemd service, holding `pid` until dropped.
struct ServiceCgroup(PathBuf);

impl ServiceCgroup {
    fn new(name: &str, pid: u32) -> Self {
        let dir = cgroup2_root().join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("create the cgroup");
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("move into the cgroup");
        ServiceCgroup(dir)
    }
}

impl Drop for ServiceCgroup {
    fn drop(&mut self) {
        let root = cgroup2_root().join("cgroup.procs");
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(&root, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The daemon pushes every window to a Pyroscope-shaped receiver that refuses the first two
/// requests (503): the retries deliver them, nothing is dropped, and what Go's pprof reads
/// from the pushes adds up to the windows' captures and to the workload's own clock.
#[test]
fn every_window_reaches_pyroscope_and_adds_up_to_the_workloads_clock() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("export-pyroscope");
    let (data, inbox) = (dir.join("data"), dir.join("received"));
    let receiver_port = free_port();
    let _receiver = Receiver::start(receiver_port, &inbox, 2);
    // 150 iterations of a pipe read, a nanosleep and a futex wait of 20 ms each (≈ 9 s),
    // blocking through libc and std; in a cgroup named like a systemd service.
    let mut workload = Workload::start(150, 20, &dir.join("report.json"));
    let cgroup = ServiceCgroup::new("profiler-export-test.service", workload.pid);
    let port = free_port();
    let url = format!("http://127.0.0.1:{receiver_port}");
    let pid = workload.pid.to_string();
    // The cgroup, not the pid: the windows go on once the workload has exited.
    let mut daemon = Daemon::spawn(
        &data,
        port,
        &["--window", "2s", "--pyroscope-url", &url],
        &[
            "--events",
            "offcpu,oncpu",
            "--cgroup",
            cgroup.0.to_str().unwrap(),
        ],
    );
    // The whole run inside the windows: from the second window on, to one past its end.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, "profiler_windows_total") < 1.0 {
        assert!(Instant::now() < deadline, "no window");
        std::thread::sleep(Duration::from_millis(100));
    }
    workload.go();
    let report = workload.finish();
    let windows = metric(port, "profiler_windows_total");
    while metric(port, "profiler_windows_total") < windows + 2.0 {
        assert!(Instant::now() < deadline, "the windows stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed = metric(
        port,
        "profiler_export_failed_attempts_total{exporter=\"pyroscope\"}",
    );
    let stderr = daemon.stop();

    // The first two requests were refused (503) and retried.
    assert_eq!(failed, 2.0, "failed attempts; daemon stderr:\n{stderr}");
    assert!(
        !stderr.contains("pyroscope push to"),
        "a push that a retry delivered is not a failure worth a line:\n{stderr}"
    );
    let windows = window_captures(&data);
    let pushes = received(&inbox);
    let requests: std::collections::BTreeSet<String> = pushes
        .iter()
        .map(|(_, f)| f.file_name().unwrap().to_string_lossy()[..4].to_string())
        .collect();
    // A request per window with samples of the workload (every window here has them: it
    // blocks or runs all the time) — all delivered, the last one at exit.
    let with_samples = windows
        .iter()
        .filter(|c| !stacks_of(c, workload_pid(&report)).is_empty())
        .count();
    assert_eq!(
        requests.len(),
        with_samples,
        "one request per window; stderr:\n{stderr}"
    );
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let mut offcpu = Vec::new();
    for (labels, file) in &pushes {
        assert_eq!(labels["service_name"], "profiler-export-test", "{labels:?}");
        assert_eq!(labels["host"], host.trim(), "{labels:?}");
        let name = labels["__name__"].as_str();
        let (types, samples) = go_pprof_raw(file);
        match name {
            "off_cpu" => {
                assert_eq!(types, ["offcpu_blocks/count", "offcpu_time/nanoseconds"]);
                for sample in &samples {
                    assert_eq!(sample.labels.get("pid"), Some(&pid), "{sample:?}");
                    assert!(sample.labels.contains_key("state"), "{sample:?}");
                    assert_eq!(
                        sample.labels.get("systemd_unit").map(String::as_str),
                        Some("profiler-export-test.service"),
                        "{sample:?}"
                    );
                }
                offcpu.extend(samples);
            }
            "process_cpu" => {
                assert_eq!(types, ["samples/count", "cpu/nanoseconds"]);
            }
            other => panic!("unexpected profile {other}"),
        }
    }
    let workload_pid = workload_pid(&report);
    for function in FUNCTIONS {
        let pushed = total_in(&offcpu, 1, function);
        let captured: u64 = windows
            .iter()
            .map(|c| blocked_ns_in(c, workload_pid, function))
            .sum();
        let own = report["blocked_ns"][function].as_u64().unwrap();
        println!(
            "{function}: pushed {:.1} ms, windows {:.1} ms, the workload's clock {:.1} ms",
            pushed as f64 / 1e6,
            captured as f64 / 1e6,
            own as f64 / 1e6
        );
        assert_eq!(pushed, captured, "{function}: pushes = windows");
        let error = (pushed as f64 - own as f64).abs() / own as f64;
        assert!(
            error < 0.05,
            "{function}: pushed {pushed} ns vs the workload's {own} ns"
        );
    }
}

fn workload_pid(report: &Value) -> u32 {
    report["pid"].as_u64().unwrap() as u32
}

/// With the store down, the windows go on; each window's push is tried with backoff, then
/// dropped and counted, with one line for the outage and one when it ends; once the store
/// is back the pushes resume, and every window is accounted for (pushed or dropped).
#[test]
fn a_store_that_is_down_costs_counted_drops_and_one_line() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("export-down");
    let data = dir.join("data");
    let receiver_port = free_port(); // nothing listens there yet
    let port = free_port();
    let url = format!("http://127.0.0.1:{receiver_port}");
    // 100 ms of spinning, 100 ms asleep, over and over: off-CPU samples in every window.
    let mut workload = ReadyProcess::spawn(
        Command::new(built_binary("oncpu-workload")).args(["alternate", "100000"]),
    );
    workload.go();
    let mut daemon = Daemon::spawn(
        &data,
        port,
        &["--window", "1s", "--pyroscope-url", &url],
        &["--events", "offcpu", "-p", &workload.pid],
    );
    let dropped = || {
        metric(
            port,
            "profiler_export_dropped_total{exporter=\"pyroscope\"}",
        )
    };
    let pushed = || metric(port, "profiler_export_pushes_total{exporter=\"pyroscope\"}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while dropped() < 2.0 {
        assert!(Instant::now() < deadline, "no push was dropped");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pushed(), 0.0);
    let rss_down = status_kib(daemon.pid(), "VmRSS:");
    let _receiver = Receiver::start(receiver_port, &dir.join("received"), 0);
    while pushed() < 3.0 {
        assert!(Instant::now() < deadline, "pushes did not resume");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every window is pushed or dropped once the queue drained (every window has samples).
    let settled = || {
        let windows = metric(port, "profiler_windows_total");
        windows == pushed() + dropped()
    };
    while !settled() {
        assert!(Instant::now() < deadline, "windows not accounted for");
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed = metric(
        port,
        "profiler_export_failed_attempts_total{exporter=\"pyroscope\"}",
    );
    let errors = metric(port, "profiler_window_errors_total");
    let rss_up = status_kib(daemon.pid(), "VmRSS:");
    let dropped = dropped();
    let stderr = daemon.stop();
    workload.kill();
    println!(
        "dropped {dropped} windows after {failed} failed attempts; RSS {rss_down} KiB down, \
         {rss_up} KiB after"
    );
    assert_eq!(errors, 0.0, "the windows went on");
    assert!(
        failed >= 8.0,
        "each dropped push was tried 4 times: {failed}"
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("pyroscope push to") && l.contains(" failed: "))
            .count(),
        1,
        "one line for the outage:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("works again").count(),
        1,
        "one line when it ends:\n{stderr}"
    );
}

/// Stores that accept connections and never answer (a black hole, the slowest endpoint there
/// is), both of them (Pyroscope and OTLP), with 200 ms windows: each attempt ends at the push
/// timeout, the bounded queues fill, and over the next 100 pushes given up the windows go on
/// without an error, the daemon never holds more than one connection per store (`ss`: an
/// attempt that timed out leaves no socket behind), and its resident memory stays bounded:
/// its peak over the last 45 s within 5 % of its peak over the first 45 s. (Its RSS swings
/// between plateaus some 20 s long, 72–112 MiB in a debug build, while a push of 4 attempts
/// that each time out takes 43.5 s: a span shorter than that compares plateaus, not
/// growth; sampled every 500 ms.)
#[test]
fn a_store_that_never_answers_costs_drops_not_memory() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("export-black-hole");
    let data = dir.join("data");
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    // Accepts and holds every connection, never reading or writing (the thread ends with
    // the test binary).
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hole.incoming().flatten() {
            held.push(stream);
        }
    });
    let mut workload = ReadyProcess::spawn(
        Command::new(built_binary("oncpu-workload")).args(["alternate", "50000"]),
    );
    workload.go();
    let port = free_port();
    let url = format!("http://127.0.0.1:{hole_port}");
    let mut daemon = Daemon::spawn(
        &data,
        port,
        &[
            "--window",
            "200ms",
            "--pyroscope-url",
            &url,
            "--otlp-endpoint",
            &url,
        ],
        &["--events", "offcpu", "-p", &workload.pid],
    );
    let dropped_by = |exporter: &str| {
        metric(
            port,
            &format!("profiler_export_dropped_total{{exporter=\"{exporter}\"}}"),
        )
    };
    let dropped = || dropped_by("pyroscope") + dropped_by("otlp");
    let deadline = Instant::now() + Duration::from_secs(240);
    // The daemon's TCP connections to the stores, by the kernel's socket table.
    let connections = || {
        let out = Command::new("ss").args(["-tnpH"]).output().expect("ss");
        let owner = format!("pid={},", daemon.pid());
        let peer = format!("127.0.0.1:{hole_port} ");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&owner) && l.contains(&peer))
            .count()
    };
    // Peak resident memory and the most connections held, sampled every 500 ms for at least
    // 45 s and until `until` holds.
    let measure = |until: &dyn Fn() -> bool| {
        let began = Instant::now();
        let (mut peak, mut held) = (0, 0);
        while began.elapsed() < Duration::from_secs(45) || !until() {
            assert!(Instant::now() < deadline, "took too long");
            peak = peak.max(status_kib(daemon.pid(), "VmRSS:"));
            held = held.max(connections());
            std::thread::sleep(Duration::from_millis(500));
        }
        (peak, held)
    };
    // Both queues full: each exporter has dropped a push.
    while dropped_by("pyroscope") < 1.0 || dropped_by("otlp") < 1.0 {
        assert!(Instant::now() < deadline, "no push dropped");
        std::thread::sleep(Duration::from_millis(100));
    }
    let windows_before = metric(port, "profiler_windows_total");
    let dropped_before = dropped();
    let (rss_before, held_before) = measure(&|| true);
    let (rss_after, held_after) = measure(&|| dropped() >= dropped_before + 100.0);
    let windows_after = metric(port, "profiler_windows_total");
    let pushed = metric(port, "profiler_export_pushes_total{exporter=\"pyroscope\"}")
        + metric(port, "profiler_export_pushes_total{exporter=\"otlp\"}");
    let failed = metric(
        port,
        "profiler_export_failed_attempts_total{exporter=\"pyroscope\"}",
    ) + metric(
        port,
        "profiler_export_failed_attempts_total{exporter=\"otlp\"}",
    );
    let errors = metric(port, "profiler_window_errors_total");
    let dropped_after = dropped();
    let stderr = daemon.stop();
    workload.kill();
    println!(
        "{} windows, {} pushes dropped, {failed} attempts timed out; RSS peak {rss_before} -> \
         {rss_after} KiB, connections to the stores at most {held_before} / {held_after}",
        windows_after - windows_before,
        dropped_after - dropped_before
    );
    assert_eq!(errors, 0.0, "the windows went on:\n{stderr}");
    assert_eq!(pushed, 0.0);
    assert!(failed >= 1.0, "no attempt timed out");
    assert!(
        windows_after - windows_before >= 50.0,
        "{windows_before} -> {windows_after} windows"
    );
    assert!(
        rss_after as f64 <= rss_before as f64 * 1.05,
        "RSS {rss_before} KiB -> {rss_after} KiB over 100 dropped pushes"
    );
    assert!(
        held_before <= 2 && held_after <= 2 && held_before + held_after > 0,
        "connections to the stores: {held_before} then {held_after}"
    );
    for exporter in ["pyroscope", "otlp"] {
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.contains(&format!("{exporter} push to")) && l.contains(" failed: "))
                .count(),
            1,
            "one line for {exporter}'s outage:\n{stderr}"
        );
    }
}

fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap()
}

/// utime + stime of `pid` in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// `go tool pprof http://…/debug/pprof/profile -seconds 3` against a daemon that records no
/// on-CPU family: a fresh on-CPU capture, Go's CPU-profile sample types, and the burner's
/// CPU time in it what the kernel accounted to the burner over the capture's span.
#[test]
fn go_tool_pprof_scrapes_a_fresh_cpu_profile() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("export-scrape");
    let mut burner = ReadyProcess::spawn(Command::new(built_binary("oncpu-workload")).arg("60000"));
    let burner_pid: u32 = burner.pid.parse().unwrap();
    burner.go();
    let port = free_port();
    let mut daemon = Daemon::spawn(
        &dir.join("data"),
        port,
        &["--window", "60s"],
        &["--events", "offcpu", "-p", &burner.pid],
    );
    // The kernel's CPU accounting of the burner, every 20 ms, while go tool pprof fetches.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push((unix_ns(), cpu_ticks(burner_pid)));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };
    let profile = dir.join("cpu.pb.gz");
    let out = Command::new("go")
        .args(["tool", "pprof", "-proto", "-seconds", "3", "-output"])
        .arg(&profile)
        .arg(format!("http://127.0.0.1:{port}/debug/pprof/profile"))
        .env("PPROF_TMPDIR", &dir)
        .output()
        .expect("go tool pprof");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ticks = sampler.join().unwrap();
    assert!(
        out.status.success(),
        "go tool pprof: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The capture the daemon kept for it: its span.
    let capture_dir = std::fs::read_dir(dir.join("data"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("capture-"))
        })
        .expect("the on-demand capture is kept");
    let capture = read_capture(&capture_dir);
    // It answers only GET (a scrape), and says so.
    let (status, _) = call(port, "POST", "/debug/pprof/profile?seconds=1").expect("an answer");
    assert_eq!(status, 405);
    daemon.stop();
    burner.kill();
    assert!(capture["offcpu"].is_null(), "on-CPU only");
    let start_ns = capture["metadata"]["start_unix_ms"].as_u64().unwrap() * 1_000_000;
    let duration_ns = capture["metadata"]["duration_ns"].as_u64().unwrap();
    assert!(
        (2_900_000_000..3_200_000_000).contains(&duration_ns),
        "seconds=3 asked for: {duration_ns} ns"
    );
    // Ticks at the capture's start and end, interpolated between the test's samples.
    let at = |t: u64| -> f64 {
        let i = ticks.partition_point(|(ns, _)| *ns <= t);
        assert!(i > 0 && i < ticks.len(), "the samples cover the capture");
        let ((t0, c0), (t1, c1)) = (ticks[i - 1], ticks[i]);
        c0 as f64 + (c1 as f64 - c0 as f64) * (t - t0) as f64 / (t1 - t0).max(1) as f64
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let kernel_ns = (at(start_ns + duration_ns) - at(start_ns)) / hz * 1e9;
    let (types, samples) = go_pprof_raw(&profile);
    assert_eq!(types, ["samples/count", "cpu/nanoseconds"]);
    let burner_samples: Vec<&RawSample> = samples
        .iter()
        .filter(|s| s.labels.get("pid") == Some(&burner_pid.to_string()))
        .collect();
    let spin: u64 = burner_samples
        .iter()
        .filter(|s| s.frames.iter().any(|f| is_function(f, "busy_spin")))
        .map(|s| s.values[1])
        .sum();
    let all: u64 = burner_samples.iter().map(|s| s.values[1]).sum();
    println!(
        "busy_spin {:.1} ms of the burner's {:.1} ms in the profile; the kernel accounted {:.1} \
         ms over the capture's {:.1} ms",
        spin as f64 / 1e6,
        all as f64 / 1e6,
        kernel_ns / 1e6,
        duration_ns as f64 / 1e6
    );
    assert!(
        spin as f64 > 0.95 * all as f64,
        "the burner's samples are in busy_spin"
    );
    let error = (all as f64 - kernel_ns).abs() / kernel_ns;
    assert!(
        error < 0.1,
        "profile {all} ns vs the kernel's {kernel_ns:.0} ns"
    );
}

/// `record --otlp-endpoint` pushes its capture once written, over OTLP/HTTP; the official
/// OTLP classes read it, and per function its off-CPU time is the capture's and the
/// workload's own clock's.
#[test]
fn record_pushes_otlp_over_http_the_official_classes_read() {
    let _serial = serial();
    let port = free_port();
    let inbox = temp_dir("export-otlp-inbox");
    let _receiver = Receiver::otlp(port, &inbox, &[]);
    let url = format!("http://127.0.0.1:{port}");
    record_and_check_otlp("export-otlp", &url, &inbox, "http/protobuf", &[]);
}

/// The same over OTLP/gRPC, to a grpcio server with the official service stubs.
#[test]
fn record_pushes_otlp_over_grpc_to_a_grpcio_server() {
    let _serial = serial();
    let port = free_port();
    let inbox = temp_dir("export-otlp-grpc-inbox");
    let _receiver = Receiver::otlp(port, &inbox, &["--grpc"]);
    let url = format!("http://127.0.0.1:{port}");
    record_and_check_otlp("export-otlp-grpc", &url, &inbox, "grpc", &[]);
}

/// A test CA and a certificate it signed for `localhost` (openssl, EC P-256), in `dir`:
/// (ca.pem, server.pem, server.key).
fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &[
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=profiler test CA",
            ][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-subj", "/CN=localhost"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr"],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// `record --otlp-endpoint https://localhost:PORT` to receivers that speak TLS with a
/// certificate a test CA signed — Python's ssl (OpenSSL) for OTLP/HTTP, grpcio's own TLS for
/// OTLP/gRPC — trusted through SSL_CERT_FILE: the official classes read what was pushed, as
/// over plain HTTP. Without the CA (the system's store) the certificate is refused: one line
/// naming why, a non-zero exit, the files written.
#[test]
fn record_pushes_otlp_over_https_trusting_a_private_ca() {
    let _serial = serial();
    let dir = temp_dir("export-tls");
    let (ca, cert, key) = test_certificates(&dir.join("pki"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let trust = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    for (protocol, extra) in [("http/protobuf", &[][..]), ("grpc", &["--grpc"][..])] {
        let port = free_port();
        let inbox = dir.join(format!("inbox-{}", protocol.replace('/', "-")));
        let _receiver = Receiver::otlp(port, &inbox, &[extra, &["--tls", cert, key]].concat());
        let url = format!("https://localhost:{port}");
        let name = format!("export-tls-{}", protocol.replace('/', "-"));
        record_and_check_otlp(&name, &url, &inbox, protocol, &trust);
    }
    // The system's CAs do not know the test CA.
    let port = free_port();
    let inbox = dir.join("inbox-untrusted");
    let _receiver = Receiver::otlp(port, &inbox, &["--tls", cert, key]);
    let url = format!("https://localhost:{port}");
    let out = dir.join("untrusted");
    let output = run_profiler(&[
        "record",
        "-o",
        out.to_str().unwrap(),
        "-d",
        "1s",
        "--events",
        "offcpu",
        "--otlp-endpoint",
        &url,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stderr}");
    assert!(!output.status.success(), "{stderr}");
    let failed: Vec<&str> = stderr.lines().filter(|l| l.contains("failed")).collect();
    assert_eq!(failed.len(), 1, "{stderr}");
    assert!(
        failed[0].contains("TLS") && failed[0].contains("UnknownIssuer"),
        "{stderr}"
    );
    assert!(out.join("capture.json").is_file(), "the files stay written");
    assert_eq!(
        std::fs::read_dir(&inbox).unwrap().count(),
        0,
        "nothing received"
    );
}

/// Records the off-CPU workload with `--otlp-endpoint` (`protocol`) to the receiver on `port`,
/// and checks what it decoded into `inbox`.
fn record_and_check_otlp(
    name: &str,
    url: &str,
    inbox: &Path,
    protocol: &str,
    env: &[(&str, &str)],
) {
    let recorded = record_offcpu_workload_with_env(
        name,
        30,
        "-p",
        &[
            "--events",
            "offcpu,oncpu",
            "--otlp-endpoint",
            url,
            "--otlp-protocol",
            protocol,
        ],
        env,
    );
    let errors: Vec<PathBuf> = std::fs::read_dir(inbox)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "error"))
        .collect();
    assert!(
        errors.is_empty(),
        "the official classes refused a request: {}",
        std::fs::read_to_string(&errors[0]).unwrap_or_default()
    );
    let request: Value =
        serde_json::from_slice(&std::fs::read(inbox.join("0001.json")).expect("one request"))
            .unwrap();
    assert!(!inbox.join("0002.json").exists(), "one push per capture");
    if protocol != "grpc" {
        // Gzipped, as OTLP exporters send by default (the gRPC receiver inflates it itself).
        assert_eq!(request["content_encoding"], "gzip");
        println!("OTLP/HTTP body: {} bytes gzipped", request["bytes_sent"]);
    }
    let resources = request["resources"].as_array().unwrap();
    let ours = resources
        .iter()
        .find(|r| r["attributes"]["process.pid"].as_u64() == Some(recorded.pid.into()))
        .expect("the workload's resource");
    let attributes = &ours["attributes"];
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    assert_eq!(attributes["host.name"], host.trim());
    assert_eq!(attributes["process.executable.name"], "offcpu-workload");
    assert!(
        attributes["service.name"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{attributes}"
    );
    let capture = &recorded.capture;
    let start_ns = capture["metadata"]["start_unix_ms"].as_u64().unwrap() * 1_000_000;
    let profiles = ours["profiles"].as_array().unwrap();
    let offcpu = profiles
        .iter()
        .find(|p| p["sample_type"] == serde_json::json!(["off_cpu", "nanoseconds"]))
        .expect("an off-CPU profile");
    assert_eq!(offcpu["time_unix_nano"].as_u64(), Some(start_ns));
    assert_eq!(offcpu["duration_nano"], capture["metadata"]["duration_ns"]);
    assert_eq!(offcpu["scope"][0], "profiler");
    let samples = offcpu["samples"].as_array().unwrap();
    for sample in samples {
        assert!(sample["attributes"]["thread.id"].is_u64(), "{sample}");
        assert!(
            sample["attributes"]["profiler.offcpu.state"].is_string(),
            "{sample}"
        );
    }
    for function in FUNCTIONS {
        let pushed: u64 = samples
            .iter()
            .filter(|s| {
                s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| is_function(f.as_str().unwrap(), function))
            })
            .map(|s| s["values"][0].as_u64().unwrap())
            .sum();
        let captured = blocked_ns_in(capture, recorded.pid, function);
        let own = recorded.report["blocked_ns"][function].as_u64().unwrap();
        println!(
            "{function}: pushed {:.1} ms, capture {:.1} ms, the workload's clock {:.1} ms",
            pushed as f64 / 1e6,
            captured as f64 / 1e6,
            own as f64 / 1e6
        );
        assert_eq!(pushed, captured, "{function}");
        let error = (pushed as f64 - own as f64).abs() / own as f64;
        assert!(error < 0.05, "{function}: {pushed} vs the workload's {own}");
    }
    // Leaf first: the innermost frame of a blocking stack is the kernel's.
    assert!(
        samples
            .iter()
            .all(|s| s["frames"][0].as_str().unwrap().ends_with("_[k]")),
        "leaf first"
    );
    // On-CPU: a profile exactly when the capture has samples of the workload, with them all.
    let oncpu = profiles
        .iter()
        .find(|p| p["sample_type"] == serde_json::json!(["samples", "count"]));
    let captured: u64 = capture["oncpu"]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["pid"].as_u64() == Some(recorded.pid.into()))
        .map(|s| s["count"].as_u64().unwrap())
        .sum();
    match oncpu {
        Some(oncpu) => {
            assert_eq!(
                oncpu["period_type"],
                serde_json::json!(["cpu", "nanoseconds"])
            );
            let hz = capture["oncpu"]["frequency_hz"].as_u64().unwrap();
            assert_eq!(oncpu["period"].as_u64(), Some(1_000_000_000 / hz));
            let pushed: u64 = oncpu["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["values"][0].as_u64().unwrap())
                .sum();
            assert_eq!(pushed, captured, "on-CPU samples");
        }
        None => assert_eq!(captured, 0, "on-CPU samples captured but not pushed"),
    }
}

/// `cargo xtask bench export`: what pushing costs per 60 s whole-host window, with every
/// family on, while pgbench (rate-limited, 200 TPS) keeps a local PostgreSQL busy: the CPU to
/// encode each store's request (against the daemon's own CPU per window), and the bytes sent
/// (against the window's multi-family pprof). Windows: `BENCH_EXPORT_WINDOWS` (default 3).
#[test]
#[ignore = "benchmark: cargo xtask bench export"]
fn bench_export_cost_per_window() {
    require_root();
    let windows: f64 = std::env::var("BENCH_EXPORT_WINDOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let dir = temp_dir("bench-export");
    let (pyroscope_port, otlp_port) = (free_port(), free_port());
    let _pyroscope = Receiver::start(pyroscope_port, &dir.join("pyroscope"), 0);
    let _otlp = Receiver::otlp(otlp_port, &dir.join("otlp"), &[]);
    let pg = profiler_tests::pg::PgCluster::start("bench-export");
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    let seconds = (windows as u64 + 1) * 60 + 30;
    let load = {
        let (dir, port, bin) = (pg.dir.clone(), pg.port, pg.bin.clone());
        std::thread::spawn(move || {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pgbench"))
                .arg("-h")
                .arg(&dir)
                .args([
                    "-p",
                    &port.to_string(),
                    "-S",
                    "-c",
                    "4",
                    "-j",
                    "2",
                    "-R",
                    "200",
                ])
                .args(["-T", &seconds.to_string(), "postgres"])
                .output()
        })
    };
    let port = free_port();
    let mut daemon = Daemon::spawn(
        &dir.join("data"),
        port,
        &[
            "--window",
            "60s",
            "--pyroscope-url",
            &format!("http://127.0.0.1:{pyroscope_port}"),
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{otlp_port}"),
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(seconds + 120);
    // The first window's export is its own (the daemon's start is in its CPU): from the
    // second on.
    while metric(port, "profiler_windows_total") < 1.0 {
        assert!(Instant::now() < deadline, "no window");
        std::thread::sleep(Duration::from_secs(1));
    }
    let read = |exporter: &str| {
        (
            metric(
                port,
                &format!("profiler_export_encode_seconds_total{{exporter=\"{exporter}\"}}"),
            ),
            metric(
                port,
                &format!("profiler_export_bytes_total{{exporter=\"{exporter}\"}}"),
            ),
            metric(
                port,
                &format!("profiler_export_pushes_total{{exporter=\"{exporter}\"}}"),
            ),
        )
    };
    let cpu = || metric(port, "profiler_cpu_seconds_total{part=\"userspace\"}");
    let first = (read("pyroscope"), read("otlp"), cpu());
    while metric(port, "profiler_windows_total") < 1.0 + windows {
        assert!(Instant::now() < deadline, "the windows stopped");
        std::thread::sleep(Duration::from_secs(1));
    }
    // The pushes of the last window land.
    std::thread::sleep(Duration::from_secs(3));
    let last = (read("pyroscope"), read("otlp"), cpu());
    let (_, pprof) = call(port, "GET", "/profile").expect("/profile");
    daemon.stop();
    let _ = load.join();
    let daemon_ms = (last.2 - first.2) * 1e3 / windows;
    println!(
        "[bench export] {windows} windows of 60 s, whole host, every family, pgbench -S -R 200"
    );
    println!("  daemon CPU per window: {daemon_ms:.1} ms (userspace)");
    println!(
        "  the window's pprof (every family, gzipped): {:.1} KiB",
        pprof.len() as f64 / 1024.0
    );
    println!(
        "  {:<10} {:>14} {:>16} {:>14} {:>14}",
        "store", "encode ms/win", "of daemon CPU", "KiB/win", "÷ pprof size"
    );
    for (name, (a, b)) in [
        ("pyroscope", (first.0, last.0)),
        ("otlp", (first.1, last.1)),
    ] {
        let pushes = b.2 - a.2;
        assert!(
            pushes >= windows,
            "{name}: {pushes} pushes for {windows} windows"
        );
        let encode_ms = (b.0 - a.0) * 1e3 / windows;
        let kib = (b.1 - a.1) / pushes / 1024.0;
        println!(
            "  {name:<10} {encode_ms:>14.2} {:>15.1}% {kib:>14.1} {:>13.2}×",
            encode_ms / daemon_ms * 100.0,
            kib * 1024.0 / pprof.len() as f64
        );
    }
}
