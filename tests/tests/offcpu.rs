//! End-to-end tests of off-CPU recording: the real profiler binary, the running kernel and a
//! workload whose functions block in known ways and time themselves.
//!
//! Oracle: the workload's own measurement (CLOCK_MONOTONIC around each blocking syscall) of
//! the time each function spent blocked. The profiler measures switch-out to switch-in in
//! the kernel; the two must agree within ±5%.

use profiler_tests::*;

/// Records the workload by pid with extra args, ending with Ctrl-C; returns capture, stdout
/// and the workload's own report.
fn record_workload(
    name: &str,
    extra: &[&str],
) -> (serde_json::Value, String, serde_json::Value, u32) {
    let r = record_offcpu_workload(name, 15, "-p", extra);
    (r.capture, r.stdout, r.report, r.pid)
}

/// Every stack through a workload function has the true callers above it.
fn assert_callers(capture: &serde_json::Value, report: &serde_json::Value, pid: u32) {
    for function in FUNCTIONS {
        let stacks: Vec<_> = stacks_of(capture, pid)
            .into_iter()
            .filter(|s| frame_names(s).iter().any(|n| is_function(n, function)))
            .collect();
        if stacks.is_empty() {
            // Every block of the function hit a counted stack-map collision (a whole-host
            // capture beside a busy build fills the stack maps): its time is under "[user
            // stack lost: collision]", whose kernel frames still name the function's syscall.
            let kernel_function = match function {
                "workload_pipe_read" => "pipe_read",
                "workload_nanosleep" => "hrtimer_nanosleep",
                _ => "futex_wait",
            };
            let collisions = capture["metadata"]["counters"]["stack_collisions"]
                .as_u64()
                .unwrap();
            let lost_here = stacks_of(capture, pid).into_iter().any(|s| {
                let names = frame_names(s);
                names
                    .first()
                    .is_some_and(|n| n.starts_with("[user stack lost: collision"))
                    && names.iter().any(|n| n.starts_with(kernel_function))
            });
            assert!(
                collisions > 0 && lost_here,
                "no stack through {function}, none lost to a collision in {kernel_function}"
            );
            eprintln!("{function}: every stack lost to collisions ({collisions} counted)");
            continue;
        }
        for stack in stacks {
            let names = frame_names(stack);
            if names.iter().any(|n| is_function(n, "run_delay")) {
                // nanosleep's reading of its run-queue wait (schedstat), preempted: a wait for
                // a CPU around the blocking call, not in it.
                assert_eq!(stack["state"], "runqueue", "{names:?}");
                continue;
            }
            if !names.iter().any(|n| n.starts_with("entry_SYSCALL")) {
                // Preempted while running the function's own code (a timer interrupt, as
                // under a loaded CI machine): a wait for a CPU, not one of its blocking calls.
                assert_eq!(stack["state"], "runqueue", "{names:?}");
                continue;
            }
            let at = names.iter().position(|n| is_function(n, function)).unwrap();
            assert!(at >= 2, "{function} has no callers: {names:?}");
            assert!(
                is_function(names[at - 1], "run_iterations") && is_function(names[at - 2], "main"),
                "wrong callers of {function}: {names:?}"
            );
            // The raw syscall helper is inlined into the function: blazesym's DWARF
            // inline information shows it as its own frame, marked inlined.
            let frames = stack["frames"].as_array().unwrap();
            assert!(
                is_function(names[at + 1], "syscall3") || is_function(names[at + 1], "syscall4"),
                "no inlined syscall frame under {function}: {names:?}"
            );
            assert_eq!(frames[at + 1]["inlined"], true, "{:?}", frames[at + 1]);
            // The leaf is the kernel's scheduler, reached through a syscall.
            assert!(
                names.iter().any(|n| n.starts_with("entry_SYSCALL")),
                "no syscall entry in {names:?}"
            );
            assert_eq!(stack["comm"], "offcpu-workload");
            // Blocked (sleep), then the wait for a CPU after the wakeup (runqueue).
            assert!(
                stack["state"] == "sleep" || stack["state"] == "runqueue",
                "{}",
                stack["state"]
            );
        }
    }
    // The sleep/run-queue split at the wakeup, against truths the kernel keeps: nanosleep
    // sleeps at least what it was asked (20 ms per call), and at most its elapsed time less
    // the thread's run-queue wait over the same calls (run_delay in its schedstat, read by
    // the workload around each call) — on a loaded machine that wait is run queue, not
    // sleep; a late timer (a VM's stolen time) is sleep. A skipped program run or a wakeup
    // that never reached the program (`wakeup_missed`) leaves one block's wait filed as sleep.
    // A skipped run or an unrecovered missed switch-in loses at most one block.
    let counter = |name: &str| capture["metadata"]["counters"][name].as_u64().unwrap() as f64;
    let misses = counter("program_misses") + counter("wakeup_missed");
    let lost_blocks = counter("program_misses") + counter("switch_in_missed")
        - counter("switch_in_missed_recovered");
    // Per call, up to 0.1 ms for where each count starts: the kernel's run-queue wait from
    // the enqueue by the rq clock, ours from the sched_wakeup tracepoint just after it.
    let iterations = report["iterations"].as_u64().unwrap() as f64;
    let asked = iterations * 20e6;
    let longest = report["longest_ns"]["workload_nanosleep"].as_u64().unwrap() as f64;
    let not_waiting = report["blocked_ns"]["workload_nanosleep"].as_u64().unwrap() as f64
        - report["nanosleep_run_delay_ns"].as_u64().unwrap() as f64;
    let slept = stacks_of(capture, pid)
        .into_iter()
        .filter(|s| s["state"] == "sleep")
        .filter(|s| {
            let names = frame_names(s);
            // Its stack, or the main thread's nanosleep whose user stack collided (counted).
            names.iter().any(|n| is_function(n, "workload_nanosleep"))
                || (s["tid"].as_u64() == Some(u64::from(pid))
                    && names
                        .first()
                        .is_some_and(|n| n.starts_with("[user stack lost: collision"))
                    && names.iter().any(|n| n.starts_with("hrtimer_nanosleep")))
        })
        .map(|s| s["total_ns"].as_u64().unwrap() as f64)
        .sum::<f64>();
    println!(
        "workload_nanosleep asleep {:.3} ms of {:.0} ms asked; elapsed less run-queue wait \
         (schedstat) {:.3} ms",
        slept / 1e6,
        asked / 1e6,
        not_waiting / 1e6
    );
    assert!(
        slept >= asked - lost_blocks * longest
            && slept <= not_waiting + iterations * 0.1e6 + misses * longest,
        "nanosleep asleep {slept} ns, asked {asked} ns, elapsed less run-queue wait \
         {not_waiting} ns ({misses} skipped program runs or missed wakeups, {lost_blocks} \
         blocks lost to skipped runs or unrecovered missed switch-ins)"
    );
}

#[test]
fn blocked_time_per_function_matches_the_workloads_own_timing() {
    let (capture, stdout, report, pid) = record_workload("pid", &[]);
    assert_matches_oracle(&capture, &report, pid);
    assert_callers(&capture, &report, pid);
    // Only the requested process was recorded.
    let stacks = capture["offcpu"]["stacks"].as_array().unwrap();
    assert!(stacks.iter().all(|s| s["pid"].as_u64() == Some(pid as u64)));
    assert_eq!(capture["format"], "profiler-capture");
    assert_eq!(capture["version"], 1);
    assert_eq!(capture["metadata"]["filters"]["pids"][0], pid);
    // Per-interval values add up to the totals.
    for stack in stacks {
        let sum: u64 = stack["intervals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(sum, stack["total_ns"].as_u64().unwrap());
    }
    // The summary names the blocking functions.
    assert!(stdout.contains("top blocking stacks"), "{stdout}");
    assert!(stdout.contains("workload_pipe_read"), "{stdout}");
}

#[test]
fn folded_and_svg_outputs_hold_the_workload_stacks() {
    let Recorded { dir, report, .. } = record_offcpu_workload("views", 5, "-p", &[]);
    let folded = std::fs::read_to_string(dir.join("out/offcpu.folded")).unwrap();
    let line = folded
        .lines()
        .find(|l| l.contains("workload_nanosleep"))
        .expect("a folded line through workload_nanosleep");
    assert!(line.starts_with("offcpu-workload;"), "{line}");
    assert!(line.contains("_[k]"), "kernel frames marked: {line}");
    let us: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let expected_us = report["blocked_ns"]["workload_nanosleep"].as_u64().unwrap() / 1000;
    assert!(
        us.abs_diff(expected_us) * 20 <= expected_us,
        "folded {us} us vs workload {expected_us} us"
    );
    let svg = std::fs::read_to_string(dir.join("out/offcpu.svg")).unwrap();
    assert!(svg.starts_with("<?xml"));
    assert!(svg.contains("Off-CPU time"));
    assert!(svg.contains("workload_futex_wait"));
    assert!(
        std::fs::read_to_string(dir.join("out/summary.txt"))
            .unwrap()
            .contains("off-CPU:")
    );
}

#[test]
fn tracepoint_fallback_measures_the_same() {
    let (capture, _, report, pid) = record_workload("tracepoint", &["--attach", "tracepoint"]);
    assert_eq!(capture["metadata"]["attach"], "tracepoint");
    assert_matches_oracle(&capture, &report, pid);
    assert_callers(&capture, &report, pid);
}

#[test]
fn stacks_colliding_in_a_tiny_stack_map_survive_in_the_overflow_map() {
    // Two buckets: most stacks collide there and must land in the overflow map, intact.
    let (capture, _, report, pid) = record_workload("overflow", &["--stack-storage-size", "2"]);
    assert_matches_oracle(&capture, &report, pid);
    assert_callers(&capture, &report, pid);
    assert_eq!(capture["metadata"]["counters"]["stack_collisions"], 0);
}

#[test]
fn min_block_and_tid_filters_apply_in_the_kernel() {
    // Blocks of 20 ms are all shorter than 40 ms: none may appear, and they are counted.
    let (capture, _, _report, pid) = record_workload("minblock", &["--min-block", "40ms"]);
    for function in FUNCTIONS {
        assert_eq!(blocked_ns_in(&capture, pid, function), 0, "{function}");
    }
    assert!(
        capture["metadata"]["counters"]["filtered_by_duration"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Only the main thread (tid == pid): the helper threads' sleeps are absent.
    let Recorded { capture, pid, .. } =
        record_offcpu_workload("tid", 5, "--tid", &["--state", "sleeping"]);
    let stacks = stacks_of(&capture, pid);
    assert!(!stacks.is_empty());
    assert!(stacks.iter().all(|s| s["tid"].as_u64() == Some(pid as u64)));
    assert_eq!(blocked_ns_in(&capture, pid, "helper_release_after"), 0);
    assert!(blocked_ns_in(&capture, pid, "workload_nanosleep") > 0);
    // --state sleeping keeps sleeping blocks, and the run-queue wait that ends them.
    assert!(
        stacks
            .iter()
            .all(|s| s["state"] == "sleep" || s["state"] == "runqueue")
    );
}

#[test]
fn thread_kind_filter_separates_kernel_and_user_threads() {
    require_root();
    let dir = temp_dir("threads");
    // On-CPU at 999 Hz: the host's kworkers, rcu_preempt, kdamond run often enough to be
    // sampled in 2 s (29 samples on an idle 2-CPU VM).
    let (kernel, _) = Recording::start(
        &dir.join("kernel"),
        &["-d", "2s", "--threads", "kernel", "--freq", "999"],
    )
    .wait();
    for family in ["offcpu", "oncpu"] {
        let stacks = kernel[family]["stacks"].as_array().unwrap();
        assert!(
            !stacks.is_empty(),
            "kernel threads always block and run (kworkers, rcu): no {family} stacks"
        );
        for stack in stacks {
            // Kernel threads have no user stack, and no placeholder for one (the kernel reads
            // the task's PF_KTHREAD; /proc/PID/stat says so too): every frame is the kernel's.
            let frames = stack["frames"].as_array().unwrap();
            assert!(
                !frames.is_empty() && frames.iter().all(|f| f["kind"] == "kernel"),
                "{family}: {stack}"
            );
        }
    }
    // Nor is a user stack counted as missing: there was none to lose.
    let counters = &kernel["metadata"]["counters"];
    for counter in [
        "user_stack_missing",
        "oncpu_user_stack_missing",
        "stacks_without_user_stack",
    ] {
        assert_eq!(
            counters[counter], 0,
            "{counter} of kernel threads: {counters}"
        );
    }
    let (user, _) = Recording::start(
        &dir.join("user"),
        &["-d", "2s", "--threads", "user", "--include-self"],
    )
    .wait();
    let stacks = user["offcpu"]["stacks"].as_array().unwrap();
    assert!(
        !stacks.is_empty(),
        "this test's own profiler blocks in user space"
    );
    let kernel_pids: std::collections::HashSet<u64> = kernel["offcpu"]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_u64().unwrap())
        .collect();
    for stack in stacks {
        assert!(
            !kernel_pids.contains(&stack["pid"].as_u64().unwrap()),
            "{stack}"
        );
    }
}

#[test]
fn whole_host_capture_symbolizes_a_process_that_exited_before_the_end() {
    require_root();
    let dir = temp_dir("exited");
    let mut workload = Workload::start(5, 20, &dir.join("workload.json"));
    // Whole host: the profiler learns of the workload only from the kernel (new-task events).
    // The capture is stopped once the workload has exited and been reaped, not by a timer: a
    // timer ran out first on a loaded host (the workload still alive, rightly not "exited").
    let recording = Recording::start(&dir.join("out"), &["--duration", "120s"]);
    workload.go();
    let report = workload.finish();
    let (capture, _) = recording.interrupt();
    let pid = report["pid"].as_u64().unwrap() as u32;
    let process = capture["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid as u64))
        .expect("the workload is listed");
    assert_eq!(process["exited"], true);
    assert_eq!(process["comm"], "offcpu-workload");
    assert_matches_oracle(&capture, &report, pid);
    assert_callers(&capture, &report, pid);
}

/// Sampled mode (`--offcpu-sample 4`, what the daemon's CPU budget switches to): one block in
/// four is recorded at random and the figures are scaled back up, so the totals still match
/// the workload's own clock — within the sampling error (900 blocks, 225 expected samples: a
/// relative standard deviation of 5.8 % over all three functions, 10 % per function; the
/// bounds are four of them). `--measure-overhead` says what the programs cost: the kernel's
/// count of their runs covers at least a switch-out and a switch-in per workload block.
#[test]
fn sampled_offcpu_mode_scales_back_to_the_workloads_timing() {
    require_root();
    let dir = temp_dir("sampled");
    let mut workload = Workload::start(300, 4, &dir.join("workload.json"));
    let pid = workload.pid.to_string();
    let recording = Recording::start(
        &dir.join("out"),
        &[
            "--duration",
            "60s",
            "-p",
            &pid,
            "--events",
            "offcpu",
            "--offcpu-sample",
            "4",
            "--measure-overhead",
        ],
    );
    workload.go();
    let report = workload.finish();
    let (capture, stdout) = recording.interrupt();
    let pid = report["pid"].as_u64().unwrap() as u32;
    assert_eq!(capture["metadata"]["offcpu_sample_every"], 4);
    assert!(
        stdout.contains("sampled: 1 in 4 off-CPU blocks"),
        "{stdout}"
    );
    let (mut expected_sum, mut measured_sum) = (0.0, 0.0);
    for function in FUNCTIONS {
        let expected = report["blocked_ns"][function].as_u64().unwrap() as f64;
        let measured = blocked_ns_in(&capture, pid, function) as f64;
        println!(
            "{function}: workload {:.1} ms, sampled estimate {:.1} ms ({:+.1} %)",
            expected / 1e6,
            measured / 1e6,
            (measured / expected - 1.0) * 100.0
        );
        assert!(
            (measured / expected - 1.0).abs() < 0.40,
            "{function}: estimate {measured} ns vs {expected} ns"
        );
        expected_sum += expected;
        measured_sum += measured;
    }
    assert!(
        (measured_sum / expected_sum - 1.0).abs() < 0.23,
        "all functions: estimate {measured_sum} ns vs {expected_sum} ns"
    );
    let counters = &capture["metadata"]["counters"];
    let runs = counters["bpf_runs"].as_u64().expect("bpf_runs");
    let run_ns = counters["bpf_run_ns"].as_u64().expect("bpf_run_ns");
    println!(
        "eBPF: {runs} runs, {run_ns} ns; profiler CPU {}",
        counters["profiler_cpu_ns"]
    );
    assert!(runs >= 2 * 900, "{runs} program runs for 900 blocks");
    assert!(run_ns > 0 && counters["profiler_cpu_ns"].as_u64().unwrap() > 0);
}

/// The profiler's own process, which otherwise shows up on a whole-host capture (it waits in
/// epoll between its snapshots and makes syscalls), is left out by every family by default
/// (as in the daemon's windows); `--include-self` brings it back. Oracle: the pid of the
/// process this test started; every family's section of the capture is searched for it.
#[test]
fn the_profiler_leaves_itself_out_of_a_whole_host_capture_unless_asked() {
    require_root();
    let dir = temp_dir("exclude-self");
    /// The families (sections of the capture) where a record of process `pid` appears.
    fn families_with(capture: &serde_json::Value, pid: u32) -> Vec<&'static str> {
        fn holds(value: &serde_json::Value, pid: u32) -> bool {
            match value {
                serde_json::Value::Object(map) => map.iter().any(|(key, v)| {
                    (key == "pid" && v.as_u64() == Some(pid as u64)) || holds(v, pid)
                }),
                serde_json::Value::Array(items) => items.iter().any(|v| holds(v, pid)),
                _ => false,
            }
        }
        ["offcpu", "oncpu", "syscalls", "tcp", "db"]
            .into_iter()
            .filter(|family| holds(&capture[*family], pid))
            .collect()
    }
    let record = |extra: &[&str], name: &str| -> (u32, Vec<&'static str>, serde_json::Value) {
        let out = dir.join(name);
        let mut args = vec![
            "--duration",
            "1500ms",
            "--events",
            "offcpu,oncpu,syscalls,tcp",
        ];
        args.extend_from_slice(extra);
        let recording = Recording::start(&out, &args);
        let pid = recording.pid();
        let (capture, _) = recording.wait();
        (pid, families_with(&capture, pid), capture)
    };
    let (pid, families, _) = record(&["--include-self"], "with-self");
    for family in ["offcpu", "syscalls"] {
        assert!(
            families.contains(&family),
            "the profiler ({pid}) is not in its own whole-host {family} with --include-self \
             (found in {families:?})"
        );
    }
    let (pid, families, capture) = record(&[], "without-self");
    let counters = &capture["metadata"]["counters"];
    assert!(counters["blocks"].as_u64().unwrap() > 0, "{counters}");
    assert!(
        families.is_empty(),
        "the profiler ({pid}) is in {families:?} by default (it leaves itself out)"
    );

    // Missing user stacks (user threads only: on a busy host, processes that exit while
    // recording) each show as a `[user stack …]` stack and are counted, once per stack; none
    // belongs to a kernel thread (PF_KTHREAD in /proc/PID/stat, for those still there).
    let mut placeholders = 0;
    for (family, list) in [
        ("offcpu", "stacks"),
        ("oncpu", "stacks"),
        ("syscalls", "slow"),
    ] {
        for stack in capture[family][list].as_array().unwrap() {
            let frames = stack["frames"].as_array().unwrap();
            if !frames.iter().any(|f| {
                f["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("[user stack"))
            }) {
                continue;
            }
            placeholders += 1;
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", stack["pid"]));
            if let Some(flags) = stat.ok().and_then(|stat| {
                // Fields after the `(comm)`: state is the first, flags the seventh.
                let after = stat.rsplit_once(')')?.1.to_string();
                after.split_whitespace().nth(6)?.parse::<u64>().ok()
            }) {
                assert_eq!(
                    flags & 0x0020_0000,
                    0,
                    "a kernel thread's {family} stack: {stack}"
                );
            }
        }
    }
    assert_eq!(
        counters["stacks_without_user_stack"], placeholders,
        "stacks shown with a [user stack …] frame vs counted"
    );
}
