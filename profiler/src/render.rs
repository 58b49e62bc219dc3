//! Views of a Capture: folded stacks, flamegraph SVG (inferno), and the text summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use inferno::flamegraph::{self, Options, Palette, color::BasicPalette};

use crate::model::{Capture, Frame, FrameKind, Stack};

/// Folded-stack lines (`comm;root;…;leaf value`), identical stacks merged, sorted. `value`
/// picks what a stack weighs (ns, samples); merged sums are divided by `divisor` (1000: ns →
/// microseconds) and rounded; lines that round to zero are left out.
/// Kernel frames carry the `_[k]` suffix that FlameGraph and inferno colour as kernel code.
pub fn folded(stacks: &[Stack], value: impl Fn(&Stack) -> u64, divisor: u64) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for stack in stacks {
        *merged.entry(folded_path(stack)).or_default() += value(stack);
    }
    let divisor = divisor.max(1);
    merged
        .into_iter()
        .filter_map(|(path, sum)| {
            let rounded = (sum + divisor / 2) / divisor;
            (rounded > 0).then(|| format!("{path} {rounded}"))
        })
        .collect()
}

/// How a family's flamegraph looks.
pub struct FlameStyle {
    pub title: &'static str,
    pub count_name: &'static str,
    pub palette: BasicPalette,
}

/// Off-CPU: microseconds, a cool palette.
pub const OFFCPU_STYLE: FlameStyle = FlameStyle {
    title: "Off-CPU time",
    count_name: "us",
    palette: BasicPalette::Blue,
};

/// Wall-clock: on- and off-CPU time together, microseconds.
pub const WALLCLOCK_STYLE: FlameStyle = FlameStyle {
    title: "Wall-clock time per thread (on- and off-CPU)",
    count_name: "us",
    palette: BasicPalette::Aqua,
};

/// Database query time by issuing code path.
pub const DB_STYLE: FlameStyle = FlameStyle {
    title: "Database query time",
    count_name: "us",
    palette: BasicPalette::Yellow,
};

/// The leaf a wall-clock stack ends in: where the time went.
pub fn wallclock_leaf(stack: &Stack) -> &'static str {
    match stack.state.as_str() {
        "running" => "[running]",
        "runqueue" => "[runqueue]",
        "disk" => "[disk]",
        "idle" => "[idle]",
        "sleep"
            if stack
                .frames
                .iter()
                .any(|f| f.kind == FrameKind::Kernel && f.name.contains("futex")) =>
        {
            "[lock]"
        }
        "sleep" => "[sleep]",
        _ => "[other]",
    }
}

/// Wall-clock view: per thread (`comm;[tid N];…`), on-CPU samples as CPU time and off-CPU
/// time in one set of folded lines, in microseconds, each ending in `wallclock_leaf`.
/// Needs both families; without one of them it would silently mislead, so it is empty.
pub fn wallclock(capture: &Capture) -> Vec<String> {
    let (Some(offcpu), Some(oncpu)) = (&capture.offcpu, &capture.oncpu) else {
        return Vec::new();
    };
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for stack in oncpu.stacks.iter().chain(&offcpu.stacks) {
        let mut path = clean(&stack.comm);
        path.push_str(&format!(";[tid {}]", stack.tid));
        for frame in &stack.frames {
            path.push(';');
            path.push_str(&frame_label(frame));
        }
        path.push(';');
        path.push_str(wallclock_leaf(stack));
        *merged.entry(path).or_default() += stack.total_ns;
    }
    merged
        .into_iter()
        .filter_map(|(path, ns)| {
            let us = (ns + 500) / 1000;
            (us > 0).then(|| format!("{path} {us}"))
        })
        .collect()
}

/// On-CPU: samples, the classic warm palette.
pub const ONCPU_STYLE: FlameStyle = FlameStyle {
    title: "On-CPU samples",
    count_name: "samples",
    palette: BasicPalette::Hot,
};

/// The `;`-joined path of a stack, process name first.
pub fn folded_path(stack: &Stack) -> String {
    let mut path = clean(&stack.comm);
    for frame in &stack.frames {
        path.push(';');
        path.push_str(&frame_label(frame));
    }
    path
}

pub fn frame_label(frame: &Frame) -> String {
    let name = clean(&frame.name);
    match frame.kind {
        FrameKind::Kernel => format!("{name}_[k]"),
        _ => name,
    }
}

/// Folded lines are `;`-separated and end with ` count`: keep names from breaking either.
fn clean(name: &str) -> String {
    let name = name.replace(';', ":").replace(['\n', '\r'], " ");
    if name.is_empty() {
        "[unnamed]".to_string()
    } else {
        name
    }
}

/// Writes a flamegraph SVG of folded lines to a file.
pub fn flamegraph_svg(lines: &[String], style: &FlameStyle, path: &Path) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    write_flamegraph(lines, style, std::io::BufWriter::new(file))
}

/// Writes a flamegraph SVG of folded lines (inferno).
pub fn write_flamegraph<W: std::io::Write>(
    lines: &[String],
    style: &FlameStyle,
    writer: W,
) -> Result<()> {
    let mut options = Options::default();
    options.title = style.title.to_string();
    options.count_name = style.count_name.to_string();
    options.colors = Palette::Basic(style.palette);
    let blank = ["[no samples] 1".to_string()];
    let lines = if lines.is_empty() {
        // inferno refuses empty input; an empty capture still gets a (blank) picture.
        options.subtitle = Some("no samples".to_string());
        &blank[..]
    } else {
        lines
    };
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), writer)
        .context("rendering the flamegraph failed")
}

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
             aggregation map full {} ({} lost), new-task events lost {}",
            counter("stack_collisions"),
            counter("kernel_stack_errors"),
            counter("start_map_full"),
            counter("agg_map_full"),
            seconds(counter("lost_ns")),
            counter("events_lost"),
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

/// `db.folded`, microseconds of query time: client-side queries under the code path that
/// issued them (`comm;frames…;[db] FINGERPRINT`), server-side ones under their server
/// (`server;[db postgres-usdt] FINGERPRINT`).
pub fn db_folded(db: &crate::model::DbProfile) -> Vec<String> {
    let mut lines = folded(&db.stacks, |s| s.total_ns, 1000);
    let with_stacks: std::collections::HashSet<(u32, &str)> = db
        .stacks
        .iter()
        .filter_map(|s| Some((s.pid, s.frames.last()?.name.strip_prefix("[db] ")?)))
        .collect();
    lines.extend(
        db.queries
            .iter()
            .filter(|q| {
                q.total_ns >= 1000 && !with_stacks.contains(&(q.pid, q.fingerprint.as_str()))
            })
            .map(|q| {
                format!(
                    "{};[db {}] {} {}",
                    clean(if q.comm.is_empty() {
                        "postgres"
                    } else {
                        &q.comm
                    }),
                    q.source,
                    clean(&q.fingerprint),
                    q.total_ns / 1000
                )
            }),
    );
    lines
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
         lost {}, in-flight map full {}, unreadable text {}; not in the -p filter {}",
        db.queries.len(),
        counter("db_abandoned"),
        counter("db_events_lost"),
        counter("db_pending_map_full"),
        counter("db_text_unreadable"),
        counter("db_filtered_out"),
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, kind: FrameKind) -> Frame {
        Frame {
            name: name.into(),
            kind,
            module: None,
            offset: None,
            inlined: false,
            unresolved: false,
        }
    }

    fn stack(tid: u32, ns: u64) -> Stack {
        Stack {
            pid: 1,
            tid,
            comm: "app".into(),
            state: "sleep".into(),
            frames: vec![
                frame("main", FrameKind::User),
                frame("wait;here", FrameKind::User),
                frame("schedule", FrameKind::Kernel),
            ],
            total_ns: ns,
            count: 1,
            intervals: vec![ns],
        }
    }

    #[test]
    fn folded_merges_threads_and_marks_kernel_frames() {
        let lines = folded(
            &[stack(1, 1_000_000), stack(2, 499), stack(3, 2_000_000)],
            |s| s.total_ns,
            1000,
        );
        assert_eq!(
            lines,
            vec!["app;main;wait:here;schedule_[k] 3000".to_string()]
        );
    }

    #[test]
    fn renders_an_svg_with_title_and_units() {
        let dir = std::env::temp_dir().join(format!("profiler-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        flamegraph_svg(&["app;main;sleep_[k] 30".to_string()], &OFFCPU_STYLE, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("Off-CPU time"));
        assert!(svg.contains("main"));
        assert!(svg.contains("30 us"));
        flamegraph_svg(&[], &OFFCPU_STYLE, &path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
