//! What the probe families share: pid/tid filters, the stack maps (with an overflow map for
//! hash collisions) and the ring buffer that tells userspace about new tasks.

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_probe_read_kernel, generated::bpf_get_current_ancestor_cgroup_id,
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, RingBuf, StackTrace},
    programs::tracing::StackIdContext,
};
use profiler_common::db::DbInflight;
use profiler_common::shared::{
    CGROUP_MAX_LEVEL, NewTaskEvent, OVERFLOW_STACK_BIT, THREADS_ALL, THREADS_KERNEL,
};

// ---- Configuration, set by the loader before load (read-only globals). ----

/// 1: only threads whose tgid is in `TGID_FILTER`.
#[unsafe(no_mangle)]
static FILTER_TGID: u32 = 0;
/// 1: only threads whose tid is in `TID_FILTER`.
#[unsafe(no_mangle)]
static FILTER_TID: u32 = 0;
/// `THREADS_*`.
#[unsafe(no_mangle)]
static THREAD_KIND: u32 = THREADS_ALL;
/// `--cgroup`: bit `1 << level` set for each level below the cgroup2 root at which a
/// recorded cgroup lies (its id in `CGROUP_FILTER`); 0: no cgroup filter.
#[unsafe(no_mangle)]
static CGROUP_LEVELS: u32 = 0;
/// A process left out (the profiler itself, `--exclude-self`); 0: none.
#[unsafe(no_mangle)]
static EXCLUDE_TGID: u32 = 0;
/// Offsets in `struct task_struct`, from the running kernel's BTF.
#[unsafe(no_mangle)]
pub static TASK_PID_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_FLAGS_OFF: u32 = 0;
#[unsafe(no_mangle)]
pub static TASK_COMM_OFF: u32 = 0;
#[unsafe(no_mangle)]
pub static TASK_STATE_OFF: u32 = 0;

/// 1: the db family tracks threads waiting for client-side queries in `DB_INFLIGHT`.
#[unsafe(no_mangle)]
pub static DB_INFLIGHT_ON: u32 = 0;

/// Sampled mode (the daemon's CPU budget): record one off-CPU block (one database query) in
/// `MASK + 1`, chosen at random; 0 records every one. Userspace scales the totals back up.
#[unsafe(no_mangle)]
pub static OFFCPU_SAMPLE_MASK: u32 = 0;
#[unsafe(no_mangle)]
pub static DB_SAMPLE_MASK: u32 = 0;

/// Whether this event is left out by sampling (`mask` from a `*_SAMPLE_MASK` global).
#[inline(always)]
pub fn sampled_out(mask: u32) -> bool {
    // The generator's low bits repeat with a short period when one thread calls it back to
    // back on a CPU (one in four exactly, every time, in the tests): use its high bits.
    mask != 0 && (unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() } >> 16) & mask != 0
}

const PF_KTHREAD: u32 = 0x0020_0000;
const EEXIST: i32 = 17;

// ---- Maps. Sizes are defaults; the loader may resize them. ----

#[map(name = "STACKS")]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// Second chance for stacks whose bucket in `STACKS` is taken (the kernel hashes with the
/// same function, but a different bucket count spreads the colliders apart).
#[map(name = "STACKS_OVERFLOW")]
static STACKS_OVERFLOW: StackTrace = StackTrace::with_max_entries(4096, 0);

#[map(name = "NEW_TASKS")]
static NEW_TASKS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Threads waiting for a client-side database query (set by the db family, read by
/// off-CPU at switch-out).
#[map(name = "DB_INFLIGHT")]
pub static DB_INFLIGHT: LruHashMap<u32, DbInflight> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "TGID_FILTER")]
static TGID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

#[map(name = "TID_FILTER")]
static TID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

#[map(name = "CGROUP_FILTER")]
static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(64, 0);

/// A `bpf_loop` callback: (index, the loop's state) → 0 to go on, 1 to stop.
pub type LoopStep = extern "C" fn(u64, *mut core::ffi::c_void) -> i64;

/// Runs `step` up to `times` times over `state` (on the caller's stack: the verifier wants
/// the loop's context there) with `bpf_loop`.
#[inline(always)]
pub fn bounded_loop<T>(times: u32, step: LoopStep, state: &mut T) {
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            times,
            step as *const () as *mut core::ffi::c_void,
            state as *mut T as *mut core::ffi::c_void,
            0,
        );
    }
}

#[inline(always)]
pub fn config<T: Copy>(global: &T) -> T {
    // Volatile so the compiler does not fold the defaults: the loader rewrites them.
    unsafe { core::ptr::read_volatile(global) }
}

/// Whether the current task lies in one of the `--cgroup` subtrees (true without the filter).
#[inline(always)]
pub fn cgroup_wanted() -> bool {
    config(&CGROUP_LEVELS) == 0 || in_filtered_cgroup()
}

/// The check itself, a BPF subprogram (one copy, whichever program calls it): the current
/// task's ancestor at each level named is looked up among the recorded cgroups.
#[inline(never)]
fn in_filtered_cgroup() -> bool {
    let levels = config(&CGROUP_LEVELS);
    for level in 0..=CGROUP_MAX_LEVEL {
        if levels & (1 << level) != 0 {
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id != 0 && unsafe { CGROUP_FILTER.get(&id) }.is_some() {
                return true;
            }
        }
    }
    false
}

/// Whether a thread passes the pid/tid filters — for a thread that is not the current one
/// (the cgroup filter, which only sees the current task, is the caller's to apply earlier).
#[inline(always)]
pub fn wanted_owner_ids(tgid: u32, tid: u32) -> bool {
    let excluded = config(&EXCLUDE_TGID);
    if excluded != 0 && tgid == excluded {
        return false;
    }
    if config(&FILTER_TGID) != 0 && unsafe { TGID_FILTER.get(tgid) }.is_none() {
        return false;
    }
    if config(&FILTER_TID) != 0 && unsafe { TID_FILTER.get(tid) }.is_none() {
        return false;
    }
    true
}

/// Whether the current thread (`tgid`, `tid`) passes the pid/tid filters and the cgroup
/// filter.
#[inline(always)]
pub fn wanted_ids(tgid: u32, tid: u32) -> bool {
    wanted_owner_ids(tgid, tid) && cgroup_wanted()
}

/// Whether `task` (a task_struct) is a kernel thread.
#[inline(always)]
pub fn is_kernel_thread(task: *const u8) -> bool {
    let flags: u32 =
        unsafe { bpf_probe_read_kernel(task.add(config(&TASK_FLAGS_OFF) as usize) as *const u32) }
            .unwrap_or(0);
    flags & PF_KTHREAD != 0
}

/// Whether the current thread passes the pid/tid and cgroup filters and, when asked, the
/// user/kernel thread filter (`task` is its task_struct).
#[inline(always)]
pub fn wanted(tgid: u32, tid: u32, task: *const u8) -> bool {
    wanted_ids(tgid, tid) && (config(&THREAD_KIND) == THREADS_ALL || kind_wanted(task))
}

/// [`wanted`] for the current thread, reading its task_struct only when the user/kernel
/// thread filter is on (hot paths that need the task for nothing else).
#[inline(always)]
pub fn wanted_current(tgid: u32, tid: u32) -> bool {
    wanted_ids(tgid, tid)
        && (config(&THREAD_KIND) == THREADS_ALL
            || kind_wanted(unsafe { bpf_get_current_task() } as *const u8))
}

/// Whether `task` is of the kind of thread asked for (user or kernel).
#[inline(always)]
fn kind_wanted(task: *const u8) -> bool {
    let flags: u32 =
        unsafe { bpf_probe_read_kernel(task.add(config(&TASK_FLAGS_OFF) as usize) as *const u32) }
            .unwrap_or(0);
    let is_kernel = flags & PF_KTHREAD != 0;
    is_kernel == (config(&THREAD_KIND) == THREADS_KERNEL)
}

/// Why a stack could not be stored.
pub enum StackError {
    /// Both stack maps had another stack in this one's bucket.
    Collision(i32),
    /// No stack to walk (kernel thread's user stack) or the walk failed.
    Missing(i32),
}

/// A stack id for the current context, trying the overflow map on a collision.
#[inline(always)]
pub fn stack_id<C: StackIdContext>(ctx: &C, flags: u64) -> Result<i32, StackError> {
    match ctx.get_stackid(&STACKS, flags) {
        Ok(id) => Ok(id as i32),
        Err(err) if err == -EEXIST => match ctx.get_stackid(&STACKS_OVERFLOW, flags) {
            Ok(id) => Ok(id as i32 | OVERFLOW_STACK_BIT),
            Err(err) => Err(StackError::Collision(err)),
        },
        Err(err) => Err(StackError::Missing(err)),
    }
}

/// Tells userspace about a task it may not know yet. `comm` points at its 16-byte name
/// (kernel memory). Returns false when the ring buffer is full.
#[inline(always)]
pub fn notify_new_task(tgid: u32, tid: u32, comm: *const u8) -> bool {
    notify_task(tgid, tid, comm, 0)
}

/// [`notify_new_task`], with `exec` (1: the process just exec'd).
#[inline(always)]
fn notify_task(tgid: u32, tid: u32, comm: *const u8, exec: u32) -> bool {
    match NEW_TASKS.reserve::<NewTaskEvent>(0) {
        Some(mut entry) => {
            let event = entry.as_mut_ptr();
            unsafe {
                (*event).tgid = tgid;
                (*event).tid = tid;
                (*event).comm = bpf_probe_read_kernel(comm as *const [u8; 16]).unwrap_or([0; 16]);
                (*event).exec = exec;
                (*event)._pad = 0;
            }
            entry.submit(0);
            true
        }
        None => false,
    }
}

/// log2 histogram bucket: `b` such that 2^(b-1) <= ns < 2^b (0 for 0), capped at
/// `buckets - 1`. Unrolled binary search: no loop for the verifier, no clz instruction.
#[inline(always)]
pub fn log2_bucket(ns: u64, buckets: u32) -> u32 {
    let mut v = ns;
    let mut bucket = 0;
    for shift in [32u32, 16, 8, 4, 2, 1] {
        if v >> shift != 0 {
            v >>= shift;
            bucket += shift;
        }
    }
    let bucket = if ns == 0 { 0 } else { bucket + 1 };
    if bucket >= buckets {
        buckets - 1
    } else {
        bucket
    }
}

/// A process exec'd: userspace re-reads its maps and name and reloads its unwinding tables
/// (those it read before belong to the program it was; a shell's child that execs a command
/// and exits before the next refresh would keep the shell's). Only processes the filters
/// want. When the ring is full the notice is lost and the maps are read again at the
/// process's next first-seen event or at the end, as before this program existed.
#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(_ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    crate::unwind::forget_process(tgid);
    let comm =
        unsafe { (bpf_get_current_task() as *const u8).add(config(&TASK_COMM_OFF) as usize) };
    let _ = notify_task(tgid, tid, comm, 1);
    0
}
