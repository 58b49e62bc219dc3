//! End-to-end tests of the database family against a real PostgreSQL server (a cluster
//! created by the test) driven by pgbench.
//!
//! Oracles: pg_stat_statements' call counts (exact) and mean execution time (the executor
//! runs inside the query__start/query__done window, so ours can only be longer), and
//! pgbench -r's per-statement latency seen by the client (the server's window is inside the
//! client's round trip, so ours can only be shorter).

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    record_pgbench_with(cluster, name, args, &[])
}

/// `record_pgbench` with more record options.
fn record_pgbench_with(
    cluster: &PgCluster,
    name: &str,
    args: &[&str],
    record: &[&str],
) -> (Value, String, String, std::path::PathBuf) {
    let dir = temp_dir(name);
    let pid = cluster.postmaster_pid.to_string();
    let mut record_args = vec!["--events", "db", "-p", &pid, "--duration", "120s"];
    record_args.extend(record);
    let recording = Recording::start(&dir.join("out"), &record_args);
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
        assert_eq!(ours["pid"].as_u64(), Some(cluster.postmaster_pid as u64));
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
    // What the server side does not see is said.
    assert!(
        stdout.contains("(server side: simple-protocol queries only;"),
        "{stdout}"
    );
    let folded = std::fs::read_to_string(out.join("db.folded")).expect("db.folded");
    assert!(
        folded.lines().any(|l| l.starts_with(
            "postgres;[db postgres-usdt] SELECT abalance FROM pgbench_accounts WHERE aid = ? "
        )),
        "{folded}"
    );
}

/// pgbench -M extended sends each query as one Parse/Bind/Describe/Execute/Sync request, and
/// -M prepared a Bind/Describe/Execute/Sync after preparing each statement once per
/// connection (Parse/Sync): none of which query__start/query__done see. With --pg-extended
/// the server times each request (statement__status): counted exactly as pg_stat_statements
/// counts (-t: a fixed number; the prepares execute nothing and are no queries), its mean
/// between the executor's (pg_stat_statements) and pgbench's client latency; and a
/// simple-protocol query in the same capture is counted once, not twice.
#[test]
fn pgbench_extended_protocol_is_timed_by_the_server_with_pg_extended() {
    require_root();
    let cluster = PgCluster::start("extended");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    cluster.psql("CREATE EXTENSION pg_stat_statements");
    for mode in ["extended", "prepared"] {
        let (capture, bench, stdout, _) = record_pgbench_with(
            &cluster,
            &format!("db-{mode}"),
            &["-S", "-M", mode, "-n", "-r", "-c", "2", "-t", "500"],
            &["--pg-extended"],
        );
        let stats = pg_stat_statements(&cluster);
        let queries = capture["db"]["queries"].as_array().expect("db queries");
        let ours = |key: &str| -> (u64, u64) {
            queries
                .iter()
                .filter(|q| q["source"] == "postgres-usdt")
                .filter(|q| normalized(q["fingerprint"].as_str().unwrap()) == normalized(key))
                .map(|q| {
                    (
                        q["calls"].as_u64().unwrap(),
                        q["total_ns"].as_u64().unwrap(),
                    )
                })
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        let select = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        let (calls, total_ns) = ours(select);
        let (_, pgss) = stats
            .iter()
            .find(|(text, _)| *text == normalized(select))
            .unwrap_or_else(|| panic!("{select}: not in pg_stat_statements"));
        let client_ms = pgbench_statement_latencies(&bench)
            .into_iter()
            .find(|(statement, _)| statement.starts_with("SELECT"))
            .map(|(_, ms)| ms)
            .expect("pgbench -r latency of the SELECT");
        let mean_ms = total_ns as f64 / calls as f64 / 1e6;
        println!(
            "-M {mode}: calls ours {calls} pg_stat_statements {}; mean ours {mean_ms:.4} ms, \
             executor {:.4} ms, client {client_ms:.4} ms",
            pgss.calls, pgss.mean_ms
        );
        assert_eq!(pgss.calls, 1000, "-M {mode}");
        assert_eq!(calls, 1000, "-M {mode}");
        assert!(
            mean_ms >= pgss.mean_ms && mean_ms <= client_ms,
            "-M {mode}: mean {mean_ms} ms outside [executor {}, client {client_ms}]",
            pgss.mean_ms
        );
        // psql's reset, a simple query: once (by query__start/query__done), not twice.
        assert_eq!(ours("SELECT pg_stat_statements_reset()").0, 1, "-M {mode}");
        assert!(!stdout.contains("simple-protocol queries only"), "{stdout}");
    }
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

/// `cargo xtask bench db`: pgbench select-only TPS with the db probes attached vs not,
/// alternating, as a ratio; the added time per query follows from the client count.
#[test]
#[ignore = "benchmark: run with cargo xtask bench db"]
fn bench_db_select_only_tps() {
    require_root();
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seconds = std::env::var("BENCH_SECONDS").unwrap_or_else(|_| "5".into());
    let clients = 2.0;
    let cluster = PgCluster::start("bench");
    cluster.pgbench(&["-i", "-q", "-s", "10"]);
    let tps = |output: &str| -> f64 {
        output
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no tps in {output}"))
    };
    let pid = cluster.postmaster_pid.to_string();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    println!("[bench db] pgbench -S -c 2 -T {seconds}, probes off vs on, {rounds} rounds");
    for round in 0..rounds {
        for attached in [round % 2 == 1, round % 2 == 0] {
            let dir = temp_dir("bench-db");
            let recording = attached.then(|| {
                Recording::start(
                    &dir.join("out"),
                    &["--events", "db", "-p", &pid, "--duration", "1h"],
                )
            });
            let value = tps(&cluster.pgbench(&["-S", "-n", "-c", "2", "-T", &seconds]));
            if let Some(recording) = recording {
                let (capture, _) = recording.interrupt();
                let lost = capture["metadata"]["counters"]["db_events_lost"]
                    .as_u64()
                    .unwrap_or(0);
                println!("  round {round}: probes on  {value:>9.1} tps (events lost {lost})");
                on.push(value);
            } else {
                println!("  round {round}: probes off {value:>9.1} tps");
                off.push(value);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut off), median(&mut on));
    let added_ns = clients * (1.0 / on - 1.0 / off) * 1e9;
    println!(
        "[bench db] median tps off {off:.1}, on {on:.1}: ratio {:.3} ({:+.2} % TPS); added time \
         per query {added_ns:.0} ns (from {clients} clients' closed loop)",
        on / off,
        (on / off - 1.0) * 100.0
    );
}

#[test]
fn top_shows_the_servers_queries_live() {
    require_root();
    let cluster = PgCluster::start("top");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    let pid = cluster.postmaster_pid.to_string();
    let top = std::process::Command::new(profiler_bin())
        .args(["top", "-p", &pid, "--interval", "1s", "--count", "3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let bench = cluster.pgbench(&["-S", "-n", "-c", "1", "-T", "3"]);
    let output = top.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Oracle: pgbench's own count of transactions (one SELECT each); the snapshots cover
    // part of the run, so the sum is at most that, and the busiest second is well above 0.
    let transactions: u64 = bench
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in {bench}"));
    let calls: Vec<u64> = text
        .split("SLOWEST QUERIES")
        .skip(1)
        .filter_map(|section| {
            section
                .lines()
                .find(|l| l.ends_with("SELECT abalance FROM pgbench_accounts WHERE aid = ?"))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
        })
        .collect();
    println!("calls per snapshot {calls:?}, pgbench transactions {transactions}");
    assert!(!calls.is_empty(), "{text}");
    assert!(calls.iter().sum::<u64>() <= transactions);
    assert!(*calls.iter().max().unwrap() >= transactions / 10, "{text}");
    assert!(text.contains("MOST FREQUENT QUERIES"), "{text}");
}

fn pgbench_transactions(output: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        // "N" with -T, "N/N" with -t.
        .and_then(|v| v.split_whitespace().next()?.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in {output}"))
}

/// Records pgbench `args` on the whole host (pgbench does not exist yet when the recording
/// starts; its libpq is the system's); returns pgbench's transactions and SELECT latency,
/// and our libpq query of pgbench for that statement.
fn record_libpq(cluster: &PgCluster, name: &str, args: &[&str]) -> (u64, f64, Value) {
    let dir = temp_dir(name);
    let recording = Recording::start(&dir.join("out"), &["--events", "db", "--duration", "120s"]);
    let bench = cluster.pgbench(args);
    let (capture, _) = recording.interrupt();
    let (statement, client_ms) = pgbench_statement_latencies(&bench)
        .into_iter()
        .find(|(s, _)| s.starts_with("SELECT abalance"))
        .expect("select latency");
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let ours = queries
        .iter()
        .find(|q| {
            q["source"] == "libpq"
                && q["comm"] == "pgbench"
                && normalized(q["fingerprint"].as_str().unwrap()) == normalized(&statement)
        })
        .unwrap_or_else(|| panic!("no libpq query of pgbench in {queries:?}"))
        .clone();
    (pgbench_transactions(&bench), client_ms, ours)
}

/// Client-side timing through libpq's PQsendQuery*/PQgetResult (simple or prepared
/// protocol). The script runs one SELECT per transaction, so our call count must be
/// pgbench's transaction count. With one connection, our mean must be pgbench -r's latency
/// (±10 %); with two connections driven by one thread (`-c 2 -j 1`, commands in flight on
/// both at once) the count must still be exact. The SELECT also sleeps 1 ms in the server:
/// pgbench's per-statement clock is cached per loop and reads near zero when an answer is
/// already there when it looks (seen when the client is slowed down), never when it waits.
fn check_libpq(mode: &str) {
    require_root();
    let cluster = PgCluster::start(&format!("libpq-{mode}"));
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    let script = cluster.dir.join("select-pause.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\\set pause 0.001\n\
         SELECT abalance, pg_sleep(:pause) FROM pgbench_accounts WHERE aid = :aid;\n",
    )
    .unwrap();
    let script = script.to_str().unwrap();
    // Over TCP (the last -h wins over the helper's socket directory): the endpoint shows.
    let (transactions, client_ms, ours) = record_libpq(
        &cluster,
        &format!("db-libpq-{mode}"),
        &[
            "-h",
            "127.0.0.1",
            "-n",
            "-r",
            "-M",
            mode,
            "-f",
            script,
            "-c",
            "1",
            "-t",
            "900",
        ],
    );
    assert_eq!(
        ours["endpoint"].as_str(),
        Some(format!("127.0.0.1:{}", cluster.port).as_str()),
        "{ours}"
    );
    let calls = ours["calls"].as_u64().unwrap();
    let mean_ms = ours["total_ns"].as_u64().unwrap() as f64 / calls as f64 / 1e6;
    println!(
        "libpq {mode}, 1 connection: calls {calls} vs pgbench transactions {transactions}; mean \
         {mean_ms:.4} ms vs pgbench -r {client_ms:.4} ms"
    );
    assert_eq!(calls, transactions);
    assert!(
        (mean_ms - client_ms).abs() <= 0.10 * client_ms,
        "mean {mean_ms} ms vs pgbench's {client_ms} ms"
    );
    assert_eq!(ours["errors"].as_u64(), Some(0));
    let (transactions, _, ours) = record_libpq(
        &cluster,
        &format!("db-libpq-{mode}-2"),
        &[
            "-n", "-r", "-M", mode, "-f", script, "-c", "2", "-j", "1", "-t", "450",
        ],
    );
    let calls = ours["calls"].as_u64().unwrap();
    println!("libpq {mode}, 2 connections on 1 thread: calls {calls} vs pgbench {transactions}");
    assert_eq!(calls, transactions);
}

#[test]
fn libpq_client_latency_matches_pgbench_simple_protocol() {
    check_libpq("simple");
}

#[test]
fn libpq_client_latency_matches_pgbench_prepared_statements() {
    check_libpq("prepared");
}

/// PostgreSQL pipeline mode through libpq (pgbench `\startpipeline` … `\endpipeline`, three
/// prepared commands sent before the first result is read): every command is counted and
/// timed from its own send to the end of its own results. Oracles: pg_stat_statements'
/// calls (exact) and execution time (inside each of our windows), and pgbench's
/// transaction latency (each window lies inside its transaction).
#[test]
fn pgbench_pipeline_mode_times_every_command() {
    require_root();
    let cluster = PgCluster::start("pipeline");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    cluster.psql("CREATE EXTENSION pg_stat_statements");
    let script = cluster.dir.join("pipeline.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\\startpipeline\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
         SELECT abalance + 1 FROM pgbench_accounts WHERE aid = :aid;\n\
         SELECT abalance, pg_sleep(0.001) FROM pgbench_accounts WHERE aid = :aid;\n\
         \\endpipeline\n",
    )
    .unwrap();
    let dir = temp_dir("db-pipeline");
    let recording = Recording::start(&dir.join("out"), &["--events", "db", "--duration", "120s"]);
    cluster.psql("SELECT pg_stat_statements_reset()");
    let bench = cluster.pgbench(&[
        "-n",
        "-M",
        "prepared",
        "-f",
        script.to_str().unwrap(),
        "-c",
        "2",
        "-t",
        "300",
    ]);
    let (capture, _) = recording.interrupt();
    let transactions = pgbench_transactions(&bench);
    let latency_ms: f64 = bench
        .lines()
        .find_map(|l| l.strip_prefix("latency average = "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no latency in {bench}"));
    let stats = cluster.psql(
        "SELECT calls, total_exec_time, regexp_replace(query, '\\s+', ' ', 'g') \
         FROM pg_stat_statements WHERE query LIKE '%abalance%'",
    );
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let mut seen = 0;
    for line in stats.lines() {
        let mut f = line.splitn(3, '|');
        let (calls, exec_ms, text) = (
            f.next().unwrap().parse::<u64>().unwrap(),
            f.next().unwrap().parse::<f64>().unwrap(),
            normalized(f.next().unwrap()),
        );
        let ours = queries
            .iter()
            .find(|q| {
                q["source"] == "libpq"
                    && q["comm"] == "pgbench"
                    && normalized(q["fingerprint"].as_str().unwrap()) == text
            })
            .unwrap_or_else(|| panic!("no libpq query {text} in {queries:?}"));
        let ours_calls = ours["calls"].as_u64().unwrap();
        let ours_ms = ours["total_ns"].as_u64().unwrap() as f64 / 1e6;
        // pg_stat_statements folds `abalance` and `abalance + 1` apart, the literal as $n.
        let per_transaction = ours_calls / transactions;
        println!(
            "{text}: calls ours {ours_calls} pg_stat_statements {calls}; time ours {ours_ms:.3} \
             ms, server {exec_ms:.3} ms, pgbench's transactions {:.3} ms",
            latency_ms * (per_transaction * transactions) as f64
        );
        assert_eq!(ours_calls, calls, "{text}");
        assert!(ours_ms > exec_ms, "{text}: ours {ours_ms} ms");
        assert!(
            ours_ms < latency_ms * (per_transaction * transactions) as f64,
            "{text}: ours {ours_ms} ms"
        );
        assert_eq!(ours["errors"].as_u64(), Some(0));
        seen += calls;
    }
    assert_eq!(seen, 3 * transactions, "{stats}");
    assert_eq!(
        capture["metadata"]["counters"]["db_pipeline_too_deep"].as_u64(),
        Some(0)
    );
}

/// A script of 30 single-row lookups and one different query, run as pgbench transactions:
/// one run of 30 per transaction (pgbench counts them), the N+1 pattern, issued from
/// libpq's PQsendQuery.
#[test]
fn repeated_lookups_are_reported_as_n_plus_one_with_their_code_path() {
    require_root();
    let cluster = PgCluster::start("nplus1");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    let script = cluster.dir.join("nplus1.sql");
    let mut text = String::from("\\set aid random(1, 100000)\n");
    for _ in 0..30 {
        text.push_str("SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n");
    }
    text.push_str("SELECT count(*) FROM pgbench_branches;\n");
    std::fs::write(&script, text).unwrap();
    let dir = temp_dir("db-nplus1");
    let recording = Recording::start(&dir.join("out"), &["--events", "db", "--duration", "120s"]);
    // A fixed number of transactions: with -T the one cut off at the deadline may have run
    // its lookups without being counted.
    let bench = cluster.pgbench(&["-n", "-c", "1", "-t", "600", "-f", script.to_str().unwrap()]);
    let transactions = pgbench_transactions(&bench);
    let (capture, stdout) = recording.interrupt();
    let suspects = capture["db"]["n_plus_one"].as_array().expect("n_plus_one");
    // One suspect per code path. pgbench starts after this whole-host capture did: until its
    // unwinding tables are loaded (after its first event, behind the sweep of the processes
    // already running) its stacks are frame-pointer walks, a second and shorter stack of the
    // same code path. Every run is counted once over the two; how they split depends on how
    // busy the table loader is (alone: 1 run of 600; in the suite: up to a quarter).
    let ours: Vec<&serde_json::Value> = suspects
        .iter()
        .filter(|s| s["comm"] == "pgbench" && s["source"] == "libpq")
        .collect();
    let suspect = ours
        .first()
        .unwrap_or_else(|| panic!("no N+1 suspect for pgbench in {suspects:?}"));
    println!("{suspect}");
    for s in &ours {
        assert_eq!(
            s["fingerprint"],
            "SELECT abalance FROM pgbench_accounts WHERE aid = ?"
        );
        assert_eq!(s["longest_run"].as_u64(), Some(30), "{s}");
        assert_eq!(
            s["queries"].as_u64(),
            Some(30 * s["runs"].as_u64().unwrap())
        );
    }
    let runs: u64 = ours.iter().map(|s| s["runs"].as_u64().unwrap()).sum();
    assert_eq!(runs, transactions, "{ours:?}");
    assert!(
        ours.len() <= 2,
        "one code path, two walks at most: {ours:?}"
    );
    // The other query never repeats in a row: no suspect.
    assert!(
        !suspects
            .iter()
            .any(|s| s["fingerprint"].as_str().unwrap().contains("count(*)")),
        "{suspects:?}"
    );
    // The code path: the innermost frame is libpq's PQsendQuery, where the stack was taken;
    // walked from the tables (libpq has no frame pointers) it reaches libc's start below
    // pgbench's frames, which the frame-pointer walk does in 3 frames.
    let walked = ours
        .iter()
        .map(|s| frame_names(s))
        .max_by_key(|frames| frames.len())
        .unwrap();
    assert_eq!(walked.last().copied(), Some("PQsendQuery"), "{walked:?}");
    assert!(
        walked.contains(&"__libc_start_main_impl") && walked.len() >= 5,
        "{walked:?}"
    );
    assert!(stdout.contains("N+1 suspects"), "{stdout}");
    let folded = std::fs::read_to_string(dir.join("out/db.folded")).unwrap();
    assert!(
        folded.lines().any(|l| l.starts_with("pgbench;")
            && l.contains("PQsendQuery;[db] SELECT abalance FROM pgbench_accounts WHERE aid = ? ")),
        "{folded}"
    );
}

/// A Python database workload of `workloads/` (`script ARGS…` under Debian's python3, the
/// `ready PID` protocol, one JSON line when done), recorded with `--events db -p PID` from
/// before its first query to after its last: (its JSON line, the capture, the profiler's
/// stdout, the output directory).
fn record_python_db(name: &str, script: &str, args: &[&str]) -> (Value, Value, String, PathBuf) {
    record_python_db_under(name, &[], script, args)
}

/// As `record_python_db`, the interpreter started through `wrapper` (a command that execs
/// its arguments: `taskset`, `nice`).
fn record_python_db_under(
    name: &str,
    wrapper: &[&str],
    script: &str,
    args: &[&str],
) -> (Value, Value, String, PathBuf) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("workloads")
        .join(script);
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut command = std::process::Command::new(first);
            command.args(rest).arg("/usr/bin/python3");
            command
        }
        None => std::process::Command::new("/usr/bin/python3"),
    };
    let mut workload = ReadyProcess::spawn(command.arg(&script).args(args));
    let out = temp_dir(name).join("out");
    let recording = Recording::start(
        &out,
        &["--events", "db", "-p", &workload.pid, "--duration", "120s"],
    );
    workload.go();
    let report: Value = serde_json::from_str(&workload.line().expect("report")).unwrap();
    workload.finish();
    let (capture, stdout) = recording.interrupt();
    (report, capture, stdout, out)
}

/// SQLite through Python's sqlite3 module: statement counts exact, the joins' time inside
/// sqlite3_step within 10 % of the script's own clock around execute() + fetchall().
#[test]
fn sqlite_statements_from_python_are_counted_and_timed() {
    require_root();
    let (report, capture, stdout, _) = record_python_db("db-sqlite", "sqlite_workload.py", &[]);
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let query = |fingerprint: &str| {
        queries
            .iter()
            .find(|q| q["source"] == "sqlite" && q["fingerprint"] == fingerprint)
            .unwrap_or_else(|| panic!("no sqlite query {fingerprint:?} in {queries:?}"))
    };
    assert_eq!(
        query("INSERT INTO t VALUES(?, ?)")["calls"].as_u64(),
        Some(200)
    );
    assert_eq!(
        query("SELECT v FROM t WHERE k = ?")["calls"].as_u64(),
        Some(50)
    );
    let join = query("SELECT count(*) FROM t a, t b, t c WHERE a.k + b.k = c.k");
    assert_eq!(join["calls"].as_u64(), Some(10));
    let ours = join["total_ns"].as_u64().unwrap() as f64;
    let theirs = report["join_ns"].as_u64().unwrap() as f64;
    println!(
        "joins: ours {:.3} ms, script {:.3} ms",
        ours / 1e6,
        theirs / 1e6
    );
    assert!(
        ours <= theirs && ours >= 0.9 * theirs,
        "joins: ours {ours} ns vs the script's {theirs} ns"
    );
    assert!(
        queries.iter().all(|q| q["errors"].as_u64() == Some(0)),
        "{queries:?}"
    );
    assert!(stdout.contains("SELECT v FROM t WHERE k = ?"), "{stdout}");
}

/// SQLite statements prepared before the capture (Python's statement cache), stepped during
/// it: their text is read from the statement at its first step. Counts and texts are the
/// workload's own; without the read they would all be `[statement prepared before the
/// capture]`.
#[test]
fn sqlite_statements_prepared_before_the_capture_keep_their_text() {
    require_root();
    let (report, capture, _, _) = record_python_db("db-sqlite-cached", "sqlite_cached.py", &[]);
    let ran: BTreeMap<String, u64> = serde_json::from_value(report).unwrap();
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let ours: BTreeMap<String, u64> = queries
        .iter()
        .filter(|q| q["source"] == "sqlite")
        .map(|q| {
            (
                q["fingerprint"].as_str().unwrap().to_string(),
                q["calls"].as_u64().unwrap(),
            )
        })
        .collect();
    println!("sqlite cached statements: ours {ours:?}, the workload's {ran:?}");
    assert_eq!(ours, ran, "per-statement calls and texts");
    let counters = &capture["metadata"]["counters"];
    assert_eq!(
        counters["db_sqlite_text_at_step"].as_u64(),
        Some(2),
        "{counters}"
    );
}

/// A client that speaks the PostgreSQL protocol itself (Python, raw socket): its queries are
/// seen on the wire. Counts exact against its own and pg_stat_statements'; time to the
/// first response byte within 10 % of its own round-trip clock; garbage ignored (counted).
#[test]
fn postgres_protocol_on_the_wire_from_a_client_without_libpq() {
    require_root();
    let cluster = PgCluster::start("wire");
    cluster.psql("CREATE EXTENSION pg_stat_statements");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/pg_wire_client.py");
    let socket = cluster.dir.join(format!(".s.PGSQL.{}", cluster.port));
    let mut client = ReadyProcess::spawn(
        std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(&socket)
            .args(["300", "200"]),
    );
    let dir = temp_dir("db-wire");
    let recording = Recording::start(
        &dir.join("out"),
        &[
            "--events",
            "db",
            "--db-wire",
            "-p",
            &client.pid,
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
    let simple = query("SELECT ? AS wire_simple, pg_sleep(?)");
    let extended = query("SELECT ?::int AS wire_extended, pg_sleep(?)");
    assert_eq!(simple["endpoint"], "unix", "{simple}");
    assert_eq!(simple["calls"].as_u64(), report["simple"].as_u64());
    assert_eq!(extended["calls"].as_u64(), report["extended"].as_u64());
    let stats = pg_stat_statements(&cluster);
    let pgss_calls = |key: &str| {
        stats
            .iter()
            .find(|(text, _)| text == key)
            .map(|(_, s)| s.calls)
            .unwrap_or_else(|| panic!("{key} not in pg_stat_statements"))
    };
    assert_eq!(
        Some(pgss_calls(&normalized(
            "SELECT $1 AS wire_simple, pg_sleep($2)"
        ))),
        simple["calls"].as_u64()
    );
    assert_eq!(
        Some(pgss_calls(&normalized(
            "SELECT $1::int AS wire_extended, pg_sleep($2)"
        ))),
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
    assert!(
        capture["metadata"]["counters"]["db_wire_undecoded"].as_u64() >= Some(1),
        "the garbage write was not seen and set aside"
    );
}

/// Redis through its wire protocol: redis-benchmark's SETs and GETs, counted exactly against
/// its -n and the server's own INFO commandstats.
#[test]
fn redis_commands_on_the_wire_match_redis_benchmark_and_commandstats() {
    require_root();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
        .to_string();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (installed by cargo xtask setup)");
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cli(&["PING"]).trim() != "PONG" {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cli(&["CONFIG", "RESETSTAT"]);
    let dir = temp_dir("db-redis");
    let recording = Recording::start(
        &dir.join("out"),
        &["--events", "db", "--db-wire", "--duration", "120s"],
    );
    let bench = std::process::Command::new("redis-benchmark")
        .args(["-p", &port, "-n", "2000", "-c", "2", "-t", "set,get", "-q"])
        .output()
        .expect("redis-benchmark");
    assert!(bench.status.success());
    let (capture, _) = recording.interrupt();
    let stats = cli(&["INFO", "commandstats"]);
    let _ = server.kill();
    let _ = server.wait();
    let server_calls = |command: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {command} in {stats}"))
    };
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let ours = |fingerprint: &str| -> u64 {
        queries
            .iter()
            .filter(|q| q["source"] == "wire-redis" && q["comm"] == "redis-benchmark")
            .filter(|q| q["fingerprint"] == fingerprint)
            .map(|q| q["calls"].as_u64().unwrap())
            .sum()
    };
    println!(
        "SET ours {} server {}; GET ours {} server {}",
        ours("SET ? ?"),
        server_calls("set"),
        ours("GET ?"),
        server_calls("get")
    );
    let endpoints: std::collections::BTreeSet<&str> = queries
        .iter()
        .filter(|q| q["source"] == "wire-redis" && q["comm"] == "redis-benchmark")
        .map(|q| q["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        endpoints.into_iter().collect::<Vec<_>>(),
        vec![format!("127.0.0.1:{port}").as_str()]
    );
    assert_eq!(ours("SET ? ?"), 2000);
    assert_eq!(ours("GET ?"), 2000);
    assert_eq!(server_calls("set"), 2000);
    assert_eq!(server_calls("get"), 2000);
}

/// Off-CPU time of a thread waiting for its query is filed under the query, as a frame above
/// the code path that issued it. Oracle: pgbench's own per-statement latency × its
/// transaction count (the wait is almost all of each statement: the server sleeps 1 ms).
#[test]
fn off_cpu_time_waiting_for_a_query_shows_the_query_as_a_frame() {
    require_root();
    let cluster = PgCluster::start("frame");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    let script = cluster.dir.join("select-pause.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\\set pause 0.001\n\
         SELECT abalance, pg_sleep(:pause) FROM pgbench_accounts WHERE aid = :aid;\n",
    )
    .unwrap();
    let dir = temp_dir("db-frame");
    let recording = Recording::start(
        &dir.join("out"),
        &["--events", "db,offcpu", "--duration", "120s"],
    );
    let bench = cluster.pgbench(&[
        "-n",
        "-r",
        "-f",
        script.to_str().unwrap(),
        "-c",
        "1",
        "-T",
        "2",
    ]);
    let (capture, _) = recording.interrupt();
    let transactions = pgbench_transactions(&bench) as f64;
    let (_, latency_ms) = pgbench_statement_latencies(&bench)
        .into_iter()
        .find(|(s, _)| s.starts_with("SELECT abalance"))
        .expect("select latency");
    let frame = "[db] SELECT abalance, pg_sleep(?) FROM pgbench_accounts WHERE aid = ?";
    let stacks: Vec<&Value> = capture["offcpu"]["stacks"]
        .as_array()
        .expect("offcpu stacks")
        .iter()
        .filter(|s| s["comm"] == "pgbench" && frame_names(s).contains(&frame))
        .collect();
    assert!(
        !stacks.is_empty(),
        "no off-CPU stack of pgbench under {frame}"
    );
    let ours: f64 = stacks
        .iter()
        .map(|s| s["total_ns"].as_u64().unwrap() as f64)
        .sum();
    let theirs = transactions * latency_ms * 1e6;
    println!(
        "off-CPU under the query: ours {:.1} ms, pgbench {:.1} ms ({} stacks)",
        ours / 1e6,
        theirs / 1e6,
        stacks.len()
    );
    assert!(
        ours <= theirs && ours >= 0.9 * theirs,
        "off-CPU under the query {ours} ns vs pgbench's {theirs} ns"
    );
    // The frame sits right above the call that issued the query.
    for stack in &stacks {
        let names = frame_names(stack);
        let at = names.iter().position(|n| *n == frame).unwrap();
        assert!(at > 0 && names[at - 1] == "PQsendQuery", "{names:?}");
    }
}

/// Runs the MySQLdb workload against a fresh MariaDB with `args` added to the recording;
/// returns the capture, the workload's report and the server's Com_select delta.
fn record_mysql_workload(name: &str, extra: &[&str]) -> (Value, Value, u64) {
    record_mysql_workload_with(name, &[], extra)
}

/// `record_mysql_workload` with `workload_args` after the workload's socket argument.
fn record_mysql_workload_with(
    name: &str,
    workload_args: &[&str],
    extra: &[&str],
) -> (Value, Value, u64) {
    require_root();
    let server = profiler_tests::mariadb::MariaDb::start(name);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/mysql_workload.py");
    let mut client = ReadyProcess::spawn(
        std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(&server.socket)
            .args(workload_args),
    );
    let dir = temp_dir(name);
    let mut args = vec!["--events", "db", "-p", &client.pid, "--duration", "120s"];
    args.extend_from_slice(extra);
    let recording = Recording::start(&dir.join("out"), &args);
    let before = server.status("Com_select");
    client.go();
    let report: Value = serde_json::from_str(&client.line().expect("report")).unwrap();
    client.finish();
    let (capture, _) = recording.interrupt();
    // The status query itself is no Com_select.
    let selects = server.status("Com_select") - before;
    (capture, report, selects)
}

fn check_mysql(capture: &Value, report: &Value, server_selects: u64, source: &str) {
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let ours = queries
        .iter()
        .find(|q| q["source"] == source && q["fingerprint"] == "SELECT ? AS mysql_probe, SLEEP(?)")
        .unwrap_or_else(|| panic!("no {source} query in {queries:?}"));
    let calls = ours["calls"].as_u64().unwrap();
    let ours_ns = ours["total_ns"].as_u64().unwrap() as f64;
    let theirs_ns = report["select_ns"].as_u64().unwrap() as f64;
    println!(
        "{source}: calls {calls}, client {}, server Com_select {server_selects}; time ours \
         {:.3} ms, client {:.3} ms",
        report["selects"],
        ours_ns / 1e6,
        theirs_ns / 1e6
    );
    assert_eq!(Some(calls), report["selects"].as_u64());
    assert!(
        server_selects >= calls && server_selects - calls <= 2,
        "Com_select {server_selects}"
    );
    assert!(
        ours_ns <= theirs_ns && ours_ns >= 0.9 * theirs_ns,
        "ours {ours_ns} ns vs the client's {theirs_ns} ns"
    );
    assert_eq!(ours["errors"].as_u64(), Some(0));
}

/// MariaDB's client library (libmariadb, used by Python's MySQLdb), found in the process's
/// memory maps: counts exact, time within 10 % of the client's own clock.
#[test]
fn mysql_client_library_queries_match_the_clients_count_and_clock() {
    let (capture, report, selects) = record_mysql_workload("db-mysql", &[]);
    check_mysql(&capture, &report, selects, "mysql");
}

/// Queries of two statements each (CLIENT_MULTI_STATEMENTS, through libmariadb): every
/// statement is named and timed on its own — the first from mysql_real_query, the second
/// from the mysql_next_result that reads its result — with counts exact against the
/// client's and the server's (Com_select), and each statement's time within 10 % of the
/// client's own clock for it. No query holds both statements' text.
#[test]
fn mysql_multi_statement_queries_are_timed_statement_by_statement() {
    let (capture, report, server_selects) =
        record_mysql_workload_with("db-mysql-multi", &["multi"], &[]);
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let sent = report["queries"].as_u64().expect("queries sent");
    let mut calls_total = 0;
    for (fingerprint, clock) in [
        ("SELECT ? AS multi_first, SLEEP(?)", "first_ns"),
        ("SELECT ? AS multi_second, SLEEP(?)", "second_ns"),
    ] {
        let ours = queries
            .iter()
            .find(|q| q["source"] == "mysql" && q["fingerprint"] == fingerprint)
            .unwrap_or_else(|| panic!("no {fingerprint:?} in {queries:?}"));
        let calls = ours["calls"].as_u64().unwrap();
        let ours_ns = ours["total_ns"].as_u64().unwrap() as f64;
        let theirs_ns = report[clock].as_u64().unwrap() as f64;
        println!(
            "{fingerprint}: calls {calls} of {sent} sent; time ours {:.3} ms, client {:.3} ms",
            ours_ns / 1e6,
            theirs_ns / 1e6
        );
        assert_eq!(calls, sent, "{fingerprint}");
        assert!(
            ours_ns <= theirs_ns && ours_ns >= 0.9 * theirs_ns,
            "{fingerprint}: ours {ours_ns} ns vs the client's {theirs_ns} ns"
        );
        assert_eq!(ours["errors"].as_u64(), Some(0));
        calls_total += calls;
    }
    println!("server Com_select {server_selects}, ours {calls_total}");
    assert!(
        server_selects >= calls_total && server_selects - calls_total <= 2,
        "Com_select {server_selects}"
    );
    // Nothing else named from the workload's queries: no text of both statements, no
    // unnamed further result.
    let others: Vec<&Value> = queries
        .iter()
        .filter(|q| {
            q["fingerprint"]
                .as_str()
                .is_some_and(|f| f.contains("multi_") || f.contains("[further result"))
        })
        .filter(|q| {
            !matches!(
                q["fingerprint"].as_str(),
                Some("SELECT ? AS multi_first, SLEEP(?)" | "SELECT ? AS multi_second, SLEEP(?)")
            )
        })
        .collect();
    assert!(others.is_empty(), "other queries: {others:?}");
}

/// The same client seen only on the wire (COM_QUERY), with library probing limited to
/// SQLite: counts and time alike.
#[test]
fn mysql_com_query_on_the_wire_matches_the_clients_count_and_clock() {
    let sqlite = profiler_tests::system_library("libsqlite3.so.0");
    let (capture, report, selects) = record_mysql_workload(
        "db-mysql-wire",
        &["--db-wire", "--sqlite", sqlite.to_str().unwrap()],
    );
    check_mysql(&capture, &report, selects, "wire-mysql");
}

/// `profiler diff` on query latency: two runs of the same pgbench script are not flagged;
/// a run whose query sleeps longer in the server is, by the amount pgbench itself measured.
#[test]
fn diff_flags_a_slower_query_and_not_a_rerun() {
    require_root();
    let cluster = PgCluster::start("diff");
    cluster.pgbench(&["-i", "-q", "-s", "1"]);
    let dir = temp_dir("db-diff");
    let run = |name: &str, pause: &str| -> f64 {
        let script = cluster.dir.join(format!("{name}.sql"));
        std::fs::write(
            &script,
            format!(
                "\\set aid random(1, 100000)\n\\set pause {pause}\n\
                 SELECT abalance, pg_sleep(:pause) FROM pgbench_accounts WHERE aid = :aid;\n"
            ),
        )
        .unwrap();
        let recording =
            Recording::start(&dir.join(name), &["--events", "db", "--duration", "120s"]);
        let bench = cluster.pgbench(&[
            "-n",
            "-r",
            "-f",
            script.to_str().unwrap(),
            "-c",
            "1",
            "-T",
            "2",
        ]);
        let _ = recording.interrupt();
        pgbench_statement_latencies(&bench)
            .into_iter()
            .find(|(s, _)| s.starts_with("SELECT abalance"))
            .expect("latency")
            .1
    };
    let base_ms = run("base", "0.001");
    let _ = run("same", "0.001");
    let slow_ms = run("slow", "0.004");
    let rerun = run_diff(&dir.join("base"), &dir.join("same"), &dir.join("diff-same"));
    assert_eq!(rerun.exit_code, 0, "a rerun was flagged: {}", rerun.report);
    let slower = run_diff(&dir.join("base"), &dir.join("slow"), &dir.join("diff-slow"));
    assert_eq!(slower.exit_code, 1, "{}", slower.report);
    let change = slower.report["query_regressions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["source"] == "libpq" && c["comm"] == "pgbench")
        .unwrap_or_else(|| panic!("pgbench's query not flagged: {}", slower.report))
        .clone();
    assert_eq!(
        change["fingerprint"],
        "SELECT abalance, pg_sleep(?) FROM pgbench_accounts WHERE aid = ?"
    );
    let ours = change["relative"].as_f64().unwrap();
    let theirs = slow_ms / base_ms - 1.0;
    println!(
        "slower query: ours {:+.1}%, pgbench {:+.1}%",
        ours * 100.0,
        theirs * 100.0
    );
    assert!(
        (ours - theirs).abs() <= 0.15 * theirs,
        "ours {ours} vs pgbench {theirs}"
    );
    let md = std::fs::read_to_string(dir.join("diff-slow/report.md")).unwrap();
    assert!(md.contains("Slower queries"), "{md}");
}

/// MySQL server-side prepared statements on the wire (a client speaking the protocol
/// itself): COM_STMT_EXECUTEs are named by the text of their COM_STMT_PREPARE (the id comes
/// in the server's reply). Counts against the client's and the server's Com_stmt_execute;
/// time within 10 % of the client's own clock.
#[test]
fn mysql_prepared_statements_on_the_wire_show_their_text() {
    require_root();
    let server = profiler_tests::mariadb::MariaDb::start("db-mysql-prepared");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/mysql_wire_client.py");
    let mut client = ReadyProcess::spawn(
        std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(&server.socket)
            .arg("200"),
    );
    let dir = temp_dir("db-mysql-prepared");
    let recording = Recording::start(
        &dir.join("out"),
        &[
            "--events",
            "db",
            "--db-wire",
            "-p",
            &client.pid,
            "--duration",
            "120s",
        ],
    );
    let before = server.status("Com_stmt_execute");
    client.go();
    let report: Value = serde_json::from_str(&client.line().expect("report")).unwrap();
    client.finish();
    let (capture, _) = recording.interrupt();
    let executes = server.status("Com_stmt_execute") - before;
    let queries = capture["db"]["queries"].as_array().expect("db queries");
    let ours = queries
        .iter()
        .find(|q| {
            q["source"] == "wire-mysql"
                && q["fingerprint"] == "SELECT ? + ? AS mysql_prepared, SLEEP(?)"
        })
        .unwrap_or_else(|| panic!("no prepared statement in {queries:?}"));
    let calls = ours["calls"].as_u64().unwrap();
    let ours_ns = ours["total_ns"].as_u64().unwrap() as f64;
    let theirs_ns = report["execute_ns"].as_u64().unwrap() as f64;
    println!(
        "prepared executes: ours {calls}, client {}, server {executes}; time ours {:.3} ms, \
         client {:.3} ms",
        report["executions"],
        ours_ns / 1e6,
        theirs_ns / 1e6
    );
    assert_eq!(Some(calls), report["executions"].as_u64());
    assert_eq!(calls, executes);
    assert!(
        ours_ns <= theirs_ns && ours_ns >= 0.9 * theirs_ns,
        "ours {ours_ns} ns vs the client's {theirs_ns} ns"
    );
    assert_eq!(ours["endpoint"], "unix");
}

/// What the ORM-shaped workload (`workloads/orm_nplus1.py`) issued and where.
struct OrmRun {
    capture: Value,
    folded: String,
    issued: Value,
    lines: Value,
    report: Value,
}

/// Runs the ORM-shaped workload with `args` (its backend).
fn record_orm(name: &str, args: &[&str]) -> OrmRun {
    record_orm_under(name, &[], args)
}

/// Runs the ORM-shaped workload with `args` (its backend) through `wrapper`.
fn record_orm_under(name: &str, wrapper: &[&str], args: &[&str]) -> OrmRun {
    let (report, capture, _, out) = record_python_db_under(name, wrapper, "orm_nplus1.py", args);
    OrmRun {
        capture,
        folded: std::fs::read_to_string(out.join("db.folded")).unwrap(),
        issued: report["issued"].clone(),
        lines: report["lines"].clone(),
        report,
    }
}

/// The checks both ORM backends share: counts exact against the app's own, one N+1 suspect
/// (25 runs of 30) whose code path names the Python method that issued the query at the
/// line of its execute call, under the function that looped, with `innermost` (where the
/// client library took the stack) below; the `[db]` frame of each query sits above the
/// Python method that issued it in db.folded.
fn check_orm(run: &OrmRun, source: &str, items: &str, list: &str, innermost: &str) {
    let queries = run.capture["db"]["queries"].as_array().expect("db queries");
    let calls = |fingerprint: &str| {
        queries
            .iter()
            .filter(|q| q["source"] == source && q["fingerprint"] == fingerprint)
            .map(|q| q["calls"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(
        calls(items),
        run.issued["items"].as_u64().unwrap(),
        "{queries:?}"
    );
    assert_eq!(
        calls(list),
        run.issued["list"].as_u64().unwrap(),
        "{queries:?}"
    );
    let items_at = format!(
        "py::OrderRepository.items_for (orm_nplus1.py:{})",
        run.lines["items"]
    );
    let list_at = format!(
        "py::OrderRepository.order_ids (orm_nplus1.py:{})",
        run.lines["list"]
    );
    let suspects: Vec<&Value> = run.capture["db"]["n_plus_one"]
        .as_array()
        .expect("n_plus_one")
        .iter()
        .filter(|s| s["source"] == source)
        .collect();
    println!("{suspects:#?}");
    assert_eq!(suspects.len(), 1, "one code path: {suspects:?}");
    let suspect = suspects[0];
    assert_eq!(suspect["fingerprint"], items);
    assert_eq!(
        (
            suspect["runs"].as_u64(),
            suspect["longest_run"].as_u64(),
            suspect["queries"].as_u64()
        ),
        (Some(25), Some(30), run.issued["items"].as_u64()),
        "{suspect}"
    );
    let frames = frame_names(suspect);
    let python: Vec<&str> = frames
        .iter()
        .copied()
        .filter(|f| f.starts_with("py::"))
        .collect();
    assert_eq!(
        python.last().copied(),
        Some(items_at.as_str()),
        "{frames:?}"
    );
    assert!(
        python.len() >= 3
            && python[python.len() - 2].starts_with("py::render_report (orm_nplus1.py:")
            && python[python.len() - 3].starts_with("py::main (orm_nplus1.py:"),
        "{frames:?}"
    );
    assert_eq!(frames.last().copied(), Some(innermost), "{frames:?}");
    assert!(
        frames.contains(&"__libc_start_main_impl") || frames.contains(&"__libc_start_call_main"),
        "native frames down to libc's start: {frames:?}"
    );
    // db.folded: each query's `[db]` frame above the method that issued it.
    for (method, fingerprint) in [(&items_at, items), (&list_at, list)] {
        let leaf = format!(";[db] {fingerprint} ");
        let stacks: Vec<&str> = run.folded.lines().filter(|l| l.contains(&leaf)).collect();
        assert!(!stacks.is_empty(), "no {leaf:?} in\n{}", run.folded);
        for stack in &stacks {
            let last_python = stack.split(';').rfind(|f| f.starts_with("py::"));
            assert_eq!(last_python, Some(method.as_str()), "{stack}");
        }
    }
}

/// The ORM N+1 through Python's sqlite3 module: the stack is taken at each execution's
/// first sqlite3_step.
#[test]
fn orm_n_plus_one_through_sqlite3_names_the_python_method() {
    require_root();
    let run = record_orm("db-orm-sqlite", &["sqlite"]);
    check_orm(
        &run,
        "sqlite",
        "SELECT sku, qty FROM items WHERE order_id = ?",
        "SELECT id FROM orders ORDER BY id LIMIT ?",
        "sqlite3_step",
    );
}

/// The N+1 detector's gap between calls of a run (README, "N+1 suspects").
const N_PLUS_ONE_MAX_GAP_NS: u64 = 1_000_000;

/// Kills a helper process however the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The ORM N+1 through sqlite3 while a CPU-bound process shares its CPU at a higher
/// priority (nice 0 against the script's 10), the script giving up the CPU once mid-round
/// (sched_yield, between two item queries): there it waits for its turn, so its own clock
/// sees more than the 1 ms N+1 gap between those two queries in every round and the
/// kernel's schedstat counts the wait. Time spent waiting for a CPU is the scheduler's, not
/// the program's: each round is still one run of 30.
#[test]
fn orm_n_plus_one_preempted_mid_round_is_still_one_run_per_round() {
    require_root();
    let cpu = "1";
    let _burner = Killed(
        std::process::Command::new("taskset")
            .args(["-c", cpu, "/usr/bin/python3", "-c", "while True: pass"])
            .spawn()
            .expect("start the CPU burner"),
    );
    let run = record_orm_under(
        "db-orm-preempted",
        &["taskset", "-c", cpu, "nice", "-n", "10"],
        &["sqlite", "--yield"],
    );
    let gap = run.report["longest_gap_ns"].as_u64().unwrap();
    let over = run.report["gaps_over_1ms"].as_u64().unwrap();
    let queued = run.report["queued_ns"].as_u64().unwrap();
    println!(
        "{over} gaps between item queries over 1 ms (longest {:.3} ms), waited for a CPU \
         {:.3} ms",
        gap as f64 / 1e6,
        queued as f64 / 1e6
    );
    assert!(
        over == 25 && queued > 25 * N_PLUS_ONE_MAX_GAP_NS,
        "the loop did not wait mid-round in each of its 25 rounds: {over} gaps over 1 ms, \
         run-queue wait {queued} ns"
    );
    check_orm(
        &run,
        "sqlite",
        "SELECT sku, qty FROM items WHERE order_id = ?",
        "SELECT id FROM orders ORDER BY id LIMIT ?",
        "sqlite3_step",
    );
}

/// The ORM N+1 through psycopg2 (libpq's PQexec) against the test's PostgreSQL.
#[test]
fn orm_n_plus_one_through_psycopg2_names_the_python_method() {
    require_root();
    let cluster = PgCluster::start("orm");
    let run = record_orm(
        "db-orm-psycopg2",
        &[
            "postgres",
            cluster.dir.to_str().unwrap(),
            &cluster.port.to_string(),
        ],
    );
    check_orm(
        &run,
        "libpq",
        "SELECT sku, qty FROM items WHERE order_id = ?",
        "SELECT id FROM orders ORDER BY id LIMIT ?",
        "PQsendQuery",
    );
}
