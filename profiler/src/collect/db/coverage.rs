//! Which source timed each process's queries, and which processes talk to a database that
//! no source decoded: at the end of a capture, the processes' established TCP connections
//! to database ports (the servers' listening ports found on this host, and the usual 5432,
//! 3306, 6379) are read from /proc; one that holds such connections and has no timed query
//! is a finding, with the bytes those connections carried during the capture (sock_diag, at
//! its start and end). Connections over unix sockets are not matched (/proc does not name a
//! unix socket's peer), nor are ones closed before the end.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::socket_bytes::SocketBytes;
use crate::model::{DbCoverage, DbQuery};

/// Server programs by process name, and the database they serve.
const SERVERS: [(&str, &str); 6] = [
    ("postgres", "postgres"),
    ("postmaster", "postgres"),
    ("mariadbd", "mysql"),
    ("mysqld", "mysql"),
    ("redis-server", "redis"),
    ("valkey-server", "redis"),
];
/// The usual ports, for servers on other hosts.
const USUAL_PORTS: [(u16, &str); 3] = [(5432, "postgres"), (3306, "mysql"), (6379, "redis")];

/// Sources that time queries on the server's side (their rows' process is the server).
fn server_side(source: &str) -> bool {
    source == "postgres-usdt"
}

/// A line of /proc/net/tcp{,6}: local and remote address, state, inode.
struct TcpSocket {
    local: String,
    remote: String,
    state: u8,
    inode: u64,
}

fn tcp_sockets() -> Vec<TcpSocket> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() <= 9 {
                continue;
            }
            let (Some(local), Some(remote)) = (
                super::events::proc_net_address(f[1], v6),
                super::events::proc_net_address(f[2], v6),
            ) else {
                continue;
            };
            out.push(TcpSocket {
                local,
                remote,
                state: u8::from_str_radix(f[3], 16).unwrap_or(0),
                inode: f[9].parse().unwrap_or(0),
            });
        }
    }
    out
}

fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':')?.1.parse().ok()
}

/// Every process's name and socket inodes (all of /proc: the servers are found too).
fn process_sockets() -> Vec<(u32, String, Vec<u64>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let inodes: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| {
                let link = std::fs::read_link(fd.path()).ok()?;
                link.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect();
        if !inodes.is_empty() {
            out.push((pid, comm.trim().to_string(), inodes));
        }
    }
    out
}

/// Per process: the sources that timed its queries, and its database connections if none
/// was timed, with what they carried since `start` (the sockets' bytes when the capture
/// started). `pids`: the -p filter (empty: every process); `exclude`: our own.
pub fn coverage(
    queries: &[DbQuery],
    pids: &[u32],
    exclude: u32,
    start: &SocketBytes,
) -> Vec<DbCoverage> {
    let mut by_pid: BTreeMap<u32, DbCoverage> = BTreeMap::new();
    for q in queries {
        let entry = by_pid.entry(q.pid).or_insert_with(|| DbCoverage {
            pid: q.pid,
            comm: q.comm.clone(),
            ..DbCoverage::default()
        });
        entry.server |= server_side(&q.source);
        match entry.sources.iter_mut().find(|(s, _)| *s == q.source) {
            Some((_, calls)) => *calls += q.calls,
            None => entry.sources.push((q.source.clone(), q.calls)),
        }
    }
    let sockets = tcp_sockets();
    let processes = process_sockets();
    // Database ports: the listening ports of the servers running here, and the usual ones.
    let mut ports: HashMap<u16, &str> = USUAL_PORTS.into_iter().collect();
    let mut servers = HashSet::new();
    for (pid, comm, inodes) in &processes {
        let Some((_, kind)) = SERVERS.iter().find(|(name, _)| name == comm) else {
            continue;
        };
        servers.insert(*pid);
        for socket in sockets.iter().filter(|s| s.state == 0x0A) {
            if inodes.contains(&socket.inode)
                && let Some(port) = port_of(&socket.local)
            {
                ports.insert(port, kind);
            }
        }
    }
    let mut carried: Option<SocketBytes> = None;
    let established: HashMap<u64, &TcpSocket> = sockets
        .iter()
        .filter(|s| s.state == 0x01)
        .map(|s| (s.inode, s))
        .collect();
    for (pid, comm, inodes) in processes {
        if pid == exclude || servers.contains(&pid) || (!pids.is_empty() && !pids.contains(&pid)) {
            continue;
        }
        if by_pid.get(&pid).is_some_and(|c| !c.sources.is_empty()) {
            continue; // timed by some source
        }
        let connections: Vec<(u64, String)> = inodes
            .iter()
            .filter_map(|inode| established.get(inode))
            .filter_map(|s| {
                let kind = ports.get(&port_of(&s.remote)?)?;
                Some((s.inode, format!("{} {kind}", s.remote)))
            })
            .collect();
        if connections.is_empty() {
            continue;
        }
        // What they carried: one sock_diag dump, the first time one is needed.
        let carried = carried.get_or_insert_with(|| {
            super::socket_bytes::since(start, &super::socket_bytes::established())
        });
        let (mut sent, mut received) = (0, 0);
        for (inode, _) in &connections {
            if let Some((s, r)) = carried.get(inode) {
                sent += s;
                received += r;
            }
        }
        let mut untimed: Vec<String> = connections.into_iter().map(|(_, c)| c).collect();
        untimed.sort();
        untimed.dedup();
        by_pid.insert(
            pid,
            DbCoverage {
                pid,
                comm,
                untimed_connections: untimed,
                untimed_bytes_sent: sent,
                untimed_bytes_received: received,
                ..DbCoverage::default()
            },
        );
    }
    by_pid.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_listed_per_process() {
        let query = |source: &str, pid: u32, calls: u64| DbQuery {
            source: source.into(),
            pid,
            comm: "app".into(),
            calls,
            ..DbQuery::default()
        };
        let coverage = coverage(
            &[
                query("libpq", 10, 5),
                query("libpq", 10, 7),
                query("wire-redis", 10, 1),
                query("postgres-usdt", 20, 3),
            ],
            &[10, 20],
            0,
            &SocketBytes::new(),
        );
        let ten = coverage.iter().find(|c| c.pid == 10).unwrap();
        assert_eq!(
            ten.sources,
            vec![("libpq".to_string(), 12), ("wire-redis".to_string(), 1)]
        );
        assert!(!ten.server);
        assert!(coverage.iter().find(|c| c.pid == 20).unwrap().server);
    }
}
