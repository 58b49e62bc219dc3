//! MySQL / MariaDB client library: mysql_real_query, mysql_send_query +
//! mysql_read_query_result; per connection (the MYSQL *), one query in flight each.

use super::*;

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
