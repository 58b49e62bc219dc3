//! `profiler diff BASE NEW`: regression verdicts (`compare`) and their reports.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli;
use crate::compare;

pub(crate) fn diff_command(args: cli::DiffArgs) -> Result<ExitCode> {
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
        compare::report::write_all(&report, dir, args.top)?;
    }
    print!("{}", compare::report::markdown(&report, args.top));
    if let Some(dir) = &args.output {
        println!("wrote {}", dir.display());
    }
    Ok(if report.regression && args.fail_on_regression {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
