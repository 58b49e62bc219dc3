//! PostgreSQL's `query__start` / `query__done` USDT probes in the server, and (with
//! `--pg-extended`) its `statement__status` probe for the extended protocol.
//!
//! `statement__status(text)` fires at the top of `pgstat_report_activity`: with the
//! statement's text when a request starts running (Parse, Bind, Execute, a simple Query), and
//! with NULL when the backend goes idle before its ReadyForQuery. A request is timed from the
//! first of the former to the latter; one that ran a simple query (`query__start` seen) is
//! already timed by `query__start`/`query__done` and is dropped, and (where `PortalRun`'s
//! `query__execute__start` could be found) one that executed nothing — a Parse or a Bind
//! alone, as `PQprepare` sends — is no query either.

use super::*;

/// How to read statement__status's argument (its USDT spec).
#[unsafe(no_mangle)]
static PG_STATUS_ARG_KIND: u32 = 1;
#[unsafe(no_mangle)]
static PG_STATUS_ARG_REG: u32 = 0;
#[unsafe(no_mangle)]
static PG_STATUS_ARG_DISP: i64 = 0;

/// `seq` bits of a request in progress.
const REQUEST_SIMPLE: u32 = 1;
const REQUEST_EXECUTED: u32 = 2;

/// 1: `--pg-extended` (`pg_statement_status` attached): simple queries mark their request.
#[unsafe(no_mangle)]
static PG_EXTENDED_ON: u32 = 0;

/// 1: `pg_execute_start` is attached to PortalRun's `query__execute__start`, and only
/// requests that executed something are queries.
#[unsafe(no_mangle)]
static PG_EXECUTE_GATE: u32 = 0;

/// Requests in progress per backend thread (`seq`: `REQUEST_*` bits).
#[map(name = "DB_PG_EXTENDED")]
static EXTENDED: LruHashMap<u32, DbPending> = LruHashMap::with_max_entries(16384, 0);

#[uprobe]
pub fn pg_statement_status(ctx: ProbeContext) -> u32 {
    if !crate::common::cgroup_wanted() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let text = read_arg(
        ctx.regs as *const u8,
        config(&PG_STATUS_ARG_KIND),
        config(&PG_STATUS_ARG_REG),
        config(&PG_STATUS_ARG_DISP),
    );
    let running = EXTENDED.get_ptr_mut(&tid);
    if text == 0 {
        // Idle: the request is over.
        if let Some(request) = running {
            let start = unsafe { (*request).start_ns };
            let seq = unsafe { (*request).seq };
            let executed = config(&PG_EXECUTE_GATE) == 0 || seq & REQUEST_EXECUTED != 0;
            if start != 0 && seq & REQUEST_SIMPLE == 0 && executed {
                let now = unsafe { bpf_ktime_get_ns() };
                count(counter::QUERIES);
                emit(request, tgid, tid, 0, now.wrapping_sub(start));
            }
            unsafe {
                (*request).start_ns = 0;
                (*request).seq = 0;
            }
        }
        return 0;
    }
    if let Some(request) = running
        && unsafe { (*request).start_ns } != 0
    {
        return 0; // Bind, Execute… of a request already started
    }
    if sampled_out(config(&DB_SAMPLE_MASK)) {
        return 0;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*scratch).len = read_query_text(scratch, text).unwrap_or(0);
        // Background workers report what they do the same way; no client waits on them.
        if (*scratch).len >= 11 && (&(*scratch).query)[..11] == *b"autovacuum:" {
            return 0;
        }
        start_clock(scratch, called_now());
        (*scratch).source = SOURCE_POSTGRES_USDT;
        (*scratch).user_stack_id = -1;
        (*scratch).seq = 0;
        if EXTENDED.insert(&tid, &*scratch, 0).is_err() {
            count(counter::PENDING_MAP_FULL);
        }
    }
    0
}

#[uprobe]
pub fn pg_query_start(ctx: ProbeContext) -> u32 {
    if !crate::common::cgroup_wanted() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // A simple query: its request is timed here, not by statement__status.
    if config(&PG_EXTENDED_ON) != 0
        && let Some(request) = EXTENDED.get_ptr_mut(&tid)
    {
        unsafe { (*request).seq |= REQUEST_SIMPLE };
    }
    if let Some(previous) = PENDING.get_ptr_mut(&tid)
        && unsafe { (*previous).start_ns } != 0
    {
        count(counter::ABANDONED);
        emit(previous, tgid, tid, FLAG_ERROR, 0);
    }
    if sampled_out(config(&DB_SAMPLE_MASK)) {
        if let Some(previous) = PENDING.get_ptr_mut(&tid) {
            unsafe { (*previous).start_ns = 0 };
        }
        return 0;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let text = read_arg(
        ctx.regs as *const u8,
        config(&PG_START_ARG_KIND),
        config(&PG_START_ARG_REG),
        config(&PG_START_ARG_DISP),
    );
    unsafe {
        start_clock(scratch, called_now());
        (*scratch).source = SOURCE_POSTGRES_USDT;
        (*scratch).user_stack_id = -1;
        (*scratch).len = read_query_text(scratch, text).unwrap_or(0);
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

/// `query__execute__start` in PortalRun: the request executes a portal.
#[uprobe]
pub fn pg_execute_start(_ctx: ProbeContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(request) = EXTENDED.get_ptr_mut(&tid) {
        unsafe { (*request).seq |= REQUEST_EXECUTED };
    }
    0
}
