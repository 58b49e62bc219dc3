//! Workload for user-space unwinding of Rust code built without frame pointers (the tests
//! compile it with `rustc -C opt-level=2 -C force-frame-pointers=no`, std only). It blocks
//! the way Rust programs do, through std and libc, never with raw syscalls:
//!
//!   main → serve → wait_for_signal → Condvar::wait → futex (libc `syscall`)
//!   main → serve → nap → std::thread::sleep → nanosleep (libc)
//!
//! A signaller thread bumps a counter under the mutex and notifies every 20 ms.
//! Prints `ready PID`, waits for a line on stdin, runs ITERATIONS rounds, then prints its own
//! measurement (`Instant`, i.e. CLOCK_MONOTONIC, around each blocking call, summed per
//! function) as `name nanoseconds` lines and `done`: the tests' oracle.
//!
//! Usage: unwind_std ITERATIONS

use std::io::BufRead as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Signal = (Mutex<u64>, Condvar);

/// Waits until the signaller has moved the counter past `seen`; returns the new value and the
/// time this function was blocked.
#[inline(never)]
fn wait_for_signal(signal: &Signal, seen: u64) -> (u64, Duration) {
    let start = Instant::now();
    let (lock, condvar) = signal;
    let mut counter = lock.lock().expect("lock");
    while *counter == seen {
        counter = condvar.wait(counter).expect("wait");
    }
    (*counter, start.elapsed())
}

/// Sleeps through `std::thread::sleep`; returns the time it took.
#[inline(never)]
fn nap(duration: Duration) -> Duration {
    let start = Instant::now();
    std::thread::sleep(duration);
    start.elapsed()
}

/// The per-request work: a short sleep, then a wait for the other thread's signal.
#[inline(never)]
fn serve(signal: &Signal, iterations: u32) -> (Duration, Duration) {
    let (mut napped, mut waited) = (Duration::ZERO, Duration::ZERO);
    let mut seen = *signal.0.lock().expect("lock");
    for _ in 0..iterations {
        napped += nap(Duration::from_millis(10));
        let (now, blocked) = wait_for_signal(signal, seen);
        seen = now;
        waited += blocked;
    }
    (napped, waited)
}

/// Signals every `period` until `finished` (never a fixed count: a late waiter must not wait
/// for a signal that never comes).
#[inline(never)]
fn signal_every(signal: &Signal, period: Duration, finished: &AtomicBool) {
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(period);
        *signal.0.lock().expect("lock") += 1;
        signal.1.notify_all();
    }
}

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: unwind_std ITERATIONS");
    println!("ready {}", std::process::id());
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");

    let signal: Arc<Signal> = Arc::new((Mutex::new(0), Condvar::new()));
    let finished = Arc::new(AtomicBool::new(false));
    let signaller = {
        let (signal, finished) = (Arc::clone(&signal), Arc::clone(&finished));
        std::thread::spawn(move || signal_every(&signal, Duration::from_millis(20), &finished))
    };
    let (napped, waited) = serve(&signal, iterations);
    finished.store(true, Ordering::Relaxed);
    signaller.join().expect("signaller");
    println!("nap_ns {}", napped.as_nanos());
    println!("wait_for_signal_ns {}", waited.as_nanos());
    println!("done");
}
