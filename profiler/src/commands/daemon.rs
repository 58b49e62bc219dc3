//! `profiler daemon`: the long-running service (`serve`).

use anyhow::Result;

use crate::{cli, serve};

pub(crate) fn daemon_command(args: cli::DaemonArgs) -> Result<()> {
    serve::run(args)
}
