//! PostgreSQL servers: installed and running binaries, and their `query__start` /
//! `query__done` USDT probes.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::DbConfig;
use crate::probes::kernel::usdt::{self, UsdtProbe};

/// A PostgreSQL binary and its two query probes.
#[derive(Debug, Clone)]
pub struct PostgresTarget {
    pub path: PathBuf,
    pub(super) start: UsdtProbe,
    pub(super) done: UsdtProbe,
    /// `statement__status(text)`, when the binary has it with a readable argument.
    pub(super) status: Option<UsdtProbe>,
    /// `query__execute__start` inside PortalRun (not PortalRunMulti's), when found.
    pub(super) execute: Option<UsdtProbe>,
}

/// PostgreSQL server binaries installed the Debian way (`/usr/lib/postgresql/*/bin`).
pub fn postgres_binaries_installed() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/postgres"))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Executables of running PostgreSQL servers (`/proc/PID/exe`, which works across mount
/// namespaces), among `pids` or on the whole host.
pub(super) fn running_postgres(pids: &[u32]) -> Vec<PathBuf> {
    let candidates: Vec<u32> = if pids.is_empty() {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    } else {
        pids.to_vec()
    };
    candidates
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|exe| {
                    exe.file_name()
                        .map(|n| n == "postgres" || n == "postmaster")
                })
                .unwrap_or(false)
        })
        .map(|pid| PathBuf::from(format!("/proc/{pid}/exe")))
        .collect()
}

pub(super) fn discover_postgres(config: &DbConfig, pids: &[u32]) -> Result<Vec<PostgresTarget>> {
    let mut paths = config.postgres_binaries.clone();
    for path in &paths {
        if !path.is_file() {
            bail!("PostgreSQL binary {} does not exist", path.display());
        }
    }
    if paths.is_empty()
        && config.libpq.is_empty()
        && config.sqlite.is_empty()
        && config.mysql.is_empty()
    {
        paths = running_postgres(pids);
        if paths.is_empty() && pids.is_empty() {
            paths = postgres_binaries_installed();
        }
    }
    let mut seen = HashSet::new();
    let mut targets = Vec::new();
    for path in paths {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // the process exited meanwhile
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let probes = usdt::probes(&path)?;
        let find = |name: &str| {
            probes
                .iter()
                .find(|p| p.provider == "postgresql" && p.name == name)
                .cloned()
        };
        match (find("query__start"), find("query__done")) {
            (Some(start), _) if start.args.is_empty() => bail!(
                "{}: cannot read the argument of postgresql:query__start: {}",
                path.display(),
                start
                    .unsupported_args
                    .as_deref()
                    .unwrap_or("the probe has no argument")
            ),
            (Some(start), Some(done)) => {
                let execute = match usdt::function_range(&path, "PortalRun")? {
                    Some((from, to)) => probes
                        .iter()
                        .find(|p| {
                            p.provider == "postgresql"
                                && p.name == "query__execute__start"
                                && (from..to).contains(&p.offset)
                        })
                        .cloned(),
                    None => None,
                };
                targets.push(PostgresTarget {
                    path,
                    start,
                    done,
                    status: find("statement__status").filter(|s| !s.args.is_empty()),
                    execute,
                })
            }
            _ => bail!(
                "{} has no postgresql:query__start/query__done USDT probes (a PostgreSQL built \
                 without --enable-dtrace); cannot time its queries",
                path.display()
            ),
        }
    }
    Ok(targets)
}
