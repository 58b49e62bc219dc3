//! On-CPU family, collected: sampled stacks, each sample worth one sampling period.

use anyhow::Result;
use profiler_common::oncpu::OncpuKey;

use super::series::Series;
use super::stacks::{StackBuilder, sort_stacks};
use crate::model::OncpuProfile;

pub(super) fn profile(
    frequency: u64,
    oncpu_series: &Series<OncpuKey>,
    builder: &mut StackBuilder,
) -> Result<OncpuProfile> {
    // Each sample stands for one sampling period of CPU time.
    let period_ns = 1_000_000_000 / frequency.max(1);
    let mut stacks = Vec::new();
    for (key, (samples, _)) in &oncpu_series.latest {
        let intervals = oncpu_series
            .values(key)
            .iter()
            .map(|s| s * period_ns)
            .collect();
        stacks.push(builder.build(
            (key.tgid, key.tid, key.kernel_stack_id, key.user_stack_id),
            "running",
            samples * period_ns,
            *samples,
            intervals,
        )?);
    }
    sort_stacks(&mut stacks);
    Ok(OncpuProfile {
        frequency_hz: frequency,
        stacks,
    })
}
