//! `profiler record`: a local capture (`collect`), or one asked of a running daemon.

use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::{cli, collect, export, serve};

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
    // Where the capture goes once written: checked before any probe is loaded.
    let mut pushes = Vec::new();
    for (sink, url, flag) in [
        (
            args.otlp_protocol.sink(),
            &args.otlp_endpoint,
            "--otlp-endpoint",
        ),
        (export::PYROSCOPE, &args.pyroscope_url, "--pyroscope-url"),
    ] {
        if let Some(url) = url {
            pushes.push((sink, export::Endpoint::parse(url).context(flag)?));
        }
    }
    let options = args.into_options()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let recorded = runtime.block_on(collect::record(options));
    collect::wait_for_detach();
    let capture = recorded?;
    for (sink, endpoint) in pushes {
        if export::push_once(sink, &endpoint, &capture)? {
            eprintln!("pushed the capture to {} ({})", endpoint.url, sink.name);
        } else {
            eprintln!(
                "nothing to push to {} ({}): the capture has no sample it shows",
                endpoint.url, sink.name
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
