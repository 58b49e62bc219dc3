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
        cli::Command::Completions(args) => (completions(args.shell), 1),
        cli::Command::Manpage { dir } => (manpage(&dir), 1),
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

fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    use clap::CommandFactory as _;
    let mut command = cli::Cli::command();
    clap_complete::generate(shell, &mut command, "profiler", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// The man pages into `dir`: `profiler.1` and one `profiler-SUBCOMMAND.1` per subcommand
/// (the names the top page's SUBCOMMANDS section refers to).
fn manpage(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    use clap::CommandFactory as _;
    let command = cli::Cli::command();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut pages = vec![("profiler.1".to_string(), command.clone())];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name: &'static str = Box::leak(format!("profiler-{}", sub.get_name()).into_boxed_str());
        pages.push((format!("{name}.1"), sub.clone().name(name)));
    }
    for (file, page) in pages {
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        let path = dir.join(&file);
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
