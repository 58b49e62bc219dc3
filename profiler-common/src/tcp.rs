//! TCP probe family: connection lifecycles from the `sock:inet_sock_set_state` tracepoint
//! (connect latency, lifetime, bytes, smoothed RTT read from `struct tcp_sock` at close) and
//! retransmits from `tcp:tcp_retransmit_skb`, sent to userspace one event per connect and
//! per close.

/// TCP states, as in include/net/tcp_states.h.
pub mod state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
}

/// This side called connect().
pub const ROLE_CONNECT: u8 = 1;
/// This side came from a listening socket (accept()).
pub const ROLE_ACCEPT: u8 = 2;

/// An active open ended: established (`failed` = 0) or not (`failed` = 1).
pub const EVENT_CONNECT: u32 = 1;
/// A connection we saw open reached CLOSE.
pub const EVENT_CLOSE: u32 = 2;

/// A connection being tracked, keyed by its `struct sock` address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpConn {
    /// First state change seen: SYN_SENT (connect) or ESTABLISHED (accepted).
    pub birth_ns: u64,
    /// Connect latency once established (0 before, and for accepted connections).
    pub connect_ns: u64,
    /// Retransmitted segments seen on this socket.
    pub retransmits: u64,
    /// The process that owns it: the task that called connect(), or close()/shutdown() on
    /// it (the state changes that only happen in process context); 0 while unknown.
    pub owner_tgid: u32,
    pub owner_tid: u32,
    pub comm: [u8; 16],
    pub role: u8,
    /// 1: the owner (known in process context) lies outside the `--cgroup` subtrees.
    pub outside_cgroup: u8,
    pub _pad: [u8; 6],
}

/// One connect or close, sent on the `TCP_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpEvent {
    pub kind: u32,
    /// Owner (0 when no process-context state change was seen).
    pub tgid: u32,
    pub tid: u32,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub role: u8,
    pub failed: u8,
    /// State it left for CLOSE.
    pub old_state: i32,
    /// IPv4 addresses use the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; 16],
    pub connect_ns: u64,
    /// Birth to CLOSE (close events).
    pub lifetime_ns: u64,
    /// Payload bytes received (`tcp_sock.bytes_received`, less the FIN's sequence number
    /// when a FIN came) and sent (`bytes_sent - bytes_retrans`: each byte once).
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// `tcp_sock.srtt_us >> 3` at close: smoothed RTT in microseconds.
    pub srtt_us: u32,
    /// Retransmits this profiler saw on the socket.
    pub retransmits: u32,
    /// `tcp_sock.total_retrans`: the kernel's own count for the socket's whole life.
    pub kernel_retransmits: u32,
    pub _pad: u32,
    /// When the event happened (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
    pub at_ns: u64,
}

pub mod counter {
    pub const STATE_CHANGES: u32 = 0;
    pub const CONNS_MAP_FULL: u32 = 1;
    pub const EVENTS_LOST: u32 = 2;
    /// Closes of connections not tracked: opened before the capture started, or (with
    /// -p/--tid) connected by a process that is not watched.
    pub const UNTRACKED_CLOSES: u32 = 3;
    /// Closes of connections no process was seen to own (e.g. reset before close()).
    pub const UNKNOWN_OWNER: u32 = 4;
    pub const RETRANSMITS: u32 = 5;
    /// Retransmits on sockets opened before the capture started.
    pub const RETRANSMITS_UNTRACKED: u32 = 6;
    pub const SYNACK_RETRANSMITS: u32 = 7;
    pub const COUNT: u32 = 8;

    pub const NAMES: [&str; COUNT as usize] = [
        "state_changes",
        "conns_map_full",
        "events_lost",
        "untracked_closes",
        "unknown_owner",
        "retransmits",
        "retransmits_untracked",
        "synack_retransmits",
    ];
}

pub mod maps {
    pub const CONNS: &str = "TCP_CONNS";
    pub const EVENTS: &str = "TCP_EVENTS";
    pub const COUNTERS: &str = "TCP_COUNTERS";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::TcpConn {}
    unsafe impl aya::Pod for super::TcpEvent {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<super::TcpConn>(), 56);
        assert_eq!(core::mem::size_of::<super::TcpEvent>(), 128);
    }
}
