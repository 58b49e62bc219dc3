//! The data directory: windows and on-demand captures by name, and retention by count, age
//! and size.

use std::path::{Path, PathBuf};

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
