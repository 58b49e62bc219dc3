//! Query latency from PostgreSQL's USDT probes: `query__start(const char *query)` keeps the
//! start time and the query text per thread, `query__done` sends one event per query.
//! Attached by userspace with perf_event_open on the uprobe PMU so the kernel raises the
//! probes' semaphores (see `profiler/src/probes/kernel/uprobe.rs`). No pid filter here: the server's
//! backends are other processes than the one named with -p; userspace filters by ancestry.//!
//! One file per source, sharing the maps, globals and event helpers here: `postgres`
//! (server USDT probes), `libpq`, `sqlite`, `mysql` (client libraries) and `wire` (requests
//! and responses on client sockets).

mod libpq;
mod mysql;
mod postgres;
mod sqlite;
mod wire;

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
    ARG_KIND_CONSTANT, ARG_KIND_MEMORY, DbEvent, DbInflight, DbPending, DbWireBatch, FLAG_ERROR,
    FLAG_MORE_RESULTS, FLAG_PREPARE, FLAG_PREPARED, FLAG_STATEMENT, MysqlExec, PIPELINE_SLOTS,
    PREPARE_NAME_MAX, QUERY_MAX, SOURCE_LIBPQ, SOURCE_MYSQL, SOURCE_POSTGRES_USDT, SOURCE_SQLITE,
    SOURCE_WIRE_MYSQL, SOURCE_WIRE_POSTGRES, SOURCE_WIRE_REDIS, SqliteExec, WIRE_BATCH_HEADER,
    WIRE_BATCH_MARKER, WIRE_BATCH_MAX, counter, frame_hash,
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
/// Offset in task_struct of `sched_info.run_delay` (BTF); 0 when unknown.
#[unsafe(no_mangle)]
static TASK_RUN_DELAY_OFF: u32 = 0;

/// The current thread's time spent runnable but waiting for a CPU so far, plus 1 (0 when
/// unknown).
#[inline(always)]
fn queued_so_far() -> u64 {
    let off = config(&TASK_RUN_DELAY_OFF);
    if off == 0 {
        return 0;
    }
    // One more than the kernel's value: a thread that never waited reads 1, not the 0 of
    // "unknown" (whose gaps then counted whole, waits included).
    unsafe {
        bpf_probe_read_kernel((bpf_get_current_task() as *const u8).add(off as usize) as *const u64)
    }
    .map_or(0, |delay| delay.wrapping_add(1))
}

/// When the application called (the probe's entry) and its run-queue wait so far: the end
/// of its own time since its previous query (N+1 gaps leave the probe's work out).
#[derive(Clone, Copy)]
pub struct Called {
    pub ns: u64,
    pub queued_ns: u64,
}

#[inline(always)]
pub fn called_now() -> Called {
    Called {
        ns: unsafe { bpf_ktime_get_ns() },
        queued_ns: queued_so_far(),
    }
}

/// The probe's work since `called` (saturating at u32::MAX ns).
#[inline(always)]
pub fn probe_ns(called: Called, now: u64) -> u32 {
    let spent = now.saturating_sub(called.ns);
    if spent > u32::MAX as u64 {
        u32::MAX
    } else {
        spent as u32
    }
}

/// Starts `pending`'s clock now, for a call made at `called` (see `Called`).
#[inline(always)]
fn start_clock(pending: *mut DbPending, called: Called) {
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        (*pending).queued_ns = called.queued_ns;
        (*pending).start_ns = now;
        (*pending).probe_ns = probe_ns(called, now);
    }
}

/// The way from the current task to a socket's peer (BTF): task_struct.files,
/// files_struct.fdt, fdtable.{max_fds, fd}, file.{f_inode, private_data}, inode.i_mode,
/// socket.sk, sock_common.{skc_family, skc_dport, skc_daddr, skc_v6_daddr}. 0 in
/// `TASK_FILES_OFF`: not known, the peer is not read.
#[unsafe(no_mangle)]
static TASK_FILES_OFF: u32 = 0;
#[unsafe(no_mangle)]
static FILES_FDT_OFF: u32 = 0;
#[unsafe(no_mangle)]
static FDT_MAX_FDS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static FDT_FD_OFF: u32 = 0;
#[unsafe(no_mangle)]
static FILE_INODE_OFF: u32 = 0;
#[unsafe(no_mangle)]
static FILE_PRIVATE_DATA_OFF: u32 = 0;
#[unsafe(no_mangle)]
static INODE_MODE_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SOCKET_SK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SKC_FAMILY_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SKC_DPORT_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SKC_DADDR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SKC_V6_DADDR_OFF: u32 = 0;

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// A kernel pointer at `base + off` (0 when `base` is 0 or unreadable).
#[inline(always)]
fn kernel_ptr(base: u64, off: u32) -> u64 {
    if base == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((base as *const u8).add(off as usize) as *const u64) }
        .unwrap_or(0)
}

/// The peer of the current process's socket `fd`, into the event (family 0: not a socket,
/// or not readable).
#[inline(always)]
fn socket_peer(fd: u64, event: *mut DbEvent) {
    if config(&TASK_FILES_OFF) == 0 {
        return;
    }
    let task = unsafe { bpf_get_current_task() };
    let fdt = kernel_ptr(
        kernel_ptr(task, config(&TASK_FILES_OFF)),
        config(&FILES_FDT_OFF),
    );
    if fdt == 0 {
        return;
    }
    let max_fds: u32 = unsafe {
        bpf_probe_read_kernel(
            (fdt as *const u8).add(config(&FDT_MAX_FDS_OFF) as usize) as *const u32
        )
    }
    .unwrap_or(0);
    if fd >= max_fds as u64 {
        return;
    }
    let file = kernel_ptr(kernel_ptr(fdt, config(&FDT_FD_OFF)), (fd * 8) as u32);
    let inode = kernel_ptr(file, config(&FILE_INODE_OFF));
    if inode == 0 {
        return;
    }
    let mode: u16 = unsafe {
        bpf_probe_read_kernel(
            (inode as *const u8).add(config(&INODE_MODE_OFF) as usize) as *const u16
        )
    }
    .unwrap_or(0);
    if mode & S_IFMT != S_IFSOCK {
        return;
    }
    let sk = kernel_ptr(
        kernel_ptr(file, config(&FILE_PRIVATE_DATA_OFF)),
        config(&SOCKET_SK_OFF),
    );
    if sk == 0 {
        return;
    }
    let at = |off: u32| unsafe { (sk as *const u8).add(off as usize) };
    unsafe {
        let family: u16 =
            bpf_probe_read_kernel(at(config(&SKC_FAMILY_OFF)) as *const u16).unwrap_or(0);
        let port: u16 =
            bpf_probe_read_kernel(at(config(&SKC_DPORT_OFF)) as *const u16).unwrap_or(0);
        match family {
            AF_INET => {
                let addr: [u8; 4] =
                    bpf_probe_read_kernel(at(config(&SKC_DADDR_OFF)) as *const [u8; 4])
                        .unwrap_or([0; 4]);
                (*event).peer = [
                    addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ];
            }
            AF_INET6 => {
                (*event).peer =
                    bpf_probe_read_kernel(at(config(&SKC_V6_DADDR_OFF)) as *const [u8; 16])
                        .unwrap_or([0; 16]);
            }
            AF_UNIX => {}
            _ => return,
        }
        (*event).peer_family = family;
        (*event).peer_port = u16::from_be(port);
    }
}

/// Client processes (libpq, MySQL) already announced to userspace (which reads their memory
/// maps to symbolize the issuing stacks, while they live); the wire decoder leaves them alone.
#[map(name = "DB_SEEN")]
static SEEN: LruHashMap<u32, u8> = LruHashMap::with_max_entries(4096, 0);

/// Client-side queries in flight (MySQL library), per connection: one thread may drive
/// several connections at once.
#[map(name = "DB_CLIENT_PENDING")]
static CLIENT_PENDING: LruHashMap<ConnKey, DbPending> = LruHashMap::with_max_entries(16384, 0);

/// The handle (`PGconn *`, `sqlite3_stmt *`, `MYSQL *`) a thread's library call is about:
/// saved at entry, used at return, when the return value alone does not say.
#[map(name = "DB_CALL_HANDLE")]
static CALL_HANDLE: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn enter_call(tid: u32, handle: u64) {
    // In place when the thread has an entry: an LRU insert allocates a node (≈ 0.4 µs
    // measured per call here), a lookup and a store do not.
    if let Some(slot) = CALL_HANDLE.get_ptr_mut(&tid) {
        unsafe { *slot = handle };
    } else {
        let _ = CALL_HANDLE.insert(&tid, &handle, 0);
    }
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

/// Reads the NUL-terminated text at user address `text` into `pending`'s query: its length,
/// or `None` (counted as `TEXT_UNREADABLE`) when it cannot be read.
#[inline(always)]
fn read_query_text(pending: *mut DbPending, text: u64) -> Option<u32> {
    match unsafe { bpf_probe_read_user_str_bytes(text as *const u8, &mut (*pending).query) } {
        Ok(bytes) => Some(bytes.len().min(QUERY_MAX) as u32),
        Err(_) => {
            count(counter::TEXT_UNREADABLE);
            None
        }
    }
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
        (*event).queued_start_ns = (*pending).queued_ns;
        (*event).probe_ns = (*pending).probe_ns;
        (*event).queued_end_ns = queued_so_far();
        (*event).len = (*pending).len;
        (*event).user_stack_id = (*pending).user_stack_id;
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).handle = handle;
        (*event).reply = reply;
        (*event).peer_family = 0;
        (*event).peer_port = 0;
        (*event)._pad2 = 0;
        (*event).peer = [0; 16];
        // The socket's peer while the connection is open (it may close before userspace
        // reads the event).
        if handle > 0
            && matches!(
                (*pending).source,
                SOURCE_LIBPQ | SOURCE_WIRE_POSTGRES | SOURCE_WIRE_MYSQL | SOURCE_WIRE_REDIS
            )
        {
            socket_peer(handle - 1, event);
        }
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
        // Events without text (statement executions name their prepare's) skip the copy.
        if (*pending).len != 0
            && bpf_probe_read_kernel_buf((*pending).query.as_ptr(), &mut (*event).query).is_err()
        {
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
