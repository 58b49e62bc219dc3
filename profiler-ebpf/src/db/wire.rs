//! On the wire: requests written to sockets, ended by the first read with data.

use super::*;

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
