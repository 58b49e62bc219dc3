//! profiler: an eBPF kernel-level latency profiler.
//!
//! Data flow: `probes` (load/attach/read the kernel programs) → `record` (per-interval
//! snapshots) → `symbolize` → `model::Capture` → `render` (folded, SVG, summary).

pub mod btf;
pub mod cli;
pub mod model;
pub mod probes;
pub mod procmaps;
pub mod record;
pub mod render;
pub mod symbolize;

use anyhow::Result;

/// Runs a parsed command line.
pub fn run(cli: cli::Cli) -> Result<()> {
    match cli.command {
        cli::Command::Record(args) => {
            let options = args.into_options()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(record::record(options))?;
            Ok(())
        }
    }
}
