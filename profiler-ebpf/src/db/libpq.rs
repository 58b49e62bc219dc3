//! libpq in the client: PQsendQuery* / PQsendPrepare start a command, PQgetResult returning
//! NULL ends it.
//!
//! Per connection, commands complete in the order they were sent, also in pipeline mode
//! (several sent before the first result is read): each connection counts the commands it
//! sent and the ones that completed, and keeps the ones in flight in `PIPELINE_SLOTS`
//! slots (by their number), so each is timed from its own send to the end of its own
//! results. A command sent while every slot is taken is counted, not timed. PQfinish
//! forgets the connection (a new one may get the same address).

use super::*;

/// Commands sent and completed on one connection (`PGconn *`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pipeline {
    sent: u32,
    done: u32,
}

/// A command in flight: its connection and slot (its number modulo `PIPELINE_SLOTS`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CommandKey {
    tgid: u32,
    slot: u32,
    conn: u64,
}

#[map(name = "DB_LIBPQ_PIPELINE")]
static PIPELINE: LruHashMap<ConnKey, Pipeline> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "DB_LIBPQ_COMMANDS")]
static COMMANDS: LruHashMap<CommandKey, DbPending> = LruHashMap::with_max_entries(16384, 0);

/// The number of the command `conn` sends now, or None when its slots are all in flight
/// (counted).
#[inline(always)]
fn next_command(key: &ConnKey) -> Option<u32> {
    let Some(pipeline) = PIPELINE.get_ptr_mut(key) else {
        let first = Pipeline { sent: 1, done: 0 };
        if PIPELINE.insert(key, &first, 0).is_err() {
            count(counter::PENDING_MAP_FULL);
            return None;
        }
        return Some(0);
    };
    let seq = unsafe { (*pipeline).sent };
    unsafe { (*pipeline).sent = seq.wrapping_add(1) };
    if seq.wrapping_sub(unsafe { (*pipeline).done }) >= PIPELINE_SLOTS {
        count(counter::PIPELINE_TOO_DEEP);
        return None;
    }
    Some(seq)
}

/// A libpq call that sends something and whose end PQgetResult will report: stores the
/// start time and `text` (a user pointer) as the connection's next command.
#[inline(always)]
fn client_start(ctx: &ProbeContext, flags: u32) -> u32 {
    let called = called_now();
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !wanted_ids(tgid, tid) {
        return 0;
    }
    announce(tgid, tid);
    let conn_key = ConnKey {
        tgid,
        _pad: 0,
        conn: reg(ctx.regs as *const u8, &ARG1_REG),
    };
    let Some(seq) = next_command(&conn_key) else {
        return 0;
    };
    // Sampled mode: statement preparations are always seen (later executions name them).
    // A command left out leaves its slot with an older number: its end is not timed.
    if flags & FLAG_PREPARE == 0 && sampled_out(config(&DB_SAMPLE_MASK)) {
        return 0;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        (*scratch).user_stack_id = issuing_stack(ctx);
        (*scratch).source = SOURCE_LIBPQ | (flags << 8);
        (*scratch).seq = seq;
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
        // The clock starts after the stack walk and the text read: neither is the query's.
        start_clock(scratch, called);
        let key = CommandKey {
            tgid,
            slot: seq % PIPELINE_SLOTS,
            conn: conn_key.conn,
        };
        // In place when the slot exists (no LRU node allocation).
        if let Some(slot) = COMMANDS.get_ptr_mut(&key) {
            core::ptr::copy_nonoverlapping(scratch as *const DbPending, slot, 1);
        } else if COMMANDS.insert(&key, &*scratch, 0).is_err() {
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

/// PQgetResult returning NULL: the oldest command in flight on the connection has all its
/// results.
#[uretprobe]
pub fn libpq_get_result_return(ctx: RetProbeContext) -> u32 {
    if reg(ctx.regs as *const u8, &RET_REG) != 0 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(conn_key) = returning_call(tgid, tid) else {
        return 0;
    };
    let Some(pipeline) = PIPELINE.get_ptr_mut(&conn_key) else {
        return 0;
    };
    let seq = unsafe { (*pipeline).done };
    if seq == unsafe { (*pipeline).sent } {
        return 0; // nothing in flight (a NULL asked for again)
    }
    unsafe { (*pipeline).done = seq.wrapping_add(1) };
    let key = CommandKey {
        tgid,
        slot: seq % PIPELINE_SLOTS,
        conn: conn_key.conn,
    };
    let Some(pending) = COMMANDS.get_ptr_mut(&key) else {
        return 0;
    };
    let start = unsafe { (*pending).start_ns };
    if start == 0 || unsafe { (*pending).seq } != seq {
        return 0; // sampled out, or sent past the slots
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
        unsafe { bpf_probe_read_user((conn_key.conn + off as u64) as *const i32) }
            .map_or(0, |fd| if fd >= 0 { fd as u64 + 1 } else { 0 })
    };
    emit_with_handle(pending, tgid, tid, flags, now.wrapping_sub(start), socket);
    unsafe { (*pending).start_ns = 0 };
    0
}

/// PQfinish(conn): the connection is gone; its address may come back as a new one.
#[uprobe]
pub fn libpq_finish(ctx: ProbeContext) -> u32 {
    let key = ConnKey {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        conn: reg(ctx.regs as *const u8, &ARG1_REG),
    };
    let _ = PIPELINE.remove(&key);
    0
}
