use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = profiler::cli::Cli::parse();
    match profiler::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line: what failed and why, causes joined by ": ".
            eprintln!("profiler: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
