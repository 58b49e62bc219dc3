//! The daemon's `/metrics`: Prometheus text from the latest window, the cumulative series,
//! and the daemon's own cost.

use std::fmt::Write as _;

use super::State;
use super::budget::Cost;
use crate::render::prometheus::{label, placement_labels};

/// Prometheus text format from the latest window (bounded: the 50 largest series per family).
pub(crate) fn metrics(state: &State) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP profiler_windows_total Recording windows completed."
    );
    let _ = writeln!(out, "# TYPE profiler_windows_total counter");
    let _ = writeln!(out, "profiler_windows_total {}", state.windows_total);
    let _ = writeln!(
        out,
        "# HELP profiler_regressions_total Windows that regressed against the baseline."
    );
    let _ = writeln!(out, "# TYPE profiler_regressions_total counter");
    let _ = writeln!(
        out,
        "profiler_regressions_total {}",
        state.regressions_total
    );
    let _ = writeln!(
        out,
        "# HELP profiler_learning 1 while the first windows (--learn) only teach the host's \
         normal and raise no regression event."
    );
    let _ = writeln!(out, "# TYPE profiler_learning gauge");
    let _ = writeln!(out, "profiler_learning {}", u8::from(state.learning));
    family(
        &mut out,
        "profiler_window_errors_total",
        "counter",
        "Windows that could not run (said once on stderr).",
        &[("", state.window_errors_total as f64)],
    );
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
    {
        let _ = writeln!(
            out,
            "# HELP profiler_resident_bytes The daemon's resident memory."
        );
        let _ = writeln!(out, "# TYPE profiler_resident_bytes gauge");
        let _ = writeln!(out, "profiler_resident_bytes {}", rss * 1024);
    }
    export_metrics(&mut out, &state.export);
    cost_metrics(&mut out, &state.cost);
    state.cumulative.render(&mut out);
    let Some((_, capture)) = &state.latest else {
        return out;
    };
    let window_s = capture.metadata.duration_ns as f64 / 1e9;
    let _ = writeln!(
        out,
        "# HELP profiler_window_seconds Length of the latest window."
    );
    let _ = writeln!(out, "# TYPE profiler_window_seconds gauge");
    let _ = writeln!(out, "profiler_window_seconds {window_s}");
    let _ = writeln!(
        out,
        "# HELP profiler_counter Kernel-side and symbolization counters of the latest window \
         (drops, full maps, lost stacks, unresolved frames)."
    );
    let _ = writeln!(out, "# TYPE profiler_counter gauge");
    for (name, value) in &capture.metadata.counters {
        let _ = writeln!(out, "profiler_counter{{name=\"{}\"}} {value}", label(name));
    }
    let _ = writeln!(
        out,
        "# HELP profiler_map_fill_ratio How full the latest window left the eBPF maps (a full \
         map loses events; those are counted)."
    );
    let _ = writeln!(out, "# TYPE profiler_map_fill_ratio gauge");
    for map in ["offcpu", "oncpu", "stacks"] {
        let get = |what: &str| {
            capture
                .metadata
                .counters
                .get(&format!("map_{map}_{what}"))
                .copied()
        };
        if let (Some(entries), Some(capacity)) = (get("entries"), get("capacity")) {
            let _ = writeln!(
                out,
                "profiler_map_fill_ratio{{map=\"{map}\"}} {}",
                entries as f64 / capacity.max(1) as f64
            );
        }
    }
    // Where each process runs: its container and systemd unit, as labels where known.
    let placement = |pid: u32| -> String {
        capture
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .map(placement_labels)
            .unwrap_or_default()
    };
    if let Some(offcpu) = &capture.offcpu {
        let mut placements: std::collections::HashMap<u32, String> = Default::default();
        let mut by_process: std::collections::BTreeMap<(String, String, String), f64> =
            Default::default();
        for stack in &offcpu.stacks {
            let place = placements
                .entry(stack.pid)
                .or_insert_with(|| placement(stack.pid))
                .clone();
            *by_process
                .entry((stack.comm.clone(), stack.state.clone(), place))
                .or_default() += stack.total_ns as f64 / 1e9;
        }
        let mut rows: Vec<_> = by_process.into_iter().collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let _ = writeln!(
            out,
            "# HELP profiler_offcpu_seconds Off-CPU seconds in the latest window, by process \
             name and state (and container and systemd unit, where known)."
        );
        let _ = writeln!(out, "# TYPE profiler_offcpu_seconds gauge");
        for ((comm, state, place), seconds) in rows.into_iter().take(50) {
            let _ = writeln!(
                out,
                "profiler_offcpu_seconds{{comm=\"{}\",state=\"{}\"{place}}} {seconds}",
                label(&comm),
                label(&state)
            );
        }
    }
    if let Some(db) = &capture.db {
        let _ = writeln!(
            out,
            "# HELP profiler_db_query_seconds Database query latency in the latest window, by \
             fingerprint (the 50 busiest)."
        );
        let _ = writeln!(out, "# TYPE profiler_db_query_seconds summary");
        for q in db.queries.iter().take(50) {
            let labels = format!(
                "source=\"{}\",comm=\"{}\",query=\"{}\"{}",
                label(&q.source),
                label(&q.comm),
                label(&q.fingerprint),
                placement(q.pid)
            );
            for (quantile, ns) in [("0.5", q.p50_ns), ("0.95", q.p95_ns), ("0.99", q.p99_ns)] {
                let _ = writeln!(
                    out,
                    "profiler_db_query_seconds{{{labels},quantile=\"{quantile}\"}} {}",
                    ns as f64 / 1e9
                );
            }
            let _ = writeln!(
                out,
                "profiler_db_query_seconds_sum{{{labels}}} {}",
                q.total_ns as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "profiler_db_query_seconds_count{{{labels}}} {}",
                q.calls
            );
        }
    }
    out
}

/// One metric family in the Prometheus text format: HELP, TYPE, then its samples (`labels`
/// already rendered, braces included, or empty).
fn family(out: &mut String, name: &str, kind: &str, help: &str, rows: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in rows {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// What each exporter did: pushes taken, attempts failed, pushes dropped.
fn export_metrics(
    out: &mut String,
    exporters: &[(&str, std::sync::Arc<crate::export::ExportStats>)],
) {
    use std::sync::atomic::Ordering::Relaxed;
    if exporters.is_empty() {
        return;
    }
    type Counter = fn(&crate::export::ExportStats) -> &std::sync::atomic::AtomicU64;
    let counters: [(&str, &str, Counter); 4] = [
        (
            "profiler_export_pushes_total",
            "Windows the profile store took.",
            |s| &s.pushed,
        ),
        (
            "profiler_export_failed_attempts_total",
            "Push attempts that failed (each retry counts).",
            |s| &s.failed_attempts,
        ),
        (
            "profiler_export_dropped_total",
            "Windows not pushed: the queue was full, every attempt failed, the store refused, \
             or the daemon stopped first.",
            |s| &s.dropped,
        ),
        (
            "profiler_export_bytes_total",
            "Bytes of the requests the profile store took.",
            |s| &s.bytes,
        ),
    ];
    for (name, help, counter) in counters {
        let rows: Vec<(String, f64)> = exporters
            .iter()
            .map(|(exporter, stats)| {
                (
                    format!("{{exporter=\"{exporter}\"}}"),
                    counter(stats).load(Relaxed) as f64,
                )
            })
            .collect();
        let rows: Vec<(&str, f64)> = rows.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        family(out, name, "counter", help, &rows);
    }
    let rows: Vec<(String, f64)> = exporters
        .iter()
        .map(|(exporter, stats)| {
            (
                format!("{{exporter=\"{exporter}\"}}"),
                stats.encode_ns.load(Relaxed) as f64 / 1e9,
            )
        })
        .collect();
    let rows: Vec<(&str, f64)> = rows.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    family(
        out,
        "profiler_export_encode_seconds_total",
        "counter",
        "CPU time spent turning windows into request bodies.",
        &rows,
    );
}

/// The daemon's own cost and the mode its CPU budget chose.
fn cost_metrics(out: &mut String, cost: &Cost) {
    let mut gauge =
        |name: &str, help: &str, rows: &[(&str, f64)]| family(out, name, "gauge", help, rows);
    let sampled = cost.level > 0;
    gauge(
        "profiler_window_duty",
        "Sampled mode past 1 in 64 events: one window recorded in this many.",
        &[("", f64::from(cost.duty()))],
    );
    gauge(
        "profiler_mode",
        "1 for the mode the CPU budget chose: full (every event) or sampled.",
        &[
            ("{mode=\"full\"}", f64::from(u8::from(!sampled))),
            ("{mode=\"sampled\"}", f64::from(u8::from(sampled))),
        ],
    );
    let every = f64::from(cost.sample_every());
    gauge(
        "profiler_sample_every",
        "Sampled mode: one off-CPU block (database query) recorded in this many.",
        &[("{family=\"offcpu\"}", every), ("{family=\"db\"}", every)],
    );
    if let Some(hz) = cost.oncpu_hz {
        gauge(
            "profiler_oncpu_frequency_hz",
            "On-CPU samples per second per CPU (lowered in sampled mode).",
            &[("", hz as f64)],
        );
    }
    if let Some(budget) = cost.budget {
        gauge(
            "profiler_cpu_budget_ratio",
            "--max-cpu: the cost allowed, as a fraction of one CPU.",
            &[("", budget)],
        );
    }
    gauge(
        "profiler_cost_ratio",
        "The last window's cost as a fraction of one CPU: the daemon's CPU time (userspace) \
         and its eBPF programs' run time (ebpf).",
        &[
            ("{part=\"userspace\"}", cost.userspace),
            ("{part=\"ebpf\"}", cost.ebpf),
        ],
    );
    gauge(
        "profiler_over_budget",
        "1 when even the sparsest sampling (1 in 64 events, 1 window in 64) leaves the cost \
         over the budget.",
        &[("", f64::from(u8::from(cost.over_budget)))],
    );
    gauge(
        "profiler_window_gap_seconds",
        "Wall time of the last cycle that its window did not cover (loading, attaching).",
        &[("", cost.gap_s)],
    );
    family(
        out,
        "profiler_cpu_seconds_total",
        "counter",
        "CPU the profiler used since it started: its own (userspace) and its eBPF programs' \
         run time (ebpf).",
        &[
            ("{part=\"userspace\"}", cost.userspace_ns as f64 / 1e9),
            ("{part=\"ebpf\"}", cost.ebpf_ns as f64 / 1e9),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_without_a_window_still_say_how_many() {
        let text = metrics(&State::default());
        assert!(text.contains("profiler_windows_total 0"));
    }
}
