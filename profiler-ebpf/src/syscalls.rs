//! Syscall latency from raw_syscalls sys_enter/sys_exit: per (tgid, syscall) count, errors,
//! total, max and a log2 histogram; the user stack of calls slower than `SLOW_SYSCALL_NS`.
//!
//! Two entry points per hook share the logic: `tp_btf/sys_enter|sys_exit` (preferred: the
//! arguments are read from the call itself) and the classic `raw_syscalls` tracepoints
//! (fallback: the kernel fills a trace record per call), picked by the loader.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, TracePointContext, tracing::StackIdContext},
};
use profiler_common::syscalls::{
    HIST_BUCKETS, STATS_MAX, SlowKey, SlowValue, SyscallKey, SyscallStart, SyscallStats, counter,
};

use crate::common::{
    StackError, TASK_COMM_OFF, config, log2_bucket, notify_new_task, stack_id, wanted_current,
};

/// Calls at least this long keep their user stack.
#[unsafe(no_mangle)]
static SLOW_SYSCALL_NS: u64 = 10_000_000;
/// Offsets of `id` and `ret` in the raw_syscalls records (from their format files).
#[unsafe(no_mangle)]
static TP_SYS_ENTER_ID_OFF: u32 = 8;
#[unsafe(no_mangle)]
static TP_SYS_EXIT_ID_OFF: u32 = 8;
#[unsafe(no_mangle)]
static TP_SYS_EXIT_RET_OFF: u32 = 16;

/// LRU: threads that die inside a call (exit) never reach sys_exit; their entries age out.
#[map(name = "SYSCALL_STARTS")]
static STARTS: LruHashMap<u32, SyscallStart> = LruHashMap::with_max_entries(32768, 0);

/// Per CPU: each CPU adds to its own copy with plain adds (no atomics, no cache line shared
/// between CPUs); userspace sums the copies. Not preallocated: an entry costs its value size
/// times the number of CPUs, so only the keys in use take memory.
#[map(name = "SYSCALL_STATS")]
static STATS: PerCpuHashMap<SyscallKey, SyscallStats> =
    PerCpuHashMap::with_max_entries(STATS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "SYSCALL_SLOW")]
static SLOW: HashMap<SlowKey, SlowValue> = HashMap::with_max_entries(16384, 0);

#[map(name = "SYSCALL_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// One all-zero `SyscallStats` (never written): a new entry's first value.
#[map(name = "SYSCALL_ZERO")]
static ZERO: Array<SyscallStats> = Array::with_max_entries(1, 0);

/// The window being counted: userspace bumps it where a daemon window that keeps these
/// programs ends, and each copy's maximum restarts at its first call after that.
#[map(name = "SYSCALL_WINDOW")]
static WINDOW: Array<u64> = Array::with_max_entries(1, 0);

const BPF_NOEXIST: u64 = 1;
const BPF_F_NO_PREALLOC: u32 = 1;

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

/// `tp_btf/sys_enter(struct pt_regs *regs, long id)`: the arguments come straight from the
/// tracepoint call, no trace record is filled.
#[btf_tracepoint(function = "sys_enter")]
pub fn syscalls_enter_btf(ctx: BtfTracePointContext) -> u32 {
    enter(ctx.arg::<i64>(1))
}

/// `tp_btf/sys_exit(struct pt_regs *regs, long ret)`.
#[btf_tracepoint(function = "sys_exit")]
pub fn syscalls_exit_btf(ctx: BtfTracePointContext) -> u32 {
    exit(&ctx, ctx.arg::<i64>(1))
}

/// Fallback: the classic tracepoint (the kernel fills a trace record for each call).
#[tracepoint(category = "raw_syscalls", name = "sys_enter")]
pub fn syscalls_enter_tp(ctx: TracePointContext) -> u32 {
    let nr = unsafe { ctx.read_at::<i64>(config(&TP_SYS_ENTER_ID_OFF) as usize) }.unwrap_or(-1);
    enter(nr)
}

#[tracepoint(category = "raw_syscalls", name = "sys_exit")]
pub fn syscalls_exit_tp(ctx: TracePointContext) -> u32 {
    let ret = unsafe { ctx.read_at::<i64>(config(&TP_SYS_EXIT_RET_OFF) as usize) }.unwrap_or(0);
    exit(&ctx, ret)
}

#[inline(always)]
fn enter(nr: i64) -> u32 {
    if nr < 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if !wanted_current(tgid, tid) {
        return 0;
    }
    let start = SyscallStart {
        start_ns: unsafe { bpf_ktime_get_ns() },
        nr: nr as u32,
        _pad: 0,
    };
    if let Some(slot) = STARTS.get_ptr_mut(tid) {
        unsafe { *slot = start };
    } else if STARTS.insert(tid, start, 0).is_err() {
        count(counter::START_MAP_FULL);
    }
    0
}

#[inline(always)]
fn exit<C: StackIdContext>(ctx: &C, ret: i64) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    let Some(slot) = STARTS.get_ptr_mut(tid) else {
        return 0;
    };
    let start = unsafe { *slot };
    if start.start_ns == 0 {
        return 0;
    }
    unsafe { (*slot).start_ns = 0 };
    let now = unsafe { bpf_ktime_get_ns() };
    let delta = now.wrapping_sub(start.start_ns);
    count(counter::CALLS);
    let key = SyscallKey { tgid, nr: start.nr };
    let stats = match STATS.get_ptr_mut(&key) {
        Some(stats) => Some(stats),
        None => {
            // From a zeroed map value, not the stack (the struct would crowd the 512-byte
            // stack of the program and the stack walk it calls).
            if let Some(zero) = ZERO.get(0) {
                let _ = STATS.insert(&key, zero, BPF_NOEXIST);
            }
            let stats = STATS.get_ptr_mut(&key);
            if stats.is_some() {
                let comm = unsafe {
                    (bpf_get_current_task() as *const u8).add(config(&TASK_COMM_OFF) as usize)
                };
                if !notify_new_task(tgid, tid, comm) {
                    count(counter::EVENTS_LOST);
                }
            }
            stats
        }
    };
    match stats {
        // This CPU's copy: the program runs with preemption off and does not nest on a CPU
        // (syscalls do not start in interrupts), so nothing else writes it meanwhile.
        Some(stats) => unsafe {
            (*stats).count += 1;
            (*stats).total_ns += delta;
            if ret < 0 {
                (*stats).errors += 1;
            }
            let window = WINDOW.get(0).copied().unwrap_or(0);
            if (*stats).max_window != window {
                (*stats).prev_max_ns = if (*stats).max_window.wrapping_add(1) == window {
                    (*stats).max_ns
                } else {
                    0
                };
                (*stats).max_ns = 0;
                (*stats).max_window = window;
            }
            if delta > (*stats).max_ns {
                (*stats).max_ns = delta;
            }
            let b = log2_bucket(delta, HIST_BUCKETS as u32) as usize;
            if b < HIST_BUCKETS {
                (*stats).hist[b] += 1;
            }
        },
        None => count(counter::STATS_MAP_FULL),
    }
    if delta < config(&SLOW_SYSCALL_NS) {
        return 0;
    }
    let walked = crate::unwind::current_stack(tgid);
    let user_stack_id = match walked.map_or_else(|| stack_id(ctx, BPF_F_USER_STACK as u64), Ok) {
        Ok(id) => id,
        Err(StackError::Collision(err)) => {
            count(counter::STACK_COLLISION);
            err
        }
        Err(StackError::Missing(err)) => {
            count(counter::USER_STACK_MISSING);
            err
        }
    };
    let key = SlowKey {
        tgid,
        tid,
        nr: start.nr,
        user_stack_id,
    };
    if let Some(value) = SLOW.get_ptr_mut(&key) {
        // The key holds the tid: one CPU at a time.
        unsafe {
            (*value).count += 1;
            (*value).total_ns += delta;
        }
    } else if SLOW
        .insert(
            &key,
            &SlowValue {
                count: 1,
                total_ns: delta,
            },
            0,
        )
        .is_err()
    {
        count(counter::SLOW_MAP_FULL);
    }
    0
}
