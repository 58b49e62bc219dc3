//! `record --cgroup PATH` (issue 18): only the tasks of a cgroup2 subtree are recorded, and
//! the filter runs in the kernel — so processes that join the cgroup after the recording
//! started, which userspace never listed, are in from their first event.
//!
//! Real cgroups made by the test under the cgroup2 mount (`/sys/fs/cgroup` on pure-v2 hosts,
//! `/sys/fs/cgroup/unified` on this hybrid one): `inside` (recorded), `inside/nested` (in the
//! subtree) and `outside` (its sibling). Three Python processes (pyenv's 3.12, which keeps its
//! symbols) each sleep through libc in `time.sleep`, started after the recording and moved
//! into their cgroups by writing their pid to `cgroup.procs`, the way container runtimes do.
//! Oracles: the kernel's own `/proc/PID/cgroup`, and each workload's clock around its sleeps
//! (time in libc's `clock_nanosleep` within ±5 %).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use profiler_tests::daemon::{Daemon, Prometheus, free_port, metric, window_captures};
use profiler_tests::*;
use serde_json::Value;

const ROUNDS: &str = "30";
const BLOCK_MS: &str = "20";

/// A cgroup the test made; removed (children first) when dropped.
struct Cgroup {
    dir: PathBuf,
    children: Vec<PathBuf>,
}

impl Cgroup {
    fn create(dir: PathBuf) -> Self {
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self {
            dir,
            children: Vec::new(),
        }
    }

    fn child(&mut self, relative: &str) -> PathBuf {
        let dir = self.dir.join(relative);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        self.children.push(dir.clone());
        dir
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.children.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Moves process `pid` into cgroup `dir`.
fn join(dir: &Path, pid: &str) {
    std::fs::write(dir.join("cgroup.procs"), pid)
        .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
}

/// The cgroup path the kernel reports for `pid`.
fn kernel_cgroup(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .expect("/proc/PID/cgroup")
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .expect("a cgroup2 line")
}

fn python312() -> PathBuf {
    let root = std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".to_string());
    let mut found: Vec<PathBuf> = std::fs::read_dir(Path::new(&root).join("versions"))
        .expect("pyenv versions")
        .flatten()
        .map(|e| e.path().join("bin/python3.12"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().expect("pyenv's python3.12")
}

fn sleeper() -> ReadyProcess {
    let script = format!("{}/workloads/jit_python.py", env!("CARGO_MANIFEST_DIR"));
    ReadyProcess::spawn(Command::new(python312()).args([&script, ROUNDS, BLOCK_MS]))
}

/// Its `inner_ns` line: the workload's own clock around its sleeps.
fn slept_ns(process: &mut ReadyProcess) -> u64 {
    while let Some(line) = process.line() {
        if let Some(ns) = line.strip_prefix("inner_ns ") {
            return ns.parse().expect("inner_ns");
        }
    }
    panic!("the workload ended without its inner_ns line");
}

/// A container id (64 hex digits) no other test uses.
fn fresh_container_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (0..4)
        .map(|i| {
            format!(
                "{:016x}",
                nanos.rotate_left(i * 16) ^ 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(i as u64 + 1)
            )
        })
        .collect()
}

fn process_entry<'a>(capture: &'a Value, pid: &str) -> Option<&'a Value> {
    capture["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"].as_u64().map(|p| p.to_string()).as_deref() == Some(pid))
}

#[test]
fn only_the_named_cgroup_subtree_is_recorded_including_processes_that_join_later() {
    require_root();
    let root = cgroup2_root();
    let mut base = Cgroup::create(root.join(format!("profiler-test-{}", std::process::id())));
    let inside = base.child("inside");
    let nested = base.child("inside/nested");
    let outside = base.child("outside");
    let relative = |dir: &Path| format!("/{}", dir.strip_prefix(&root).unwrap().display());

    let dir = temp_dir("cgroup-filter");
    let recording = Recording::start(
        &dir.join("out"),
        &[
            "--events",
            "offcpu,syscalls",
            "--cgroup",
            inside.to_str().unwrap(),
            "--duration",
            "120s",
        ],
    );
    assert!(
        recording
            .started
            .contains(&format!("cgroup {}", relative(&inside))),
        "{}",
        recording.started
    );
    // Started after the recording: the profiler never heard of them before they joined.
    let mut workloads: Vec<(ReadyProcess, &Path)> = [&inside, &nested, &outside]
        .into_iter()
        .map(|cgroup| {
            let process = sleeper();
            join(cgroup, &process.pid);
            (process, cgroup.as_path())
        })
        .collect();
    for (process, cgroup) in &workloads {
        assert_eq!(kernel_cgroup(&process.pid), relative(cgroup));
    }
    for (process, _) in &mut workloads {
        process.say("go");
    }
    let slept: Vec<u64> = workloads.iter_mut().map(|(p, _)| slept_ns(p)).collect();
    let (capture, _) = recording.interrupt();
    let pids: Vec<String> = workloads.iter().map(|(p, _)| p.pid.clone()).collect();
    for (process, _) in &mut workloads {
        process.say("end");
    }
    for (process, _) in workloads {
        process.finish();
    }

    assert_eq!(
        capture["metadata"]["filters"]["cgroups"],
        serde_json::json!([relative(&inside)])
    );
    // Nothing from outside the subtree: every process the capture names lived in it.
    for process in capture["processes"].as_array().expect("processes") {
        let cgroup = process["cgroup"].as_str().unwrap_or("");
        assert!(
            cgroup.starts_with(&relative(&inside)),
            "a process outside the recorded cgroup: {process}"
        );
    }
    assert!(
        process_entry(&capture, &pids[2]).is_none(),
        "the workload in {} was recorded",
        relative(&outside)
    );
    let syscalls_of_outside = capture["syscalls"]["stats"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter(|e| e["pid"].as_u64().map(|p| p.to_string()).as_ref() == Some(&pids[2]))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(syscalls_of_outside, 0, "syscalls of the outside workload");
    // The two inside the subtree: listed with their cgroup, their sleep time whole.
    for (i, cgroup) in [&inside, &nested].into_iter().enumerate() {
        let entry = process_entry(&capture, &pids[i])
            .unwrap_or_else(|| panic!("the workload in {} is missing", relative(cgroup)));
        assert_eq!(entry["cgroup"], relative(cgroup).as_str());
        let pid: u32 = pids[i].parse().unwrap();
        // libc's clock_nanosleep, under time.sleep: in every stack of the sleeps, also the
        // first few, walked before the process's tables were loaded (it was first seen
        // when it joined), which stop at libc.
        let ours = blocked_ns_in(&capture, pid, "__GI___clock_nanosleep");
        println!(
            "{}: slept {:.1} ms by its clock, {:.1} ms recorded in clock_nanosleep",
            relative(cgroup),
            slept[i] as f64 / 1e6,
            ours as f64 / 1e6
        );
        let error = (ours as f64 - slept[i] as f64).abs() / slept[i] as f64;
        assert!(
            error <= 0.05,
            "{}: {ours} ns recorded vs {} ns slept",
            relative(cgroup),
            slept[i]
        );
    }
}

#[test]
fn an_unknown_cgroup_is_one_clear_error() {
    require_root();
    let dir = temp_dir("cgroup-unknown");
    let output = run_profiler(&[
        "record",
        "-o",
        dir.join("out").to_str().unwrap(),
        "--cgroup",
        "/no/such/cgroup",
        "-d",
        "1s",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("--cgroup /no/such/cgroup: no such cgroup"),
        "{stderr}"
    );
    assert!(!dir.join("out").exists(), "nothing is written");
}

/// `--container ID`: the cgroup is found by the runtime's naming. No container runtime runs
/// on this machine (and on a hybrid cgroup host a cgroupfs-driven runtime would put its
/// containers in cgroup v1 only), so the test makes the cgroup the way docker's systemd
/// driver names it, `docker-<64 hex digits>.scope`, and moves a process in as the runtime
/// does; the kernel filter and the lookup are the real ones.
#[test]
fn a_container_is_found_by_its_id_prefix_and_named_in_the_capture() {
    require_root();
    let root = cgroup2_root();
    let mut base = Cgroup::create(root.join(format!("profiler-test-{}", std::process::id())));
    let id = fresh_container_id();
    let scope = format!("docker-{id}.scope");
    let container = base.child(&scope);
    let beside = base.child("beside");
    let dir = temp_dir("cgroup-container");
    let recording = Recording::start(
        &dir.join("out"),
        &[
            "--events",
            "offcpu",
            "--container",
            &id[..12],
            "--group-by",
            "container",
            "--duration",
            "120s",
        ],
    );
    let mut inside = sleeper();
    join(&container, &inside.pid);
    let mut outside = sleeper();
    join(&beside, &outside.pid);
    inside.say("go");
    outside.say("go");
    slept_ns(&mut inside);
    slept_ns(&mut outside);
    let (capture, _) = recording.interrupt();
    for process in [&mut inside, &mut outside] {
        process.say("end");
    }
    let (inside_pid, outside_pid) = (inside.pid.clone(), outside.pid.clone());
    inside.finish();
    outside.finish();
    let relative = format!("/{}", container.strip_prefix(&root).unwrap().display());
    assert_eq!(
        capture["metadata"]["filters"]["cgroups"],
        serde_json::json!([relative])
    );
    let entry = process_entry(&capture, &inside_pid).expect("the container's process");
    assert_eq!(entry["container_id"], id.as_str());
    assert_eq!(entry["systemd_unit"], scope.as_str());
    assert!(process_entry(&capture, &outside_pid).is_none());
    assert_eq!(capture["processes"].as_array().unwrap().len(), 1);
    // --group-by: the flamegraphs' root is the container, the process below it.
    let folded = std::fs::read_to_string(dir.join("out/offcpu.folded")).expect("offcpu.folded");
    let root = format!("container:{};python3.12;", &id[..12]);
    assert!(!folded.is_empty());
    assert!(folded.lines().all(|l| l.starts_with(&root)), "{folded}");
    let output = run_profiler(&[
        "report",
        dir.join("out").to_str().unwrap(),
        "--format",
        "folded",
        "--group-by",
        "cgroup",
    ]);
    assert!(output.status.success());
    let folded = String::from_utf8_lossy(&output.stdout);
    let root = format!("{relative};python3.12;");
    assert!(folded.lines().all(|l| l.starts_with(&root)), "{folded}");
}

#[test]
fn an_unknown_container_is_one_clear_error() {
    require_root();
    let dir = temp_dir("cgroup-no-container");
    for (id, says) in [
        ("0123456789abcdef", "no cgroup of that container"),
        ("12ab", "at least 12 hexadecimal digits"),
    ] {
        let output = run_profiler(&[
            "record",
            "-o",
            dir.join("out").to_str().unwrap(),
            "--container",
            id,
            "-d",
            "1s",
        ]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// The daemon scoped to a cgroup by its config file (`record = ["--cgroup", …]`, as the
/// Debian package's /etc/profiler.toml would say it): every window holds the subtree's
/// processes only, and the inside workload's sleeps, summed over the windows (which follow
/// each other with no gap), are its own clock's.
#[test]
fn a_daemon_configured_with_a_cgroup_records_only_that_subtree() {
    require_root();
    let root = cgroup2_root();
    let mut base = Cgroup::create(root.join(format!("profiler-daemon-{}", std::process::id())));
    let inside = base.child("inside");
    let outside = base.child("outside");
    let dir = temp_dir("cgroup-daemon");
    let config = dir.join("profiler.toml");
    std::fs::write(
        &config,
        format!(
            "window = \"1s\"\nrecord = [\"--events\", \"offcpu\", \"--cgroup\", \"{}\"]\n",
            inside.display()
        ),
    )
    .unwrap();
    let data = dir.join("data");
    let port = profiler_tests::daemon::free_port();
    let mut daemon = profiler_tests::daemon::Daemon::spawn(
        &data,
        port,
        &["--config", config.to_str().unwrap()],
        &[],
    );
    let windows = || profiler_tests::daemon::metric(port, "profiler_windows_total");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while windows() < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no window");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut workloads: Vec<ReadyProcess> = [&inside, &outside]
        .into_iter()
        .map(|cgroup| {
            let process = sleeper();
            join(cgroup, &process.pid);
            process
        })
        .collect();
    for process in &mut workloads {
        process.say("go");
    }
    let slept: Vec<u64> = workloads.iter_mut().map(slept_ns).collect();
    // One whole window after the sleeps ended.
    let after = windows();
    while windows() < after + 2.0 {
        assert!(std::time::Instant::now() < deadline, "the windows stopped");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    daemon.stop();
    let pids: Vec<String> = workloads.iter().map(|p| p.pid.clone()).collect();
    for process in &mut workloads {
        process.say("end");
    }
    for process in workloads {
        process.finish();
    }
    let mut captures = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("window-") {
            captures.push(read_capture(&entry.path()));
        }
    }
    assert!(captures.len() >= 3, "{} windows", captures.len());
    for capture in &captures {
        assert_eq!(
            capture["metadata"]["filters"]["cgroups"],
            serde_json::json!([format!(
                "/{}",
                inside.strip_prefix(&root).unwrap().display()
            )])
        );
        assert!(
            process_entry(capture, &pids[1]).is_none(),
            "the outside workload is in a window"
        );
    }
    let pid: u32 = pids[0].parse().unwrap();
    let ours: u64 = captures
        .iter()
        .map(|c| blocked_ns_in(c, pid, "__GI___clock_nanosleep"))
        .sum();
    println!(
        "inside: slept {:.1} ms by its clock, {:.1} ms in clock_nanosleep over {} windows",
        slept[0] as f64 / 1e6,
        ours as f64 / 1e6,
        captures.len()
    );
    let error = (ours as f64 - slept[0] as f64).abs() / slept[0] as f64;
    assert!(error <= 0.05, "{ours} ns recorded vs {} ns slept", slept[0]);
}

/// A real Prometheus server scrapes the daemon (1 s windows, every second, recording the
/// test's cgroup) while two identical Python sleepers run, one in a container's cgroup named
/// the way docker's systemd driver names it, one beside it. Through Prometheus's own API:
/// the container's off-CPU series carries its id and unit, the other's neither; each holds
/// what the daemon's windows recorded of that process, and at least what the process's own
/// clock slept (−5 %, the accuracy the filter test above holds clock_nanosleep to).
#[test]
fn prometheus_scrapes_off_cpu_seconds_labelled_by_container() {
    require_root();
    let root = cgroup2_root();
    let mut base = Cgroup::create(root.join(format!("profiler-test-prom-{}", std::process::id())));
    let id = fresh_container_id();
    let scope = format!("docker-{id}.scope");
    let container = base.child(&scope);
    let beside = base.child("beside");
    let dir = temp_dir("cgroup-prometheus");
    let data = dir.join("data");
    let port = free_port();
    let mut daemon = Daemon::start_with(
        &data,
        port,
        &["--events", "offcpu", "--cgroup", base.dir.to_str().unwrap()],
    );
    let prometheus = Prometheus::start(&dir, port);
    let windows_after = |n: f64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while metric(port, "profiler_windows_total") < n {
            assert!(Instant::now() < deadline, "no window {n}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    windows_after(1.0);
    let mut inside = sleeper();
    join(&container, &inside.pid);
    let mut outside = sleeper();
    join(&beside, &outside.pid);
    inside.say("go");
    outside.say("go");
    let slept = [slept_ns(&mut inside), slept_ns(&mut outside)];
    let pids = [inside.pid.clone(), outside.pid.clone()];
    for process in [&mut inside, &mut outside] {
        process.say("end");
    }
    inside.finish();
    outside.finish();
    // Two more windows (the one they ended in is then written), then until Prometheus has
    // scraped them all (its first scrape waits for its target discovery to settle, and
    // windows that keep their programs follow each other with no time to load).
    windows_after(metric(port, "profiler_windows_total") + 2.0);
    let written = metric(port, "profiler_windows_total");
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus
        .query("max(profiler_windows_total)")
        .first()
        .map_or(0.0, |(_, value)| *value)
        < written
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped window {written}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let series = prometheus.query(
        "max_over_time(profiler_offcpu_seconds_total{comm=\"python3.12\",state=\"sleep\"}[1m])",
    );
    daemon.stop();
    let windows = window_captures(&data);
    let recorded_s = |pid: &str| -> f64 {
        windows
            .iter()
            .filter_map(|w| w["offcpu"]["stacks"].as_array())
            .flatten()
            .filter(|s| {
                s["pid"].as_u64().map(|p| p.to_string()).as_deref() == Some(pid)
                    && s["state"] == "sleep"
            })
            .map(|s| s["total_ns"].as_u64().unwrap() as f64)
            .sum::<f64>()
            / 1e9
    };
    println!("{series:#?}");
    assert_eq!(series.len(), 2, "one series per process: {series:?}");
    let labelled: Vec<&(Value, f64)> = series
        .iter()
        .filter(|(labels, _)| labels["container_id"] == id.as_str())
        .collect();
    let unlabelled: Vec<&(Value, f64)> = series
        .iter()
        .filter(|(labels, _)| labels.get("container_id").is_none())
        .collect();
    assert_eq!((labelled.len(), unlabelled.len()), (1, 1), "{series:?}");
    assert_eq!(labelled[0].0["systemd_unit"], scope.as_str());
    assert!(unlabelled[0].0.get("systemd_unit").is_none(), "{series:?}");
    for ((_, value), (pid, slept)) in [labelled[0], unlabelled[0]]
        .into_iter()
        .zip(pids.iter().zip(slept))
    {
        let recorded = recorded_s(pid);
        let slept_s = slept as f64 / 1e9;
        println!(
            "pid {pid}: Prometheus {value:.6} s, windows {recorded:.6} s, its clock slept \
             {slept_s:.6} s"
        );
        assert!(
            (value - recorded).abs() <= 1e-9 * recorded.max(1.0),
            "pid {pid}: Prometheus {value} s, the windows {recorded} s"
        );
        assert!(
            *value >= 0.95 * slept_s,
            "pid {pid}: {value} s < slept {slept_s} s"
        );
    }
}
