//! Folds TCP connect and close events into per (process, role, endpoint) aggregates and a
//! bounded list of connections: what `record` writes and `top` shows.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::model::{TcpConnection, TcpEndpoint, TcpProfile};
use crate::probes::tcp::TcpRecord;
use crate::symbolize::procmaps::ProcessCache;

/// Buckets of the connect-latency histogram (log2 of ns, as the other families).
pub const CONNECT_BUCKETS: usize = 40;
/// Connections kept one by one; the rest are only counted in the aggregates.
pub const CONNECTION_LIMIT: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EndpointKey {
    pid: u32,
    accepted: bool,
    remote: IpAddr,
    port: u16,
}

#[derive(Debug, Default)]
pub struct TcpAggregator {
    endpoints: HashMap<EndpointKey, TcpEndpoint>,
    connections: Vec<TcpConnection>,
    not_listed: u64,
}

fn bucket(ns: u64) -> usize {
    let b = if ns == 0 {
        0
    } else {
        64 - ns.leading_zeros() as usize
    };
    b.min(CONNECT_BUCKETS - 1)
}

impl TcpAggregator {
    pub fn add(&mut self, record: &TcpRecord) {
        let port = if record.accepted {
            record.local.1
        } else {
            record.remote.1
        };
        let key = EndpointKey {
            pid: record.pid,
            accepted: record.accepted,
            remote: record.remote.0,
            port,
        };
        let role = if record.accepted { "accept" } else { "connect" };
        let endpoint = self.endpoints.entry(key).or_insert_with(|| TcpEndpoint {
            pid: record.pid,
            comm: record.comm.clone(),
            role: role.to_string(),
            remote: record.remote.0.to_string(),
            port,
            connect_buckets: vec![0; CONNECT_BUCKETS],
            ..TcpEndpoint::default()
        });
        if endpoint.comm.is_empty() {
            endpoint.comm = record.comm.clone();
        }
        if !record.close {
            // A connect that ended: established or failed.
            if record.failed {
                endpoint.connect_failures += 1;
            } else {
                endpoint.connects += 1;
            }
            endpoint.connect_total_ns += record.connect_ns;
            endpoint.connect_max_ns = endpoint.connect_max_ns.max(record.connect_ns);
            endpoint.connect_buckets[bucket(record.connect_ns)] += 1;
            if !record.failed {
                return; // listed when it closes
            }
        } else {
            endpoint.closed += 1;
            endpoint.lifetime_total_ns += record.lifetime_ns;
            endpoint.lifetime_max_ns = endpoint.lifetime_max_ns.max(record.lifetime_ns);
            endpoint.bytes_received += record.bytes_received;
            endpoint.bytes_sent += record.bytes_sent;
            endpoint.retransmits += u64::from(record.kernel_retransmits);
            endpoint.srtt_total_us += u64::from(record.srtt_us);
            endpoint.srtt_max_us = endpoint.srtt_max_us.max(u64::from(record.srtt_us));
        }
        if self.connections.len() >= CONNECTION_LIMIT {
            self.not_listed += 1;
            return;
        }
        let addr = |(ip, port): (IpAddr, u16)| SocketAddr::new(ip, port).to_string();
        self.connections.push(TcpConnection {
            pid: record.pid,
            tid: record.tid,
            comm: record.comm.clone(),
            role: role.to_string(),
            local: addr(record.local),
            remote: addr(record.remote),
            connect_ns: (!record.accepted).then_some(record.connect_ns),
            failed: record.failed,
            lifetime_ns: if record.close { record.lifetime_ns } else { 0 },
            bytes_received: record.bytes_received,
            bytes_sent: record.bytes_sent,
            retransmits: u64::from(record.kernel_retransmits),
            retransmit_events: u64::from(record.retransmits),
            srtt_us: u64::from(record.srtt_us),
        });
    }

    /// Endpoints sorted by time spent connecting plus connection time, then retransmits.
    pub fn profile(&self) -> TcpProfile {
        let mut endpoints: Vec<TcpEndpoint> = self.endpoints.values().cloned().collect();
        endpoints.sort_by(|a, b| {
            b.retransmits
                .cmp(&a.retransmits)
                .then(b.connect_total_ns.cmp(&a.connect_total_ns))
                .then(b.lifetime_total_ns.cmp(&a.lifetime_total_ns))
                .then(a.pid.cmp(&b.pid))
                .then(a.remote.cmp(&b.remote))
                .then(a.port.cmp(&b.port))
        });
        TcpProfile {
            endpoints,
            connections: self.connections.clone(),
            connections_not_listed: self.not_listed,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// Folds the TCP events in the ring buffer that fall in `window` (kernel time).
pub(super) fn drain_tcp_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    tcp: &mut TcpAggregator,
    processes: &mut ProcessCache,
    (from, until): (u64, u64),
) {
    while let Some(item) = ring.next() {
        if let Some(record) = crate::probes::tcp::decode(&item)
            && (from..until).contains(&record.at_ns)
        {
            if record.pid != 0 && processes.get(record.pid).is_none() {
                processes.observe(record.pid, &record.comm);
            }
            tcp.add(&record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(close: bool, accepted: bool, remote_port: u16) -> TcpRecord {
        TcpRecord {
            at_ns: 1,
            close,
            pid: 7,
            tid: 8,
            comm: "client".into(),
            accepted,
            failed: false,
            local: ("127.0.0.1".parse().unwrap(), 5000),
            remote: ("127.0.0.1".parse().unwrap(), remote_port),
            connect_ns: 3000,
            lifetime_ns: 50_000_000,
            bytes_received: 10,
            bytes_sent: 20,
            srtt_us: 40,
            retransmits: 1,
            kernel_retransmits: 1,
            old_state: 8,
        }
    }

    #[test]
    fn connects_and_closes_fold_per_endpoint() {
        let mut agg = TcpAggregator::default();
        agg.add(&record(false, false, 80));
        agg.add(&record(true, false, 80));
        agg.add(&record(false, false, 80));
        agg.add(&record(true, false, 80));
        // Accepted clients from different ephemeral ports fold into the local port.
        agg.add(&record(true, true, 40001));
        agg.add(&record(true, true, 40002));
        let mut failed = record(false, false, 81);
        failed.failed = true;
        agg.add(&failed);
        let profile = agg.profile();
        assert_eq!(profile.endpoints.len(), 3);
        let conn = profile
            .endpoints
            .iter()
            .find(|e| e.role == "connect" && e.port == 80)
            .unwrap();
        assert_eq!((conn.connects, conn.closed), (2, 2));
        assert_eq!(conn.connect_total_ns, 6000);
        assert_eq!(conn.connect_buckets[bucket(3000)], 2);
        assert_eq!(
            (conn.bytes_received, conn.bytes_sent, conn.retransmits),
            (20, 40, 2)
        );
        assert_eq!(conn.label(), "127.0.0.1:80");
        let accept = profile
            .endpoints
            .iter()
            .find(|e| e.role == "accept")
            .unwrap();
        assert_eq!((accept.closed, accept.port), (2, 5000));
        assert_eq!(accept.label(), "127.0.0.1 -> :5000");
        let refused = profile.endpoints.iter().find(|e| e.port == 81).unwrap();
        assert_eq!((refused.connects, refused.connect_failures), (0, 1));
        // Listed: 4 closes + 1 failed connect.
        assert_eq!(profile.connections.len(), 5);
        assert!(profile.connections.iter().any(|c| c.failed));
    }

    #[test]
    fn the_connection_list_is_bounded_and_says_so() {
        let mut agg = TcpAggregator::default();
        for _ in 0..CONNECTION_LIMIT + 5 {
            agg.add(&record(true, false, 80));
        }
        let profile = agg.profile();
        assert_eq!(profile.connections.len(), CONNECTION_LIMIT);
        assert_eq!(profile.connections_not_listed, 5);
        assert_eq!(profile.endpoints[0].closed, (CONNECTION_LIMIT + 5) as u64);
    }
}
