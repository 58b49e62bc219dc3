//! SQLite: sqlite3_prepare_v2/v3 → statement text; sqlite3_step → time per execution.
//!
//! A statement prepared before the capture (an application's statement cache) has its text
//! read from the statement itself (`Vdbe.zSql`, at the offset `sqlite3_sql` loads from) at its
//! first step, once: `DB_SQLITE_KNOWN` holds the statements whose text userspace has.

use super::*;

/// A prepare in flight: the SQL text and where the statement pointer will be written.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SqlitePrepare {
    sql: u64,
    out_stmt: u64,
}

#[map(name = "DB_SQLITE_PREPARE")]
static SQLITE_PREPARE: LruHashMap<u32, SqlitePrepare> = LruHashMap::with_max_entries(4096, 0);

/// Where a statement (`Vdbe`) keeps its SQL text (from sqlite3_sql's code); 0: unknown.
#[unsafe(no_mangle)]
static SQLITE_SQL_OFF: u32 = 0;

/// Statements whose text userspace has (from their prepare, or read at their first step).
#[map(name = "DB_SQLITE_KNOWN")]
static SQLITE_KNOWN: LruHashMap<ConnKey, u8> = LruHashMap::with_max_entries(16384, 0);

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
        (*scratch).len = read_query_text(scratch, prepare.sql).unwrap_or(0);
    }
    emit_with_handle(scratch, tgid, tid, FLAG_PREPARE, 0, stmt);
    let key = ConnKey {
        tgid,
        _pad: 0,
        conn: stmt,
    };
    let _ = SQLITE_KNOWN.insert(&key, &1, 0);
    0
}

/// The first step of a statement whose text userspace lacks (prepared before the capture):
/// its text, read from the statement, as if it had just been prepared.
#[inline(always)]
fn sqlite_text_from_statement(tgid: u32, tid: u32, key: &ConnKey) {
    let off = config(&SQLITE_SQL_OFF);
    if off == 0 || unsafe { SQLITE_KNOWN.get(key) }.is_some() {
        return;
    }
    let _ = SQLITE_KNOWN.insert(key, &1, 0);
    let Ok(sql) = (unsafe { bpf_probe_read_user((key.conn + u64::from(off)) as *const u64) })
    else {
        count(counter::TEXT_UNREADABLE);
        return;
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        (*scratch).start_ns = 0;
        (*scratch).source = SOURCE_SQLITE;
        (*scratch).user_stack_id = -1;
        let Some(len) = read_query_text(scratch, sql) else {
            return;
        };
        (*scratch).len = len;
    }
    count(counter::SQLITE_TEXT_AT_STEP);
    emit_with_handle(scratch, tgid, tid, FLAG_PREPARE, 0, key.conn);
}

#[inline(always)]
fn sqlite_finish(tgid: u32, tid: u32, key: &ConnKey, exec: &SqliteExec, error: bool) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        (*scratch).start_ns = exec.first_ns;
        (*scratch).queued_ns = exec.first_queued_ns;
        (*scratch).probe_ns = exec.probe_ns;
        (*scratch).source = SOURCE_SQLITE;
        (*scratch).user_stack_id = exec.user_stack_id;
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
    let key = ConnKey {
        tgid,
        _pad: 0,
        conn: stmt,
    };
    if let Some(exec) = SQLITE_EXEC.get_ptr_mut(&key) {
        unsafe { (*exec).step_ns = bpf_ktime_get_ns() };
    } else {
        // The execution's first step: its text (when userspace lacks it) and its stack,
        // before the clock starts (neither is the statement's time).
        let called = called_now();
        sqlite_text_from_statement(tgid, tid, &key);
        let user_stack_id = issuing_stack(&ctx);
        let now = unsafe { bpf_ktime_get_ns() };
        let exec = SqliteExec {
            first_ns: now,
            first_queued_ns: called.queued_ns,
            in_step_ns: 0,
            step_ns: now,
            user_stack_id,
            probe_ns: probe_ns(called, now),
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
