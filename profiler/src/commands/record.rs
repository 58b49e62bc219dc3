//! `profiler record`: a local capture (`collect`), or one asked of a running daemon.

use std::process::ExitCode;

use anyhow::Result;

use crate::{cli, collect, serve};

pub(crate) fn record_command(args: cli::RecordArgs) -> Result<ExitCode> {
    if let Some(address) = &args.from_daemon {
        let seconds = args.duration.as_secs_f64().ceil().max(1.0) as u64;
        let token = match &args.token_file {
            Some(path) => Some(serve::read_token(path)?),
            None => None,
        };
        serve::capture_from_daemon(
            address,
            seconds,
            &args.pids,
            &args.output,
            args.top,
            token.as_deref(),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let options = args.into_options()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let recorded = runtime.block_on(collect::record(options));
    collect::wait_for_detach();
    recorded?;
    Ok(ExitCode::SUCCESS)
}
