//! Regression events: each finished window compared with the previous one or the baseline.

use std::path::Path;

use crate::model::Capture;

pub(crate) const EVENTS_KEPT: usize = 100;

/// Compares a finished window with the baseline; a significant regression becomes an event
/// (and the window's directory gets the differential flamegraph and reports).
pub(crate) fn regression_event(
    baseline: &Capture,
    window: &Capture,
    dir: &Path,
) -> Option<serde_json::Value> {
    use crate::compare::{Profile, Thresholds, compare};
    let base = Profile::from_capture(baseline, "baseline".into());
    let new = Profile::from_capture(window, dir.display().to_string());
    let report = compare(&base, &new, &Thresholds::default()).ok()?;
    if !report.regression {
        return None;
    }
    let diff_dir = dir.join("diff");
    let _ = crate::compare::report::write_all(&report, &diff_dir, 10);
    let names: Vec<String> = report
        .regressions
        .iter()
        .take(5)
        .map(|c| c.name.clone())
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
