//! The data directory: windows and on-demand captures by name, and retention by count, age
//! and size. A window or capture is recorded under a staging name (`.partial-window-…`) and
//! renamed to its own once every file is written and synced, so a `window-…` directory is
//! always complete: a crash or a full disk mid-write leaves only a staging directory, which
//! the next start removes.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::State;
use super::config::Settings;
use super::http::CAPTURES_KEPT;

/// The directories under `data_dir` named `PREFIX<unix ms>`, oldest first.
pub(crate) fn dirs_named(data_dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Where a window or capture named `name` is written until it is complete.
pub(crate) fn staging_name(name: &str) -> String {
    format!("{STAGING_PREFIX}{name}")
}

const STAGING_PREFIX: &str = ".partial-";

/// The final directory of a staging one (`.partial-window-1` → `window-1`).
pub(crate) fn published_path(staging: &Path) -> PathBuf {
    let name = staging
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    staging.with_file_name(name.strip_prefix(STAGING_PREFIX).unwrap_or(name))
}

/// Gives a finished staging directory its name, durably: the rename, then the data
/// directory synced (the files inside were synced as they were written).
pub(crate) fn publish(staging: &Path, dir: &Path) -> Result<()> {
    std::fs::rename(staging, dir)
        .with_context(|| format!("cannot rename {} to {}", staging.display(), dir.display()))?;
    if let Some(parent) = dir.parent() {
        crate::render::outputs::sync_dir(parent)?;
    }
    Ok(())
}

/// Removes what an interrupted run left: staging directories, and window or capture
/// directories without a capture file (written before staging existed). Returns how many.
/// With `only_windows`, on-demand captures' staging directories stay (one may be running).
pub(crate) fn remove_leftovers(data_dir: &Path, only_windows: bool) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(data_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        let half_written = match name.strip_prefix(STAGING_PREFIX) {
            Some(rest) => !only_windows || rest.starts_with("window-"),
            None => {
                !only_windows
                    && (name.starts_with("window-") || name.starts_with("capture-"))
                    && path.is_dir()
                    && !path.join(crate::model::CAPTURE_FILE).is_file()
            }
        };
        if half_written && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Keeps the newest `CAPTURES_KEPT` on-demand captures.
pub(crate) fn prune_captures(data_dir: &Path) {
    let mut captures = dirs_named(data_dir, "capture-");
    while captures.len() > CAPTURES_KEPT {
        let _ = std::fs::remove_dir_all(captures.remove(0));
    }
}

/// A window kept on disk, by its directory name (`window-1795890779754`) or its unix ms.
pub(crate) fn kept_window(state: &State, name: &str) -> Option<PathBuf> {
    state
        .kept
        .iter()
        .find(|dir| {
            dir.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == name || n.strip_prefix("window-") == Some(name))
        })
        .cloned()
}

/// Bytes under a directory.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Removes the oldest windows past the count, age and size limits (the newest stays).
pub(crate) fn apply_retention(kept: &mut Vec<PathBuf>, settings: &Settings) {
    // Windows removed behind our back (the data directory deleted) are no longer kept.
    kept.retain(|dir| dir.is_dir());
    loop {
        if kept.len() <= 1 {
            return;
        }
        let too_many = kept.len() > settings.keep;
        let too_old = settings.max_age.is_some_and(|max| {
            std::fs::metadata(&kept[0])
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max)
        });
        let too_big = settings
            .max_bytes
            .is_some_and(|max| kept.iter().map(|d| dir_bytes(d)).sum::<u64>() > max);
        if !(too_many || too_old || too_big) {
            return;
        }
        let old = kept.remove(0);
        let _ = std::fs::remove_dir_all(&old);
    }
}
