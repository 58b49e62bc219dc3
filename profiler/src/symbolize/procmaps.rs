//! Process memory maps, read while a process lives and kept after it exits, so that user
//! addresses can be turned into (file, file offset) pairs at the end of a capture.
//!
//! A mapped file that cannot be opened by its path — deleted since it was mapped (a package
//! upgrade), a memfd, or a path in another mount namespace (a container) — is opened through
//! `/proc/PID/map_files/START-END` while the process lives, and the descriptor kept for the
//! capture: symbolization then reads it as `/proc/self/fd/N`, even after the process exits.
//! So is a file replaced at its path since it was mapped (a rebuild, an upgrade by rename):
//! its path now holds another inode. One replaced after its process exited cannot be read any
//! more; its frames stay unresolved, marked `(replaced)`, and count as `unreachable_files`,
//! rather than being symbolized with the new file's symbols.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::perfmap::{self, PerfMap};

/// One file-backed (or special) executable mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    /// File path, or a pseudo name such as `[vdso]`.
    pub path: String,
    /// Where the file opens when `path` does not (`/proc/self/fd/N`, see the module doc).
    pub open_path: Option<String>,
    /// The mapped file's inode (0 for anonymous and special mappings).
    pub inode: u64,
}

impl Vma {
    /// Whether the mapping is a file that can be opened for symbolization.
    pub fn is_file(&self) -> bool {
        self.open_path.is_some()
            || self.path.starts_with('/')
                && !self.path.ends_with(" (deleted)")
                && !self.path.ends_with(" (replaced)")
    }

    /// A mapped file its path does not reach from here: deleted or a memfd (`… (deleted)`),
    /// or replaced by another file at the same path.
    fn needs_map_files(&self, foreign_mounts: bool) -> bool {
        self.path.starts_with('/')
            && (foreign_mounts || self.path.ends_with(" (deleted)") || self.replaced())
    }

    /// Whether the file at `path` is no longer the one mapped (another inode there now).
    fn replaced(&self) -> bool {
        self.inode != 0
            && self.path.starts_with('/')
            && fs::metadata(&self.path).is_ok_and(|meta| meta.ino() != self.inode)
    }
}

/// What we know of a process: its name, executable and executable mappings.
#[derive(Debug, Clone, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub vmas: Vec<Vma>,
    /// When the maps were last read; `None` if they never could be.
    read_at: Option<Instant>,
    /// When it last exec'd (while recorded).
    execd_at: Option<Instant>,
    /// Set once /proc no longer has the process.
    pub exited: bool,
    /// A kernel thread (PF_KTHREAD): it has no user stack to show.
    pub kernel_thread: bool,
    /// The names its JIT or interpreter gave its generated code (read while it lives, only
    /// for processes with anonymous executable memory).
    pub perf_map: Option<Arc<PerfMap>>,
    /// Its cgroup2 path, read while it lived.
    pub cgroup: Option<String>,
}

/// Where an address lands in a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location<'a> {
    /// In a file: the file's path, where it opens (the path itself, or a kept descriptor),
    /// and the offset in it.
    File {
        path: &'a str,
        open: &'a str,
        offset: u64,
    },
    /// In a special mapping (`[vdso]`, a deleted file…): the name and the offset in it.
    Special { name: &'a str, offset: u64 },
    /// Generated code its perf map names: the name, the map, and the offset in the code.
    PerfMap {
        symbol: &'a str,
        map: &'a str,
        offset: u64,
    },
    /// In no mapping we know of.
    Unknown,
}

/// Parses the executable mappings of a `/proc/PID/maps` text.
pub fn parse_maps(text: &str) -> Vec<Vma> {
    let mut vmas = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(offset)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !perms.contains('x') {
            continue;
        }
        // dev and inode, then the path (which may contain spaces).
        let _dev = fields.next();
        let inode = fields.next().and_then(|i| i.parse().ok()).unwrap_or(0);
        let path = fields.collect::<Vec<_>>().join(" ");
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(file_offset)) = (
            u64::from_str_radix(start, 16),
            u64::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        vmas.push(Vma {
            start,
            end,
            file_offset,
            path: if path.is_empty() {
                "[anon]".to_string()
            } else {
                path
            },
            open_path: None,
            inode,
        });
    }
    vmas
}

impl ProcessInfo {
    /// Where `addr` lands in this process's mappings.
    pub fn locate(&self, addr: u64) -> Location<'_> {
        let vma = self
            .vmas
            .iter()
            .find(|vma| vma.start <= addr && addr < vma.end);
        if vma.is_none_or(|vma| vma.path == "[anon]")
            && let Some(map) = &self.perf_map
            && let Some((symbol, offset)) = map.lookup(addr)
        {
            return Location::PerfMap {
                symbol,
                map: &map.path,
                offset,
            };
        }
        match vma {
            Some(vma) if vma.is_file() => Location::File {
                path: &vma.path,
                open: vma.open_path.as_deref().unwrap_or(&vma.path),
                offset: addr - vma.start + vma.file_offset,
            },
            Some(vma) => Location::Special {
                name: &vma.path,
                offset: addr - vma.start + vma.file_offset,
            },
            None => Location::Unknown,
        }
    }
}

/// Processes seen during a capture, by tgid.
#[derive(Debug, Default)]
pub struct ProcessCache {
    processes: HashMap<u32, ProcessInfo>,
    /// Files opened through `map_files`, by (device, inode): kept open for the capture.
    kept_files: HashMap<(u64, u64), File>,
    /// Mapped files that could not be kept open (the process went first, or `KEPT_FILES_MAX`).
    pub unreachable_files: u64,
}

/// Descriptors kept for files their path does not reach (well below the usual 1024 limit).
const KEPT_FILES_MAX: usize = 256;

/// Re-read a live process's maps at most this often (it may have loaded libraries).
const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// For this long after an exec, a process's maps (and unwinding tables) are read again at
/// each of its first-seen events: its libraries are being mapped.
pub const AFTER_EXEC: Duration = Duration::from_secs(1);

impl ProcessCache {
    /// Notes a process, reading its name and maps now (and again later, at most every
    /// `REFRESH_EVERY`). `kernel_comm` is the thread name the kernel reported, used when the
    /// process is already gone.
    pub fn observe(&mut self, pid: u32, kernel_comm: &str) {
        let entry = self.processes.entry(pid).or_insert_with(|| ProcessInfo {
            pid,
            comm: kernel_comm.to_string(),
            ..Default::default()
        });
        // Just after an exec the dynamic loader is still mapping libraries: each first-seen
        // event reads the maps again.
        let settling = entry.execd_at.is_some_and(|t| t.elapsed() < AFTER_EXEC);
        if entry.exited || (!settling && entry.read_at.is_some_and(|t| t.elapsed() < REFRESH_EVERY))
        {
            return;
        }
        refresh(entry);
        self.unreachable_files += keep_open(entry, &mut self.kept_files);
    }

    /// A process exec'd: its new name now; its maps at its next first-seen event, whenever
    /// they were last read (not now: the dynamic loader has not mapped its libraries yet).
    /// A process not seen yet stays unknown: its first-seen event will read it.
    pub fn exec(&mut self, pid: u32, kernel_comm: &str) {
        if let Some(entry) = self.processes.get_mut(&pid) {
            entry.read_at = None;
            entry.execd_at = Some(Instant::now());
            entry.comm = kernel_comm.to_string();
        }
    }

    /// Re-reads every live process (the end of a capture); in those gone, marks the files
    /// replaced since they were read, which can no longer be (see the module doc).
    pub fn refresh_all(&mut self) {
        for entry in self.processes.values_mut() {
            if !entry.exited {
                refresh(entry);
                self.unreachable_files += keep_open(entry, &mut self.kept_files);
            }
            if entry.exited {
                self.unreachable_files += mark_replaced(entry);
            }
        }
    }

    pub fn get(&self, pid: u32) -> Option<&ProcessInfo> {
        self.processes.get(&pid)
    }

    /// What the next daemon window starts from: the live processes this capture knows. Each
    /// is read again at its first event there; one that exits before keeps what was read
    /// here (maps, name, executable, cgroup) — a window that first meets a process after its
    /// exit would otherwise have nothing to name its frames with. Kept descriptors are this
    /// cache's: the next one opens its own.
    pub fn seed(&self) -> Vec<ProcessInfo> {
        self.processes
            .values()
            .filter(|p| !p.exited)
            .map(|p| {
                let mut p = p.clone();
                p.read_at = None;
                for vma in &mut p.vmas {
                    vma.open_path = None;
                }
                p
            })
            .collect()
    }

    /// A cache starting from `seed` (another capture's `seed`).
    pub fn seeded(seed: Vec<ProcessInfo>) -> Self {
        Self {
            processes: seed.into_iter().map(|p| (p.pid, p)).collect(),
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &ProcessInfo> {
        self.processes.values()
    }
}

/// Gives the mappings of `entry` that their path does not reach an `open_path` (a kept
/// descriptor). Returns how many could not be given one.
fn keep_open(entry: &mut ProcessInfo, kept: &mut HashMap<(u64, u64), File>) -> u64 {
    let foreign_mounts = match (
        fs::read_link(format!("/proc/{}/ns/mnt", entry.pid)),
        fs::read_link("/proc/self/ns/mnt"),
    ) {
        (Ok(theirs), Ok(ours)) => theirs != ours,
        _ => false,
    };
    let mut unreachable = 0;
    for vma in &mut entry.vmas {
        if vma.open_path.is_some() || !vma.needs_map_files(foreign_mounts) {
            continue;
        }
        let link = format!(
            "/proc/{}/map_files/{:x}-{:x}",
            entry.pid, vma.start, vma.end
        );
        let Ok(meta) = fs::metadata(&link) else {
            unreachable += 1;
            continue;
        };
        let key = (meta.dev(), meta.ino());
        if !kept.contains_key(&key) {
            if kept.len() >= KEPT_FILES_MAX {
                unreachable += 1;
                continue;
            }
            match File::open(&link) {
                Ok(file) => {
                    kept.insert(key, file);
                }
                Err(_) => {
                    unreachable += 1;
                    continue;
                }
            }
        }
        vma.open_path = Some(format!("/proc/self/fd/{}", kept[&key].as_raw_fd()));
    }
    unreachable
}

/// Marks the mappings of `entry` whose file was replaced at its path and was not kept open:
/// they are then not read by path (wrong symbols) but shown as `PATH (replaced)`. Returns
/// how many distinct files.
fn mark_replaced(entry: &mut ProcessInfo) -> u64 {
    let mut marked: Vec<String> = Vec::new();
    for vma in &mut entry.vmas {
        if vma.open_path.is_none() && vma.replaced() {
            if !marked.contains(&vma.path) {
                marked.push(vma.path.clone());
            }
            vma.path = format!("{} (replaced)", vma.path);
        }
    }
    marked.len() as u64
}

/// Whether a `/proc/PID/stat` line is a kernel thread's: PF_KTHREAD in its flags (the 9th
/// field; the name in parentheses may hold spaces and parentheses, so count after the last
/// `)`).
fn is_kernel_thread(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_ascii_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

fn refresh(entry: &mut ProcessInfo) {
    let base = PathBuf::from(format!("/proc/{}", entry.pid));
    let Ok(maps) = fs::read_to_string(base.join("maps")) else {
        entry.exited = true;
        return;
    };
    let vmas = parse_maps(&maps);
    if vmas.is_empty() && !entry.vmas.is_empty() {
        // A zombie: its memory is gone, keep what we read while it lived.
        entry.exited = true;
        return;
    }
    // Keep mappings seen earlier that are gone now (an unloaded library may still hold
    // addresses captured before).
    let mut merged = vmas;
    for vma in &mut merged {
        // A file kept open earlier stays the one read.
        vma.open_path = entry
            .vmas
            .iter()
            .find(|old| old.start == vma.start && old.end == vma.end && old.path == vma.path)
            .and_then(|old| old.open_path.clone());
    }
    for old in entry.vmas.drain(..) {
        if !merged
            .iter()
            .any(|vma| vma.start < old.end && old.start < vma.end)
        {
            merged.push(old);
        }
    }
    entry.vmas = merged;
    if let Ok(comm) = fs::read_to_string(base.join("comm")) {
        entry.comm = comm.trim_end().to_string();
    }
    if let Ok(exe) = fs::read_link(base.join("exe")) {
        entry.exe = Some(exe.to_string_lossy().into_owned());
    }
    if let Ok(stat) = fs::read_to_string(base.join("stat")) {
        entry.kernel_thread = is_kernel_thread(&stat);
    }
    if let Some(cgroup) = crate::probes::cgroup::of_process(entry.pid) {
        entry.cgroup = Some(cgroup);
    }
    if entry.vmas.iter().any(|vma| vma.path == "[anon]") {
        entry.perf_map =
            perfmap::refresh(entry.pid, entry.perf_map.take().map(Arc::unwrap_or_clone))
                .map(Arc::new);
    }
    entry.read_at = Some(Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_threads_are_told_by_their_stat_flags() {
        // Field 9 (flags), counted after the name: kworker has PF_KTHREAD (0x200000).
        let kworker = "42 (kworker/0:1-events) I 2 0 0 0 -1 69238880 0 0 0 0 0 0";
        let user = "4242 (my (odd) app) S 1 4242 4242 0 -1 4194560 120 0 0 0 3 1";
        assert!(is_kernel_thread(kworker));
        assert!(!is_kernel_thread(user));
        assert!(!is_kernel_thread("garbage"));
    }

    const MAPS: &str = "\
55d0c0a00000-55d0c0a20000 r--p 00000000 08:01 1234 /usr/bin/app
55d0c0a20000-55d0c0a80000 r-xp 00020000 08:01 1234 /usr/bin/app
7f0000000000-7f0000010000 r-xp 00028000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000020000-7f0000021000 r-xp 00000000 00:00 0 [vdso]
7f0000030000-7f0000031000 r-xp 00001000 08:01 77 /tmp/my lib.so (deleted)
";

    #[test]
    fn keeps_only_executable_mappings() {
        let vmas = parse_maps(MAPS);
        assert_eq!(vmas.len(), 4);
        assert_eq!(vmas[0].path, "/usr/bin/app");
        assert_eq!(vmas[3].path, "/tmp/my lib.so (deleted)");
    }

    #[test]
    fn locates_addresses_as_file_offsets() {
        let info = ProcessInfo {
            pid: 1,
            vmas: parse_maps(MAPS),
            ..Default::default()
        };
        assert_eq!(
            info.locate(0x55d0c0a20010),
            Location::File {
                path: "/usr/bin/app",
                open: "/usr/bin/app",
                offset: 0x20010
            }
        );
        assert_eq!(
            info.locate(0x7f0000000100),
            Location::File {
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6",
                open: "/usr/lib/x86_64-linux-gnu/libc.so.6",
                offset: 0x28100
            }
        );
        assert_eq!(
            info.locate(0x7f0000020004),
            Location::Special {
                name: "[vdso]",
                offset: 4
            }
        );
        assert!(matches!(
            info.locate(0x7f0000030000),
            Location::Special { .. }
        ));
        assert_eq!(info.locate(0x1000), Location::Unknown);
    }

    /// A file replaced at its path by a rename (how cargo and package managers install) after
    /// its process exited is not read by path: its frames are marked, not misnamed.
    #[test]
    fn a_file_replaced_after_its_process_exited_is_marked_not_read() {
        let dir = std::env::temp_dir().join(format!("profiler-replaced-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app");
        fs::write(&path, b"old").unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        let maps = format!(
            "55d0c0a20000-55d0c0a30000 r-xp 00020000 fd:01 {inode} {}\n",
            path.display()
        );
        let mut vmas = parse_maps(&maps);
        assert_eq!(vmas[0].inode, inode);
        let mut entry = ProcessInfo {
            pid: 1,
            vmas: vmas.clone(),
            exited: true,
            ..Default::default()
        };
        // Untouched: read by its path.
        assert_eq!(mark_replaced(&mut entry), 0);
        assert!(entry.vmas[0].is_file());
        // Replaced by a rename: another inode at the path.
        let new = dir.join("app.new");
        fs::write(&new, b"new").unwrap();
        fs::rename(&new, &path).unwrap();
        assert_ne!(fs::metadata(&path).unwrap().ino(), inode);
        entry.vmas = std::mem::take(&mut vmas);
        assert_eq!(mark_replaced(&mut entry), 1);
        assert!(!entry.vmas[0].is_file());
        assert!(matches!(
            entry.locate(0x55d0c0a20010),
            Location::Special { name, .. } if name.ends_with(" (replaced)")
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
