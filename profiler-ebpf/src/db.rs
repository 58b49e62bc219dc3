//! Query latency from PostgreSQL's USDT probes: `query__start(const char *query)` keeps the
//! start time and the query text per thread, `query__done` sends one event per query.
//! Attached by userspace with perf_event_open on the uprobe PMU so the kernel raises the
//! probes' semaphores (see `profiler/src/uprobe.rs`). No pid filter here: the server's
//! backends are other processes than the one named with -p; userspace filters by ancestry.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use profiler_common::db::{
    ARG_KIND_CONSTANT, ARG_KIND_MEMORY, DbEvent, DbInflight, DbPending, FLAG_ERROR, FLAG_PREPARE,
    FLAG_PREPARED, FLAG_STATEMENT, PREPARE_NAME_MAX, QUERY_MAX, SOURCE_LIBPQ, SOURCE_MYSQL,
    SOURCE_POSTGRES_USDT, SOURCE_SQLITE, SOURCE_WIRE_MYSQL, SOURCE_WIRE_POSTGRES,
    SOURCE_WIRE_REDIS, counter, frame_hash,
};

use crate::common::{
    DB_INFLIGHT, DB_INFLIGHT_ON, DB_SAMPLE_MASK, StackError, TASK_COMM_OFF, config,
    notify_new_task, sampled_out, stack_id, wanted_ids,
};

/// How to read query__start's argument (the query text pointer), from its USDT spec.
#[unsafe(no_mangle)]
static PG_START_ARG_KIND: u32 = 1;
#[unsafe(no_mangle)]
static PG_START_ARG_REG: u32 = 0;
#[unsafe(no_mangle)]
static PG_START_ARG_DISP: i64 = 0;

/// Offsets in pt_regs of the 1st, 2nd and 3rd function arguments and of the return value
/// (x86_64: rdi, rsi, rdx, rax).
#[unsafe(no_mangle)]
static ARG1_REG: u32 = 112;
#[unsafe(no_mangle)]
static ARG2_REG: u32 = 104;
#[unsafe(no_mangle)]
static ARG3_REG: u32 = 96;
#[unsafe(no_mangle)]
static ARG4_REG: u32 = 88;
/// Offset of the socket in libpq's `PGconn` (from PQsocket's code); 0 when unknown.
#[unsafe(no_mangle)]
static PGCONN_SOCK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static ARG5_REG: u32 = 72;
#[unsafe(no_mangle)]
static RET_REG: u32 = 80;

/// Offsets in task_struct of `real_parent` and `tgid` (BTF).
#[unsafe(no_mangle)]
static TASK_REAL_PARENT_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_TGID_OFF: u32 = 0;

/// Client processes (libpq, MySQL) already announced to userspace (which reads their memory
/// maps to symbolize the issuing stacks, while they live); the wire decoder leaves them alone.
#[map(name = "DB_SEEN")]
static SEEN: LruHashMap<u32, u8> = LruHashMap::with_max_entries(4096, 0);

/// Client-side commands in flight (libpq), per connection: one thread may drive several
/// connections at once (pgbench -c 2 -j 1 does).
#[map(name = "DB_CLIENT_PENDING")]
static CLIENT_PENDING: LruHashMap<ConnKey, DbPending> = LruHashMap::with_max_entries(16384, 0);

/// The handle (`PGconn *`, `sqlite3_stmt *`, `MYSQL *`) a thread's library call is about:
/// saved at entry, used at return, when the return value alone does not say.
#[map(name = "DB_CALL_HANDLE")]
static CALL_HANDLE: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn enter_call(tid: u32, handle: u64) {
    let _ = CALL_HANDLE.insert(&tid, &handle, 0);
}

/// The key of the call being returned from: (process, handle saved at entry).
#[inline(always)]
fn returning_call(tgid: u32, tid: u32) -> Option<ConnKey> {
    let handle = (unsafe { CALL_HANDLE.get(&tid) }).copied()?;
    Some(ConnKey {
        tgid,
        _pad: 0,
        conn: handle,
    })
}

/// The user stack that issued a call, or the (negative, counted) reason there is none.
#[inline(always)]
fn issuing_stack(ctx: &ProbeContext) -> i32 {
    let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
    // The probe's registers are the user ones at the call.
    if let Some(walked) =
        crate::unwind::sampled_stack(tgid, aya_ebpf::EbpfContext::as_ptr(ctx) as *const u8)
    {
        return walked;
    }
    match stack_id(ctx, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(StackError::Collision(err)) | Err(StackError::Missing(err)) => {
            count(counter::STACK_LOST);
            err
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnKey {
    tgid: u32,
    _pad: u32,
    /// The `PGconn *`.
    conn: u64,
}

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
fn read_arg(regs: *const u8, kind: u32, reg_offset: u32, displacement: i64) -> u64 {
    if kind == ARG_KIND_CONSTANT {
        return displacement as u64;
    }
    // As libbpf's usdt.bpf.h: pt_regs is kernel memory; any register offset is fine here.
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
    emit_with_handle(pending, tgid, tid, flags, duration_ns, 0);
}

#[inline(always)]
fn emit_with_handle(
    pending: *const DbPending,
    tgid: u32,
    tid: u32,
    flags: u32,
    duration_ns: u64,
    handle: u64,
) {
    emit_full(pending, tgid, tid, flags, duration_ns, handle, [0; 16]);
}

#[inline(always)]
fn emit_full(
    pending: *const DbPending,
    tgid: u32,
    tid: u32,
    flags: u32,
    duration_ns: u64,
    handle: u64,
    reply: [u8; 16],
) {
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
        (*event).user_stack_id = (*pending).user_stack_id;
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).handle = handle;
        (*event).reply = reply;
        (*event)._pad = 0;
        let task = bpf_get_current_task() as *const u8;
        let parent: u64 =
            bpf_probe_read_kernel(task.add(config(&TASK_REAL_PARENT_OFF) as usize) as *const u64)
                .unwrap_or(0);
        (*event).ppid = if parent == 0 {
            0
        } else {
            bpf_probe_read_kernel(
                (parent as *const u8).add(config(&TASK_TGID_OFF) as usize) as *const u32
            )
            .unwrap_or(0)
        };
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
        (*scratch).start_ns = bpf_ktime_get_ns();
        (*scratch).source = SOURCE_POSTGRES_USDT;
        (*scratch).user_stack_id = -1;
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

/// A client process seen for the first time: userspace reads its memory maps (to symbolize
/// the issuing stacks) while it lives, and the wire decoder leaves it alone.
#[inline(always)]
fn announce(tgid: u32, tid: u32) {
    if unsafe { SEEN.get(&tgid) }.is_none() {
        let _ = SEEN.insert(&tgid, &1, 0);
        let comm =
            unsafe { (bpf_get_current_task() as *const u8).add(config(&TASK_COMM_OFF) as usize) };
        if !notify_new_task(tgid, tid, comm) {
            count(counter::EVENTS_LOST);
        }
    }
}

/// Marks `tid` as waiting for the query `text` (issued from `user_stack_id`), for off-CPU.
#[inline(always)]
fn waiting_for(tid: u32, text: &[u8], user_stack_id: i32) {
    if config(&DB_INFLIGHT_ON) == 0 {
        return;
    }
    let inflight = DbInflight {
        frame: frame_hash(text),
        user_stack_id,
    };
    let _ = DB_INFLIGHT.insert(&tid, &inflight, 0);
}

#[inline(always)]
fn reg(regs: *const u8, offset: &u32) -> u64 {
    read_arg(regs, 1, config(offset), 0)
}

/// A libpq call that sends something and whose end PQgetResult will report: stores the
/// start time and `text` (a user pointer) as the thread's client query.
#[inline(always)]
fn client_start(ctx: &ProbeContext, flags: u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    announce(tgid, tid);
    // Sampled mode: statement preparations are always seen (later executions name them).
    if flags & FLAG_PREPARE == 0 && sampled_out(config(&DB_SAMPLE_MASK)) {
        let key = ConnKey {
            tgid,
            _pad: 0,
            conn: reg(ctx.regs as *const u8, &ARG1_REG),
        };
        if let Some(previous) = CLIENT_PENDING.get_ptr_mut(&key) {
            unsafe { (*previous).start_ns = 0 };
        }
        return 0;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*scratch).start_ns = bpf_ktime_get_ns();
        (*scratch).source = SOURCE_LIBPQ | (flags << 8);
        (*scratch).user_stack_id = issuing_stack(ctx);
        let text = reg(ctx.regs as *const u8, &ARG2_REG) as *const u8;
        let len = if flags & FLAG_PREPARE != 0 {
            // Name, then the statement text after PREPARE_NAME_MAX bytes.
            let (name, rest) = (*scratch).query.split_at_mut(PREPARE_NAME_MAX);
            let _ = bpf_probe_read_user_str_bytes(text, name);
            let query = reg(ctx.regs as *const u8, &ARG3_REG) as *const u8;
            match bpf_probe_read_user_str_bytes(query, rest) {
                Ok(bytes) => PREPARE_NAME_MAX + bytes.len(),
                Err(_) => PREPARE_NAME_MAX,
            }
        } else {
            match bpf_probe_read_user_str_bytes(text, &mut (*scratch).query) {
                Ok(bytes) => bytes.len(),
                Err(_) => {
                    count(counter::TEXT_UNREADABLE);
                    0
                }
            }
        };
        (*scratch).len = len.min(QUERY_MAX) as u32;
        let key = ConnKey {
            tgid,
            _pad: 0,
            conn: reg(ctx.regs as *const u8, &ARG1_REG),
        };
        if CLIENT_PENDING.insert(&key, &*scratch, 0).is_err() {
            count(counter::PENDING_MAP_FULL);
        }
        if flags & FLAG_PREPARE == 0 {
            waiting_for(tid, &(*scratch).query, (*scratch).user_stack_id);
        }
    }
    0
}

/// PQsendQuery(conn, query), PQsendQueryParams(conn, command, …).
#[uprobe]
pub fn libpq_send_query(ctx: ProbeContext) -> u32 {
    client_start(&ctx, 0)
}

/// PQsendQueryPrepared(conn, stmtName, …).
#[uprobe]
pub fn libpq_send_prepared(ctx: ProbeContext) -> u32 {
    client_start(&ctx, FLAG_PREPARED)
}

/// PQsendPrepare(conn, stmtName, query, …).
#[uprobe]
pub fn libpq_send_prepare(ctx: ProbeContext) -> u32 {
    client_start(&ctx, FLAG_PREPARE)
}

/// PQgetResult(conn) entry: remember which connection this thread asks about.
#[uprobe]
pub fn libpq_get_result(ctx: ProbeContext) -> u32 {
    enter_call(
        bpf_get_current_pid_tgid() as u32,
        reg(ctx.regs as *const u8, &ARG1_REG),
    );
    0
}

/// PQgetResult returning NULL: the command's results are all in.
#[uretprobe]
pub fn libpq_get_result_return(ctx: RetProbeContext) -> u32 {
    if reg(ctx.regs as *const u8, &RET_REG) != 0 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(key) = returning_call(tgid, tid) else {
        return 0;
    };
    let Some(pending) = CLIENT_PENDING.get_ptr_mut(&key) else {
        return 0;
    };
    let start = unsafe { (*pending).start_ns };
    if start == 0 {
        return 0;
    }
    let flags = unsafe { (*pending).source } >> 8;
    unsafe { (*pending).source = SOURCE_LIBPQ };
    let _ = DB_INFLIGHT.remove(&tid);
    if flags & FLAG_PREPARE == 0 {
        count(counter::QUERIES);
    }
    // The connection's socket (fd + 1; 0: offset unknown), read where PQsocket() reads it.
    let off = config(&PGCONN_SOCK_OFF);
    let socket = if off == 0 {
        0
    } else {
        unsafe { bpf_probe_read_user((key.conn + off as u64) as *const i32) }
            .map_or(0, |fd| if fd >= 0 { fd as u64 + 1 } else { 0 })
    };
    emit_with_handle(pending, tgid, tid, flags, now.wrapping_sub(start), socket);
    unsafe { (*pending).start_ns = 0 };
    0
}

// ---- SQLite: sqlite3_prepare_v2/v3 → statement text; sqlite3_step → time per execution. ----

/// A prepare in flight: the SQL text and where the statement pointer will be written.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SqlitePrepare {
    sql: u64,
    out_stmt: u64,
}

/// An execution of a statement: from its first step to DONE, an error or a reset.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SqliteExec {
    first_ns: u64,
    /// Time spent inside sqlite3_step so far.
    in_step_ns: u64,
    /// Entry of the step in progress.
    step_ns: u64,
}

#[map(name = "DB_SQLITE_PREPARE")]
static SQLITE_PREPARE: LruHashMap<u32, SqlitePrepare> = LruHashMap::with_max_entries(4096, 0);

#[map(name = "DB_SQLITE_EXEC")]
static SQLITE_EXEC: LruHashMap<ConnKey, SqliteExec> = LruHashMap::with_max_entries(16384, 0);

const SQLITE_ROW: u64 = 100;
const SQLITE_DONE: u64 = 101;

#[inline(always)]
fn sqlite_prepare(ctx: &ProbeContext, out_reg: &u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    let regs = ctx.regs as *const u8;
    let prepare = SqlitePrepare {
        sql: reg(regs, &ARG2_REG),
        out_stmt: reg(regs, out_reg),
    };
    let _ = SQLITE_PREPARE.insert(&tid, &prepare, 0);
    0
}

/// sqlite3_prepare_v2(db, zSql, nByte, ppStmt, pzTail).
#[uprobe]
pub fn sqlite_prepare_v2(ctx: ProbeContext) -> u32 {
    sqlite_prepare(&ctx, &ARG4_REG)
}

/// sqlite3_prepare_v3(db, zSql, nByte, prepFlags, ppStmt, pzTail).
#[uprobe]
pub fn sqlite_prepare_v3(ctx: ProbeContext) -> u32 {
    sqlite_prepare(&ctx, &ARG5_REG)
}

/// Prepare returned: tell userspace which text the new statement holds.
#[uretprobe]
pub fn sqlite_prepare_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(prepare) = (unsafe { SQLITE_PREPARE.get(&tid) }).copied() else {
        return 0;
    };
    let _ = SQLITE_PREPARE.remove(&tid);
    if reg(ctx.regs as *const u8, &RET_REG) != 0 {
        return 0; // failed: no statement
    }
    let stmt: u64 = unsafe { bpf_probe_read_user(prepare.out_stmt as *const u64) }.unwrap_or(0);
    if stmt == 0 {
        return 0; // empty SQL (whitespace, comment)
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*scratch).start_ns = 0;
        (*scratch).source = SOURCE_SQLITE;
        (*scratch).user_stack_id = -1;
        (*scratch).len =
            match bpf_probe_read_user_str_bytes(prepare.sql as *const u8, &mut (*scratch).query) {
                Ok(bytes) => bytes.len().min(QUERY_MAX) as u32,
                Err(_) => {
                    count(counter::TEXT_UNREADABLE);
                    0
                }
            };
    }
    emit_with_handle(scratch, tgid, tid, FLAG_PREPARE, 0, stmt);
    0
}

#[inline(always)]
fn sqlite_finish(tgid: u32, tid: u32, key: &ConnKey, exec: &SqliteExec, error: bool) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        (*scratch).start_ns = exec.first_ns;
        (*scratch).source = SOURCE_SQLITE;
        (*scratch).user_stack_id = -1;
        (*scratch).len = 0;
    }
    count(counter::QUERIES);
    let flags = FLAG_STATEMENT | if error { FLAG_ERROR } else { 0 };
    emit_with_handle(scratch, tgid, tid, flags, exec.in_step_ns, key.conn);
    let _ = SQLITE_EXEC.remove(key);
}

/// sqlite3_step(stmt) entry.
#[uprobe]
pub fn sqlite_step(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    let stmt = reg(ctx.regs as *const u8, &ARG1_REG);
    let now = unsafe { bpf_ktime_get_ns() };
    let key = ConnKey {
        tgid,
        _pad: 0,
        conn: stmt,
    };
    if let Some(exec) = SQLITE_EXEC.get_ptr_mut(&key) {
        unsafe { (*exec).step_ns = now };
    } else {
        let exec = SqliteExec {
            first_ns: now,
            in_step_ns: 0,
            step_ns: now,
        };
        if SQLITE_EXEC.insert(&key, &exec, 0).is_err() {
            count(counter::PENDING_MAP_FULL);
        }
    }
    enter_call(tid, stmt);
    0
}

/// sqlite3_step returned: a row (more to come) or the end of this execution.
#[uretprobe]
pub fn sqlite_step_return(ctx: RetProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(key) = returning_call(tgid, tid) else {
        return 0;
    };
    let Some(exec) = SQLITE_EXEC.get_ptr_mut(&key) else {
        return 0;
    };
    unsafe { (*exec).in_step_ns += now.wrapping_sub((*exec).step_ns) };
    let rc = reg(ctx.regs as *const u8, &RET_REG) & 0xff;
    if rc != SQLITE_ROW {
        let done = unsafe { *exec };
        sqlite_finish(tgid, tid, &key, &done, rc != SQLITE_DONE);
    }
    0
}

/// sqlite3_reset(stmt): an execution left before DONE ends here.
#[uprobe]
pub fn sqlite_reset(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let key = ConnKey {
        tgid,
        _pad: 0,
        conn: reg(ctx.regs as *const u8, &ARG1_REG),
    };
    if let Some(exec) = (unsafe { SQLITE_EXEC.get(&key) }).copied() {
        sqlite_finish(tgid, tid, &key, &exec, false);
    }
    0
}

// ---- On the wire: requests written to sockets, ended by the first read with data. ----

/// Offsets of fd, buffer and return value in the syscalls:sys_{enter,exit}_{write,sendto,
/// read,recvfrom} records (the same in all four; checked by the loader).
#[unsafe(no_mangle)]
static TP_SYS_FD_OFF: u32 = 16;
#[unsafe(no_mangle)]
static TP_SYS_BUF_OFF: u32 = 24;
#[unsafe(no_mangle)]
static TP_SYS_LEN_OFF: u32 = 32;
#[unsafe(no_mangle)]
static TP_SYS_RET_OFF: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FdKey {
    tgid: u32,
    fd: u32,
}

/// Requests waiting for their response, per (process, socket fd).
#[map(name = "DB_WIRE_PENDING")]
static WIRE_PENDING: LruHashMap<FdKey, DbPending> = LruHashMap::with_max_entries(16384, 0);

/// The fd a thread's read is on, when a request waits on it (saved at entry).
#[map(name = "DB_WIRE_READING")]
static WIRE_READING: LruHashMap<u32, WireRead> = LruHashMap::with_max_entries(16384, 0);

/// A read on a socket that has a request waiting: its fd and buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WireRead {
    fd: u64,
    buf: u64,
}

/// Which protocol a buffer's first bytes speak as a client request, if any: PostgreSQL's
/// simple query ('Q' + length that matches the write), Parse ('P' + length), Bind ('B'), or
/// a Redis RESP command ("*<digits>\r\n$").
#[inline(always)]
fn request_protocol(head: &[u8; 8], len: u64) -> u32 {
    let be32 = |b: &[u8; 8]| u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as u64;
    match head[0] {
        b'Q' if be32(head) + 1 == len && len > 6 => SOURCE_WIRE_POSTGRES,
        b'P' | b'B' if be32(head) + 1 <= len && be32(head) >= 4 && len > 6 => SOURCE_WIRE_POSTGRES,
        // MySQL: 3-byte little-endian length, sequence 0, COM_QUERY (3), COM_STMT_PREPARE
        // (0x16) or COM_STMT_EXECUTE (0x17), the length matching the write.
        _ if head[3] == 0
            && (head[4] == 0x03 || head[4] == 0x16 || head[4] == 0x17)
            && u32::from_le_bytes([head[0], head[1], head[2], 0]) as u64 + 4 == len =>
        {
            SOURCE_WIRE_MYSQL
        }
        b'*' if head[1].is_ascii_digit() => {
            // "*N\r\n$" with N of one or two digits.
            if (head[2] == b'\r' && head[3] == b'\n' && head[4] == b'$')
                || (head[2].is_ascii_digit()
                    && head[3] == b'\r'
                    && head[4] == b'\n'
                    && head[5] == b'$')
            {
                SOURCE_WIRE_REDIS
            } else {
                0
            }
        }
        _ => 0,
    }
}

#[inline(always)]
fn wire_send(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let fd: u64 = unsafe { ctx.read_at(config(&TP_SYS_FD_OFF) as usize) }.unwrap_or(0);
    let buf: u64 = unsafe { ctx.read_at(config(&TP_SYS_BUF_OFF) as usize) }.unwrap_or(0);
    let len: u64 = unsafe { ctx.read_at(config(&TP_SYS_LEN_OFF) as usize) }.unwrap_or(0);
    if len < 6 || !wanted_ids(tgid, tid) {
        return 0;
    }
    let Ok(head) = (unsafe { bpf_probe_read_user(buf as *const [u8; 8]) }) else {
        return 0;
    };
    let source = request_protocol(&head, len);
    if source == 0 {
        return 0;
    }
    if unsafe { SEEN.get(&tgid) }.is_some() {
        return 0; // a probed client library times this process's queries
    }
    let key = FdKey {
        tgid,
        fd: fd as u32,
    };
    if let Some(pending) = WIRE_PENDING.get_ptr_mut(&key)
        && unsafe { (*pending).start_ns } != 0
    {
        count(counter::PIPELINED);
        return 0;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*scratch).start_ns = bpf_ktime_get_ns();
        (*scratch).source = source;
        (*scratch).user_stack_id = -1;
        // The request's first bytes as sent; userspace decodes them.
        let n = if len < QUERY_MAX as u64 {
            len
        } else {
            QUERY_MAX as u64
        } as usize;
        (*scratch).len = if n > 0
            && n <= QUERY_MAX
            && aya_ebpf::helpers::bpf_probe_read_user_buf(
                buf as *const u8,
                &mut (&mut (*scratch).query)[..n],
            )
            .is_ok()
        {
            n as u32
        } else {
            0
        };
        if WIRE_PENDING.insert(&key, &*scratch, 0).is_err() {
            count(counter::PENDING_MAP_FULL);
        }
        // A simple query's text starts after its 5-byte header. (Parse/Bind carry names and
        // binary parameters, Redis its arguments: no frame for those.)
        if head[0] == b'Q' {
            waiting_for(tid, &(&(*scratch).query)[5..], -1);
        }
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_write")]
pub fn wire_write(ctx: TracePointContext) -> u32 {
    wire_send(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendto")]
pub fn wire_sendto(ctx: TracePointContext) -> u32 {
    wire_send(&ctx)
}

#[inline(always)]
fn wire_read_enter(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let fd: u64 = unsafe { ctx.read_at(config(&TP_SYS_FD_OFF) as usize) }.unwrap_or(0);
    let key = FdKey {
        tgid,
        fd: fd as u32,
    };
    if unsafe { WIRE_PENDING.get(&key) }.is_some_and(|p| p.start_ns != 0) {
        let read = WireRead {
            fd,
            buf: unsafe { ctx.read_at(config(&TP_SYS_BUF_OFF) as usize) }.unwrap_or(0),
        };
        let _ = WIRE_READING.insert(&tid, &read, 0);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_read")]
pub fn wire_read(ctx: TracePointContext) -> u32 {
    wire_read_enter(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_recvfrom")]
pub fn wire_recvfrom(ctx: TracePointContext) -> u32 {
    wire_read_enter(&ctx)
}

#[inline(always)]
fn wire_read_exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(read) = (unsafe { WIRE_READING.get(&tid) }).copied() else {
        return 0;
    };
    let fd = read.fd as u32;
    let ret: i64 = unsafe { ctx.read_at(config(&TP_SYS_RET_OFF) as usize) }.unwrap_or(0);
    if ret <= 0 {
        // EAGAIN on a non-blocking socket, or nothing yet: keep waiting.
        let _ = WIRE_READING.remove(&tid);
        return 0;
    }
    let _ = WIRE_READING.remove(&tid);
    let key = FdKey { tgid, fd };
    let Some(pending) = WIRE_PENDING.get_ptr_mut(&key) else {
        return 0;
    };
    let start = unsafe { (*pending).start_ns };
    if start == 0 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    count(counter::QUERIES);
    // The socket (fd + 1): userspace names the endpoint; and the reply's first bytes.
    let reply: [u8; 16] =
        unsafe { bpf_probe_read_user(read.buf as *const [u8; 16]) }.unwrap_or([0; 16]);
    emit_full(
        pending,
        tgid,
        tid,
        0,
        now.wrapping_sub(start),
        fd as u64 + 1,
        reply,
    );
    unsafe { (*pending).start_ns = 0 };
    let _ = DB_INFLIGHT.remove(&tid);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_read")]
pub fn wire_read_return(ctx: TracePointContext) -> u32 {
    wire_read_exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvfrom")]
pub fn wire_recvfrom_return(ctx: TracePointContext) -> u32 {
    wire_read_exit(&ctx)
}

// ---- MySQL / MariaDB client library: mysql_real_query, mysql_send_query +
// mysql_read_query_result; per connection (the MYSQL *), one query in flight each. ----

#[inline(always)]
fn mysql_start(ctx: &ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    announce(tgid, tid);
    let regs = ctx.regs as *const u8;
    let key = ConnKey {
        tgid,
        _pad: 0,
        conn: reg(regs, &ARG1_REG),
    };
    enter_call(tid, key.conn);
    if unsafe { CLIENT_PENDING.get(&key) }.is_some_and(|p| p.start_ns != 0) {
        return 0; // mysql_real_query calling mysql_send_query: already timed
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*scratch).start_ns = bpf_ktime_get_ns();
        (*scratch).source = SOURCE_MYSQL;
        (*scratch).user_stack_id = issuing_stack(ctx);
        // The text is not NUL-terminated: its length is the third argument.
        let text = reg(regs, &ARG2_REG) as *const u8;
        let len = reg(regs, &ARG3_REG);
        let n = if len < QUERY_MAX as u64 {
            len
        } else {
            QUERY_MAX as u64
        } as usize;
        (*scratch).len = if n > 0
            && n <= QUERY_MAX
            && aya_ebpf::helpers::bpf_probe_read_user_buf(text, &mut (&mut (*scratch).query)[..n])
                .is_ok()
        {
            if n < QUERY_MAX {
                (*scratch).query[n] = 0;
            }
            n as u32
        } else {
            count(counter::TEXT_UNREADABLE);
            0
        };
        if CLIENT_PENDING.insert(&key, &*scratch, 0).is_err() {
            count(counter::PENDING_MAP_FULL);
        }
        waiting_for(tid, &(*scratch).query, (*scratch).user_stack_id);
    }
    0
}

/// mysql_real_query(mysql, query, length) and mysql_send_query(mysql, query, length).
#[uprobe]
pub fn mysql_query(ctx: ProbeContext) -> u32 {
    mysql_start(&ctx)
}

/// mysql_read_query_result(mysql) entry: remember the connection for the return.
#[uprobe]
pub fn mysql_read_result(ctx: ProbeContext) -> u32 {
    enter_call(
        bpf_get_current_pid_tgid() as u32,
        reg(ctx.regs as *const u8, &ARG1_REG),
    );
    0
}

/// mysql_real_query / mysql_read_query_result returned: the result (header) is in; a
/// non-zero return is an error.
#[uretprobe]
pub fn mysql_query_return(ctx: RetProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(key) = returning_call(tgid, tid) else {
        return 0;
    };
    let Some(pending) = CLIENT_PENDING.get_ptr_mut(&key) else {
        return 0;
    };
    let start = unsafe { (*pending).start_ns };
    if start == 0 || unsafe { (*pending).source } != SOURCE_MYSQL {
        return 0;
    }
    let failed = reg(ctx.regs as *const u8, &RET_REG) as u32 != 0;
    count(counter::QUERIES);
    emit(
        pending,
        tgid,
        tid,
        if failed { FLAG_ERROR } else { 0 },
        now.wrapping_sub(start),
    );
    unsafe { (*pending).start_ns = 0 };
    let _ = DB_INFLIGHT.remove(&tid);
    0
}
