//! Off-CPU probe family: where threads wait, with kernel and user stacks.

/// Aggregation key: one entry per (process, thread, kernel stack, user stack, block reason).
///
/// A negative stack id is the errno `bpf_get_stackid` returned (e.g. -14 EFAULT: no user
/// stack, as for kernel threads; -17 EEXIST: stack-map collision), kept so that the time is
/// still accounted and the reason shows in the output.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OffcpuKey {
    pub tgid: u32,
    pub tid: u32,
    pub kernel_stack_id: i32,
    pub user_stack_id: i32,
    /// One of the `STATE_*` classes.
    pub state: u32,
    /// While the thread waited for a client-side database query: the query's
    /// `db::frame_hash` (and `user_stack_id` is the stack that issued it); else 0.
    pub db_frame: u32,
}

/// Aggregated blocked time for one key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffcpuValue {
    pub total_ns: u64,
    pub count: u64,
}

/// What a thread left the CPU with, kept (per thread id) until it runs again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffcpuStart {
    /// 0 once consumed by the switch-in.
    pub start_ns: u64,
    pub tgid: u32,
    pub kernel_stack_id: i32,
    pub user_stack_id: i32,
    pub state: u32,
    /// When sched_wakeup made the thread runnable again (0: not yet, or preempted).
    pub wakeup_ns: u64,
    /// See `OffcpuKey::db_frame`.
    pub db_frame: u32,
    pub _pad: u32,
}

/// Run-queue latency histogram key: per process, log2 bucket of the nanoseconds a thread
/// waited for a CPU (after a wakeup, or after being preempted). Bucket `b` holds waits in
/// [2^(b-1), 2^b) ns; bucket 0 holds 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunqKey {
    pub tgid: u32,
    pub bucket: u32,
}

/// Buckets in the run-queue histogram (the last one takes everything above 2^38 ns).
pub const RUNQ_BUCKETS: u32 = 40;
/// Entries of the off-CPU aggregation map (`TOTALS`): userspace reports how full it got.
pub const TOTALS_MAX: u32 = 16384;

/// Why the thread left the CPU (the task state at sched_switch).
pub const STATE_RUNQUEUE: u32 = 0;
/// TASK_INTERRUPTIBLE (`S`): sleeping, waiting for an event.
pub const STATE_SLEEP: u32 = 1;
/// TASK_UNINTERRUPTIBLE (`D`) without NOLOAD: usually disk or other uninterruptible I/O.
pub const STATE_DISK: u32 = 2;
/// TASK_IDLE (`I`): uninterruptible but not counted in load (idle kernel workers).
pub const STATE_IDLE: u32 = 3;
/// Stopped, traced, dead, parked…
pub const STATE_OTHER: u32 = 4;
pub const STATE_COUNT: u32 = 5;

/// `STATE_FILTER` value that accepts every state.
pub const STATE_MASK_ANY: u32 = (1 << STATE_COUNT) - 1;

/// Indexes into the per-CPU `OFFCPU_COUNTERS` array. Nothing is dropped silently: every loss
/// has a counter that the output shows.
pub mod counter {
    /// Blocks aggregated into the map.
    pub const BLOCKS: u32 = 0;
    /// Blocks shorter than `--min-block` or longer than `--max-block`.
    pub const FILTERED_DURATION: u32 = 1;
    /// Kernel stack could not be collected (other than collisions).
    pub const KERNEL_STACK_ERROR: u32 = 2;
    /// No user stack (kernel threads, or a fault while walking it).
    pub const USER_STACK_MISSING: u32 = 3;
    /// Stack-map hash collision in both the main and the overflow stack map: a stack was lost
    /// (its time is kept under a placeholder).
    pub const STACK_COLLISION: u32 = 4;
    /// The per-thread start map was full: a block was not measured.
    pub const START_MAP_FULL: u32 = 5;
    /// The aggregation map was full: a block's time was lost (see `LOST_NS`).
    pub const AGG_MAP_FULL: u32 = 6;
    /// Nanoseconds of blocked time lost because the aggregation map was full.
    pub const LOST_NS: u32 = 7;
    /// New-task notifications that did not fit in the ring buffer.
    pub const EVENTS_LOST: u32 = 8;
    /// A switch-out found the thread's previous switch-out still pending: the switch-in in
    /// between never reached the program (the time since that earlier switch-out is lost).
    pub const SWITCH_IN_MISSED: u32 = 9;
    /// A switch-in found no pending switch-out for a thread that has one recorded before.
    pub const SWITCH_OUT_MISSED: u32 = 10;
    /// Of `SWITCH_IN_MISSED`: the pending switch-out had seen its wakeup, so its blocked part
    /// (switch-out to wakeup) was still recorded; only the wait for a CPU after it is lost.
    pub const SWITCH_IN_MISSED_RECOVERED: u32 = 11;
    /// A thread came back from a block whose wakeup never reached the sched_wakeup program
    /// (with the run-queue split on): its wait for a CPU is counted as blocked time.
    pub const WAKEUP_MISSED: u32 = 12;
    /// Number of counters.
    pub const COUNT: u32 = 13;

    /// Human-readable names, indexed like the counters.
    pub const NAMES: [&str; COUNT as usize] = [
        "blocks",
        "filtered_by_duration",
        "kernel_stack_errors",
        "user_stack_missing",
        "stack_collisions",
        "start_map_full",
        "agg_map_full",
        "lost_ns",
        "events_lost",
        "switch_in_missed",
        "switch_out_missed",
        "switch_in_missed_recovered",
        "wakeup_missed",
    ];
}

/// Map names, shared so that the loader and the programs cannot disagree.
pub mod maps {
    pub const STARTS: &str = "OFFCPU_STARTS";
    pub const TOTALS: &str = "OFFCPU_TOTALS";
    pub const COUNTERS: &str = "OFFCPU_COUNTERS";
    pub const RUNQ_HIST: &str = "OFFCPU_RUNQ_HIST";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::OffcpuKey {}
    unsafe impl aya::Pod for super::OffcpuValue {}
    unsafe impl aya::Pod for super::OffcpuStart {}
    unsafe impl aya::Pod for super::RunqKey {}
}
