//! Test workload for `profiler diff`: a request loop whose stages block for known times.
//! `--extra-ms N` adds N ms of blocking to `stage_query` only: the regression the diff must
//! find and name; with `--extra-after-s S` only from S seconds on (a program that changes
//! while it runs). Runs until killed; prints `ready PID` first.

use std::time::{Duration, Instant};

use profiler_tests::rawsys::nanosleep;

#[inline(never)]
fn stage_parse() {
    nanosleep(Duration::from_millis(2));
}

#[inline(never)]
fn stage_query(extra: Duration) {
    nanosleep(Duration::from_millis(8));
    if !extra.is_zero() {
        nanosleep(extra);
    }
}

#[inline(never)]
fn stage_render() {
    nanosleep(Duration::from_millis(3));
}

#[inline(never)]
fn handle_request(extra: Duration) {
    stage_parse();
    stage_query(extra);
    stage_render();
}

fn main() {
    let mut extra_ms = 0u64;
    let mut after_s = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--extra-ms" => {
                extra_ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--extra-ms N")
            }
            "--extra-after-s" => {
                after_s = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--extra-after-s S")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    println!("ready {}", std::process::id());
    let extra = Duration::from_millis(extra_ms);
    let from = Instant::now() + Duration::from_secs(after_s);
    loop {
        handle_request(if Instant::now() >= from {
            extra
        } else {
            Duration::ZERO
        });
    }
}
