//! Thin wiring, one file per subcommand: arguments in, a library stage called, an exit code
//! out. The engines live in the stages (`collect`, `compare`, `render`, `serve`).

mod daemon;
mod diff;
mod record;
mod report;
pub mod top;

use std::process::ExitCode;

use crate::cli;

/// Runs a parsed command line; prints errors as one line and returns the exit code:
/// 0 success, 1 runtime failure (or a regression with `diff --fail-on-regression`),
/// 2 usage or input error (`diff`, `report`).
pub fn run(cli: cli::Cli) -> ExitCode {
    let (result, error_code) = match cli.command {
        cli::Command::Record(args) => (record::record_command(*args), 1),
        cli::Command::Diff(args) => (diff::diff_command(args), 2),
        cli::Command::Report(args) => (report::report_command(args).map(|()| ExitCode::SUCCESS), 2),
        cli::Command::Top(args) => (top::run(args).map(|()| ExitCode::SUCCESS), 1),
        cli::Command::Daemon(args) => (daemon::daemon_command(args).map(|()| ExitCode::SUCCESS), 1),
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
