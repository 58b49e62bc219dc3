//! What every probe family shares: the stack maps, the pid/tid filters and the ring buffer
//! of first-seen tasks.

/// The user "stack id" of a kernel thread: it has no user stack (not a lost one).
pub const KERNEL_THREAD_STACK: i32 = -2;

/// Stack ids with this bit set live in the overflow stack map (`STACKS_OVERFLOW`): a stack
/// whose bucket in the main map holds another stack goes there instead of being lost.
pub const OVERFLOW_STACK_BIT: i32 = 1 << 30;

/// Sent on the ring buffer the first time a family creates an aggregation key, so userspace
/// can read the process's memory maps and name while the process lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewTaskEvent {
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    /// 1: the process just exec'd (`sched_process_exec`): its maps, name and unwinding
    /// tables are new, whatever was read before.
    pub exec: u32,
    pub _pad: u32,
}

/// `THREAD_KIND` values.
pub const THREADS_ALL: u32 = 0;
pub const THREADS_USER: u32 = 1;
pub const THREADS_KERNEL: u32 = 2;

/// Map names, shared so that the loader and the programs cannot disagree.
pub mod maps {
    pub const STACKS: &str = "STACKS";
    pub const STACKS_OVERFLOW: &str = "STACKS_OVERFLOW";
    pub const NEW_TASKS: &str = "NEW_TASKS";
    pub const TGID_FILTER: &str = "TGID_FILTER";
    /// `--cgroup`: the cgroup2 ids whose subtrees are recorded.
    pub const CGROUP_FILTER: &str = "CGROUP_FILTER";
    pub const TID_FILTER: &str = "TID_FILTER";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers; every bit pattern is valid.
    unsafe impl aya::Pod for super::NewTaskEvent {}
}

/// Cgroups deeper than this below the cgroup2 root cannot be named with `--cgroup` (the
/// kernel checks the current task's ancestor at each level named, up to this one).
pub const CGROUP_MAX_LEVEL: u32 = 15;
