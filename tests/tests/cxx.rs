//! C++ frames are demangled: a C++ workload (compiled here with g++ and frame pointers)
//! blocks in a templated method; its frame must read as C++ source does.
//!
//! Oracle: the workload's own clock around each blocking call.

use std::process::Command;

use profiler_tests::*;

#[test]
fn cxx_frames_are_demangled_with_their_time() {
    require_root();
    let dir = temp_dir("cxx");
    let bin = dir.join("cxx_sleeper");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/workloads/cxx_sleeper.cpp");
    let status = Command::new("g++")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&bin)
        .arg(source)
        .status()
        .expect("g++ (package g++)");
    assert!(status.success());

    let mut workload = ReadyProcess::spawn(&mut Command::new(&bin));
    let pid = workload.pid.clone();
    let recording = Recording::start(&dir.join("out"), &["-d", "60s", "-p", &pid]);
    workload.go();
    let line = workload.line().expect("blocked_ns line");
    let expected: f64 = line.trim_start_matches("blocked_ns ").parse().unwrap();
    workload.finish();
    let (capture, _) = recording.interrupt();

    let pid: u32 = pid.parse().unwrap();
    let method = "sleepers::Waiter<int>::block_in_nanosleep(long)";
    let measured = blocked_ns_in(&capture, pid, method) as f64;
    let names: Vec<Vec<&str>> = stacks_of(&capture, pid)
        .iter()
        .map(|s| frame_names(s))
        .collect();
    assert!(measured > 0.0, "no frame named {method}: {names:?}");
    assert!(
        (measured - expected).abs() <= expected * 0.05,
        "profiler {measured} ns vs workload {expected} ns"
    );
    let stack = names
        .iter()
        .find(|n| n.contains(&method))
        .expect("stack through the method");
    let at = stack.iter().position(|n| *n == method).unwrap();
    assert_eq!(stack[at - 1], "run_cxx_waits(int)", "{stack:?}");
    assert_eq!(stack[at - 2], "main", "{stack:?}");
}
