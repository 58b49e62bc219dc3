//! End-to-end tests of the wire decoder with third-party clients that use vectored and
//! message I/O (writev, sendmsg, readv, recvmsg) and pipelining, against real servers.
//!
//! Oracles: the clients' own counts and clocks, and the servers' own statistics
//! (pg_stat_statements, INFO commandstats).

use profiler_tests::pg::PgCluster;
use profiler_tests::*;
use serde_json::Value;

/// Where `cargo xtask setup` installs the npm packages the tests run (xtask/src/setup.rs).
const NODE_PATH: &str = "/usr/local/lib/profiler-tests/node_modules";

/// pg_stat_statements' calls of the statement whose text, without whitespace, is `text`.
fn pgss_calls(cluster: &PgCluster, text: &str) -> u64 {
    let squeezed = |t: &str| t.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    cluster
        .psql("SELECT calls, query FROM pg_stat_statements")
        .lines()
        .filter_map(|line| line.split_once('|'))
        .filter(|(_, query)| squeezed(query) == squeezed(text))
        .map(|(calls, _)| calls.trim().parse::<u64>().unwrap())
        .sum()
}

/// pg_stat_statements' execution time, in ns, of the statement whose text, without
/// whitespace, is `text`.
fn pgss_exec_ns(cluster: &PgCluster, text: &str) -> f64 {
    let squeezed = |t: &str| t.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    cluster
        .psql("SELECT total_exec_time, query FROM pg_stat_statements")
        .lines()
        .filter_map(|line| line.split_once('|'))
        .filter(|(_, query)| squeezed(query) == squeezed(text))
        .map(|(ms, _)| ms.trim().parse::<f64>().unwrap() * 1e6)
        .sum()
}

/// node-postgres (npm `pg`, pure JavaScript on libuv) sends an extended-protocol query as one
/// writev (Parse, Bind, Describe, Execute, Sync) and a simple one as one write, and reads
/// with read. Both are seen on the wire: counts exact against its own and
/// pg_stat_statements', and the time from the request's write to the first reply byte
/// between the server's own execution time (pg_stat_statements) and the client's clock
/// (which also holds node's JavaScript work around each query: 0.35 ms a query, 14 % of
/// the client's time, in a CI run of the suite).
#[test]
fn node_postgres_queries_written_with_writev_are_seen_on_the_wire() {
    require_root();
    let cluster = PgCluster::start("node-wire");
    cluster.psql("CREATE EXTENSION pg_stat_statements");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/pg_node_client.js");
    let mut client = ReadyProcess::spawn(
        std::process::Command::new("node")
            .env("NODE_PATH", NODE_PATH)
            .arg(&script)
            .arg(&cluster.dir)
            .arg(cluster.port.to_string())
            .args(["200", "300"]),
    );
    let dir = temp_dir("db-node-wire");
    let recording = Recording::start(
        &dir.join("out"),
        &[
            "--events",
            "db",
            "-p",
            &client.pid,
            "--measure-overhead",
            "--duration",
            "120s",
        ],
    );
    cluster.psql("SELECT pg_stat_statements_reset()");
    client.go();
    let report: Value = serde_json::from_str(&client.line().expect("report")).unwrap();
    client.finish();
    let (capture, _) = recording.interrupt();
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let query = |fingerprint: &str| {
        queries
            .iter()
            .find(|q| q["source"] == "wire-postgres" && q["fingerprint"] == fingerprint)
            .unwrap_or_else(|| panic!("no wire query {fingerprint:?} in {queries:?}"))
    };
    let simple = query("SELECT ? AS node_simple, pg_sleep(?)");
    let extended = query("SELECT ?::int AS node_extended, pg_sleep(?)");
    assert_eq!(extended["endpoint"], "unix", "{extended}");
    let counters = &capture["metadata"]["counters"];
    println!(
        "node pg: simple ours {} client {} pgss {}; extended (writev) ours {} client {} pgss \
         {}; eBPF {} ns in {} runs",
        simple["calls"],
        report["simple"],
        pgss_calls(&cluster, "SELECT $1 AS node_simple, pg_sleep($2)"),
        extended["calls"],
        report["extended"],
        pgss_calls(&cluster, "SELECT $1::int AS node_extended, pg_sleep($2)"),
        counters["bpf_run_ns"],
        counters["bpf_runs"],
    );
    assert_eq!(simple["calls"].as_u64(), report["simple"].as_u64());
    assert_eq!(extended["calls"].as_u64(), report["extended"].as_u64());
    assert_eq!(
        Some(pgss_calls(
            &cluster,
            "SELECT $1 AS node_simple, pg_sleep($2)"
        )),
        simple["calls"].as_u64()
    );
    assert_eq!(
        Some(pgss_calls(
            &cluster,
            "SELECT $1::int AS node_extended, pg_sleep($2)"
        )),
        extended["calls"].as_u64()
    );
    for (ours, field, text) in [
        (
            simple,
            "simple_ns",
            "SELECT $1 AS node_simple, pg_sleep($2)",
        ),
        (
            extended,
            "extended_ns",
            "SELECT $1::int AS node_extended, pg_sleep($2)",
        ),
    ] {
        let ours = ours["total_ns"].as_u64().unwrap() as f64;
        let theirs = report[field].as_u64().unwrap() as f64;
        let server = pgss_exec_ns(&cluster, text);
        println!(
            "{field}: ours {:.3} ms, client {:.3} ms, server execution {:.3} ms",
            ours / 1e6,
            theirs / 1e6,
            server / 1e6
        );
        assert!(
            server > 0.0 && server <= ours && ours <= theirs,
            "ours {ours} ns vs the client's {theirs} ns and the server's {server} ns"
        );
    }
    assert_eq!(counters["db_wire_undecoded"].as_u64(), Some(0));
}

/// A client no source decodes is stated, not silent: node-postgres over TCP recorded on the
/// whole host (where the wire is off and no library probe fits) with parameterized queries
/// only (the server's probes fire for the simple protocol only). Its row in `db.coverage` has
/// no source, names its connection to the server's port and the bytes it carried — exactly
/// what node's own socket counted written and read — and the summary has a line for it;
/// pg_stat_statements shows the queries it ran.
#[test]
fn a_client_no_source_decodes_is_stated_in_the_coverage() {
    require_root();
    let cluster = PgCluster::start("node-coverage");
    cluster.psql("CREATE EXTENSION pg_stat_statements");
    let dir = temp_dir("db-node-coverage");
    let release = dir.join("release");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/pg_node_client.js");
    let mut client = ReadyProcess::spawn(
        std::process::Command::new("node")
            .env("NODE_PATH", NODE_PATH)
            .arg(&script)
            .arg("127.0.0.1")
            .arg(cluster.port.to_string())
            .args(["0", "50"])
            .arg(&release),
    );
    let recording = Recording::start(&dir.join("out"), &["--events", "db", "--duration", "120s"]);
    cluster.psql("SELECT pg_stat_statements_reset()");
    client.go();
    let report: Value = serde_json::from_str(&client.line().expect("report")).unwrap();
    // The capture ends while the client still holds its connection.
    let (capture, summary) = recording.interrupt();
    std::fs::write(&release, "").unwrap();
    let pid: u64 = client.pid.parse().unwrap();
    client.finish();
    let calls = pgss_calls(&cluster, "SELECT $1::int AS node_extended, pg_sleep($2)");
    assert_eq!(Some(calls), report["extended"].as_u64());
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    assert!(
        !queries.iter().any(|q| q["pid"].as_u64() == Some(pid)),
        "a source timed the client after all: {queries:?}"
    );
    let coverage = capture["db"]["coverage"].as_array().expect("db coverage");
    let row = coverage
        .iter()
        .find(|c| c["pid"].as_u64() == Some(pid))
        .unwrap_or_else(|| panic!("no coverage row for the client in {coverage:?}"));
    println!("client ran {calls} queries (pg_stat_statements); coverage: {row}");
    assert_eq!(row["sources"], serde_json::json!([]), "{row}");
    assert_eq!(
        row["untimed_connections"],
        serde_json::json!([format!("127.0.0.1:{} postgres", cluster.port)]),
        "{row}"
    );
    // Opened during the capture: everything it carried is the capture's.
    assert_eq!(
        row["untimed_bytes_sent"], report["bytes_written"],
        "{row} {report}"
    );
    assert_eq!(
        row["untimed_bytes_received"], report["bytes_read"],
        "{row} {report}"
    );
    assert!(report["bytes_written"].as_u64() > Some(50 * 40), "{report}");
    assert!(
        summary.contains(&format!(
            "[{pid}]: 0 queries timed, yet connected to 127.0.0.1:{} postgres (",
            cluster.port
        )),
        "{summary}"
    );
}

/// A redis-server on a free loopback port, stopped on drop.
struct Redis {
    port: String,
    server: std::process::Child,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port()
            .to_string();
        let server = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1 ::1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by cargo xtask setup)");
        let redis = Self { port, server };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while redis.cli(&["PING"]).trim() != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        redis
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `cmdstat_COMMAND:calls=N` from INFO commandstats.
    fn calls(&self, command: &str) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {command} in {stats}"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// redis-benchmark's "avg" latency (ms) per test (`====== SET ======` … `avg min p50 …`).
fn redis_benchmark_avg_ms(output: &str, test: &str) -> f64 {
    let section = output
        .split(&format!("====== {test} ======"))
        .nth(1)
        .unwrap_or_else(|| panic!("no {test} in {output}"));
    let mut lines = section
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("avg"));
    lines.next();
    lines
        .next()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no avg for {test} in {section}"))
}

/// redis-benchmark -P 16: sixteen commands per write, sixteen replies read back. Every
/// command is counted (INFO commandstats, exact) and timed from its write to the first
/// byte of the replies: within 10 % of redis-benchmark's own mean, which times each command
/// of a batch from just before the write to the moment the replies are readable (before
/// its read).
#[test]
fn redis_pipelines_are_counted_command_by_command() {
    require_root();
    let redis = Redis::start();
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let dir = temp_dir("db-redis-pipeline");
    let recording = Recording::start(
        &dir.join("out"),
        &["--events", "db", "--db-wire", "--duration", "120s"],
    );
    let bench = std::process::Command::new("redis-benchmark")
        .args([
            "-p",
            &redis.port,
            "-n",
            "16000",
            "-c",
            "2",
            "-P",
            "16",
            "-t",
            "set,get",
        ])
        .output()
        .expect("redis-benchmark");
    assert!(bench.status.success());
    let report = String::from_utf8_lossy(&bench.stdout).into_owned();
    let (capture, _) = recording.interrupt();
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let ours = |fingerprint: &str| -> (u64, u64) {
        queries
            .iter()
            .filter(|q| q["source"] == "wire-redis" && q["comm"] == "redis-benchmark")
            .filter(|q| q["fingerprint"] == fingerprint)
            .map(|q| {
                (
                    q["calls"].as_u64().unwrap(),
                    q["total_ns"].as_u64().unwrap(),
                )
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    for (test, command, fingerprint) in [("SET", "set", "SET ? ?"), ("GET", "get", "GET ?")] {
        let (calls, total_ns) = ours(fingerprint);
        let mean_ms = total_ns as f64 / calls as f64 / 1e6;
        let theirs_ms = redis_benchmark_avg_ms(&report, test);
        println!(
            "{test}: ours {calls} server {}; mean ours {mean_ms:.4} ms, redis-benchmark \
             {theirs_ms:.3} ms",
            redis.calls(command)
        );
        assert_eq!(calls, 16000, "{test}");
        assert_eq!(redis.calls(command), 16000, "{test}");
        // Its clock stops when the reply is readable, before its read(); ours when the
        // read returns: either may be the longer, by a syscall.
        assert!(
            (mean_ms - theirs_ms).abs() <= 0.10 * theirs_ms,
            "{test}: ours {mean_ms} ms vs redis-benchmark's {theirs_ms} ms"
        );
    }
    let counters = &capture["metadata"]["counters"];
    assert_eq!(counters["db_wire_pipeline_cut"].as_u64(), Some(0));
    assert_eq!(counters["db_wire_undecoded"].as_u64(), Some(0));
}

/// A client that exits right after its reply (redis-cli, one command each) is still named by
/// its server's address: the kernel reads the socket's peer with the event, while the
/// connection is open; looking it up in /proc when the event is read finds nothing left.
/// Over IPv4 and IPv6; counts against INFO commandstats.
#[test]
fn short_lived_clients_are_named_by_their_servers_address() {
    require_root();
    let redis = Redis::start();
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let dir = temp_dir("db-redis-short");
    let recording = Recording::start(
        &dir.join("out"),
        &["--events", "db", "--db-wire", "--duration", "120s"],
    );
    for host in ["127.0.0.1", "::1"].repeat(5) {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", host, "-p", &redis.port, "INCR", "short"])
            .output()
            .expect("redis-cli");
        assert!(out.status.success());
    }
    let (capture, _) = recording.interrupt();
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let mut endpoints: std::collections::BTreeMap<String, u64> = Default::default();
    for q in queries
        .iter()
        .filter(|q| q["source"] == "wire-redis" && q["comm"] == "redis-cli")
        .filter(|q| q["fingerprint"] == "INCR ?")
    {
        *endpoints
            .entry(q["endpoint"].as_str().unwrap().to_string())
            .or_default() += q["calls"].as_u64().unwrap();
    }
    println!(
        "INCR by endpoint: {endpoints:?}; server {}",
        redis.calls("incr")
    );
    assert_eq!(redis.calls("incr"), 10);
    assert_eq!(
        endpoints,
        [
            (format!("127.0.0.1:{}", redis.port), 5),
            (format!("[::1]:{}", redis.port), 5)
        ]
        .into_iter()
        .collect()
    );
}
