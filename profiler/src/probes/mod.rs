//! Loading, configuring, attaching and reading the kernel programs. One eBPF object holds
//! every family; `Probes::load` sets the shared configuration (filters, kernel offsets) and
//! each family's globals, then attaches the families asked for. One module per family, named
//! like the family's file in `profiler-ebpf/src/`.
//!
//! ```no_run
//! # use profiler::probes::{ProbeConfig, Probes, offcpu::OffcpuConfig};
//! let config = ProbeConfig { offcpu: Some(OffcpuConfig::default()), ..Default::default() };
//! let probes = Probes::load(&config)?;
//! std::thread::sleep(std::time::Duration::from_secs(1));
//! let totals = probes.offcpu_totals()?; // (tgid, tid, stacks, state) → blocked ns, count
//! # anyhow::Ok(())
//! ```

pub mod cgroup;
pub mod db;
pub mod ebpf_log;
pub mod kernel;
pub mod offcpu;
pub mod oncpu;
pub mod syscalls;
pub mod tcp;
pub mod unwind;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, StackTraceMap};
use aya::{Ebpf, EbpfLoader, Pod};
use profiler_common::shared::{
    OVERFLOW_STACK_BIT, THREADS_ALL, THREADS_KERNEL, THREADS_USER, maps,
};
use profiler_common::unwind::{
    MODE_DWARF, MODE_FP, UNWOUND_STACK_BIT, UnwoundStack, maps as unwind_maps,
};

use crate::probes::kernel::btf::Btf;

/// The eBPF object built from `profiler-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler-ebpf"));

/// Which threads to trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ThreadFilter {
    #[default]
    All,
    User,
    Kernel,
}

/// What to load and how to filter. A family is attached when its config is present.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub pids: Vec<u32>,
    pub tids: Vec<u32>,
    /// `--cgroup`: only tasks in these cgroup2 subtrees (empty: no cgroup filter).
    pub cgroups: Vec<cgroup::CgroupFilter>,
    pub threads: ThreadFilter,
    pub btf_path: PathBuf,
    /// Entries in the main stack map (the overflow map has 4096 more).
    pub stack_storage_size: u32,
    pub offcpu: Option<offcpu::OffcpuConfig>,
    pub oncpu: Option<oncpu::OncpuConfig>,
    pub syscalls: Option<syscalls::SyscallsConfig>,
    /// The TCP family has no settings of its own.
    pub tcp: bool,
    pub db: Option<db::DbConfig>,
    /// Sampled mode: record one off-CPU block in this many (a power of two; 1: all).
    pub offcpu_sample_every: u32,
    /// Sampled mode: time one database query in this many (server USDT and libpq).
    pub db_sample_every: u32,
    /// Turn on the kernel's BPF run-time statistics while loaded, so the capture can say
    /// what our programs cost (`bpf_run_ns`); about 20 ns more per program run.
    pub measure_overhead: bool,
    /// Leave the profiler's own process out of every family.
    pub exclude_self: bool,
    /// How user stacks are walked (every family that takes one).
    pub unwind: unwind::UnwindMode,
    /// Python frames walked in CPython processes (off: `--no-python-frames`).
    pub python_frames: bool,
    /// Kernel-side diagnostics printed on stderr (`--ebpf-log`).
    pub ebpf_log: ebpf_log::EbpfLogLevel,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            pids: Vec::new(),
            tids: Vec::new(),
            cgroups: Vec::new(),
            threads: ThreadFilter::All,
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            stack_storage_size: 16384,
            offcpu: None,
            oncpu: None,
            syscalls: None,
            tcp: false,
            db: None,
            offcpu_sample_every: 1,
            db_sample_every: 1,
            measure_overhead: false,
            exclude_self: false,
            unwind: unwind::UnwindMode::Dwarf,
            python_frames: true,
            ebpf_log: ebpf_log::EbpfLogLevel::Off,
        }
    }
}

/// Global values for the loader: name → bytes.
pub(crate) type Globals = Vec<(&'static str, Vec<u8>)>;

pub(crate) fn global<T: Pod>(globals: &mut Globals, name: &'static str, value: T) {
    // SAFETY: T is Pod: plain bytes, no padding that matters to the kernel.
    let bytes = unsafe {
        std::slice::from_raw_parts(&value as *const T as *const u8, std::mem::size_of::<T>())
    };
    globals.push((name, bytes.to_vec()));
}

/// The loaded object and what is attached. Dropping it detaches everything.
pub struct Probes {
    /// When the first family was attached: what the capture's time is measured from.
    pub counting_since: Instant,
    ebpf: Ebpf,
    /// How off-CPU attached (`tp_btf` or `tracepoint`), when it did.
    pub offcpu_attached_with: Option<&'static str>,
    /// On-CPU sampling frequency, when attached.
    pub oncpu_frequency: Option<u64>,
    /// Slow-syscall threshold, when the syscalls family is attached.
    pub syscalls_slow_ns: Option<u64>,
    /// How raw_syscalls was hooked ("tp_btf" or "tracepoint"), when the family is attached.
    pub syscalls_attached_with: Option<&'static str>,
    /// Whether the TCP family is attached.
    pub tcp: bool,
    /// PostgreSQL binaries whose query probes are attached (empty: db family off or no
    /// server found).
    pub db_targets: Vec<PathBuf>,
    /// Detaches the database uprobes when dropped.
    _db_links: Vec<crate::probes::kernel::uprobe::UprobeLink>,
    /// Keeps the kernel's BPF run-time statistics on (`measure_overhead`).
    _stats: Option<std::os::fd::OwnedFd>,
    /// The unwinding tables in the kernel (`--unwind dwarf`).
    unwind: Option<unwind::Unwinder>,
    /// Prints the programs' log records (`--ebpf-log`).
    _ebpf_log: Option<ebpf_log::EbpfLog>,
}

/// BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel times every BPF program run while the
/// returned fd is open.
fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    #[repr(C)]
    struct Attr {
        kind: u32,
    }
    let mut attr = Attr {
        kind: 0, /* BPF_STATS_RUN_TIME */
    };
    // SAFETY: BPF_ENABLE_STATS reads a 4-byte attribute and returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd < 0 {
        bail!(
            "cannot turn on BPF run-time statistics: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// What the kernel counts for our programs: run time and runs (with statistics on), and runs
/// skipped for recursion.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProgramStats {
    pub run_time_ns: u64,
    pub runs: u64,
    pub recursion_misses: u64,
}

impl Probes {
    pub fn load(config: &ProbeConfig) -> Result<Self> {
        if !config.btf_path.exists() {
            bail!(
                "the kernel exposes no BTF at {} (it needs CONFIG_DEBUG_INFO_BTF=y); cannot \
                 compute the kernel offsets the probes need",
                config.btf_path.display()
            );
        }
        let btf = Btf::from_file(&config.btf_path)?;
        let mut globals = Globals::new();
        global(
            &mut globals,
            "FILTER_TGID",
            u32::from(!config.pids.is_empty()),
        );
        global(
            &mut globals,
            "FILTER_TID",
            u32::from(!config.tids.is_empty()),
        );
        global(
            &mut globals,
            "CGROUP_LEVELS",
            cgroup::levels(&config.cgroups),
        );
        let thread_kind = match config.threads {
            ThreadFilter::All => THREADS_ALL,
            ThreadFilter::User => THREADS_USER,
            ThreadFilter::Kernel => THREADS_KERNEL,
        };
        global(&mut globals, "THREAD_KIND", thread_kind);
        global(
            &mut globals,
            "EXCLUDE_TGID",
            if config.exclude_self {
                std::process::id()
            } else {
                0
            },
        );
        // Off-CPU files a thread's wait under its database query when both families run.
        global(
            &mut globals,
            "DB_INFLIGHT_ON",
            u32::from(config.offcpu.is_some() && config.db.is_some()),
        );
        for (name, every) in [
            ("OFFCPU_SAMPLE_MASK", config.offcpu_sample_every),
            ("DB_SAMPLE_MASK", config.db_sample_every),
        ] {
            if !every.is_power_of_two() {
                bail!("a sampling rate of 1 in {every}: it must be a power of two");
            }
            global(&mut globals, name, every - 1);
        }
        global(
            &mut globals,
            "TASK_PID_OFF",
            btf.member_offset("task_struct", "pid")?,
        );
        global(
            &mut globals,
            "TASK_FLAGS_OFF",
            btf.member_offset("task_struct", "flags")?,
        );
        global(
            &mut globals,
            "TASK_COMM_OFF",
            btf.member_offset("task_struct", "comm")?,
        );
        let state_off = btf
            .member_offset("task_struct", "__state")
            .or_else(|_| btf.member_offset("task_struct", "state"))?;
        global(&mut globals, "TASK_STATE_OFF", state_off);
        // CPython 3.8–3.10 name a thread by its pthread_t: x86-64's fs base. Elsewhere 0:
        // their threads are not found (counted as python_no_thread).
        let fsbase_off = btf
            .member_offset("task_struct", "thread")
            .and_then(|thread| Ok(thread + btf.member_offset("thread_struct", "fsbase")?))
            .unwrap_or(0);
        global(&mut globals, "TASK_FSBASE_OFF", fsbase_off);
        if let Some(offcpu) = &config.offcpu {
            offcpu::globals(offcpu, &btf, &mut globals)?;
        }
        if let Some(syscalls) = &config.syscalls {
            syscalls::globals(syscalls, &mut globals)?;
        }
        if config.tcp {
            tcp::globals(&btf, &mut globals)?;
        }
        let db_targets = match &config.db {
            Some(db_config) => match db::discover(db_config, &config.pids) {
                Ok(targets) => targets,
                Err(err) if db_config.optional => {
                    eprintln!("profiler: note: database queries are not recorded: {err:#}");
                    db::DbTargets::default()
                }
                Err(err) => return Err(err),
            },
            None => db::DbTargets::default(),
        };
        db::globals(&db_targets, &btf, &mut globals)?;
        // Offsets read; the parsed BTF is large, and tp_btf parses its own below.
        drop(btf);
        // Tables first: the row array is sized to hold them.
        let unwind_tables = (config.unwind == unwind::UnwindMode::Dwarf
            && (config.offcpu.is_some()
                || config.oncpu.is_some()
                || config.syscalls.is_some()
                || config.db.is_some()))
        .then(|| unwind::prepare(&config.pids, config.python_frames));
        let unwind_mode = match unwind_tables {
            Some(_) => MODE_DWARF,
            None => MODE_FP,
        };
        global(&mut globals, "UNWIND_MODE", unwind_mode);
        global(&mut globals, "PY_TIMED", u32::from(config.measure_overhead));
        global(
            &mut globals,
            "UNWIND_LOG",
            u32::from(config.ebpf_log != ebpf_log::EbpfLogLevel::Off),
        );
        global(&mut globals, "AYA_LOG_LEVEL", config.ebpf_log.number());

        let mut loader = EbpfLoader::new();
        for (name, bytes) in &globals {
            loader.override_global(name, bytes.as_slice(), true);
        }
        loader.map_max_entries(maps::STACKS, config.stack_storage_size.max(1));
        match &unwind_tables {
            Some(prepared) => {
                loader.map_max_entries(unwind_maps::ROWS, prepared.capacity.max(1));
                // As many as the two frame-pointer stack maps together hold.
                loader.map_max_entries(
                    unwind_maps::STACKS,
                    config.stack_storage_size.max(1).saturating_add(4096),
                );
            }
            None => {
                loader.map_max_entries(unwind_maps::STACKS, 1);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF programs into the kernel failed")?;
        fill_filter(&mut ebpf, maps::TGID_FILTER, &config.pids)?;
        fill_filter(&mut ebpf, maps::TID_FILTER, &config.tids)?;
        if !config.cgroups.is_empty() {
            let map = ebpf
                .map_mut(maps::CGROUP_FILTER)
                .with_context(|| format!("map {} missing", maps::CGROUP_FILTER))?;
            let mut filter: BpfHashMap<&mut MapData, u64, u8> = BpfHashMap::try_from(map)?;
            for cgroup in &config.cgroups {
                filter.insert(cgroup.id, 1, 0).with_context(|| {
                    format!(
                        "cannot add cgroup {} to the filter (at most 64)",
                        cgroup.path
                    )
                })?;
            }
        }
        let unwind = match unwind_tables {
            Some(prepared) => Some(unwind::Unwinder::start(&mut ebpf, prepared)?),
            None => None,
        };
        let ebpf_log = match config.ebpf_log {
            ebpf_log::EbpfLogLevel::Off => None,
            level => Some(ebpf_log::start(&mut ebpf, level)?),
        };

        // The families attach one after the other, each after the verifier checked its
        // programs (a tenth of a second or more apiece): the first one attached is already
        // counting while the next load. The capture's clock starts with it.
        let mut counting_since: Option<Instant> = None;
        let offcpu_attached_with = match &config.offcpu {
            Some(offcpu) => {
                let attached = offcpu::attach(&mut ebpf, offcpu, &config.btf_path)?;
                counting_since.get_or_insert_with(Instant::now);
                Some(attached)
            }
            None => None,
        };
        let oncpu_frequency = match &config.oncpu {
            Some(oncpu) => {
                let frequency = oncpu::attach(&mut ebpf, oncpu)?;
                counting_since.get_or_insert_with(Instant::now);
                Some(frequency)
            }
            None => None,
        };
        let syscalls_slow_ns = match &config.syscalls {
            Some(syscalls) => {
                let attached = syscalls::attach(&mut ebpf, syscalls, &config.btf_path)?;
                counting_since.get_or_insert_with(Instant::now);
                Some((syscalls.slow_ns, attached))
            }
            None => None,
        };
        let (syscalls_slow_ns, syscalls_attached_with) = syscalls_slow_ns.unzip();
        if config.tcp {
            tcp::attach(&mut ebpf)?;
            counting_since.get_or_insert_with(Instant::now);
        }
        let db_links = db::attach(&mut ebpf, &db_targets)?;
        // Execs: a process that becomes another program gets its maps, name and tables
        // read again (else a shell's child running a command keeps the shell's).
        let exec: &mut aya::programs::TracePoint =
            program(&mut ebpf, "sched_process_exec")?.try_into()?;
        exec.load()
            .context("loading the sched_process_exec program failed")?;
        exec.attach("sched", "sched_process_exec")
            .context("attaching to sched:sched_process_exec failed")?;
        let stats = match config.measure_overhead {
            true => Some(enable_run_time_stats()?),
            false => None,
        };
        Ok(Self {
            counting_since: counting_since.unwrap_or_else(Instant::now),
            _stats: stats,
            ebpf,
            offcpu_attached_with,
            oncpu_frequency,
            syscalls_slow_ns,
            syscalls_attached_with,
            tcp: config.tcp,
            db_targets: db_targets.paths(),
            _db_links: db_links,
            unwind,
            _ebpf_log: ebpf_log,
        })
    }

    /// The ring buffer of new walked stacks with Python frames (with the table walker);
    /// can be taken once.
    pub fn take_python_stacks(&mut self) -> Result<Option<RingBuf<MapData>>> {
        if self.unwind.is_none() {
            return Ok(None);
        }
        let map = self
            .ebpf
            .take_map(profiler_common::python::maps::NEW_STACKS)
            .context("Python stack ring buffer already taken")?;
        Ok(Some(RingBuf::try_from(map)?))
    }

    /// The ring buffer of first-seen tasks; can be taken once.
    pub fn take_new_tasks(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(maps::NEW_TASKS)
            .context("new-task ring buffer already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Instruction pointers of a stack, innermost first; `None` when the id is an error or
    /// gone.
    pub fn stack(&self, stack_id: i32) -> Result<Option<Vec<u64>>> {
        if stack_id < 0 {
            return Ok(None);
        }
        if stack_id & UNWOUND_STACK_BIT != 0 && stack_id & OVERFLOW_STACK_BIT == 0 {
            return self.unwound_stack(stack_id & !UNWOUND_STACK_BIT);
        }
        let (name, id) = if stack_id & OVERFLOW_STACK_BIT != 0 {
            (maps::STACKS_OVERFLOW, stack_id & !OVERFLOW_STACK_BIT)
        } else {
            (maps::STACKS, stack_id)
        };
        let map = self.ebpf.map(name).context("no stack map")?;
        let stacks = StackTraceMap::try_from(map)?;
        match stacks.get(&(id as u32), 0) {
            Ok(trace) => Ok(Some(trace.frames().iter().map(|f| f.ip).collect())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(err).context("reading a stack trace failed"),
        }
    }

    /// The kernel's figures for our programs, summed over every loaded one: run time and
    /// runs (with `measure_overhead`), and runs skipped because another BPF program (or a
    /// bpf() syscall holding `bpf_prog_active`, such as our own map reads) was active on that
    /// CPU — each an event we did not see.
    pub fn program_stats(&self) -> ProgramStats {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        #[repr(C)]
        struct InfoAttr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        let mut total = ProgramStats::default();
        for (_, program) in self.ebpf.programs() {
            let Ok(fd) = program.fd() else {
                continue; // not loaded
            };
            // SAFETY: bpf_prog_info is plain data; zero is a valid value.
            let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
            let mut attr = InfoAttr {
                bpf_fd: fd.as_fd().as_raw_fd() as u32,
                info_len: std::mem::size_of_val(&info) as u32,
                info: &mut info as *mut _ as u64,
            };
            // SAFETY: BPF_OBJ_GET_INFO_BY_FD writes at most info_len bytes into `info`.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_OBJ_GET_INFO_BY_FD,
                    &mut attr as *mut InfoAttr,
                    std::mem::size_of::<InfoAttr>(),
                )
            };
            if rc == 0 {
                total.recursion_misses += info.recursion_misses;
                total.run_time_ns += info.run_time_ns;
                total.runs += info.run_cnt;
            }
        }
        total
    }

    /// A stack the kernel walked from the unwinding tables.
    fn unwound_stack(&self, key: i32) -> Result<Option<Vec<u64>>> {
        let map = self
            .ebpf
            .map(unwind_maps::STACKS)
            .context("no unwound-stack map")?;
        let stacks: BpfHashMap<&MapData, u32, UnwoundStack> = BpfHashMap::try_from(map)?;
        match stacks.get(&(key as u32), 0) {
            Ok(stack) => {
                let len = (stack.len as usize).min(stack.frames.len());
                Ok(Some(stack.frames[..len].to_vec()))
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(err).context("reading an unwound stack failed"),
        }
    }

    pub(crate) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// How many programs this object loaded into the kernel.
    pub fn programs_loaded(&self) -> u64 {
        self.ebpf
            .programs()
            .filter(|(_, program)| program.fd().is_ok())
            .count() as u64
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Every entry of a hash map (a key deleted between listing and lookup is skipped).
pub(crate) fn read_hash<K: Pod + Eq + std::hash::Hash, V: Pod>(
    ebpf: &Ebpf,
    name: &str,
) -> Result<HashMap<K, V>> {
    let map = ebpf.map(name).with_context(|| format!("no map {name}"))?;
    let map: BpfHashMap<&MapData, K, V> = BpfHashMap::try_from(map)?;
    let mut out = HashMap::new();
    for entry in map.iter() {
        match entry {
            Ok((key, value)) => {
                out.insert(key, value);
            }
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(err) => return Err(err).with_context(|| format!("reading {name} failed")),
        }
    }
    Ok(out)
}

/// Per-CPU counters summed over CPUs, with their names.
pub(crate) fn read_counters(
    ebpf: &Ebpf,
    name: &str,
    names: &[&'static str],
) -> Result<Vec<(&'static str, u64)>> {
    let map = ebpf.map(name).with_context(|| format!("no map {name}"))?;
    let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
    let mut out = Vec::new();
    for (index, counter) in names.iter().enumerate() {
        let values = counters.get(&(index as u32), 0)?;
        out.push((*counter, values.iter().sum()));
    }
    Ok(out)
}

pub(crate) fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))
}

fn fill_filter(ebpf: &mut Ebpf, name: &str, ids: &[u32]) -> Result<()> {
    let map = ebpf
        .map_mut(name)
        .with_context(|| format!("map {name} missing"))?;
    let mut filter: BpfHashMap<&mut MapData, u32, u8> = BpfHashMap::try_from(map)?;
    for id in ids {
        filter
            .insert(id, 1, 0)
            .with_context(|| format!("cannot add {id} to the {name} filter (at most 1024)"))?;
    }
    Ok(())
}
