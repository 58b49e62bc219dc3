//! `profiler daemon` end to end: windows on disk with retention, the HTTP endpoints serving
//! the latest window (Prometheus text, SVG), and a clean stop on SIGTERM with every program
//! detached (checked with bpftool).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use profiler_tests::*;

fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// The body of a GET, as bytes.
fn get_bytes(port: u16, path: &str) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let at = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(response[at + 4..].to_vec())
}

fn profiler_programs_loaded() -> usize {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("name offcpu_") || l.contains("name syscalls_"))
        .count()
}

#[test]
fn daemon_serves_windows_and_detaches_on_sigterm() {
    require_root();
    let dir = temp_dir("daemon");
    let mut workload = Workload::start(150, 20, &dir.join("workload.json"));
    let pid = workload.pid.to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let data = dir.join("data");
    let mut daemon = Command::new(profiler_bin())
        .arg("daemon")
        .arg("--data-dir")
        .arg(&data)
        .args(["--window", "1s", "--keep", "2", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--", "--events", "offcpu,syscalls", "-p", &pid])
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
    // Retention: at most --keep windows on disk (one more may be being written).
    std::thread::sleep(Duration::from_secs(3));
    let windows = std::fs::read_dir(&data).unwrap().count();
    assert!(windows <= 3, "{windows} windows kept with --keep 2");
    let (_, captures) = get(port, "/captures").expect("captures");
    let listed: Vec<String> = serde_json::from_str(&captures).unwrap();
    assert!(!listed.is_empty() && listed.len() <= 2, "{listed:?}");
    assert!(
        profiler_programs_loaded() > 0,
        "no programs attached while running"
    );

    // SIGTERM: the current window is written, everything detaches, exit 0.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
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
    assert_eq!(
        profiler_programs_loaded(),
        0,
        "programs left attached after SIGTERM"
    );
    let _ = workload.finish();
}

/// A pinned baseline (the diff workload without its extra delay) and windows of the slow
/// variant: the daemon turns the regression into an event naming `stage_query`, counts it in
/// /metrics and serves the differential flamegraph.
#[test]
fn daemon_reports_a_regression_against_a_pinned_baseline() {
    require_root();
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
    let mut daemon = Command::new(profiler_bin())
        .arg("daemon")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--window", "2500ms", "--keep", "3", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--baseline")
        .arg(&baseline)
        .args([
            "--",
            "--events",
            "offcpu",
            "--interval",
            "125ms",
            "-p",
            &pid,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start daemon");
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

/// Settings from a TOML file; SIGHUP re-reads it: lowering `keep` from 5 to 1 leaves one
/// window listed and on disk. A bad edit is refused with one line and the daemon goes on.
#[test]
fn daemon_reads_its_config_file_and_reloads_it_on_sighup() {
    require_root();
    let dir = temp_dir("daemon-config");
    let mut sleeper = Command::new("sleep").arg("120").spawn().unwrap();
    let config = dir.join("daemon.toml");
    let write_config = |keep: &str| {
        std::fs::write(
            &config,
            format!(
                "window = \"1s\"\nkeep = {keep}\nrecord = [\"--events\", \"offcpu\", \"-p\", \"{}\"]\n",
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
    let mut daemon = Command::new(profiler_bin())
        .arg("daemon")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start daemon");
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
    let on_disk = std::fs::read_dir(dir.join("data")).unwrap().count();
    assert!(on_disk <= 2, "{on_disk} windows on disk with keep = 1");
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
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
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
        .args(["--window", "5s", "--keep", "3", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--", "--events", "offcpu,db"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start daemon");
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
        // Skip the first window, then sample.
        std::thread::sleep(Duration::from_secs(6));
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
