//! `profiler report` re-renders a saved capture; each format is read back by a consumer
//! that is not ours where one exists (`go tool pprof` for pprof).
//!
//! Oracle: the workload's own measurement of its blocked time (for the capture), and the
//! capture itself (for each format rendered from it).

use std::process::Command;

use profiler_tests::*;

#[test]
fn report_formats_render_the_saved_capture() {
    let Recorded {
        dir,
        report,
        capture: recorded,
        pid,
        ..
    } = record_offcpu_workload("report", 5, "-p", &[]);
    let capture = dir.join("out");
    // The capture against the workload's own clock (every shortfall beyond 5 % explained by a
    // counted loss: a switch-in the kernel never delivered loses one block), then each format
    // against the capture it renders.
    assert_matches_oracle(&recorded, &report, pid);
    let expected_ms = blocked_ns_in(&recorded, pid, "workload_nanosleep") as f64 / 1e6;

    // pprof, read by Go's own pprof tool.
    let pprof = dir.join("profile.pb.gz");
    let out = run_profiler(&[
        "report",
        capture.to_str().unwrap(),
        "--format",
        "pprof",
        "-o",
        pprof.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-sample_index=offcpu_time",
            "-unit=ms",
        ])
        .arg(&pprof)
        .output()
        .expect("go tool pprof (package golang-go)");
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.contains("workload_nanosleep"))
        .unwrap_or_else(|| panic!("workload_nanosleep not in pprof -top:\n{text}"));
    // columns: flat flat% sum% cum cum% name; cum is this function's inclusive time
    let cum_ms: f64 = line
        .split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches("ms")
        .parse()
        .unwrap();
    // pprof -top prints milliseconds with two decimals.
    assert!(
        (cum_ms - expected_ms).abs() <= 0.005 + 1e-9,
        "pprof says {cum_ms} ms, the capture holds {expected_ms} ms"
    );

    // The other formats, to standard output.
    for (format, needle) in [
        ("folded", "workload_nanosleep"),
        ("svg", "Off-CPU time"),
        ("json", "\"profiler-capture\""),
        ("md", "# Off-CPU capture"),
    ] {
        let out = run_profiler(&["report", capture.to_str().unwrap(), "--format", format]);
        assert!(out.status.success(), "{format}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(needle),
            "{format}"
        );
    }

    // Not a capture: one error line, exit 2.
    let out = run_profiler(&["report", "/etc/hostname", "--format", "svg"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}
