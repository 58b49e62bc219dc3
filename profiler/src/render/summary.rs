//! The short text summary of a Capture (printed at the end of `record`, `summary.txt`) and
//! its Markdown form: per family, totals, losses, and the top stacks and queries.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::folded::folded_path;
use crate::model::{Capture, Frame, FrameKind, Stack};

/// The text summary as Markdown, with the capture's metadata.
pub fn markdown_summary(capture: &Capture, top: usize) -> String {
    let meta = &capture.metadata;
    format!(
        "# Off-CPU capture\n\nHost `{}`, kernel `{}`, {:.1} s, {} intervals, attach `{}`, \
         profiler {}.\n\n```\n{}```\n",
        meta.host,
        meta.kernel,
        meta.duration_ns as f64 / 1e9,
        meta.interval_ends_ns.len(),
        meta.attach,
        meta.profiler_version,
        summary(capture, top)
    )
}

fn seconds(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    if s >= 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{:.3} ms", ns as f64 / 1e6)
    }
}

/// How user stacks were walked (`--unwind dwarf`), and every way a walk fell short.
fn unwind_summary(out: &mut String, counters: &std::collections::BTreeMap<String, u64>) {
    if !counters.contains_key("unwind_walks") {
        return;
    }
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "user stacks: {} walked from .eh_frame tables ({} to the outermost frame, {} frames), \
         {} by frame pointers for processes without tables; tables: {} process loads, {} files, \
         {} rows of {} ({} B each), built in {}, loaded in {}; {} before the start, ready {} \
         after it",
        counter("unwind_walks"),
        counter("unwind_walk_ok"),
        counter("unwind_frames"),
        counter("unwind_no_table_process"),
        counter("unwind_table_processes"),
        counter("unwind_table_files"),
        counter("unwind_table_rows"),
        counter("unwind_table_row_capacity"),
        std::mem::size_of::<profiler_common::unwind::UnwindRow>(),
        seconds(counter("unwind_table_build_ns")),
        seconds(counter("unwind_table_load_ns")),
        seconds(counter("unwind_table_prepare_ns")),
        seconds(counter("unwind_table_ready_ns")),
    );
    let _ = writeln!(
        out,
        "unwinding: frame-pointer steps {} (anonymous/JIT code {}, no table for the file {}, \
         table map full {} ({} files), no row for the pc {}); walks cut: depth limit {}, \
         unreadable stack {}, unsupported CFA rule {}, bad frame {}, return address outside \
         code {}, frame-pointer chain ended {}; signal frames {}; stacks not stored (frame pointers \
         instead): map full {}, collisions {}",
        counter("unwind_fp_steps"),
        counter("unwind_anonymous_code"),
        counter("unwind_no_table_file"),
        counter("unwind_table_full"),
        counter("unwind_table_files_table_full"),
        counter("unwind_no_row"),
        counter("unwind_depth_limit"),
        counter("unwind_unreadable"),
        counter("unwind_unsupported_cfa"),
        counter("unwind_bad_frame"),
        counter("unwind_outside_code"),
        counter("unwind_fp_end"),
        counter("unwind_signal_frames"),
        counter("unwind_stack_map_full"),
        counter("unwind_stack_collision"),
    );
}

/// The short text summary: per family, totals, losses, and the top stacks.
pub fn summary(capture: &Capture, top: usize) -> String {
    let mut out = String::new();
    let meta = &capture.metadata;
    let counter = |name: &str| meta.counters.get(name).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "capture: {:.3} s, {} processes; program runs skipped by the kernel {}; unresolved \
         frames: user {}/{}, kernel {}/{}",
        meta.duration_ns as f64 / 1e9,
        capture.processes.len(),
        counter("program_misses"),
        counter("unresolved_user_frames"),
        counter("user_frames"),
        counter("unresolved_kernel_frames"),
        counter("kernel_frames"),
    );
    if !meta.filters.cgroups.is_empty() {
        let _ = writeln!(
            out,
            "cgroups recorded (with their children): {}",
            meta.filters.cgroups.join(", ")
        );
    }
    if !meta.unresolved_by_binary.is_empty() {
        // Where the unresolved user frames come from: a stripped binary, JIT code, or
        // addresses a broken walk made up (`[unknown]`: in no mapping).
        let list: Vec<String> = meta
            .unresolved_by_binary
            .iter()
            .take(5)
            .map(|b| {
                format!(
                    "{} {}/{}",
                    short_binary(&b.binary),
                    b.unresolved,
                    b.addresses
                )
            })
            .collect();
        let more = meta.unresolved_by_binary.len().saturating_sub(5);
        let _ = writeln!(
            out,
            "unresolved user frames by binary: {}{}",
            list.join(", "),
            if more > 0 {
                format!(", {more} more")
            } else {
                String::new()
            }
        );
    }
    if counter("python_walks") > 0 {
        let _ = writeln!(
            out,
            "Python: {} stacks walked for Python frames, {} frames ({} named); threads not found \
             {}, unreadable {}, truncated {}, code gone before it was read {}, frames no eval \
             frame took {}, notices lost {}",
            counter("python_walks"),
            counter("python_frames"),
            counter("python_frames_named"),
            counter("python_no_thread"),
            counter("python_unreadable"),
            counter("python_truncated"),
            counter("python_code_unreadable"),
            counter("python_frames_unplaced"),
            counter("python_notify_lost"),
        );
    }
    if counter("python_unsupported") > 0 {
        let _ = writeln!(
            out,
            "Python: {} processes run a CPython the walker does not know (it walks 3.8–3.13): \
             native frames only",
            counter("python_unsupported")
        );
    }
    if counter("perf_maps") + counter("perf_maps_refused") > 0 {
        let _ = writeln!(
            out,
            "JIT code: {} frames named from {} perf maps; refused {} (not a regular file owned \
             by the process's user or root), truncated {}, bad lines {}",
            counter("perf_map_frames"),
            counter("perf_maps"),
            counter("perf_maps_refused"),
            counter("perf_maps_truncated"),
            counter("perf_map_bad_lines"),
        );
    }
    if meta
        .unresolved_by_binary
        .iter()
        .any(|b| b.binary == "[anon]")
    {
        let _ = writeln!(
            out,
            "[anon] frames are generated code without a perf map: run python3 -X perf, node \
             --perf-basic-prof --interpreted-frames-native-stack, or a JVM with perf-map-agent"
        );
    }
    if meta.counters.contains_key("profiler_cpu_ns") {
        let mut cost = format!("cost: profiler {} CPU", seconds(counter("profiler_cpu_ns")));
        if meta.counters.contains_key("bpf_run_ns") {
            let _ = write!(
                cost,
                ", eBPF programs {} in {} runs",
                seconds(counter("bpf_run_ns")),
                counter("bpf_runs")
            );
        }
        for (family, every) in [
            ("off-CPU blocks", meta.offcpu_sample_every),
            ("database queries", meta.db_sample_every),
        ] {
            if every > 1 {
                let _ = write!(cost, "; sampled: 1 in {every} {family}, figures scaled up");
            }
        }
        let _ = writeln!(out, "{cost}");
    }
    unwind_summary(&mut out, &meta.counters);
    if let Some(offcpu) = &capture.offcpu {
        let total: u64 = offcpu.stacks.iter().map(|s| s.total_ns).sum();
        let blocks: u64 = offcpu.stacks.iter().map(|s| s.count).sum();
        let _ = writeln!(
            out,
            "off-CPU: {} blocked in {} blocks, {} stacks ({})",
            seconds(total),
            blocks,
            offcpu.stacks.len(),
            meta.attach,
        );
        let _ = writeln!(
            out,
            "losses: stack collisions {}, kernel stack errors {}, start map full {}, \
             aggregation map full {} ({} lost), new-task events lost {}; events the kernel \
             never delivered: switch-ins {} ({} recovered to the wakeup), switch-outs {}, \
             wakeups {}",
            counter("stack_collisions"),
            counter("kernel_stack_errors"),
            counter("start_map_full"),
            counter("agg_map_full"),
            seconds(counter("lost_ns")),
            counter("events_lost"),
            counter("switch_in_missed"),
            counter("switch_in_missed_recovered"),
            counter("switch_out_missed"),
            counter("wakeup_missed"),
        );
        let _ = writeln!(out, "top blocking stacks:");
        top_stacks(&mut out, &offcpu.stacks, top, "blocks", seconds);
        if !offcpu.runqueue.is_empty() {
            let _ = writeln!(
                out,
                "run-queue latency (waiting for a CPU once runnable), by process:"
            );
            for histogram in offcpu.runqueue.iter().take(top) {
                let _ = writeln!(
                    out,
                    "  {:>8} waits  p50 < {:>10}  p99 < {:>10}  {}[{}]",
                    histogram.waits,
                    seconds(histogram.quantile_ns(0.5)),
                    seconds(histogram.quantile_ns(0.99)),
                    histogram.comm,
                    histogram.pid,
                );
            }
        }
    }
    if let Some(syscalls) = &capture.syscalls {
        let calls: u64 = syscalls.stats.iter().map(|s| s.count).sum();
        let _ = writeln!(
            out,
            "syscalls: {calls} calls; losses: start map full {}, stats map full {}, slow map \
             full {}, stack collisions {}",
            counter("syscalls_start_map_full"),
            counter("syscalls_stats_map_full"),
            counter("syscalls_slow_map_full"),
            counter("syscalls_stack_collisions"),
        );
        let _ = writeln!(out, "slowest syscalls by total time:");
        for stat in syscalls.stats.iter().take(top) {
            let _ = writeln!(
                out,
                "  {:<16} {:>8} calls {:>5} errors  total {:>11}  avg {:>10}  p99 < {:>10}  max {:>10}  {}[{}]",
                stat.name,
                stat.count,
                stat.errors,
                seconds(stat.total_ns),
                seconds(stat.total_ns / stat.count.max(1)),
                seconds(stat.quantile_ns(0.99)),
                seconds(stat.max_ns),
                stat.comm,
                stat.pid,
            );
        }
        if !syscalls.slow.is_empty() {
            let _ = writeln!(
                out,
                "calls slower than {} (syscalls.folded):",
                seconds(syscalls.slow_threshold_ns)
            );
            top_stacks(&mut out, &syscalls.slow, top, "calls", seconds);
        }
    }
    if let Some(tcp) = &capture.tcp {
        tcp_summary(&mut out, tcp, &meta.counters, top);
    }
    if let Some(db) = &capture.db {
        db_summary(&mut out, db, &meta.counters, top);
    }
    if let Some(oncpu) = &capture.oncpu {
        let samples: u64 = oncpu.stacks.iter().map(|s| s.count).sum();
        let _ = writeln!(
            out,
            "on-CPU: {} samples at {} Hz ({} of CPU), {} stacks, {} idle samples",
            samples,
            oncpu.frequency_hz,
            seconds(samples * 1_000_000_000 / oncpu.frequency_hz.max(1)),
            oncpu.stacks.len(),
            counter("oncpu_idle_samples"),
        );
        let _ = writeln!(
            out,
            "losses: stack collisions {}, aggregation map full {}, new-task events lost {}",
            counter("oncpu_stack_collisions"),
            counter("oncpu_agg_map_full"),
            counter("oncpu_events_lost"),
        );
        let _ = writeln!(out, "top on-CPU stacks:");
        top_stacks(&mut out, &oncpu.stacks, top, "samples", seconds);
    }
    out
}

/// Which source timed each process's queries, and the processes that talk to a database
/// port with no query timed (a line each: what the capture could not see).
fn db_coverage(
    out: &mut String,
    db: &crate::model::DbProfile,
    counters: &std::collections::BTreeMap<String, u64>,
) {
    if db.coverage.is_empty() {
        return;
    }
    let _ = writeln!(out, "coverage (which source timed each process's queries):");
    // The server's query probes fire for the simple protocol only.
    if counters.get("db_pg_extended") == Some(&0) && db.coverage.iter().any(|c| c.server) {
        let _ = writeln!(
            out,
            "  (server side: simple-protocol queries only; extended-protocol ones — prepared \
             statements, queries with parameters — are timed on the client side (libpq, wire) \
             or by the server with --pg-extended)"
        );
    }
    for c in &db.coverage {
        if c.sources.is_empty() {
            let _ = writeln!(
                out,
                "  {}[{}]: 0 queries timed, yet connected to {} ({} sent, {} received during \
                 the capture); no source decoded it (a client library not probed, or the wire \
                 off: try -p {} or --db-wire)",
                c.comm,
                c.pid,
                c.untimed_connections.join(", "),
                bytes(c.untimed_bytes_sent),
                bytes(c.untimed_bytes_received),
                c.pid,
            );
            continue;
        }
        let sources: Vec<String> = c
            .sources
            .iter()
            .map(|(source, calls)| format!("{source} {calls}"))
            .collect();
        let _ = writeln!(
            out,
            "  {}[{}]{}: {}",
            c.comm,
            c.pid,
            if c.server { " (server side)" } else { "" },
            sources.join(", "),
        );
    }
}

fn db_summary(
    out: &mut String,
    db: &crate::model::DbProfile,
    counters: &std::collections::BTreeMap<String, u64>,
    top: usize,
) {
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0);
    let calls: u64 = db.queries.iter().map(|q| q.calls).sum();
    let _ = writeln!(
        out,
        "database: {calls} queries, {} fingerprints; failed (no done probe) {}; losses: events \
         lost {}, still running at the end {}, in-flight map full {}, unreadable text {}; not \
         in the -p filter {}",
        db.queries.len(),
        counter("db_abandoned"),
        counter("db_events_lost"),
        counter("db_in_flight_at_end"),
        counter("db_pending_map_full"),
        counter("db_text_unreadable"),
        counter("db_filtered_out"),
    );
    db_coverage(out, db, counters);
    if db.queries.is_empty() {
        return;
    }
    if !db.n_plus_one.is_empty() {
        let _ = writeln!(
            out,
            "N+1 suspects (one query issued again and again by one thread):"
        );
        for s in db.n_plus_one.iter().take(top) {
            let path: Vec<&str> = s
                .frames
                .iter()
                .rev()
                .take(4)
                .map(|f| f.name.as_str())
                .collect();
            let _ = writeln!(
                out,
                "  {} calls in {} runs (longest {}), {} total  {}[{}]  {}{}",
                s.queries,
                s.runs,
                s.longest_run,
                seconds(s.total_ns),
                s.comm,
                s.pid,
                s.fingerprint,
                if path.is_empty() {
                    String::new()
                } else {
                    format!("  from {}", path.join(" <- "))
                }
            );
        }
    }
    let _ = writeln!(out, "queries by total time (db.folded):");
    let _ = writeln!(
        out,
        "  {:>8} {:>6} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10}  process -> database  query",
        "calls", "errors", "total", "avg", "p50", "p95", "p99", "max"
    );
    for q in db.queries.iter().take(top) {
        let _ = writeln!(
            out,
            "  {:>8} {:>6} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10}  {}[{}]{}  {}",
            q.calls,
            q.errors,
            seconds(q.total_ns),
            q.total_ns
                .checked_div(q.calls)
                .map_or("-".to_string(), seconds),
            seconds(q.p50_ns),
            seconds(q.p95_ns),
            seconds(q.p99_ns),
            seconds(q.max_ns),
            q.comm,
            q.pid,
            if q.endpoint.is_empty() {
                String::new()
            } else {
                format!(" -> {}", q.endpoint)
            },
            q.fingerprint,
        );
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 10 << 30 => format!("{} GiB", n >> 30),
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn tcp_summary(
    out: &mut String,
    tcp: &crate::model::TcpProfile,
    counters: &std::collections::BTreeMap<String, u64>,
    top: usize,
) {
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0);
    let sum = |f: fn(&crate::model::TcpEndpoint) -> u64| tcp.endpoints.iter().map(f).sum::<u64>();
    let _ = writeln!(
        out,
        "TCP: {} connects ({} failed), {} closed, {} retransmits; whole host: {} retransmits \
         ({} on sockets opened before the capture), {} SYN-ACK retransmits; losses: events \
         lost {}, connection map full {}, closes with no owner {}, connections not listed {}",
        sum(|e| e.connects),
        sum(|e| e.connect_failures),
        sum(|e| e.closed),
        sum(|e| e.retransmits),
        counter("tcp_retransmits"),
        counter("tcp_retransmits_untracked"),
        counter("tcp_synack_retransmits"),
        counter("tcp_events_lost"),
        counter("tcp_conns_map_full"),
        counter("tcp_unknown_owner"),
        tcp.connections_not_listed,
    );
    if tcp.endpoints.is_empty() {
        return;
    }
    let _ = writeln!(out, "TCP by process and remote endpoint:");
    let _ = writeln!(
        out,
        "  {:<7} {:<30} {:>6} {:>5} {:>10} {:>10} {:>6} {:>10} {:>9} {:>9} {:>7} {:>9}  process",
        "role",
        "endpoint",
        "conns",
        "fail",
        "conn avg",
        "conn max",
        "closed",
        "life avg",
        "rx",
        "tx",
        "retrans",
        "srtt avg"
    );
    for e in tcp.endpoints.iter().take(top) {
        let attempts = e.connects + e.connect_failures;
        let avg = |total: u64, n: u64| total.checked_div(n).map_or("-".to_string(), seconds);
        let _ = writeln!(
            out,
            "  {:<7} {:<30} {:>6} {:>5} {:>10} {:>10} {:>6} {:>10} {:>9} {:>9} {:>7} {:>9}  {}[{}]",
            e.role,
            e.label(),
            attempts,
            e.connect_failures,
            avg(e.connect_total_ns, attempts),
            if attempts == 0 {
                "-".to_string()
            } else {
                seconds(e.connect_max_ns)
            },
            e.closed,
            avg(e.lifetime_total_ns, e.closed),
            bytes(e.bytes_received),
            bytes(e.bytes_sent),
            e.retransmits,
            avg(e.srtt_total_us * 1000, e.closed),
            if e.comm.is_empty() { "?" } else { &e.comm },
            e.pid,
        );
    }
}

/// The `top` heaviest stacks, threads of a process that were in the same place merged.
fn top_stacks(
    out: &mut String,
    stacks: &[Stack],
    top: usize,
    count_name: &str,
    amount: impl Fn(u64) -> String,
) {
    let mut merged: BTreeMap<(String, u32, String), (u64, u64, &Stack)> = BTreeMap::new();
    for stack in stacks {
        let entry = merged
            .entry((folded_path(stack), stack.pid, stack.state.clone()))
            .or_insert((0, 0, stack));
        entry.0 += stack.total_ns;
        entry.1 += stack.count;
    }
    let mut ranked: Vec<_> = merged.into_values().collect();
    ranked.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    for (rank, (ns, count, stack)) in ranked.iter().take(top).enumerate() {
        let avg = if *count > 0 { ns / count } else { 0 };
        let _ = writeln!(
            out,
            "{:>3}. {:>12}  {:>7} {count_name}  avg {:>10}  {}[{}] {}",
            rank + 1,
            amount(*ns),
            count,
            amount(avg),
            stack.comm,
            stack.pid,
            stack.state,
        );
        let _ = writeln!(out, "     {}", short_stack(&stack.frames));
    }
}

/// Leaf-first, a few user frames then the innermost kernel frame: where it waited, and why.
fn short_stack(frames: &[Frame]) -> String {
    let user: Vec<&str> = frames
        .iter()
        .rev()
        .filter(|f| f.kind != FrameKind::Kernel)
        .take(4)
        .map(|f| f.name.as_str())
        .collect();
    // The first kernel frame outside the scheduler says what the thread waited in.
    let kernel = frames
        .iter()
        .rev()
        .filter(|f| f.kind == FrameKind::Kernel)
        .find(|f| !f.name.contains("schedule"))
        .map(|f| f.name.as_str())
        .unwrap_or("-");
    format!("{}  |  {kernel}", user.join(" <- "))
}

/// A binary's file name (paths are long; the capture keeps the whole path).
fn short_binary(path: &str) -> &str {
    if path.starts_with('/') {
        path.rsplit('/').next().unwrap_or(path)
    } else {
        path
    }
}
