//! Test workload for on-CPU sampling: `busy_spin` burns CPU for a known wall time; a little
//! other work runs around it. Prints `ready PID`, waits for a line on stdin, then prints its
//! own CPU time from getrusage (the oracle) as `cpu_ns N`.

use std::hint::black_box;
use std::io::BufRead as _;
use std::time::{Duration, Instant};

/// Pure computation for `wall` of wall time (checking the clock rarely, so nearly every
/// sample lands in this function's own code).
#[inline(never)]
fn busy_spin(wall: Duration) -> u64 {
    let start = Instant::now();
    let mut x = 1u64;
    loop {
        for i in 0..20_000u64 {
            x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
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

fn main() {
    let ms: u64 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    println!("ready {}", std::process::id());
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");
    black_box(busy_spin(Duration::from_millis(ms)));
    println!("cpu_ns {}", cpu_ns());
}
