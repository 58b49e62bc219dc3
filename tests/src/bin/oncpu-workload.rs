//! Test workload for on-CPU sampling: `busy_spin` burns CPU for a known wall time.
//! `oncpu-workload MS` spins MS ms and prints its CPU time from getrusage as `cpu_ns N`;
//! `oncpu-workload alternate N` does N cycles of 100 ms spinning and 100 ms sleeping and
//! prints its own timing of both as `busy_ns B sleep_ns S`. Either way it prints `ready PID`
//! first and waits for a line on stdin. `oncpu-workload contend N MS` runs N threads pinned
//! to CPU 0, each spinning MS ms of wall time, and prints for each `tid T run_delay_ns D`:
//! the time the kernel says (/proc/thread-self/schedstat) the thread waited on a run queue.
//! These are the oracles the tests compare with.

use std::hint::black_box;
use std::io::BufRead as _;
use std::time::{Duration, Instant};

/// Pure computation for `wall` of wall time. The work is an inline-assembly loop so that,
/// even in a debug build, no helper call (whose prologue would hide this frame from
/// frame-pointer unwinding) runs in it; the clock is checked only about once a millisecond.
#[inline(never)]
fn busy_spin(wall: Duration) -> u64 {
    let start = Instant::now();
    let mut x = 1u64;
    loop {
        // SAFETY: register-only arithmetic.
        unsafe {
            std::arch::asm!(
                "2:",
                "imul {x}, {x}, 13",
                "add {x}, 1",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) x,
                n = inout(reg) 1_000_000u64 => _,
                options(nomem, nostack),
            );
        }
        if start.elapsed() >= wall {
            return x;
        }
    }
}

fn cpu_ns() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to fill.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

/// Sleeps with a raw nanosleep from this function's own code.
#[inline(never)]
fn sleep_between(d: Duration) {
    profiler_tests::rawsys::nanosleep(d);
}

#[inline(never)]
fn alternate(cycles: u32) -> (Duration, Duration) {
    let (mut busy, mut slept) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..cycles {
        let start = Instant::now();
        black_box(busy_spin(Duration::from_millis(100)));
        busy += start.elapsed();
        let start = Instant::now();
        sleep_between(Duration::from_millis(100));
        slept += start.elapsed();
    }
    (busy, slept)
}

/// The kernel's run_delay (ns waiting on a run queue) of the calling thread.
fn run_delay_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("run_delay")
}

/// A thread pinned to CPU 0 that spins, returning (tid, run_delay while it spun).
#[inline(never)]
fn contend_on_cpu0(wall: Duration) -> (i32, u64) {
    // SAFETY: a zeroed cpu_set_t with one CPU set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0
        );
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let before = run_delay_ns();
    black_box(busy_spin(wall));
    (tid, run_delay_ns() - before)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("contend") {
        let threads: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(3);
        let ms: u64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1000);
        println!("ready {}", std::process::id());
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).expect("stdin");
        let handles: Vec<_> = (0..threads)
            .map(|_| std::thread::spawn(move || contend_on_cpu0(Duration::from_millis(ms))))
            .collect();
        for handle in handles {
            let (tid, delay) = handle.join().expect("thread");
            println!("tid {tid} run_delay_ns {delay}");
        }
        println!("done");
        return;
    }
    println!("ready {}", std::process::id());
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");
    if args.first().map(String::as_str) == Some("alternate") {
        let cycles = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(10);
        let (busy, slept) = alternate(cycles);
        println!("busy_ns {} sleep_ns {}", busy.as_nanos(), slept.as_nanos());
        return;
    }
    let ms: u64 = args.first().and_then(|v| v.parse().ok()).unwrap_or(1500);
    black_box(busy_spin(Duration::from_millis(ms)));
    println!("cpu_ns {}", cpu_ns());
}
