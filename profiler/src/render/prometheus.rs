//! The daemon's Prometheus series that add up across windows: latency histograms (database
//! queries by fingerprint, syscalls, TCP connect and RTT) and counters (off-CPU seconds by
//! process, the kernel-side and symbolization counters). Cardinality is bounded: a family
//! keeps at most `SERIES_MAX` label sets and files the rest under `other`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::{Capture, FrameKind, Process};

pub const SERIES_MAX: usize = 50;

/// Histogram upper bounds: 2^k ns for these k (1 us … 17 s; a power of 4 apart).
const LE_LOG2: [u32; 13] = [10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34];

/// A Prometheus label value, escaped.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Where a process runs, as extra labels (`,container_id="…",systemd_unit="…"`), each only
/// where known (an empty label is no label to Prometheus).
pub fn placement_labels(process: &Process) -> String {
    let mut labels = String::new();
    if let Some(id) = &process.container_id {
        labels.push_str(&format!(",container_id=\"{}\"", label(id)));
    }
    if let Some(unit) = &process.systemd_unit {
        labels.push_str(&format!(",systemd_unit=\"{}\"", label(unit)));
    }
    labels
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations ≤ 2^LE_LOG2[i] ns.
    le: [u64; LE_LOG2.len()],
    count: u64,
    sum_ns: f64,
}

impl Histogram {
    /// Adds observations kept as log2 buckets: `buckets[b]` holds [2^(b-1), 2^b) ns.
    fn add_log2(&mut self, buckets: &[u64], sum_ns: f64) {
        for (b, n) in buckets.iter().enumerate() {
            for (i, k) in LE_LOG2.iter().enumerate() {
                if b as u32 <= *k {
                    self.le[i] += n;
                }
            }
            self.count += n;
        }
        self.sum_ns += sum_ns;
    }

    fn add_value(&mut self, ns: u64) {
        let bucket = (64 - ns.leading_zeros()) as usize;
        let mut buckets = vec![0; bucket + 1];
        buckets[bucket] = 1;
        self.add_log2(&buckets, ns as f64);
    }
}

/// One family of series keyed by their rendered labels (`a="x",b="y"`).
#[derive(Debug, Default, Clone)]
struct Family<T> {
    series: BTreeMap<String, T>,
}

impl<T: Default> Family<T> {
    /// The series for `labels`, or `other` once the family is full.
    fn entry(&mut self, labels: String, other: &str) -> &mut T {
        if !self.series.contains_key(&labels) && self.series.len() >= SERIES_MAX {
            return self.series.entry(other.to_string()).or_default();
        }
        self.series.entry(labels).or_default()
    }
}

/// Everything the daemon's windows add up to.
#[derive(Debug, Default, Clone)]
pub struct Cumulative {
    db: Family<Histogram>,
    syscalls: Family<Histogram>,
    tcp_connect: Family<Histogram>,
    tcp_rtt: Family<Histogram>,
    offcpu: Family<f64>,
    counters: Family<u64>,
}

impl Cumulative {
    pub fn add(&mut self, capture: &Capture) {
        // Where a process runs, as labels (only where known: a container, a systemd unit).
        let placement: std::collections::HashMap<u32, String> = capture
            .processes
            .iter()
            .map(|p| (p.pid, placement_labels(p)))
            .filter(|(_, labels)| !labels.is_empty())
            .collect();
        let placed = |pid: u32| placement.get(&pid).map_or("", String::as_str);
        for (name, value) in &capture.metadata.counters {
            *self
                .counters
                .entry(format!("name=\"{}\"", label(name)), "name=\"other\"") += value;
        }
        if let Some(offcpu) = &capture.offcpu {
            for stack in &offcpu.stacks {
                // Kernel threads (no user frames, not even a placeholder) are one series:
                // dozens of kworker/rcu/migration names would take the family's series
                // before the processes people came to see.
                let kernel_thread = !stack.frames.is_empty()
                    && stack.frames.iter().all(|f| f.kind == FrameKind::Kernel);
                let comm = if kernel_thread {
                    "[kernel threads]"
                } else {
                    &stack.comm
                };
                *self.offcpu.entry(
                    format!(
                        "comm=\"{}\",state=\"{}\"{}",
                        label(comm),
                        label(&stack.state),
                        placed(stack.pid)
                    ),
                    "comm=\"other\",state=\"other\"",
                ) += stack.total_ns as f64 / 1e9;
            }
        }
        if let Some(db) = &capture.db {
            for q in &db.queries {
                self.db
                    .entry(
                        format!(
                            "source=\"{}\",comm=\"{}\",query=\"{}\"{}",
                            label(&q.source),
                            label(&q.comm),
                            label(&q.fingerprint),
                            placed(q.pid)
                        ),
                        "source=\"other\",comm=\"other\",query=\"other\"",
                    )
                    .add_log2(&q.buckets, q.total_ns as f64);
            }
        }
        if let Some(syscalls) = &capture.syscalls {
            for s in &syscalls.stats {
                self.syscalls
                    .entry(
                        format!("syscall=\"{}\"", label(&s.name)),
                        "syscall=\"other\"",
                    )
                    .add_log2(&s.buckets, s.total_ns as f64);
            }
        }
        if let Some(tcp) = &capture.tcp {
            for e in tcp.endpoints.iter().filter(|e| e.role == "connect") {
                self.tcp_connect
                    .entry(
                        format!(
                            "comm=\"{}\",remote=\"{}\"{}",
                            label(&e.comm),
                            label(&format_endpoint(&e.remote, e.port)),
                            placed(e.pid)
                        ),
                        "comm=\"other\",remote=\"other\"",
                    )
                    .add_log2(&e.connect_buckets, e.connect_total_ns as f64);
            }
            for c in &tcp.connections {
                if c.failed {
                    continue;
                }
                self.tcp_rtt
                    .entry(
                        format!("comm=\"{}\",role=\"{}\"", label(&c.comm), label(&c.role)),
                        "comm=\"other\",role=\"other\"",
                    )
                    .add_value(c.srtt_us * 1000);
            }
        }
    }

    pub fn render(&self, out: &mut String) {
        counter_family(
            out,
            "profiler_offcpu_seconds_total",
            "Off-CPU seconds since the daemon started, by process name and state.",
            &self.offcpu,
        );
        counter_family(
            out,
            "profiler_kernel_counter_total",
            "Kernel-side and symbolization counters since the daemon started (events, \
             drops, full maps, lost stacks, unresolved frames).",
            &self.counters,
        );
        histogram_family(
            out,
            "profiler_db_query_duration_seconds",
            "Database query latency by source, process and fingerprint.",
            &self.db,
        );
        histogram_family(
            out,
            "profiler_syscall_duration_seconds",
            "Syscall latency by syscall.",
            &self.syscalls,
        );
        histogram_family(
            out,
            "profiler_tcp_connect_duration_seconds",
            "TCP connect latency by process and remote endpoint.",
            &self.tcp_connect,
        );
        histogram_family(
            out,
            "profiler_tcp_rtt_seconds",
            "Smoothed TCP round-trip time at close, by process and role.",
            &self.tcp_rtt,
        );
    }
}

fn format_endpoint(remote: &str, port: u16) -> String {
    if remote.contains(':') {
        format!("[{remote}]:{port}")
    } else {
        format!("{remote}:{port}")
    }
}

fn counter_family<T: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    family: &Family<T>,
) {
    if family.series.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (labels, value) in &family.series {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

fn histogram_family(out: &mut String, name: &str, help: &str, family: &Family<Histogram>) {
    if family.series.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (labels, h) in &family.series {
        for (i, k) in LE_LOG2.iter().enumerate() {
            let le = (1u64 << k) as f64 / 1e9;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {}", h.le[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_ns / 1e9);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_buckets_become_cumulative_le_counts() {
        let mut h = Histogram::default();
        // 3 calls in [512, 1024) ns, 2 in [2^19, 2^20) ns, 1 in [2^39, 2^40) ns.
        let mut buckets = vec![0; 41];
        buckets[10] = 3;
        buckets[20] = 2;
        buckets[40] = 1;
        h.add_log2(&buckets, 100.0);
        assert_eq!(h.le[0], 3); // ≤ 1024 ns
        assert_eq!(h.le[4], 3); // ≤ 2^18 ns
        assert_eq!(h.le[5], 5); // ≤ 2^20 ns
        assert_eq!(h.le[12], 5); // ≤ 2^34 ns: the 2^39 one is only in +Inf
        assert_eq!(h.count, 6);
        h.add_value(1000);
        assert_eq!((h.le[0], h.count), (4, 7));
    }

    #[test]
    fn a_process_in_a_container_or_unit_carries_them_as_labels() {
        let id = "3f1e7a0b9c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7";
        let mut capture = crate::model::tests::sample();
        capture.processes = vec![crate::model::Process {
            pid: 7,
            comm: "app".into(),
            exe: None,
            exited: false,
            cgroup: Some(format!("/system.slice/docker-{id}.scope")),
            container_id: Some(id.into()),
            systemd_unit: Some(format!("docker-{id}.scope")),
        }];
        let mut cumulative = Cumulative::default();
        cumulative.add(&capture);
        let mut text = String::new();
        cumulative.render(&mut text);
        let series = format!(
            "{{comm=\"app\",state=\"sleep\",container_id=\"{id}\",systemd_unit=\"docker-{id}.scope\"}}"
        );
        assert!(text.contains(&series), "{text}");
        // A process placed nowhere keeps the plain labels.
        capture.processes.clear();
        let mut cumulative = Cumulative::default();
        cumulative.add(&capture);
        let mut text = String::new();
        cumulative.render(&mut text);
        assert!(text.contains("{comm=\"app\",state=\"sleep\"}"), "{text}");
    }

    #[test]
    fn families_are_bounded() {
        let mut family: Family<u64> = Family::default();
        for i in 0..(SERIES_MAX + 20) {
            *family.entry(format!("q=\"{i}\""), "q=\"other\"") += 1;
        }
        assert_eq!(family.series.len(), SERIES_MAX + 1);
        assert_eq!(family.series["q=\"other\""], 20);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
