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

/// node-postgres (npm `pg`, pure JavaScript on libuv) sends an extended-protocol query as one
/// writev (Parse, Bind, Describe, Execute, Sync) and a simple one as one write, and reads
/// with read. Both are seen on the wire: counts exact against its own and
/// pg_stat_statements', time to the first reply byte within 10 % of its own clock.
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
    for (ours, field) in [(simple, "simple_ns"), (extended, "extended_ns")] {
        let ours = ours["total_ns"].as_u64().unwrap() as f64;
        let theirs = report[field].as_u64().unwrap() as f64;
        println!(
            "{field}: ours {:.3} ms, client {:.3} ms",
            ours / 1e6,
            theirs / 1e6
        );
        assert!(
            ours <= theirs && ours >= 0.9 * theirs,
            "ours {ours} ns vs the client's {theirs} ns"
        );
    }
    assert_eq!(counters["db_wire_undecoded"].as_u64(), Some(0));
}
