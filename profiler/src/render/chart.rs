//! Line charts as SVG, drawn on the server for the daemon's page (no script, nothing fetched:
//! the page works on an air-gapped host). One chart: a value per series across time.

use std::fmt::Write as _;

/// One line of a chart: a name for the legend and (Unix ms, value) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 320.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 300.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 44.0;
/// Colour-blind-safe (Okabe–Ito), then greys.
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999",
];

/// An `<svg>` element (to embed in HTML) with id `id`: `series` against time, `unit` on the
/// y axis, from 0. A chart without points says so.
pub fn line_chart(id: &str, title: &str, unit: &str, series: &[Series]) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg id=\"{id}\" class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{title}\" \
         font-family=\"sans-serif\" font-size=\"12\">\
         <text x=\"{LEFT}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{title}</text>",
        id = escape(id),
        title = escape(title)
    );
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max, mut y_max) = (u64::MAX, 0u64, 0f64);
    for (x, y) in points {
        x_min = x_min.min(*x);
        x_max = x_max.max(*x);
        if y.is_finite() {
            y_max = y_max.max(*y);
        }
    }
    if x_min > x_max {
        let _ = write!(
            svg,
            "<text x=\"{LEFT}\" y=\"{}\" fill=\"#666\">nothing to show yet</text></svg>",
            HEIGHT / 2.0
        );
        return svg;
    }
    let y_top = nice_ceiling(y_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let span = (x_max - x_min).max(1) as f64;
    let px = |x: u64| LEFT + (x - x_min) as f64 / span * plot_w;
    let py = |y: f64| TOP + plot_h - (y.max(0.0) / y_top) * plot_h;
    // Axes, horizontal grid lines with their values, time ticks.
    let _ = write!(
        svg,
        "<g stroke=\"#ccc\"><line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/>\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\"/></g>",
        b = TOP + plot_h,
        r = LEFT + plot_w
    );
    for i in 0..=4 {
        let value = y_top * f64::from(i) / 4.0;
        let y = py(value);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{r}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\" fill=\"#444\">{}</text>",
            number(value),
            r = LEFT + plot_w,
            tx = LEFT - 6.0,
            ty = y + 4.0
        );
    }
    let _ = write!(
        svg,
        "<text x=\"14\" y=\"{}\" fill=\"#444\" transform=\"rotate(-90 14 {})\" \
         text-anchor=\"middle\">{}</text>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(unit)
    );
    let ticks = if x_max == x_min { 1 } else { 5 };
    for i in 0..ticks {
        let x = x_min + (x_max - x_min) * i / (ticks - 1).max(1);
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#444\">{}</text>",
            px(x),
            TOP + plot_h + 16.0,
            clock(x)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#666\">time (UTC)</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 6.0
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let name = escape(&s.name);
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            svg,
            "<g class=\"series\" data-name=\"{name}\"><polyline fill=\"none\" stroke=\"{colour}\" \
             stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in s.points.iter().filter(|(_, y)| y.is_finite()) {
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>{name}: {} {} \
                 at {}</title></circle>",
                px(*x),
                py(*y),
                number(*y),
                escape(unit),
                clock(*x)
            );
        }
        let ly = TOP + 8.0 + i as f64 * 18.0;
        let lx = WIDTH - RIGHT + 16.0;
        let _ = write!(
            svg,
            "<rect x=\"{lx}\" y=\"{:.1}\" width=\"12\" height=\"4\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#222\"><title>{name}</title>{}</text></g>",
            ly - 4.0,
            lx + 18.0,
            ly + 1.0,
            escape(&shorten(&s.name, 42))
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `value` (1 for nothing).
fn nice_ceiling(value: f64) -> f64 {
    if value.is_nan() || value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= value)
        .unwrap_or(10.0 * magnitude)
}

fn number(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .into()
    } else {
        format!("{value:.3}")
    }
}

/// `HH:MM:SS` of a Unix time in ms (UTC).
fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

pub(crate) fn escape(text: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_round_numbers() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(37.0), 50.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
    }

    #[test]
    fn a_chart_has_one_line_per_series_with_its_points_and_an_escaped_legend() {
        let svg = line_chart(
            "c",
            "Query p50",
            "ms",
            &[
                Series {
                    name: "SELECT <x>".into(),
                    points: vec![(1_000, 1.0), (3_000, 3.0)],
                },
                Series {
                    name: "b".into(),
                    points: vec![(2_000, 0.5)],
                },
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("SELECT &lt;x&gt;"));
        // y from 0 to 5 (3 rounded up): the 3.0 point is 60 % up the plot.
        let plot_h = HEIGHT - TOP - BOTTOM;
        let y = TOP + plot_h - 0.6 * plot_h;
        assert!(
            svg.contains(&format!("{:.1},{y:.1}", WIDTH - RIGHT)),
            "{svg}"
        );
        assert!(line_chart("e", "t", "s", &[]).contains("nothing to show yet"));
    }
}
