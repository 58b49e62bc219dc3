//! The live status line of `record` on a terminal, and the one-line description of what is
//! being recorded.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use profiler_common::offcpu::OffcpuKey;
use profiler_common::oncpu::OncpuKey;

use crate::collect::series::Series;
use crate::probes::{ProbeConfig, Probes};

pub(crate) fn families_description(probes: &Probes) -> String {
    let mut parts = Vec::new();
    if let Some(how) = probes.offcpu_attached_with {
        parts.push(format!("off-CPU time ({how})"));
    }
    if let Some(frequency) = probes.oncpu_frequency {
        parts.push(format!("on-CPU samples ({frequency} Hz)"));
    }
    if let Some(how) = probes.syscalls_attached_with {
        parts.push(format!("syscall latency ({how})"));
    }
    if probes.tcp {
        parts.push("TCP connections".to_string());
    }
    if !probes.db_targets.is_empty() {
        parts.push(format!(
            "database queries ({})",
            probes
                .db_targets
                .iter()
                .map(|p| crate::probes::db::describe(p))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    match parts.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => parts.join(""),
    }
}

pub(crate) fn target_description(config: &ProbeConfig) -> String {
    let ids = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let tasks = match (config.pids.is_empty(), config.tids.is_empty()) {
        (true, true) => "the whole host".to_string(),
        (false, true) => format!("pid {}", ids(&config.pids)),
        (true, false) => format!("tid {}", ids(&config.tids)),
        (false, false) => format!("pid {} tid {}", ids(&config.pids), ids(&config.tids)),
    };
    if config.cgroups.is_empty() {
        return tasks;
    }
    let cgroups: Vec<&str> = config.cgroups.iter().map(|c| c.path.as_str()).collect();
    let cgroups = format!("cgroup {}", cgroups.join(","));
    if config.pids.is_empty() && config.tids.is_empty() {
        cgroups
    } else {
        format!("{tasks} in {cgroups}")
    }
}

pub(crate) struct Progress {
    duration: Duration,
    tty: bool,
    quiet: bool,
}

impl Progress {
    pub(crate) fn new(duration: Duration, quiet: bool) -> Self {
        Self {
            duration,
            tty: std::io::stderr().is_terminal() && !quiet,
            quiet,
        }
    }

    pub(crate) fn update(
        &self,
        elapsed: Duration,
        offcpu: &Series<OffcpuKey>,
        oncpu: &Series<OncpuKey>,
        processes: usize,
        probes: &Probes,
    ) {
        let secs = elapsed.as_secs();
        if self.quiet || (!self.tty && !secs.is_multiple_of(5)) {
            return;
        }
        let is_loss = |n: &str| matches!(n, "stack_collisions" | "agg_map_full" | "start_map_full");
        let mut lost = 0;
        // Only the families that are attached: the others' maps hold nothing.
        let offcpu_counters = probes
            .offcpu_attached_with
            .map(|_| probes.offcpu_counters());
        let oncpu_counters = probes.oncpu_frequency.map(|_| probes.oncpu_counters());
        for counters in [offcpu_counters, oncpu_counters]
            .into_iter()
            .flatten()
            .flatten()
        {
            lost += counters
                .iter()
                .filter(|(n, _)| is_loss(n))
                .map(|(_, v)| v)
                .sum::<u64>();
        }
        let line = format!(
            "recording: {secs}/{} s, {} blocks, {} samples, {} stacks, {} processes, {lost} lost",
            self.duration.as_secs(),
            offcpu.events,
            oncpu.events,
            offcpu.latest.len() + oncpu.latest.len(),
            processes,
        );
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    pub(crate) fn interrupted(&self) {
        if self.tty {
            eprintln!();
        }
        eprintln!("interrupted: writing what was captured");
    }

    pub(crate) fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
