//! MySQL / MariaDB client library: mysql_real_query, mysql_send_query +
//! mysql_read_query_result; per connection (the MYSQL *), one query in flight each. And
//! server-side prepared statements: mysql_stmt_prepare (text per statement handle),
//! mysql_stmt_execute to mysql_stmt_store_result (time per execution).
//!
//! Cost per call: a uprobe trap each (entry, and the uretprobes' trampoline), one LRU map
//! update per call and a ring-buffer event per query; the issuing user stack is walked at
//! the query's start.

use super::*;

/// Copies the query text the mysql_* call was given (its second argument, not
/// NUL-terminated, the length is the third) into `scratch`, up to `QUERY_MAX` bytes; returns
/// the length kept (0, counted, when it cannot be read).
#[inline(always)]
unsafe fn read_counted_text(scratch: *mut DbPending, regs: *const u8) -> u32 {
    let text = reg(regs, &ARG2_REG) as *const u8;
    let len = reg(regs, &ARG3_REG);
    let n = if len < QUERY_MAX as u64 {
        len
    } else {
        QUERY_MAX as u64
    } as usize;
    if n > 0
        && n <= QUERY_MAX
        && unsafe {
            aya_ebpf::helpers::bpf_probe_read_user_buf(text, &mut (&mut (*scratch).query)[..n])
        }
        .is_ok()
    {
        if n < QUERY_MAX {
            unsafe { (*scratch).query[n] = 0 };
        }
        n as u32
    } else {
        count(counter::TEXT_UNREADABLE);
        0
    }
}

#[inline(always)]
fn mysql_start(ctx: &ProbeContext) -> u32 {
    let called = called_now();
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
        (*scratch).source = SOURCE_MYSQL;
        (*scratch).user_stack_id = issuing_stack(ctx);
        // The text is not NUL-terminated: its length is the third argument.
        (*scratch).len = read_counted_text(scratch, regs);
        // The clock starts after the stack walk and the text read: neither is the query's.
        start_clock(scratch, called);
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
    // With its connection: a multi-statement query's further results name themselves by it.
    emit_with_handle(
        pending,
        tgid,
        tid,
        if failed { FLAG_ERROR } else { 0 },
        now.wrapping_sub(start),
        key.conn,
    );
    unsafe { (*pending).start_ns = 0 };
    let _ = DB_INFLIGHT.remove(&tid);
    0
}

// Server-side prepared statements (the binary protocol): mysql_stmt_prepare names a
// statement handle's text (one event; userspace keeps it per process and handle), an
// execution runs from mysql_stmt_execute's entry until its result is in: the return of
// mysql_stmt_store_result when the client buffers the rows (sysbench, most drivers), else
// the execute's own return (emitted when the client next touches the statement: another
// execute, a reset, free_result or close). Per statement handle, one execution in flight.

#[map(name = "DB_MYSQL_EXEC")]
static MYSQL_EXEC: LruHashMap<ConnKey, MysqlExec> = LruHashMap::with_max_entries(16384, 0);

/// mysql_stmt_prepare(stmt, query, length): the statement's text, sent once.
#[uprobe]
pub fn mysql_stmt_prepare(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    announce(tgid, tid);
    let regs = ctx.regs as *const u8;
    let stmt = reg(regs, &ARG1_REG);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*scratch).start_ns = 0;
        (*scratch).source = SOURCE_MYSQL;
        (*scratch).user_stack_id = -1;
        (*scratch).len = read_counted_text(scratch, regs);
    }
    emit_with_handle(scratch, tgid, tid, FLAG_PREPARE, 0, stmt);
    0
}

/// Sends one finished execution of statement `key` (text from its prepare event), or with
/// `FLAG_MORE_RESULTS` one further result of connection `key`.
#[inline(always)]
fn mysql_exec_finish(
    tgid: u32,
    tid: u32,
    key: &ConnKey,
    exec: &MysqlExec,
    end_ns: u64,
    flags: u32,
) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        (*scratch).start_ns = exec.start_ns;
        (*scratch).queued_ns = exec.queued_ns;
        (*scratch).probe_ns = exec.probe_ns;
        (*scratch).source = SOURCE_MYSQL;
        (*scratch).user_stack_id = exec.user_stack_id;
        (*scratch).len = 0;
    }
    count(counter::QUERIES);
    emit_with_handle(
        scratch,
        tgid,
        tid,
        flags,
        end_ns.wrapping_sub(exec.start_ns),
        key.conn,
    );
    let _ = DB_INFLIGHT.remove(&tid);
}

/// An execution whose execute returned and no store_result followed ends at that return.
#[inline(always)]
fn mysql_exec_flush(tgid: u32, tid: u32, key: &ConnKey) {
    if let Some(exec) = MYSQL_EXEC.get_ptr_mut(key) {
        let done = unsafe { *exec };
        if done.start_ns != 0 && done.executed_ns != 0 {
            mysql_exec_finish(tgid, tid, key, &done, done.executed_ns, FLAG_STATEMENT);
            unsafe { (*exec).start_ns = 0 };
        }
    }
}

/// mysql_stmt_execute(stmt) entry: an execution starts.
#[uprobe]
pub fn mysql_stmt_execute(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    announce(tgid, tid);
    let key = ConnKey {
        tgid,
        _pad: 0,
        conn: reg(ctx.regs as *const u8, &ARG1_REG),
    };
    mysql_exec_flush(tgid, tid, &key);
    enter_call(tid, key.conn);
    if sampled_out(config(&DB_SAMPLE_MASK)) {
        let _ = MYSQL_EXEC.remove(&key);
        return 0;
    }
    let called = called_now();
    mysql_exec_start(&key, issuing_stack(&ctx), called);
    0
}

/// Starts the clock of an execution (key: its statement handle) or of a further result
/// (key: its connection), after `user_stack_id` was walked.
#[inline(always)]
fn mysql_exec_start(key: &ConnKey, user_stack_id: i32, called: Called) {
    let now = unsafe { bpf_ktime_get_ns() };
    let exec = MysqlExec {
        queued_ns: called.queued_ns,
        start_ns: now,
        executed_ns: 0,
        user_stack_id,
        probe_ns: probe_ns(called, now),
    };
    // In place for a key used before (the usual case): no LRU node allocation.
    if let Some(slot) = MYSQL_EXEC.get_ptr_mut(key) {
        unsafe { *slot = exec };
    } else if MYSQL_EXEC.insert(key, &exec, 0).is_err() {
        count(counter::PENDING_MAP_FULL);
    }
}

/// The execution (or further result) a uretprobe returns from: its key and entry.
#[inline(always)]
fn returning_exec(tgid: u32, tid: u32) -> Option<(ConnKey, *mut MysqlExec)> {
    let key = returning_call(tgid, tid)?;
    let exec = MYSQL_EXEC.get_ptr_mut(&key)?;
    Some((key, exec))
}

/// mysql_stmt_execute returned: failed (the execution ends), or the result header is in.
#[uretprobe]
pub fn mysql_stmt_execute_return(ctx: RetProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some((key, exec)) = returning_exec(tgid, tid) else {
        return 0;
    };
    if unsafe { (*exec).start_ns } == 0 {
        return 0;
    }
    if reg(ctx.regs as *const u8, &RET_REG) as u32 != 0 {
        let done = unsafe { *exec };
        mysql_exec_finish(tgid, tid, &key, &done, now, FLAG_STATEMENT | FLAG_ERROR);
        unsafe { (*exec).start_ns = 0 };
    } else {
        unsafe { (*exec).executed_ns = now };
    }
    0
}

/// mysql_stmt_store_result(stmt) entry: remember the statement for the return.
#[uprobe]
pub fn mysql_stmt_store_result(ctx: ProbeContext) -> u32 {
    enter_call(
        bpf_get_current_pid_tgid() as u32,
        reg(ctx.regs as *const u8, &ARG1_REG),
    );
    0
}

/// mysql_stmt_store_result returned: every row is in; the execution ends.
#[uretprobe]
pub fn mysql_stmt_store_result_return(ctx: RetProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some((key, exec)) = returning_exec(tgid, tid) else {
        return 0;
    };
    let done = unsafe { *exec };
    if done.start_ns == 0 || done.executed_ns == 0 {
        return 0;
    }
    let failed = reg(ctx.regs as *const u8, &RET_REG) as u32 != 0;
    let flags = FLAG_STATEMENT | if failed { FLAG_ERROR } else { 0 };
    mysql_exec_finish(tgid, tid, &key, &done, now, flags);
    unsafe { (*exec).start_ns = 0 };
    0
}

/// mysql_stmt_reset / mysql_stmt_free_result / mysql_stmt_close(stmt): an execution
/// without store_result ended at its execute's return.
#[uprobe]
pub fn mysql_stmt_done(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let key = ConnKey {
        tgid,
        _pad: 0,
        conn: reg(ctx.regs as *const u8, &ARG1_REG),
    };
    mysql_exec_flush(tgid, tid, &key);
    0
}

// Multi-statement queries (CLIENT_MULTI_STATEMENTS, and stored procedures' result sets):
// mysql_real_query returns once the first statement's result is in; each further result is
// read by a mysql_next_result, timed from its entry to its return — the wait for the next
// statement (the server runs it while the client reads the previous result). A call that
// returns -1 found no further result (drivers call it before every query) and is no query.
// The per-connection clock is kept in DB_MYSQL_EXEC by the connection (never a statement
// handle: the two are different objects).

/// mysql_next_result(mysql) entry.
#[uprobe]
pub fn mysql_next_result(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    let key = ConnKey {
        tgid,
        _pad: 0,
        conn: reg(ctx.regs as *const u8, &ARG1_REG),
    };
    enter_call(tid, key.conn);
    // No stack: userspace gives it the stack of the query that sent the statements.
    mysql_exec_start(&key, -1, called_now());
    0
}

/// mysql_next_result returned: 0, a further result is in; above 0, it failed; -1, there
/// was none.
#[uretprobe]
pub fn mysql_next_result_return(ctx: RetProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some((key, exec)) = returning_exec(tgid, tid) else {
        return 0;
    };
    let done = unsafe { *exec };
    if done.start_ns == 0 {
        return 0;
    }
    unsafe { (*exec).start_ns = 0 };
    let ret = reg(ctx.regs as *const u8, &RET_REG) as i32;
    if ret < 0 {
        return 0;
    }
    let flags = FLAG_MORE_RESULTS | if ret > 0 { FLAG_ERROR } else { 0 };
    mysql_exec_finish(tgid, tid, &key, &done, now, flags);
    0
}
