//! User stacks of programs without frame pointers (issue 12): walked from `.eh_frame`, they
//! must name every caller down to `main`, as a real DWARF unwinder does, in every family.
//!
//! The workloads block **through libc** (`nanosleep`, `read` on a pipe, a futex through Rust's
//! `std::sync`, `std::thread::sleep`) and spin reading the clock through the vDSO, from named
//! functions that are never inlined. They are compiled here, at test time, without frame
//! pointers (`gcc -O2 -fomit-frame-pointer`; `rustc -C opt-level=2 -C force-frame-pointers=no`
//! directly, since the workspace's `.cargo/config.toml` forces frame pointers on cargo builds).
//!
//! Oracles, none of them written here:
//! - **the workload's own clock**: CLOCK_MONOTONIC around each libc call, summed per function
//!   (blocked time within ±5 %), and the thread's CPU clock around the spins (±10 %);
//! - **`perf record --call-graph dwarf`** (Debian's linux-perf, a third-party DWARF unwinder),
//!   recording the same process at the same time: the same caller chains.
//!
//! How perf is run and read. `perf record -e sched:sched_switch -e cpu-clock/period=10000000/
//! --call-graph dwarf,32768 -D 1 -p PID`: `sched:sched_switch` fires in the task that is being
//! switched out, inside its blocking syscall, so the user registers and the 32 KiB of user
//! stack perf copies are those of the blocking call — the same place the profiler's off-CPU
//! program walks (a `cpu-clock` event alone never samples a sleeping thread); `cpu-clock`
//! (100 Hz) samples the spin. `-D 1` makes perf print `Events enabled` once it is attached, which
//! the test waits for before the workload starts. `perf script --no-inline -F
//! tid,event,ip,sym,dso` prints, per sample, a header line `TID EVENT:` then one line per frame,
//! innermost first, `ADDRESS SYMBOL (DSO)`, and a blank line between samples. Inlined frames are
//! left out on both sides (the profiler marks them `inlined`).
//!
//! What is compared. The frames perf names in the workload's own file, plus libc's
//! `__libc_start_call_main` and `start_thread`, in order, outermost first. libc's other frames
//! are not compared by name: they are aliases, and perf picks the versioned dynamic symbol
//! (`clock_nanosleep@GLIBC_2.2.5`) where the debug symbols say `__GI___clock_nanosleep`. Names
//! lose what only one tool prints (symbol versions, Rust hashes, C++ parameter lists); PLT
//! stubs are skipped. Our own workloads: the profiler's chain, reduced to the names perf shows,
//! must equal one of perf's chains for the same function. Stock binaries (python3,
//! redis-server: exported symbols only, perf says `[unknown]` for the rest): perf's named
//! frames must all appear, in order, and the walk must end at `_start` as perf's does.
//! perf's own chains are checked to reach `_start` (or a thread's `start_thread`) first, so a
//! broken oracle fails loudly instead of passing.

use std::collections::{BTreeMap, BTreeSet};

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use profiler_tests::*;
use serde_json::Value;

/// The capture counters (`metadata.counters`) that say a walk could not use a table for a
/// frame and stepped by frame pointer or stopped (`profiler_common::unwind::counter::NAMES`,
/// prefixed `unwind_`).
const NO_TABLE_COUNTERS: [&str; 2] = ["unwind_no_table_file", "unwind_no_row"];
/// The capture counter of frames stepped by frame pointer.
const FP_STEPS_COUNTER: &str = "unwind_fp_steps";
/// The capture counter of user stacks walked from the tables.
const WALKS_COUNTER: &str = "unwind_walks";

/// libc frames whose names no alias hides; the only libc frames compared with perf.
const LIBC_ROOT_FRAMES: [&str; 2] = ["__libc_start_call_main", "start_thread"];

/// Where DWARF says a walk ends: a program's entry point, a thread's start (its caller,
/// `clone3`, is libc's and not compared).
const OUTERMOST_FRAMES: [&str; 2] = ["_start", "start_thread"];

/// The C workload's blocking functions, each called from `request`, called from `main`.
const C_BLOCKING: [&str; 2] = ["sleep_step", "read_step"];

// ---------------------------------------------------------------------------------------------
// Building the workloads
// ---------------------------------------------------------------------------------------------

fn workload_source(file: &str) -> String {
    format!("{}/workloads/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// `gcc FLAGS -o DIR/NAME unwind_blocking.c -lpthread`.
fn build_c(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let bin = dir.join(name);
    let output = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(workload_source("unwind_blocking.c"))
        .arg("-lpthread")
        .output()
        .expect("gcc (package gcc)");
    assert!(
        output.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    bin
}

/// The C workload as distributions build programs: optimized, no frame pointers, with the
/// `.eh_frame` every x86_64 compiler emits by default.
fn build_c_without_frame_pointers(dir: &Path, name: &str) -> PathBuf {
    build_c(dir, name, &["-O2", "-fomit-frame-pointer"])
}

fn strip(bin: &Path) {
    let status = Command::new("strip")
        .arg(bin)
        .status()
        .expect("strip (package binutils)");
    assert!(status.success());
}

/// The Rust workload, std only, without frame pointers (rustc directly: cargo would add
/// `-C force-frame-pointers=yes` from the workspace config).
fn build_rust_without_frame_pointers(dir: &Path) -> PathBuf {
    let bin = dir.join("unwind_std");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let output = Command::new(rustc)
        .args(["--edition", "2021", "-C", "opt-level=2"])
        .args(["-C", "force-frame-pointers=no", "-o"])
        .arg(&bin)
        .arg(workload_source("unwind_std.rs"))
        .output()
        .expect("rustc");
    assert!(
        output.status.success(),
        "rustc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    bin
}

// ---------------------------------------------------------------------------------------------
// Recording a workload with the profiler and perf at the same time
// ---------------------------------------------------------------------------------------------

/// What one recording gave.
struct Run {
    pid: u32,
    capture: Value,
    out: PathBuf,
    /// The workload's own measurements (`name value` lines).
    own: BTreeMap<String, f64>,
    /// perf's samples of the same process, or empty when perf was not asked for.
    perf: Vec<PerfSample>,
}

impl Run {
    fn own(&self, name: &str) -> f64 {
        *self
            .own
            .get(name)
            .unwrap_or_else(|| panic!("the workload did not report {name}: {:?}", self.own))
    }

    fn counter(&self, name: &str) -> Option<u64> {
        self.capture["metadata"]["counters"][name].as_u64()
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.out.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }
}

/// The workload's own measurements: its `name value` lines up to `done`.
fn own_report(workload: &mut ReadyProcess) -> BTreeMap<String, f64> {
    let mut own = BTreeMap::new();
    while let Some(line) = workload.line() {
        if line == "done" {
            break;
        }
        if let Some((name, value)) = line.split_once(' ')
            && let Ok(value) = value.parse::<f64>()
        {
            own.insert(name.to_string(), value);
        }
    }
    own
}

/// `record -d 120s -p PID --events offcpu -o OUT`, recording.
fn record_offcpu_of(out: &Path, pid: &str) -> Recording {
    Recording::start(out, &["-d", "120s", "-p", pid, "--events", "offcpu"])
}

/// Records `workload` (started, waiting for `go`) with `profiler record -p PID ARGS…` and,
/// if `perf`, with perf at the same time; lets it work, collects its own report up to
/// `done`, then stops both.
fn record(dir: &Path, mut workload: ReadyProcess, args: &[&str], perf: bool) -> Run {
    let pid = workload.pid.clone();
    let out = dir.join("out");
    let mut all = vec!["-d", "120s", "-p", &pid];
    all.extend_from_slice(args);
    let recording = Recording::start(&out, &all);
    let perf = perf.then(|| PerfRecording::start(dir, &pid));
    workload.go();
    let own = own_report(&mut workload);
    workload.finish();
    let (capture, _) = recording.interrupt();
    let perf = perf.map(PerfRecording::finish).unwrap_or_default();
    Run {
        pid: pid.parse().expect("numeric pid"),
        capture,
        out,
        own,
        perf,
    }
}

/// A running `perf record` of one process.
struct PerfRecording {
    child: Child,
    data: PathBuf,
}

impl PerfRecording {
    /// Starts perf on `pid` and waits until its events are enabled.
    fn start(dir: &Path, pid: &str) -> Self {
        let data = dir.join("perf.data");
        let mut child = Command::new("perf")
            .args(["record", "-e", "sched:sched_switch"])
            .args(["-e", "cpu-clock/period=10000000/"])
            .args(["--call-graph", "dwarf,32768", "-D", "1", "-p", pid, "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perf (package linux-perf)");
        wait_for_stderr_line(
            &mut child,
            Duration::from_secs(30),
            |line| line.contains("Events enabled"),
            "perf record did not start",
        );
        Self { child, data }
    }

    /// Stops perf (it also ends by itself when the process exits) and reads its samples.
    fn finish(mut self) -> Vec<PerfSample> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("wait perf");
        assert!(
            status.success() || status.code() == Some(130) || status.signal() == Some(libc::SIGINT),
            "perf record: {status}"
        );
        let output = Command::new("perf")
            .args(["script", "--no-inline", "-F", "tid,event,ip,sym,dso", "-i"])
            .arg(&self.data)
            .output()
            .expect("perf script");
        assert!(
            output.status.success(),
            "perf script: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        parse_perf_script(&String::from_utf8_lossy(&output.stdout))
    }
}

/// One perf sample: the thread, the event, and its frames innermost first.
#[derive(Debug)]
struct PerfSample {
    tid: u32,
    event: String,
    frames: Vec<PerfFrame>,
}

#[derive(Debug)]
struct PerfFrame {
    sym: String,
    dso: String,
}

impl PerfSample {
    fn is_switch(&self) -> bool {
        self.event.starts_with("sched:sched_switch")
    }

    fn has(&self, function: &str) -> bool {
        self.frames
            .iter()
            .any(|f| is_function(&normalize(&f.sym), function))
    }
}

/// Parses `perf script -F tid,event,ip,sym,dso`: a header `TID EVENT:` per sample, then
/// `ADDRESS SYMBOL (DSO)` lines (symbols may hold spaces, DSOs are in the last parentheses).
fn parse_perf_script(text: &str) -> Vec<PerfSample> {
    let mut samples = Vec::new();
    for block in text.split("\n\n") {
        let mut lines = block.lines().filter(|l| !l.trim().is_empty());
        let Some(header) = lines.next() else { continue };
        let mut words = header.split_whitespace();
        let (Some(tid), Some(event)) = (words.next(), words.next()) else {
            panic!("perf script header {header:?}");
        };
        let frames = lines
            .map(|line| {
                let (_address, rest) = line.trim().split_once(' ').expect("perf frame line");
                let (sym, dso) = rest.rsplit_once(" (").expect("perf frame dso");
                PerfFrame {
                    sym: sym.trim().to_string(),
                    dso: dso.trim_end_matches(')').to_string(),
                }
            })
            .collect();
        samples.push(PerfSample {
            tid: tid.parse().expect("perf tid"),
            event: event.trim_end_matches(':').to_string(),
            frames,
        });
    }
    samples
}

/// A symbol without what only one of the two tools prints: a symbol version
/// (`@@GLIBC_2.34`), a Rust legacy hash (`::h0123456789abcdef`), a C++ parameter list
/// (blazesym demangles `f(long)`, perf `f`).
fn normalize(name: &str) -> String {
    let mut name = name.split('@').next().unwrap_or(name);
    if name.ends_with(')') {
        let mut depth = 0;
        for (at, c) in name.char_indices().rev() {
            match c {
                ')' => depth += 1,
                '(' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                name = &name[..at];
                break;
            }
        }
    }
    match name.rsplit_once("::h") {
        Some((path, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            path.to_string()
        }
        _ => name.to_string(),
    }
}

fn same_file(dso: &str, exe: &Path) -> bool {
    let canonical = exe.canonicalize().unwrap_or_else(|_| exe.to_path_buf());
    Path::new(dso) == canonical || Path::new(dso) == exe
}

/// perf's chain of a sample, outermost first, reduced to what is compared: the frames it
/// names in `exe`, and libc's frames that no alias hides. PLT stubs (`clock_gettime@plt`,
/// where a sample rarely lands) are left out: not a caller, and named differently by each tool.
fn perf_chain(sample: &PerfSample, exe: &Path) -> Vec<String> {
    sample
        .frames
        .iter()
        .rev()
        .filter(|f| f.sym != "[unknown]" && !f.sym.ends_with("@plt"))
        .filter(|f| same_file(&f.dso, exe) || LIBC_ROOT_FRAMES.contains(&f.sym.as_str()))
        .map(|f| normalize(&f.sym))
        .collect()
}

/// The user frames of a profiler stack that are real frames (not inlined), root first.
fn user_frames(stack: &Value) -> Vec<&Value> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .filter(|f| f["kind"] == "user" && f["inlined"] != true)
        .collect()
}

fn user_names(stack: &Value) -> Vec<String> {
    user_frames(stack)
        .iter()
        .map(|f| normalize(f["name"].as_str().expect("name")))
        .collect()
}

fn kernel_has(stack: &Value, function: &str) -> bool {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .any(|f| f["kind"] == "kernel" && f["name"] == function)
}

/// A stack blocked in a syscall (not a preemption in the program's own code).
fn in_syscall(stack: &Value) -> bool {
    frame_names(stack)
        .iter()
        .any(|n| n.starts_with("entry_SYSCALL"))
}

/// The profiler's chain reduced like `perf_chain`: to the names perf compares.
fn reduced(names: &[String], compared: &BTreeSet<String>) -> Vec<String> {
    names
        .iter()
        .filter(|n| compared.contains(*n))
        .cloned()
        .collect()
}

/// Whether `chain` holds `expected` one right after another.
fn holds_in_a_row(chain: &[String], expected: &[&str]) -> bool {
    chain.windows(expected.len()).any(|w| {
        w.iter()
            .zip(expected)
            .all(|(name, function)| is_function(name, function))
    })
}

/// All stacks of `family` of `pid`.
fn family_stacks<'a>(capture: &'a Value, family: &str, pid: u32) -> Vec<&'a Value> {
    capture[family]["stacks"]
        .as_array()
        .unwrap_or_else(|| panic!("no {family} stacks in the capture"))
        .iter()
        .filter(|s| s["pid"].as_u64() == Some(pid as u64))
        .collect()
}

fn describe(stacks: &[&Value]) -> String {
    // Stacks that differ only in thread or state merged; the heaviest first, at most 12.
    let mut by_path: BTreeMap<String, (u64, u64, BTreeSet<String>)> = BTreeMap::new();
    for stack in stacks {
        let entry = by_path.entry(frame_names(stack).join(";")).or_default();
        entry.0 += stack["total_ns"].as_u64().unwrap_or(0);
        entry.1 += stack["count"].as_u64().unwrap_or(0);
        entry
            .2
            .insert(stack["state"].as_str().unwrap_or("").to_string());
    }
    let mut paths: Vec<_> = by_path.into_iter().collect();
    paths.sort_by_key(|p| std::cmp::Reverse((p.1.0, p.1.1)));
    let mut text: Vec<String> = paths
        .iter()
        .take(12)
        .map(|(path, (ns, count, states))| {
            format!("  {:.1} ms, {count}x {states:?} {path}", *ns as f64 / 1e6)
        })
        .collect();
    if paths.len() > 12 {
        text.push(format!("  … {} more", paths.len() - 12));
    }
    text.join("\n")
}

// ---------------------------------------------------------------------------------------------
// Assertions shared by the tests
// ---------------------------------------------------------------------------------------------

/// Blocked time through `function` within ±5 % of the workload's own clock (`own_key`).
fn assert_blocked_time(run: &Run, function: &str, own_key: &str) {
    let expected = run.own(own_key);
    let measured = blocked_ns_in(&run.capture, run.pid, function) as f64;
    println!(
        "{function}: workload {:.1} ms, profiler {:.1} ms ({:+.1} %)",
        expected / 1e6,
        measured / 1e6,
        (measured / expected - 1.0) * 100.0
    );
    assert!(
        (measured - expected).abs() <= 0.05 * expected,
        "{function}: the profiler has {:.1} ms in stacks through it, the workload measured \
         {:.1} ms; the process's stacks:\n{}",
        measured / 1e6,
        expected / 1e6,
        describe(&family_stacks(&run.capture, "offcpu", run.pid))
    );
}

/// Every off-CPU stack blocked in a syscall under `function` has `callers` (outermost first,
/// ending with `function`) one right after another; with `calls_out_of`, the frame under
/// `function` is in another file (libc): no frame lost between the program and libc.
fn assert_caller_chain(run: &Run, calls_out_of: Option<&Path>, callers: &[&str]) {
    let function = *callers.last().expect("a function");
    let stacks: Vec<&Value> = family_stacks(&run.capture, "offcpu", run.pid)
        .into_iter()
        .filter(|s| in_syscall(s))
        .filter(|s| user_names(s).iter().any(|n| is_function(n, function)))
        .collect();
    assert!(
        !stacks.is_empty(),
        "no off-CPU stack blocked in a syscall passes through {function}; the process's \
         stacks:\n{}",
        describe(&family_stacks(&run.capture, "offcpu", run.pid))
    );
    let exe = calls_out_of.map(|exe| exe.canonicalize().expect("workload path"));
    for stack in stacks {
        let names = user_names(stack);
        assert!(
            holds_in_a_row(&names, callers),
            "expected {} in a row in {names:?}",
            callers.join(";")
        );
        let Some(exe) = &exe else { continue };
        let frames = user_frames(stack);
        let at = names
            .iter()
            .rposition(|n| is_function(n, function))
            .expect("function");
        let callee = frames
            .get(at + 1)
            .unwrap_or_else(|| panic!("{function} is the leaf of {names:?}"));
        assert_ne!(
            callee["module"].as_str().map(Path::new),
            Some(exe.as_path()),
            "{function} must call into libc: {names:?}"
        );
    }
}

/// perf's chains of the blocking calls through `function`, reduced to the compared names; the
/// oracle itself must reach `outermost` (else the comparison proves nothing).
fn perf_chains(run: &Run, exe: &Path, function: &str, switch: bool) -> BTreeSet<Vec<String>> {
    let chains: BTreeSet<Vec<String>> = run
        .perf
        .iter()
        .filter(|s| s.is_switch() == switch && s.has(function))
        .map(|s| perf_chain(s, exe))
        .collect();
    assert!(
        !chains.is_empty(),
        "perf has no {} sample through {function}: the oracle did not work",
        if switch { "sched_switch" } else { "cpu-clock" }
    );
    chains
}

/// The profiler's stacks through `function` in `family` have perf's chains (reduced to the
/// names perf shows in `exe` and libc's unaliased root frames), exactly.
fn assert_same_chains_as_perf(run: &Run, exe: &Path, family: &str, function: &str) {
    let switch = family == "offcpu";
    let expected = perf_chains(run, exe, function, switch);
    for chain in &expected {
        assert!(
            chain
                .first()
                .is_some_and(|f| OUTERMOST_FRAMES.contains(&f.as_str())),
            "perf's own chain is incomplete: {chain:?}"
        );
    }
    let compared: BTreeSet<String> = expected.iter().flatten().cloned().collect();
    let stacks: Vec<&Value> = family_stacks(&run.capture, family, run.pid)
        .into_iter()
        .filter(|s| !switch || in_syscall(s))
        .filter(|s| user_names(s).iter().any(|n| is_function(n, function)))
        .collect();
    assert!(
        !stacks.is_empty(),
        "no {family} stack through {function} (perf: {expected:?}); the process's stacks:\n{}",
        describe(&family_stacks(&run.capture, family, run.pid))
    );
    for stack in stacks {
        let ours = reduced(&user_names(stack), &compared);
        println!("{family} {function}: profiler {ours:?}");
        assert!(
            expected.contains(&ours),
            "{family} stack through {function}: the profiler has {ours:?}, perf (DWARF) has \
             {expected:?}; full stack: {}",
            frame_names(stack).join(";")
        );
    }
}

/// A folded line through `function` shows `callers` (outermost first) in a row.
fn assert_folded(run: &Run, file: &str, callers: &[&str]) {
    let folded = run.read(file);
    let function = callers.last().expect("a function");
    let wanted = format!(";{};", callers.join(";"));
    let lines: Vec<&str> = folded
        .lines()
        .filter(|l| l.contains(&format!(";{function};")))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains(&wanted)),
        "no line of {file} holds {wanted}; lines through {function}: {lines:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// C built `-O2 -fomit-frame-pointer`, blocking in `nanosleep` and in `read` on a pipe through
/// libc: each blocked stack is `main;request;sleep_step|read_step;<libc>`, perf's DWARF chains
/// are the same, and the time per function matches the workload's clock (±5 %).
#[test]
fn c_without_frame_pointers_blocked_in_libc_keeps_every_caller() {
    require_root();
    let dir = temp_dir("unwind-c-nofp");
    let bin = build_c_without_frame_pointers(&dir, "unwind_nofp");
    let workload = ReadyProcess::spawn(Command::new(&bin).args(["50", "0"]));
    let run = record(&dir, workload, &["--events", "offcpu"], true);
    for function in C_BLOCKING {
        assert_same_chains_as_perf(&run, &bin, "offcpu", function);
        assert_caller_chain(&run, Some(&bin), &["main", "request", function]);
        assert_blocked_time(&run, function, &format!("{function}_ns"));
        assert_folded(&run, "offcpu.folded", &["main", "request", function]);
    }
    // The feeding thread: its blocked stacks start at libc's start_thread, as perf's do.
    assert_same_chains_as_perf(&run, &bin, "offcpu", "feed_pipe");
}

/// The target SIGKILLed mid-capture: the stacks it blocked in while it lived are still
/// walked and named — perf's chains, under main → request — though it is gone when the
/// capture is symbolized. Its main thread always waits in a libc call, so its blocked time
/// under main → request is what the test's clock saw it live, less the microseconds of work
/// per request and its reading of `go`: at most that, and not 10 % less (here 1486.8 of
/// 1502.2 ms); a lost symbolization or lost intervals fall far below.
#[test]
fn a_target_killed_mid_capture_is_still_symbolized() {
    require_root();
    let dir = temp_dir("unwind-killed");
    let bin = build_c_without_frame_pointers(&dir, "unwind_killed");
    // Far more requests than it lives for.
    let mut workload = ReadyProcess::spawn(Command::new(&bin).args(["100000", "0"]));
    let pid = workload.pid.clone();
    let out = dir.join("out");
    let recording = record_offcpu_of(&out, &pid);
    let perf = PerfRecording::start(&dir, &pid);
    workload.go();
    let began = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    workload.kill();
    let lived = began.elapsed().as_nanos() as u64;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (capture, _) = recording.interrupt();
    let run = Run {
        pid: pid.parse().expect("numeric pid"),
        capture,
        out,
        own: BTreeMap::new(),
        perf: perf.finish(),
    };
    for function in C_BLOCKING {
        assert_same_chains_as_perf(&run, &bin, "offcpu", function);
        assert_caller_chain(&run, Some(&bin), &["main", "request", function]);
    }
    let main_blocked: u64 = family_stacks(&run.capture, "offcpu", run.pid)
        .into_iter()
        .filter(|s| s["tid"].as_u64() == Some(u64::from(run.pid)))
        .filter(|s| {
            let names = user_names(s);
            C_BLOCKING
                .iter()
                .any(|f| holds_in_a_row(&names, &["main", "request", f]))
        })
        .map(|s| s["total_ns"].as_u64().expect("total_ns"))
        .sum();
    println!(
        "killed after {:.1} ms by the test's clock; its main thread blocked {:.1} ms in \
         main → request → sleep_step/read_step",
        lived as f64 / 1e6,
        main_blocked as f64 / 1e6
    );
    assert!(
        main_blocked <= lived && main_blocked as f64 >= 0.9 * lived as f64,
        "blocked {main_blocked} ns of {lived} ns alive"
    );
}

/// A process that execs while recorded: it blocks as a shell first (dash: its maps, name and
/// tables are read), then 100 ms after `go` becomes the C program in the same process, which
/// waits for its own `go` (its first-seen block: as for any new program, that walk precedes
/// its tables). The program's stacks are then walked with its own tables and named from its
/// own maps — the chains under main → request, blocked time within 5 % of its own clock —
/// and the process bears its name. Without the exec notice the shell's tables, maps and name
/// stayed: reloads are at most every 250 ms and map reads every 500 ms, and both had just
/// happened.
#[test]
fn a_process_that_execs_is_walked_and_named_as_its_new_program() {
    require_root();
    let dir = temp_dir("unwind-exec");
    let bin = build_c_without_frame_pointers(&dir, "unwind_exec");
    let mut workload = ReadyProcess::spawn(
        Command::new("/bin/sh")
            .arg("-c")
            .arg("echo ready $$; read line; sleep 0.1; exec \"$0\" 20 0")
            .arg(&bin),
    );
    let pid = workload.pid.clone();
    let out = dir.join("out");
    let recording = record_offcpu_of(&out, &pid);
    workload.say("go");
    // The program's own `ready PID`: the same process.
    assert_eq!(workload.line(), Some(format!("ready {pid}")));
    std::thread::sleep(std::time::Duration::from_millis(300));
    workload.go();
    let own = own_report(&mut workload);
    workload.finish();
    let (capture, _) = recording.interrupt();
    let run = Run {
        pid: pid.parse().expect("numeric pid"),
        capture,
        out,
        own,
        perf: Vec::new(),
    };
    for function in C_BLOCKING {
        assert_caller_chain(&run, Some(&bin), &["main", "request", function]);
        assert_blocked_time(&run, function, &format!("{function}_ns"));
    }
    let comm = run.capture["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(run.pid)))
        .map(|p| p["comm"].clone());
    assert_eq!(comm, Some(Value::from("unwind_exec")));
    assert_eq!(run.counter("unwind_processes_execd"), Some(1));
}

/// A program in a mount namespace of its own, as a container's are, run from a path where
/// the host has a *different* build: two builds of the C workload with the same code and
/// layout, only their function names differ (`hostx_…` on the host, `ownxx_…` bind-mounted
/// over it inside the namespace). Its frames must come from its own file (the profiler reads
/// it through /proc/PID/map_files, not the host's path): `ownxx_` names under main → request,
/// blocked time within 5 % of its own clock, and no `hostx_` name anywhere.
#[test]
fn a_process_in_its_own_mount_namespace_is_symbolized_from_its_own_file() {
    require_root();
    let dir = temp_dir("unwind-mountns");
    let build = |name: &str, prefix: &str| {
        build_c(
            &dir,
            name,
            &[
                "-O2",
                "-fomit-frame-pointer",
                &format!("-Dsleep_step={prefix}_sleep_step"),
                &format!("-Dread_step={prefix}_read_step"),
            ],
        )
    };
    let host = build("host-build", "hostx");
    let own = build("own-build", "ownxx");
    let path = dir.join("app");
    std::fs::copy(&host, &path).expect("the host's build at the path");
    let script = format!(
        "mount --bind {} {} && exec {} 40 0",
        own.display(),
        path.display(),
        path.display()
    );
    let mut workload = ReadyProcess::spawn(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script),
    );
    let pid = workload.pid.clone();
    // Its executable is `path` as it sees it; the host's `path` is the other build.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe"),
        path
    );
    let out = dir.join("out");
    let recording = record_offcpu_of(&out, &pid);
    workload.go();
    let own_clock = own_report(&mut workload);
    workload.finish();
    let (capture, _) = recording.interrupt();
    let run = Run {
        pid: pid.parse().expect("numeric pid"),
        capture,
        out,
        own: own_clock,
        perf: Vec::new(),
    };
    let every_name: Vec<String> = family_stacks(&run.capture, "offcpu", run.pid)
        .iter()
        .flat_map(|s| user_names(s))
        .collect();
    assert!(
        !every_name.iter().any(|n| n.contains("hostx_")),
        "a frame named from the host's file: {every_name:?}"
    );
    for (function, clock) in [
        ("ownxx_sleep_step", "sleep_step_ns"),
        ("ownxx_read_step", "read_step_ns"),
    ] {
        assert_caller_chain(&run, None, &["main", "request", function]);
        assert_blocked_time(&run, function, clock);
    }
}

/// The same C program spinning on `clock_gettime` (libc → vDSO) inside `spin_clock`: on-CPU
/// samples keep `main;spin_clock` under the vDSO and libc frames, as perf's cpu-clock samples
/// do, and the wall-clock view's running time under them matches the thread's own CPU clock
/// (±10 %).
#[test]
fn c_without_frame_pointers_spinning_in_the_vdso_keeps_its_caller() {
    require_root();
    let dir = temp_dir("unwind-c-spin");
    let bin = build_c_without_frame_pointers(&dir, "unwind_spin");
    let workload = ReadyProcess::spawn(Command::new(&bin).args(["0", "20"]));
    let run = record(&dir, workload, &["--events", "offcpu,oncpu"], true);
    assert_same_chains_as_perf(&run, &bin, "oncpu", "spin_clock");

    // Nearly every sample of the main thread is the spin, and names its caller.
    let main_thread: Vec<&Value> = family_stacks(&run.capture, "oncpu", run.pid)
        .into_iter()
        .filter(|s| s["tid"].as_u64() == Some(run.pid as u64))
        .collect();
    let count = |s: &&Value| s["count"].as_u64().expect("count");
    let total: u64 = main_thread.iter().map(count).sum();
    let named: u64 = main_thread
        .iter()
        .filter(|s| holds_in_a_row(&user_names(s), &["main", "spin_clock"]))
        .map(count)
        .sum();
    println!("on-CPU samples of the main thread: {total}, under main;spin_clock: {named}");
    assert!(
        total > 0 && named as f64 >= 0.9 * total as f64,
        "{named} of {total} on-CPU samples are under main;spin_clock; the thread's stacks:\n{}",
        describe(&main_thread)
    );

    // Wall-clock view: running time under main;spin_clock vs the thread's CPU clock.
    let folded = run.read("wallclock.folded");
    let prefix = format!("[tid {}];", run.pid);
    let running_us: f64 = folded
        .lines()
        .filter(|l| l.contains(&prefix) && l.contains(";main;spin_clock;"))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(path, _)| path.ends_with(";[running]"))
        .map(|(_, us)| us.parse::<f64>().expect("microseconds"))
        .sum();
    let cpu_us = run.own("spin_clock_cpu_ns") / 1e3;
    println!(
        "wall-clock view: running under main;spin_clock {running_us} us, thread CPU {cpu_us} us"
    );
    assert!(
        (running_us - cpu_us).abs() <= 0.10 * cpu_us,
        "running under main;spin_clock: {running_us} us, the workload's CPU clock: {cpu_us} us"
    );
}

/// Rust built with `-C force-frame-pointers=no`, blocking on a futex through `std::sync`'s
/// Condvar and in `std::thread::sleep`: each blocked stack is
/// `unwind_std::main;serve;wait_for_signal|nap;…` down to C's `main`, perf's chains are the same,
/// and the time per function matches the workload's `Instant` (±5 %).
#[test]
fn rust_without_frame_pointers_blocked_in_std_keeps_every_caller() {
    require_root();
    let dir = temp_dir("unwind-rust");
    let bin = build_rust_without_frame_pointers(&dir);
    let workload = ReadyProcess::spawn(Command::new(&bin).arg("50"));
    let run = record(&dir, workload, &["--events", "offcpu"], true);
    for function in ["wait_for_signal", "nap"] {
        assert_same_chains_as_perf(&run, &bin, "offcpu", function);
        // (Its callee is std's, in the same file: `Condvar::wait`, `thread::sleep`.)
        assert_caller_chain(&run, None, &["unwind_std::main", "serve", function]);
        // Below the program's main, std's start-up reaches the C `main` symbol.
        for stack in family_stacks(&run.capture, "offcpu", run.pid)
            .into_iter()
            .filter(|s| in_syscall(s) && user_names(s).iter().any(|n| is_function(n, function)))
        {
            let names = user_names(stack);
            let program_main = names.iter().position(|n| n == "unwind_std::main");
            let c_main = names.iter().position(|n| n == "main");
            assert!(
                matches!((c_main, program_main), (Some(c), Some(p)) if c < p),
                "no C main below unwind_std::main: {names:?}"
            );
        }
        assert_blocked_time(&run, function, &format!("{function}_ns"));
    }
}

/// The dropped-caller case: a C program built *with* frame pointers that blocks through libc
/// (which has none). A frame-pointer walk starting in libc skips the function that called it
/// (`sleep_step`), merging its time into `request`; the stack must name it.
#[test]
fn frame_pointer_program_names_the_function_that_called_libc() {
    require_root();
    let dir = temp_dir("unwind-c-fp");
    let bin = build_c(&dir, "unwind_fp", &["-O2", "-fno-omit-frame-pointer"]);
    let workload = ReadyProcess::spawn(Command::new(&bin).args(["50", "0"]));
    let run = record(&dir, workload, &["--events", "offcpu"], true);
    for function in C_BLOCKING {
        assert_same_chains_as_perf(&run, &bin, "offcpu", function);
        assert_caller_chain(&run, Some(&bin), &["main", "request", function]);
        assert_blocked_time(&run, function, &format!("{function}_ns"));
    }
}

/// Debian's own python3 (no frame pointers, no symbol table: only exported symbols) sleeping
/// in `time.sleep`: its blocked stacks reach `_start` through `__libc_start_call_main`, with
/// every frame perf's DWARF mode names in python3 in the same order (each eval-loop frame as
/// the Python frames it ran), and the sleep time matches Python's own `time.monotonic_ns()`
/// (±5 %).
#[test]
fn stock_python3_sleep_stacks_reach_start_like_perf() {
    require_root();
    let dir = temp_dir("unwind-python");
    let python = Path::new("/usr/bin/python3")
        .canonicalize()
        .expect("/usr/bin/python3 (package python3)");
    const SCRIPT: &str = "import os, sys, time\n\
        print('ready', os.getpid(), flush=True)\n\
        sys.stdin.readline()\n\
        total = 0\n\
        for _ in range(50):\n\
        \x20   start = time.monotonic_ns()\n\
        \x20   time.sleep(0.02)\n\
        \x20   total += time.monotonic_ns() - start\n\
        print('sleep_ns', total, flush=True)\n\
        print('done', flush=True)\n";
    let workload = ReadyProcess::spawn(Command::new(&python).args(["-I", "-c", SCRIPT]));
    let run = record(&dir, workload, &["--events", "offcpu"], true);

    let stacks = assert_reaches_start_like_perf(
        &run.capture,
        &run.perf,
        run.pid,
        &python,
        "do_nanosleep",
        &["__libc_start_call_main", "Py_BytesMain"],
    );
    let measured: f64 = stacks
        .iter()
        .map(|s| s["total_ns"].as_u64().expect("total_ns") as f64)
        .sum();
    let own = run.own("sleep_ns");
    println!(
        "python3 sleeps: workload {:.1} ms, profiler {:.1} ms",
        own / 1e6,
        measured / 1e6
    );
    assert!((measured - own).abs() <= 0.05 * own, "{measured} vs {own}");
}

/// The slow-syscall family takes its user stacks the same way: each of the C workload's
/// `nanosleep` calls (10 ms, over a 5 ms threshold) keeps `main;request;sleep_step` under
/// `[syscall clock_nanosleep]`, and there are as many as the workload made (its own count).
#[test]
fn slow_syscall_stacks_without_frame_pointers_keep_every_caller() {
    require_root();
    const ITERATIONS: u64 = 30;
    let dir = temp_dir("unwind-syscalls");
    let bin = build_c_without_frame_pointers(&dir, "unwind_sys");
    let workload = ReadyProcess::spawn(Command::new(&bin).args([&ITERATIONS.to_string(), "0"]));
    let args = ["--events", "syscalls", "--slow-syscall", "5ms"];
    let run = record(&dir, workload, &args, false);
    assert_eq!(run.own("requests"), ITERATIONS as f64);
    let slow: Vec<&Value> = run.capture["syscalls"]["slow"]
        .as_array()
        .expect("slow syscall stacks")
        .iter()
        .filter(|s| s["pid"].as_u64() == Some(run.pid as u64))
        .collect();
    let sleeps: Vec<&Value> = slow
        .iter()
        .copied()
        .filter(|s| frame_names(s).last() == Some(&"[syscall clock_nanosleep]"))
        .filter(|s| s["tid"].as_u64() == Some(run.pid as u64))
        .collect();
    let calls: u64 = sleeps.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(
        calls,
        ITERATIONS,
        "slow clock_nanosleep calls of the main thread; its slow stacks:\n{}",
        describe(&slow)
    );
    for stack in sleeps {
        let names = user_names(stack);
        assert!(
            holds_in_a_row(&names, &["main", "request", "sleep_step"]),
            "slow clock_nanosleep without its callers: {}",
            frame_names(stack).join(";")
        );
    }
}

/// A stock binary's main thread, blocked under kernel function `blocked_in`: perf's chains
/// of those waits must reach `_start` and hold `landmarks` (else the oracle proves nothing);
/// each of the profiler's stacks of those waits starts at `_start` and holds every frame perf
/// names, in perf's order (the profiler may name more: perf's `[unknown]`s). Returns the
/// profiler's stacks.
fn assert_reaches_start_like_perf<'a>(
    capture: &'a Value,
    perf: &[PerfSample],
    pid: u32,
    exe: &Path,
    blocked_in: &str,
    landmarks: &[&str],
) -> Vec<&'a Value> {
    let expected: BTreeSet<Vec<String>> = perf
        .iter()
        .filter(|s| s.is_switch() && s.tid == pid && s.frames.iter().any(|f| f.sym == blocked_in))
        .map(|s| perf_chain(s, exe))
        .collect();
    assert!(
        !expected.is_empty(),
        "perf has no sample of the main thread in {blocked_in}"
    );
    for chain in &expected {
        assert_eq!(
            chain.first().map(String::as_str),
            Some("_start"),
            "perf's own chain is incomplete: {chain:?}"
        );
        for landmark in landmarks {
            assert!(chain.iter().any(|n| n == landmark), "{landmark}: {chain:?}");
        }
    }
    let stacks: Vec<&Value> = family_stacks(capture, "offcpu", pid)
        .into_iter()
        .filter(|s| s["tid"].as_u64() == Some(pid as u64) && kernel_has(s, blocked_in))
        .collect();
    assert!(
        !stacks.is_empty(),
        "no stack of the main thread in {blocked_in}; the process's stacks:\n{}",
        describe(&family_stacks(capture, "offcpu", pid))
    );
    for stack in &stacks {
        let names = user_names(stack);
        // A CPython eval-loop frame is shown as the Python frames it ran (`py::…`, walked by
        // the kernel from the interpreter's own frames, checked against py-spy in jit.rs).
        let matches_perf = expected.iter().any(|chain| {
            let mut ours = names.iter();
            chain.iter().all(|name| {
                ours.any(|n| {
                    n == name || (name == "_PyEval_EvalFrameDefault" && n.starts_with("py::"))
                })
            })
        });
        assert!(
            matches_perf && names.first().map(String::as_str) == Some("_start"),
            "{} in {blocked_in}: the profiler has {names:?}, perf (DWARF) has {expected:?}",
            exe.display()
        );
    }
    stacks
}

/// Debian's redis-server (no frame pointers; stripped, so only its exported symbols) under
/// `redis-benchmark`: the main thread's waits in `epoll_wait` reach `_start` through `main`,
/// `aeMain` and libc's start-up, with every frame perf's DWARF mode names, in order.
#[test]
fn stock_redis_server_event_loop_stacks_reach_start_like_perf() {
    require_root();
    let dir = temp_dir("unwind-redis");
    // A link to redis-check-rdb, which acts by the name it is started under: start it by the
    // link, compare frames in the file.
    let server_path = Path::new("/usr/bin/redis-server");
    let redis = server_path
        .canonicalize()
        .expect("/usr/bin/redis-server (package redis-server)");
    let socket = dir.join("redis.sock");
    let mut server = Command::new(server_path)
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
        ])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        socket.exists(),
        "redis-server did not open {}",
        socket.display()
    );
    let pid = server.id();
    let recording = Recording::start(
        &dir.join("out"),
        &["-d", "120s", "-p", &pid.to_string(), "--events", "offcpu"],
    );
    let perf = PerfRecording::start(&dir, &pid.to_string());
    let benchmark = Command::new("redis-benchmark")
        .arg("-s")
        .arg(&socket)
        .args(["-n", "20000", "-c", "4", "-t", "set,get", "-q"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-benchmark (package redis-tools)");
    let (capture, _) = recording.interrupt();
    let perf = perf.finish();
    let _ = server.kill();
    let _ = server.wait();
    assert!(benchmark.success(), "redis-benchmark: {benchmark}");
    assert_reaches_start_like_perf(
        &capture,
        &perf,
        pid,
        &redis,
        "do_epoll_wait",
        &["__libc_start_call_main", "main", "aeMain"],
    );
}

/// A stripped binary keeps `.eh_frame` (it is loaded code's metadata, not debug info): its
/// stacks must still be walked through it to libc's start-up, each of its frames shown as
/// `file+0xoffset` and marked unresolved. Oracle: the unstripped build's symbol table (`nm`),
/// in which the offsets are `main`, `request` and `sleep_step` in a row under
/// `__libc_start_call_main`; and the workload's clock for the sleeps (±5 %).
#[test]
fn stripped_binary_is_unwound_and_its_frames_shown_unresolved() {
    require_root();
    let dir = temp_dir("unwind-stripped");
    let symbols_from = build_c_without_frame_pointers(&dir, "unwind_symbols");
    let bin = dir.join("unwind_strip");
    std::fs::copy(&symbols_from, &bin).expect("copy");
    strip(&bin);
    let symbols = function_symbols(&symbols_from);
    let workload = ReadyProcess::spawn(Command::new(&bin).args(["30", "0"]));
    let run = record(&dir, workload, &["--events", "offcpu"], false);

    let stacks: Vec<&Value> = family_stacks(&run.capture, "offcpu", run.pid)
        .into_iter()
        .filter(|s| s["tid"].as_u64() == Some(run.pid as u64) && kernel_has(s, "do_nanosleep"))
        .collect();
    assert!(!stacks.is_empty(), "no stack of the sleeps");
    let measured: u64 = stacks.iter().map(|s| s["total_ns"].as_u64().unwrap()).sum();
    let own = run.own("sleep_step_ns");
    assert!(
        (measured as f64 - own).abs() <= 0.05 * own,
        "sleeps: profiler {measured} ns, workload {own} ns"
    );
    let canonical = bin.canonicalize().unwrap();
    for stack in stacks {
        // The stack's frames in the stripped file, named by the unstripped symbol table.
        let ours: Vec<String> = user_frames(stack)
            .iter()
            .map(|f| {
                let in_binary = f["module"].as_str().map(Path::new) == Some(canonical.as_path());
                if !in_binary {
                    return normalize(f["name"].as_str().unwrap());
                }
                assert_eq!(f["unresolved"], true, "a stripped file has no symbols: {f}");
                let offset = f["offset"].as_u64().expect("offset");
                // Return addresses point just past the call: look up the byte before.
                symbol_at(&symbols, offset.saturating_sub(1))
                    .map_or_else(|| format!("?+{offset:#x}"), str::to_string)
            })
            .collect();
        assert!(
            holds_in_a_row(
                &ours,
                &["__libc_start_call_main", "main", "request", "sleep_step"]
            ),
            "stripped binary: the profiler's frames read as {ours:?} (full stack: {})",
            frame_names(stack).join(";")
        );
    }
    assert!(run.counter("unresolved_user_frames").unwrap_or(0) > 0);
}

/// A program with no unwind tables for its code (`-fno-asynchronous-unwind-tables
/// -fno-unwind-tables -Wl,--no-eh-frame-hdr`, stripped) and no frame pointers: no walker can
/// get past its frames. The profiler must still record it — every blocked nanosecond, under
/// the frames it could walk — and count why the walk fell back or stopped.
#[test]
fn binary_without_unwind_tables_is_recorded_and_the_fallback_counted() {
    require_root();
    let dir = temp_dir("unwind-no-eh-frame");
    let bin = build_c(
        &dir,
        "unwind_noeh",
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-asynchronous-unwind-tables",
            "-fno-unwind-tables",
            "-Wl,--no-eh-frame-hdr",
        ],
    );
    strip(&bin);
    let sections = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(&bin)
        .output()
        .expect("readelf");
    assert!(
        !String::from_utf8_lossy(&sections.stdout).contains(".eh_frame_hdr"),
        "the build still has .eh_frame_hdr"
    );
    let workload = ReadyProcess::spawn(Command::new(&bin).args(["30", "0"]));
    let run = record(&dir, workload, &["--events", "offcpu"], false);

    let sleeps: Vec<&Value> = family_stacks(&run.capture, "offcpu", run.pid)
        .into_iter()
        .filter(|s| s["tid"].as_u64() == Some(run.pid as u64) && kernel_has(s, "do_nanosleep"))
        .collect();
    let measured: u64 = sleeps.iter().map(|s| s["total_ns"].as_u64().unwrap()).sum();
    let own = run.own("sleep_step_ns");
    println!(
        "sleeps without unwind tables: profiler {measured} ns, workload {own} ns; stacks:\n{}",
        describe(&sleeps)
    );
    assert!(
        (measured as f64 - own).abs() <= 0.05 * own,
        "sleeps: profiler {measured} ns, workload {own} ns"
    );
    // The walk got as far as libc's frames (libc has tables).
    for stack in &sleeps {
        assert!(
            !user_frames(stack).is_empty(),
            "no user frame at all: {stack}"
        );
    }
    let counters = &run.capture["metadata"]["counters"];
    let walks = run.counter(WALKS_COUNTER);
    let no_table: Option<u64> = NO_TABLE_COUNTERS.iter().map(|name| run.counter(name)).sum();
    let fp_steps = run.counter(FP_STEPS_COUNTER);
    assert!(
        walks.is_some_and(|n| n > 0),
        "counter {WALKS_COUNTER}: no walk from tables counted: {counters}"
    );
    assert!(
        no_table.is_some_and(|n| n > 0),
        "counters {NO_TABLE_COUNTERS:?}: frames without a table not counted: {counters}"
    );
    assert!(
        fp_steps.is_some_and(|n| n > 0),
        "counter {FP_STEPS_COUNTER}: frame-pointer fallback not counted: {counters}"
    );
}

/// A binary deleted while it runs (as after a package upgrade): the path in
/// /proc/PID/maps ends in `(deleted)` and cannot be opened, but `/proc/PID/map_files/` still
/// can. Its stacks must be walked and symbolized all the same: `main;request;sleep_step|
/// read_step` in a row, with the workload's blocked time (±5 %).
#[test]
fn deleted_binary_is_unwound_and_symbolized() {
    require_root();
    let dir = temp_dir("unwind-deleted");
    let bin = build_c_without_frame_pointers(&dir, "unwind_deleted");
    let workload = ReadyProcess::spawn(Command::new(&bin).args(["50", "0"]));
    std::fs::remove_file(&bin).expect("delete the running binary");
    let exe = std::fs::read_link(format!("/proc/{}/exe", workload.pid)).expect("exe link");
    assert!(exe.to_string_lossy().ends_with("(deleted)"), "{exe:?}");
    let run = record(&dir, workload, &["--events", "offcpu"], false);
    for function in C_BLOCKING {
        let stacks: Vec<&Value> = family_stacks(&run.capture, "offcpu", run.pid)
            .into_iter()
            .filter(|s| in_syscall(s) && user_names(s).iter().any(|n| is_function(n, function)))
            .collect();
        assert!(
            !stacks.is_empty(),
            "no stack through {function}; the process's stacks:\n{}",
            describe(&family_stacks(&run.capture, "offcpu", run.pid))
        );
        for stack in stacks {
            let names = user_names(stack);
            assert!(
                holds_in_a_row(&names, &["main", "request", function]),
                "{names:?}"
            );
        }
        assert_blocked_time(&run, function, &format!("{function}_ns"));
    }
}

// ---------------------------------------------------------------------------------------------
// Symbols of the unstripped build (for the stripped one)
// ---------------------------------------------------------------------------------------------

/// (start, end, name) of the functions in `bin`'s symbol table, from `nm -S`. For these PIE
/// builds the text segment's file offsets equal its virtual addresses, so the profiler's
/// file offsets can be looked up directly.
fn function_symbols(bin: &Path) -> Vec<(u64, u64, String)> {
    let output = Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(bin)
        .output()
        .expect("nm (package binutils)");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [start, size, kind, name] = words[..] else {
                return None;
            };
            if !matches!(kind, "t" | "T") {
                return None;
            }
            let start = u64::from_str_radix(start, 16).ok()?;
            let size = u64::from_str_radix(size, 16).ok()?;
            Some((start, start + size, name.to_string()))
        })
        .collect()
}

fn symbol_at(symbols: &[(u64, u64, String)], offset: u64) -> Option<&str> {
    symbols
        .iter()
        .find(|(start, end, _)| (*start..*end).contains(&offset))
        .map(|(_, _, name)| name.as_str())
}

/// `--ebpf-log warn` (aya-log): a walk that stops on a CFA rule the walker does not follow —
/// a hand-written function whose CFI puts the CFA in r12 — is logged once, with its reason and
/// pc, however many walks stop there (100 blocks here). Oracle for the pc: `nm -S` of the
/// binary places it inside `odd_sleep`, after the process's load base from /proc/PID/maps.
#[test]
fn ebpf_log_says_once_why_a_walk_stopped_and_where() {
    require_root();
    let dir = temp_dir("unwind-ebpf-log");
    let bin = dir.join("unwind_odd_cfa");
    let output = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(workload_source("unwind_odd_cfa.c"))
        .output()
        .expect("gcc (package gcc)");
    assert!(
        output.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut workload = Command::new(&bin)
        .arg("300")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the workload");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(workload.stdout.take().expect("stdout")),
        &mut ready,
    )
    .expect("ready line");
    let pid = ready.trim().trim_start_matches("ready ").to_string();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let out = dir.join("capture");
    let recorded = run_profiler(&[
        "record",
        "-p",
        &pid,
        "--events",
        "offcpu",
        "-d",
        "1500ms",
        "--ebpf-log",
        "warn",
        "-o",
        out.to_str().unwrap(),
    ]);
    let _ = workload.kill();
    let _ = workload.wait();
    let stderr = String::from_utf8_lossy(&recorded.stderr);
    assert!(recorded.status.success(), "record failed: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("profiler: ebpf ") && l.contains(&format!("tgid {pid} ")))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one log line for the stopped walks: {stderr}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("profiler: ebpf warn: ") && line.ends_with("unsupported CFA rule"),
        "{line}"
    );
    let stopped = read_capture(&out)["metadata"]["counters"]["unwind_unsupported_cfa"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        stopped >= 50,
        "{stopped} walks stopped on the rule in 1.5 s of 10 ms sleeps"
    );

    // The logged pc is inside odd_sleep: load base + nm's address ≤ pc < … + its size.
    let pc = line
        .split("stopped at pc ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| panic!("no pc in {line}"));
    let exe = bin.to_string_lossy();
    let base = maps
        .lines()
        .find(|l| l.ends_with(exe.as_ref()) && l.split_whitespace().nth(2) == Some("00000000"))
        .and_then(|l| l.split('-').next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| panic!("no load base of {exe} in {maps}"));
    let nm = Command::new("nm")
        .arg("-S")
        .arg(&bin)
        .output()
        .expect("nm (package binutils)");
    let symbols = String::from_utf8_lossy(&nm.stdout);
    let (start, size) = symbols
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            match fields[..] {
                [start, size, _, "odd_sleep"] => Some((
                    u64::from_str_radix(start, 16).ok()?,
                    u64::from_str_radix(size, 16).ok()?,
                )),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no odd_sleep in nm -S: {symbols}"));
    assert!(
        (base + start..base + start + size).contains(&pc),
        "logged pc {pc:#x} is not in odd_sleep ({:#x}..{:#x})",
        base + start,
        base + start + size
    );
}
