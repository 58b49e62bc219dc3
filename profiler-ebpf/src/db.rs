//! Query latency from PostgreSQL's USDT probes: `query__start(const char *query)` keeps the
//! start time and the query text per thread, `query__done` sends one event per query.
//! Attached by userspace with perf_event_open on the uprobe PMU so the kernel raises the
//! probes' semaphores (see `profiler/src/uprobe.rs`). No pid filter here: the server's
//! backends are other processes than the one named with -p; userspace filters by ancestry.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf, bpf_probe_read_user, bpf_probe_read_user_str_bytes,
    },
    macros::{map, uprobe},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::ProbeContext,
};
use profiler_common::db::{
    ARG_KIND_CONSTANT, ARG_KIND_MEMORY, DbEvent, DbPending, FLAG_ERROR, QUERY_MAX,
    SOURCE_POSTGRES_USDT, counter,
};

use crate::common::config;

/// How to read query__start's argument (the query text pointer), from its USDT spec.
#[unsafe(no_mangle)]
static PG_START_ARG_KIND: u32 = 1;
#[unsafe(no_mangle)]
static PG_START_ARG_REG: u32 = 0;
#[unsafe(no_mangle)]
static PG_START_ARG_DISP: i64 = 0;

/// LRU: a backend killed mid-query never reports done; its entry ages out.
#[map(name = "DB_PENDING")]
static PENDING: LruHashMap<u32, DbPending> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "DB_SCRATCH")]
static SCRATCH: PerCpuArray<DbPending> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "DB_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES as u32, 0);

#[map(name = "DB_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const EVENTS_BYTES: u64 = 4 * 1024 * 1024;
/// Userspace drains on a timer; woken early only past this backlog.
const WAKEUP_BACKLOG: u64 = EVENTS_BYTES / 4;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn read_arg(ctx: &ProbeContext, kind: u32, reg_offset: u32, displacement: i64) -> u64 {
    if kind == ARG_KIND_CONSTANT {
        return displacement as u64;
    }
    // As libbpf's usdt.bpf.h: pt_regs is kernel memory; any register offset is fine here.
    let regs = ctx.regs as *const u8;
    let value: u64 =
        unsafe { bpf_probe_read_kernel(regs.add(reg_offset as usize) as *const u64) }.unwrap_or(0);
    if kind == ARG_KIND_MEMORY {
        unsafe { bpf_probe_read_user((value as i64).wrapping_add(displacement) as *const u64) }
            .unwrap_or(0)
    } else {
        value
    }
}

#[inline(always)]
fn emit(pending: *const DbPending, tgid: u32, tid: u32, flags: u32, duration_ns: u64) {
    let Some(mut entry) = EVENTS.reserve::<DbEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    unsafe {
        (*event).tgid = tgid;
        (*event).tid = tid;
        (*event).source = (*pending).source;
        (*event).flags = flags;
        (*event).start_ns = (*pending).start_ns;
        (*event).duration_ns = duration_ns;
        (*event).len = (*pending).len;
        (*event)._pad = 0;
        if bpf_probe_read_kernel_buf((*pending).query.as_ptr(), &mut (*event).query).is_err() {
            (*event).len = 0;
        }
    }
    let wakeup = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BACKLOG {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wakeup);
}

#[uprobe]
pub fn pg_query_start(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if let Some(previous) = PENDING.get_ptr_mut(&tid)
        && unsafe { (*previous).start_ns } != 0
    {
        count(counter::ABANDONED);
        emit(previous, tgid, tid, FLAG_ERROR, 0);
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let text = read_arg(
        &ctx,
        config(&PG_START_ARG_KIND),
        config(&PG_START_ARG_REG),
        config(&PG_START_ARG_DISP),
    );
    unsafe {
        (*scratch).start_ns = bpf_ktime_get_ns();
        (*scratch).source = SOURCE_POSTGRES_USDT;
        (*scratch).len =
            match bpf_probe_read_user_str_bytes(text as *const u8, &mut (*scratch).query) {
                Ok(bytes) => bytes.len().min(QUERY_MAX) as u32,
                Err(_) => {
                    count(counter::TEXT_UNREADABLE);
                    0
                }
            };
        if PENDING.insert(&tid, &*scratch, 0).is_err() {
            count(counter::PENDING_MAP_FULL);
        }
    }
    0
}

#[uprobe]
pub fn pg_query_done(_ctx: ProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(pending) = PENDING.get_ptr_mut(&tid) else {
        return 0;
    };
    let start = unsafe { (*pending).start_ns };
    if start == 0 {
        return 0;
    }
    count(counter::QUERIES);
    emit(pending, tgid, tid, 0, now.wrapping_sub(start));
    unsafe { (*pending).start_ns = 0 };
    0
}
