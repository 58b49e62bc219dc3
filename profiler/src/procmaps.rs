//! Process memory maps, read while a process lives and kept after it exits, so that user
//! addresses can be turned into (file, file offset) pairs at the end of a capture.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One file-backed (or special) executable mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    /// File path, or a pseudo name such as `[vdso]`.
    pub path: String,
    /// For a file deleted since it was mapped (`… (deleted)`: a package upgrade, a memfd):
    /// `/proc/self/fd/N` of our own descriptor for it, opened through
    /// `/proc/PID/map_files/` while the process lived, so it can be symbolized after.
    pub open_path: Option<String>,
}

impl Vma {
    /// Whether the mapping is a file that can be opened for symbolization.
    pub fn is_file(&self) -> bool {
        self.open_path.is_some()
            || (self.path.starts_with('/') && !self.path.ends_with(" (deleted)"))
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
    /// Descriptors of deleted mapped files (see `Vma::open_path`), held for the capture.
    held: Vec<std::sync::Arc<fs::File>>,
    /// Set once /proc no longer has the process.
    pub exited: bool,
}

/// Where an address lands in a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location<'a> {
    /// In a file: the file's path and the offset in it.
    File { path: &'a str, offset: u64 },
    /// In a special mapping (`[vdso]`, a deleted file…): the name and the offset in it.
    Special { name: &'a str, offset: u64 },
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
        let _ = (fields.next(), fields.next());
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
        });
    }
    vmas
}

impl ProcessInfo {
    /// Where `addr` lands in this process's mappings.
    pub fn locate(&self, addr: u64) -> Location<'_> {
        match self
            .vmas
            .iter()
            .find(|vma| vma.start <= addr && addr < vma.end)
        {
            Some(vma) if vma.is_file() => Location::File {
                path: vma.open_path.as_deref().unwrap_or(&vma.path),
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
}

/// Re-read a live process's maps at most this often (it may have loaded libraries).
const REFRESH_EVERY: Duration = Duration::from_millis(500);

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
        if entry.exited || entry.read_at.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return;
        }
        refresh(entry);
    }

    /// Re-reads every live process (the end of a capture).
    pub fn refresh_all(&mut self) {
        for entry in self.processes.values_mut() {
            if !entry.exited {
                refresh(entry);
            }
        }
    }

    pub fn get(&self, pid: u32) -> Option<&ProcessInfo> {
        self.processes.get(&pid)
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

fn refresh(entry: &mut ProcessInfo) {
    let base = PathBuf::from(format!("/proc/{}", entry.pid));
    let Ok(maps) = fs::read_to_string(base.join("maps")) else {
        entry.exited = true;
        return;
    };
    let mut vmas = parse_maps(&maps);
    hold_deleted_files(entry, &mut vmas);
    if vmas.is_empty() && !entry.vmas.is_empty() {
        // A zombie: its memory is gone, keep what we read while it lived.
        entry.exited = true;
        return;
    }
    // Keep mappings seen earlier that are gone now (an unloaded library may still hold
    // addresses captured before).
    let mut merged = vmas;
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
    entry.read_at = Some(Instant::now());
}

/// At most this many deleted files held open per process.
const MAX_HELD: usize = 64;

/// Opens the deleted files among `vmas` through `/proc/PID/map_files/` (once per mapping),
/// so that they can still be read when the capture is symbolized.
fn hold_deleted_files(entry: &mut ProcessInfo, vmas: &mut [Vma]) {
    use std::os::fd::AsRawFd as _;
    for vma in vmas.iter_mut() {
        if !vma.path.starts_with('/') || !vma.path.ends_with(" (deleted)") {
            continue;
        }
        if let Some(old) = entry
            .vmas
            .iter()
            .find(|old| (old.start, old.end, &old.path) == (vma.start, vma.end, &vma.path))
            && old.open_path.is_some()
        {
            vma.open_path = old.open_path.clone();
            continue;
        }
        if entry.held.len() >= MAX_HELD {
            continue;
        }
        let link = format!(
            "/proc/{}/map_files/{:x}-{:x}",
            entry.pid, vma.start, vma.end
        );
        if let Ok(file) = fs::File::open(link) {
            vma.open_path = Some(format!("/proc/self/fd/{}", file.as_raw_fd()));
            entry.held.push(std::sync::Arc::new(file));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                offset: 0x20010
            }
        );
        assert_eq!(
            info.locate(0x7f0000000100),
            Location::File {
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6",
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
}
