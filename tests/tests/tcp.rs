//! End-to-end tests of the TCP family on the running kernel, with real TCP traffic.
//!
//! Oracles: the client's own measurements (connect() time, connection life, bytes it wrote
//! and read, TCP_INFO), the delay the server is told to wait, and the kernel's RetransSegs
//! counter of a private network namespace in which nftables drops packets.

use std::process::Command;

use profiler_tests::*;
use serde_json::Value;

/// What `tcp-workload` said: its server port and one line per client connection.
struct TcpRun {
    pid: u32,
    server_port: u64,
    clients: Vec<Value>,
    capture: Value,
    stdout: String,
}

/// Records `tcp-workload ARGS` (optionally inside network namespace `netns`) by pid with
/// only the TCP family; `between` runs after the workload finished, before the recording
/// stops.
fn record_tcp_workload(name: &str, netns: Option<&str>, args: &[&str]) -> TcpRun {
    require_root();
    let dir = temp_dir(name);
    let workload = built_binary("tcp-workload");
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&workload);
            c
        }
        None => Command::new(&workload),
    };
    command.args(args);
    let mut process = ReadyProcess::spawn(&mut command);
    let recording = Recording::start(
        &dir.join("out"),
        &["--events", "tcp", "-p", &process.pid, "--duration", "120s"],
    );
    process.go();
    let mut server_port = 0;
    let mut clients = Vec::new();
    while let Some(line) = process.line() {
        if line == "done" {
            break;
        } else if let Some(port) = line.strip_prefix("server_port ") {
            server_port = port.parse().expect("port");
        } else {
            clients.push(serde_json::from_str::<Value>(&line).expect("client json"));
        }
    }
    let pid = process.pid.parse().expect("pid");
    process.finish();
    let (capture, stdout) = recording.interrupt();
    assert_ne!(server_port, 0, "the workload never said its port");
    TcpRun {
        pid,
        server_port,
        clients,
        capture,
        stdout,
    }
}

fn connections<'a>(run: &'a TcpRun, role: &str) -> Vec<&'a Value> {
    run.capture["tcp"]["connections"]
        .as_array()
        .expect("tcp connections")
        .iter()
        .filter(|c| c["pid"].as_u64() == Some(run.pid as u64) && c["role"] == role)
        .collect()
}

fn port_of(address: &Value) -> u64 {
    address
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}

fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

const CONNS: u64 = 4;
const ROUNDS: u64 = 2;
const DELAY_MS: u64 = 50;
const REQUEST: u64 = 100;
const RESPONSE: u64 = 3000;

/// Each connection the client made, as the profiler saw it from both ends, against the
/// client's own figures.
fn check_loopback(name: &str, addr: &str, remote: &str) {
    let run = record_tcp_workload(
        name,
        None,
        &[
            "--addr",
            addr,
            "--conns",
            &CONNS.to_string(),
            "--rounds",
            &ROUNDS.to_string(),
            "--delay-ms",
            &DELAY_MS.to_string(),
            "--request",
            &REQUEST.to_string(),
            "--response",
            &RESPONSE.to_string(),
        ],
    );
    assert_eq!(run.clients.len() as u64, CONNS);
    let connects = connections(&run, "connect");
    let accepts = connections(&run, "accept");
    for client in &run.clients {
        let port = u(client, "local_port");
        let ours = connects
            .iter()
            .find(|c| port_of(&c["local"]) == port)
            .unwrap_or_else(|| panic!("client connection from port {port} not in {connects:?}"));
        let served = accepts
            .iter()
            .find(|c| port_of(&c["remote"]) == port)
            .unwrap_or_else(|| panic!("server side of port {port} not in {accepts:?}"));
        println!("client {client}\n  ours {ours}\n  server side {served}");
        assert!(
            ours["remote"].as_str().unwrap().starts_with(remote),
            "remote {} is not {remote}",
            ours["remote"]
        );
        assert_eq!(port_of(&ours["remote"]), run.server_port);
        // Payload bytes: exact, both ends.
        assert_eq!(u(ours, "bytes_sent"), u(client, "sent"));
        assert_eq!(u(ours, "bytes_received"), u(client, "received"));
        assert_eq!(u(served, "bytes_received"), u(client, "sent"));
        assert_eq!(u(served, "bytes_sent"), u(client, "received"));
        // Our connect latency is measured inside the client's connect() call.
        let connect = u(ours, "connect_ns");
        assert!(
            connect > 0 && connect <= u(client, "connect_ns"),
            "connect {connect} ns vs client's connect() {} ns",
            u(client, "connect_ns")
        );
        assert_eq!(ours["failed"], false);
        // Life: connect() to close(), within 5 % of the client's clock; the server side
        // lives at least the server's delays.
        let life = u(ours, "lifetime_ns") as f64;
        let client_life = u(client, "lifetime_ns") as f64;
        assert!(
            (life - client_life).abs() <= 0.05 * client_life,
            "lifetime {life} ns vs client's {client_life} ns"
        );
        let served_life = u(served, "lifetime_ns");
        assert!(
            served_life >= ROUNDS * DELAY_MS * 1_000_000 && served_life as f64 <= client_life,
            "server-side lifetime {served_life} ns"
        );
        // Smoothed RTT: the kernel's value at close vs TCP_INFO just before close() (the
        // FIN exchange in between may move it by one eighth of a sample).
        let srtt = u(ours, "srtt_us") as f64;
        let rtt = u(client, "rtt_us") as f64;
        assert!(
            srtt > 0.0 && (srtt - rtt).abs() <= rtt / 2.0 + 1000.0,
            "srtt {srtt} us vs TCP_INFO {rtt} us"
        );
        assert_eq!(u(ours, "retransmits"), 0);
        assert_eq!(u(client, "retransmits"), 0);
    }
    // The aggregate for the server endpoint.
    let endpoints = run.capture["tcp"]["endpoints"].as_array().unwrap();
    let endpoint = endpoints
        .iter()
        .find(|e| {
            e["pid"].as_u64() == Some(run.pid as u64)
                && e["role"] == "connect"
                && e["port"].as_u64() == Some(run.server_port)
        })
        .expect("connect endpoint");
    assert_eq!(u(endpoint, "connects"), CONNS);
    assert_eq!(u(endpoint, "connect_failures"), 0);
    assert_eq!(u(endpoint, "closed"), CONNS);
    assert_eq!(u(endpoint, "bytes_received"), CONNS * ROUNDS * RESPONSE);
    let served = endpoints
        .iter()
        .find(|e| {
            e["pid"].as_u64() == Some(run.pid as u64)
                && e["role"] == "accept"
                && e["port"].as_u64() == Some(run.server_port)
        })
        .expect("accept endpoint");
    assert_eq!(u(served, "closed"), CONNS);
    assert_eq!(u(served, "bytes_received"), CONNS * ROUNDS * REQUEST);
    assert!(
        run.stdout.contains("TCP by process and remote endpoint"),
        "{}",
        run.stdout
    );
}

#[test]
fn ipv4_loopback_connections_match_the_clients_own_figures() {
    check_loopback("tcp-v4", "127.0.0.1", "127.0.0.1:");
}

#[test]
fn ipv6_loopback_connections_match_the_clients_own_figures() {
    check_loopback("tcp-v6", "::1", "[::1]:");
}

/// A private network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(rules: &str) -> Self {
        let name = format!("profiler-e2e-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns(name);
        run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
        let rules_file = std::env::temp_dir().join(format!("{}.nft", ns.0));
        std::fs::write(&rules_file, rules).expect("write rules");
        run(Command::new("ip")
            .args(["netns", "exec", &ns.0, "nft", "-f"])
            .arg(&rules_file));
        ns
    }

    /// The kernel's own count of retransmitted TCP segments in this namespace.
    fn retrans_segs(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "cat", "/proc/net/snmp"])
            .output()
            .expect("read snmp");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (
            lines.next().expect("Tcp header"),
            lines.next().expect("Tcp"),
        );
        let index = names
            .split_whitespace()
            .position(|n| n == "RetransSegs")
            .expect("RetransSegs");
        values
            .split_whitespace()
            .nth(index)
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Drops in the receive path (so the sender believes it sent, and must retransmit): the
/// first SYN, and one data segment in ten at random.
const DROP_RULES: &str = "table inet profiler_e2e {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp flags & (syn | ack) == syn numgen inc mod 100000 == 0 counter drop
    ip length > 60 numgen random mod 100 < 10 counter drop
  }
}
";

#[test]
fn retransmits_match_the_kernels_retranssegs_and_a_dropped_syn_delays_connect() {
    require_root();
    let ns = Netns::new(DROP_RULES);
    let before = ns.retrans_segs();
    let run = record_tcp_workload(
        "tcp-netns",
        Some(&ns.0),
        &[
            "--addr",
            "127.0.0.1",
            "--conns",
            "2",
            "--rounds",
            "30",
            "--delay-ms",
            "0",
            "--request",
            "200",
            "--response",
            "300",
        ],
    );
    let kernel = ns.retrans_segs() - before;
    let connects = connections(&run, "connect");
    let accepts = connections(&run, "accept");
    assert_eq!(connects.len(), 2, "{connects:?}");
    assert_eq!(accepts.len(), 2, "{accepts:?}");
    // The sockets' own counts, read by the profiler at close.
    let ours: u64 = connects
        .iter()
        .chain(&accepts)
        .map(|c| u(c, "retransmits"))
        .sum();
    // What the tcp_retransmit_skb tracepoint reported.
    let events: u64 = connects
        .iter()
        .chain(&accepts)
        .map(|c| u(c, "retransmit_events"))
        .sum();
    let counters = &run.capture["metadata"]["counters"];
    println!(
        "retransmits: ours {ours} (tracepoint events {events}), RetransSegs {kernel}; counters \
         {counters}"
    );
    assert!(
        kernel >= 3,
        "only {kernel} retransmits: the drop rules did not work"
    );
    // Exact: every socket of the namespace is the workload's and was followed from its
    // start to its close (a lost close event would show as a missing connection above).
    assert_eq!(
        ours, kernel,
        "our retransmits vs the namespace's RetransSegs"
    );
    // The tracepoint sees (almost) all of them: it is what counts them while connections
    // are open and host-wide; the kernel counts some it does not report (1 in 25, seen once
    // in about 15 runs), and skipped program runs are counted.
    let misses = u(counters, "program_misses");
    assert!(
        events <= kernel && kernel - events <= misses + kernel / 10,
        "tracepoint events {events} vs RetransSegs {kernel} ({misses} skipped runs)"
    );

    // The first SYN was dropped: connect() waited for the SYN retransmit (1 s initial RTO).
    let first = &run.clients[0];
    let client_connect = u(first, "connect_ns") as f64;
    assert!(
        client_connect > 0.9e9,
        "client connect took {client_connect} ns: the SYN was not dropped"
    );
    let ours_first = connects
        .iter()
        .find(|c| port_of(&c["local"]) == u(first, "local_port"))
        .expect("first connection");
    let connect = u(ours_first, "connect_ns") as f64;
    println!(
        "connect with a dropped SYN: ours {:.3} ms, client {:.3} ms",
        connect / 1e6,
        client_connect / 1e6
    );
    assert!(
        (connect - client_connect).abs() <= 0.05 * client_connect,
        "connect {connect} ns vs client's {client_connect} ns"
    );
    assert!(u(ours_first, "retransmits") >= 1);
    // The summary shows the retransmits.
    assert!(
        run.stdout.contains(&format!("{ours} retransmits")),
        "{}",
        run.stdout
    );
}
