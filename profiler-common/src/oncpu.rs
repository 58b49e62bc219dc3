//! On-CPU probe family: perf_event cpu-clock samples with kernel and user stacks.

/// Entries of the on-CPU sample-count map (`COUNTS`): userspace reports how full it got.
pub const COUNTS_MAX: u32 = 16384;

/// Aggregation key: samples per (process, thread, kernel stack, user stack).
/// Negative stack ids are errnos, as in `offcpu::OffcpuKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OncpuKey {
    pub tgid: u32,
    pub tid: u32,
    pub kernel_stack_id: i32,
    pub user_stack_id: i32,
}

/// Indexes into the per-CPU `ONCPU_COUNTERS` array.
pub mod counter {
    /// Samples aggregated into the map.
    pub const SAMPLES: u32 = 0;
    /// Samples that hit the idle task.
    pub const IDLE_SAMPLES: u32 = 1;
    /// No kernel stack: the sample was taken in user mode (normal), or the walk failed.
    pub const KERNEL_STACK_MISSING: u32 = 2;
    pub const USER_STACK_MISSING: u32 = 3;
    pub const STACK_COLLISION: u32 = 4;
    /// The aggregation map was full: a sample was lost.
    pub const AGG_MAP_FULL: u32 = 5;
    pub const EVENTS_LOST: u32 = 6;
    pub const COUNT: u32 = 7;

    pub const NAMES: [&str; COUNT as usize] = [
        "samples",
        "idle_samples",
        "kernel_stack_missing",
        "user_stack_missing",
        "stack_collisions",
        "agg_map_full",
        "events_lost",
    ];
}

pub mod maps {
    pub const COUNTS: &str = "ONCPU_COUNTS";
    pub const COUNTERS: &str = "ONCPU_COUNTERS";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers; every bit pattern is valid.
    unsafe impl aya::Pod for super::OncpuKey {}
}
