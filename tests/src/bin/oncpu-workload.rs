//! Test workload for on-CPU sampling: `busy_spin` burns CPU for a known wall time.
//! `oncpu-workload MS` spins MS ms and prints its CPU time from getrusage as `cpu_ns N`;
//! `oncpu-workload alternate N` does N cycles of 100 ms spinning and 100 ms sleeping and
//! prints its own timing of both as `busy_ns B sleep_ns S`. Either way it prints `ready PID`
//! first and waits for a line on stdin. These are the oracles the tests compare with.

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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
