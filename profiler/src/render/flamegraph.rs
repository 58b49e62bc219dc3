//! Flamegraph SVGs of folded lines (inferno), one style per family.

use std::path::Path;

use anyhow::{Context as _, Result};
use inferno::flamegraph::{self, Options, Palette, color::BasicPalette};

/// How a family's flamegraph looks.
pub struct FlameStyle {
    pub title: &'static str,
    pub count_name: &'static str,
    pub palette: BasicPalette,
}

/// Off-CPU: microseconds, a cool palette.
pub const OFFCPU_STYLE: FlameStyle = FlameStyle {
    title: "Off-CPU time",
    count_name: "us",
    palette: BasicPalette::Blue,
};

/// Wall-clock: on- and off-CPU time together, microseconds.
pub const WALLCLOCK_STYLE: FlameStyle = FlameStyle {
    title: "Wall-clock time per thread (on- and off-CPU)",
    count_name: "us",
    palette: BasicPalette::Aqua,
};

/// Database query time by issuing code path.
pub const DB_STYLE: FlameStyle = FlameStyle {
    title: "Database query time",
    count_name: "us",
    palette: BasicPalette::Yellow,
};

/// On-CPU: samples, the classic warm palette.
pub const ONCPU_STYLE: FlameStyle = FlameStyle {
    title: "On-CPU samples",
    count_name: "samples",
    palette: BasicPalette::Hot,
};

/// Writes a flamegraph SVG of folded lines to a file.
pub fn flamegraph_svg(lines: &[String], style: &FlameStyle, path: &Path) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    write_flamegraph(lines, style, std::io::BufWriter::new(file))
}

/// Writes a flamegraph SVG of folded lines (inferno).
pub fn write_flamegraph<W: std::io::Write>(
    lines: &[String],
    style: &FlameStyle,
    writer: W,
) -> Result<()> {
    let mut options = Options::default();
    options.title = style.title.to_string();
    options.count_name = style.count_name.to_string();
    options.colors = Palette::Basic(style.palette);
    let blank = ["[no samples] 1".to_string()];
    let lines = if lines.is_empty() {
        // inferno refuses empty input; an empty capture still gets a (blank) picture.
        options.subtitle = Some("no samples".to_string());
        &blank[..]
    } else {
        lines
    };
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), writer)
        .context("rendering the flamegraph failed")
}
