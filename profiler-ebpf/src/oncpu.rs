//! On-CPU samples: a perf_event cpu-clock program on every CPU counts samples per
//! (tgid, tid, kernel stack, user stack). A new key notifies userspace (rare), as off-CPU does.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::{map, perf_event},
    maps::{HashMap, PerCpuArray},
    programs::PerfEventContext,
};
use profiler_common::oncpu::{COUNTS_MAX, OncpuKey, counter};
use profiler_common::shared::KERNEL_THREAD_STACK;

use crate::common::{
    StackError, TASK_COMM_OFF, config, is_kernel_thread, notify_new_task, stack_id, wanted,
};

#[map(name = "ONCPU_COUNTS")]
static COUNTS: HashMap<OncpuKey, u64> = HashMap::with_max_entries(COUNTS_MAX, 0);

#[map(name = "ONCPU_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn kernel_stack_id(ctx: &PerfEventContext) -> i32 {
    match stack_id(ctx, 0) {
        Ok(id) => id,
        Err(StackError::Collision(err)) => {
            count(counter::STACK_COLLISION);
            err
        }
        Err(StackError::Missing(err)) => {
            count(counter::KERNEL_STACK_MISSING);
            err
        }
    }
}

/// The user stack id of the sampled thread, or `KERNEL_THREAD_STACK` for a kernel thread:
/// it has no user stack, so none is missing (its flags are read only then).
#[inline(always)]
fn user_stack_id_of(ctx: &PerfEventContext, task: *const u8) -> i32 {
    match stack_id(ctx, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(StackError::Collision(err)) => {
            count(counter::STACK_COLLISION);
            err
        }
        Err(StackError::Missing(_)) if is_kernel_thread(task) => KERNEL_THREAD_STACK,
        Err(StackError::Missing(err)) => {
            count(counter::USER_STACK_MISSING);
            err
        }
    }
}

#[perf_event]
pub fn oncpu_sample(ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == 0 {
        count(counter::IDLE_SAMPLES);
        return 0;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    if !wanted(tgid, tid, task) {
        return 0;
    }
    let key = OncpuKey {
        tgid,
        tid,
        kernel_stack_id: kernel_stack_id(&ctx),
        user_stack_id: match crate::unwind::sampled_stack(tgid, ctx.as_ptr() as *const u8) {
            Some(walked) => walked,
            None => user_stack_id_of(&ctx, task),
        },
    };
    count(counter::SAMPLES);
    if let Some(samples) = COUNTS.get_ptr_mut(&key) {
        // The key holds the tid, and a thread runs on one CPU at a time.
        unsafe { *samples += 1 };
        return 0;
    }
    if COUNTS.insert(&key, &1, 0).is_err() {
        count(counter::AGG_MAP_FULL);
        return 0;
    }
    let comm = unsafe { task.add(config(&TASK_COMM_OFF) as usize) };
    if !notify_new_task(tgid, tid, comm) {
        count(counter::EVENTS_LOST);
    }
    0
}
