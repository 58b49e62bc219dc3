//! The daemon's page for a person (`/`): the latest window's flamegraph (interactive: the
//! SVG is embedded, so its search and zoom work) and summary, the regression events, charts
//! across the kept windows (query latency, off-CPU time per process), a form to compare any
//! two windows (`/compare`), every kept window with its top processes and queries and links
//! to its views, and the machine-readable endpoints. Plain HTML with no script of ours and
//! nothing fetched from elsewhere: it works on an air-gapped host.

use std::fmt::Write as _;
use std::path::Path;

use super::State;
use crate::compare::{Change, EntityKind, QueryChange, Report};
use crate::model::Capture;
use crate::render::chart::{Series, line_chart};

/// Lines per chart, rows per table cell.
const CHART_SERIES: usize = 5;
const CELL_ROWS: usize = 3;

/// What the page shows of one window, taken once from its capture.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Digest {
    pub start_unix_ms: u64,
    /// Off-CPU seconds per process (`comm[pid]`), most first.
    pub offcpu: Vec<(String, f64)>,
    /// Its queries, most total time first.
    pub queries: Vec<QueryDigest>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct QueryDigest {
    /// `fingerprint — comm (source)`.
    pub label: String,
    pub calls: u64,
    pub total_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Digest {
    pub(crate) fn of(capture: &Capture) -> Self {
        let mut offcpu: std::collections::BTreeMap<String, f64> = Default::default();
        for stack in capture.offcpu.iter().flat_map(|o| &o.stacks) {
            *offcpu
                .entry(format!("{}[{}]", stack.comm, stack.pid))
                .or_default() += stack.total_ns as f64 / 1e9;
        }
        let mut offcpu: Vec<(String, f64)> = offcpu.into_iter().collect();
        offcpu.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut queries: Vec<QueryDigest> = capture
            .db
            .iter()
            .flat_map(|d| &d.queries)
            .map(|q| QueryDigest {
                label: format!("{} — {} ({})", q.fingerprint, q.comm, q.source),
                calls: q.calls,
                total_ms: q.total_ns as f64 / 1e6,
                p50_ms: q.p50_ns as f64 / 1e6,
                p99_ms: q.p99_ns as f64 / 1e6,
            })
            .collect();
        queries.sort_by(|a, b| {
            b.total_ms
                .total_cmp(&a.total_ms)
                .then_with(|| a.label.cmp(&b.label))
        });
        Self {
            start_unix_ms: capture.metadata.start_unix_ms,
            offcpu,
            queries,
        }
    }
}

/// The flamegraph kinds a window may have, in the order the page offers them.
const KINDS: [(&str, &str); 4] = [
    ("offcpu", "off-CPU"),
    ("oncpu", "on-CPU"),
    ("wallclock", "wall-clock"),
    ("db", "database"),
];

pub(crate) fn index(state: &State, host: &str) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>profiler daemon — {host}</title><style>{STYLE}</style></head><body>\n\
         <h1>profiler daemon <small>{host}</small></h1>\n",
        host = escape(host)
    );
    let mode = match (state.cost.sample_every(), state.cost.duty()) {
        (1, 1) => "full".to_string(),
        (events, 1) => format!("sampled: 1 event in {events}"),
        (events, windows) => format!("sampled: 1 event in {events}, 1 window in {windows}"),
    };
    let _ = writeln!(
        html,
        "<p id=\"status\">{} windows recorded, {} kept; mode {}; {} regression events; \
         {} failed windows. <a href=\"/metrics\">/metrics</a> · <a href=\"/events\">/events</a> · \
         <a href=\"/captures\">/captures</a> · <a href=\"/profile\">/profile</a> (pprof)</p>",
        state.windows_total,
        state.kept.len(),
        escape(&mode),
        state.regressions_total,
        state.window_errors_total,
    );

    match &state.latest {
        Some((dir, capture)) => {
            let name = dir_name(dir);
            let _ = writeln!(
                html,
                "<h2>Latest window <code>{}</code> <small>{} UTC, {:.1} s</small></h2>",
                escape(&name),
                utc(capture.metadata.start_unix_ms),
                capture.metadata.duration_ns as f64 / 1e9
            );
            let kinds: Vec<_> = KINDS
                .iter()
                .filter(|(kind, _)| dir.join(format!("{kind}.svg")).exists())
                .collect();
            let links: Vec<String> = kinds
                .iter()
                .map(|(kind, label)| {
                    format!("<a href=\"/flamegraph?kind={kind}&amp;window={name}\">{label}</a>")
                })
                .collect();
            let _ = writeln!(
                html,
                "<p>Flamegraphs: {} · <a href=\"/summary?window={name}\">summary</a></p>",
                links.join(" · ")
            );
            if let Some((kind, label)) = kinds.first() {
                // Sized to the SVG's own proportions: a flamegraph grows from the bottom, so a
                // fixed-height box would show only the tips of its tallest stacks.
                let (width, height) =
                    svg_size(&dir.join(format!("{kind}.svg"))).unwrap_or((1200, 600));
                let _ = writeln!(
                    html,
                    "<object id=\"flamegraph\" type=\"image/svg+xml\" \
                     style=\"aspect-ratio:{width}/{height}\" \
                     data=\"/flamegraph?kind={kind}&amp;window={name}\" \
                     aria-label=\"{label} flamegraph\"></object>"
                );
            }
            if let Ok(summary) = std::fs::read_to_string(dir.join("summary.txt")) {
                let _ = writeln!(
                    html,
                    "<h3>Summary</h3>\n<pre id=\"summary\">{}</pre>",
                    escape(&summary)
                );
            }
        }
        None => {
            let _ = writeln!(
                html,
                "<p id=\"waiting\">No window has finished yet: the first one is recording.</p>"
            );
        }
    }

    let _ = writeln!(html, "<h2>Regression events</h2>");
    if state.events.is_empty() {
        let _ = writeln!(html, "<p>None.</p>");
    } else {
        let _ = writeln!(html, "<ul id=\"events\">");
        for event in state.events.iter().rev() {
            let window = event["window"].as_str().map(|w| dir_name(Path::new(w)));
            let names: Vec<String> = event["regressions"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter_map(|n| n.as_str())
                        .map(|n| format!("<code>{}</code>", escape(n)))
                        .collect()
                })
                .unwrap_or_default();
            let _ = write!(
                html,
                "<li>{} UTC: {}",
                utc(event["unix_ms"].as_u64().unwrap_or(0)),
                names.join(", ")
            );
            if let Some(window) = window {
                let _ = write!(
                    html,
                    " — <a href=\"/flamegraph?kind=diff&amp;window={window}\">differential \
                     flamegraph</a>"
                );
            }
            let _ = writeln!(html, "</li>");
        }
        let _ = writeln!(html, "</ul>");
    }

    let digests: Vec<(&std::path::PathBuf, &Digest)> = state
        .kept
        .iter()
        .filter_map(|dir| Some((dir, state.digests.get(dir)?)))
        .collect();
    charts(&mut html, &digests);
    compare_form(&mut html, state);
    let _ = writeln!(
        html,
        "<h2>Windows kept</h2>\n<table id=\"windows\"><tr><th>window</th><th>start (UTC)</th>\
         <th>off-CPU by process (s)</th><th>queries by total time (p50 / p99 ms)</th>\
         <th>views</th></tr>"
    );
    for dir in state.kept.iter().rev() {
        let name = dir_name(dir);
        let (offcpu, queries) = match state.digests.get(dir) {
            Some(digest) => (
                digest
                    .offcpu
                    .iter()
                    .take(CELL_ROWS)
                    .map(|(process, s)| format!("{} {s:.2}", escape(process)))
                    .collect::<Vec<_>>()
                    .join("<br>"),
                digest
                    .queries
                    .iter()
                    .take(CELL_ROWS)
                    .map(|q| {
                        format!(
                            "<code>{}</code> {} calls, {:.3} / {:.3}",
                            escape(&q.label),
                            q.calls,
                            q.p50_ms,
                            q.p99_ms
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("<br>"),
            ),
            None => (String::new(), String::new()),
        };
        let start = name
            .strip_prefix("window-")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(utc)
            .unwrap_or_default();
        let mut views: Vec<String> = KINDS
            .iter()
            .filter(|(kind, _)| dir.join(format!("{kind}.svg")).exists())
            .map(|(kind, label)| {
                format!("<a href=\"/flamegraph?kind={kind}&amp;window={name}\">{label}</a>")
            })
            .collect();
        views.push(format!("<a href=\"/summary?window={name}\">summary</a>"));
        views.push(format!("<a href=\"/profile?window={name}\">pprof</a>"));
        let _ = writeln!(
            html,
            "<tr><td><code>{}</code></td><td>{start}</td><td>{offcpu}</td><td>{queries}</td>\
             <td>{}</td></tr>",
            escape(&name),
            views.join(" · ")
        );
    }
    let _ = writeln!(html, "</table>\n</body></html>");
    html
}

/// Two charts across the kept windows, oldest to newest: the p50 latency of the queries
/// with the most total time, and the off-CPU seconds of the processes with the most.
fn charts(html: &mut String, digests: &[(&std::path::PathBuf, &Digest)]) {
    use std::collections::BTreeMap;
    if digests.is_empty() {
        return;
    }
    let top = |totals: BTreeMap<&str, f64>| -> Vec<String> {
        let mut ranked: Vec<(&str, f64)> = totals.into_iter().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        ranked
            .into_iter()
            .take(CHART_SERIES)
            .map(|(name, _)| name.to_string())
            .collect()
    };
    let mut query_totals: BTreeMap<&str, f64> = BTreeMap::new();
    let mut process_totals: BTreeMap<&str, f64> = BTreeMap::new();
    for (_, d) in digests {
        for q in &d.queries {
            *query_totals.entry(&q.label).or_default() += q.total_ms;
        }
        for (process, s) in &d.offcpu {
            *process_totals.entry(process).or_default() += s;
        }
    }
    let queries: Vec<Series> = top(query_totals)
        .into_iter()
        .map(|label| Series {
            points: digests
                .iter()
                .filter_map(|(_, d)| {
                    let q = d.queries.iter().find(|q| q.label == label)?;
                    Some((d.start_unix_ms, q.p50_ms))
                })
                .collect(),
            name: label,
        })
        .collect();
    // A process absent from a window spent no time off the CPU in it that we saw.
    let processes: Vec<Series> = top(process_totals)
        .into_iter()
        .map(|process| Series {
            points: digests
                .iter()
                .map(|(_, d)| {
                    let s = d
                        .offcpu
                        .iter()
                        .find(|(p, _)| *p == process)
                        .map(|(_, s)| *s);
                    (d.start_unix_ms, s.unwrap_or(0.0))
                })
                .collect(),
            name: process,
        })
        .collect();
    let _ = writeln!(html, "<h2>Across the kept windows</h2>");
    if !queries.is_empty() {
        let _ = writeln!(
            html,
            "{}",
            line_chart(
                "chart-queries",
                "Query latency, p50 per window (the queries with the most time)",
                "ms",
                &queries
            )
        );
    }
    if !processes.is_empty() {
        let _ = writeln!(
            html,
            "{}",
            line_chart(
                "chart-offcpu",
                "Off-CPU time per window (the processes with the most)",
                "s",
                &processes
            )
        );
    }
}

/// A form to compare two kept windows: the older as A (base), the newest as B.
fn compare_form(html: &mut String, state: &State) {
    if state.kept.len() < 2 {
        return;
    }
    let options = |selected: usize| -> String {
        state
            .kept
            .iter()
            .enumerate()
            .rev()
            .map(|(i, dir)| {
                let name = escape(&dir_name(dir));
                let start = dir_name(dir)
                    .strip_prefix("window-")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .map(utc)
                    .unwrap_or_default();
                let mark = if i == selected { " selected" } else { "" };
                format!("<option value=\"{name}\"{mark}>{name} ({start})</option>")
            })
            .collect()
    };
    let last = state.kept.len() - 1;
    let _ = writeln!(
        html,
        "<h2>Compare two windows</h2>\n<form id=\"compare\" action=\"/compare\" method=\"get\">\
         <label>A (base) <select name=\"a\">{}</select></label> \
         <label>B (new) <select name=\"b\">{}</select></label> \
         <button type=\"submit\">Compare</button></form>",
        options(last - 1),
        options(last)
    );
}

/// The comparison of window `a` (base) with `b`: the verdict, what regressed and improved
/// (functions, stacks, queries), and the differential flamegraph.
pub(crate) fn compare_page(a: &str, b: &str, report: &Report) -> String {
    let mut html = String::new();
    let verdict = if report.regression {
        "Regression found"
    } else {
        "No significant regression"
    };
    let _ = writeln!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{a} vs {b} — profiler daemon</title><style>{STYLE}</style></head><body>\n\
         <p><a href=\"/\">← the daemon's page</a></p>\n\
         <h1>Compare <code>{a}</code> (A) with <code>{b}</code> (B)</h1>\n\
         <p id=\"verdict\" class=\"{class}\">{verdict}</p>\n\
         <p>Off-CPU time A {} , B {} ({}). Method: {}.</p>",
        number(report.base_total),
        number(report.new_total),
        escape(&report.unit),
        escape(&report.method),
        a = escape(a),
        b = escape(b),
        class = if report.regression { "bad" } else { "good" },
    );
    for warning in &report.warnings {
        let _ = writeln!(
            html,
            "<p class=\"warning\">warning: {}</p>",
            escape(warning)
        );
    }
    for (label, id, changes) in [
        ("Regressed", "regressed", &report.regressions),
        ("Improved", "improved", &report.improvements),
    ] {
        for (what, kind, kernel) in [
            ("functions (your code)", EntityKind::Function, false),
            ("kernel functions", EntityKind::Function, true),
            ("stacks", EntityKind::Stack, false),
        ] {
            let rows: Vec<&Change> = changes
                .iter()
                .filter(|c| c.kind == kind && c.kernel == kernel)
                .take(10)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(
                html,
                "<h2>{label} {what}</h2>\n<table id=\"{id}-{}\"><tr><th>name</th><th>A</th>\
                 <th>B</th><th>change</th><th>p (Holm)</th></tr>",
                if kind == EntityKind::Stack {
                    "stacks"
                } else if kernel {
                    "kernel"
                } else {
                    "functions"
                }
            );
            for c in rows {
                // A whole stack as its root and last five frames; all of it on hover.
                let shown = match kind {
                    EntityKind::Stack => crate::compare::report::short_path(&c.name),
                    EntityKind::Function => c.name.clone(),
                };
                let _ = writeln!(
                    html,
                    "<tr><td><code title=\"{}\">{}</code></td><td>{}</td><td>{}</td><td>{}</td>\
                     <td>{}</td></tr>",
                    escape(&c.name),
                    escape(&shown),
                    number(c.base),
                    number(c.new),
                    percent(c.relative),
                    c.p_adjusted.map(|p| format!("{p:.2e}")).unwrap_or_default()
                );
            }
            let _ = writeln!(html, "</table>");
        }
    }
    for (label, id, changes) in [
        (
            "Slower queries",
            "slower-queries",
            &report.query_regressions,
        ),
        (
            "Faster queries",
            "faster-queries",
            &report.query_improvements,
        ),
    ] {
        if changes.is_empty() {
            continue;
        }
        let _ = writeln!(
            html,
            "<h2>{label}</h2>\n<table id=\"{id}\"><tr><th>query</th><th>process</th>\
             <th>source</th><th>calls A → B</th><th>mean ms A → B</th><th>change</th>\
             <th>p (Holm)</th></tr>"
        );
        for q in changes.iter().take(10) {
            query_row(&mut html, q);
        }
        let _ = writeln!(html, "</table>");
    }
    let _ = writeln!(
        html,
        "<p>{} regressions, {} improvements, {} changes past the thresholds but not \
         significant; {} stacks and functions, {} queries tested.</p>",
        report.regressions.len() + report.query_regressions.len(),
        report.improvements.len() + report.query_improvements.len(),
        report.not_significant,
        report.entities_tested,
        report.queries_tested
    );
    let _ = writeln!(
        html,
        "<h2>Differential flamegraph</h2>\n<object id=\"diff\" type=\"image/svg+xml\" \
         data=\"/compare?a={a}&amp;b={b}&amp;format=svg\" \
         aria-label=\"differential flamegraph\"></object>\n</body></html>",
        a = escape(a),
        b = escape(b)
    );
    html
}

fn query_row(html: &mut String, q: &QueryChange) {
    let _ = writeln!(
        html,
        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{} → {}</td>\
         <td>{:.3} → {:.3}</td><td>{}</td><td>{:.2e}</td></tr>",
        escape(&q.fingerprint),
        escape(&q.comm),
        escape(&q.source),
        q.base_calls,
        q.new_calls,
        q.base_mean_ms,
        q.new_mean_ms,
        percent(q.relative),
        q.p_adjusted
    );
}

fn percent(relative: f64) -> String {
    if relative.is_finite() {
        format!("{:+.0}%", relative * 100.0)
    } else {
        "new".into()
    }
}

fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:1em 2em;color:#222}\
    small{color:#666;font-weight:normal}code{font-size:90%}\
    object{width:100%;height:auto;border:1px solid #ccc}\
    pre{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:85%}\
    table{border-collapse:collapse}td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #eee;vertical-align:top}\
    svg.chart{width:100%;max-width:960px;height:auto;display:block;margin:.5em 0}\
    .bad{color:#b00;font-weight:bold}.good{color:#070;font-weight:bold}.warning{color:#a60}";

/// The `viewBox` size of an SVG file (inferno writes `viewBox="0 0 W H"` in its root tag).
fn svg_size(path: &Path) -> Option<(u32, u32)> {
    use std::io::Read as _;
    let mut head = vec![0u8; 2048];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let head = String::from_utf8_lossy(&head[..n]);
    let view_box = head.split("viewBox=\"").nth(1)?.split('"').next()?;
    let numbers: Vec<u32> = view_box
        .split_ascii_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    match numbers[..] {
        [_, _, width, height] if width > 0 && height > 0 => Some((width, height)),
        _ => None,
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

use crate::render::chart::escape;

/// `YYYY-MM-DD HH:MM:SS` of a Unix time in milliseconds (UTC; days to civil date after
/// Howard Hinnant's algorithm).
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_match_known_instants() {
        // `date -u -d @1796155030` and the epoch.
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_155_030_969), "2026-12-01 19:57:10");
    }

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn a_page_before_the_first_window_says_so() {
        let html = index(&State::default(), "host<1>");
        assert!(html.contains("host&lt;1&gt;"));
        assert!(html.contains("id=\"waiting\""));
        assert!(html.contains("0 windows recorded"));
    }

    #[test]
    fn kept_windows_get_their_row_a_chart_point_and_a_place_in_the_form() {
        let mut state = State::default();
        for (i, ms) in [1_000u64, 2_000, 3_000].into_iter().enumerate() {
            let dir = std::path::PathBuf::from(format!("/data/window-{ms}"));
            state.kept.push(dir.clone());
            state.digests.insert(
                dir,
                Digest {
                    start_unix_ms: ms,
                    offcpu: vec![("app<1>[7]".into(), 1.5 + i as f64)],
                    queries: vec![QueryDigest {
                        label: "SELECT ? — app (libpq)".into(),
                        calls: 10,
                        total_ms: 20.0,
                        p50_ms: 1.25,
                        p99_ms: 4.5,
                    }],
                },
            );
        }
        let html = index(&state, "h");
        assert!(html.contains("app&lt;1&gt;[7] 3.50"), "{html}");
        assert!(html.contains("<code>SELECT ? — app (libpq)</code> 10 calls, 1.250 / 4.500"));
        let chart = html.split("<svg id=\"chart-offcpu\"").nth(1).unwrap();
        let series = chart.split("<g class=\"series\"").nth(1).unwrap();
        assert!(series.contains("data-name=\"app&lt;1&gt;[7]\""));
        assert_eq!(series.matches("<circle").count(), 3);
        assert!(html.contains("<svg id=\"chart-queries\""));
        // A is the window before the newest, B the newest.
        assert!(html.contains("<option value=\"window-2000\" selected>"));
        assert!(html.contains("<option value=\"window-3000\" selected>"));
        assert_eq!(html.matches(" selected>").count(), 2);
    }
}
