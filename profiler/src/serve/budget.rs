//! The CPU budget: what the daemon costs (its own CPU and its eBPF run time per window) and
//! the mode that keeps it under `--max-cpu`: full, sampled events, then skipped windows.

/// What the daemon costs and the mode its CPU budget put it in.
#[derive(Debug, Default, Clone)]
pub(crate) struct Cost {
    /// 0: full mode; 1..=SAMPLE_LEVELS: one off-CPU block and one query in `2^level`, the
    /// on-CPU frequency divided as much; beyond: also one window in `2^(level - 6)`.
    pub(crate) level: u32,
    pub(crate) oncpu_hz: Option<u64>,
    pub(crate) budget: Option<f64>,
    /// The last window's cost as a fraction of one CPU: userspace, eBPF programs.
    pub(crate) userspace: f64,
    pub(crate) ebpf: f64,
    /// Totals since the start.
    pub(crate) userspace_ns: u64,
    pub(crate) ebpf_ns: u64,
    /// Wall time of the last cycle not covered by its window (loading, attaching).
    pub(crate) gap_s: f64,
    /// Even the sparsest sampling did not bring the cost under the budget.
    pub(crate) over_budget: bool,
    /// Windows still to skip in this duty period (levels past `SAMPLE_LEVELS`).
    pub(crate) skip_left: u32,
    /// This duty period so far: CPU, eBPF run time, wall time.
    period_cpu_ns: u64,
    period_ebpf_ns: u64,
    period_wall_s: f64,
}

/// Levels 1..=6 sample events (one in 2 … 64); past that every program still runs per event
/// (a uprobe trap, a context switch), so whole windows are skipped: one recorded in
/// 2^(level - 6), up to one in 64.
const SAMPLE_LEVELS: u32 = 6;
const MAX_LEVEL: u32 = 12;

impl Cost {
    pub(crate) fn with_budget(budget: Option<f64>) -> Cost {
        Cost {
            budget,
            ..Cost::default()
        }
    }

    /// Next level from the last duty period's cost: over the budget, up enough steps to
    /// halve the cost each (at most three at once); under a third of it, back as many steps
    /// as it could double (one to three).
    fn adjust(&mut self) {
        let Some(budget) = self.budget else {
            self.level = 0;
            return;
        };
        let cost = self.userspace + self.ebpf;
        if cost > budget {
            let steps = ((cost / budget).log2().ceil() as u32).clamp(1, 3);
            self.over_budget = self.level == MAX_LEVEL;
            self.level = (self.level + steps).min(MAX_LEVEL);
        } else {
            self.over_budget = false;
            if cost < budget / 3.0 && self.level > 0 {
                // Far under the budget, back faster (each step about doubles the cost).
                let steps = (((budget / cost.max(1e-9)).log2().floor() as u32).saturating_sub(1))
                    .clamp(1, 3);
                self.level = self.level.saturating_sub(steps);
            }
        }
    }

    /// One window recorded in this many.
    pub(crate) fn duty(&self) -> u32 {
        1 << self.level.saturating_sub(SAMPLE_LEVELS)
    }

    pub(crate) fn sample_every(&self) -> u32 {
        1 << self.level.min(SAMPLE_LEVELS)
    }

    /// Adds a cycle (a recorded or skipped window) to the duty period.
    pub(crate) fn account(&mut self, cpu_ns: u64, ebpf_ns: u64, wall_s: f64) {
        self.userspace_ns += cpu_ns;
        self.ebpf_ns += ebpf_ns;
        self.period_cpu_ns += cpu_ns;
        self.period_ebpf_ns += ebpf_ns;
        self.period_wall_s += wall_s;
    }

    /// The end of a duty period: its cost decides the next level.
    pub(crate) fn finish_period(&mut self) -> Option<String> {
        let wall = self.period_wall_s.max(1e-3);
        self.userspace = self.period_cpu_ns as f64 / 1e9 / wall;
        self.ebpf = self.period_ebpf_ns as f64 / 1e9 / wall;
        self.period_cpu_ns = 0;
        self.period_ebpf_ns = 0;
        self.period_wall_s = 0.0;
        let level = self.level;
        self.adjust();
        (self.level != level).then(|| {
            format!(
                "profiler daemon: cost {:.2} % of a CPU (budget {:.2} %): {}",
                (self.userspace + self.ebpf) * 100.0,
                self.budget.unwrap_or(0.0) * 100.0,
                self.mode_description()
            )
        })
    }

    fn mode_description(&self) -> String {
        match (self.sample_every(), self.duty()) {
            (1, _) => "full mode".to_string(),
            (every, 1) => format!("sampled mode, 1 in {every} events"),
            (every, duty) => format!("sampled mode, 1 in {every} events, 1 window in {duty}"),
        }
    }

    pub(crate) fn apply(&self, options: &mut crate::collect::RecordOptions) {
        let every = self.sample_every();
        options.probes.offcpu_sample_every = every;
        options.probes.db_sample_every = every;
        if let Some(oncpu) = options.probes.oncpu.as_mut() {
            oncpu.frequency = (oncpu.frequency >> self.level.min(SAMPLE_LEVELS)).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_samples_events_then_skips_windows_and_comes_back() {
        let mut cost = Cost {
            budget: Some(0.01),
            ..Cost::default()
        };
        // 30 % of a CPU against 1 %: three steps at a time.
        cost.account(300_000_000, 0, 1.0);
        cost.finish_period();
        assert_eq!((cost.sample_every(), cost.duty()), (8, 1));
        for _ in 0..3 {
            cost.account(300_000_000, 0, 1.0);
            cost.finish_period();
        }
        assert_eq!((cost.sample_every(), cost.duty()), (64, 64));
        cost.account(300_000_000, 0, 1.0);
        cost.finish_period();
        assert!(cost.over_budget);
        // Far under the budget: back three steps at a time, then one.
        cost.account(1_000, 0, 1.0);
        cost.finish_period();
        assert_eq!(cost.level, 9);
        cost.account(4_000_000, 0, 1.0); // 0.4 %: more than a third of the budget
        cost.finish_period();
        assert_eq!(cost.level, 9);
        cost.account(2_000_000, 1_000_000, 1.0); // 0.3 %: one step
        cost.finish_period();
        assert_eq!(cost.level, 8);
    }
}
