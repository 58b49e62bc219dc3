//! `profiler daemon` end to end: windows on disk with retention, the HTTP endpoints serving
//! the latest window (Prometheus text, SVG), and a clean stop on SIGTERM with every program
//! detached (checked with bpftool).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use profiler_tests::daemon::Prometheus;
use profiler_tests::*;

fn get(port: u16, path: &str) -> Option<(String, String)> {
    request(port, "GET", path)
}

/// One request with `method` (no body); the status line and the body.
fn request(port: u16, method: &str, path: &str) -> Option<(String, String)> {
    request_with(port, method, path, "")
}

/// `request` with extra header lines (each ending in CRLF).
fn request_with(port: u16, method: &str, path: &str, headers: &str) -> Option<(String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // Prometheus (Go's net/http) chunks larger answers: size line, data, CRLF.
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            out.push_str(after.get(..size)?);
            rest = after.get(size + 2..)?;
        }
        out
    } else {
        body.to_string()
    };
    Some((head.lines().next()?.to_string(), body))
}

/// The body of a GET, as bytes.
fn get_bytes(port: u16, path: &str) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let at = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(response[at + 4..].to_vec())
}

/// A failed assertion must not leave a daemon running (its programs would count in the
/// next test): SIGKILL on the way out (harmless once it has stopped).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// The tests here count every profiler program on the host: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The programs and links the daemon holds, sampled until it exits (or `within`): a handoff
/// may load the next window's between two samples.
type Held = (
    std::collections::BTreeSet<u64>,
    std::collections::BTreeSet<u64>,
);

fn sample_held(pid: u32, held: &mut Held) {
    let (programs, links) = profiler_tests::bpf::held_by(pid);
    held.0.extend(programs);
    held.1.extend(links);
}

/// None of the daemon's programs or links stays loaded (other processes' may: the host is
/// shared); the kernel's list is the oracle.
fn assert_ours_gone(held: &Held, after: &str) {
    assert!(!held.0.is_empty(), "the daemon held no programs");
    let took = profiler_tests::bpf::assert_gone(&held.0, &held.1, after);
    println!(
        "none of the daemon's {} programs and {} links loaded {:.0} ms after {after}",
        held.0.len(),
        held.1.len(),
        took.as_secs_f64() * 1e3
    );
}

#[test]
fn daemon_serves_windows_and_detaches_on_sigterm() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon");
    let mut workload = Workload::start(150, 20, &dir.join("workload.json"));
    let pid = workload.pid.to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let data = dir.join("data");
    let mut daemon = start_daemon(
        &data,
        port,
        &[
            "--window",
            "1s",
            "--keep",
            "2",
            "--",
            "--events",
            "offcpu,syscalls",
            "-p",
            &pid,
        ],
    );
    let _kill_on_panic = KillOnDrop(daemon.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    workload.go();
    // Wait for a window that saw the workload block.
    let metrics = loop {
        assert!(Instant::now() < deadline, "no window with the workload");
        std::thread::sleep(Duration::from_millis(300));
        let (status, body) = get(port, "/metrics").expect("metrics");
        assert!(status.contains("200"), "{status}");
        if body.contains("comm=\"offcpu-workload\"") {
            break body;
        }
    };
    println!("{metrics}");
    let window_s: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("profiler_window_seconds "))
        .and_then(|v| v.parse().ok())
        .expect("window length");
    // The workload's main thread blocks nearly all the time; its helpers too: plausible
    // totals are above zero and at most a few threads' worth of the window.
    let blocked: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("profiler_offcpu_seconds{comm=\"offcpu-workload\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        blocked > 0.1 * window_s && blocked < 8.0 * window_s,
        "off-CPU {blocked} s in a {window_s} s window"
    );
    let (_, svg) = get(port, "/flamegraph?kind=offcpu").expect("flamegraph");
    assert!(
        svg.starts_with("<?xml") && svg.contains("offcpu-workload"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    // /profile: pprof that Go's own tool reads, with the workload's blocking function.
    let profile = dir.join("profile.pb.gz");
    let body = get_bytes(port, "/profile").expect("profile");
    std::fs::write(&profile, body).unwrap();
    let top = Command::new("go")
        .args(["tool", "pprof", "-top", "-sample_index=offcpu_time"])
        .arg(&profile)
        .output()
        .expect("go tool pprof (cargo xtask setup installs golang-go)");
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(top.contains("workload_"), "go tool pprof -top: {top}");
    let (status, _) = get(port, "/flamegraph?kind=nonsense").expect("bad kind");
    assert!(status.contains("400"), "{status}");
    // Retention: at most --keep windows on disk, and two more: the one being recorded and
    // the next, loaded before it ends (so that no time goes unrecorded between them).
    std::thread::sleep(Duration::from_secs(3));
    let windows = std::fs::read_dir(&data).unwrap().count();
    assert!(windows <= 4, "{windows} windows kept with --keep 2");
    let (_, captures) = get(port, "/captures").expect("captures");
    let listed: Vec<String> = serde_json::from_str(&captures).unwrap();
    assert!(!listed.is_empty() && listed.len() <= 2, "{listed:?}");
    // A window by name (the newest kept: retention removes the oldest meanwhile): its
    // flamegraph and its pprof; an unknown one is a 404.
    let named = std::path::Path::new(listed.last().unwrap())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (status, svg) = get(port, &format!("/flamegraph?kind=offcpu&window={named}")).unwrap();
    assert!(
        status.contains("200") && svg.starts_with("<?xml"),
        "{status}"
    );
    let pprof = get_bytes(port, &format!("/profile?window={named}")).unwrap();
    assert_eq!(&pprof[..2], &[0x1f, 0x8b], "not gzip");
    let (status, _) = get(port, "/flamegraph?window=window-1").unwrap();
    assert!(status.contains("404"), "{status}");
    let mut held = Held::default();
    sample_held(daemon.id(), &mut held);
    assert!(!held.0.is_empty(), "no programs attached while running");

    // SIGTERM: the current window is written, everything detaches, exit 0.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        sample_held(daemon.id(), &mut held);
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("stopped; probes detached"), "{stderr}");
    assert_ours_gone(&held, "SIGTERM");
    let _ = workload.finish();
}

/// A pinned baseline (the diff workload without its extra delay) and windows of the slow
/// variant: the daemon turns the regression into an event naming `stage_query`, counts it in
/// /metrics and serves the differential flamegraph.
#[test]
fn daemon_reports_a_regression_against_a_pinned_baseline() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-regression");
    let baseline = dir.join("baseline");
    record_diff_workload(&baseline, 0, "2.5s", "125ms");
    let mut slow = Command::new(built_binary("diff-workload"))
        .args(["--extra-ms", "5"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("diff-workload");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(slow.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid = line.trim().trim_start_matches("ready ").to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut daemon = start_daemon(
        &dir.join("data"),
        port,
        &[
            "--window",
            "2500ms",
            "--keep",
            "3",
            "--baseline",
            baseline.to_str().unwrap(),
            "--",
            "--events",
            "offcpu",
            "--interval",
            "125ms",
            "-p",
            &pid,
        ],
    );
    let _kill_on_panic = KillOnDrop(daemon.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    let events = loop {
        assert!(Instant::now() < deadline, "no regression event");
        std::thread::sleep(Duration::from_millis(500));
        if let Some((_, body)) = get(port, "/events")
            && let Ok(events) = serde_json::from_str::<Vec<serde_json::Value>>(&body)
            && !events.is_empty()
        {
            break events;
        }
    };
    println!("{}", events[0]);
    let names: Vec<&str> = events[0]["regressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        names.iter().any(|n| is_function(n, "stage_query")),
        "{names:?}"
    );
    let (_, metrics) = get(port, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("profiler_regressions_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // SAFETY: kill(2) on our own children.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    let _ = slow.kill();
    let _ = slow.wait();
    let mut stderr = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    // The event was also logged as one JSON line.
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("{\"event\":\"regression\"")
                || l.contains("\"event\":\"regression\"")),
        "{stderr}"
    );
}

/// Without a baseline, after 6 s of learning: the windows of a steady diff workload raise no
/// event; when it slows (`stage_query` blocks 5 ms more per request from 20 s on), a window
/// holding the change raises one event naming `stage_query` — not `main` or the other frames
/// that carry every stack — and the windows after it, all slow, raise none (the change is the
/// new normal).
#[test]
fn daemon_reports_a_change_against_its_recent_windows() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-rolling");
    let mut workload = Command::new(built_binary("diff-workload"))
        .args(["--extra-ms", "5", "--extra-after-s", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("diff-workload");
    let _kill_workload_on_panic = KillOnDrop(workload.id());
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(workload.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let slow_from_ms = unix_ms() + 20_000;
    let pid = line.trim().trim_start_matches("ready ").to_string();
    let port = free_port();
    let mut daemon = start_daemon(
        &dir.join("data"),
        port,
        &[
            "--window",
            "2s",
            "--keep",
            "40",
            // Three windows to learn from, then judged (the change comes at 20 s).
            "--learn",
            "6s",
            "--",
            "--events",
            "offcpu",
            "--interval",
            "125ms",
            "-p",
            &pid,
        ],
    );
    let _kill_on_panic = KillOnDrop(daemon.id());
    let events = |port| -> Vec<serde_json::Value> {
        get(port, "/events")
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        assert!(Instant::now() < deadline, "no regression event");
        std::thread::sleep(Duration::from_millis(500));
        if let Some(event) = events(port).into_iter().next() {
            break event;
        }
    };
    println!("{first}");
    // The window that raised it holds the change (ends after the workload slowed).
    let window = std::path::Path::new(first["window"].as_str().unwrap());
    let capture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(window.join("capture.json")).unwrap()).unwrap();
    let start_ms = capture["metadata"]["start_unix_ms"].as_u64().unwrap();
    let end_ms = start_ms + capture["metadata"]["duration_ns"].as_u64().unwrap() / 1_000_000;
    assert!(
        end_ms > slow_from_ms,
        "an event for a window that ended {} ms before the workload changed: {first}",
        slow_from_ms - end_ms
    );
    let names: Vec<&str> = first["regressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        names.iter().any(|n| is_function(n, "stage_query")),
        "{names:?}"
    );
    for carrier in ["main", "handle_request", "__libc_start_call_main"] {
        assert!(
            !names.iter().any(|n| is_function(n, carrier)),
            "{carrier} carries every stack and was named: {names:?}"
        );
    }
    // Six more windows of the slow workload: no second event.
    let (_, metrics) = get(port, "/metrics").unwrap();
    let windows = metric(&metrics, "profiler_windows_total ").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "windows stopped");
        std::thread::sleep(Duration::from_millis(500));
        let (_, metrics) = get(port, "/metrics").unwrap();
        if metric(&metrics, "profiler_windows_total ").unwrap() >= windows + 6.0 {
            break;
        }
    }
    let all = events(port);
    assert_eq!(metric(&metrics, "profiler_learning "), Some(0.0), "learned");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    let _ = workload.kill();
    let _ = workload.wait();
    assert!(status.success());
    assert_eq!(all.len(), 1, "one change, one event: {all:?}");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Settings from a TOML file; SIGHUP re-reads it: lowering `keep` from 5 to 1 leaves one
/// window listed and on disk. A bad edit is refused with one line and the daemon goes on.
#[test]
fn daemon_reads_its_config_file_and_reloads_it_on_sighup() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-config");
    let mut sleeper = Command::new("sleep").arg("120").spawn().unwrap();
    let config = dir.join("daemon.toml");
    let write_config = |keep: &str| {
        std::fs::write(
            &config,
            format!(
                "window = \"1s\"\nkeep = {keep}\nmax_cpu = \"off\"\nrecord = [\"--events\", \"offcpu\", \"-p\", \"{}\"]\n",
                sleeper.id()
            ),
        )
        .unwrap();
    };
    write_config("5");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut daemon = start_daemon(
        &dir.join("data"),
        port,
        &["--config", config.to_str().unwrap()],
    );
    let _kill_on_panic = KillOnDrop(daemon.id());
    let listed = || -> usize {
        get(port, "/captures")
            .and_then(|(_, body)| serde_json::from_str::<Vec<String>>(&body).ok())
            .map_or(0, |l| l.len())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while listed() < 3 {
        assert!(
            Instant::now() < deadline,
            "fewer than 3 windows kept with keep = 5"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A bad edit: refused, the daemon goes on with keep = 5.
    std::fs::write(&config, "keep = \"many\"\n").unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(2500));
    assert!(listed() >= 3, "a refused reload changed the settings");
    write_config("1");
    // SAFETY: as above.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while listed() != 1 {
        assert!(
            Instant::now() < deadline,
            "keep = 1 not applied after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // Published windows; `.partial-window-*` are the ones being recorded and written.
    let names: Vec<String> = std::fs::read_dir(dir.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let on_disk = names.iter().filter(|n| n.starts_with("window-")).count();
    assert!(
        on_disk <= 2,
        "{on_disk} windows on disk with keep = 1: {names:?}"
    );
    println!("data directory with keep = 1: {names:?}");
    // SAFETY: as above.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let mut stderr = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("reload refused: bad config"), "{stderr}");
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
}

/// `cargo xtask bench daemon`: the daemon's resident memory (steady and startup peak) and
/// CPU while pgbench runs, with 5 s windows of off-CPU + db on the whole host.
#[test]
#[ignore = "benchmark: run with cargo xtask bench daemon"]
fn bench_daemon_memory_and_cpu_under_pgbench() {
    require_root();
    let _serial = serial();
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let window: u64 = std::env::var("BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // BENCH_MAX_CPU=100000% measures full mode (no sampling).
    let max_cpu = std::env::var("BENCH_MAX_CPU").unwrap_or_else(|_| "1%".into());
    // Windows before measuring: the budget finds its mode (a duty period can be 8 windows).
    let warmup: u64 = std::env::var("BENCH_WARMUP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let cluster = profiler_tests::pg::PgCluster::start("bench-daemon");
    cluster.pgbench(&["-i", "-q", "-s", "10"]);
    let dir = temp_dir("bench-daemon");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut daemon = Command::new(profiler_bin())
        .arg("daemon")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--window",
            &format!("{window}s"),
            "--keep",
            "3",
            "--max-cpu",
            &max_cpu,
        ])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--", "--events", "offcpu,db"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start daemon");
    let _kill_on_panic = KillOnDrop(daemon.id());
    let pid = daemon.id();
    let status = |field: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let cpu_ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(port, "/healthz").is_none() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let startup_peak_kib = status("VmHWM:");
    let bench = std::thread::scope(|scope| {
        let pgbench =
            scope.spawn(|| cluster.pgbench(&["-S", "-n", "-c", "2", "-T", &seconds.to_string()]));
        // Skip the first window (startup, and the budget finding its mode), then sample.
        std::thread::sleep(Duration::from_secs(warmup.max(window + 2)));
        let (t0, c0) = (Instant::now(), cpu_ticks());
        let mut rss = Vec::new();
        while !pgbench.is_finished() {
            rss.push(status("VmRSS:"));
            std::thread::sleep(Duration::from_millis(250));
        }
        let cpu = (cpu_ticks() - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64();
        (rss, cpu, pgbench.join().unwrap())
    });
    let (mut rss, cpu, output) = bench;
    let metrics = get(port, "/metrics").map(|r| r.1).unwrap_or_default();
    let own = |name: &str| metric(&metrics, name).unwrap_or(f64::NAN);
    println!(
        "[bench daemon] the daemon's own account of its last duty period: userspace {:.2} %, \
         eBPF {:.2} % of one CPU (budget {:.2} %), sampled 1 in {}, 1 window in {} recorded, \
         window gap {:.2} s",
        own("profiler_cost_ratio{part=\"userspace\"}") * 100.0,
        own("profiler_cost_ratio{part=\"ebpf\"}") * 100.0,
        own("profiler_cpu_budget_ratio") * 100.0,
        own("profiler_sample_every{family=\"offcpu\"}"),
        own("profiler_window_duty"),
        own("profiler_window_gap_seconds"),
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    rss.sort_unstable();
    let steady = rss[rss.len() / 2] as f64 / 1024.0;
    let peak = status_peak(startup_peak_kib);
    let tps = output
        .lines()
        .find(|l| l.starts_with("tps = "))
        .unwrap_or("tps = ?")
        .to_string();
    println!(
        "[bench daemon] steady RSS (median) {steady:.1} MiB, max {:.1} MiB; startup peak \
         {peak:.1} MiB = {:.2}x steady; daemon CPU {:.1} % of one CPU; pgbench {tps}",
        *rss.last().unwrap() as f64 / 1024.0,
        peak / steady,
        cpu * 100.0
    );
}

fn status_peak(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// Starts `profiler daemon` on `port` with these extra arguments; waits for /healthz.
/// Starts a daemon. Without `--max-cpu` or `--config` among the daemon's own options it runs
/// in full mode (`--max-cpu off`): the tests compare every window with an oracle, and the
/// default 1 % budget would sample or skip windows on a busy 2-CPU test machine.
fn start_daemon(data: &std::path::Path, port: u16, args: &[&str]) -> std::process::Child {
    let own_options = args.iter().take_while(|a| **a != "--");
    let budget_given = own_options
        .clone()
        .any(|a| *a == "--max-cpu" || *a == "--config");
    let full_mode: &[&str] = if budget_given {
        &[]
    } else {
        &["--max-cpu", "off"]
    };
    let daemon = Command::new(profiler_bin())
        .arg("daemon")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(full_mode)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start daemon");
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(port, "/healthz").map(|r| r.1) != Some("ok\n".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the daemon never answered /healthz"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon
}

/// Waits until /metrics has a line starting with `prefix`; returns the metrics text.
fn wait_for_metric(port: u16, prefix: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some((_, body)) = get(port, "/metrics")
            && body.lines().any(|l| l.starts_with(prefix))
        {
            return body;
        }
        assert!(Instant::now() < deadline, "no {prefix} in /metrics");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop(mut daemon: std::process::Child) -> String {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    let mut stderr = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status}: {stderr}");
    stderr
}

/// A real Prometheus server scrapes the daemon (every second, 2 s windows) while pgbench runs
/// 4000 queries that sleep 1 ms in the server; queried through Prometheus's own HTTP API:
/// - the DB latency histogram of pgbench's SELECT: its mean (rate of _sum / rate of _count)
///   within 25 % of pgbench's own average latency (one query per transaction), and the
///   median Prometheus computes from the buckets between 2^20 and 2^22 ns (1.05–4.19 ms);
/// - calls counted across the windows: exactly pgbench's transactions (one query each);
/// - off-CPU seconds of pgbench, syscall latency, the mode and the daemon's own CPU series.
#[test]
fn prometheus_scrapes_the_daemon_during_pgbench() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-prometheus");
    let cluster = profiler_tests::pg::PgCluster::start("daemon-prometheus");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    let script = cluster.dir.join("select-pause.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\
         SELECT abalance, pg_sleep(0.001) FROM pgbench_accounts WHERE aid = :aid;\n",
    )
    .unwrap();
    let port = free_port();
    let daemon = start_daemon(
        &dir.join("data"),
        port,
        &["--window", "2s", "--", "--events", "offcpu,syscalls,db"],
    );
    let _kill_on_panic_daemon = KillOnDrop(daemon.id());
    let prometheus = Prometheus::start(&dir, port);
    // The first window is attached (the ones after it attach before it stops).
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(port, "/metrics")
        .and_then(|(_, m)| metric(&m, "profiler_windows_total"))
        .is_none_or(|n| n < 1.0)
    {
        assert!(Instant::now() < deadline, "no window written");
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = cluster.pgbench(&[
        "-n",
        "-f",
        script.to_str().unwrap(),
        "-c",
        "1",
        "-t",
        "4000",
    ]);
    let transactions: f64 = output
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .expect("pgbench transactions");
    let pgbench_ms: f64 = output
        .lines()
        .find_map(|l| l.strip_prefix("latency average = "))
        .and_then(|v| v.trim_end_matches(" ms").trim().parse().ok())
        .expect("pgbench latency average");
    // Let the last window be written and scraped.
    std::thread::sleep(Duration::from_secs(5));
    let select = "query=~\"SELECT abalance, pg_sleep.*\",source=\"libpq\"";
    let calls = prometheus.query(&format!(
        "sum(max_over_time(profiler_db_query_duration_seconds_count{{{select}}}[1m]))"
    ));
    let mean = prometheus.query(&format!(
        "sum(increase(profiler_db_query_duration_seconds_sum{{{select}}}[1m])) / \
             sum(increase(profiler_db_query_duration_seconds_count{{{select}}}[1m]))"
    ));
    let median = prometheus.query(&format!(
        "histogram_quantile(0.5, sum by (le) \
             (increase(profiler_db_query_duration_seconds_bucket{{{select}}}[1m])))"
    ));
    let offcpu =
        prometheus.query("sum(max_over_time(profiler_offcpu_seconds_total{comm=\"pgbench\"}[1m]))");
    let syscalls =
        prometheus.query("sum(max_over_time(profiler_syscall_duration_seconds_count[1m]))");
    // Over the last minute, like the series above: an instant query finds nothing when the
    // last scrape missed its 1 s timeout (the series are then stale).
    let mode = prometheus.query("max_over_time(profiler_mode[1m])");
    let cpu = prometheus.query("max_over_time(profiler_cpu_seconds_total[1m])");
    // The page charts the query's latency across the windows that ran it.
    let (_, page) = get(port, "/").expect("the page");
    let chart = page
        .split("<svg id=\"chart-queries\"")
        .nth(1)
        .and_then(|rest| rest.split("</svg>").next())
        .unwrap_or_else(|| panic!("no query chart: {page}"));
    assert!(
        chart.contains("data-name=\"SELECT abalance, pg_sleep(?) FROM pgbench_accounts WHERE aid = ? — pgbench (libpq)\""),
        "{chart}"
    );
    drop(prometheus);
    stop(daemon);
    println!(
        "pgbench: {transactions} transactions, latency average {pgbench_ms} ms; Prometheus: \
         calls {calls:?}, mean {mean:?} s, median {median:?} s, pgbench off-CPU {offcpu:?} s, \
         syscalls {syscalls:?}, mode {mode:?}, cpu {cpu:?}"
    );
    // Windows follow each other with nothing unrecorded and nothing counted twice: over
    // several of them, every one of pgbench's queries is counted exactly once.
    let calls = calls.first().expect("a call count series").1;
    assert_eq!(
        calls, transactions,
        "calls counted vs pgbench's transactions"
    );
    let mean_ms = mean.first().expect("a mean").1 * 1e3;
    assert!(
        (mean_ms / pgbench_ms - 1.0).abs() < 0.25,
        "mean {mean_ms} ms vs pgbench {pgbench_ms} ms"
    );
    let median = median.first().expect("a median").1;
    assert!(
        median > 1.048576e-3 && median <= 4.194304e-3,
        "median {median} s"
    );
    assert!(offcpu.first().is_some_and(|(_, v)| *v > 0.0), "{offcpu:?}");
    assert!(
        syscalls.first().is_some_and(|(_, v)| *v > 0.0),
        "{syscalls:?}"
    );
    assert!(
        mode.iter().any(|(m, v)| m["mode"] == "full" && *v == 1.0),
        "{mode:?}"
    );
    assert!(
        cpu.iter()
            .any(|(m, v)| m["part"] == "userspace" && *v > 0.0),
        "{cpu:?}"
    );
}

/// The differential-free /flamegraph SVG opens in headless Chromium: the DOM Chromium built
/// from it is an SVG document (no XML parser error) with the workload's frames.
#[test]
fn flamegraph_svg_opens_in_headless_chromium() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-chromium");
    let mut workload = Workload::start(150, 20, &dir.join("workload.json"));
    let pid = workload.pid.to_string();
    let port = free_port();
    let daemon = start_daemon(
        &dir.join("data"),
        port,
        &["--window", "1s", "--", "--events", "offcpu", "-p", &pid],
    );
    let _kill_on_panic_daemon = KillOnDrop(daemon.id());
    workload.go();
    const FUNCTIONS: [&str; 3] = [
        "workload_nanosleep",
        "workload_pipe_read",
        "workload_futex_wait",
    ];
    // A window by name whose flamegraph has the workload's three waits: with 1 s windows
    // "the latest" may be another one by the time Chromium has started.
    let deadline = Instant::now() + Duration::from_secs(60);
    let window = loop {
        assert!(Instant::now() < deadline, "no flamegraph with the workload");
        std::thread::sleep(Duration::from_millis(300));
        let newest = get(port, "/captures")
            .and_then(|(_, list)| serde_json::from_str::<Vec<String>>(&list).ok())
            .and_then(|list| list.last().cloned());
        let Some(newest) = newest else { continue };
        let name = newest.rsplit('/').next().unwrap_or_default().to_string();
        if get(port, &format!("/flamegraph?kind=offcpu&window={name}"))
            .is_some_and(|(_, svg)| FUNCTIONS.iter().all(|f| svg.contains(f)))
        {
            break name;
        }
    };
    let url = format!("http://127.0.0.1:{port}/flamegraph?kind=offcpu&window={window}");
    let out = chromium_dom(&dir, &url);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    // The page for a person, as Chromium builds it: the kept windows (as /captures lists
    // them), the latest window's summary, and its flamegraph embedded from a URL that serves
    // the workload's frames.
    // Listed before the page is read: with 1 s windows a newer one may appear meanwhile, but
    // this one stays kept (60 by default).
    let (_, listed) = get(port, "/captures").unwrap();
    let listed: Vec<String> = serde_json::from_str(&listed).unwrap();
    let page_out = chromium_dom(&dir, &format!("http://127.0.0.1:{port}/"));
    let page = String::from_utf8_lossy(&page_out.stdout).into_owned();
    let embedded = page
        .split("<object id=\"flamegraph\"")
        .nth(1)
        .and_then(|rest| rest.split("data=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .map(|url| url.replace("&amp;", "&"))
        .unwrap_or_else(|| panic!("no embedded flamegraph in the page: {page}"));
    let embedded_svg = get(port, &embedded).map(|(_, svg)| svg).unwrap_or_default();
    let _ = workload.finish();
    stop(daemon);
    assert!(
        out.status.success() && page_out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(page.contains("<table id=\"windows\">"), "{page}");
    let newest = std::path::Path::new(listed.last().unwrap())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        page.contains(&format!("<code>{newest}</code>")),
        "the newest kept window {newest} is not on the page"
    );
    assert!(page.contains("<pre id=\"summary\">capture: "), "{page}");
    // The embedded flamegraph is the latest window's own file (the workload may have ended
    // by then: 1 s windows; its frames are checked in the SVG Chromium loaded above).
    let window = embedded
        .strip_prefix("/flamegraph?kind=offcpu&window=")
        .unwrap_or_else(|| panic!("the page embeds {embedded}"));
    let on_disk =
        std::fs::read_to_string(dir.join("data").join(window).join("offcpu.svg")).unwrap();
    assert!(
        embedded_svg.starts_with("<?xml") && embedded_svg == on_disk,
        "the page embeds {embedded}, which is not that window's off-CPU flamegraph"
    );
    println!("Chromium's DOM: {} bytes", dom.len());
    assert!(
        dom.contains("<svg"),
        "not an SVG document: {}",
        &dom[..dom.len().min(500)]
    );
    assert!(
        !dom.contains("parsererror"),
        "XML errors: {}",
        &dom[..dom.len().min(2000)]
    );
    for function in FUNCTIONS {
        assert!(
            dom.contains(function),
            "no {function} frame in Chromium's DOM"
        );
    }
}

/// The page for a person, as headless Chromium builds it, on a workload that slows down
/// half-way (`stage_query` blocks 5 ms more per request from 7 s on): the kept windows with
/// the workload's off-CPU time, a chart of it across windows, and a form whose comparison of
/// a window before the change (A) with one after (B) finds a regression and names
/// `stage_query` first among the functions, with a differential flamegraph that has it.
/// Screenshots of both pages are kept under target/screenshots/.
#[test]
fn the_page_compares_two_windows_and_names_the_delayed_function() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-page");
    let mut workload = Command::new(built_binary("diff-workload"))
        .args(["--extra-ms", "5", "--extra-after-s", "7"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("diff-workload");
    let _kill_workload_on_panic = KillOnDrop(workload.id());
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(workload.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let slow_from_ms = unix_ms() + 7_000;
    let pid = line.trim().trim_start_matches("ready ").to_string();
    let port = free_port();
    let daemon = start_daemon(
        &dir.join("data"),
        port,
        &[
            "--window",
            "2s",
            "--",
            "--events",
            "offcpu",
            "--interval",
            "125ms",
            "-p",
            &pid,
        ],
    );
    let _kill_on_panic = KillOnDrop(daemon.id());
    // Windows as (name, start ms, end ms), from their captures.
    let windows = || -> Vec<(String, u64, u64)> {
        let listed: Vec<String> = get(port, "/captures")
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default();
        listed
            .iter()
            .filter_map(|path| {
                let path = std::path::Path::new(path);
                let capture: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(path.join("capture.json")).ok()?).ok()?;
                let start = capture["metadata"]["start_unix_ms"].as_u64()?;
                let end = start + capture["metadata"]["duration_ns"].as_u64()? / 1_000_000;
                Some((path.file_name()?.to_string_lossy().into_owned(), start, end))
            })
            .collect()
    };
    // A: the last window wholly before the change; B: the first wholly after it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (a, b) = loop {
        assert!(
            Instant::now() < deadline,
            "no windows on both sides of the change"
        );
        std::thread::sleep(Duration::from_millis(500));
        let all = windows();
        let before = all.iter().rev().find(|w| w.2 < slow_from_ms);
        let after = all.iter().find(|w| w.1 > slow_from_ms);
        if let (Some(before), Some(after)) = (before, after) {
            break (before.0.clone(), after.0.clone());
        }
    };
    let shots = built_binary("profiler")
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let page_url = format!("http://127.0.0.1:{port}/");
    let compare_url = format!("http://127.0.0.1:{port}/compare?a={a}&b={b}");
    let page = String::from_utf8_lossy(&chromium_dom(&dir, &page_url).stdout).into_owned();
    let compare = String::from_utf8_lossy(&chromium_dom(&dir, &compare_url).stdout).into_owned();
    let diff_svg = get(port, &format!("/compare?a={a}&b={b}&format=svg"))
        .map(|(_, svg)| svg)
        .unwrap_or_default();
    for (url, file) in [
        (&page_url, "daemon-page.png"),
        (&compare_url, "daemon-compare.png"),
    ] {
        let shot = chromium_screenshot(&dir, url, &shots.join(file));
        assert!(
            shot.status.success(),
            "{}",
            String::from_utf8_lossy(&shot.stderr)
        );
    }
    let _ = workload.kill();
    let _ = workload.wait();
    stop(daemon);
    println!("A {a}, B {b}; screenshots in {}", shots.display());
    // The page: a form offering both windows, the workload in the table and the chart.
    let form = page
        .split("<form id=\"compare\"")
        .nth(1)
        .and_then(|rest| rest.split("</form>").next())
        .unwrap_or_else(|| panic!("no compare form: {page}"));
    for name in [&a, &b] {
        assert!(
            form.contains(&format!("<option value=\"{name}\"")),
            "{name} not offered: {form}"
        );
    }
    let process = format!("diff-workload[{pid}]");
    let table = page
        .split("<table id=\"windows\">")
        .nth(1)
        .unwrap_or_default();
    assert!(
        table.contains(&process),
        "{process} not in the windows table: {table}"
    );
    let chart = page
        .split("<svg id=\"chart-offcpu\"")
        .nth(1)
        .and_then(|rest| rest.split("</svg>").next())
        .unwrap_or_else(|| panic!("no off-CPU chart: {page}"));
    assert!(
        chart.contains(&format!("data-name=\"{process}\"")),
        "{chart}"
    );
    // The comparison: a regression, stage_query first among the functions.
    assert!(
        compare.contains("<p id=\"verdict\" class=\"bad\">Regression found</p>"),
        "{compare}"
    );
    let first_function = compare
        .split("<table id=\"regressed-functions\">")
        .nth(1)
        .and_then(|rest| rest.split("<td><code title=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no regressed function: {compare}"));
    assert!(
        is_function(first_function, "stage_query"),
        "{first_function}"
    );
    assert!(compare.contains(&format!("data=\"/compare?a={a}&amp;b={b}&amp;format=svg\"")));
    assert!(
        diff_svg.starts_with("<?xml") && diff_svg.contains("stage_query"),
        "{}",
        &diff_svg[..diff_svg.len().min(300)]
    );
}

/// SIGKILL gives the daemon no chance to clean up: the kernel must still detach everything
/// (our links are fds, none pinned). A restart on the same data directory works, keeps
/// managing the windows already there (retention counts them), and stops cleanly.
#[test]
fn sigkill_leaves_nothing_attached_and_a_restart_works() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-sigkill");
    let data = dir.join("data");
    let port = free_port();
    let mut daemon = start_daemon(
        &data,
        port,
        &[
            "--window",
            "1s",
            "--keep",
            "3",
            "--",
            "--events",
            "offcpu,syscalls,tcp,db",
        ],
    );
    let _kill_on_panic_daemon = KillOnDrop(daemon.id());
    wait_for_metric(port, "profiler_window_seconds", Duration::from_secs(60));
    let mut held = Held::default();
    sample_held(daemon.id(), &mut held);
    assert!(!held.0.is_empty(), "nothing loaded while running");
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    assert_ours_gone(&held, "SIGKILL");
    let before = std::fs::read_dir(&data).unwrap().count();
    assert!(before >= 1, "no window written before the kill");
    let port = free_port();
    let daemon = start_daemon(
        &data,
        port,
        &[
            "--window",
            "1s",
            "--keep",
            "3",
            "--",
            "--events",
            "offcpu,syscalls,tcp,db",
        ],
    );
    let _kill_on_panic_daemon = KillOnDrop(daemon.id());
    let metrics = wait_for_metric(port, "profiler_window_seconds", Duration::from_secs(60));
    assert!(metrics.contains("profiler_windows_total"));
    std::thread::sleep(Duration::from_secs(3));
    let mut held = Held::default();
    sample_held(daemon.id(), &mut held);
    let pid = daemon.id();
    let sampler = std::thread::spawn(move || {
        // Until the daemon is gone: what it held while stopping counts too.
        let mut held = Held::default();
        while std::path::Path::new(&format!("/proc/{pid}/fdinfo")).exists() {
            sample_held(pid, &mut held);
            std::thread::sleep(Duration::from_millis(20));
        }
        held
    });
    let stderr = stop(daemon);
    let during_stop = sampler.join().unwrap();
    held.0.extend(during_stop.0);
    held.1.extend(during_stop.1);
    assert!(stderr.contains("stopped; probes detached"), "{stderr}");
    assert_ours_gone(&held, "SIGTERM after the restart");
    let windows = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("window-"))
        .count();
    assert!(
        windows <= 3,
        "{windows} windows kept with --keep 3 across a restart"
    );
}

/// An on-demand capture from the running daemon (`profiler record --from-daemon`): the
/// workload's main thread blocks nearly all the time in 20 ms calls, so its off-CPU time in
/// the capture is the capture's length, less at most the blocks cut at either end (and
/// 5 %); the -p given replaces the daemon's filter; the files are written locally. The
/// daemon wants its token (`--capture-token-file`): without it, or with another, 401.
#[test]
fn record_from_daemon_returns_an_on_demand_capture() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-capture");
    let token = "b2f1c0a4e3d95f7a";
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut workload = Workload::start(150, 20, &dir.join("workload.json"));
    let pid = workload.pid;
    let port = free_port();
    let daemon = start_daemon(
        &dir.join("data"),
        port,
        &[
            "--window",
            "5s",
            "--capture-token-file",
            token_file.to_str().unwrap(),
            "--",
            "--events",
            "offcpu",
            "-p",
            "1",
        ],
    );
    let _kill_on_panic_daemon = KillOnDrop(daemon.id());
    workload.go();
    let out = dir.join("out");
    let status = Command::new(profiler_bin())
        .args(["record", "--from-daemon", &format!("127.0.0.1:{port}")])
        .args(["-d", "3", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "record --from-daemon: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let (no_token, _) = request(port, "POST", "/capture?seconds=1").unwrap();
    assert!(no_token.contains(" 401 "), "{no_token}");
    let (wrong, _) = request_with(
        port,
        "POST",
        "/capture?seconds=1",
        "Authorization: Bearer b2f1c0a4e3d95f7b\r\n",
    )
    .unwrap();
    assert!(wrong.contains(" 401 "), "{wrong}");
    let without = Command::new(profiler_bin())
        .args(["record", "--from-daemon", &format!("127.0.0.1:{port}")])
        .args(["-d", "1", "-o"])
        .arg(dir.join("refused"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(
        !without.status.success()
            && stderr
                .lines()
                .any(|l| l.starts_with("profiler: error: ") && l.contains("401")),
        "{stderr}"
    );
    let (bad, _) = request_with(
        port,
        "POST",
        "/capture?seconds=0",
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .unwrap();
    assert!(bad.contains(" 400 "), "{bad}");
    // A capture is started by POST only: a link or a crawler's GET starts nothing.
    let (get_refused, _) = get(port, "/capture?seconds=1").unwrap();
    assert!(get_refused.contains(" 405 "), "{get_refused}");
    let _ = workload.finish();
    stop(daemon);
    let capture = read_capture(&out);
    assert_eq!(capture["metadata"]["filters"]["pids"][0], pid);
    assert!(out.join("offcpu.svg").exists() && out.join("summary.txt").exists());
    let duration = capture["metadata"]["duration_ns"].as_u64().unwrap() as f64;
    let main_thread: f64 = stacks_of(&capture, pid)
        .into_iter()
        .filter(|s| s["tid"].as_u64() == Some(pid as u64))
        .map(|s| s["total_ns"].as_u64().unwrap() as f64)
        .sum();
    println!(
        "on-demand capture: {:.3} s long, main thread off-CPU {:.3} s",
        duration / 1e9,
        main_thread / 1e9
    );
    assert!(
        (duration / 3e9 - 1.0).abs() < 0.05,
        "capture of {duration} ns"
    );
    assert!(
        main_thread <= duration * 1.01 && main_thread >= duration * 0.95 - 60e6,
        "main thread off-CPU {main_thread} ns in a {duration} ns capture"
    );
}

/// The metric value of the line starting with `prefix` (e.g. `profiler_mode{mode="sampled"}`).
fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}

/// `--max-cpu`: a budget no window can meet (0.001 % of a CPU: 10 us per second) puts the
/// daemon in sampled mode: /metrics says so (mode, 1-in-N, the measured cost above the
/// budget), and the windows written say what they sampled. Raising the budget in the config
/// file and sending SIGHUP brings it back to full mode step by step.
#[test]
fn cpu_budget_switches_to_sampled_mode_and_back() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-budget");
    let mut workload = Workload::start(400, 20, &dir.join("workload.json"));
    let config = dir.join("daemon.toml");
    let pid = workload.pid;
    let write_config = |budget: &str| {
        std::fs::write(
            &config,
            format!(
                "window = \"1s\"\nmax_cpu = \"{budget}\"\nrecord = [\"--events\", \"offcpu\", \
                 \"-p\", \"{pid}\"]\n"
            ),
        )
        .unwrap();
    };
    write_config("0.001%");
    let port = free_port();
    let data = dir.join("data");
    let daemon = start_daemon(&data, port, &["--config", config.to_str().unwrap()]);
    let _kill_on_panic_daemon = KillOnDrop(daemon.id());
    workload.go();
    let metrics = wait_for_metric(
        port,
        "profiler_sample_every{family=\"offcpu\"} 8",
        Duration::from_secs(60),
    );
    println!(
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("profiler_"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        metric(&metrics, "profiler_mode{mode=\"sampled\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&metrics, "profiler_mode{mode=\"full\"}"), Some(0.0));
    assert_eq!(metric(&metrics, "profiler_cpu_budget_ratio"), Some(0.00001));
    let cost = metric(&metrics, "profiler_cost_ratio{part=\"userspace\"}").unwrap()
        + metric(&metrics, "profiler_cost_ratio{part=\"ebpf\"}").unwrap();
    assert!(cost > 0.00001, "cost {cost} under a budget nothing meets");
    // A window recorded in sampled mode says so in its capture.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sampled = loop {
        let found = std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("capture.json")).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .find(|c| c["metadata"]["offcpu_sample_every"].as_u64().unwrap_or(1) > 1);
        if let Some(capture) = found {
            break capture;
        }
        assert!(
            Instant::now() < deadline,
            "no window in sampled mode on disk"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "a window sampled 1 in {}",
        sampled["metadata"]["offcpu_sample_every"]
    );
    // Any budget is met at 100 CPUs' worth: back to full mode, a step per window.
    write_config("10000%");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    let metrics = wait_for_metric(
        port,
        "profiler_mode{mode=\"full\"} 1",
        Duration::from_secs(60),
    );
    assert_eq!(
        metric(&metrics, "profiler_sample_every{family=\"offcpu\"}"),
        Some(1.0)
    );
    stop(daemon);
    let _ = workload.finish();
}

/// A PNG of `url` as headless Chromium draws it, into `png`.
fn chromium_screenshot(
    dir: &std::path::Path,
    url: &str,
    png: &std::path::Path,
) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--hide-scrollbars",
            "--window-size=1280,1800",
            "--virtual-time-budget=2000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .expect("chromium (cargo xtask setup installs the Debian package)")
}

/// Chromium's DOM of `url` after its scripts ran (headless, a fresh profile under `dir`).
fn chromium_dom(dir: &std::path::Path, url: &str) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--virtual-time-budget=2000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("chromium (cargo xtask setup installs the Debian package)")
}

/// Consecutive windows keep one set of programs and read their maps as differences: every
/// window after the first loads no program, each nanosleep of the workload is counted in
/// exactly one window (the one its return falls in, by the workload's own clock), and each
/// window's longest nanosleep is its own. The workload asks for 24 ms at first and 1 ms
/// less every 25 calls: a maximum carried over from an earlier window would be longer than
/// any call the workload timed in a later one.
#[test]
fn windows_keep_their_programs_and_count_each_call_in_its_own_window() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("daemon-keep");
    let iterations = 100;
    let mut workload = Workload::start_with(
        iterations,
        20,
        &dir.join("workload.json"),
        &["--vary-ms", "4"],
    );
    let workload_pid = u64::from(workload.pid);
    let pid = workload.pid.to_string();
    let port = free_port();
    let data = dir.join("data");
    let daemon = start_daemon(
        &data,
        port,
        &[
            "--window",
            "1s",
            "--keep",
            "100",
            "--",
            "--events",
            "offcpu,syscalls",
            "-p",
            &pid,
        ],
    );
    let _kill_on_panic = KillOnDrop(daemon.id());
    // Once a window is written, the programs are attached: every call is seen.
    wait_for_metric(port, "profiler_windows_total 1", Duration::from_secs(60));
    workload.go();
    let report = workload.finish();
    let numbers = |key: &str| -> Vec<u64> {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let (took, asked, ended) = (
        numbers("nanosleep_ns"),
        numbers("nanosleep_asked_ns"),
        numbers("nanosleep_end_unix_ns"),
    );
    assert_eq!(ended.len(), iterations as usize);
    const EDGE_NS: u64 = 3_000_000;
    let last_end = *ended.iter().max().unwrap();
    // Until the window that ended after the workload's last call is written (the next
    // ones fail: the -p process is gone).
    let window_end = |w: &serde_json::Value| {
        w["metadata"]["start_unix_ms"].as_u64().unwrap() * 1_000_000
            + w["metadata"]["duration_ns"].as_u64().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut windows = loop {
        assert!(
            Instant::now() < deadline,
            "no window after the workload ended"
        );
        std::thread::sleep(Duration::from_millis(300));
        let windows: Vec<serde_json::Value> = std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| {
                let path = e.ok()?.path().join("capture.json");
                serde_json::from_slice(&std::fs::read(path).ok()?).ok()
            })
            .collect();
        if windows.iter().any(|w| window_end(w) > last_end + EDGE_NS) {
            break windows;
        }
    };
    let stderr = stop(daemon);
    windows.sort_by_key(|w| w["metadata"]["start_unix_ms"].as_u64().unwrap());
    let mut counted = 0;
    let mut checked_max = 0;
    for (i, window) in windows.iter().enumerate() {
        let metadata = &window["metadata"];
        let start = metadata["start_unix_ms"].as_u64().unwrap() * 1_000_000;
        let end = window_end(window);
        let loaded = metadata["counters"]["programs_loaded"].as_u64().unwrap();
        if i > 0 {
            assert_eq!(
                loaded, 0,
                "window {i} loaded programs: {}",
                metadata["counters"]
            );
        } else {
            assert!(loaded > 0, "the first window loads the programs");
        }
        let (count, max) = window["syscalls"]["stats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["pid"].as_u64() == Some(workload_pid) && s["name"] == "nanosleep")
            .map_or((0, 0), |s| {
                (s["count"].as_u64().unwrap(), s["max_ns"].as_u64().unwrap())
            });
        counted += count;
        // The calls that returned inside it by the workload's clock: certainly those away
        // from its edges, at most those near them too.
        let inside: Vec<usize> = (0..ended.len())
            .filter(|&c| ended[c] >= start + EDGE_NS && ended[c] + EDGE_NS <= end)
            .collect();
        let near = (0..ended.len())
            .filter(|&c| ended[c] + EDGE_NS >= start && ended[c] <= end + EDGE_NS)
            .count();
        println!(
            "window {i}: {count} nanosleeps (workload: {} inside, {near} with the edges), \
             max {max} ns, programs loaded {loaded}",
            inside.len()
        );
        assert!(
            count as usize >= inside.len() && count as usize <= near,
            "window {i} counted {count} nanosleeps; {} returned inside it, {near} near it",
            inside.len()
        );
        // Its maximum: at least the longest any of its calls asked for (a nanosleep lasts
        // that long), at most the longest the workload timed (the kernel's span lies in the
        // workload's). Only where every call near it is well inside.
        if count > 0 && inside.len() == near {
            let longest_asked = inside.iter().map(|&c| asked[c]).max().unwrap();
            let longest_took = inside.iter().map(|&c| took[c]).max().unwrap();
            assert!(
                max >= longest_asked && max <= longest_took,
                "window {i}: max {max} ns; its calls asked up to {longest_asked} ns and took \
                 up to {longest_took} ns"
            );
            checked_max += 1;
        }
    }
    assert_eq!(
        counted, iterations as u64,
        "every nanosleep counted once over the windows"
    );
    assert!(
        checked_max >= 3,
        "only {checked_max} windows away from edges"
    );
    println!("{stderr}");
}
