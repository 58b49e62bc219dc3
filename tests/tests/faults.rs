//! The daemon and `record` when things go wrong, on the real kernel and a real filesystem:
//! a full disk and a read-only or deleted data directory (a small tmpfs the test mounts),
//! a SIGKILL in the middle of writing, an on-demand capture during window handoffs; and
//! what they write being private (modes read back with stat, the systemd unit checked by
//! `systemd-analyze verify`).

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use profiler_tests::daemon::{Daemon, call, free_port, metric};
use profiler_tests::*;

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A tmpfs of `size`, mounted for the test and unmounted after.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }

    fn remount(&self, option: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {option}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The window directories, oldest first.
fn windows_in(data: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(data)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("window-")
        })
        .collect();
    dirs.sort();
    dirs
}

/// Every window directory reads as a complete capture: its `capture.json` parses and
/// every view a capture of offcpu has is there.
fn assert_complete(dir: &Path) {
    let capture = read_capture(dir);
    assert_eq!(capture["format"], "profiler-capture", "{}", dir.display());
    for file in ["offcpu.folded", "offcpu.svg", "summary.txt"] {
        assert!(dir.join(file).is_file(), "{} lacks {file}", dir.display());
    }
}

fn stderr_lines_with(stderr: &str, text: &str) -> usize {
    stderr.lines().filter(|l| l.contains(text)).count()
}

/// Fills the filesystem at `dir` with one file until ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    path
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A full disk: each window that cannot be written is one error line and one count in
/// `profiler_window_errors_total`; the daemon goes on serving what it has, the windows
/// written before are untouched (byte for byte), and it writes again once space returns.
#[test]
fn a_full_disk_fails_windows_one_line_each_and_recording_resumes() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("fault-enospc");
    let fs = Tmpfs::mount(&dir.join("fs"), "16m");
    let data = fs.0.join("data");
    let port = free_port();
    let mut daemon = Daemon::start(&data, port);
    wait_until("2 windows", Duration::from_secs(60), || {
        metric(port, "profiler_windows_total") >= 2.0
    });
    let before: Vec<(PathBuf, Vec<u8>)> = windows_in(&data)
        .into_iter()
        .map(|d| {
            let bytes = std::fs::read(d.join("capture.json")).unwrap();
            (d, bytes)
        })
        .collect();
    let filler = fill(&fs.0);
    let errors_at_full = metric(port, "profiler_window_errors_total");
    wait_until("3 failed windows", Duration::from_secs(90), || {
        metric(port, "profiler_window_errors_total") >= errors_at_full + 3.0
    });
    // Still serving what it has.
    assert_eq!(call(port, "GET", "/healthz").unwrap().0, 200);
    assert_eq!(
        call(port, "GET", "/flamegraph?kind=offcpu").unwrap().0,
        200,
        "the latest window is still served"
    );
    for (window, bytes) in &before {
        assert_eq!(
            &std::fs::read(window.join("capture.json")).unwrap(),
            bytes,
            "{} changed",
            window.display()
        );
    }
    let windows_while_full = metric(port, "profiler_windows_total");
    std::fs::remove_file(&filler).unwrap();
    wait_until(
        "2 windows after space returned",
        Duration::from_secs(60),
        || metric(port, "profiler_windows_total") >= windows_while_full + 2.0,
    );
    let errors = metric(port, "profiler_window_errors_total");
    let stderr = daemon.stop();
    let lines = stderr_lines_with(&stderr, "window failed");
    println!(
        "full disk: {errors} failed windows, {lines} error lines; {} windows kept",
        windows_in(&data).len()
    );
    assert!(
        stderr_lines_with(&stderr, "No space left on device") >= 1,
        "{stderr}"
    );
    assert!(
        lines as f64 <= errors,
        "{lines} lines for {errors} failures"
    );
    for window in windows_in(&data) {
        assert_complete(&window);
    }
    let leftovers: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// The data directory made read-only, then deleted: windows fail (counted, one line
/// each), the daemon serves on, and records again once it can write — into a data
/// directory it recreated, private.
#[test]
fn a_read_only_or_deleted_data_directory_fails_windows_and_recording_resumes() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("fault-vanished");
    let fs = Tmpfs::mount(&dir.join("fs"), "64m");
    let data = fs.0.join("data");
    let port = free_port();
    let mut daemon = Daemon::start(&data, port);
    wait_until("2 windows", Duration::from_secs(60), || {
        metric(port, "profiler_windows_total") >= 2.0
    });

    fs.remount("ro");
    let errors = metric(port, "profiler_window_errors_total");
    wait_until(
        "2 failed windows (read-only)",
        Duration::from_secs(60),
        || metric(port, "profiler_window_errors_total") >= errors + 2.0,
    );
    assert_eq!(call(port, "GET", "/healthz").unwrap().0, 200);
    fs.remount("rw");
    let windows = metric(port, "profiler_windows_total");
    wait_until("a window after rw", Duration::from_secs(60), || {
        metric(port, "profiler_windows_total") >= windows + 1.0
    });

    std::fs::remove_dir_all(&data).unwrap();
    let windows = metric(port, "profiler_windows_total");
    wait_until(
        "2 windows after the deletion",
        Duration::from_secs(60),
        || metric(port, "profiler_windows_total") >= windows + 2.0,
    );
    // Only windows that exist are listed.
    let (_, listed) = call(port, "GET", "/captures").unwrap();
    let listed: Vec<String> = serde_json::from_slice(&listed).unwrap();
    assert!(!listed.is_empty());
    for window in &listed {
        assert!(Path::new(window).is_dir(), "{window} listed but gone");
    }
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "recreated data directory mode {mode:o}");
    let stderr = daemon.stop();
    println!(
        "read-only then deleted: {} failed windows",
        stderr_lines_with(&stderr, "window failed")
    );
    assert!(
        stderr_lines_with(&stderr, "Read-only file system") >= 1,
        "{stderr}"
    );
    for window in windows_in(&data) {
        assert_complete(&window);
    }
}

/// SIGKILL at moments spread over the window cycle, then a restart: no window directory
/// is ever half-written (each reads as a complete capture), and the restart removes the
/// staging directories the kills left, saying so.
#[test]
fn a_kill_mid_write_leaves_no_window_that_reads_as_valid() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("fault-sigkill");
    let data = dir.join("data");
    let port = free_port();
    for (round, offset_ms) in [0u64, 250, 500, 750, 900].into_iter().enumerate() {
        let daemon = Daemon::start(&data, port);
        wait_until("a window", Duration::from_secs(60), || {
            metric(port, "profiler_windows_total") >= 1.0
        });
        std::thread::sleep(Duration::from_millis(offset_ms + 137 * round as u64));
        drop(daemon); // SIGKILL
        for window in windows_in(&data) {
            assert_complete(&window);
        }
    }
    let staged = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
        .count();
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let mut daemon = Daemon::start(&data, port);
    for entry in std::fs::read_dir(&data).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(ms) = name.strip_prefix(".partial-window-") {
            assert!(
                ms.parse::<u128>().unwrap() >= restarted_at,
                "{name} from before the restart is still there"
            );
        }
    }
    let stderr = daemon.stop();
    println!(
        "{staged} staging directories after 5 kills; {} complete windows",
        windows_in(&data).len()
    );
    assert!(
        staged >= 1,
        "no kill landed while a window was being recorded"
    );
    assert_eq!(
        stderr_lines_with(&stderr, "half-written"),
        1,
        "the restart says it removed them: {stderr}"
    );
    for window in windows_in(&data) {
        assert_complete(&window);
    }
}

/// On-demand captures asked while 1 s windows hand off to each other: each answers with a
/// capture as long as asked (bounded by the request's own clock), and no window fails.
#[test]
fn a_capture_during_window_handoffs_disturbs_no_window() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("fault-capture-handoff");
    let data = dir.join("data");
    let port = free_port();
    let mut daemon = Daemon::start(&data, port);
    wait_until("a window", Duration::from_secs(60), || {
        metric(port, "profiler_windows_total") >= 1.0
    });
    let windows = metric(port, "profiler_windows_total");
    for _ in 0..3 {
        let asked = Instant::now();
        let (status, body) = call(port, "POST", "/capture?seconds=2").unwrap();
        let took = asked.elapsed();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let capture: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let seconds = capture["metadata"]["duration_ns"].as_u64().unwrap() as f64 / 1e9;
        println!(
            "capture of {seconds:.3} s answered in {:.3} s",
            took.as_secs_f64()
        );
        assert!(
            seconds >= 2.0 * 0.95 && seconds <= took.as_secs_f64(),
            "a 2 s capture lasted {seconds} s and took {took:?}"
        );
    }
    assert!(metric(port, "profiler_windows_total") >= windows + 2.0);
    assert_eq!(metric(port, "profiler_window_errors_total"), 0.0);
    daemon.stop();
    let captures: Vec<PathBuf> = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("capture-")
        })
        .collect();
    assert_eq!(captures.len(), 3);
    for capture in captures.iter().chain(windows_in(&data).iter()) {
        assert_complete(capture);
    }
}

/// Every file and directory under `dir` (itself included): (path, mode).
fn modes_under(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = vec![(
        dir.to_path_buf(),
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o7777,
    )];
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            out.extend(modes_under(&entry.path()));
        } else {
            out.push((entry.path(), meta.permissions().mode() & 0o7777));
        }
    }
    out
}

/// What the daemon and `record` write is private: directories 0700, files 0600 (an
/// existing data directory is made private; `record -o` into a directory others may write
/// warns); the systemd unit sets `UMask=0077` and loads (`systemd-analyze verify`).
#[test]
fn windows_captures_and_outputs_are_private() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("private");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let mut daemon = Daemon::start(&data, port);
    wait_until("a window", Duration::from_secs(60), || {
        metric(port, "profiler_windows_total") >= 1.0
    });
    assert_eq!(call(port, "POST", "/capture?seconds=1").unwrap().0, 200);
    let stderr = daemon.stop();
    assert_eq!(
        stderr_lines_with(&stderr, "was mode 755; now 700"),
        1,
        "{stderr}"
    );
    for (path, mode) in modes_under(&data) {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
    }

    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let record = Command::new(profiler_bin())
        .args(["record", "-d", "1", "--events", "offcpu", "-p", "1", "-o"])
        .arg(&shared)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&record.stderr);
    assert!(record.status.success(), "{stderr}");
    // Every line that warns, however worded: exactly one, and it is this one.
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning line: {stderr}");
    assert!(warnings[0].contains("writable by everyone"), "{stderr}");
    let fresh = dir.join("new/out");
    let record = Command::new(profiler_bin())
        .args(["record", "-d", "1", "--events", "offcpu", "-p", "1", "-o"])
        .arg(&fresh)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&record.stderr);
    assert!(record.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    for (path, mode) in modes_under(&shared)
        .into_iter()
        .skip(1)
        .chain(modes_under(&dir.join("new")))
    {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
    }

    // The unit file as shipped, with ExecStart pointing at this build.
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiler/contrib/profiler.service"),
    )
    .unwrap();
    assert!(unit.lines().any(|l| l == "UMask=0077"), "{unit}");
    let copy = dir.join("profiler.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/profiler",
            &profiler_bin().display().to_string(),
        ),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (cargo xtask setup installs systemd)");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{said}");
    assert!(
        !said.contains("profiler.service"),
        "systemd-analyze found fault with the unit: {said}"
    );
}

/// SIGSTOP for 30 s, then SIGCONT: the window that spans the stop ends when the daemon
/// resumes and says how long it really lasted, the windows still follow each other with no
/// gap (each starts no later than the previous one ended, by the captures' own clocks), and
/// none fails.
#[test]
fn a_daemon_stopped_for_30_s_keeps_its_windows_consistent() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("fault-sigstop");
    let data = dir.join("data");
    let port = free_port();
    let mut daemon = Daemon::start(&data, port);
    wait_until("2 windows", Duration::from_secs(60), || {
        metric(port, "profiler_windows_total") >= 2.0
    });
    let pid = daemon.pid() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(30));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let windows = metric(port, "profiler_windows_total");
    wait_until("3 windows after SIGCONT", Duration::from_secs(60), || {
        metric(port, "profiler_windows_total") >= windows + 3.0
    });
    assert_eq!(metric(port, "profiler_window_errors_total"), 0.0);
    daemon.stop();
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for window in windows_in(&data) {
        assert_complete(&window);
        let capture = read_capture(&window);
        let meta = &capture["metadata"];
        spans.push((
            meta["start_unix_ms"].as_u64().unwrap(),
            meta["duration_ns"].as_u64().unwrap() / 1_000_000,
        ));
    }
    let longest = spans.iter().map(|s| s.1).max().unwrap();
    println!("windows (start ms, length ms): {spans:?}");
    assert!(
        longest >= 30_000,
        "no window spans the 30 s stop: {spans:?}"
    );
    for pair in spans.windows(2) {
        let gap = pair[1].0 as i64 - (pair[0].0 + pair[0].1) as i64;
        assert!(gap <= 20, "{gap} ms between windows: {spans:?}");
    }
}

/// tracefs not mounted at start (a private mount namespace without it): `record` mounts it,
/// says so on one line, and the families that read its formats work — dd's read and write
/// calls counted exactly as strace counts them.
#[test]
fn record_mounts_tracefs_when_it_is_not_mounted() {
    require_root();
    let dir = temp_dir("no-tracefs");
    let out = dir.join("out");
    let err = dir.join("profiler.err");
    let strace = dir.join("strace.txt");
    // In the namespace: unmount every tracefs, check it is gone, record the syscalls family
    // while dd runs under strace, then check the profiler's mount is there.
    let script = format!(
        "set -u
         for m in $(awk '$3 == \"tracefs\" || $3 == \"debugfs\" {{print $2}}' /proc/mounts); do
             umount -l \"$m\" || exit 96
         done
         test ! -d /sys/kernel/tracing/events || exit 97
         {profiler} record -d 60s --events syscalls -o {out} 2> {err} &
         rec=$!
         for _ in $(seq 600); do
             grep -q '^recording ' {err} && break
             kill -0 $rec 2>/dev/null || break
             sleep 0.1
         done
         strace -f -c -U calls,name -e trace=read,write -o {strace} \
             dd if=/dev/zero of=/dev/null bs=1 count=3000 2>/dev/null
         kill -INT $rec
         wait $rec
         rc=$?
         test -d /sys/kernel/tracing/events || exit 98
         exit $rc",
        profiler = profiler_bin().display(),
        out = out.display(),
        err = err.display(),
        strace = strace.display(),
    );
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .status()
        .expect("unshare (package util-linux)");
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(status.success(), "{status}: {stderr}");
    let notes: Vec<&str> = stderr.lines().filter(|l| l.contains("tracefs")).collect();
    assert_eq!(
        notes,
        ["profiler: note: tracefs was not mounted; mounted it at /sys/kernel/tracing"],
        "{stderr}"
    );
    // strace -c: "calls name" rows; dd's own calls, startup included.
    let counted = std::fs::read_to_string(&strace).expect("strace -c output");
    let theirs = |name: &str| -> u64 {
        counted
            .lines()
            .find_map(|l| {
                let mut fields = l.split_whitespace();
                let calls = fields.next()?.parse().ok()?;
                (fields.next()? == name).then_some(calls)
            })
            .unwrap_or_else(|| panic!("no {name} in strace's table:\n{counted}"))
    };
    let capture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("capture.json")).unwrap()).unwrap();
    let stats = capture["syscalls"]["stats"].as_array().expect("syscalls");
    let ours = |name: &str| -> u64 {
        stats
            .iter()
            .filter(|s| s["comm"] == "dd" && s["name"] == name)
            .map(|s| s["count"].as_u64().expect("count"))
            .sum()
    };
    println!(
        "dd: read {} / {} (ours / strace's), write {} / {}",
        ours("read"),
        theirs("read"),
        ours("write"),
        theirs("write")
    );
    assert_eq!(ours("read"), theirs("read"));
    assert_eq!(ours("write"), theirs("write"));
}

/// Two `record`s and a daemon at once, on the same host and the same workloads: each gives
/// its own oracle's answer. An off-CPU record of workload A and the daemon's on-demand
/// capture of the whole host (`POST /capture`, its windows going on meanwhile) each match
/// A's own clock
/// per function (±5 %, shortfalls explained by counters only); a syscalls record of
/// workload B counts its main thread's nanosleep calls exactly (B's own count).
#[test]
fn two_records_and_a_daemon_at_once_each_match_their_own_oracle() {
    require_root();
    let _serial = serial();
    const ITERATIONS: u32 = 15;
    let dir = temp_dir("fault-concurrent");
    let mut a = Workload::start(ITERATIONS, 20, &dir.join("a.json"));
    let mut b = Workload::start(ITERATIONS, 20, &dir.join("b.json"));
    let (pid_a, pid_b) = (a.pid.to_string(), b.pid.to_string());
    let port = free_port();
    let data = dir.join("data");
    // The daemon records the whole host (a -p of its own would fail its windows once the
    // workload has exited).
    let mut daemon = Daemon::start_with(&data, port, &["--events", "offcpu"]);
    let recording_a = Recording::start(
        &dir.join("a"),
        &["-d", "60s", "-p", &pid_a, "--events", "offcpu"],
    );
    let recording_b = Recording::start(
        &dir.join("b"),
        &["-d", "60s", "-p", &pid_b, "--events", "syscalls"],
    );
    let windows = metric(port, "profiler_windows_total");
    let on_demand = std::thread::spawn(move || call(port, "POST", "/capture?seconds=6"));
    // The on-demand capture attaches before the workloads start.
    std::thread::sleep(Duration::from_secs(2));
    a.go();
    b.go();
    let report_a = a.finish();
    let report_b = b.finish();
    let (capture_a, _) = recording_a.interrupt();
    let (capture_b, _) = recording_b.interrupt();
    let (status, body) = on_demand
        .join()
        .unwrap()
        .expect("the daemon answered /capture");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let from_daemon: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let pid_a = report_a["pid"].as_u64().unwrap() as u32;
    println!("record of A:");
    assert_matches_oracle(&capture_a, &report_a, pid_a);
    println!("the daemon's capture of A:");
    assert_matches_oracle(&from_daemon, &report_a, pid_a);
    let pid_b = report_b["pid"].as_u64().unwrap();
    let nanosleeps = capture_b["syscalls"]["stats"]
        .as_array()
        .expect("syscalls")
        .iter()
        .find(|s| s["pid"].as_u64() == Some(pid_b) && s["name"] == "nanosleep")
        .map(|s| s["count"].as_u64().unwrap());
    assert_eq!(
        nanosleeps,
        Some(u64::from(ITERATIONS)),
        "B's nanosleep calls"
    );
    // The daemon's windows went on throughout, none failed.
    assert!(metric(port, "profiler_windows_total") >= windows + 3.0);
    assert_eq!(metric(port, "profiler_window_errors_total"), 0.0);
    daemon.stop();
    for window in windows_in(&data) {
        assert_complete(&window);
    }
}
