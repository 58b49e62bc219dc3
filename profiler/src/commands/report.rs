//! `profiler report CAPTURE`: one view of a saved capture (folded, SVG, JSON, Markdown,
//! pprof) to a file or standard output.

use std::io::Write as _;

use anyhow::{Context as _, Result};

use crate::{cli, model, render};

pub(crate) fn report_command(args: cli::ReportArgs) -> Result<()> {
    let capture = model::Capture::load(&args.capture)?;
    let grouped = render::group_roots(&capture, args.group_by);
    // folded and svg render one family: off-CPU when the capture has it, else on-CPU.
    let (lines, style) = match (&grouped.offcpu, &grouped.oncpu) {
        (Some(offcpu), _) => (
            render::folded(&offcpu.stacks, |s| s.total_ns, 1000),
            &render::OFFCPU_STYLE,
        ),
        (None, Some(oncpu)) => (
            render::folded(&oncpu.stacks, |s| s.count, 1),
            &render::ONCPU_STYLE,
        ),
        (None, None) => (Vec::new(), &render::OFFCPU_STYLE),
    };
    let bytes: Vec<u8> = match args.format {
        cli::ReportFormat::Folded => {
            let mut text = lines.join("\n");
            text.push('\n');
            text.into_bytes()
        }
        cli::ReportFormat::Svg => {
            let mut svg = Vec::new();
            render::write_flamegraph(&lines, style, &mut svg)?;
            svg
        }
        cli::ReportFormat::Json => serde_json::to_vec_pretty(&capture)?,
        cli::ReportFormat::Md => render::markdown_summary(&capture, args.top).into_bytes(),
        cli::ReportFormat::Pprof => render::pprof::gzipped(&capture)?,
    };
    match &args.output {
        Some(path) => std::fs::write(path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout()
            .write_all(&bytes)
            .context("cannot write to standard output")?,
    }
    Ok(())
}
