//! PostgreSQL's `query__start` / `query__done` USDT probes in the server.

use super::*;

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
