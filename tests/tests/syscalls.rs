//! End-to-end tests of syscall latency on the running kernel.
//!
//! Oracle: the workload's own count and timing of its calls. Its main thread issues exactly
//! ITERATIONS nanosleep(2) calls (its helper threads use clock_nanosleep), each timed by the
//! workload itself. Both ways of hooking raw_syscalls (tp_btf and the classic tracepoints)
//! must give the same answers.

use profiler_tests::*;

#[test]
fn syscall_counts_are_exact_and_times_match_the_workloads_clock() {
    counts_and_times_match("syscalls", "tp-btf", "syscall latency (tp_btf)");
}

#[test]
fn tracepoint_fallback_counts_and_times_the_same() {
    counts_and_times_match(
        "syscalls-tracepoint",
        "tracepoint",
        "syscall latency (tracepoint)",
    );
}

fn counts_and_times_match(name: &str, attach: &str, announced: &str) {
    const ITERATIONS: u64 = 15;
    let Recorded {
        capture,
        report,
        pid,
        stdout,
        started,
        ..
    } = record_offcpu_workload(
        name,
        ITERATIONS as u32,
        "-p",
        &["--events", "syscalls", "--attach", attach],
    );
    assert!(started.contains(announced), "{started}");
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
    // The syscalls' own times (the workload's totals also hold its schedstat reads).
    let expected: f64 = report["nanosleep_ns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ns| ns.as_u64().unwrap() as f64)
        .sum();
    println!(
        "nanosleep: {:.3} ms, workload {:.3} ms",
        ours / 1e6,
        expected / 1e6
    );
    assert!((ours - expected).abs() <= 0.05 * expected);
    // The histogram holds each call in the bucket of its length as the workload timed it
    // (bucket b: [2^(b-1), 2^b) ns). The kernel's interval lies inside the workload's, a
    // few µs shorter, so a call within 100 µs above a bucket's start may be one below.
    let bucket = |ns: u64| 64 - ns.leading_zeros() as usize;
    let ours: Vec<u64> = nanosleep["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    let calls: Vec<u64> = report["nanosleep_ns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(calls.len() as u64, ITERATIONS);
    assert_eq!(ours.iter().sum::<u64>(), ITERATIONS, "{ours:?}");
    let mut expected = vec![0u64; ours.len()];
    let mut either = vec![0u64; ours.len()];
    for ns in &calls {
        let (high, low) = (bucket(*ns), bucket(ns.saturating_sub(100_000)));
        if high == low {
            expected[high] += 1;
        } else {
            either[low] += 1;
        }
    }
    for b in 0..ours.len() {
        let upper = expected[b] + either[b] + if b > 0 { either[b - 1] } else { 0 };
        assert!(
            (expected[b]..=upper).contains(&ours[b]),
            "bucket {b}: ours {} vs the workload's calls {calls:?} (histogram {ours:?})",
            ours[b]
        );
    }
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
