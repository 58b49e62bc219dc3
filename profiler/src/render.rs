//! Views of a Capture: folded stacks, flamegraph SVG (inferno), and the text summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use inferno::flamegraph::{self, Options, Palette, color::BasicPalette};

use crate::model::{Capture, Frame, FrameKind, Stack};

/// Folded-stack lines (`comm;root;…;leaf microseconds`), identical stacks merged, sorted.
/// Kernel frames carry the `_[k]` suffix that FlameGraph and inferno colour as kernel code.
pub fn folded(stacks: &[Stack]) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for stack in stacks {
        *merged.entry(folded_path(stack)).or_default() += stack.total_ns;
    }
    merged
        .into_iter()
        .filter_map(|(path, ns)| {
            let us = (ns + 500) / 1000;
            (us > 0).then(|| format!("{path} {us}"))
        })
        .collect()
}

/// The `;`-joined path of a stack, process name first.
pub fn folded_path(stack: &Stack) -> String {
    let mut path = clean(&stack.comm);
    for frame in &stack.frames {
        path.push(';');
        path.push_str(&frame_label(frame));
    }
    path
}

pub fn frame_label(frame: &Frame) -> String {
    let name = clean(&frame.name);
    match frame.kind {
        FrameKind::Kernel => format!("{name}_[k]"),
        _ => name,
    }
}

/// Folded lines are `;`-separated and end with ` count`: keep names from breaking either.
fn clean(name: &str) -> String {
    let name = name.replace(';', ":").replace(['\n', '\r'], " ");
    if name.is_empty() {
        "[unnamed]".to_string()
    } else {
        name
    }
}

/// Writes a flamegraph SVG of folded lines to a file.
pub fn flamegraph_svg(lines: &[String], title: &str, count_name: &str, path: &Path) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    write_flamegraph(lines, title, count_name, std::io::BufWriter::new(file))
}

/// Writes a flamegraph SVG of folded lines (inferno; blue palette, counts in `count_name`).
pub fn write_flamegraph<W: std::io::Write>(
    lines: &[String],
    title: &str,
    count_name: &str,
    writer: W,
) -> Result<()> {
    let mut options = Options::default();
    options.title = title.to_string();
    options.count_name = count_name.to_string();
    options.colors = Palette::Basic(BasicPalette::Blue);
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

/// The text summary as Markdown, with the capture's metadata.
pub fn markdown_summary(capture: &Capture, top: usize) -> String {
    let meta = &capture.metadata;
    format!(
        "# Off-CPU capture\n\nHost `{}`, kernel `{}`, {:.1} s, {} intervals, attach `{}`, \
         profiler {}.\n\n```\n{}```\n",
        meta.host,
        meta.kernel,
        meta.duration_ns as f64 / 1e9,
        meta.interval_ends_ns.len(),
        meta.attach,
        meta.profiler_version,
        summary(capture, top)
    )
}

fn seconds(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    if s >= 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{:.3} ms", ns as f64 / 1e6)
    }
}

/// The short text summary: totals, losses, and the top blocking stacks.
pub fn summary(capture: &Capture, top: usize) -> String {
    let mut out = String::new();
    let meta = &capture.metadata;
    let Some(offcpu) = &capture.offcpu else {
        return "no off-CPU data\n".to_string();
    };
    let total: u64 = offcpu.stacks.iter().map(|s| s.total_ns).sum();
    let blocks: u64 = offcpu.stacks.iter().map(|s| s.count).sum();
    let _ = writeln!(
        out,
        "off-CPU: {} blocked in {} blocks, {} stacks, {} processes ({:.3} s capture, {})",
        seconds(total),
        blocks,
        offcpu.stacks.len(),
        offcpu.processes.len(),
        meta.duration_ns as f64 / 1e9,
        meta.attach,
    );
    let counter = |name: &str| meta.counters.get(name).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "losses: stack collisions {}, kernel stack errors {}, start map full {}, \
         aggregation map full {} ({} lost), new-task events lost {}; \
         unresolved frames: user {}/{}, kernel {}/{}",
        counter("stack_collisions"),
        counter("kernel_stack_errors"),
        counter("start_map_full"),
        counter("agg_map_full"),
        seconds(counter("lost_ns")),
        counter("events_lost"),
        counter("unresolved_user_frames"),
        counter("user_frames"),
        counter("unresolved_kernel_frames"),
        counter("kernel_frames"),
    );
    // Merge threads of a process that blocked in the same place.
    let mut merged: BTreeMap<(String, u32, String), (u64, u64, &Stack)> = BTreeMap::new();
    for stack in &offcpu.stacks {
        let entry = merged
            .entry((folded_path(stack), stack.pid, stack.state.clone()))
            .or_insert((0, 0, stack));
        entry.0 += stack.total_ns;
        entry.1 += stack.count;
    }
    let mut ranked: Vec<_> = merged.into_values().collect();
    ranked.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    let _ = writeln!(out, "top blocking stacks:");
    for (rank, (ns, count, stack)) in ranked.iter().take(top).enumerate() {
        let avg = if *count > 0 { ns / count } else { 0 };
        let _ = writeln!(
            out,
            "{:>3}. {:>12}  {:>7} blocks  avg {:>10}  {}[{}] {}",
            rank + 1,
            seconds(*ns),
            count,
            seconds(avg),
            stack.comm,
            stack.pid,
            stack.state,
        );
        let _ = writeln!(out, "     {}", short_stack(&stack.frames));
    }
    out
}

/// Leaf-first, a few user frames then the innermost kernel frame: where it waited, and why.
fn short_stack(frames: &[Frame]) -> String {
    let user: Vec<&str> = frames
        .iter()
        .rev()
        .filter(|f| f.kind != FrameKind::Kernel)
        .take(4)
        .map(|f| f.name.as_str())
        .collect();
    // The first kernel frame outside the scheduler says what the thread waited in.
    let kernel = frames
        .iter()
        .rev()
        .filter(|f| f.kind == FrameKind::Kernel)
        .find(|f| !f.name.contains("schedule"))
        .map(|f| f.name.as_str())
        .unwrap_or("-");
    format!("{}  |  {kernel}", user.join(" <- "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, kind: FrameKind) -> Frame {
        Frame {
            name: name.into(),
            kind,
            module: None,
            offset: None,
            inlined: false,
            unresolved: false,
        }
    }

    fn stack(tid: u32, ns: u64) -> Stack {
        Stack {
            pid: 1,
            tid,
            comm: "app".into(),
            state: "sleep".into(),
            frames: vec![
                frame("main", FrameKind::User),
                frame("wait;here", FrameKind::User),
                frame("schedule", FrameKind::Kernel),
            ],
            total_ns: ns,
            count: 1,
            intervals: vec![ns],
        }
    }

    #[test]
    fn folded_merges_threads_and_marks_kernel_frames() {
        let lines = folded(&[stack(1, 1_000_000), stack(2, 499), stack(3, 2_000_000)]);
        assert_eq!(
            lines,
            vec!["app;main;wait:here;schedule_[k] 3000".to_string()]
        );
    }

    #[test]
    fn renders_an_svg_with_title_and_units() {
        let dir = std::env::temp_dir().join(format!("profiler-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        flamegraph_svg(
            &["app;main;sleep_[k] 30".to_string()],
            "Off-CPU time",
            "us",
            &path,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("Off-CPU time"));
        assert!(svg.contains("main"));
        assert!(svg.contains("30 us"));
        flamegraph_svg(&[], "Off-CPU time", "us", &path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
