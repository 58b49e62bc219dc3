//! End-to-end tests of syscall latency on the running kernel.
//!
//! Oracle: the workload's own count and timing of its calls. Its main thread issues exactly
//! ITERATIONS nanosleep(2) calls (its helper threads use clock_nanosleep), each timed by the
//! workload itself.

use profiler_tests::*;

#[test]
fn syscall_counts_are_exact_and_times_match_the_workloads_clock() {
    const ITERATIONS: u64 = 15;
    let Recorded {
        capture,
        report,
        pid,
        stdout,
        ..
    } = record_offcpu_workload(
        "syscalls",
        ITERATIONS as u32,
        "-p",
        &["--events", "syscalls"],
    );
    assert!(capture["offcpu"].is_null() && capture["oncpu"].is_null());
    let stats = capture["syscalls"]["stats"].as_array().unwrap();
    let stat = |name: &str| {
        stats
            .iter()
            .find(|s| s["pid"].as_u64() == Some(pid as u64) && s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} for the workload in {stats:?}"))
    };
    let nanosleep = stat("nanosleep");
    assert_eq!(nanosleep["count"].as_u64().unwrap(), ITERATIONS);
    assert_eq!(nanosleep["errors"].as_u64().unwrap(), 0);
    let ours = nanosleep["total_ns"].as_u64().unwrap() as f64;
    let expected = report["blocked_ns"]["workload_nanosleep"].as_u64().unwrap() as f64;
    println!(
        "nanosleep: {:.3} ms, workload {:.3} ms",
        ours / 1e6,
        expected / 1e6
    );
    assert!((ours - expected).abs() <= 0.05 * expected);
    // 20 ms each: the histogram puts them all in [2^24, 2^25) ns (16.8–33.6 ms).
    assert_eq!(nanosleep["buckets"][25].as_u64().unwrap(), ITERATIONS);
    // Each helper sleeps once per release: two per iteration, via clock_nanosleep.
    assert_eq!(
        stat("clock_nanosleep")["count"].as_u64().unwrap(),
        2 * ITERATIONS
    );

    // Slow calls (≥ 10 ms by default) keep their user stack, ending in the syscall's name.
    let slow = capture["syscalls"]["slow"].as_array().unwrap();
    let through = slow
        .iter()
        .filter(|s| {
            frame_names(s)
                .iter()
                .any(|n| is_function(n, "workload_nanosleep"))
        })
        .collect::<Vec<_>>();
    let slow_calls: u64 = through.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(slow_calls, ITERATIONS);
    for stack in through {
        let names = frame_names(stack);
        assert_eq!(names.last(), Some(&"[syscall nanosleep]"), "{names:?}");
        let at = names
            .iter()
            .position(|n| is_function(n, "workload_nanosleep"))
            .unwrap();
        assert!(is_function(names[at - 1], "run_iterations"), "{names:?}");
    }
    assert!(
        stdout.contains("slowest syscalls by total time"),
        "{stdout}"
    );
}
