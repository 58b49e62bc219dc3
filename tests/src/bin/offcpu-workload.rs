//! Test workload for the off-CPU probes: distinctively named functions that block in known
//! ways, each measuring its own blocked time (the oracle the tests compare against).
//!
//! Every blocking call is a raw `syscall` instruction inside the named function itself, so
//! the user stack the kernel captures starts in that function and walks (frame pointers)
//! through its callers, with no libc frame in between.
//!
//! Usage: offcpu-workload --iterations N --block-ms M [--vary-ms V] --report FILE
//! With `--vary-ms`, the nanosleeps ask for M + V ms at first, less each iteration, M at
//! the last (every other block stays M).
//! It prints `ready PID` and waits for a line on stdin before it starts.

use std::io::BufRead as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use profiler_tests::rawsys::*;

/// Blocks in read(2) on a pipe until the helper writes. Returns the time spent blocked.
#[inline(never)]
fn workload_pipe_read(fd: i32) -> Duration {
    let mut byte = 0u8;
    let start = Instant::now();
    loop {
        let ret = unsafe { syscall3(SYS_READ, fd as usize, &mut byte as *mut u8 as usize, 1) };
        if ret != -(libc::EINTR as isize) {
            assert_eq!(ret, 1, "pipe read failed: {ret}");
            break;
        }
    }
    start.elapsed()
}

/// Blocks in nanosleep(2) for `d`.
/// Also returns the kernel's run-queue wait of the thread over the same span (run_delay in
/// /proc/thread-self/schedstat): what of the elapsed time was not sleep.
#[inline(never)]
/// And the syscall's own time (without the two schedstat reads).
fn workload_nanosleep(d: Duration) -> (Duration, Duration, Duration) {
    let ts = timespec(d);
    let start = Instant::now();
    let delay_before = run_delay();
    let call = Instant::now();
    let ret = unsafe { syscall3(SYS_NANOSLEEP, &ts as *const _ as usize, 0, 0) };
    let call = call.elapsed();
    assert_eq!(ret, 0, "nanosleep failed: {ret}");
    let delay = run_delay() - delay_before;
    (start.elapsed(), delay, call)
}

/// This thread's time waiting on a run queue so far, as the kernel counts it.
fn run_delay() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("run_delay in schedstat");
    Duration::from_nanos(ns)
}

/// Blocks in futex(FUTEX_WAIT) until the helper changes the word and wakes us.
#[inline(never)]
fn workload_futex_wait(word: &AtomicU32) -> Duration {
    let start = Instant::now();
    while word.load(Ordering::Acquire) == 0 {
        unsafe {
            syscall4(
                SYS_FUTEX,
                word.as_ptr() as usize,
                FUTEX_WAIT_PRIVATE,
                0,
                0, // no timeout
            )
        };
    }
    start.elapsed()
}

/// The helper thread: sleeps `d`, then releases the main thread (pipe write or futex wake).
#[inline(never)]
fn helper_release_after(d: Duration, pipe_write_fd: i32, word: &AtomicU32, use_futex: bool) {
    std::thread::sleep(d);
    if use_futex {
        word.store(1, Ordering::Release);
        unsafe { syscall3(SYS_FUTEX, word.as_ptr() as usize, FUTEX_WAKE_PRIVATE, 1) };
    } else {
        let byte = 1u8;
        let ret = unsafe {
            syscall3(
                SYS_WRITE,
                pipe_write_fd as usize,
                &byte as *const u8 as usize,
                1,
            )
        };
        assert_eq!(ret, 1);
    }
}

#[derive(Default)]
struct Totals {
    pipe: Duration,
    nanosleep: Duration,
    nanosleep_run_delay: Duration,
    futex: Duration,
    /// The longest single call of each: what one lost block can be at most.
    longest: [Duration; 3],
    /// Each nanosleep syscall's own time, in order.
    nanosleeps: Vec<Duration>,
    /// What each asked for, and when it returned (Unix time, ns).
    nanosleeps_asked: Vec<Duration>,
    nanosleeps_end_unix_ns: Vec<u128>,
}

#[inline(never)]
fn run_iterations(iterations: u32, block: Duration, vary: Duration) -> Totals {
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let word = Arc::new(AtomicU32::new(0));
    let mut totals = Totals::default();
    for i in 0..iterations {
        let helper_word = Arc::clone(&word);
        let write_fd = fds[1];
        let helper =
            std::thread::spawn(move || helper_release_after(block, write_fd, &helper_word, false));
        let blocked = workload_pipe_read(fds[0]);
        totals.pipe += blocked;
        totals.longest[0] = totals.longest[0].max(blocked);
        helper.join().expect("helper");

        let left = iterations.saturating_sub(1 + i) as u64;
        let asked = block + vary * left as u32 / iterations.saturating_sub(1).max(1);
        let (slept, delay, call) = workload_nanosleep(asked);
        totals.nanosleeps_end_unix_ns.push(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos(),
        );
        totals.nanosleeps_asked.push(asked);
        totals.nanosleep += slept;
        totals.longest[1] = totals.longest[1].max(slept);
        totals.nanosleep_run_delay += delay;
        totals.nanosleeps.push(call);

        word.store(0, Ordering::Release);
        let helper_word = Arc::clone(&word);
        let helper =
            std::thread::spawn(move || helper_release_after(block, write_fd, &helper_word, true));
        let blocked = workload_futex_wait(&word);
        totals.futex += blocked;
        totals.longest[2] = totals.longest[2].max(blocked);
        helper.join().expect("helper");
    }
    totals
}

fn main() {
    let mut iterations = 10u32;
    let mut block_ms = 20u64;
    let mut vary_ms = 0u64;
    let mut report = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("missing value");
        match arg.as_str() {
            "--iterations" => iterations = value().parse().expect("number"),
            "--block-ms" => block_ms = value().parse().expect("number"),
            "--vary-ms" => vary_ms = value().parse().expect("number"),
            "--report" => report = Some(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    println!("ready {}", std::process::id());
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");

    let totals = run_iterations(
        iterations,
        Duration::from_millis(block_ms),
        Duration::from_millis(vary_ms),
    );
    let list = |values: Vec<String>| values.join(",");
    let nanosleeps: Vec<String> = totals
        .nanosleeps
        .iter()
        .map(|d| d.as_nanos().to_string())
        .collect();
    let json = format!(
        "{{\"pid\":{},\"iterations\":{iterations},\"blocked_ns\":{{\"workload_pipe_read\":{},\
         \"workload_nanosleep\":{},\"workload_futex_wait\":{}}},\"nanosleep_run_delay_ns\":{},\"nanosleep_ns\":[{}],\"nanosleep_asked_ns\":[{}],\"nanosleep_end_unix_ns\":[{}],\"longest_ns\":{{\"workload_pipe_read\":{},\
         \"workload_nanosleep\":{},\"workload_futex_wait\":{}}}}}\n",
        std::process::id(),
        totals.pipe.as_nanos(),
        totals.nanosleep.as_nanos(),
        totals.futex.as_nanos(),
        totals.nanosleep_run_delay.as_nanos(),
        nanosleeps.join(","),
        list(
            totals
                .nanosleeps_asked
                .iter()
                .map(|d| d.as_nanos().to_string())
                .collect()
        ),
        list(
            totals
                .nanosleeps_end_unix_ns
                .iter()
                .map(|t| t.to_string())
                .collect()
        ),
        totals.longest[0].as_nanos(),
        totals.longest[1].as_nanos(),
        totals.longest[2].as_nanos()
    );
    match report {
        Some(path) => std::fs::write(path, json).expect("write report"),
        None => print!("{json}"),
    }
}
