//! One side of a comparison: a capture (per-interval rates of every stack, query latency) or
//! a folded file (totals only), told apart by content.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::model::Capture;
use crate::render::folded_path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    Capture,
    Folded,
}

/// One side of a comparison.
#[derive(Debug, Clone)]
pub struct Profile {
    pub source: String,
    pub kind: InputKind,
    /// Capture length in seconds (captures only).
    pub duration_s: Option<f64>,
    /// Length of each interval in seconds (captures only).
    pub interval_s: Vec<f64>,
    /// Folded path → (total value, value in each interval).
    pub stacks: BTreeMap<String, (f64, Vec<f64>)>,
    /// Database queries (captures): `source;process name;fingerprint` → (calls, mean ns,
    /// standard deviation ns).
    pub queries: BTreeMap<String, (f64, f64, f64)>,
}

impl Profile {
    /// A capture directory or file, or a folded file (told apart by content).
    pub fn load(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let is_capture = path.is_dir()
            || std::fs::read(path)
                .with_context(|| format!("cannot read {source}"))?
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                == Some(&b'{');
        if is_capture {
            Ok(Self::from_capture(&Capture::load(path)?, source))
        } else {
            let stacks = super::folded::load(path)?
                .into_iter()
                .map(|(path, count)| (path, (count, Vec::new())))
                .collect();
            Ok(Self {
                source,
                kind: InputKind::Folded,
                duration_s: None,
                interval_s: Vec::new(),
                stacks,
                queries: BTreeMap::new(),
            })
        }
    }

    pub fn from_capture(capture: &Capture, source: String) -> Self {
        let ends = &capture.metadata.interval_ends_ns;
        let interval_s: Vec<f64> = ends
            .iter()
            .enumerate()
            .map(|(i, end)| (end - if i == 0 { 0 } else { ends[i - 1] }) as f64 / 1e9)
            .collect();
        let mut stacks: BTreeMap<String, (f64, Vec<f64>)> = BTreeMap::new();
        for stack in capture.offcpu.iter().flat_map(|o| &o.stacks) {
            let entry = stacks
                .entry(folded_path(stack))
                .or_insert_with(|| (0.0, vec![0.0; interval_s.len()]));
            entry.0 += stack.total_ns as f64 / 1e3;
            for (slot, value) in entry.1.iter_mut().zip(&stack.intervals) {
                *slot += *value as f64 / 1e3;
            }
        }
        let mut queries = BTreeMap::new();
        for q in capture.db.iter().flat_map(|d| &d.queries) {
            if q.calls == 0 {
                continue;
            }
            // Keyed by process name, not pid: pids differ between runs.
            let key = format!("{};{};{}", q.source, q.comm, q.fingerprint);
            let (calls, mean, sd) = (
                q.calls as f64,
                q.total_ns as f64 / q.calls as f64,
                q.stddev_ns,
            );
            // Two servers of one name: pool them (means weighted, variances pooled).
            let entry = queries.entry(key).or_insert((0.0, 0.0, 0.0));
            let n = entry.0 + calls;
            let pooled_mean = (entry.0 * entry.1 + calls * mean) / n;
            let pooled_var = ((entry.0 - 1.0).max(0.0) * entry.2 * entry.2
                + (calls - 1.0).max(0.0) * sd * sd)
                / (n - 1.0).max(1.0);
            *entry = (n, pooled_mean, pooled_var.sqrt());
        }
        Self {
            source,
            kind: InputKind::Capture,
            duration_s: Some(capture.metadata.duration_ns as f64 / 1e9),
            interval_s,
            stacks,
            queries,
        }
    }

    /// Value per second of capture (captures) or the value itself (folded).
    pub(crate) fn rate(&self, total: f64) -> f64 {
        match self.duration_s {
            Some(d) if d > 0.0 => total / d,
            _ => total,
        }
    }

    /// Per-interval rates of a per-interval series. Intervals shorter than half the typical
    /// one (the last, cut short by the end of the capture) are left out: a few milliseconds
    /// give a rate that is mostly noise.
    pub(crate) fn interval_rates(&self, values: &[f64]) -> Vec<f64> {
        let mut lengths = self.interval_s.clone();
        lengths.sort_by(|a, b| a.total_cmp(b));
        let typical = lengths.get(lengths.len() / 2).copied().unwrap_or(0.0);
        values
            .iter()
            .zip(&self.interval_s)
            .filter(|(_, len)| **len > 0.0 && **len >= typical / 2.0)
            .map(|(v, len)| v / len)
            .collect()
    }

    pub fn unit(&self) -> &'static str {
        match self.kind {
            InputKind::Capture => "us/s",
            InputKind::Folded => "samples",
        }
    }
}
