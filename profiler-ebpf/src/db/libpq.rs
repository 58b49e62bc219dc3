//! libpq in the client: PQsendQuery* / PQsendPrepare start a command, PQgetResult returning
//! NULL ends it.

use super::*;

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
