//! The output directory of a capture: `capture.json`, folded stacks and flamegraphs per
//! family, `summary.txt`.

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::model::Capture;
use crate::render;

/// Writes `capture.json`, the folded stacks and flamegraphs of each family recorded, and
/// `summary.txt`, and prints the summary.
pub fn write_outputs(capture: &Capture, dir: &Path, top: usize, print: bool) -> Result<()> {
    capture.save(&dir.join(crate::model::CAPTURE_FILE))?;
    if let Some(offcpu) = &capture.offcpu {
        let lines = render::folded(&offcpu.stacks, |s| s.total_ns, 1000);
        write_folded(&dir.join("offcpu.folded"), &lines)?;
        render::flamegraph_svg(&lines, &render::OFFCPU_STYLE, &dir.join("offcpu.svg"))?;
    }
    if let Some(oncpu) = &capture.oncpu {
        let lines = render::folded(&oncpu.stacks, |s| s.count, 1);
        write_folded(&dir.join("oncpu.folded"), &lines)?;
        render::flamegraph_svg(&lines, &render::ONCPU_STYLE, &dir.join("oncpu.svg"))?;
    }
    if let Some(syscalls) = &capture.syscalls {
        let lines = render::folded(&syscalls.slow, |s| s.total_ns, 1000);
        write_folded(&dir.join("syscalls.folded"), &lines)?;
    }
    if let Some(db) = &capture.db {
        let lines = render::db_folded(db);
        write_folded(&dir.join("db.folded"), &lines)?;
        render::flamegraph_svg(&lines, &render::DB_STYLE, &dir.join("db.svg"))?;
    }
    let wallclock = render::wallclock(capture);
    if !wallclock.is_empty() {
        write_folded(&dir.join("wallclock.folded"), &wallclock)?;
        render::flamegraph_svg(
            &wallclock,
            &render::WALLCLOCK_STYLE,
            &dir.join("wallclock.svg"),
        )?;
    }
    let summary = render::summary(capture, top);
    std::fs::write(dir.join("summary.txt"), &summary)
        .with_context(|| format!("cannot write {}", dir.join("summary.txt").display()))?;
    if print {
        print!("{summary}");
        println!("wrote {}", dir.display());
    }
    Ok(())
}

fn write_folded(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) fn prepare_output_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    let probe = dir.join(".profiler-write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("cannot write to output directory {}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
