//! Off-CPU family: loads `profiler-ebpf/src/offcpu.rs`, sets its filters and kernel offsets
//! as globals, attaches to sched_switch (tp_btf, or the tracepoint as a fallback) and reads
//! its maps.
//!
//! ```no_run
//! # use profiler::probes::offcpu::{OffcpuConfig, OffcpuProbe};
//! let mut probe = OffcpuProbe::load(&OffcpuConfig::default())?;
//! std::thread::sleep(std::time::Duration::from_secs(1));
//! let totals = probe.totals()?; // (tgid, tid, stacks, state) → blocked ns, count
//! # anyhow::Ok(())
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, StackTraceMap};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use profiler_common::offcpu::{
    OVERFLOW_STACK_BIT, OffcpuKey, OffcpuValue, STATE_DISK, STATE_MASK_ANY, STATE_SLEEP,
    THREADS_ALL, THREADS_KERNEL, THREADS_USER, counter, maps,
};

use super::{EBPF_OBJECT, tracefs};
use crate::btf::Btf;

/// Which task states count as off-CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StateFilter {
    /// Every switch-out, including preemption (time waiting for a CPU).
    #[default]
    Any,
    /// TASK_INTERRUPTIBLE: waiting for an event (sleep, poll, lock, pipe…).
    Sleeping,
    /// TASK_UNINTERRUPTIBLE: usually disk I/O.
    Disk,
}

impl StateFilter {
    fn mask(self) -> u32 {
        match self {
            Self::Any => STATE_MASK_ANY,
            Self::Sleeping => 1 << STATE_SLEEP,
            Self::Disk => 1 << STATE_DISK,
        }
    }
}

/// Which threads to trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ThreadFilter {
    #[default]
    All,
    User,
    Kernel,
}

/// How to hook sched_switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachMode {
    /// tp_btf when the kernel allows it, else the tracepoint.
    #[default]
    Auto,
    TpBtf,
    Tracepoint,
}

#[derive(Debug, Clone)]
pub struct OffcpuConfig {
    pub pids: Vec<u32>,
    pub tids: Vec<u32>,
    pub min_block_ns: u64,
    pub max_block_ns: Option<u64>,
    pub state: StateFilter,
    pub threads: ThreadFilter,
    pub attach: AttachMode,
    pub btf_path: PathBuf,
    /// Entries in the main stack map (the overflow map has 4096 more).
    pub stack_storage_size: u32,
}

impl Default for OffcpuConfig {
    fn default() -> Self {
        Self {
            pids: Vec::new(),
            tids: Vec::new(),
            min_block_ns: 1_000,
            max_block_ns: None,
            state: StateFilter::Any,
            threads: ThreadFilter::All,
            attach: AttachMode::Auto,
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            stack_storage_size: 16384,
        }
    }
}

/// The loaded and attached off-CPU programs. Dropping it detaches them.
pub struct OffcpuProbe {
    ebpf: Ebpf,
    /// `tp_btf` or `tracepoint`.
    pub attached_with: &'static str,
}

impl OffcpuProbe {
    pub fn load(config: &OffcpuConfig) -> Result<Self> {
        let btf = Btf::from_file(&config.btf_path)?;
        let task_pid_off = btf.member_offset("task_struct", "pid")?;
        let task_flags_off = btf.member_offset("task_struct", "flags")?;
        let task_comm_off = btf.member_offset("task_struct", "comm")?;
        let task_state_off = btf
            .member_offset("task_struct", "__state")
            .or_else(|_| btf.member_offset("task_struct", "state"))?;
        // (void *ctx, bool preempt, prev, next[, unsigned int prev_state])
        let has_prev_state_arg = u32::from(
            btf.typedef_proto_params("btf_trace_sched_switch")
                .unwrap_or(4)
                >= 5,
        );

        let fields = tracefs::field_offsets("sched", "sched_switch")?;
        let field = |name: &str| {
            fields
                .get(name)
                .copied()
                .with_context(|| format!("sched_switch tracepoint has no field {name}"))
        };
        let tp_prev_state_off = field("prev_state")?;
        let tp_next_comm_off = field("next_comm")?;
        let tp_next_pid_off = field("next_pid")?;

        let filter_tgid = u32::from(!config.pids.is_empty());
        let filter_tid = u32::from(!config.tids.is_empty());
        let min_block_ns = config.min_block_ns;
        let max_block_ns = config.max_block_ns.unwrap_or(u64::MAX);
        let state_filter = config.state.mask();
        let thread_kind = match config.threads {
            ThreadFilter::All => THREADS_ALL,
            ThreadFilter::User => THREADS_USER,
            ThreadFilter::Kernel => THREADS_KERNEL,
        };

        let mut ebpf = EbpfLoader::new()
            .override_global("FILTER_TGID", &filter_tgid, true)
            .override_global("FILTER_TID", &filter_tid, true)
            .override_global("MIN_BLOCK_NS", &min_block_ns, true)
            .override_global("MAX_BLOCK_NS", &max_block_ns, true)
            .override_global("STATE_FILTER", &state_filter, true)
            .override_global("THREAD_KIND", &thread_kind, true)
            .override_global("TASK_PID_OFF", &task_pid_off, true)
            .override_global("TASK_FLAGS_OFF", &task_flags_off, true)
            .override_global("TASK_COMM_OFF", &task_comm_off, true)
            .override_global("TASK_STATE_OFF", &task_state_off, true)
            .override_global("BTF_HAS_PREV_STATE_ARG", &has_prev_state_arg, true)
            .override_global("TP_PREV_STATE_OFF", &tp_prev_state_off, true)
            .override_global("TP_NEXT_COMM_OFF", &tp_next_comm_off, true)
            .override_global("TP_NEXT_PID_OFF", &tp_next_pid_off, true)
            .map_max_entries(maps::STACKS, config.stack_storage_size.max(1))
            .load(EBPF_OBJECT)
            .context("loading the off-CPU eBPF programs into the kernel failed")?;

        fill_filter(&mut ebpf, maps::TGID_FILTER, &config.pids)?;
        fill_filter(&mut ebpf, maps::TID_FILTER, &config.tids)?;

        let exit: &mut TracePoint = program(&mut ebpf, "offcpu_exit")?.try_into()?;
        exit.load()
            .context("loading the sched_process_exit program failed")?;
        exit.attach("sched", "sched_process_exit")
            .context("attaching to sched:sched_process_exit failed")?;

        let attached_with = match config.attach {
            AttachMode::TpBtf => attach_btf(&mut ebpf, config)?,
            AttachMode::Tracepoint => attach_tracepoint(&mut ebpf)?,
            AttachMode::Auto => match attach_btf(&mut ebpf, config) {
                Ok(how) => how,
                Err(btf_err) => attach_tracepoint(&mut ebpf)
                    .with_context(|| format!("tp_btf/sched_switch failed too ({btf_err:#})"))?,
            },
        };
        Ok(Self {
            ebpf,
            attached_with,
        })
    }

    /// The ring buffer of first-seen tasks; can be taken once.
    pub fn take_new_tasks(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(maps::NEW_TASKS)
            .context("new-task ring buffer already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Current cumulative totals (monotonic while the programs run).
    pub fn totals(&self) -> Result<HashMap<OffcpuKey, OffcpuValue>> {
        let map = self.ebpf.map(maps::TOTALS).context("no totals map")?;
        let totals: BpfHashMap<&MapData, OffcpuKey, OffcpuValue> = BpfHashMap::try_from(map)?;
        let mut out = HashMap::new();
        for entry in totals.iter() {
            match entry {
                Ok((key, value)) => {
                    out.insert(key, value);
                }
                // The key was deleted between listing and lookup; nothing deletes keys, but
                // a failed read must not end the capture.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(err) => return Err(err).context("reading the off-CPU totals failed"),
            }
        }
        Ok(out)
    }

    /// Kernel-side counters summed over CPUs, with their names.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let map = self.ebpf.map(maps::COUNTERS).context("no counters map")?;
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut out = Vec::new();
        for (index, name) in counter::NAMES.iter().enumerate() {
            let values = counters.get(&(index as u32), 0)?;
            out.push((*name, values.iter().sum()));
        }
        Ok(out)
    }

    /// Instruction pointers of a stack, innermost first; `None` when the id is gone.
    pub fn stack(&self, stack_id: i32) -> Result<Option<Vec<u64>>> {
        if stack_id < 0 {
            return Ok(None);
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
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
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

fn attach_btf(ebpf: &mut Ebpf, config: &OffcpuConfig) -> Result<&'static str> {
    let btf = aya::Btf::parse_file(&config.btf_path, aya::Endianness::default())
        .context("parsing the kernel BTF failed")?;
    let prog: &mut BtfTracePoint = program(ebpf, "offcpu_switch_btf")?.try_into()?;
    prog.load("sched_switch", &btf)
        .context("loading tp_btf/sched_switch failed")?;
    prog.attach()
        .context("attaching tp_btf/sched_switch failed")?;
    Ok("tp_btf")
}

fn attach_tracepoint(ebpf: &mut Ebpf) -> Result<&'static str> {
    let prog: &mut TracePoint = program(ebpf, "offcpu_switch_tp")?.try_into()?;
    prog.load()
        .context("loading the sched_switch tracepoint program failed")?;
    prog.attach("sched", "sched_switch")
        .context("attaching to sched:sched_switch failed")?;
    Ok("tracepoint")
}

/// Checks that would otherwise surface as obscure load errors.
pub fn preflight(config: &OffcpuConfig) -> Result<()> {
    if !config.btf_path.exists() {
        bail!(
            "the kernel exposes no BTF at {} (it needs CONFIG_DEBUG_INFO_BTF=y); cannot compute \
             the kernel offsets the off-CPU probes need",
            config.btf_path.display()
        );
    }
    Ok(())
}
