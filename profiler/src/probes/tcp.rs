//! TCP family: attaches `profiler-ebpf/src/tcp.rs` to `sock:inet_sock_set_state`,
//! `tcp:tcp_retransmit_skb` and `tcp:tcp_retransmit_synack`, and decodes its connect and
//! close events.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use aya::programs::TracePoint;
use profiler_common::tcp::{EVENT_CLOSE, ROLE_ACCEPT, TcpEvent, counter, maps};

use super::{Globals, Probes, global, kernel::tracefs, program, read_counters};
use crate::probes::kernel::btf::Btf;

const AF_INET: u16 = 2;

pub(super) fn globals(btf: &Btf, globals: &mut Globals) -> Result<()> {
    let state = tracefs::field_offsets("sock", "inet_sock_set_state")?;
    let field = |fields: &HashMap<String, u32>, name: &str, event: &str| {
        fields
            .get(name)
            .copied()
            .with_context(|| format!("tracepoint {event} has no field {name}"))
    };
    for (global_name, name) in [
        ("TP_TCP_SKADDR_OFF", "skaddr"),
        ("TP_TCP_OLDSTATE_OFF", "oldstate"),
        ("TP_TCP_NEWSTATE_OFF", "newstate"),
        ("TP_TCP_SPORT_OFF", "sport"),
        ("TP_TCP_DPORT_OFF", "dport"),
        ("TP_TCP_FAMILY_OFF", "family"),
        ("TP_TCP_PROTOCOL_OFF", "protocol"),
        ("TP_TCP_SADDR_OFF", "saddr"),
        ("TP_TCP_DADDR_OFF", "daddr"),
        ("TP_TCP_SADDR_V6_OFF", "saddr_v6"),
        ("TP_TCP_DADDR_V6_OFF", "daddr_v6"),
    ] {
        global(
            globals,
            global_name,
            field(&state, name, "sock:inet_sock_set_state")?,
        );
    }
    let retransmit = tracefs::field_offsets("tcp", "tcp_retransmit_skb")?;
    global(
        globals,
        "TP_RETRANS_SKADDR_OFF",
        field(&retransmit, "skaddr", "tcp:tcp_retransmit_skb")?,
    );
    for (global_name, member) in [
        ("TCP_SOCK_BYTES_RECEIVED_OFF", "bytes_received"),
        ("TCP_SOCK_BYTES_SENT_OFF", "bytes_sent"),
        ("TCP_SOCK_BYTES_RETRANS_OFF", "bytes_retrans"),
        ("TCP_SOCK_SRTT_US_OFF", "srtt_us"),
        ("TCP_SOCK_TOTAL_RETRANS_OFF", "total_retrans"),
    ] {
        global(globals, global_name, btf.member_offset("tcp_sock", member)?);
    }
    global(
        globals,
        "SOCK_FLAGS_OFF",
        btf.member_offset("sock", "__sk_common")?
            + btf.member_offset("sock_common", "skc_flags")?,
    );
    global(
        globals,
        "SOCK_SHUTDOWN_OFF",
        btf.member_offset("sock", "sk_shutdown")?,
    );
    Ok(())
}

pub(super) fn attach(ebpf: &mut Ebpf) -> Result<()> {
    for (name, category, event) in [
        ("tcp_retransmit", "tcp", "tcp_retransmit_skb"),
        ("tcp_retransmit_synack", "tcp", "tcp_retransmit_synack"),
        ("tcp_state", "sock", "inet_sock_set_state"),
    ] {
        let prog: &mut TracePoint = program(ebpf, name)?.try_into()?;
        prog.load()
            .with_context(|| format!("loading the {event} program failed"))?;
        prog.attach(category, event)
            .with_context(|| format!("attaching to {category}:{event} failed"))?;
    }
    Ok(())
}

impl Probes {
    /// The ring buffer of connect and close events; can be taken once.
    pub fn take_tcp_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .context("TCP event ring buffer already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn tcp_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        read_counters(self.ebpf(), maps::COUNTERS, &counter::NAMES)
    }
}

/// A decoded connect or close.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpRecord {
    /// When it happened (CLOCK_MONOTONIC ns).
    pub at_ns: u64,
    pub close: bool,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub accepted: bool,
    pub failed: bool,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub connect_ns: u64,
    pub lifetime_ns: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub srtt_us: u32,
    pub retransmits: u32,
    pub kernel_retransmits: u32,
    pub old_state: i32,
}

/// Decodes one ring-buffer item (`None` when it is not a whole event).
pub fn decode(bytes: &[u8]) -> Option<TcpRecord> {
    if bytes.len() < std::mem::size_of::<TcpEvent>() {
        return None;
    }
    // SAFETY: TcpEvent is plain integers; read_unaligned copes with any alignment.
    let e: TcpEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const TcpEvent) };
    let addr = |a: [u8; 16]| -> IpAddr {
        if e.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(a))
        }
    };
    let len = e.comm.iter().position(|b| *b == 0).unwrap_or(16);
    Some(TcpRecord {
        close: e.kind == EVENT_CLOSE,
        pid: e.tgid,
        tid: e.tid,
        comm: String::from_utf8_lossy(&e.comm[..len]).into_owned(),
        accepted: e.role == ROLE_ACCEPT,
        failed: e.failed != 0,
        local: (addr(e.saddr), e.sport),
        remote: (addr(e.daddr), e.dport),
        connect_ns: e.connect_ns,
        lifetime_ns: e.lifetime_ns,
        bytes_received: e.bytes_received,
        bytes_sent: e.bytes_sent,
        srtt_us: e.srtt_us,
        retransmits: e.retransmits,
        kernel_retransmits: e.kernel_retransmits,
        old_state: e.old_state,
        at_ns: e.at_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::tcp::{EVENT_CONNECT, ROLE_CONNECT};

    fn bytes(e: &TcpEvent) -> Vec<u8> {
        // SAFETY: plain data.
        unsafe {
            std::slice::from_raw_parts(
                e as *const TcpEvent as *const u8,
                std::mem::size_of::<TcpEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_and_ipv6_events() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut e = TcpEvent {
            kind: EVENT_CONNECT,
            tgid: 42,
            tid: 43,
            family: AF_INET,
            sport: 40000,
            dport: 443,
            role: ROLE_CONNECT,
            comm,
            connect_ns: 1234,
            ..TcpEvent::default()
        };
        e.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let r = decode(&bytes(&e)).unwrap();
        assert!(!r.close && !r.accepted && !r.failed);
        assert_eq!(r.comm, "curl");
        assert_eq!(r.remote, ("10.1.2.3".parse().unwrap(), 443));
        assert_eq!(r.local, ("127.0.0.1".parse().unwrap(), 40000));
        e.family = 10;
        e.daddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        e.kind = EVENT_CLOSE;
        let r = decode(&bytes(&e)).unwrap();
        assert!(r.close);
        assert_eq!(r.remote.0, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert!(decode(&bytes(&e)[..100]).is_none());
    }
}
