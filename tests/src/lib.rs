//! Helpers for the privileged end-to-end tests: run the real `profiler` binary against real
//! workloads on the running kernel, and read what it wrote.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

pub mod bpf;
pub mod daemon;
pub mod mariadb;
pub mod pg;
pub mod rawsys;

/// These tests load eBPF programs: without root they cannot run, and that is a failure.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests load eBPF programs into the kernel and must run as root \
         (use `cargo xtask test` as root)"
    );
}

/// The `profiler` binary built next to this test binary (`cargo xtask test` builds it).
pub fn profiler_bin() -> PathBuf {
    built_binary("profiler")
}

/// A binary of the workspace built in the same profile as this test binary:
/// target/<profile>/deps/<test> → target/<profile>/<name>.
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (`cargo build`, or run `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// A fresh output directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("profiler-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The off-CPU workload, started and waiting for `go()`.
pub struct Workload {
    pub pid: u32,
    process: ReadyProcess,
    report: PathBuf,
}

impl Workload {
    pub fn start(iterations: u32, block_ms: u64, report: &Path) -> Self {
        Self::start_with(iterations, block_ms, report, &[])
    }

    /// As `start`, with more of its arguments (`--vary-ms V`).
    pub fn start_with(iterations: u32, block_ms: u64, report: &Path, args: &[&str]) -> Self {
        let process = ReadyProcess::spawn(
            Command::new(built_binary("offcpu-workload"))
                .args(["--iterations", &iterations.to_string()])
                .args(["--block-ms", &block_ms.to_string()])
                .args(args)
                .arg("--report")
                .arg(report),
        );
        Self {
            pid: process.pid.parse().expect("numeric pid"),
            process,
            report: report.to_path_buf(),
        }
    }

    /// Lets it run its iterations.
    pub fn go(&mut self) {
        self.process.go();
    }

    /// Waits for it to finish and returns its own measurement of blocked time per function.
    pub fn finish(self) -> Value {
        self.process.finish();
        let text = std::fs::read_to_string(&self.report).expect("workload report");
        serde_json::from_str(&text).expect("report json")
    }
}

/// A running `profiler record`.
pub struct Recording {
    child: Child,
    stderr_lines: mpsc::Receiver<String>,
    pub output: PathBuf,
    /// The line announcing the recording (what is recorded and how it attached).
    pub started: String,
}

impl Recording {
    /// Starts `profiler record -o OUTPUT ARGS…` and waits until it says it is recording.
    pub fn start(output: &Path, args: &[&str]) -> Self {
        Self::start_with_env(output, args, &[])
    }

    /// `start` with `env` set for the profiler.
    pub fn start_with_env(output: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(profiler_bin())
            .arg("record")
            .arg("-o")
            .arg(output)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start profiler");
        let started = std::cell::RefCell::new(String::new());
        let rx = wait_for_stderr_line(
            &mut child,
            Duration::from_secs(60),
            |line| {
                let ready = line.starts_with("recording ") && line.contains("Ctrl-C");
                if ready {
                    *started.borrow_mut() = line.to_string();
                }
                ready
            },
            "profiler did not start recording",
        );
        Self {
            child,
            stderr_lines: rx,
            output: output.to_path_buf(),
            started: started.into_inner(),
        }
    }

    /// The profiler's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ctrl-C: the profiler must stop and still write everything.
    pub fn interrupt(self) -> (Value, String) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Waits for the end; returns the capture and what it printed on stdout.
    pub fn wait(self) -> (Value, String) {
        let output = self.child.wait_with_output().expect("wait profiler");
        let stderr: Vec<String> = self.stderr_lines.try_iter().collect();
        assert!(
            output.status.success(),
            "profiler failed ({}): {stderr:?}",
            output.status
        );
        let capture = read_capture(&self.output);
        (
            capture,
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }
}

pub fn read_capture(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("capture.json")).expect("capture.json");
    serde_json::from_str(&text).expect("capture json")
}

/// Runs the profiler to completion with `args` (for error cases).
pub fn run_profiler(args: &[&str]) -> Output {
    Command::new(profiler_bin())
        .args(args)
        .output()
        .expect("run profiler")
}

/// Stacks of `pid` in the capture.
pub fn stacks_of(capture: &Value, pid: u32) -> Vec<&Value> {
    capture["offcpu"]["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["pid"].as_u64() == Some(pid as u64))
        .collect()
}

/// Frame names of a stack, root first.
pub fn frame_names(stack: &Value) -> Vec<&str> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect()
}

/// Whether a (demangled, path-qualified) frame name is function `function`.
pub fn is_function(name: &str, function: &str) -> bool {
    name == function || name.ends_with(&format!("::{function}"))
}

/// Total blocked ns of `pid`'s stacks that pass through `function`.
pub fn blocked_ns_in(capture: &Value, pid: u32, function: &str) -> u64 {
    stacks_of(capture, pid)
        .into_iter()
        .filter(|s| frame_names(s).iter().any(|n| is_function(n, function)))
        .map(|s| s["total_ns"].as_u64().expect("total_ns"))
        .sum()
}

/// Records `diff-workload --extra-ms EXTRA` by pid for `seconds`, into `dir`.
pub fn record_diff_workload(dir: &Path, extra_ms: u64, seconds: &str, interval: &str) {
    let mut workload = Command::new(built_binary("diff-workload"))
        .args(["--extra-ms", &extra_ms.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start diff-workload");
    let mut line = String::new();
    BufReader::new(workload.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let pid = line.trim().trim_start_matches("ready ").to_string();
    let recording = Recording::start(dir, &["-p", &pid, "-d", seconds, "--interval", interval]);
    let _ = recording.wait();
    let _ = workload.kill();
    let _ = workload.wait();
}

/// Outcome of one `profiler diff`.
pub struct DiffOutcome {
    pub exit_code: i32,
    pub report: Value,
}

/// Runs `profiler diff BASE NEW --fail-on-regression -o OUT`.
pub fn run_diff(base: &Path, new: &Path, out: &Path) -> DiffOutcome {
    let output = Command::new(profiler_bin())
        .arg("diff")
        .arg(base)
        .arg(new)
        .arg("--fail-on-regression")
        .arg("-o")
        .arg(out)
        .output()
        .expect("run profiler diff");
    let code = output.status.code().expect("exit code");
    assert!(
        code == 0 || code == 1,
        "diff failed ({code}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    DiffOutcome {
        exit_code: code,
        report: serde_json::from_str(&text).expect("report json"),
    }
}

/// The first regressed function in your code, as the report ranks them.
pub fn first_regressed_user_function(report: &Value) -> Option<String> {
    report["regressions"]
        .as_array()?
        .iter()
        .find(|c| c["kind"] == "function" && c["kernel"] == false)
        .and_then(|c| c["name"].as_str())
        .map(str::to_string)
}

/// Runs `pairs` A-vs-A and A-vs-B comparisons of the diff workload (+`extra_ms` in
/// `stage_query` for B); returns (A-vs-A pairs flagged, A-vs-B pairs flagged with
/// `stage_query` named first).
pub fn diff_quality(pairs: usize, extra_ms: u64, seconds: &str, interval: &str) -> (usize, usize) {
    let dir = temp_dir("diff-quality");
    let mut false_alarms = 0;
    let mut found = 0;
    for pair in 0..pairs {
        let base = dir.join(format!("{pair}-base"));
        let same = dir.join(format!("{pair}-same"));
        let slow = dir.join(format!("{pair}-slow"));
        record_diff_workload(&base, 0, seconds, interval);
        record_diff_workload(&same, 0, seconds, interval);
        record_diff_workload(&slow, extra_ms, seconds, interval);
        let a = run_diff(&base, &same, &dir.join(format!("{pair}-diff-aa")));
        let b = run_diff(&base, &slow, &dir.join(format!("{pair}-diff-ab")));
        let flagged_aa = a.exit_code == 1;
        let named = first_regressed_user_function(&b.report);
        let caught = b.exit_code == 1
            && named
                .as_deref()
                .is_some_and(|n| n == "stage_query" || n.ends_with("::stage_query"));
        println!(
            "pair {pair}: A-vs-A {}, A-vs-B {} (first regressed function: {})",
            if flagged_aa { "FLAGGED" } else { "clean" },
            if caught { "caught" } else { "MISSED" },
            named.as_deref().unwrap_or("none")
        );
        false_alarms += usize::from(flagged_aa);
        found += usize::from(caught);
    }
    let _ = std::fs::remove_dir_all(&dir);
    (false_alarms, found)
}

/// A finished recording of `offcpu-workload`.
pub struct Recorded {
    pub dir: PathBuf,
    pub capture: Value,
    pub stdout: String,
    /// The workload's own measurement (its report).
    pub report: Value,
    pub pid: u32,
    /// The profiler's line announcing the recording.
    pub started: String,
}

/// Records `offcpu-workload` (`iterations` × 20 ms in each blocking function), selected
/// with `target_flag` (`-p` or `--tid`) and its pid, plus `extra` flags; ends with Ctrl-C
/// once the workload is done.
pub fn record_offcpu_workload(
    name: &str,
    iterations: u32,
    target_flag: &str,
    extra: &[&str],
) -> Recorded {
    record_offcpu_workload_with_env(name, iterations, target_flag, extra, &[])
}

/// `record_offcpu_workload` with `env` set for the profiler.
pub fn record_offcpu_workload_with_env(
    name: &str,
    iterations: u32,
    target_flag: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Recorded {
    require_root();
    let dir = temp_dir(name);
    let mut workload = Workload::start(iterations, 20, &dir.join("workload.json"));
    let pid = workload.pid.to_string();
    let mut args = vec!["--duration", "60s", target_flag, &pid];
    args.extend_from_slice(extra);
    let recording = Recording::start_with_env(&dir.join("out"), &args, env);
    let started = recording.started.clone();
    workload.go();
    let report = workload.finish();
    let (capture, stdout) = recording.interrupt();
    let pid = report["pid"].as_u64().expect("pid") as u32;
    Recorded {
        dir,
        capture,
        stdout,
        report,
        pid,
        started,
    }
}

/// A workload started with piped stdio that printed `ready PID` and waits for a line on
/// stdin before it works.
pub struct ReadyProcess {
    pub pid: String,
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl ReadyProcess {
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready line");
        let pid = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("workload said {line:?}"))
            .to_string();
        Self { pid, child, stdout }
    }

    /// Lets it work.
    pub fn go(&mut self) {
        let mut stdin = self.child.stdin.take().expect("go once");
        stdin.write_all(b"go\n").expect("write go");
    }

    /// Writes a line to its stdin, keeping stdin open (unlike `go`).
    pub fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write line");
        stdin.flush().expect("flush line");
    }

    /// Its next line of output, trimmed (`None` at the end).
    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim().to_string()),
        }
    }

    /// SIGKILLs it mid-work and reaps it.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL the workload");
        let status = self.child.wait().expect("wait");
        assert!(!status.success(), "the workload ended on its own: {status}");
    }

    /// Waits for it to exit successfully.
    pub fn finish(mut self) {
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "workload failed: {status}");
    }
}

/// A shared library of the system (Debian's multiarch directories first), by file name.
pub fn system_library(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("-linux-"))
        })
        .collect();
    dirs.push(PathBuf::from("/usr/lib"));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found in /usr/lib"))
}

/// Reads `child`'s standard error on a thread until a line says it is ready; kills it and
/// panics with `what` and what it said when no such line comes within `timeout`. Returns the
/// lines after that one (the thread keeps draining, so the child never blocks on a pipe).
pub fn wait_for_stderr_line(
    child: &mut Child,
    timeout: Duration,
    ready: impl Fn(&str) -> bool,
    what: &str,
) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(timeout) {
            Ok(line) if ready(&line) => return rx,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("{what}; stderr: {seen:?}");
            }
        }
    }
}

/// Where cgroup2 is mounted (`/sys/fs/cgroup` on pure-v2 hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones), from /proc/mounts.
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("cgroup2 is not mounted")
}

/// The blocking functions of `offcpu-workload`, each timed by the workload itself.
pub const FUNCTIONS: [&str; 3] = [
    "workload_pipe_read",
    "workload_nanosleep",
    "workload_futex_wait",
];

/// Each function's blocked time within ±5 % of the workload's own clock, every shortfall
/// beyond that explained by a counter of the capture:
/// - `program_misses`: the kernel skipped a program run (classic tracepoints do while any
///   bpf() syscall holds `bpf_prog_active` on that CPU — our own map reads included);
/// - `switch_in_missed` − `switch_in_missed_recovered`: a thread's switch-in never reached
///   the sched_switch program (the thread's next switch-out finds the earlier one still
///   pending; perf's own sched_switch recording misses the same switch-ins on this VM under
///   load). With its wakeup seen, the blocked part is still recorded (recovered);
/// - blocks filed under `[user stack lost: …]` when stacks collided in full stack maps
///   (`stack_collisions`, `unwind_stack_collision`: the time is kept, the stack is not).
///
/// Each block a counter explains is at most the function's longest call (the workload's
/// own clock: 20 ms asked, longer when the helper thread waits for a CPU).
pub fn assert_matches_oracle(capture: &Value, report: &Value, pid: u32) {
    let counter = |name: &str| {
        capture["metadata"]["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} counter")) as f64
    };
    let misses = counter("program_misses");
    let missed_switch_ins = counter("switch_in_missed") - counter("switch_in_missed_recovered");
    let collisions = counter("stack_collisions") + counter("unwind_stack_collision");
    let stack_lost_ns = if collisions > 0.0 {
        stacks_of(capture, pid)
            .into_iter()
            .filter(|s| {
                frame_names(s)
                    .iter()
                    .any(|n| n.starts_with("[user stack lost"))
            })
            .map(|s| s["total_ns"].as_u64().unwrap() as f64)
            .sum()
    } else {
        0.0
    };
    for function in FUNCTIONS {
        let expected = report["blocked_ns"][function].as_u64().unwrap() as f64;
        let measured = blocked_ns_in(capture, pid, function) as f64;
        let longest = report["longest_ns"][function].as_u64().unwrap() as f64;
        let explained = 0.05 * expected + (misses + missed_switch_ins) * longest + stack_lost_ns;
        println!(
            "{function}: workload measured {:.3} ms, profiler {:.3} ms ({:+.2}%); explained \
             by counters: {misses} program runs skipped, {missed_switch_ins} switch-ins \
             missed, {:.1} ms under lost stacks",
            expected / 1e6,
            measured / 1e6,
            (measured - expected) / expected * 100.0,
            stack_lost_ns / 1e6
        );
        if expected - measured > explained {
            dump_stacks(capture, pid);
        }
        assert!(
            measured <= expected * 1.05 && expected - measured <= explained,
            "{function}: profiler says {measured} ns, the workload measured {expected} ns"
        );
    }
}

/// On a failure: every stack of `pid` with its time, and the capture's counters.
pub fn dump_stacks(capture: &Value, pid: u32) {
    for stack in stacks_of(capture, pid) {
        eprintln!(
            "  {} ns x{} [{}] {}",
            stack["total_ns"],
            stack["count"],
            stack["state"],
            frame_names(stack).join(";")
        );
    }
    eprintln!("  counters: {}", capture["metadata"]["counters"]);
}
