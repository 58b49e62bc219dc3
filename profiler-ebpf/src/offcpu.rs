//! Off-CPU time with stacks, from sched_switch.
//!
//! At switch-out the leaving thread (`prev`, which is still `current`) records when it left and
//! its kernel and user stack ids in `OFFCPU_STARTS`, keyed by thread id. At switch-in the arriving
//! thread (`next`) finds that record, and the elapsed time is added to `OFFCPU_TOTALS` under
//! (tgid, tid, kernel stack, user stack, state). Nothing else happens per switch: no comm copy,
//! no map update beyond the two needed; a new aggregation key (rare) also notifies userspace so
//! it can read the process's memory maps while the process lives.
//!
//! Two entry points share the logic: `tp_btf/sched_switch` (preferred) and the classic
//! `sched:sched_switch` tracepoint (fallback), picked by the loader after probing the kernel.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::{BtfTracePointContext, TracePointContext, tracing::StackIdContext},
};
use profiler_common::offcpu::{
    OffcpuKey, OffcpuStart, OffcpuValue, RUNQ_BUCKETS, RunqKey, STATE_DISK, STATE_IDLE,
    STATE_MASK_ANY, STATE_OTHER, STATE_RUNQUEUE, STATE_SLEEP, TOTALS_MAX, counter,
};
use profiler_common::shared::KERNEL_THREAD_STACK;

use crate::common::{
    DB_INFLIGHT, DB_INFLIGHT_ON, OFFCPU_SAMPLE_MASK, StackError, TASK_COMM_OFF, TASK_PID_OFF,
    TASK_STATE_OFF, config, is_kernel_thread, log2_bucket, notify_new_task, sampled_out, stack_id,
    wanted,
};

// ---- Configuration, set by the loader before load (read-only globals). ----

#[unsafe(no_mangle)]
static MIN_BLOCK_NS: u64 = 0;
#[unsafe(no_mangle)]
static MAX_BLOCK_NS: u64 = u64::MAX;
/// Bit `1 << STATE_*` set for each accepted state class.
#[unsafe(no_mangle)]
static STATE_FILTER: u32 = STATE_MASK_ANY;
/// 1 when the sched_wakeup program is attached (the run-queue split).
#[unsafe(no_mangle)]
static RUNQ_SPLIT: u32 = 1;
/// 1 when `btf_trace_sched_switch` carries `prev_state` as its 4th argument (5.18+).
#[unsafe(no_mangle)]
static BTF_HAS_PREV_STATE_ARG: u32 = 1;
/// Field offsets in the `sched:sched_switch` tracepoint record, from its format file.
#[unsafe(no_mangle)]
static TP_PREV_STATE_OFF: u32 = 32;
#[unsafe(no_mangle)]
static TP_NEXT_COMM_OFF: u32 = 40;
#[unsafe(no_mangle)]
static TP_NEXT_PID_OFF: u32 = 56;
/// `pid` in the `sched:sched_wakeup` record.
#[unsafe(no_mangle)]
static TP_WAKEUP_PID_OFF: u32 = 24;
/// The tracepoint's value for "preempted" in `prev_state` (TASK_REPORT_MAX).
#[unsafe(no_mangle)]
static TP_PREEMPT_STATE: u32 = 0x100;

// ---- Maps. ----

#[map(name = "OFFCPU_STARTS")]
static STARTS: HashMap<u32, OffcpuStart> = HashMap::with_max_entries(32768, 0);

#[map(name = "OFFCPU_TOTALS")]
static TOTALS: HashMap<OffcpuKey, OffcpuValue> = HashMap::with_max_entries(TOTALS_MAX, 0);

#[map(name = "OFFCPU_RUNQ_HIST")]
static RUNQ_HIST: HashMap<RunqKey, u64> = HashMap::with_max_entries(16384, 0);

#[map(name = "OFFCPU_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn count(index: u32, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += by };
    }
}

/// A thread's last switch-out (it exited): nothing to measure, and recording it would leave
/// a start entry that no switch-in ever clears (sched_process_exit already ran).
const DEAD: u32 = u32::MAX;

/// Raw `prev_state` bits (TASK_*) → state class.
#[inline(always)]
fn classify_raw_state(preempt: bool, state: u32) -> u32 {
    const TASK_INTERRUPTIBLE: u32 = 0x1;
    const TASK_UNINTERRUPTIBLE: u32 = 0x2;
    const TASK_DEAD: u32 = 0x80;
    const TASK_NOLOAD: u32 = 0x400;
    if preempt || state == 0 {
        STATE_RUNQUEUE
    } else if state & TASK_DEAD != 0 {
        DEAD
    } else if state & TASK_INTERRUPTIBLE != 0 {
        STATE_SLEEP
    } else if state & TASK_UNINTERRUPTIBLE != 0 {
        if state & TASK_NOLOAD != 0 {
            STATE_IDLE
        } else {
            STATE_DISK
        }
    } else {
        STATE_OTHER
    }
}

/// The tracepoint's reported `prev_state` (1 << task_state_index, or TASK_REPORT_MAX when
/// preempted) → state class.
#[inline(always)]
fn classify_reported_state(state: u32) -> u32 {
    const REPORT_S: u32 = 0x1;
    const REPORT_D: u32 = 0x2;
    const REPORT_DEAD_OR_ZOMBIE: u32 = 0x10 | 0x20;
    const REPORT_I: u32 = 0x80;
    if state == 0 || state == config(&TP_PREEMPT_STATE) {
        STATE_RUNQUEUE
    } else if state & REPORT_DEAD_OR_ZOMBIE != 0 {
        DEAD
    } else if state & REPORT_S != 0 {
        STATE_SLEEP
    } else if state & REPORT_D != 0 {
        STATE_DISK
    } else if state & REPORT_I != 0 {
        STATE_IDLE
    } else {
        STATE_OTHER
    }
}

#[inline(always)]
fn counted_stack_id<C: StackIdContext>(ctx: &C, flags: u64) -> i32 {
    match stack_id(ctx, flags) {
        Ok(id) => id,
        Err(StackError::Collision(err)) => {
            count(counter::STACK_COLLISION, 1);
            err
        }
        Err(StackError::Missing(err)) => {
            if flags & BPF_F_USER_STACK as u64 != 0 {
                count(counter::USER_STACK_MISSING, 1);
            } else {
                count(counter::KERNEL_STACK_ERROR, 1);
            }
            err
        }
    }
}

/// The user stack id of the current thread, or `KERNEL_THREAD_STACK` for a kernel thread:
/// it has no user stack, so none is missing (only then are its flags read).
#[inline(always)]
fn user_stack_id_of<C: StackIdContext>(ctx: &C, task: *const u8) -> i32 {
    match stack_id(ctx, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(StackError::Collision(err)) => {
            count(counter::STACK_COLLISION, 1);
            err
        }
        Err(StackError::Missing(_)) if is_kernel_thread(task) => KERNEL_THREAD_STACK,
        Err(StackError::Missing(err)) => {
            count(counter::USER_STACK_MISSING, 1);
            err
        }
    }
}

/// Switch-out of the current thread (`prev`). `task` is its task_struct. `walk_user`: take
/// the user stack from the unwinding tables (tp_btf only: kernels without tp_btf have no
/// bpf_loop either, and the classic tracepoint's program with the walk inlined is one the
/// verifier gives up on).
#[inline(always)]
fn switch_out<C: StackIdContext>(ctx: &C, task: *const u8, state: u32, now: u64, walk_user: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == 0 {
        return; // the idle task
    }
    if state == DEAD || config(&STATE_FILTER) & (1 << state) == 0 || !wanted(tgid, tid, task) {
        return;
    }
    if sampled_out(config(&OFFCPU_SAMPLE_MASK)) {
        return; // the switch-in finds no start and records nothing
    }
    let kernel_stack_id = counted_stack_id(ctx, 0);
    // Waiting for a database query: file the time under the query and the code path that
    // issued it (taken at the call; no user stack walk needed here).
    let inflight = if config(&DB_INFLIGHT_ON) != 0 {
        unsafe { DB_INFLIGHT.get(&tid) }.copied()
    } else {
        None
    };
    let (user_stack_id, db_frame) = match inflight {
        Some(query) => (query.user_stack_id, query.frame),
        None => match walk_user
            .then(|| crate::unwind::current_stack(tgid))
            .flatten()
        {
            Some(walked) => (walked, 0),
            None => (user_stack_id_of(ctx, task), 0),
        },
    };
    let start = OffcpuStart {
        start_ns: now,
        tgid,
        kernel_stack_id,
        user_stack_id,
        state,
        wakeup_ns: 0,
        db_frame,
        _pad: 0,
    };
    if let Some(slot) = STARTS.get_ptr_mut(tid) {
        let pending = unsafe { *slot };
        if pending.start_ns != 0 {
            // The thread ran since its last switch-out, yet that switch-in never reached us.
            count(counter::SWITCH_IN_MISSED, 1);
            if pending.wakeup_ns > pending.start_ns && pending.wakeup_ns <= now {
                count(counter::SWITCH_IN_MISSED_RECOVERED, 1);
                let key = OffcpuKey {
                    tgid: pending.tgid,
                    tid,
                    kernel_stack_id: pending.kernel_stack_id,
                    user_stack_id: pending.user_stack_id,
                    state: pending.state,
                    db_frame: pending.db_frame,
                };
                add(&key, pending.wakeup_ns - pending.start_ns, unsafe {
                    task.add(config(&TASK_COMM_OFF) as usize)
                });
            }
        }
        // Overwrite in place: cheaper than a map update on every switch.
        unsafe { *slot = start };
    } else if STARTS.insert(tid, start, 0).is_err() {
        count(counter::START_MAP_FULL, 1);
    }
}

/// Switch-in of thread `tid` (`next`). `comm` points at its 16-byte name (kernel memory).
/// The time since switch-out is split at the wakeup: before it the thread was blocked (its
/// state at switch-out), after it the thread waited for a CPU (`STATE_RUNQUEUE`).
#[inline(always)]
fn switch_in(tid: u32, comm: *const u8, now: u64) {
    if tid == 0 {
        return;
    }
    let Some(slot) = STARTS.get_ptr_mut(tid) else {
        return;
    };
    let start = unsafe { *slot };
    if start.start_ns == 0 {
        if config(&OFFCPU_SAMPLE_MASK) == 0 && config(&STATE_FILTER) == STATE_MASK_ANY {
            count(counter::SWITCH_OUT_MISSED, 1);
        }
        return;
    }
    unsafe { (*slot).start_ns = 0 };
    let delta = now.wrapping_sub(start.start_ns);
    if delta < config(&MIN_BLOCK_NS) || delta > config(&MAX_BLOCK_NS) {
        count(counter::FILTERED_DURATION, 1);
        return;
    }
    count(counter::BLOCKS, 1);
    let mut key = OffcpuKey {
        tgid: start.tgid,
        tid,
        kernel_stack_id: start.kernel_stack_id,
        user_stack_id: start.user_stack_id,
        state: start.state,
        db_frame: start.db_frame,
    };
    let runq = if start.state == STATE_RUNQUEUE {
        delta
    } else if start.wakeup_ns > start.start_ns && start.wakeup_ns <= now {
        add(&key, start.wakeup_ns - start.start_ns, comm);
        key.state = STATE_RUNQUEUE;
        now - start.wakeup_ns
    } else {
        // No wakeup seen: all of it counts as blocked.
        if config(&RUNQ_SPLIT) != 0 {
            count(counter::WAKEUP_MISSED, 1);
        }
        add(&key, delta, comm);
        return;
    };
    add(&key, runq, comm);
    count_runq(start.tgid, runq);
}

#[inline(always)]
fn add(key: &OffcpuKey, ns: u64, comm: *const u8) {
    if let Some(total) = TOTALS.get_ptr_mut(key) {
        // The key holds the tid and a thread switches in on one CPU at a time, so no other
        // CPU updates this entry concurrently.
        unsafe {
            (*total).total_ns += ns;
            (*total).count += 1;
        }
        return;
    }
    let value = OffcpuValue {
        total_ns: ns,
        count: 1,
    };
    if TOTALS.insert(key, &value, 0).is_err() {
        count(counter::AGG_MAP_FULL, 1);
        count(counter::LOST_NS, ns);
        return;
    }
    if !notify_new_task(key.tgid, key.tid, comm) {
        count(counter::EVENTS_LOST, 1);
    }
}

#[inline(always)]
fn count_runq(tgid: u32, ns: u64) {
    let key = RunqKey {
        tgid,
        bucket: log2_bucket(ns, RUNQ_BUCKETS),
    };
    if let Some(slot) = RUNQ_HIST.get_ptr_mut(&key) {
        // Several CPUs may switch in threads of one process at once.
        unsafe {
            core::intrinsics::atomic_xadd::<_, _, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, 1u64,
            )
        };
    } else if RUNQ_HIST.insert(&key, &1, 1 /* BPF_NOEXIST */).is_err()
        && let Some(slot) = RUNQ_HIST.get_ptr_mut(&key)
    {
        // Another CPU inserted it first.
        unsafe {
            core::intrinsics::atomic_xadd::<_, _, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, 1u64,
            )
        };
    }
}

/// sched_wakeup of thread `tid`: remember when it became runnable.
#[inline(always)]
fn wakeup(tid: u32) {
    if let Some(slot) = STARTS.get_ptr_mut(tid) {
        unsafe {
            if (*slot).start_ns != 0 && (*slot).wakeup_ns == 0 {
                (*slot).wakeup_ns = bpf_ktime_get_ns();
            }
        }
    }
}

/// `tp_btf/sched_wakeup(struct task_struct *p)`.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn offcpu_wakeup_btf(ctx: BtfTracePointContext) -> u32 {
    let task: *const u8 = ctx.arg(0);
    let tid: u32 =
        unsafe { bpf_probe_read_kernel(task.add(config(&TASK_PID_OFF) as usize) as *const u32) }
            .unwrap_or(0);
    wakeup(tid);
    0
}

/// Classic `sched:sched_wakeup` tracepoint.
#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn offcpu_wakeup_tp(ctx: TracePointContext) -> u32 {
    let tid: u32 = unsafe { ctx.read_at::<u32>(config(&TP_WAKEUP_PID_OFF) as usize) }.unwrap_or(0);
    wakeup(tid);
    0
}

/// `tp_btf/sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`.
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_switch_btf(ctx: BtfTracePointContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let raw_state: u32 = if config(&BTF_HAS_PREV_STATE_ARG) != 0 {
        ctx.arg::<u64>(3) as u32
    } else {
        unsafe { bpf_probe_read_kernel(prev.add(config(&TASK_STATE_OFF) as usize) as *const u32) }
            .unwrap_or(0)
    };
    let state = classify_raw_state(preempt & 0xff != 0, raw_state);
    switch_out(&ctx, prev, state, now, true);
    let next_tid: u32 =
        unsafe { bpf_probe_read_kernel(next.add(config(&TASK_PID_OFF) as usize) as *const u32) }
            .unwrap_or(0);
    switch_in(
        next_tid,
        unsafe { next.add(config(&TASK_COMM_OFF) as usize) },
        now,
    );
    0
}

/// Classic `sched:sched_switch` tracepoint; field offsets come from its format file.
#[tracepoint(category = "sched", name = "sched_switch")]
pub fn offcpu_switch_tp(ctx: TracePointContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let reported: u32 =
        unsafe { ctx.read_at::<u64>(config(&TP_PREV_STATE_OFF) as usize) }.unwrap_or(0) as u32;
    let state = classify_reported_state(reported);
    let task = unsafe { bpf_get_current_task() } as *const u8;
    switch_out(&ctx, task, state, now, false);
    let next_tid: u32 =
        unsafe { ctx.read_at::<u32>(config(&TP_NEXT_PID_OFF) as usize) }.unwrap_or(0);
    let comm = unsafe { (ctx.as_ptr() as *const u8).add(config(&TP_NEXT_COMM_OFF) as usize) };
    switch_in(next_tid, comm, now);
    0
}

/// A thread exits: forget its pending start so the map does not fill with dead threads.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn offcpu_exit(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = STARTS.remove(tid);
    0
}
