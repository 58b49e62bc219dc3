//! On the wire: requests written to sockets, ended by the first read with data.
//!
//! Plain I/O (write/sendto, read/recvfrom) and vectored or message I/O (writev, sendmsg,
//! sendmmsg; readv, recvmsg), which libuv (Node), many async runtimes and drivers use: a
//! request's bytes are then taken from its first iovec (and the second when the first holds
//! less than a header, as when a driver writes the header apart), its length is the sum of
//! the first iovecs' lengths; a sendmmsg is judged by its first message.

use super::*;

/// Offsets of fd, buffer (or iovec array, msghdr), length (or iovec count) and return value
/// in the syscalls:sys_{enter,exit}_{write,sendto,writev,sendmsg,sendmmsg,read,recvfrom,
/// readv,recvmsg} records (the same in all; checked by the loader).
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

/// How a syscall's buffer argument points at the bytes.
const BYTES_PLAIN: u32 = 0;
/// An iovec array and its count (writev, readv).
const BYTES_IOVEC: u32 = 1;
/// A msghdr (sendmsg, recvmsg) or an mmsghdr array, whose first entry starts with one.
const BYTES_MSGHDR: u32 = 2;
/// In `struct user_msghdr`: msg_iov and msg_iovlen (after msg_name and msg_namelen; the
/// same on every 64-bit architecture).
const MSGHDR_IOV_OFF: u64 = 16;
const MSGHDR_IOVLEN_OFF: u64 = 24;
/// iovecs whose lengths add up to a request's length.
const IOVECS_SUMMED: u64 = 8;

/// The iovec array and count a vectored or message syscall's argument describes.
#[inline(always)]
fn iovecs(kind: u32, arg: u64, count: u64) -> (u64, u64) {
    if kind == BYTES_MSGHDR {
        let iov: u64 =
            unsafe { bpf_probe_read_user((arg + MSGHDR_IOV_OFF) as *const u64) }.unwrap_or(0);
        let n: u64 =
            unsafe { bpf_probe_read_user((arg + MSGHDR_IOVLEN_OFF) as *const u64) }.unwrap_or(0);
        (iov, n)
    } else {
        (arg, count)
    }
}

/// Copies the first bytes of an iovec array into `dst` (the first iovec; the second too
/// when the first is shorter than a header); returns (total length of the first iovecs,
/// bytes copied).
#[inline(always)]
fn gather(vec: u64, vlen: u64, dst: &mut [u8; QUERY_MAX]) -> (u64, usize) {
    let Ok(first) = (unsafe { bpf_probe_read_user(vec as *const [u64; 2]) }) else {
        return (0, 0);
    };
    if vlen == 0 {
        return (0, 0);
    }
    let n1 = if first[1] < QUERY_MAX as u64 {
        first[1] as usize
    } else {
        QUERY_MAX
    };
    if n1 > 0
        && n1 <= QUERY_MAX
        && unsafe {
            aya_ebpf::helpers::bpf_probe_read_user_buf(first[0] as *const u8, &mut dst[..n1])
        }
        .is_err()
    {
        return (0, 0);
    }
    let mut total = first[1];
    let mut copied = n1;
    let mut i = 1;
    while i < IOVECS_SUMMED {
        if i >= vlen {
            break;
        }
        let Ok(next) = (unsafe { bpf_probe_read_user((vec + 16 * i) as *const [u64; 2]) }) else {
            break;
        };
        total += next[1];
        if i == 1 && n1 < 8 {
            // A header written apart: the second iovec's bytes follow it.
            let at = n1 & 7;
            let room = QUERY_MAX - 8;
            let n2 = if next[1] < room as u64 {
                next[1] as usize
            } else {
                room
            };
            if n2 > 0 && n2 <= room {
                let tail = unsafe { core::slice::from_raw_parts_mut(dst.as_mut_ptr().add(at), n2) };
                if unsafe { aya_ebpf::helpers::bpf_probe_read_user_buf(next[0] as *const u8, tail) }
                    .is_ok()
                {
                    copied = at + n2;
                }
            }
        }
        i += 1;
    }
    (total, copied)
}

#[inline(always)]
fn wire_send(ctx: &TracePointContext, kind: u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let fd: u64 = unsafe { ctx.read_at(config(&TP_SYS_FD_OFF) as usize) }.unwrap_or(0);
    let buf: u64 = unsafe { ctx.read_at(config(&TP_SYS_BUF_OFF) as usize) }.unwrap_or(0);
    let size: u64 = unsafe { ctx.read_at(config(&TP_SYS_LEN_OFF) as usize) }.unwrap_or(0);
    if (kind == BYTES_PLAIN && size < 6) || !wanted_ids(tgid, tid) {
        return 0;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // Vectored: the bytes go to the scratch first (the header may span two iovecs).
    let (len, head) = if kind == BYTES_PLAIN {
        let Ok(head) = (unsafe { bpf_probe_read_user(buf as *const [u8; 8]) }) else {
            return 0;
        };
        (size, head)
    } else {
        let (vec, vlen) = iovecs(kind, buf, size);
        let (total, copied) = gather(vec, vlen, unsafe { &mut (*scratch).query });
        if total < 6 || copied < 6 {
            return 0;
        }
        unsafe { (*scratch).len = copied as u32 };
        let q = unsafe { &(*scratch).query };
        (total, [q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]])
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
    unsafe {
        start_clock(scratch, called_now());
        (*scratch).source = source;
        (*scratch).user_stack_id = -1;
        if kind == BYTES_PLAIN {
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
        }
        if WIRE_PENDING.insert(&key, &*scratch, 0).is_err() {
            count(counter::PENDING_MAP_FULL);
        }
        // Several requests in one write (a pipeline): userspace counts and names them all
        // from the first WIRE_BATCH_MAX bytes.
        if kind == BYTES_PLAIN && len > QUERY_MAX as u64 {
            send_batch(tgid, fd, (*scratch).start_ns, buf, len);
        }
        // A simple query's text starts after its 5-byte header. (Parse/Bind carry names and
        // binary parameters, Redis its arguments: no frame for those.)
        if head[0] == b'Q' {
            waiting_for(tid, &(&(*scratch).query)[5..], -1);
        }
    }
    0
}

#[map(name = "DB_WIRE_BATCH")]
static BATCH: PerCpuArray<DbWireBatch> = PerCpuArray::with_max_entries(1, 0);

/// The first `WIRE_BATCH_MAX` bytes of a long request write, for userspace: an event as
/// long as the write (up to that), not a fixed 4 KiB, so fast pipelines fit the ring.
#[inline(always)]
fn send_batch(tgid: u32, fd: u64, start_ns: u64, buf: u64, len: u64) {
    let Some(batch) = BATCH.get_ptr_mut(0) else {
        return;
    };
    let n = if len < WIRE_BATCH_MAX as u64 {
        len as usize
    } else {
        WIRE_BATCH_MAX
    };
    unsafe {
        (*batch).marker = WIRE_BATCH_MARKER;
        (*batch).tgid = tgid;
        (*batch).fd = fd as u32 + 1;
        (*batch)._pad = 0;
        (*batch).start_ns = start_ns;
        (*batch).len = len;
        if n == 0
            || n > WIRE_BATCH_MAX
            || aya_ebpf::helpers::bpf_probe_read_user_buf(
                buf as *const u8,
                &mut (&mut (*batch).bytes)[..n],
            )
            .is_err()
        {
            return;
        }
        let size = WIRE_BATCH_HEADER + n;
        if size > core::mem::size_of::<DbWireBatch>() {
            return;
        }
        let wakeup = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BACKLOG {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        let bytes = core::slice::from_raw_parts(batch as *const u8, size);
        if EVENTS.output::<[u8]>(bytes, wakeup).is_err() {
            count(counter::EVENTS_LOST);
        }
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_write")]
pub fn wire_write(ctx: TracePointContext) -> u32 {
    wire_send(&ctx, BYTES_PLAIN)
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendto")]
pub fn wire_sendto(ctx: TracePointContext) -> u32 {
    wire_send(&ctx, BYTES_PLAIN)
}

#[tracepoint(category = "syscalls", name = "sys_enter_writev")]
pub fn wire_writev(ctx: TracePointContext) -> u32 {
    wire_send(&ctx, BYTES_IOVEC)
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendmsg")]
pub fn wire_sendmsg(ctx: TracePointContext) -> u32 {
    wire_send(&ctx, BYTES_MSGHDR)
}

/// sendmmsg(fd, mmsghdr *, vlen): judged by its first message (an mmsghdr starts with a
/// msghdr).
#[tracepoint(category = "syscalls", name = "sys_enter_sendmmsg")]
pub fn wire_sendmmsg(ctx: TracePointContext) -> u32 {
    wire_send(&ctx, BYTES_MSGHDR)
}

#[inline(always)]
fn wire_read_enter(ctx: &TracePointContext, kind: u32) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let fd: u64 = unsafe { ctx.read_at(config(&TP_SYS_FD_OFF) as usize) }.unwrap_or(0);
    let key = FdKey {
        tgid,
        fd: fd as u32,
    };
    if unsafe { WIRE_PENDING.get(&key) }.is_some_and(|p| p.start_ns != 0) {
        let arg: u64 = unsafe { ctx.read_at(config(&TP_SYS_BUF_OFF) as usize) }.unwrap_or(0);
        // Where the reply's first bytes land: the buffer, or the first iovec's.
        let buf = if kind == BYTES_PLAIN {
            arg
        } else {
            let (vec, _) = iovecs(kind, arg, 0);
            unsafe { bpf_probe_read_user(vec as *const u64) }.unwrap_or(0)
        };
        let read = WireRead { fd, buf };
        let _ = WIRE_READING.insert(&tid, &read, 0);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_read")]
pub fn wire_read(ctx: TracePointContext) -> u32 {
    wire_read_enter(&ctx, BYTES_PLAIN)
}

#[tracepoint(category = "syscalls", name = "sys_enter_recvfrom")]
pub fn wire_recvfrom(ctx: TracePointContext) -> u32 {
    wire_read_enter(&ctx, BYTES_PLAIN)
}

#[tracepoint(category = "syscalls", name = "sys_enter_readv")]
pub fn wire_readv(ctx: TracePointContext) -> u32 {
    wire_read_enter(&ctx, BYTES_IOVEC)
}

#[tracepoint(category = "syscalls", name = "sys_enter_recvmsg")]
pub fn wire_recvmsg(ctx: TracePointContext) -> u32 {
    wire_read_enter(&ctx, BYTES_MSGHDR)
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

#[tracepoint(category = "syscalls", name = "sys_exit_readv")]
pub fn wire_readv_return(ctx: TracePointContext) -> u32 {
    wire_read_exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvmsg")]
pub fn wire_recvmsg_return(ctx: TracePointContext) -> u32 {
    wire_read_exit(&ctx)
}
