//! Off-CPU family: sets the globals of `profiler-ebpf/src/offcpu.rs`, attaches it to
//! sched_switch (tp_btf, or the tracepoint as a fallback) and reads its maps.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya::programs::{BtfTracePoint, TracePoint};
use profiler_common::offcpu::{
    OffcpuKey, OffcpuValue, RunqKey, STATE_DISK, STATE_MASK_ANY, STATE_SLEEP, counter, maps,
};

use super::{Globals, Probes, global, kernel::tracefs, program, read_counters, read_hash};
use crate::probes::kernel::btf::Btf;

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
    pub min_block_ns: u64,
    pub max_block_ns: Option<u64>,
    pub state: StateFilter,
    pub attach: AttachMode,
    /// Hook sched_wakeup to split each block into blocked time and run-queue wait. Costs a
    /// program run per wakeup; without it a block counts whole in its switch-out state.
    pub runqueue_split: bool,
}

impl Default for OffcpuConfig {
    fn default() -> Self {
        Self {
            min_block_ns: 1_000,
            max_block_ns: None,
            state: StateFilter::Any,
            attach: AttachMode::Auto,
            runqueue_split: true,
        }
    }
}

/// The family's globals: filters, and the offsets its programs read.
pub(super) fn globals(config: &OffcpuConfig, btf: &Btf, globals: &mut Globals) -> Result<()> {
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
    global(globals, "MIN_BLOCK_NS", config.min_block_ns);
    global(
        globals,
        "MAX_BLOCK_NS",
        config.max_block_ns.unwrap_or(u64::MAX),
    );
    global(globals, "STATE_FILTER", config.state.mask());
    global(globals, "RUNQ_SPLIT", u32::from(config.runqueue_split));
    global(globals, "BTF_HAS_PREV_STATE_ARG", has_prev_state_arg);
    global(globals, "TP_PREV_STATE_OFF", field("prev_state")?);
    global(globals, "TP_NEXT_COMM_OFF", field("next_comm")?);
    global(globals, "TP_NEXT_PID_OFF", field("next_pid")?);
    let wakeup = tracefs::field_offsets("sched", "sched_wakeup")?;
    let wakeup_pid = wakeup
        .get("pid")
        .copied()
        .context("sched_wakeup tracepoint has no field pid")?;
    global(globals, "TP_WAKEUP_PID_OFF", wakeup_pid);
    Ok(())
}

/// Attaches the exit hook and sched_switch; returns how sched_switch was hooked.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    config: &OffcpuConfig,
    btf_path: &Path,
) -> Result<&'static str> {
    let exit: &mut TracePoint = program(ebpf, "offcpu_exit")?.try_into()?;
    exit.load()
        .context("loading the sched_process_exit program failed")?;
    exit.attach("sched", "sched_process_exit")
        .context("attaching to sched:sched_process_exit failed")?;
    match config.attach {
        AttachMode::TpBtf => attach_btf(ebpf, btf_path, config.runqueue_split),
        AttachMode::Tracepoint => attach_tracepoint(ebpf, config.runqueue_split),
        AttachMode::Auto => match attach_btf(ebpf, btf_path, config.runqueue_split) {
            Ok(how) => Ok(how),
            Err(btf_err) => attach_tracepoint(ebpf, config.runqueue_split)
                .with_context(|| format!("tp_btf/sched_switch failed too ({btf_err:#})")),
        },
    }
}

/// sched_wakeup first (it only marks threads that sched_switch recorded), then sched_switch.
fn attach_btf(ebpf: &mut Ebpf, btf_path: &Path, wakeups: bool) -> Result<&'static str> {
    let btf = aya::Btf::parse_file(btf_path, aya::Endianness::default())
        .context("parsing the kernel BTF failed")?;
    let programs = [
        ("offcpu_wakeup_btf", "sched_wakeup"),
        ("offcpu_switch_btf", "sched_switch"),
    ];
    for (name, event) in &programs[usize::from(!wakeups)..] {
        let (name, event) = (*name, *event);
        let prog: &mut BtfTracePoint = program(ebpf, name)?.try_into()?;
        prog.load(event, &btf)
            .with_context(|| format!("loading tp_btf/{event} failed"))?;
        prog.attach()
            .with_context(|| format!("attaching tp_btf/{event} failed"))?;
    }
    Ok("tp_btf")
}

fn attach_tracepoint(ebpf: &mut Ebpf, wakeups: bool) -> Result<&'static str> {
    let programs = [
        ("offcpu_wakeup_tp", "sched_wakeup"),
        ("offcpu_switch_tp", "sched_switch"),
    ];
    for (name, event) in &programs[usize::from(!wakeups)..] {
        let (name, event) = (*name, *event);
        let prog: &mut TracePoint = program(ebpf, name)?.try_into()?;
        prog.load()
            .with_context(|| format!("loading the {event} tracepoint program failed"))?;
        prog.attach("sched", event)
            .with_context(|| format!("attaching to sched:{event} failed"))?;
    }
    Ok("tracepoint")
}

impl Probes {
    /// Off-CPU totals so far (monotonic while the programs run).
    pub fn offcpu_totals(&self) -> Result<HashMap<OffcpuKey, OffcpuValue>> {
        read_hash(self.ebpf(), maps::TOTALS)
    }

    /// Run-queue latency histograms: (tgid, log2 bucket) → waits.
    pub fn runqueue_histograms(&self) -> Result<HashMap<RunqKey, u64>> {
        read_hash(self.ebpf(), maps::RUNQ_HIST)
    }

    pub fn offcpu_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        read_counters(self.ebpf(), maps::COUNTERS, &counter::NAMES)
    }
}
