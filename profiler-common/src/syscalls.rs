//! Syscalls probe family: per (process, syscall) counts, times and log2 latency histograms
//! from raw_syscalls enter/exit, plus user stacks of slow calls.

/// Entries of the per (process, syscall) statistics map.
pub const STATS_MAX: u32 = 16384;

/// Buckets of the latency histogram: bucket `b` holds calls in [2^(b-1), 2^b) ns.
pub const HIST_BUCKETS: usize = 40;

/// Per-thread pending call (sys_enter → sys_exit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallStart {
    /// 0 once consumed by sys_exit.
    pub start_ns: u64,
    pub nr: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SyscallKey {
    pub tgid: u32,
    pub nr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallStats {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// Calls that returned a negative value (an errno).
    pub errors: u64,
    pub hist: [u64; HIST_BUCKETS],
    /// The window (`maps::WINDOW`) `max_ns` is the maximum of: a copy restarts its maximum
    /// at its first call of a newer window, keeping the one before in `prev_max_ns` (a
    /// daemon that keeps its programs reads each window's maximum; counts and times are
    /// read as differences).
    pub max_window: u64,
    pub prev_max_ns: u64,
}

impl Default for SyscallStats {
    fn default() -> Self {
        Self {
            count: 0,
            total_ns: 0,
            max_ns: 0,
            errors: 0,
            hist: [0; HIST_BUCKETS],
            max_window: 0,
            prev_max_ns: 0,
        }
    }
}

/// A slow call's user stack (the kernel stack at sys_exit is only the exit path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlowKey {
    pub tgid: u32,
    pub tid: u32,
    pub nr: u32,
    pub user_stack_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlowValue {
    pub count: u64,
    pub total_ns: u64,
}

pub mod counter {
    pub const CALLS: u32 = 0;
    pub const START_MAP_FULL: u32 = 1;
    pub const STATS_MAP_FULL: u32 = 2;
    pub const SLOW_MAP_FULL: u32 = 3;
    pub const USER_STACK_MISSING: u32 = 4;
    pub const STACK_COLLISION: u32 = 5;
    pub const EVENTS_LOST: u32 = 6;
    pub const COUNT: u32 = 7;

    pub const NAMES: [&str; COUNT as usize] = [
        "calls",
        "start_map_full",
        "stats_map_full",
        "slow_map_full",
        "user_stack_missing",
        "stack_collisions",
        "events_lost",
    ];
}

pub mod maps {
    pub const STARTS: &str = "SYSCALL_STARTS";
    pub const STATS: &str = "SYSCALL_STATS";
    pub const SLOW: &str = "SYSCALL_SLOW";
    pub const COUNTERS: &str = "SYSCALL_COUNTERS";
    /// One u64: the window being counted (0 until userspace starts a second one).
    pub const WINDOW: &str = "SYSCALL_WINDOW";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::SyscallStart {}
    unsafe impl aya::Pod for super::SyscallKey {}
    unsafe impl aya::Pod for super::SyscallStats {}
    unsafe impl aya::Pod for super::SlowKey {}
    unsafe impl aya::Pod for super::SlowValue {}
}
