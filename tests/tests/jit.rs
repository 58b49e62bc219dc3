//! Generated code named from perf maps (issue 16): CPython 3.12+ run with `-X perf`, and Node
//! with `--perf-basic-prof --interpreted-frames-native-stack`, write `/tmp/perf-PID.map`; the
//! profiler names their frames from it. CPython's perf trampolines have no frame pointer and
//! no unwind information: the walk gets through them only with the tables the profiler makes
//! for them (`symbolize/unwind/jit.rs`), and must still reach `_start`.
//!
//! The workloads block the way real programs do: Python in `time.sleep`, Node in
//! `Atomics.wait` (a futex under V8's condition variable), from
//! `outer → Service.handle → middle → inner`. Oracles, none written here:
//! - **the runtime's own view of the call chain**: `py-spy dump` (PyPI, a third-party Python
//!   profiler) while the workload sleeps, and V8's own `new Error().stack` taken in `inner`;
//!   the profiler's Python/JavaScript frames in the blocking stack, outermost first, must be
//!   the same functions in the same order;
//! - **the workload's own clock** around each blocking call: the off-CPU time of the stacks
//!   through `inner` within ±5 % of it.

use std::path::{Path, PathBuf};
use std::process::Command;

use profiler_tests::*;
use serde_json::Value;

/// Where `cargo xtask setup` installs py-spy (a venv of its own).
const PY_SPY: &str = "/usr/local/lib/profiler-tests/venv/bin/py-spy";

const ROUNDS: u32 = 60;
const BLOCK_MS: u32 = 20;

fn workload(file: &str) -> String {
    format!("{}/workloads/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// pyenv's interpreter of version `major.minor` (the machine has 3.6–3.13 under pyenv).
fn pyenv_python(version: &str) -> PathBuf {
    let root = std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".to_string());
    let versions = Path::new(&root).join("versions");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&versions)
        .unwrap_or_else(|err| panic!("no pyenv versions in {}: {err}", versions.display()))
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(version)
                .is_some_and(|rest| rest.starts_with('.'))
        })
        .map(|e| e.path().join(format!("bin/python{version}")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no python{version} under {}", versions.display()))
}

/// The runtime's function of a frame, if it is one of `file`'s: from the kernel's CPython
/// walker `py::QUALNAME (BASENAME:LINE)` (given as `QUALNAME (BASENAME:LINE)`, as py-spy
/// prints it); from perf maps `py::QUALNAME:FILE` (CPython) and `JS:~NAME FILE:LINE:COL`
/// (V8; `~` interpreted, `*` optimized, others for the tiers between), given as the name.
fn runtime_function<'a>(frame: &'a str, file: &str) -> Option<&'a str> {
    if let Some(rest) = frame.strip_prefix("py::") {
        let basename = file.rsplit('/').next().unwrap_or(file);
        if let Some((_, location)) = rest.rsplit_once(" (")
            && location.starts_with(&format!("{basename}:"))
            && location.ends_with(')')
        {
            return Some(rest);
        }
        return rest.strip_suffix(&format!(":{file}"));
    }
    let rest = frame.strip_prefix("JS:")?;
    let rest = rest.trim_start_matches(['~', '*', '^', '+']);
    let (name, location) = rest.rsplit_once(' ')?;
    location.starts_with(&format!("{file}:")).then_some(name)
}

/// A V8 or py-spy function name as a perf map names it: V8's stack says `Service.handle` and
/// `Socket.<anonymous>` where its perf map says `handle` and an empty name.
fn v8_perf_name(name: &str) -> &str {
    let name = name.rsplit_once('.').map_or(name, |(_, method)| method);
    if name == "<anonymous>" { "" } else { name }
}

struct Run {
    /// The capture directory.
    out: PathBuf,
    capture: Value,
    pid: u32,
    inner_ns: u64,
    /// What the workload printed before `inner_ns` (Node: its stack trace).
    stack_line: Option<String>,
    /// py-spy's chain (innermost first), when asked for.
    py_spy: Option<Vec<String>>,
}

/// Runs `command` (a `jit_*` workload), recording it by pid, and asks py-spy for its stack
/// while it sleeps when `py_spy` is set.
fn record(name: &str, command: &mut Command, py_spy: bool) -> Run {
    let dir = temp_dir(name);
    // V8 writes an isolate log where it runs.
    let mut process = ReadyProcess::spawn(command.current_dir(&dir));
    let pid: u32 = process.pid.parse().expect("pid");
    let recording = Recording::start(
        &dir.join("out"),
        &["--events", "offcpu", "-p", &process.pid],
    );
    process.say("go");
    let py_spy = py_spy.then(|| py_spy_chain(pid));
    let mut inner_ns = None;
    let mut stack_line = None;
    while let Some(line) = process.line() {
        if let Some(ns) = line.strip_prefix("inner_ns ") {
            inner_ns = Some(ns.parse().expect("inner_ns"));
            break;
        } else if let Some(stack) = line.strip_prefix("stack ") {
            stack_line = Some(stack.to_string());
        }
    }
    // Recorded while the workload still lives: its perf map is read to the end.
    let (capture, _) = recording.interrupt();
    process.say("end");
    process.finish();
    // The runtimes leave their maps behind.
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    Run {
        out: dir.join("out"),
        capture,
        pid,
        inner_ns: inner_ns.expect("the workload's inner_ns line"),
        stack_line,
        py_spy,
    }
}

/// What `py-spy dump --pid PID` prints.
fn py_spy_dump(pid: u32) -> String {
    let output = Command::new(PY_SPY)
        .args(["dump", "--pid", &pid.to_string()])
        .output()
        .unwrap_or_else(|err| panic!("{PY_SPY} (cargo xtask setup installs it): {err}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "py-spy dump failed: {text}");
    text
}

/// `py-spy dump --pid PID`: the main thread's frames, innermost first, as py-spy prints them
/// (`inner (jit_python.py:20)`), taken while it is in `inner` (the workload sleeps there
/// 99 % of the time; a dump that caught it between two sleeps is taken again).
fn py_spy_chain(pid: u32) -> Vec<String> {
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        let text = py_spy_dump(pid);
        // "    inner (jit_python.py:20)" per frame, after the "Thread …" line.
        let chain: Vec<String> = text
            .lines()
            .skip_while(|l| !l.starts_with("Thread "))
            .skip(1)
            .take_while(|l| l.starts_with("    "))
            .map(|l| l.trim().to_string())
            .collect();
        if chain.first().is_some_and(|f| f.starts_with("inner (")) {
            return chain;
        }
    }
    panic!("py-spy never caught the workload in inner");
}

/// The stacks of the run's process through the runtime function `inner` of `file`, heaviest
/// first, with their runtime functions (outermost first); at least one (`what` says whose).
fn stacks_through_inner<'a>(
    run: &'a Run,
    file: &str,
    what: &str,
) -> Vec<(&'a Value, Vec<&'a str>)> {
    let mut stacks: Vec<(&Value, Vec<&str>)> = stacks_of(&run.capture, run.pid)
        .into_iter()
        .map(|s| {
            let functions = frame_names(s)
                .into_iter()
                .filter_map(|f| runtime_function(f, file))
                .collect();
            (s, functions)
        })
        .filter(|(_, functions): &(&Value, Vec<&str>)| {
            functions
                .last()
                .is_some_and(|f| *f == "inner" || f.starts_with("inner ("))
        })
        .collect();
    stacks.sort_by_key(|(s, _)| std::cmp::Reverse(s["total_ns"].as_u64().unwrap_or(0)));
    assert!(
        !stacks.is_empty(),
        "{what}: no stack names its inner: {:#?}",
        stacks_of(&run.capture, run.pid)
            .iter()
            .map(|s| frame_names(s))
            .collect::<Vec<_>>()
    );
    stacks
}

/// The capture says it read one perf map (the workload's) and named frames from it.
fn assert_perf_map_counted(run: &Run, what: &str) {
    let counters = &run.capture["metadata"]["counters"];
    let counter = |name: &str| counters[name].as_u64().unwrap_or_else(|| panic!("{name}"));
    assert_eq!(counter("perf_maps"), 1, "{what}: perf maps read");
    assert_eq!(counter("perf_maps_refused"), 0, "{what}: perf maps refused");
    assert!(
        counter("perf_map_frames") > 0,
        "{what}: no frame named from it"
    );
}

fn assert_time_matches(run: &Run, stacks: &[(&Value, Vec<&str>)], what: &str) {
    let ours: u64 = stacks
        .iter()
        .map(|(s, _)| s["total_ns"].as_u64().expect("total_ns"))
        .sum();
    assert_close_to_clock(&format!("{what}, in inner"), ours, run.inner_ns);
}

/// Blocked time recorded (`ours`) within ±5 % of the workload's own clock (`theirs`), ns.
fn assert_close_to_clock(what: &str, ours: u64, theirs: u64) {
    println!(
        "{what}: {:.1} ms by the workload's clock, {:.1} ms recorded",
        theirs as f64 / 1e6,
        ours as f64 / 1e6
    );
    let error = (ours as f64 - theirs as f64).abs() / theirs as f64;
    assert!(
        error <= 0.05,
        "{what}: {ours} ns recorded vs {theirs} ns by the workload's clock"
    );
}

/// CPython with `-X perf`: the walk goes through every trampoline to `_start` (without their
/// tables it stops at the first); the Python frames of the blocking stack are py-spy's, each
/// once (the walked frames replace the perf map's names of the same functions); time within
/// ±5 %.
fn python_perf_trampolines(version: &str) {
    require_root();
    let python = pyenv_python(version);
    let file = workload("jit_python.py");
    let run = record(
        &format!("jit-python{version}"),
        Command::new(&python).args([
            "-X",
            "perf",
            &file,
            &ROUNDS.to_string(),
            &BLOCK_MS.to_string(),
        ]),
        true,
    );
    let stacks = stacks_through_inner(&run, &file, &format!("python{version}"));
    let (heaviest, ours) = &stacks[0];
    // The kernel walks the interpreter's frames too: they replace the perf map's names of the
    // same functions (which carry no line), so py-spy's frames come with their lines.
    let mut py_spy: Vec<String> = run.py_spy.clone().expect("py-spy chain");
    py_spy.reverse();
    println!("python{version}: profiler {ours:?}, py-spy {py_spy:?}");
    assert_eq!(
        ours, &py_spy,
        "python{version}: the stack's Python functions (outermost first) differ from py-spy's"
    );
    let names = frame_names(heaviest);
    assert_eq!(
        names.first().copied(),
        Some("_start"),
        "python{version}: the walk did not get through the trampolines to _start: {names:?}"
    );
    assert!(
        names.contains(&"time_sleep"),
        "python{version}: time.sleep's C function is not above inner: {names:?}"
    );
    assert_perf_map_counted(&run, &format!("python{version}"));
    assert_time_matches(&run, &stacks, &format!("python{version}"));
}

#[test]
fn python_3_12_perf_trampolines_give_py_spys_call_chain() {
    python_perf_trampolines("3.12");
}

#[test]
fn python_3_13_perf_trampolines_give_py_spys_call_chain() {
    python_perf_trampolines("3.13");
}

/// CPython without `-X perf`: the kernel walks the interpreter's own frames. The Python
/// functions of the blocking stack, outermost first, with their lines, are py-spy's; they sit
/// where the `_PyEval_EvalFrameDefault` calls that ran them were, the walk reaches `_start`;
/// time within ±5 %.
fn python_interpreter_frames(python: &Path, what: &str) {
    require_root();
    let file = workload("jit_python.py");
    let run = record(
        &format!("jit-walk-{what}"),
        Command::new(python).args([&file, &ROUNDS.to_string(), &BLOCK_MS.to_string()]),
        true,
    );
    let stacks = stacks_through_inner(&run, &file, what);
    let (heaviest, ours) = &stacks[0];
    let mut py_spy: Vec<String> = run.py_spy.clone().expect("py-spy chain");
    py_spy.reverse();
    println!("{what}: profiler {ours:?}, py-spy {py_spy:?}");
    assert_eq!(
        ours, &py_spy,
        "{what}: the stack's Python frames (outermost first) differ from py-spy's"
    );
    let names = frame_names(heaviest);
    assert_eq!(names.first().copied(), Some("_start"), "{what}: {names:?}");
    assert!(
        !names.contains(&"_PyEval_EvalFrameDefault"),
        "{what}: an eval-loop frame was not replaced by its Python frames: {names:?}"
    );
    let counters = &run.capture["metadata"]["counters"];
    let counter = |name: &str| counters[name].as_u64().unwrap_or_else(|| panic!("{name}"));
    assert!(counter("python_frames") > 0, "{what}: {counters}");
    assert_eq!(counter("python_code_unreadable"), 0, "{what}");
    assert_eq!(counter("python_frames_unplaced"), 0, "{what}");
    assert_time_matches(&run, &stacks, what);
}

/// 3.8–3.10: a `PyFrameObject` chain, the thread found by its pthread_t (the fs base), lines
/// from `co_lnotab` (3.8, 3.9) and 3.10's `co_linetable`; functions by `co_name`, as py-spy.
#[test]
fn python_3_8_frames_are_walked_in_the_kernel_like_py_spys() {
    python_interpreter_frames(&pyenv_python("3.8"), "python3.8");
}

#[test]
fn python_3_9_frames_are_walked_in_the_kernel_like_py_spys() {
    python_interpreter_frames(&pyenv_python("3.9"), "python3.9");
}

#[test]
fn python_3_10_frames_are_walked_in_the_kernel_like_py_spys() {
    python_interpreter_frames(&pyenv_python("3.10"), "python3.10");
}

#[test]
fn python_3_11_frames_are_walked_in_the_kernel_like_py_spys() {
    python_interpreter_frames(&pyenv_python("3.11"), "python3.11");
}

#[test]
fn python_3_12_frames_are_walked_in_the_kernel_like_py_spys() {
    python_interpreter_frames(&pyenv_python("3.12"), "python3.12");
}

#[test]
fn python_3_13_frames_are_walked_in_the_kernel_like_py_spys() {
    python_interpreter_frames(&pyenv_python("3.13"), "python3.13");
}

/// Debian's own python3 (3.11, no frame pointers, exported symbols only).
#[test]
fn debians_python3_frames_are_walked_in_the_kernel_like_py_spys() {
    python_interpreter_frames(Path::new("/usr/bin/python3"), "debian-python3");
}

/// Node with its perf map: the JavaScript functions of the blocking stack are those of V8's
/// own stack trace, in order; time within ±5 %.
#[test]
fn node_perf_map_gives_v8s_call_chain() {
    require_root();
    let file = workload("jit_node.js");
    let run = record(
        "jit-node",
        Command::new("node").args([
            "--perf-basic-prof",
            "--interpreted-frames-native-stack",
            &file,
            &ROUNDS.to_string(),
            &BLOCK_MS.to_string(),
        ]),
        false,
    );
    let trace: String =
        serde_json::from_str(run.stack_line.as_deref().expect("V8's stack line")).expect("json");
    // "    at Service.handle (/path/jit_node.js:28:5)": the workload file's frames only.
    let mut v8: Vec<&str> = trace
        .lines()
        .filter_map(|l| l.trim().strip_prefix("at "))
        .filter(|l| l.contains(&format!("({file}:")))
        .filter_map(|l| l.split_once(" (").map(|(f, _)| v8_perf_name(f)))
        .collect();
    v8.reverse();
    assert_eq!(
        v8.last(),
        Some(&"inner"),
        "V8's trace does not end in inner: {trace}"
    );
    let stacks = stacks_through_inner(&run, &file, "node");
    let (heaviest, ours) = &stacks[0];
    println!("node: profiler {ours:?}, V8 {v8:?}");
    assert_eq!(
        ours, &v8,
        "node: the stack's JavaScript functions (outermost first) differ from V8's trace"
    );
    let names = frame_names(heaviest);
    assert_eq!(names.first().copied(), Some("_start"), "{names:?}");
    assert_perf_map_counted(&run, "node");
    assert_time_matches(&run, &stacks, "node");
}

/// `py-spy dump` of every thread: tid → its frames, innermost first, files shortened to
/// their base name (`run (thread.py:58)`), taken while every thread is in `timed_sleep`.
fn py_spy_threads(pid: u32, threads: usize) -> std::collections::BTreeMap<u32, Vec<String>> {
    let shorten = |frame: &str| -> String {
        match frame.rsplit_once(" (") {
            Some((function, location)) => {
                let location = location.rsplit('/').next().unwrap_or(location);
                format!("{function} ({location}")
            }
            None => frame.to_string(),
        }
    };
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let text = py_spy_dump(pid);
        let mut chains = std::collections::BTreeMap::new();
        let mut current: Option<(u32, Vec<String>)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("Thread ") {
                if let Some((tid, chain)) = current.take() {
                    chains.insert(tid, chain);
                }
                let tid = rest.split_whitespace().next().unwrap_or("");
                current = tid.parse().ok().map(|tid| (tid, Vec::new()));
            } else if let Some(frame) = line.strip_prefix("    ")
                && let Some((_, chain)) = current.as_mut()
            {
                chain.push(shorten(frame.trim()));
            }
        }
        if let Some((tid, chain)) = current.take() {
            chains.insert(tid, chain);
        }
        let sleeping = chains
            .values()
            .filter(|c| c.first().is_some_and(|f| f.starts_with("timed_sleep (")))
            .count();
        if sleeping == threads && chains.len() == threads {
            return chains;
        }
    }
    panic!("py-spy never caught the {threads} threads all in timed_sleep");
}

/// A generator and a thread pool (CPython 3.12, walked in the kernel): for each of the three
/// threads py-spy names, our heaviest stack of that thread holds py-spy's frames with their
/// lines, in order — the generator's body between its consumer and the sleep, the pool
/// threads under `threading`'s and `concurrent.futures`' own frames; the time per function
/// within ±5 % of the workload's own clock.
#[test]
fn python_generators_and_thread_pools_are_walked_like_py_spys() {
    require_root();
    let python = pyenv_python("3.12");
    let file = workload("python_shapes.py");
    let dir = temp_dir("jit-python-shapes");
    let mut process = ReadyProcess::spawn(
        Command::new(&python)
            .args([&file, &ROUNDS.to_string(), &BLOCK_MS.to_string()])
            .current_dir(&dir),
    );
    let pid: u32 = process.pid.parse().expect("pid");
    let recording = Recording::start(
        &dir.join("out"),
        &["--events", "offcpu", "-p", &process.pid],
    );
    process.say("go");
    let py_spy = py_spy_threads(pid, 3);
    let slept: Value = loop {
        let line = process.line().expect("the workload's slept line");
        if let Some(json) = line.strip_prefix("slept ") {
            break serde_json::from_str(json).expect("slept json");
        }
    };
    let (capture, _) = recording.interrupt();
    process.say("end");
    process.finish();

    let python_frames = |stack: &Value| -> Vec<String> {
        frame_names(stack)
            .into_iter()
            .filter_map(|n| n.strip_prefix("py::").map(str::to_string))
            .collect()
    };
    for (tid, chain) in &py_spy {
        let mut expected = chain.clone();
        expected.reverse();
        let heaviest = stacks_of(&capture, pid)
            .into_iter()
            .filter(|s| s["tid"].as_u64() == Some(u64::from(*tid)))
            .filter(|s| {
                python_frames(s)
                    .last()
                    .is_some_and(|f| f.starts_with("timed_sleep ("))
            })
            .max_by_key(|s| s["total_ns"].as_u64().unwrap_or(0))
            .unwrap_or_else(|| panic!("no stack of thread {tid} in timed_sleep"));
        let ours = python_frames(heaviest);
        println!("thread {tid}: profiler {ours:?}, py-spy {expected:?}");
        assert_eq!(
            ours, expected,
            "thread {tid}: Python frames differ from py-spy's"
        );
    }
    for (function, what) in [("ticks", "the generator"), ("nap", "the pool threads")] {
        let ours: u64 = stacks_of(&capture, pid)
            .into_iter()
            .filter(|s| {
                python_frames(s)
                    .iter()
                    .any(|f| f.starts_with(&format!("{function} (")))
            })
            .map(|s| s["total_ns"].as_u64().expect("total_ns"))
            .sum();
        assert_close_to_clock(what, ours, slept[function].as_u64().expect("slept ns"));
    }
}

/// A CPython the walker does not know (pyenv's 3.7): the summary says so on one line, the
/// counter counts the process, and its stacks keep their native frames down to `_start`.
#[test]
fn an_unknown_python_version_is_said_and_keeps_native_frames() {
    require_root();
    let python = pyenv_python("3.7");
    let file = workload("jit_python.py");
    let run = record(
        "jit-python3.7",
        Command::new(&python).args([&file, "10", &BLOCK_MS.to_string()]),
        false,
    );
    let counters = &run.capture["metadata"]["counters"];
    assert_eq!(counters["python_unsupported"], 1, "{counters}");
    assert_eq!(counters["python_walks"], 0, "{counters}");
    let summary = std::fs::read_to_string(run.out.join("summary.txt")).expect("summary.txt");
    let lines: Vec<&str> = summary
        .lines()
        .filter(|l| l.contains("does not know"))
        .collect();
    assert_eq!(lines.len(), 1, "{summary}");
    let stacks = stacks_of(&run.capture, run.pid);
    assert!(!stacks.is_empty());
    for stack in stacks {
        let names = frame_names(stack);
        assert!(!names.iter().any(|n| n.starts_with("py::")), "{names:?}");
    }
    assert!(
        stacks_of(&run.capture, run.pid)
            .iter()
            .any(|s| frame_names(s).first() == Some(&"_start")),
        "no stack of python3.7 reaches _start"
    );
}
