//! Regression events: each finished window compared with the windows before it (or with a
//! pinned baseline).
//!
//! Against the windows before it, two tests must agree. The diff engine compares the window
//! with the last `RECENT_WINDOWS` pooled (their intervals one after another, so the base's
//! spread includes how windows differ from one another); and each regression it finds must
//! also stand out of the previous windows' own values of that stack, function or query — above
//! all of them, and above their mean by more than a Student-t prediction bound at 0.01 on
//! their spread. Intervals within one window are not independent of the window's conditions
//! (host load, caches, a neighbour's build), so the first test alone cried wolf on a steady
//! host (3 events in 121 windows); the second asks "is this window unlike the recent ones",
//! which a steady workload's windows rarely are. An event makes that window the new normal:
//! later windows compare with it onward, so one change gives one event.
//!
//! A function that carries (nearly) all of its processes' time in both windows — `main`,
//! `__libc_start_call_main`, `PostmasterMain` — grows with anything beneath it and is never
//! named as the culprit; the event names what is beneath.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use crate::compare::{EntityKind, Profile, Report, Thresholds, compare};
use crate::model::Capture;

pub(crate) const EVENTS_KEPT: usize = 100;
/// Windows pooled as the baseline (and whose spread a regression must stand out of).
pub(crate) const RECENT_WINDOWS: usize = 8;
/// Fewer windows than this before the one judged: no event (no spread to judge against).
const MIN_RECENT_WINDOWS: usize = 3;
/// A function on at least this share of each of its processes' time, in both windows,
/// carries their stacks: never named.
const CARRIER_SHARE: f64 = 0.9;

/// What each window is compared with.
pub(crate) struct Baseline {
    pinned: Option<Profile>,
    recent: VecDeque<Window>,
    /// Folded paths shared by the recent windows (a whole host's window holds thousands of
    /// stacks of a kilobyte or two, and most recur from window to window).
    paths: std::collections::HashSet<Arc<str>>,
}

/// A recent window, kept small: its paths interned, its interval values in f32.
struct Window {
    duration_s: Option<f64>,
    interval_s: Vec<f64>,
    stacks: Vec<(Arc<str>, f64, Box<[f32]>)>,
    queries: std::collections::BTreeMap<String, (f64, f64, f64)>,
}

impl Window {
    fn rate(&self, total: f64) -> f64 {
        match self.duration_s {
            Some(d) if d > 0.0 => total / d,
            _ => total,
        }
    }
}

impl Baseline {
    pub(crate) fn new(pinned: Option<&Capture>) -> Self {
        Self {
            pinned: pinned.map(|c| Profile::from_capture(c, "baseline".into())),
            recent: VecDeque::new(),
            paths: Default::default(),
        }
    }

    fn keep(&mut self, profile: Profile) {
        let stacks = profile
            .stacks
            .into_iter()
            .map(|(path, (total, values))| {
                let path = match self.paths.get(path.as_str()) {
                    Some(shared) => Arc::clone(shared),
                    None => {
                        let shared: Arc<str> = path.into();
                        self.paths.insert(Arc::clone(&shared));
                        shared
                    }
                };
                (path, total, values.iter().map(|v| *v as f32).collect())
            })
            .collect();
        self.recent.push_back(Window {
            duration_s: profile.duration_s,
            interval_s: profile.interval_s,
            stacks,
            queries: profile.queries,
        });
        while self.recent.len() > RECENT_WINDOWS {
            self.recent.pop_front();
        }
        // Paths no window holds any more.
        self.paths.retain(|p| Arc::strong_count(p) > 1);
    }

    /// Judges a finished window; a regression becomes an event (and the window's directory
    /// gets the differential flamegraph and reports).
    pub(crate) fn judge(&mut self, window: &Capture, dir: &Path) -> Option<serde_json::Value> {
        let new = Profile::from_capture(window, dir.display().to_string());
        if let Some(pinned) = &self.pinned {
            let report = compare(pinned, &new, &Thresholds::default()).ok()?;
            return event(report, window, dir, |_| true);
        }
        let event = if self.recent.len() >= MIN_RECENT_WINDOWS {
            let pooled = pool(&self.recent);
            compare(&pooled, &new, &Thresholds::default())
                .ok()
                .and_then(|report| {
                    event(report, window, dir, |entity| {
                        stands_out_of_recent(&self.recent, &new, entity)
                    })
                })
        } else {
            None
        };
        if event.is_some() {
            // The new normal.
            self.recent.clear();
        }
        self.keep(new);
        event
    }
}

/// A regression the diff engine found, to be confirmed against the recent windows.
enum Entity<'a> {
    Stack(&'a str),
    Function(&'a str),
    Query(String),
}

/// The event for a report, keeping the regressions `confirmed` accepts; `None` when none is
/// left.
fn event(
    mut report: Report,
    window: &Capture,
    dir: &Path,
    confirmed: impl Fn(&Entity) -> bool,
) -> Option<serde_json::Value> {
    report.regressions.retain(|c| {
        confirmed(&match c.kind {
            EntityKind::Stack => Entity::Stack(&c.name),
            EntityKind::Function => Entity::Function(&c.name),
        })
    });
    report.query_regressions.retain(|q| {
        confirmed(&Entity::Query(query_key(
            &q.source,
            &q.comm,
            &q.fingerprint,
        )))
    });
    report.regression = !report.regressions.is_empty() || !report.query_regressions.is_empty();
    if !report.regression {
        return None;
    }
    let diff_dir = dir.join("diff");
    let _ = crate::compare::report::write_all(&report, &diff_dir, 10);
    let carriers =
        |name: &str| is_carrier(&report.base_stacks, name) && is_carrier(&report.new_stacks, name);
    let functions: Vec<String> = report
        .regressions
        .iter()
        .filter(|c| c.kind == EntityKind::Function && !carriers(&c.name))
        .map(|c| c.name.clone())
        .collect();
    // Whole stacks only when no function can be named.
    let stacks = report
        .regressions
        .iter()
        .filter(|c| c.kind == EntityKind::Stack && functions.is_empty())
        .map(|c| c.name.clone());
    let names: Vec<String> = functions
        .iter()
        .cloned()
        .chain(stacks)
        .take(5)
        .chain(
            report
                .query_regressions
                .iter()
                .take(5)
                .map(|q| q.fingerprint.clone()),
        )
        .collect();
    Some(serde_json::json!({
        "event": "regression",
        "window": dir.display().to_string(),
        "unix_ms": window.metadata.start_unix_ms,
        "regressions": names,
        "diff_svg": diff_dir.join("diff.svg").display().to_string(),
        "flamegraph_url": "/flamegraph?kind=diff",
    }))
}

fn query_key(source: &str, comm: &str, fingerprint: &str) -> String {
    format!("{source};{comm};{fingerprint}")
}

/// Whether `function` is on at least `CARRIER_SHARE` of the time of every process (root
/// frame) it appears in, among these stacks (folded path → rate).
fn is_carrier(stacks: &std::collections::BTreeMap<String, f64>, function: &str) -> bool {
    use std::collections::BTreeMap;
    // Process → (time under the function, all its time).
    let mut shares: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (path, rate) in stacks {
        let mut frames = path.split(';');
        let root = frames.next().unwrap_or_default();
        let entry = shares.entry(root).or_default();
        entry.1 += rate;
        if frames.any(|f| f == function) {
            entry.0 += rate;
        }
    }
    let mut seen = false;
    for (under, all) in shares.values() {
        if *under > 0.0 {
            seen = true;
            if *under < CARRIER_SHARE * all {
                return false;
            }
        }
    }
    seen
}

/// The windows one after another as one profile: intervals concatenated (a stack absent
/// from a window is zero there), queries pooled with the spread between windows' means.
fn pool(windows: &VecDeque<Window>) -> Profile {
    use std::collections::BTreeMap;
    let intervals: usize = windows.iter().map(|w| w.interval_s.len()).sum();
    let mut stacks: BTreeMap<String, (f64, Vec<f64>)> = BTreeMap::new();
    let mut queries: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    let mut offset = 0;
    for window in windows {
        for (path, total, values) in &window.stacks {
            let entry = stacks
                .entry(path.to_string())
                .or_insert_with(|| (0.0, vec![0.0; intervals]));
            entry.0 += total;
            for (slot, v) in entry.1[offset..].iter_mut().zip(values.iter()) {
                *slot = f64::from(*v);
            }
        }
        for (key, q) in &window.queries {
            queries.entry(key.clone()).or_default().push(*q);
        }
        offset += window.interval_s.len();
    }
    let queries = queries
        .into_iter()
        .map(|(key, parts)| {
            let n: f64 = parts.iter().map(|p| p.0).sum();
            let mean = parts.iter().map(|p| p.0 * p.1).sum::<f64>() / n;
            // Within each window, plus between the windows' means.
            let squares: f64 = parts
                .iter()
                .map(|(c, m, sd)| (c - 1.0).max(0.0) * sd * sd + c * (m - mean) * (m - mean))
                .sum();
            (key, (n, mean, (squares / (n - 1.0).max(1.0)).sqrt()))
        })
        .collect();
    Profile {
        source: format!("the previous {} windows", windows.len()),
        kind: crate::compare::InputKind::Capture,
        duration_s: Some(windows.iter().filter_map(|w| w.duration_s).sum()),
        interval_s: windows.iter().flat_map(|w| w.interval_s.clone()).collect(),
        stacks,
        queries,
    }
}

/// The entity's value in the new window: a stack's or function's rate (us/s), a query's
/// mean.
fn value_in_new(window: &Profile, entity: &Entity) -> f64 {
    match entity {
        Entity::Stack(path) => window.rate(window.stacks.get(*path).map_or(0.0, |s| s.0)),
        Entity::Function(name) => window.rate(
            window
                .stacks
                .iter()
                .filter(|(path, _)| path.split(';').skip(1).any(|f| f == *name))
                .map(|(_, s)| s.0)
                .sum(),
        ),
        Entity::Query(key) => window.queries.get(key).map_or(0.0, |q| q.1),
    }
}

/// The same in a recent window.
fn value_in(window: &Window, entity: &Entity) -> f64 {
    match entity {
        Entity::Stack(path) => window.rate(
            window
                .stacks
                .iter()
                .filter(|s| &*s.0 == *path)
                .map(|s| s.1)
                .sum(),
        ),
        Entity::Function(name) => window.rate(
            window
                .stacks
                .iter()
                .filter(|s| s.0.split(';').skip(1).any(|f| f == *name))
                .map(|s| s.1)
                .sum(),
        ),
        Entity::Query(key) => window.queries.get(key).map_or(0.0, |q| q.1),
    }
}

/// Whether the new window's value stands out of the recent windows' values: above all of
/// them, and above their mean by more than a one-sided 0.01 Student-t prediction bound.
fn stands_out_of_recent(recent: &VecDeque<Window>, new: &Profile, entity: &Entity) -> bool {
    let previous: Vec<f64> = recent
        .iter()
        // A query a window did not run says nothing about its latency.
        .filter(|w| !matches!(entity, Entity::Query(key) if !w.queries.contains_key(key)))
        .map(|w| value_in(w, entity))
        .collect();
    stands_out(&previous, value_in_new(new, entity))
}

/// One-sided 0.01 quantiles of Student's t, by degrees of freedom 2..=9.
const T_99: [f64; 8] = [6.965, 4.541, 3.747, 3.365, 3.143, 2.998, 2.896, 2.821];

fn stands_out(previous: &[f64], x: f64) -> bool {
    let k = previous.len();
    if k < MIN_RECENT_WINDOWS {
        return false;
    }
    let mean = previous.iter().sum::<f64>() / k as f64;
    let sd = (previous
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum::<f64>()
        / (k - 1) as f64)
        .sqrt();
    let t = T_99[(k - 1).clamp(2, 9) - 2];
    let max = previous.iter().copied().fold(f64::MIN, f64::max);
    x > max && x > mean + t * sd * (1.0 + 1.0 / k as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_stands_out_only_beyond_the_windows_own_spread() {
        let steady = [100.0, 104.0, 97.0, 101.0, 99.0];
        assert!(!stands_out(&steady, 105.0), "within the spread");
        assert!(
            !stands_out(&steady, 108.0),
            "above all, within the bound (110.8)"
        );
        assert!(stands_out(&steady, 112.0));
        assert!(stands_out(&steady, 130.0));
        assert!(!stands_out(&steady[..2], 1e9), "too few windows to judge");
        assert!(stands_out(&[0.0, 0.0, 0.0], 5.0), "a new wait");
    }

    #[test]
    fn a_root_frame_carrying_every_stack_is_a_carrier_and_a_leaf_is_not() {
        let stacks: std::collections::BTreeMap<String, f64> = [
            (
                "postgres;main;PostmasterMain;exec_simple_query;WaitLatch".to_string(),
                50.0,
            ),
            ("postgres;main;PostmasterMain;planner".to_string(), 45.0),
            ("postgres;[user stack none]".to_string(), 5.0),
            ("pgbench;main;threadRun;PQexec".to_string(), 70.0),
        ]
        .into_iter()
        .collect();
        assert!(is_carrier(&stacks, "main"));
        assert!(is_carrier(&stacks, "PostmasterMain"));
        assert!(!is_carrier(&stacks, "planner"));
        assert!(!is_carrier(&stacks, "WaitLatch"));
        assert!(is_carrier(&stacks, "threadRun"), "pgbench's every stack");
        assert!(!is_carrier(&stacks, "absent"));
    }

    fn profile(rates: &[(&str, &[f64])]) -> Profile {
        let n = rates.first().map_or(0, |r| r.1.len());
        Profile {
            source: "test".into(),
            kind: crate::compare::InputKind::Capture,
            duration_s: Some(n as f64),
            interval_s: vec![1.0; n],
            stacks: rates
                .iter()
                .map(|(path, values)| (path.to_string(), (values.iter().sum(), values.to_vec())))
                .collect(),
            queries: Default::default(),
        }
    }

    #[test]
    fn windows_are_pooled_interval_after_interval() {
        let mut baseline = Baseline::new(None);
        baseline.keep(profile(&[("a;f", &[1.0, 2.0]), ("a;h", &[1.0, 1.0])]));
        baseline.keep(profile(&[("a;g", &[3.0, 4.0]), ("a;h", &[1.0, 1.0])]));
        assert_eq!(baseline.paths.len(), 3, "a;h shared");
        let windows = &baseline.recent;
        let pooled = pool(windows);
        assert_eq!(pooled.interval_s.len(), 4);
        assert_eq!(pooled.stacks["a;f"], (3.0, vec![1.0, 2.0, 0.0, 0.0]));
        assert_eq!(pooled.stacks["a;g"], (7.0, vec![0.0, 0.0, 3.0, 4.0]));
        assert_eq!(pooled.duration_s, Some(4.0));
        assert_eq!(value_in(&windows[0], &Entity::Function("f")), 1.5);
    }
}
