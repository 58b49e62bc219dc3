//! Unwinding tables for user code without frame pointers: per file, the rows the kernel
//! walker follows (`table`), built once per file and shared by every process that maps it;
//! per process, which table covers which address range (`process_tables`).
//!
//! Files are read through `/proc/PID/map_files/` (so a binary deleted by an upgrade, a
//! memfd, or one in another mount namespace is read as the process sees it), falling back
//! to `/proc/PID/root/PATH`. The vDSO has no file: its image is read from `/proc/PID/mem`.
//! Tables are cached for the life of the profiler (a daemon's windows reuse them) by the
//! file's device, inode, size and modification time, and shared by build-id.
//!
//! Hand-written on top of gimli (which evaluates the CFI) because no crate reduces CFI to
//! rows an eBPF program can follow.

mod jit;
pub mod table;

use std::collections::HashMap;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

pub use table::Table;

/// The name of the tables of CPython's perf trampolines (rows relative to their arena).
const TRAMPOLINES: &str = "[python perf trampolines]";

/// A file's table as the cache keeps it.
#[derive(Debug)]
pub struct FileTable {
    /// Unique per table in this process: where the loader placed it is keyed by this.
    pub id: u64,
    /// For messages: the path the table was first read from.
    pub name: String,
    pub table: Table,
}

/// One executable mapping of a process, with its file's table (`None`: a file without one,
/// or one we could not read; and anonymous memory, JIT code).
#[derive(Debug, Clone)]
pub struct MappedTable {
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    pub file: Option<Arc<FileTable>>,
    /// Anonymous executable memory (JIT code).
    pub anonymous: bool,
    /// A CPython interpreter the kernel walker knows: its minor version and `_PyRuntime`'s
    /// ELF address (the process's address is that plus `bias`).
    pub python: Option<(u32, u64)>,
    /// A CPython interpreter of a version the walker does not know (its minor version).
    pub python_unsupported: Option<u32>,
}

/// What the cache did, for the capture's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheStats {
    pub files_built: u64,
    pub files_failed: u64,
    pub rows_built: u64,
    pub build_time: Duration,
}

/// (device, inode, size, mtime): a file's identity without reading it.
pub type StatKey = (u64, u64, u64, i64);

#[derive(Default)]
pub struct TableCache {
    by_stat: HashMap<StatKey, Option<Arc<FileTable>>>,
    by_build_id: HashMap<Vec<u8>, Arc<FileTable>>,
    /// The vDSO is the same image in every process of a kernel (by its size).
    vdso: HashMap<u64, Option<Arc<FileTable>>>,
    /// CPython interpreter files: minor version and `_PyRuntime`'s address, by identity.
    interpreters: HashMap<StatKey, Option<(u32, u64)>>,
    /// CPython perf trampolines, by (pid, arena start, trampolines named in it).
    trampolines: HashMap<(u32, u64, usize), Option<Arc<FileTable>>>,
    next_id: u64,
    pub stats: CacheStats,
}

/// The profiler's one cache: tables outlive captures (the daemon's windows reuse them).
pub fn cache() -> &'static Mutex<TableCache> {
    static CACHE: LazyLock<Mutex<TableCache>> = LazyLock::new(Mutex::default);
    &CACHE
}

impl TableCache {
    /// Every executable mapping of process `pid` with its table, sorted by address. Files
    /// are read and parsed only the first time they are seen.
    pub fn process_tables(&mut self, pid: u32) -> std::io::Result<Vec<MappedTable>> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        let mut perf_map = None;
        let mut out = Vec::new();
        for line in maps.lines() {
            let Some(mapping) = parse_line(line) else {
                continue;
            };
            if !mapping.executable {
                continue;
            }
            let anonymous = mapping.inode == 0 && mapping.path != "[vdso]";
            if anonymous && mapping.path == "[vsyscall]" {
                continue; // the legacy page: nothing calls through it on a modern libc
            }
            let file = if mapping.path == "[vdso]" {
                self.vdso_table(pid, mapping.start, mapping.end)
            } else if mapping.path.starts_with('/') && !anonymous {
                self.file_table(pid, &mapping)
            } else if anonymous {
                let map =
                    perf_map.get_or_insert_with(|| crate::symbolize::perfmap::refresh(pid, None));
                map.as_ref()
                    .and_then(|map| self.trampoline_table(pid, mapping.start, mapping.end, map))
            } else {
                None
            };
            let bias = file.as_ref().and_then(|f| {
                if f.name == TRAMPOLINES {
                    Some(mapping.start) // its rows are relative to the arena
                } else {
                    f.table.bias(mapping.start, mapping.offset)
                }
            });
            let python = match crate::symbolize::python::interpreter_minor(mapping.path) {
                Some(minor) if bias.is_some() => self.interpreter(pid, &mapping, minor),
                _ => None,
            };
            let python_unsupported = crate::symbolize::python::any_interpreter_minor(mapping.path)
                .filter(|minor| {
                    crate::symbolize::python::interpreter_minor(mapping.path) != Some(*minor)
                });
            out.push(MappedTable {
                start: mapping.start,
                end: mapping.end,
                bias: bias.unwrap_or(0),
                file: if bias.is_some() { file } else { None },
                anonymous,
                python,
                python_unsupported,
            });
        }
        out.sort_by_key(|m| m.start);
        Ok(out)
    }

    /// Rows the tables of `pid`'s files will take, without building them: exact for files
    /// built already, else from the size of their CFI sections (about 3.7 bytes of
    /// `.eh_frame` per row on this host; 3 is assumed). Each file is counted once in `seen`.
    pub fn estimate_rows(&self, pid: u32, seen: &mut std::collections::HashSet<StatKey>) -> u64 {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return 0;
        };
        let mut rows = 0;
        for mapping in maps.lines().filter_map(parse_line) {
            if !mapping.executable || mapping.inode == 0 || !mapping.path.starts_with('/') {
                continue;
            }
            let Some((path, key)) = open_mapped(pid, &mapping) else {
                continue;
            };
            if !seen.insert(key) {
                continue;
            }
            rows += match self.by_stat.get(&key) {
                Some(file) => file.as_ref().map_or(0, |f| f.table.rows.len() as u64),
                None => cfi_bytes(&path) / 3,
            };
        }
        rows
    }

    fn file_table(&mut self, pid: u32, mapping: &MapsLine<'_>) -> Option<Arc<FileTable>> {
        let (path, key) = open_mapped(pid, mapping)?;
        if let Some(cached) = self.by_stat.get(&key) {
            return cached.clone();
        }
        let started = Instant::now();
        let built = std::fs::read(&path)
            .ok()
            .and_then(|data| table::from_elf(&data).ok());
        let file = built.map(|table| self.share(mapping.path.to_string(), table));
        self.note_build(started, file.as_ref());
        self.by_stat.insert(key, file.clone());
        file
    }

    fn vdso_table(&mut self, pid: u32, start: u64, end: u64) -> Option<Arc<FileTable>> {
        let size = end - start;
        if let Some(cached) = self.vdso.get(&size) {
            return cached.clone();
        }
        let started = Instant::now();
        let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
        let mut image = vec![0u8; size as usize];
        let file = mem
            .read_exact_at(&mut image, start)
            .ok()
            .and_then(|()| table::from_elf(&image).ok())
            .map(|table| self.share("[vdso]".to_string(), table));
        self.note_build(started, file.as_ref());
        self.vdso.insert(size, file.clone());
        file
    }

    /// A CPython interpreter file's minor version and `_PyRuntime` address (`None`: the
    /// symbol is not in this file, e.g. an executable that links libpython).
    fn interpreter(&mut self, pid: u32, mapping: &MapsLine<'_>, minor: u32) -> Option<(u32, u64)> {
        let (path, key) = open_mapped(pid, mapping)?;
        *self.interpreters.entry(key).or_insert_with(|| {
            crate::symbolize::python::runtime_symbol(&path).map(|runtime| (minor, runtime))
        })
    }

    /// The table of an arena of CPython perf trampolines (see `jit`), if it is one.
    fn trampoline_table(
        &mut self,
        pid: u32,
        start: u64,
        end: u64,
        map: &crate::symbolize::perfmap::PerfMap,
    ) -> Option<Arc<FileTable>> {
        let named = map.entries_in(start, end).count();
        if named == 0 {
            return None;
        }
        let key = (pid, start, named);
        if let Some(cached) = self.trampolines.get(&key) {
            return cached.clone();
        }
        if self.trampolines.len() >= 4096 {
            self.trampolines.clear(); // dead processes' arenas (the daemon lives long)
        }
        let started = Instant::now();
        let file = jit::python_trampolines(pid, start, end, map).map(|table| {
            self.next_id += 1;
            Arc::new(FileTable {
                id: self.next_id,
                name: TRAMPOLINES.to_string(),
                table,
            })
        });
        if file.is_some() {
            self.note_build(started, file.as_ref());
        }
        self.trampolines.insert(key, file.clone());
        file
    }

    /// One table per build-id: the same library under two paths (containers) is one table.
    fn share(&mut self, name: String, table: Table) -> Arc<FileTable> {
        if let Some(build_id) = &table.build_id
            && let Some(shared) = self.by_build_id.get(build_id)
        {
            return Arc::clone(shared);
        }
        self.next_id += 1;
        let file = Arc::new(FileTable {
            id: self.next_id,
            name,
            table,
        });
        if let Some(build_id) = &file.table.build_id {
            self.by_build_id.insert(build_id.clone(), Arc::clone(&file));
        }
        file
    }

    fn note_build(&mut self, started: Instant, file: Option<&Arc<FileTable>>) {
        self.stats.build_time += started.elapsed();
        match file {
            Some(file) => {
                self.stats.files_built += 1;
                self.stats.rows_built += file.table.rows.len() as u64;
            }
            None => self.stats.files_failed += 1,
        }
    }
}

/// Where to read a mapped file as the process sees it, and its identity.
fn open_mapped(pid: u32, mapping: &MapsLine<'_>) -> Option<(PathBuf, StatKey)> {
    let map_file = PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.start, mapping.end
    ));
    let by_root = PathBuf::from(format!(
        "/proc/{pid}/root{}",
        mapping.path.trim_end_matches(" (deleted)")
    ));
    [map_file, by_root].into_iter().find_map(|path| {
        let meta = std::fs::metadata(&path).ok()?;
        Some((path, (meta.dev(), meta.ino(), meta.size(), meta.mtime())))
    })
}

/// Bytes of `.eh_frame` and `.debug_frame` in an ELF file (reading its headers only).
fn cfi_bytes(path: &std::path::Path) -> u64 {
    use object::{Object as _, ObjectSection as _};
    let Ok(file) = std::fs::File::open(path) else {
        return 0;
    };
    let cache = object::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else {
        return 0;
    };
    [".eh_frame", ".debug_frame"]
        .iter()
        .filter_map(|name| elf.section_by_name(name))
        .map(|section| section.size())
        .sum()
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, PartialEq, Eq)]
struct MapsLine<'a> {
    start: u64,
    end: u64,
    executable: bool,
    offset: u64,
    inode: u64,
    path: &'a str,
}

fn parse_line(line: &str) -> Option<MapsLine<'_>> {
    let mut rest = line;
    let mut field = || {
        let trimmed = rest.trim_start();
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (value, tail) = trimmed.split_at(end);
        rest = tail;
        value
    };
    let (range, perms, offset, _dev, inode) = (field(), field(), field(), field(), field());
    let (start, end) = range.split_once('-')?;
    Some(MapsLine {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable: perms.contains('x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path: rest.trim(),
    })
}

/// Every process on the host (numeric entries of /proc).
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_keep_paths_with_spaces() {
        let line = "7f0000030000-7f0000031000 r-xp 00001000 08:01 77      /tmp/my lib.so (deleted)";
        assert_eq!(
            parse_line(line),
            Some(MapsLine {
                start: 0x7f0000030000,
                end: 0x7f0000031000,
                executable: true,
                offset: 0x1000,
                inode: 77,
                path: "/tmp/my lib.so (deleted)",
            })
        );
        let anon = parse_line("7f0000020000-7f0000021000 r-xp 00000000 00:00 0 ").unwrap();
        assert_eq!((anon.inode, anon.path), (0, ""));
    }

    /// Our own process: libc and the test binary get tables, and every address of a
    /// mapping with a table lands on one of its rows' pcs' range.
    #[test]
    fn own_process_tables() {
        let mut cache = TableCache::default();
        let tables = cache.process_tables(std::process::id()).expect("own maps");
        let with_table: Vec<_> = tables.iter().filter(|m| m.file.is_some()).collect();
        assert!(
            with_table
                .iter()
                .any(|m| m.file.as_ref().unwrap().name.contains("libc.so")),
            "{tables:?}"
        );
        // The vDSO has no file: its table comes from our memory.
        assert!(
            with_table
                .iter()
                .any(|m| m.file.as_ref().unwrap().name == "[vdso]"),
            "no vDSO table: {tables:?}"
        );
        assert!(
            tables.windows(2).all(|w| w[0].end <= w[1].start),
            "sorted, disjoint"
        );
        // Our own code: this function's address resolves to a row.
        let pc = own_process_tables as *const () as u64;
        let mapping = with_table
            .iter()
            .find(|m| m.start <= pc && pc < m.end)
            .expect("a mapping with a table holds our code");
        let file = mapping.file.as_ref().unwrap();
        assert!(table::lookup(&file.table.rows, pc - mapping.bias).is_some());
        // A second read shares the tables.
        let again = cache.process_tables(std::process::id()).expect("own maps");
        assert_eq!(cache.stats.files_built as usize, {
            let mut ids: Vec<u64> = again
                .iter()
                .filter_map(|m| m.file.as_ref().map(|f| f.id))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len()
        });
    }
}
