//! profiler: an eBPF kernel-level latency profiler.
//!
//! Data flow: `probes` (load/attach/read the kernel programs) → `record` (per-interval
//! snapshots) → `symbolize` → `model::Capture` → `render` (folded, SVG, summary).

pub mod btf;
pub mod cli;
pub mod compare;
pub mod daemon;
pub mod dbstats;
pub mod diffreport;
pub mod folded;
pub mod model;
pub mod pprof;
pub mod probes;
pub mod procmaps;
pub mod promtext;
pub mod record;
pub mod render;
pub mod stats;
pub mod symbolize;
pub mod syscall_names;
pub mod tcpstats;
pub mod top;
pub mod unwind;
pub mod uprobe;
pub mod usdt;
pub mod wire;

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

/// Runs a parsed command line; prints errors as one line and returns the exit code:
/// 0 success, 1 runtime failure (or a regression with `diff --fail-on-regression`),
/// 2 usage or input error (`diff`, `report`).
pub fn run(cli: cli::Cli) -> ExitCode {
    let (result, error_code) = match cli.command {
        cli::Command::Record(args) => (record_command(*args), 1),
        cli::Command::Diff(args) => (diff_command(args), 2),
        cli::Command::Report(args) => (report_command(args).map(|()| ExitCode::SUCCESS), 2),
        cli::Command::Top(args) => (top::run(args).map(|()| ExitCode::SUCCESS), 1),
        cli::Command::Daemon(args) => (daemon::run(args).map(|()| ExitCode::SUCCESS), 1),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line: what failed and why, causes joined by ": ".
            eprintln!("profiler: error: {err:#}");
            ExitCode::from(error_code)
        }
    }
}

fn record_command(args: cli::RecordArgs) -> Result<ExitCode> {
    if let Some(address) = &args.from_daemon {
        let seconds = args.duration.as_secs_f64().ceil().max(1.0) as u64;
        daemon::capture_from_daemon(address, seconds, &args.pids, &args.output, args.top)?;
        return Ok(ExitCode::SUCCESS);
    }
    let options = args.into_options()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(record::record(options))?;
    Ok(ExitCode::SUCCESS)
}

fn diff_command(args: cli::DiffArgs) -> Result<ExitCode> {
    if !(args.threshold >= 0.0 && args.alpha > 0.0 && args.alpha < 1.0) {
        anyhow::bail!("--threshold must be >= 0 and --alpha between 0 and 1");
    }
    let base = compare::Profile::load(&args.base)?;
    let new = compare::Profile::load(&args.new)?;
    let thresholds = compare::Thresholds {
        relative: args.threshold / 100.0,
        min_abs: args.min_abs,
        alpha: args.alpha,
    };
    let report = compare::compare(&base, &new, &thresholds)?;
    if let Some(dir) = &args.output {
        diffreport::write_all(&report, dir, args.top)?;
    }
    print!("{}", diffreport::markdown(&report, args.top));
    if let Some(dir) = &args.output {
        println!("wrote {}", dir.display());
    }
    Ok(if report.regression && args.fail_on_regression {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn report_command(args: cli::ReportArgs) -> Result<()> {
    let capture = model::Capture::load(&args.capture)?;
    // folded and svg render one family: off-CPU when the capture has it, else on-CPU.
    let (lines, style) = match (&capture.offcpu, &capture.oncpu) {
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
        cli::ReportFormat::Pprof => pprof::gzipped(&capture)?,
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
