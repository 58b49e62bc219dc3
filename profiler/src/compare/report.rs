//! Views of a comparison: differential flamegraph, Markdown (for a pull-request comment),
//! JSON, and the terminal text.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use inferno::flamegraph::{self, Options};

use crate::compare::{Change, EntityKind, InputKind, Report};

/// Differential folded lines: `path base new`, rates rounded to whole units.
pub fn differential_folded(report: &Report) -> Vec<String> {
    let paths: BTreeSet<&String> = report
        .base_stacks
        .keys()
        .chain(report.new_stacks.keys())
        .collect();
    paths
        .into_iter()
        .filter_map(|path| {
            let b = report.base_stacks.get(path).copied().unwrap_or(0.0).round() as u64;
            let n = report.new_stacks.get(path).copied().unwrap_or(0.0).round() as u64;
            (b > 0 || n > 0).then(|| format!("{path} {b} {n}"))
        })
        .collect()
}

/// Red: grew from base to new; blue: shrank. Widths are the new profile's.
pub fn differential_svg(report: &Report, path: &Path) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    write_differential_svg(report, std::io::BufWriter::new(file))
}

/// `differential_svg` into any writer (the daemon's compare page serves it from memory).
pub fn write_differential_svg<W: std::io::Write>(report: &Report, writer: W) -> Result<()> {
    let lines = differential_folded(report);
    let mut options = Options::default();
    options.title = "Differential off-CPU time".to_string();
    options.subtitle = Some(format!(
        "{} -> {} (red grew, blue shrank; {})",
        report.base, report.new, report.unit
    ));
    options.count_name = report.unit.clone();
    let lines = if lines.is_empty() {
        vec!["[no samples] 1 1".to_string()]
    } else {
        lines
    };
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), writer)
        .context("rendering the differential flamegraph failed")
}

fn amount(value: f64, unit: &str) -> String {
    if unit == "us/s" {
        format!("{:.2} ms/s", value / 1000.0)
    } else {
        format!("{value:.0}")
    }
}

fn relative(change: &Change) -> String {
    if change.relative.is_finite() {
        format!("{:+.1}%", change.relative * 100.0)
    } else {
        "new".to_string()
    }
}

fn p_value(change: &Change) -> String {
    change
        .p_adjusted
        .map(|p| format!("{p:.2e}"))
        .unwrap_or_else(|| "-".to_string())
}

fn table(out: &mut String, title: &str, changes: &[&Change], unit: &str, with_self: bool) {
    if changes.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n### {title}\n");
    if with_self {
        let _ = writeln!(
            out,
            "| function | base | new | change | self base | self new | p (Holm) |\n|---|---:|---:|---:|---:|---:|---:|"
        );
    } else {
        let _ = writeln!(
            out,
            "| stack (leaf end) | base | new | change | p (Holm) |\n|---|---:|---:|---:|---:|"
        );
    }
    for change in changes {
        let name = if with_self {
            change.name.clone()
        } else {
            short_path(&change.name)
        };
        let name = name.replace('|', "\\|");
        if with_self {
            let _ = writeln!(
                out,
                "| `{name}` | {} | {} | {} | {} | {} | {} |",
                amount(change.base, unit),
                amount(change.new, unit),
                relative(change),
                amount(change.base_self, unit),
                amount(change.new_self, unit),
                p_value(change)
            );
        } else {
            let _ = writeln!(
                out,
                "| `{name}` | {} | {} | {} | {} |",
                amount(change.base, unit),
                amount(change.new, unit),
                relative(change),
                p_value(change)
            );
        }
    }
}

/// The last few frames of a folded path, leaf last.
pub(crate) fn short_path(path: &str) -> String {
    let frames: Vec<&str> = path.split(';').collect();
    let first = frames.first().copied().unwrap_or("");
    if frames.len() <= 6 {
        return frames.join(";");
    }
    format!("{first};…;{}", frames[frames.len() - 5..].join(";"))
}

/// The report as Markdown, ranked lists capped at `top` rows each.
pub fn markdown(report: &Report, top: usize) -> String {
    let mut out = String::new();
    let verdict = if report.regression {
        "**Regression found**"
    } else {
        "No significant regression"
    };
    let _ = writeln!(
        out,
        "## Comparison (off-CPU time, query latency): {verdict}\n"
    );
    let _ = writeln!(
        out,
        "Base `{}` ({}), new `{}` ({}).  ",
        report.base,
        amount(report.base_total, &report.unit),
        report.new,
        amount(report.new_total, &report.unit)
    );
    let _ = writeln!(out, "Method: {}.", report.method);
    for warning in &report.warnings {
        let _ = writeln!(out, "\n> warning: {warning}");
    }
    let unit = report.unit.as_str();
    let pick = |changes: &[Change], kind: EntityKind, kernel: bool| -> Vec<Change> {
        changes
            .iter()
            .filter(|c| c.kind == kind && c.kernel == kernel)
            .take(top)
            .cloned()
            .collect()
    };
    for (label, changes) in [
        ("Regressed", &report.regressions),
        ("Improved", &report.improvements),
    ] {
        let user = pick(changes, EntityKind::Function, false);
        let kernel = pick(changes, EntityKind::Function, true);
        let stacks = pick(changes, EntityKind::Stack, false);
        table(
            &mut out,
            &format!("{label} functions (your code)"),
            &user.iter().collect::<Vec<_>>(),
            unit,
            true,
        );
        table(
            &mut out,
            &format!("{label} kernel functions"),
            &kernel.iter().collect::<Vec<_>>(),
            unit,
            true,
        );
        table(
            &mut out,
            &format!("{label} stacks"),
            &stacks.iter().collect::<Vec<_>>(),
            unit,
            false,
        );
    }
    for (label, changes) in [
        ("Slower queries", &report.query_regressions),
        ("Faster queries", &report.query_improvements),
    ] {
        if changes.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\n### {label}\n\n| query | process | source | calls (base → new) | mean ms (base → new) | change | p (Holm) |\n|---|---|---|---|---|---|---|"
        );
        for c in changes.iter().take(top) {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} → {} | {:.3} → {:.3} | {:+.0}% | {:.2e} |",
                c.fingerprint.replace('|', "\\|"),
                c.comm,
                c.source,
                c.base_calls,
                c.new_calls,
                c.base_mean_ms,
                c.new_mean_ms,
                c.relative * 100.0,
                c.p_adjusted
            );
        }
    }
    if report.queries_tested > 0 {
        let _ = writeln!(
            out,
            "\nQueries: {} in both captures tested (one-sided Welch's t-test on call latencies, \
             Holm-corrected, and growth of at least {:.0}% and {:.2} ms).",
            report.queries_tested,
            report.relative_threshold * 100.0,
            crate::compare::QUERY_MIN_ABS_NS / 1e6
        );
    }
    let _ = writeln!(
        out,
        "\n{} regressions, {} improvements, {} changes past the thresholds but not significant, \
         {} stacks and functions tested.",
        report.regressions.len(),
        report.improvements.len(),
        report.not_significant,
        report.entities_tested
    );
    if report.kind == InputKind::Folded {
        let _ = writeln!(out, "\nValues are the folded files' own counts.");
    }
    out
}

/// Writes `diff.svg`, `diff.folded`, `report.md` and `report.json` into `dir`.
pub fn write_all(report: &Report, dir: &Path, top: usize) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    differential_svg(report, &dir.join("diff.svg"))?;
    let mut folded = differential_folded(report).join("\n");
    folded.push('\n');
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("cannot write {}", dir.join(name).display()))
    };
    write("diff.folded", &folded)?;
    write("report.md", &markdown(report, top))?;
    write(
        "report.json",
        &serde_json::to_string_pretty(report).context("serializing the report failed")?,
    )?;
    Ok(())
}
