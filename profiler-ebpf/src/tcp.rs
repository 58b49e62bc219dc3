//! TCP connections from `sock:inet_sock_set_state`: connect latency (SYN_SENT → ESTABLISHED),
//! lifetime, bytes and smoothed RTT (read from `struct tcp_sock` at CLOSE), and retransmits
//! from `tcp:tcp_retransmit_skb`. One ring-buffer event per finished connect and per close.
//!
//! State changes mostly run in softirq context, where the current task is whoever was
//! interrupted. A connection's owner is taken only from the changes that happen in the
//! owner's own system calls: → SYN_SENT (connect()), → FIN_WAIT1 (close() or shutdown()) and
//! CLOSE_WAIT → LAST_ACK (close()), and an abortive close() (→ CLOSE once close() has shut
//! both directions). (The record's common_flags cannot tell the context:
//! for BPF its first 8 bytes hold a pt_regs pointer.)

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use profiler_common::tcp::{
    EVENT_CLOSE, EVENT_CONNECT, ROLE_ACCEPT, ROLE_CONNECT, TcpConn, TcpEvent, counter, state,
};

use crate::common::{cgroup_wanted, config, wanted_ids, wanted_owner_ids};

// Offsets of the inet_sock_set_state record's fields (from its format file).
#[unsafe(no_mangle)]
static TP_TCP_SKADDR_OFF: u32 = 8;
#[unsafe(no_mangle)]
static TP_TCP_OLDSTATE_OFF: u32 = 16;
#[unsafe(no_mangle)]
static TP_TCP_NEWSTATE_OFF: u32 = 20;
#[unsafe(no_mangle)]
static TP_TCP_SPORT_OFF: u32 = 24;
#[unsafe(no_mangle)]
static TP_TCP_DPORT_OFF: u32 = 26;
#[unsafe(no_mangle)]
static TP_TCP_FAMILY_OFF: u32 = 28;
#[unsafe(no_mangle)]
static TP_TCP_PROTOCOL_OFF: u32 = 30;
#[unsafe(no_mangle)]
static TP_TCP_SADDR_OFF: u32 = 32;
#[unsafe(no_mangle)]
static TP_TCP_DADDR_OFF: u32 = 36;
#[unsafe(no_mangle)]
static TP_TCP_SADDR_V6_OFF: u32 = 40;
#[unsafe(no_mangle)]
static TP_TCP_DADDR_V6_OFF: u32 = 56;
/// `skaddr` in the tcp_retransmit_skb record.
#[unsafe(no_mangle)]
static TP_RETRANS_SKADDR_OFF: u32 = 16;
// Offsets in `struct tcp_sock`, from the running kernel's BTF.
#[unsafe(no_mangle)]
static TCP_SOCK_BYTES_RECEIVED_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_BYTES_SENT_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_BYTES_RETRANS_OFF: u32 = 0;
/// `sock.__sk_common.skc_flags` (`sk_flags`).
#[unsafe(no_mangle)]
static SOCK_FLAGS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_SHUTDOWN_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_SRTT_US_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_TOTAL_RETRANS_OFF: u32 = 0;

#[map(name = "TCP_CONNS")]
static CONNS: HashMap<u64, TcpConn> = HashMap::with_max_entries(32768, 0);

#[map(name = "TCP_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES as u32, 0);

const EVENTS_BYTES: u64 = 1024 * 1024;
/// Userspace drains the ring on a timer; it is woken early only past this much backlog (a
/// wakeup per event would cost more than the event).
const WAKEUP_BACKLOG: u64 = EVENTS_BYTES / 4;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

#[map(name = "TCP_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
/// `SOCK_DONE` in `sk_flags`: set by tcp_fin() when the peer's FIN arrived.
const SOCK_DONE: u64 = 1 << 1;
/// `sk_shutdown` after close(): RCV_SHUTDOWN | SEND_SHUTDOWN.
const SHUTDOWN_MASK: u8 = 3;

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn field<T: Default>(ctx: &TracePointContext, offset: &u32) -> T {
    unsafe { ctx.read_at::<T>(config(offset) as usize) }.unwrap_or_default()
}

#[inline(always)]
fn sock_field<T: Default>(sk: u64, offset: &u32) -> T {
    unsafe { bpf_probe_read_kernel((sk + config(offset) as u64) as *const T) }.unwrap_or_default()
}

#[inline(always)]
fn address(ctx: &TracePointContext, family: u16, v4: &u32, v6: &u32) -> [u8; 16] {
    if family == AF_INET {
        let a: [u8; 4] = field(ctx, v4);
        [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    } else {
        field(ctx, v6)
    }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn tcp_state(ctx: TracePointContext) -> u32 {
    let protocol: u16 = field(&ctx, &TP_TCP_PROTOCOL_OFF);
    if protocol != IPPROTO_TCP {
        return 0;
    }
    count(counter::STATE_CHANGES);
    let sk: u64 = field(&ctx, &TP_TCP_SKADDR_OFF);
    let old: i32 = field(&ctx, &TP_TCP_OLDSTATE_OFF);
    let new: i32 = field(&ctx, &TP_TCP_NEWSTATE_OFF);
    let mut process_context =
        new == state::FIN_WAIT1 || (new == state::LAST_ACK && old == state::CLOSE_WAIT);
    let now = unsafe { bpf_ktime_get_ns() };

    if new == state::SYN_SENT {
        // connect(): process context, the caller owns the socket.
        let pid_tgid = bpf_get_current_pid_tgid();
        let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
        if !wanted_ids(tgid, tid) {
            return 0;
        }
        let conn = TcpConn {
            birth_ns: now,
            owner_tgid: tgid,
            owner_tid: tid,
            comm: bpf_get_current_comm().unwrap_or_default(),
            role: ROLE_CONNECT,
            ..TcpConn::default()
        };
        if CONNS.insert(&sk, &conn, 0).is_err() {
            count(counter::CONNS_MAP_FULL);
        }
        return 0;
    }

    let Some(conn) = CONNS.get_ptr_mut(&sk) else {
        if new == state::ESTABLISHED && old == state::SYN_RECV {
            // A child of a listening socket; its owner is known once the program that
            // accepted it acts on it.
            let conn = TcpConn {
                birth_ns: now,
                role: ROLE_ACCEPT,
                ..TcpConn::default()
            };
            if CONNS.insert(&sk, &conn, 0).is_err() {
                count(counter::CONNS_MAP_FULL);
            }
        } else if new == state::CLOSE && old != state::LISTEN {
            count(counter::UNTRACKED_CLOSES);
        }
        return 0;
    };
    if new == state::CLOSE && unsafe { (*conn).owner_tgid } == 0 {
        // An abortive close() (unread data, SO_LINGER 0) goes straight to CLOSE, after
        // close() set sk_shutdown; a reset from the peer reaches CLOSE before tcp_done()
        // sets it.
        let shutdown: u8 = sock_field(sk, &SOCK_SHUTDOWN_OFF);
        process_context = shutdown == SHUTDOWN_MASK;
    }
    if process_context && unsafe { (*conn).owner_tgid } == 0 {
        let pid_tgid = bpf_get_current_pid_tgid();
        unsafe {
            (*conn).owner_tgid = (pid_tgid >> 32) as u32;
            (*conn).owner_tid = pid_tgid as u32;
            (*conn).comm = bpf_get_current_comm().unwrap_or_default();
            (*conn).outside_cgroup = u8::from(!cgroup_wanted());
        }
    }
    if new == state::ESTABLISHED {
        let c = unsafe { *conn };
        if c.role == ROLE_CONNECT && c.connect_ns == 0 {
            let latency = now.wrapping_sub(c.birth_ns).max(1);
            unsafe { (*conn).connect_ns = latency };
            emit(&ctx, EVENT_CONNECT, &c, sk, old, false, latency, 0);
        }
        return 0;
    }
    if new != state::CLOSE {
        return 0;
    }
    let c = unsafe { *conn };
    let _ = CONNS.remove(&sk);
    if c.owner_tgid == 0 {
        count(counter::UNKNOWN_OWNER);
    }
    if c.outside_cgroup != 0 || !wanted_owner_ids(c.owner_tgid, c.owner_tid) {
        return 0;
    }
    let lifetime = now.wrapping_sub(c.birth_ns);
    if c.role == ROLE_CONNECT && c.connect_ns == 0 {
        emit(&ctx, EVENT_CONNECT, &c, sk, old, true, lifetime, 0);
    } else {
        emit(
            &ctx,
            EVENT_CLOSE,
            &c,
            sk,
            old,
            false,
            c.connect_ns,
            lifetime,
        );
    }
    0
}

#[inline(always)]
fn emit(
    ctx: &TracePointContext,
    kind: u32,
    c: &TcpConn,
    sk: u64,
    old_state: i32,
    failed: bool,
    connect_ns: u64,
    lifetime_ns: u64,
) {
    let Some(mut entry) = EVENTS.reserve::<TcpEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let family: u16 = field(ctx, &TP_TCP_FAMILY_OFF);
    let closing = kind == EVENT_CLOSE;
    let srtt: u32 = if closing {
        sock_field(sk, &TCP_SOCK_SRTT_US_OFF)
    } else {
        0
    };
    let (mut bytes_received, mut bytes_sent) = (0, 0);
    if closing {
        // bytes_received counts the FIN's sequence number too; bytes_sent counts resent
        // bytes again.
        let received: u64 = sock_field(sk, &TCP_SOCK_BYTES_RECEIVED_OFF);
        let flags: u64 = sock_field(sk, &SOCK_FLAGS_OFF);
        let fin = u64::from(flags & SOCK_DONE != 0);
        bytes_received = received.saturating_sub(fin);
        let sent: u64 = sock_field(sk, &TCP_SOCK_BYTES_SENT_OFF);
        let resent: u64 = sock_field(sk, &TCP_SOCK_BYTES_RETRANS_OFF);
        bytes_sent = sent.saturating_sub(resent);
    }
    entry.write(TcpEvent {
        kind,
        tgid: c.owner_tgid,
        tid: c.owner_tid,
        family,
        sport: field(ctx, &TP_TCP_SPORT_OFF),
        dport: field(ctx, &TP_TCP_DPORT_OFF),
        role: c.role,
        failed: u8::from(failed),
        old_state,
        saddr: address(ctx, family, &TP_TCP_SADDR_OFF, &TP_TCP_SADDR_V6_OFF),
        daddr: address(ctx, family, &TP_TCP_DADDR_OFF, &TP_TCP_DADDR_V6_OFF),
        comm: c.comm,
        connect_ns,
        lifetime_ns,
        bytes_received,
        bytes_sent,
        srtt_us: srtt >> 3,
        retransmits: c.retransmits as u32,
        kernel_retransmits: if closing {
            sock_field(sk, &TCP_SOCK_TOTAL_RETRANS_OFF)
        } else {
            0
        },
        _pad: 0,
        at_ns: unsafe { bpf_ktime_get_ns() },
    });
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BACKLOG {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags);
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit(ctx: TracePointContext) -> u32 {
    count(counter::RETRANSMITS);
    let sk: u64 = field(&ctx, &TP_RETRANS_SKADDR_OFF);
    match CONNS.get_ptr_mut(&sk) {
        // Retransmits of one socket can run on two CPUs (timer and softirq).
        Some(conn) => unsafe {
            core::intrinsics::atomic_xadd::<_, _, { core::intrinsics::AtomicOrdering::Relaxed }>(
                &mut (*conn).retransmits as *mut u64,
                1u64,
            );
        },
        None => count(counter::RETRANSMITS_UNTRACKED),
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(_ctx: TracePointContext) -> u32 {
    count(counter::SYNACK_RETRANSMITS);
    0
}
