//! Unwinding tables into the kernel (`profiler-ebpf/src/unwind.rs`): each file's rows are
//! copied once into the global row array (mmapped: a memcpy, not a syscall per row), and
//! each process gets its sorted mapping list in `UNWIND_PROCESSES`. Processes in scope are
//! loaded before the programs attach; processes first seen later are loaded when the
//! new-task ring reports them (`Probes::unwind_process`).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use profiler_common::unwind::{
    ANONYMOUS, MAX_MAPPINGS, PROCESS_PYTHON, ProcessMappings, TABLE_FULL, UnwindMapping, UnwindRow,
    counter, maps,
};

use super::{Probes, read_counters};
use crate::symbolize::unwind::{FileTable, MappedTable, cache};

/// How user stacks are walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UnwindMode {
    /// From `.eh_frame` tables in the kernel (frame pointers where no table covers a pc).
    #[default]
    Dwarf,
    /// Frame pointers only (`bpf_get_stackid`).
    Fp,
}

/// Rows the array holds beyond the tables of the processes loaded at start: room for the
/// processes and libraries that appear while recording (8 bytes a row).
const SPARE_ROWS: u64 = 1 << 20;
/// The array's size limit (about 256 MiB of kernel memory).
const MAX_ROWS: u64 = 32 << 20;
/// A process is re-read (exec, dlopen) at most this often.
const RELOAD_EVERY: Duration = Duration::from_millis(250);

/// What userspace did for the walker, for the capture's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoaderStats {
    pub processes: u64,
    pub processes_failed: u64,
    pub files: u64,
    pub rows: u64,
    pub row_capacity: u64,
    /// Files whose table did not fit in the row array.
    pub files_table_full: u64,
    /// Mappings left out of a process's list (more than `MAX_MAPPINGS`).
    pub mappings_dropped: u64,
    /// Time spent reading maps and building tables, and loading them.
    pub build_ns: u64,
    pub load_ns: u64,
    /// Before the programs attached: building (with -p) or estimating (whole host).
    pub prepare_ns: u64,
    /// After they attached: until the worker had loaded every process present at start
    /// (0: with -p, or not done).
    pub ready_ns: u64,
    /// Processes registered for Python frames (a CPython 3.8–3.13 found in their maps).
    pub python_processes: u64,
    /// Processes running a CPython the walker does not know (native frames only).
    pub python_unsupported: u64,
    /// Processes whose tables were dropped because they exec'd.
    pub processes_execd: u64,
}

/// The tables of the processes in scope, built before the programs load so that the row
/// array can be sized; for the whole host, only their size is estimated and a worker thread
/// builds them once the programs are attached (building every table of a host can take a
/// second or more: a start should not wait for it).
pub struct Prepared {
    processes: Vec<(u32, Vec<MappedTable>)>,
    /// Processes the worker loads after the start.
    later: Vec<u32>,
    pub capacity: u32,
    prepare_ns: u64,
    /// Whether CPython processes are registered for the Python walker (`--no-python-frames`).
    python_frames: bool,
}

/// Builds the tables of `pids`, or estimates those of every process when `pids` is empty;
/// `python_frames`: whether CPython processes get their Python frames walked.
pub fn prepare(pids: &[u32], python_frames: bool) -> Prepared {
    let started = Instant::now();
    let own = std::process::id();
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    let mut processes = Vec::new();
    let mut later = Vec::new();
    let needed = if pids.is_empty() {
        let mut seen = HashSet::new();
        let mut rows = 0;
        for pid in crate::symbolize::unwind::all_pids() {
            if pid != own {
                rows += cache.estimate_rows(pid, &mut seen);
                later.push(pid);
            }
        }
        rows
    } else {
        let mut rows: HashMap<u64, u64> = HashMap::new();
        for &pid in pids {
            let Ok(tables) = cache.process_tables(pid) else {
                continue; // gone, or a kernel thread
            };
            for file in tables.iter().filter_map(|m| m.file.as_ref()) {
                rows.insert(file.id, file.table.rows.len() as u64);
            }
            processes.push((pid, tables));
        }
        rows.values().sum()
    };
    Prepared {
        processes,
        later,
        capacity: (needed + SPARE_ROWS).min(MAX_ROWS) as u32,
        prepare_ns: started.elapsed().as_nanos() as u64,
        python_frames,
    }
}

/// Loads tables off the recording thread: the whole host's at start, then each process
/// first seen while recording.
pub struct Unwinder {
    loader: Arc<Mutex<Loader>>,
    /// (pid, exec'd: forget what was loaded for it, its old program's tables).
    requests: mpsc::Sender<(u32, bool)>,
    stop: Arc<AtomicBool>,
}

impl Unwinder {
    pub fn start(ebpf: &mut Ebpf, mut prepared: Prepared) -> Result<Self> {
        let later = std::mem::take(&mut prepared.later);
        let loader = Arc::new(Mutex::new(Loader::new(ebpf, prepared)?));
        let (requests, queue) = mpsc::channel::<(u32, bool)>();
        let stop = Arc::new(AtomicBool::new(false));
        let worker_loader = Arc::clone(&loader);
        let worker_stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("unwind-tables".into())
            .spawn(move || {
                // Building tables is CPU work the traced host did not ask for: at nice 19 it
                // yields to the workload (it preempted pgbench past the N+1 detector's 1 ms
                // gap on 2 CPUs), and the walks fall back to frame pointers a little longer.
                // SAFETY: setpriority on this thread (Linux nice values are per thread).
                unsafe {
                    libc::setpriority(
                        libc::PRIO_PROCESS,
                        libc::syscall(libc::SYS_gettid) as libc::id_t,
                        19,
                    )
                };
                let started = Instant::now();
                let lock = || worker_loader.lock().unwrap_or_else(|e| e.into_inner());
                for pid in later {
                    if worker_stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // Processes first seen while recording go first: they are running now,
                    // and until their tables load their stacks are frame-pointer walks
                    // (another stack id for the same code path).
                    while let Ok((new, execd)) = queue.try_recv() {
                        lock().request(new, execd);
                    }
                    lock().load_process(pid);
                }
                lock().stats.ready_ns = started.elapsed().as_nanos() as u64;
                while let Ok((pid, execd)) = queue.recv() {
                    if worker_stop.load(Ordering::Relaxed) {
                        return;
                    }
                    lock().request(pid, execd);
                }
            })
            .context("cannot start the unwinding-table thread")?;
        Ok(Self {
            loader,
            requests,
            stop,
        })
    }
}

impl Drop for Unwinder {
    fn drop(&mut self) {
        // The worker ends at its next process (the channel closes with us).
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The row array, mapped into our memory.
struct Rows {
    base: *mut UnwindRow,
    capacity: u32,
    _map: MapData,
}

// SAFETY: the mapping is owned by this struct and only written through `&mut self`.
unsafe impl Send for Rows {}

impl Drop for Rows {
    fn drop(&mut self) {
        // SAFETY: mapped in `Loader::new` with this length.
        unsafe {
            libc::munmap(
                self.base.cast(),
                self.capacity as usize * std::mem::size_of::<UnwindRow>(),
            )
        };
    }
}

/// The kernel-side tables of one loaded object.
pub struct Loader {
    rows: Rows,
    next_row: u32,
    /// File table id → its first row (or `TABLE_FULL`).
    placed: HashMap<u64, u32>,
    processes: BpfHashMap<MapData, u32, ProcessMappings>,
    /// Processes running a CPython the walker knows (`profiler_common::python`).
    python: BpfHashMap<MapData, u32, profiler_common::python::PyProcess>,
    /// Processes noted as running a CPython the walker does not know.
    unsupported_python: std::collections::HashSet<u32>,
    /// Processes in the Python walker's map.
    registered_python: std::collections::HashSet<u32>,
    /// When processes exec'd (their tables are reloaded at each request for a while).
    execd: HashMap<u32, Instant>,
    /// Off with `--no-python-frames`: no process is registered for the Python walker.
    python_frames: bool,
    loaded: HashMap<u32, Instant>,
    pub stats: LoaderStats,
}

impl Loader {
    /// Takes the walker's maps out of `ebpf` and loads the prepared processes.
    pub fn new(ebpf: &mut Ebpf, prepared: Prepared) -> Result<Self> {
        let Some(Map::Array(rows_map)) = ebpf.take_map(maps::ROWS) else {
            bail!("the eBPF object has no {} array", maps::ROWS);
        };
        let length = prepared.capacity as usize * std::mem::size_of::<UnwindRow>();
        // SAFETY: a BPF_F_MMAPABLE array's values, shared with the kernel; we only write
        // rows no mapping entry points at yet.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                rows_map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!(
                "cannot map the unwinding row array ({} rows): {}",
                prepared.capacity,
                std::io::Error::last_os_error()
            );
        }
        let processes = ebpf
            .take_map(maps::PROCESSES)
            .with_context(|| format!("the eBPF object has no {} map", maps::PROCESSES))?;
        let python = ebpf
            .take_map(profiler_common::python::maps::PROCESSES)
            .with_context(|| {
                format!(
                    "the eBPF object has no {} map",
                    profiler_common::python::maps::PROCESSES
                )
            })?;
        let mut loader = Self {
            rows: Rows {
                base: base.cast(),
                capacity: prepared.capacity,
                _map: rows_map,
            },
            next_row: 0,
            placed: HashMap::new(),
            processes: BpfHashMap::try_from(processes)?,
            python: BpfHashMap::try_from(python)?,
            unsupported_python: Default::default(),
            registered_python: Default::default(),
            execd: HashMap::new(),
            python_frames: prepared.python_frames,
            loaded: HashMap::new(),
            stats: LoaderStats {
                row_capacity: u64::from(prepared.capacity),
                prepare_ns: prepared.prepare_ns,
                ..Default::default()
            },
        };
        let started = Instant::now();
        for (pid, tables) in prepared.processes {
            loader.install(pid, &tables);
        }
        loader.stats.load_ns += started.elapsed().as_nanos() as u64;
        Ok(loader)
    }

    /// Loads (or reloads, after an exec or dlopen) a process's tables; cheap when its
    /// files' tables are cached and placed already.
    /// A request from the recording thread: load `pid`'s tables, or forget them (`execd`).
    fn request(&mut self, pid: u32, execd: bool) {
        if execd {
            self.forget(pid);
        } else {
            self.load_process(pid);
        }
    }

    /// `pid` exec'd: its tables (and Python entry) were its old program's. Its walks fall
    /// back to frame pointers until its next first-seen event loads the new program's — not
    /// at the exec itself, when the dynamic loader has not mapped its libraries yet.
    fn forget(&mut self, pid: u32) {
        self.loaded.remove(&pid);
        // Only recent execs matter (a daemon sees every exec of the host: keep it small).
        let now = Instant::now();
        self.execd
            .retain(|_, at| now.duration_since(*at) < crate::symbolize::procmaps::AFTER_EXEC);
        self.execd.insert(pid, now);
        // Its UNWIND_PROCESSES entry: removed by the exec program already.
        if self.registered_python.remove(&pid) {
            let _ = self.python.remove(&pid);
        }
        self.unsupported_python.remove(&pid);
        self.stats.processes_execd += 1;
    }

    pub fn load_process(&mut self, pid: u32) {
        // Just after an exec each request loads: the loader is still mapping libraries.
        let settling = self
            .execd
            .get(&pid)
            .is_some_and(|at| at.elapsed() < crate::symbolize::procmaps::AFTER_EXEC);
        if !settling
            && self
                .loaded
                .get(&pid)
                .is_some_and(|at| at.elapsed() < RELOAD_EVERY)
        {
            return;
        }
        let started = Instant::now();
        let tables = cache()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_tables(pid);
        self.stats.build_ns += started.elapsed().as_nanos() as u64;
        match tables {
            Ok(tables) => {
                let started = Instant::now();
                self.install(pid, &tables);
                self.stats.load_ns += started.elapsed().as_nanos() as u64;
            }
            Err(_) => {
                self.loaded.insert(pid, Instant::now());
                self.stats.processes_failed += 1;
            }
        }
    }

    fn install(&mut self, pid: u32, tables: &[MappedTable]) {
        let mut value = ProcessMappings::default();
        if tables.len() > MAX_MAPPINGS {
            self.stats.mappings_dropped += (tables.len() - MAX_MAPPINGS) as u64;
        }
        let python = tables.iter().find_map(|m| {
            let (minor, runtime) = m.python.filter(|_| self.python_frames)?;
            let layout =
                crate::symbolize::python::process_layout(pid, minor, runtime.wrapping_add(m.bias));
            Some((minor, layout))
        });
        if python.is_none() && self.registered_python.remove(&pid) {
            // It ran Python before it exec'd: its walker entry describes memory now gone.
            let _ = self.python.remove(&pid);
        }
        let refused = match python {
            Some((_, Ok(py))) => {
                if self.python.insert(pid, py, 0).is_ok() {
                    self.registered_python.insert(pid);
                    value.flags |= PROCESS_PYTHON;
                    self.stats.python_processes += 1;
                }
                None
            }
            Some((minor, Err(why))) => Some((minor, Some(why))),
            None => tables
                .iter()
                .find_map(|m| m.python_unsupported.filter(|_| self.python_frames))
                .map(|minor| (minor, None)),
        };
        if let Some((minor, why)) = refused
            && self.unsupported_python.insert(pid)
        {
            self.stats.python_unsupported += 1;
            crate::symbolize::python::note_unsupported(pid, minor, why.as_deref());
        }
        for (slot, mapping) in value.mappings.iter_mut().zip(tables) {
            let (first_row, rows) = match &mapping.file {
                Some(file) => self.place(file),
                None if mapping.anonymous => (ANONYMOUS, 0),
                None => (0, 0),
            };
            *slot = UnwindMapping {
                start: mapping.start,
                end: mapping.end,
                bias: mapping.bias,
                first_row,
                rows,
            };
        }
        value.count = tables.len().min(MAX_MAPPINGS) as u32;
        self.loaded.insert(pid, Instant::now());
        match self.processes.insert(pid, value, 0) {
            Ok(()) => self.stats.processes += 1,
            Err(_) => self.stats.processes_failed += 1,
        }
    }

    /// The rows of `file` in the array: copied on first use.
    fn place(&mut self, file: &Arc<FileTable>) -> (u32, u32) {
        let rows = &file.table.rows;
        if rows.is_empty() {
            return (0, 0);
        }
        let first = match self.placed.get(&file.id) {
            Some(first) => *first,
            None => {
                let first = if u64::from(self.next_row) + rows.len() as u64
                    > u64::from(self.rows.capacity)
                {
                    self.stats.files_table_full += 1;
                    TABLE_FULL
                } else {
                    // SAFETY: in bounds (checked above); no mapping entry refers to these
                    // rows before they are written.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            rows.as_ptr(),
                            self.rows.base.add(self.next_row as usize),
                            rows.len(),
                        )
                    };
                    let first = self.next_row;
                    self.next_row += rows.len() as u32;
                    self.stats.files += 1;
                    self.stats.rows += rows.len() as u64;
                    first
                };
                self.placed.insert(file.id, first);
                first
            }
        };
        if first == TABLE_FULL {
            (TABLE_FULL, 0)
        } else {
            (first, rows.len() as u32)
        }
    }
}

impl Probes {
    /// Processes registered for Python frames so far (0 without the table walker).
    pub fn python_processes(&self) -> u64 {
        self.unwind.as_ref().map_or(0, |unwinder| {
            unwinder
                .loader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stats
                .python_processes
        })
    }

    /// Loads the unwinding tables of a process first seen while recording (no-op with
    /// `--unwind fp`, or when it was loaded a moment ago).
    pub fn unwind_process(&self, pid: u32) {
        self.request_tables(pid, false);
    }

    /// `pid` exec'd: the tables loaded for it are its old program's; forgotten.
    pub fn unwind_process_after_exec(&self, pid: u32) {
        self.request_tables(pid, true);
    }

    fn request_tables(&self, pid: u32, execd: bool) {
        if let Some(unwinder) = &self.unwind {
            // The worker is gone only if it panicked: then there is nobody to load it.
            let _ = unwinder.requests.send((pid, execd));
        }
    }

    /// The walker's counters (kernel) and the loader's (userspace), `unwind_`-prefixed.
    pub fn unwind_counters(&self) -> Result<Vec<(String, u64)>> {
        let Some(unwinder) = &self.unwind else {
            return Ok(Vec::new());
        };
        let mut out: Vec<(String, u64)> =
            read_counters(self.ebpf(), maps::COUNTERS, &counter::NAMES)?
                .into_iter()
                .map(|(name, value)| (format!("unwind_{name}"), value))
                .collect();
        let stats = unwinder
            .loader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats;
        for (name, value) in [
            ("processes", stats.processes),
            ("processes_failed", stats.processes_failed),
            ("files", stats.files),
            ("rows", stats.rows),
            ("row_capacity", stats.row_capacity),
            ("files_table_full", stats.files_table_full),
            ("mappings_dropped", stats.mappings_dropped),
            ("build_ns", stats.build_ns),
            ("load_ns", stats.load_ns),
            ("prepare_ns", stats.prepare_ns),
            ("ready_ns", stats.ready_ns),
        ] {
            out.push((format!("unwind_table_{name}"), value));
        }
        out.push(("python_processes".to_string(), stats.python_processes));
        out.push(("python_unsupported".to_string(), stats.python_unsupported));
        out.push(("unwind_processes_execd".to_string(), stats.processes_execd));
        for (name, value) in read_counters(
            self.ebpf(),
            profiler_common::python::maps::COUNTERS,
            &profiler_common::python::counter::NAMES,
        )? {
            out.push((format!("python_{name}"), value));
        }
        Ok(out)
    }
}
