use clap::Parser as _;

fn main() -> std::process::ExitCode {
    profiler::run(profiler::cli::Cli::parse())
}
