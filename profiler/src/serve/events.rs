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
//! A third test remembers further back: each stack's, function's and query's highest value in
//! the last `PEAK_WINDOWS` windows (kept through "new normal" resets). A regression must also
//! exceed that peak by the diff's relative threshold (10 %) — a query whose mean wanders
//! 104–183 µs from window to window on a noisy host is not slower at 190 µs than it has
//! been — so what a host does every few minutes — a PostgreSQL checkpoint's
//! throttled writes, a cron job, a periodic flush — is an event the first time it is seen,
//! not every time it comes back.
//!
//! And a regression must hold for two windows in a row: a window that regressed waits (it
//! is kept out of the recent windows meanwhile) and becomes an event only if the next one,
//! judged the same way, confirms the same stack, function or query — as an alert rule's
//! `for:` does. A blip of one window (a neighbour's burst, a latency spike of one query for
//! a few seconds) is not an event.
//!
//! Before any of that, the daemon learns: for its first `--learn` (10 minutes by default)
//! its windows only become history — recent windows and peaks — and raise no event, so the
//! first checkpoint, cron run or log rotation it ever sees is already known when judging
//! starts. (A pinned baseline is judged from the first window.)
//!
//! A function that carries (nearly) all of its processes' time in both windows — `main`,
//! `__libc_start_call_main`, `PostmasterMain` — grows with anything beneath it and is never
//! named as the culprit; the event names what is beneath.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use crate::compare::{EntityKind, Profile, Report, Thresholds, compare};
use crate::model::Capture;

pub(crate) const EVENTS_KEPT: usize = 100;
/// Windows pooled as the baseline (and whose spread a regression must stand out of).
pub(crate) const RECENT_WINDOWS: usize = 8;
/// Fewer windows than this before the one judged: no event (no spread to judge against).
const MIN_RECENT_WINDOWS: usize = 3;
/// How far back a value's peak is remembered, in windows (10 minutes of 10 s windows, an
/// hour of the default 60 s ones): periodic work within it is not news.
pub(crate) const PEAK_WINDOWS: u32 = 60;
/// How far above its peak a value must be: the diff's relative threshold.
const PEAK_MARGIN: f64 = 0.10;
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
    /// Each entity's peak in the last `PEAK_WINDOWS` windows, and how many windows ago; by a
    /// hash of the entity (a whole host's stacks are kilobytes each).
    peaks: std::collections::HashMap<u64, (f32, u32)>,
    /// A window that regressed, waiting for the next.
    pending: Option<Pending>,
    /// Seconds of windows still to learn from before any event.
    learn_left_s: f64,
    /// Windows learned from so far.
    learned: usize,
}

/// What a peak is kept under: a hash of the entity's kind and name.
fn peak_key(entity: &Entity) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    match entity {
        Entity::Stack(path) => (0u8, *path).hash(&mut hasher),
        Entity::Function(name) => (1u8, *name).hash(&mut hasher),
        Entity::Query(key) => (2u8, key.as_str()).hash(&mut hasher),
    }
    hasher.finish()
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
    /// Against `pinned` from the first window; else against the recent windows, after
    /// `learn` of windows.
    pub(crate) fn new(pinned: Option<&Capture>, learn: std::time::Duration) -> Self {
        Self {
            learn_left_s: if pinned.is_some() {
                0.0
            } else {
                learn.as_secs_f64()
            },
            pinned: pinned.map(|c| Profile::from_capture(c, "baseline".into())),
            recent: VecDeque::new(),
            paths: Default::default(),
            peaks: Default::default(),
            pending: None,
            learned: 0,
        }
    }

    /// Still learning: windows become history, no event.
    pub(crate) fn learning(&self) -> bool {
        self.learn_left_s > 0.0
    }

    /// Windows learned from (the ones judged while learning).
    pub(crate) fn learned(&self) -> usize {
        self.learned
    }

    /// Folds a judged window into the peaks: each entity's value raises its peak (and makes
    /// it fresh); a peak older than `PEAK_WINDOWS` is forgotten.
    fn remember_peaks(&mut self, window: &Profile) {
        for (_, age) in self.peaks.values_mut() {
            *age += 1;
        }
        self.peaks.retain(|_, (_, age)| *age <= PEAK_WINDOWS);
        let mut values: std::collections::HashMap<u64, f64> = Default::default();
        for (path, (total, _)) in &window.stacks {
            let rate = window.rate(*total);
            *values.entry(peak_key(&Entity::Stack(path))).or_default() += rate;
            // A function counts once per stack (recursion).
            let mut seen = std::collections::HashSet::new();
            for function in path.split(';').skip(1) {
                if seen.insert(function) {
                    *values
                        .entry(peak_key(&Entity::Function(function)))
                        .or_default() += rate;
                }
            }
        }
        for (key, q) in &window.queries {
            values.insert(peak_key(&Entity::Query(key.clone())), q.1);
        }
        for (key, value) in values {
            let value = value as f32;
            match self.peaks.get_mut(&key) {
                Some(peak) if peak.0 > value => {}
                Some(peak) => *peak = (value, 0),
                None => {
                    self.peaks.insert(key, (value, 0));
                }
            }
        }
    }

    /// Whether `entity`'s value in `new` exceeds its peak of the last `PEAK_WINDOWS` windows
    /// by `PEAK_MARGIN` (an entity never seen has none).
    fn above_peak(&self, new: &Profile, entity: &Entity) -> bool {
        match self.peaks.get(&peak_key(entity)) {
            Some((peak, _)) => value_in_new(new, entity) > f64::from(*peak) * (1.0 + PEAK_MARGIN),
            None => true,
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
        self.judge_profile(new, window.metadata.start_unix_ms, dir)
    }

    /// `judge` of the window's profile (`unix_ms`: when it started).
    fn judge_profile(
        &mut self,
        new: Profile,
        unix_ms: u64,
        dir: &Path,
    ) -> Option<serde_json::Value> {
        if let Some(pinned) = &self.pinned {
            let mut report = compare(pinned, &new, &Thresholds::default()).ok()?;
            confirm(&mut report, |_| true);
            return event(report, unix_ms, dir);
        }
        if self.learning() {
            self.learn_left_s -= new.duration_s.unwrap_or_default().max(0.0);
            self.learned += 1;
            self.settle(new);
            return None;
        }
        // Judged against the recent windows, without a pending one (a window that regressed
        // and waits for the next to say whether it was a blip).
        let candidates = if self.recent.len() >= MIN_RECENT_WINDOWS {
            let pooled = pool(&self.recent);
            compare(&pooled, &new, &Thresholds::default())
                .ok()
                .map(|mut report| {
                    let keys = confirm(&mut report, |entity| {
                        stands_out_of_recent(&self.recent, &new, entity)
                            && self.above_peak(&new, entity)
                    });
                    (report, keys)
                })
                .filter(|(_, keys)| !keys.is_empty())
        } else {
            None
        };
        let pending = self.pending.take();
        match (pending, candidates) {
            (Some(pending), Some((mut report, keys))) => {
                let repeated: HashSet<u64> = keys.intersection(&pending.keys).copied().collect();
                if repeated.is_empty() {
                    // The pending window was a blip; this one waits in its place.
                    self.settle(pending.profile);
                    self.pending = Some(Pending { profile: new, keys });
                    return None;
                }
                // Two windows in a row: an event, for what both confirmed.
                confirm(&mut report, |entity| repeated.contains(&peak_key(entity)));
                let event = event(report, unix_ms, dir);
                // The new normal.
                self.recent.clear();
                self.settle(pending.profile);
                self.settle(new);
                event
            }
            (Some(pending), None) => {
                self.settle(pending.profile);
                self.settle(new);
                None
            }
            (None, Some((_, keys))) => {
                self.pending = Some(Pending { profile: new, keys });
                None
            }
            (None, None) => {
                self.settle(new);
                None
            }
        }
    }

    /// A judged window becomes history: its peaks remembered, itself among the recent ones.
    fn settle(&mut self, window: Profile) {
        self.remember_peaks(&window);
        self.keep(window);
    }
}

/// A window whose regressions wait for the next window: an event only if it confirms them.
struct Pending {
    profile: Profile,
    keys: HashSet<u64>,
}

/// A regression the diff engine found, to be confirmed against the recent windows.
enum Entity<'a> {
    Stack(&'a str),
    Function(&'a str),
    Query(String),
}

/// Keeps the regressions of `report` that `confirmed` accepts; the peak keys of those kept.
fn confirm(report: &mut Report, confirmed: impl Fn(&Entity) -> bool) -> HashSet<u64> {
    let mut kept = HashSet::new();
    report.regressions.retain(|c| {
        let entity = match c.kind {
            EntityKind::Stack => Entity::Stack(&c.name),
            EntityKind::Function => Entity::Function(&c.name),
        };
        let keep = confirmed(&entity);
        if keep {
            kept.insert(peak_key(&entity));
        }
        keep
    });
    report.query_regressions.retain(|q| {
        let entity = Entity::Query(query_key(&q.source, &q.comm, &q.fingerprint));
        let keep = confirmed(&entity);
        if keep {
            kept.insert(peak_key(&entity));
        }
        keep
    });
    report.regression = !report.regressions.is_empty() || !report.query_regressions.is_empty();
    kept
}

/// The event for a report whose regressions are confirmed (its differential flamegraph and
/// reports written into the window's `diff/`); `None` when none is left.
fn event(report: Report, unix_ms: u64, dir: &Path) -> Option<serde_json::Value> {
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
        "unix_ms": unix_ms,
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
    fn a_value_seen_within_the_peak_windows_is_not_news() {
        let mut baseline = Baseline::new(None, std::time::Duration::ZERO);
        let steady = || profile(&[("pg;main;Checkpointer;Delay", &[1.0, 1.0])]);
        let busy = || profile(&[("pg;main;Checkpointer;Delay", &[50.0, 50.0])]);
        baseline.remember_peaks(&busy());
        for _ in 0..10 {
            baseline.remember_peaks(&steady());
        }
        let function = Entity::Function("Delay");
        let stack = Entity::Stack("pg;main;Checkpointer;Delay");
        assert!(
            !baseline.above_peak(&busy(), &function),
            "its peak 11 windows ago"
        );
        assert!(!baseline.above_peak(&busy(), &stack));
        assert!(
            baseline.above_peak(
                &profile(&[("pg;main;Checkpointer;Delay", &[60.0, 60.0])]),
                &function
            ),
            "above the peak"
        );
        assert!(
            baseline.above_peak(&busy(), &Entity::Function("Other")),
            "never seen"
        );
        for _ in 0..PEAK_WINDOWS {
            baseline.remember_peaks(&steady());
        }
        assert!(
            baseline.above_peak(&busy(), &function),
            "a peak older than PEAK_WINDOWS is forgotten"
        );
    }

    /// Windows within `--learn` become history and raise no event, whatever they hold; after
    /// it, a change beyond what learning saw is an event once two windows in a row confirm
    /// it, and a change no larger than one learning saw is not.
    #[test]
    fn windows_within_the_learning_period_raise_no_event_but_teach_the_peaks() {
        let dir = std::env::temp_dir().join(format!("profiler-events-{}", std::process::id()));
        // 4 s windows (four 1 s intervals); 16 s of learning is four windows.
        let mut baseline = Baseline::new(None, std::time::Duration::from_secs(16));
        let window = |query_us: f64, jitter: f64| {
            let wait = [query_us, query_us + jitter, query_us - jitter, query_us];
            profile(&[
                ("app;main;serve;poll", &[500e3, 510e3, 490e3, 500e3]),
                ("app;main;serve;stage_query", &wait),
            ])
        };
        let mut judge = |profile: Profile| baseline.judge_profile(profile, 0, &dir);
        for (i, w) in [(10e3, 300.0), (11e3, 200.0), (100e3, 900.0), (10e3, 250.0)]
            .into_iter()
            .enumerate()
        {
            assert!(judge(window(w.0, w.1)).is_none(), "learning window {i}");
        }
        assert!(!baseline.learning() && baseline.learned() == 4);
        let mut judge = |profile: Profile| baseline.judge_profile(profile, 0, &dir);
        for w in [(10e3, 300.0), (10.5e3, 200.0), (10.2e3, 100.0)] {
            assert!(judge(window(w.0, w.1)).is_none(), "steady");
        }
        // As slow as a learning window was, two windows in a row: known, no event.
        assert!(judge(window(100e3, 500.0)).is_none());
        assert!(judge(window(101e3, 400.0)).is_none(), "seen while learning");
        // Three times slower than ever: pending, then confirmed.
        assert!(
            judge(window(300e3, 900.0)).is_none(),
            "waits for the next window"
        );
        let event = judge(window(305e3, 700.0)).expect("confirmed by the next window");
        let names = event["regressions"].as_array().unwrap();
        assert!(
            names.iter().any(|n| n == "stage_query"),
            "{names:?} name stage_query"
        );
        assert!(
            !names.iter().any(|n| n == "main" || n == "serve"),
            "{names:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Not a check: replays a directory of windows (window directories, or their
    /// capture.json files, in name order) through the judge and prints each event — how a
    /// change to these rules would have judged a soak's windows:
    /// `PROFILER_REPLAY=DIR [PROFILER_REPLAY_LEARN=600] cargo test -p profiler --lib
    /// replay_windows -- --ignored --nocapture`.
    #[test]
    #[ignore = "a tool: PROFILER_REPLAY=DIR"]
    fn replay_windows() {
        let Ok(from) = std::env::var("PROFILER_REPLAY") else {
            return;
        };
        let learn = std::env::var("PROFILER_REPLAY_LEARN")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600);
        let mut paths: Vec<_> = std::fs::read_dir(&from)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        let out = std::env::temp_dir().join("profiler-replay");
        let mut baseline = Baseline::new(None, std::time::Duration::from_secs(learn));
        let (mut first_ms, mut events) = (None, 0);
        for path in &paths {
            let capture = Capture::load(path).unwrap();
            let start = capture.metadata.start_unix_ms;
            let t = (start - *first_ms.get_or_insert(start)) / 1000;
            if let Some(event) = baseline.judge(&capture, &out) {
                events += 1;
                println!("event: window from {t} s: {}", event["regressions"]);
            }
        }
        println!(
            "{events} events in {} windows ({} learned from)",
            paths.len(),
            baseline.learned()
        );
    }

    #[test]
    fn windows_are_pooled_interval_after_interval() {
        let mut baseline = Baseline::new(None, std::time::Duration::ZERO);
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
