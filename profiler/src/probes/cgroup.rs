//! `--cgroup PATH`: record only the tasks of cgroup2 subtrees. The filter runs in the kernel:
//! each recorded cgroup's id (its directory's inode in the cgroup2 filesystem) goes in
//! `CGROUP_FILTER`, and a program checks the current task's ancestor at each level a recorded
//! cgroup lies at (`bpf_get_current_ancestor_cgroup_id`), so the subtree's later children
//! and short-lived processes are in from their first event. Events that run outside the task
//! they describe (TCP closes in softirq) use the verdict taken when the task was current.
//!
//! cgroup2 is found in /proc/mounts: `/sys/fs/cgroup` on pure-v2 hosts, elsewhere on hybrid
//! ones (`/sys/fs/cgroup/unified`).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use profiler_common::shared::CGROUP_MAX_LEVEL;

/// One recorded cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupFilter {
    /// As `/proc/PID/cgroup` says it: relative to the cgroup2 root, `/` first.
    pub path: String,
    pub id: u64,
    /// Depth below the root (the root is 0).
    pub level: u32,
}

/// Where cgroup2 is mounted.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let (_, at, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(at))
        })
        .context("--cgroup needs cgroup2, and /proc/mounts has no cgroup2 mount")
}

/// The cgroup `arg` names: a directory under the cgroup2 mount, or a path relative to its
/// root as `/proc/PID/cgroup` prints it (`/system.slice/nginx.service`).
pub fn resolve(arg: &Path) -> Result<CgroupFilter> {
    let root = cgroup2_root()?;
    let dir = if arg.starts_with(&root) {
        arg.to_path_buf()
    } else {
        root.join(arg.strip_prefix("/").unwrap_or(arg))
    };
    let is_cgroup = dir.join("cgroup.procs").is_file();
    let meta = std::fs::metadata(&dir)
        .ok()
        .filter(|m| m.is_dir() && is_cgroup)
        .with_context(|| {
            format!(
                "--cgroup {}: no such cgroup (cgroup2 is mounted at {})",
                arg.display(),
                root.display()
            )
        })?;
    let relative = dir
        .strip_prefix(&root)
        .context("the cgroup lies outside the cgroup2 mount")?;
    let level = relative.components().count() as u32;
    if level > CGROUP_MAX_LEVEL {
        bail!(
            "--cgroup {}: {level} levels below the cgroup2 root, deeper than the {} the filter \
             can check",
            arg.display(),
            CGROUP_MAX_LEVEL
        );
    }
    Ok(CgroupFilter {
        path: format!("/{}", relative.display()),
        id: meta.ino(),
        level,
    })
}

/// The cgroup2 path of process `pid` (`/proc/PID/cgroup`'s `0::` line), while it lives.
pub fn of_process(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_string)
}

/// Bit `1 << level` per level a recorded cgroup lies at (the kernel's `CGROUP_LEVELS`).
pub fn levels(filters: &[CgroupFilter]) -> u32 {
    filters.iter().fold(0, |mask, f| mask | 1 << f.level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_is_named_by_its_mount_path_or_its_proc_path_and_others_are_refused() {
        let Ok(root) = cgroup2_root() else {
            return; // no cgroup2 here: nothing to check
        };
        let mine = of_process(std::process::id()).expect("our own cgroup");
        let by_proc = resolve(Path::new(&mine)).expect("our cgroup by its /proc path");
        let by_mount = resolve(&root.join(mine.trim_start_matches('/'))).expect("by mount path");
        assert_eq!(by_proc, by_mount);
        assert_eq!(
            by_proc.path,
            if mine == "/" {
                "/".to_string()
            } else {
                mine.clone()
            }
        );
        assert_eq!(levels(std::slice::from_ref(&by_proc)), 1 << by_proc.level);
        let err = resolve(Path::new("/no-such-cgroup-here"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such cgroup"), "{err}");
    }
}
