//! End-to-end tests of the database family against a real PostgreSQL server (a cluster
//! created by the test) driven by pgbench.
//!
//! Oracles: pg_stat_statements' call counts (exact) and mean execution time (the executor
//! runs inside the query__start/query__done window, so ours can only be longer), and
//! pgbench -r's per-statement latency seen by the client (the server's window is inside the
//! client's round trip, so ours can only be shorter).

use profiler_tests::pg::{PgCluster, pgbench_statement_latencies};
use profiler_tests::*;
use serde_json::Value;

/// Statement text with `$n` parameters and pgbench `:var`s as `?` and no whitespace: how
/// the oracles' texts and our fingerprints are matched.
fn normalized(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if (c == '$' || c == ':') && chars.peek().is_some_and(|d| d.is_alphanumeric()) {
            while chars
                .peek()
                .is_some_and(|d| d.is_alphanumeric() || *d == '_')
            {
                chars.next();
            }
            out.push('?');
        } else if !c.is_whitespace() && c != ';' {
            out.push(c);
        }
    }
    out
}

struct PgStat {
    calls: u64,
    mean_ms: f64,
}

fn pg_stat_statements(cluster: &PgCluster) -> Vec<(String, PgStat)> {
    cluster
        .psql(
            "SELECT calls, mean_exec_time, regexp_replace(query, '\\s+', ' ', 'g') \
             FROM pg_stat_statements",
        )
        .lines()
        .filter_map(|line| {
            let mut f = line.splitn(3, '|');
            let calls = f.next()?.parse().ok()?;
            let mean_ms = f.next()?.parse().ok()?;
            Some((normalized(f.next()?), PgStat { calls, mean_ms }))
        })
        .collect()
}

/// Records the cluster's queries (by its postmaster pid) while pgbench runs `args`; returns
/// the capture and pgbench's output.
fn record_pgbench(
    cluster: &PgCluster,
    name: &str,
    args: &[&str],
) -> (Value, String, String, std::path::PathBuf) {
    let dir = temp_dir(name);
    let pid = cluster.postmaster_pid.to_string();
    let recording = Recording::start(
        &dir.join("out"),
        &["--events", "db", "-p", &pid, "--duration", "120s"],
    );
    cluster.psql("SELECT pg_stat_statements_reset()");
    let bench = cluster.pgbench(args);
    let (capture, stdout) = recording.interrupt();
    (capture, bench, stdout, dir.join("out"))
}

fn check_statements(capture: &Value, bench: &str, cluster: &PgCluster, expected: usize) {
    let stats = pg_stat_statements(cluster);
    let latencies = pgbench_statement_latencies(bench);
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let mut checked = 0;
    for (statement, client_ms) in &latencies {
        if statement.starts_with('\\') {
            continue; // pgbench meta-commands (\set) never reach the server
        }
        let key = normalized(statement);
        let ours = queries
            .iter()
            .find(|q| normalized(q["fingerprint"].as_str().unwrap()) == key)
            .unwrap_or_else(|| panic!("{statement}: not among our queries {queries:?}"));
        let (_, pgss) = stats
            .iter()
            .find(|(text, _)| *text == key)
            .unwrap_or_else(|| panic!("{statement}: not in pg_stat_statements"));
        let calls = ours["calls"].as_u64().unwrap();
        let mean_ms = ours["total_ns"].as_u64().unwrap() as f64 / calls as f64 / 1e6;
        println!(
            "{statement}: calls ours {calls} pg_stat_statements {}; mean ours {mean_ms:.4} ms, \
             executor (pg_stat_statements) {:.4} ms, client (pgbench -r) {client_ms:.4} ms",
            pgss.calls, pgss.mean_ms
        );
        assert!(
            calls.abs_diff(pgss.calls) as f64 <= 0.01 * pgss.calls as f64,
            "{statement}: {calls} calls vs pg_stat_statements' {}",
            pgss.calls
        );
        assert!(
            mean_ms >= pgss.mean_ms && mean_ms <= *client_ms,
            "{statement}: mean {mean_ms} ms outside [executor {}, client {client_ms}]",
            pgss.mean_ms
        );
        assert_eq!(ours["errors"].as_u64(), Some(0));
        assert_eq!(ours["source"], "postgres-usdt");
        assert_eq!(
            ours["server_pid"].as_u64(),
            Some(cluster.postmaster_pid as u64)
        );
        assert!(
            ours["example"].is_null(),
            "literals are redacted by default"
        );
        checked += 1;
    }
    assert_eq!(checked, expected, "statements checked: {latencies:?}");
}

#[test]
fn pgbench_select_only_through_server_usdt_matches_pg_stat_statements_and_pgbench() {
    require_root();
    let cluster = PgCluster::start("select-only");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    cluster.psql("CREATE EXTENSION pg_stat_statements");
    let (capture, bench, stdout, out) = record_pgbench(
        &cluster,
        "db-select",
        &["-S", "-n", "-r", "-c", "2", "-T", "3"],
    );
    check_statements(&capture, &bench, &cluster, 1);
    assert!(stdout.contains("queries by total time"), "{stdout}");
    let folded = std::fs::read_to_string(out.join("db.folded")).expect("db.folded");
    assert!(
        folded.lines().any(|l| l.starts_with(
            "postgres;[db postgres-usdt] SELECT abalance FROM pgbench_accounts WHERE aid = ? "
        )),
        "{folded}"
    );
}

#[test]
fn pgbench_default_script_statement_counts_match_pg_stat_statements() {
    require_root();
    let cluster = PgCluster::start("tpcb");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    cluster.psql("CREATE EXTENSION pg_stat_statements");
    let (capture, bench, _, _) =
        record_pgbench(&cluster, "db-tpcb", &["-n", "-r", "-c", "2", "-T", "3"]);
    // BEGIN, 3 UPDATEs, SELECT, INSERT, END.
    check_statements(&capture, &bench, &cluster, 7);
}
