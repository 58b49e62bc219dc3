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

/// The cgroup of container `id` (its full id or a prefix of at least 12 hex digits, as
/// `docker ps` shows it): the cgroup2 directory whose path names it (`container_id`).
pub fn resolve_container(id: &str) -> Result<CgroupFilter> {
    if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--container {id}: a container id is at least 12 hexadecimal digits");
    }
    let root = cgroup2_root()?;
    let id = id.to_ascii_lowercase();
    let mut found: Vec<PathBuf> = Vec::new();
    // Breadth first, so a container's own cgroup comes before cgroups nested in it.
    let mut level: Vec<PathBuf> = vec![root.clone()];
    for _ in 0..=CGROUP_MAX_LEVEL {
        let mut next = Vec::new();
        for dir in &level {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if container_id(&name).is_some_and(|c| c.starts_with(&id)) {
                    found.push(path);
                } else {
                    next.push(path);
                }
            }
        }
        if !found.is_empty() || next.is_empty() {
            break;
        }
        level = next;
    }
    let names: Vec<String> = found
        .iter()
        .filter_map(|p| container_id(&p.to_string_lossy()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    match names.as_slice() {
        [] => bail!(
            "--container {id}: no cgroup of that container under {} (on a host whose containers \
             live in cgroup v1 only, use --pid)",
            root.display()
        ),
        [_] => resolve(&found[0]),
        _ => bail!(
            "--container {id}: the prefix names {} containers ({}); give more digits",
            names.len(),
            names.join(", ")
        ),
    }
}

/// The cgroup2 path of process `pid` (`/proc/PID/cgroup`'s `0::` line), while it lives.
pub fn of_process(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_string)
}

/// The container a cgroup2 path belongs to, where a runtime's naming shows it: the innermost
/// component that is a 64-hex-digit id, bare (cgroupfs drivers: `/docker/ID`,
/// `/kubepods/burstable/podUID/ID`) or in a runtime's scope (`docker-ID.scope`,
/// `cri-containerd-ID.scope`, `crio-ID.scope`, `libpod-ID.scope`), and LXC's `lxc.payload.NAME`.
/// The runtimes' own monitor scopes (`crio-conmon-…`, `libpod-conmon-…`) are not containers.
pub fn container_id(path: &str) -> Option<String> {
    const PREFIXES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];
    for component in path.rsplit('/') {
        if let Some(name) = component.strip_prefix("lxc.payload.") {
            return (!name.is_empty()).then(|| name.to_string());
        }
        let name = component.strip_suffix(".scope").unwrap_or(component);
        let id = PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(id.to_ascii_lowercase());
        }
    }
    None
}

/// The systemd unit a cgroup2 path belongs to: its innermost `.service` or `.scope`.
pub fn systemd_unit(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
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
    fn containers_and_units_are_named_from_the_runtimes_cgroup_paths() {
        let id = "3f1e7a0b9c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7";
        for (path, container, unit) in [
            (
                format!("/system.slice/docker-{id}.scope"),
                Some(id),
                Some(format!("docker-{id}.scope")),
            ),
            (format!("/docker/{id}"), Some(id), None),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b.slice/cri-containerd-{id}.scope"
                ),
                Some(id),
                Some(format!("cri-containerd-{id}.scope")),
            ),
            (format!("/kubepods/besteffort/pod1a2b/{id}"), Some(id), None),
            (
                format!("/machine.slice/libpod-{id}.scope/container"),
                Some(id),
                Some(format!("libpod-{id}.scope")),
            ),
            (
                format!("/machine.slice/libpod-conmon-{id}.scope"),
                None,
                Some(format!("libpod-conmon-{id}.scope")),
            ),
            (
                format!("/system.slice/crio-conmon-{id}.scope"),
                None,
                Some(format!("crio-conmon-{id}.scope")),
            ),
            (
                "/lxc.payload.web1/system.slice/nginx.service".to_string(),
                Some("web1"),
                Some("nginx.service".to_string()),
            ),
            (
                "/system.slice/nginx.service".to_string(),
                None,
                Some("nginx.service".to_string()),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope".to_string(),
                None,
                Some("app-foo.scope".to_string()),
            ),
            ("/".to_string(), None, None),
        ] {
            assert_eq!(container_id(&path).as_deref(), container, "{path}");
            assert_eq!(systemd_unit(&path), unit, "{path}");
        }
    }

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
