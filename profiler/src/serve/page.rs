//! The daemon's page for a person (`/`): the latest window's flamegraph (interactive: the
//! SVG is embedded, so its search and zoom work) and summary, the regression events, every
//! kept window with links to its views, and the machine-readable endpoints. Plain HTML with
//! no script of ours and nothing fetched from elsewhere: it works on an air-gapped host.

use std::fmt::Write as _;
use std::path::Path;

use super::State;

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

    let _ = writeln!(
        html,
        "<h2>Windows kept</h2>\n<table id=\"windows\"><tr><th>window</th><th>start (UTC)</th>\
         <th>views</th></tr>"
    );
    for dir in state.kept.iter().rev() {
        let name = dir_name(dir);
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
            "<tr><td><code>{}</code></td><td>{start}</td><td>{}</td></tr>",
            escape(&name),
            views.join(" · ")
        );
    }
    let _ = writeln!(html, "</table>\n</body></html>");
    html
}

const STYLE: &str = "body{font-family:sans-serif;margin:1em 2em;color:#222}\
    small{color:#666;font-weight:normal}code{font-size:90%}\
    object{width:100%;height:auto;border:1px solid #ccc}\
    pre{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:85%}\
    table{border-collapse:collapse}td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #eee}";

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

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

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
}
