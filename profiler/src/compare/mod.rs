//! Regression verdicts between two profiles (`profiler diff`).
//!
//! Both sides are reduced to entities — whole stacks, and functions (inclusive and self) —
//! each with a rate (off-CPU microseconds per second of capture) and, for captures, the rate in
//! every interval. An entity regressed when all of these hold:
//! - relative growth ≥ `relative` (default 10%) and absolute growth ≥ `min_abs` (default
//!   1000 us/s, i.e. 1 ms of waiting per second);
//! - captures only: a one-sided Welch's t-test on the per-interval rates, with Holm's
//!   correction over every entity large enough to matter (max of the two rates ≥ `min_abs`),
//!   gives an adjusted p below `alpha` (default 0.01): the chance that a diff of two runs of
//!   the same code reports any regression is then at most `alpha`, however many stacks and
//!   functions the profiles hold (as far as interval rates behave like independent samples).
//!
//! Folded files carry no intervals: their entities are judged by the thresholds alone, and the
//! report says so.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};
use serde::Serialize;

pub mod folded;
mod profile;
pub mod report;
pub mod stats;

pub use profile::{InputKind, Profile};
use stats::{holm, welch_greater, welch_greater_summary};

#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Minimum relative growth (0.10 = 10%).
    pub relative: f64,
    /// Minimum absolute growth, in the profile's unit (us/s for captures); `None`: 1000 us/s
    /// for captures, 1% of the base total for folded files.
    pub min_abs: Option<f64>,
    /// Family-wise false-positive rate.
    pub alpha: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            relative: 0.10,
            min_abs: None,
            alpha: 0.01,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum EntityKind {
    Function,
    Stack,
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub kind: EntityKind,
    pub name: String,
    /// Kernel function (for functions; stacks: false).
    pub kernel: bool,
    pub base: f64,
    pub new: f64,
    pub delta: f64,
    /// `delta / base`; infinite when new.
    #[serde(serialize_with = "finite_or_null")]
    pub relative: f64,
    #[serde(skip)]
    depth: usize,
    /// Self time (the frame is the leaf), functions only.
    pub base_self: f64,
    pub new_self: f64,
    /// Holm-adjusted one-sided p-value for the direction of the change (captures).
    pub p_adjusted: Option<f64>,
    pub significant: bool,
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// A query's mean latency in both captures.
#[derive(Debug, Clone, Serialize)]
pub struct QueryChange {
    pub source: String,
    pub comm: String,
    pub fingerprint: String,
    pub base_calls: u64,
    pub new_calls: u64,
    pub base_mean_ms: f64,
    pub new_mean_ms: f64,
    pub relative: f64,
    /// Holm-adjusted one-sided Welch p-value over the queries tested.
    pub p_adjusted: f64,
}

/// Queries' mean latency must also grow by at least this much to count (0.05 ms).
pub const QUERY_MIN_ABS_NS: f64 = 50_000.0;

/// Per-query verdicts: one-sided Welch's t-test on the call latencies (mean, standard
/// deviation, calls of each side), Holm over the queries in both captures, plus the relative
/// threshold and `QUERY_MIN_ABS_NS`.
fn compare_queries(
    base: &Profile,
    new: &Profile,
    thresholds: &Thresholds,
) -> (Vec<QueryChange>, Vec<QueryChange>, usize) {
    let mut tested = Vec::new();
    for (key, b) in &base.queries {
        let Some(n) = new.queries.get(key) else {
            continue;
        };
        if b.0 < 2.0 || n.0 < 2.0 {
            continue;
        }
        let up = welch_greater_summary((b.1, b.2 * b.2, b.0), (n.1, n.2 * n.2, n.0)).unwrap_or(1.0);
        let down =
            welch_greater_summary((n.1, n.2 * n.2, n.0), (b.1, b.2 * b.2, b.0)).unwrap_or(1.0);
        tested.push((key.clone(), *b, *n, up, down));
    }
    let adj_up = holm(&tested.iter().map(|t| t.3).collect::<Vec<_>>());
    let adj_down = holm(&tested.iter().map(|t| t.4).collect::<Vec<_>>());
    let (mut regressions, mut improvements) = (Vec::new(), Vec::new());
    for (i, (key, b, n, _, _)) in tested.iter().enumerate() {
        let delta = n.1 - b.1;
        let relative = if b.1 > 0.0 {
            delta / b.1
        } else {
            f64::INFINITY
        };
        let mut parts = key.splitn(3, ';');
        let mut change = QueryChange {
            source: parts.next().unwrap_or_default().to_string(),
            comm: parts.next().unwrap_or_default().to_string(),
            fingerprint: parts.next().unwrap_or_default().to_string(),
            base_calls: b.0 as u64,
            new_calls: n.0 as u64,
            base_mean_ms: b.1 / 1e6,
            new_mean_ms: n.1 / 1e6,
            relative,
            p_adjusted: 1.0,
        };
        if delta >= QUERY_MIN_ABS_NS
            && relative >= thresholds.relative
            && adj_up[i] < thresholds.alpha
        {
            change.p_adjusted = adj_up[i];
            regressions.push(change);
        } else if -delta >= QUERY_MIN_ABS_NS
            && -relative >= thresholds.relative
            && adj_down[i] < thresholds.alpha
        {
            change.p_adjusted = adj_down[i];
            improvements.push(change);
        }
    }
    regressions.sort_by(|a, b| b.relative.total_cmp(&a.relative));
    improvements.sort_by(|a, b| a.relative.total_cmp(&b.relative));
    (regressions, improvements, tested.len())
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub base: String,
    pub new: String,
    pub kind: InputKind,
    pub unit: String,
    pub method: String,
    pub relative_threshold: f64,
    pub absolute_threshold: f64,
    pub alpha: f64,
    pub base_total: f64,
    pub new_total: f64,
    pub regression: bool,
    /// Significant regressions: functions first (user code, then kernel), then stacks;
    /// each group ranked by relative growth.
    pub regressions: Vec<Change>,
    pub improvements: Vec<Change>,
    /// Entities that changed past the thresholds but not significantly.
    pub not_significant: usize,
    pub entities_tested: usize,
    /// Queries whose mean latency grew significantly (captures with the db family).
    pub query_regressions: Vec<QueryChange>,
    pub query_improvements: Vec<QueryChange>,
    pub queries_tested: usize,
    pub base_stacks: BTreeMap<String, f64>,
    pub new_stacks: BTreeMap<String, f64>,
    pub warnings: Vec<String>,
}

/// Per-entity data gathered from one profile.
#[derive(Default, Clone)]
struct Sides {
    /// Deepest position of the entity in any stack (0 = root): breaks ties in favour of the
    /// most specific function (`main` and `lock` grow alike when `lock` grew).
    depth: usize,
    total: [f64; 2],
    self_total: [f64; 2],
    intervals: [Vec<f64>; 2],
}

pub fn compare(base: &Profile, new: &Profile, thresholds: &Thresholds) -> Result<Report> {
    if base.kind != new.kind {
        bail!(
            "cannot compare a {:?} input ({}) with a {:?} input ({}): give two captures or two \
             folded files",
            base.kind,
            base.source,
            new.kind,
            new.source
        );
    }
    let mut entities: BTreeMap<(EntityKind, String), Sides> = BTreeMap::new();
    for (side, profile) in [base, new].into_iter().enumerate() {
        let n = profile.interval_s.len();
        for (path, (total, intervals)) in &profile.stacks {
            let frames: Vec<&str> = path.split(';').collect();
            let mut add = |kind: EntityKind, name: &str, is_self: bool| {
                let entry = entities.entry((kind, name.to_string())).or_default();
                if let Some(at) = frames.iter().rposition(|f| *f == name) {
                    entry.depth = entry.depth.max(at);
                }
                if entry.intervals[side].len() != n {
                    entry.intervals[side] = vec![0.0; n];
                }
                if is_self {
                    entry.self_total[side] += total;
                    return;
                }
                entry.total[side] += total;
                for (slot, v) in entry.intervals[side].iter_mut().zip(intervals) {
                    *slot += v;
                }
            };
            add(EntityKind::Stack, path, false);
            // Functions: every frame but the root (process name) and placeholders such as
            // `[user stack none]`, counted once per stack.
            let unique: BTreeSet<&str> = frames
                .iter()
                .skip(1)
                .copied()
                .filter(|f| !f.starts_with('['))
                .collect();
            for name in unique {
                add(EntityKind::Function, name, false);
            }
            if frames.len() > 1 && !frames[frames.len() - 1].starts_with('[') {
                add(EntityKind::Function, frames[frames.len() - 1], true);
            }
        }
    }

    let base_total = base.rate(base.stacks.values().map(|(t, _)| t).sum());
    let new_total = new.rate(new.stacks.values().map(|(t, _)| t).sum());
    let min_abs = thresholds.min_abs.unwrap_or(match base.kind {
        InputKind::Capture => 1000.0,
        InputKind::Folded => 0.01 * base_total.max(1.0),
    });
    let mut warnings = Vec::new();
    let statistics = base.kind == InputKind::Capture;
    if statistics && (base.interval_s.len() < 2 || new.interval_s.len() < 2) {
        warnings.push(
            "a capture has fewer than 2 intervals: no significance test is possible, so nothing \
             can be flagged; record longer or with a shorter --interval"
                .to_string(),
        );
    }
    if let (Some(b), Some(n)) = (base.duration_s, new.duration_s)
        && (b / n > 2.0 || n / b > 2.0)
    {
        warnings.push(format!(
            "capture lengths differ a lot ({b:.1} s vs {n:.1} s); rates are per second, but \
             the shorter one has fewer intervals"
        ));
    }

    let mut changes: Vec<Change> = Vec::new();
    let mut p_regress = Vec::new();
    let mut p_improve = Vec::new();
    for ((kind, name), sides) in &entities {
        let b = base.rate(sides.total[0]);
        let n = new.rate(sides.total[1]);
        if b.max(n) < min_abs {
            continue; // too small to matter, and not tested (keeps Holm's family small)
        }
        let delta = n - b;
        let relative = if b > 0.0 { delta / b } else { f64::INFINITY };
        let (p_up, p_down) = if statistics {
            let rb = base.interval_rates(&sides.intervals[0]);
            let rn = new.interval_rates(&sides.intervals[1]);
            (welch_greater(&rb, &rn), welch_greater(&rn, &rb))
        } else {
            (None, None)
        };
        p_regress.push(p_up.unwrap_or(1.0));
        p_improve.push(p_down.unwrap_or(1.0));
        changes.push(Change {
            kind: *kind,
            kernel: *kind == EntityKind::Function && name.ends_with("_[k]"),
            name: name.clone(),
            base: b,
            new: n,
            delta,
            relative,
            depth: sides.depth,
            base_self: base.rate(sides.self_total[0]),
            new_self: new.rate(sides.self_total[1]),
            p_adjusted: if statistics { Some(1.0) } else { None },
            significant: false,
        });
    }
    let entities_tested = changes.len();
    let adj_regress = holm(&p_regress);
    let adj_improve = holm(&p_improve);
    let mut regressions = Vec::new();
    let mut improvements = Vec::new();
    let mut not_significant = 0;
    for (i, mut change) in changes.into_iter().enumerate() {
        let grew = change.delta >= min_abs && change.relative >= thresholds.relative;
        let shrank = -change.delta >= min_abs && -change.relative >= thresholds.relative;
        if !grew && !shrank {
            continue;
        }
        let p = if grew { adj_regress[i] } else { adj_improve[i] };
        if statistics {
            change.p_adjusted = Some(p);
            change.significant = p < thresholds.alpha;
        } else {
            change.significant = true;
        }
        if !change.significant {
            not_significant += 1;
            continue;
        }
        if grew {
            regressions.push(change);
        } else {
            improvements.push(change);
        }
    }
    // Changes equal to a part per million rank as ties (sums over stacks in another order).
    let coarse = |x: f64| {
        if x.is_finite() {
            (x.abs() * 1e6).round()
        } else {
            f64::INFINITY
        }
    };
    let rank = |a: &Change, b: &Change| {
        (a.kind, a.kernel)
            .cmp(&(b.kind, b.kernel))
            .then(coarse(b.relative).total_cmp(&coarse(a.relative)))
            .then(coarse(b.delta / 1e6).total_cmp(&coarse(a.delta / 1e6)))
            .then(b.depth.cmp(&a.depth))
    };
    regressions.sort_by(rank);
    improvements.sort_by(rank);
    let (query_regressions, query_improvements, queries_tested) =
        compare_queries(base, new, thresholds);

    let method = if statistics {
        format!(
            "one-sided Welch's t-test on per-interval rates, Holm-corrected over {entities_tested} \
             stacks and functions (family-wise false-positive rate {}), and growth of at least \
             {:.0}% and {min_abs:.0} {}",
            thresholds.alpha,
            thresholds.relative * 100.0,
            base.unit()
        )
    } else {
        format!(
            "folded inputs have no per-interval values: thresholds only (growth of at least \
             {:.0}% and {min_abs:.1} {}), no significance test",
            thresholds.relative * 100.0,
            base.unit()
        )
    };
    Ok(Report {
        base: base.source.clone(),
        new: new.source.clone(),
        kind: base.kind,
        unit: base.unit().to_string(),
        method,
        relative_threshold: thresholds.relative,
        absolute_threshold: min_abs,
        alpha: thresholds.alpha,
        base_total,
        new_total,
        regression: !regressions.is_empty() || !query_regressions.is_empty(),
        regressions,
        improvements,
        not_significant,
        entities_tested,
        query_regressions,
        query_improvements,
        queries_tested,
        base_stacks: base
            .stacks
            .iter()
            .map(|(p, (t, _))| (p.clone(), base.rate(*t)))
            .collect(),
        new_stacks: new
            .stacks
            .iter()
            .map(|(p, (t, _))| (p.clone(), new.rate(*t)))
            .collect(),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(stacks: &[(&str, &[f64])]) -> Profile {
        let n = stacks.first().map(|s| s.1.len()).unwrap_or(0);
        Profile {
            source: "t".into(),
            kind: InputKind::Capture,
            duration_s: Some(n as f64),
            interval_s: vec![1.0; n],
            stacks: stacks
                .iter()
                .map(|(p, v)| (p.to_string(), (v.iter().sum(), v.to_vec())))
                .collect(),
            queries: BTreeMap::new(),
        }
    }

    #[test]
    fn a_slower_query_is_flagged_and_noise_is_not() {
        let mut base = profile(&[]);
        let mut same = profile(&[]);
        let mut slow = profile(&[]);
        let key = "libpq;app;SELECT * FROM t WHERE id = ?".to_string();
        // 1000 calls of 1.00 ms ± 0.2 ms; the same again (0.99 ms); 1.50 ms.
        base.queries.insert(key.clone(), (1000.0, 1.0e6, 0.2e6));
        same.queries.insert(key.clone(), (1000.0, 0.99e6, 0.2e6));
        slow.queries.insert(key.clone(), (1000.0, 1.5e6, 0.2e6));
        let t = Thresholds::default();
        let report = compare(&base, &same, &t).unwrap();
        assert!(!report.regression && report.query_regressions.is_empty());
        assert_eq!(report.queries_tested, 1);
        let report = compare(&base, &slow, &t).unwrap();
        assert!(report.regression);
        let change = &report.query_regressions[0];
        assert_eq!(change.fingerprint, "SELECT * FROM t WHERE id = ?");
        assert!((change.relative - 0.5).abs() < 1e-9);
        let report = compare(&slow, &base, &t).unwrap();
        assert!(!report.regression && report.query_improvements.len() == 1);
        // Too small to matter: +20 us on 20 us.
        let mut fast = profile(&[]);
        let mut fast2 = profile(&[]);
        fast.queries.insert(key.clone(), (1000.0, 20e3, 1e3));
        fast2.queries.insert(key, (1000.0, 40e3, 1e3));
        assert!(!compare(&fast, &fast2, &t).unwrap().regression);
    }

    const NOISE: [f64; 10] = [
        0.0, 300.0, -200.0, 100.0, -100.0, 250.0, -300.0, 50.0, -50.0, 0.0,
    ];

    fn series(level: f64) -> Vec<f64> {
        NOISE.iter().map(|n| level + n).collect()
    }

    #[test]
    fn a_grown_function_is_flagged_and_named_first() {
        let base = profile(&[
            ("app;main;handle;query;read_[k]", &series(100_000.0)),
            ("app;main;handle;render;read_[k]", &series(50_000.0)),
        ]);
        let new = profile(&[
            ("app;main;handle;query;read_[k]", &series(150_000.0)),
            ("app;main;handle;render;read_[k]", &series(50_000.0)),
        ]);
        let report = compare(&base, &new, &Thresholds::default()).unwrap();
        assert!(report.regression);
        assert_eq!(report.regressions[0].name, "query");
        assert!(report.regressions.iter().all(|c| c.name != "render"));
        assert!(report.improvements.is_empty());
    }

    #[test]
    fn identical_profiles_are_not_flagged() {
        let base = profile(&[("app;main;wait_[k]", &series(100_000.0))]);
        let shifted: Vec<f64> = series(100_000.0).into_iter().rev().collect();
        let new = profile(&[("app;main;wait_[k]", &shifted)]);
        let report = compare(&base, &new, &Thresholds::default()).unwrap();
        assert!(!report.regression);
    }

    #[test]
    fn small_changes_stay_under_the_floors() {
        // +5% is significant statistically (no noise) but under the 10% threshold.
        let base = profile(&[("app;main;wait_[k]", &[100_000.0; 10])]);
        let new = profile(&[("app;main;wait_[k]", &[105_000.0; 10])]);
        assert!(
            !compare(&base, &new, &Thresholds::default())
                .unwrap()
                .regression
        );
        // +100% of something tiny (500 us/s) is under the absolute floor.
        let base = profile(&[("app;main;wait_[k]", &[500.0; 10])]);
        let new = profile(&[("app;main;wait_[k]", &[1000.0; 10])]);
        assert!(
            !compare(&base, &new, &Thresholds::default())
                .unwrap()
                .regression
        );
    }

    #[test]
    fn a_regression_spread_over_many_stacks_is_found_by_function() {
        // `lock` is reached from 20 call sites; each stack grows by 8% (under the 10%
        // threshold) and by 400 us/s (under the 1000 us/s floor), but `lock` as a whole grows
        // by 8 ms/s: only the function view can see it.
        let mut base_stacks = Vec::new();
        let mut new_stacks = Vec::new();
        for site in 0..20 {
            base_stacks.push((
                format!("app;main;caller{site};lock;futex_[k]"),
                series(5_000.0),
            ));
            new_stacks.push((
                format!("app;main;caller{site};lock;futex_[k]"),
                series(5_400.0),
            ));
        }
        let make = |stacks: &[(String, Vec<f64>)]| {
            let borrowed: Vec<(&str, &[f64])> = stacks
                .iter()
                .map(|(p, v)| (p.as_str(), v.as_slice()))
                .collect();
            profile(&borrowed)
        };
        let thresholds = Thresholds {
            relative: 0.05,
            ..Thresholds::default()
        };
        let report = compare(&make(&base_stacks), &make(&new_stacks), &thresholds).unwrap();
        assert!(report.regression);
        assert!(
            report
                .regressions
                .iter()
                .all(|c| c.kind == EntityKind::Function)
        );
        assert_eq!(report.regressions[0].name, "lock");
    }

    #[test]
    fn kinds_must_match() {
        let base = profile(&[("a;b", &[1.0, 2.0])]);
        let mut new = base.clone();
        new.kind = InputKind::Folded;
        assert!(compare(&base, &new, &Thresholds::default()).is_err());
    }
}
