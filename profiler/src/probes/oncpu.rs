//! On-CPU family: attaches `profiler-ebpf/src/oncpu.rs` to a cpu-clock perf event on every
//! online CPU, sampling at a frequency, and reads its sample counts.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya::programs::PerfEvent;
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use profiler_common::oncpu::{OncpuKey, counter, maps};

use super::{Probes, program, read_counters, read_hash};

#[derive(Debug, Clone)]
pub struct OncpuConfig {
    /// Samples per second per CPU.
    pub frequency: u64,
}

impl Default for OncpuConfig {
    fn default() -> Self {
        Self { frequency: 99 }
    }
}

/// Attaches the sampler on every online CPU; returns the frequency.
pub(super) fn attach(ebpf: &mut Ebpf, config: &OncpuConfig) -> Result<u64> {
    let prog: &mut PerfEvent = program(ebpf, "oncpu_sample")?.try_into()?;
    prog.load()
        .context("loading the on-CPU sampling program failed")?;
    let cpus = aya::util::online_cpus()
        .map_err(|(what, err)| anyhow::anyhow!("cannot list online CPUs ({what}): {err}"))?;
    for cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Frequency(config.frequency),
            false,
        )
        .with_context(|| format!("attaching the cpu-clock sampler to CPU {cpu} failed"))?;
    }
    Ok(config.frequency)
}

impl Probes {
    /// Samples so far per (tgid, tid, stacks).
    pub fn oncpu_counts(&self) -> Result<HashMap<OncpuKey, u64>> {
        read_hash(self.ebpf(), maps::COUNTS)
    }

    pub fn oncpu_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        read_counters(self.ebpf(), maps::COUNTERS, &counter::NAMES)
    }
}
