//! Off-CPU family, collected: stacks weighted by blocked time (with the database query a
//! thread waited on as a frame), and run-queue latency histograms per process.

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use profiler_common::offcpu::{
    OffcpuKey, RUNQ_BUCKETS, RunqKey, STATE_DISK, STATE_IDLE, STATE_RUNQUEUE, STATE_SLEEP,
};

use super::series::Series;
use super::stacks::{StackBuilder, scale_stack, sort_stacks, synthetic_frame};
use crate::model::{FrameKind, OffcpuProfile, RunqueueHistogram};
use crate::symbolize::procmaps::ProcessCache;

pub(super) fn profile(
    offcpu_series: &Series<OffcpuKey>,
    builder: &mut StackBuilder,
    db_frames: &HashMap<u32, String>,
    sample_every: u32,
    runqueue_waits: HashMap<RunqKey, u64>,
) -> Result<OffcpuProfile> {
    let mut stacks = Vec::new();
    for (key, (total_ns, count)) in &offcpu_series.latest {
        let mut stack = builder.build(
            (key.tgid, key.tid, key.kernel_stack_id, key.user_stack_id),
            state_name(key.state),
            *total_ns,
            *count,
            offcpu_series.values(key),
        )?;
        if key.db_frame != 0 {
            // Waiting for a database query: the query as a frame between the code
            // path that issued it and the kernel's wait.
            let name = db_frames
                .get(&key.db_frame)
                .map_or_else(|| "[db] query".to_string(), |fp| format!("[db] {fp}"));
            let at = stack
                .frames
                .iter()
                .position(|f| f.kind == FrameKind::Kernel)
                .unwrap_or(stack.frames.len());
            stack.frames.insert(at, synthetic_frame(name));
        }
        stacks.push(stack);
    }
    let every = u64::from(sample_every.max(1));
    if every > 1 {
        // Sampled mode: each recorded block stands for `every` blocks.
        for stack in &mut stacks {
            scale_stack(stack, every);
        }
    }
    sort_stacks(&mut stacks);
    let mut runqueue = runqueue_histograms(runqueue_waits, builder.processes);
    for histogram in &mut runqueue {
        histogram.waits *= every;
        histogram.buckets.iter_mut().for_each(|b| *b *= every);
    }
    Ok(OffcpuProfile { stacks, runqueue })
}

fn runqueue_histograms(
    waits_by_key: HashMap<RunqKey, u64>,
    processes: &ProcessCache,
) -> Vec<RunqueueHistogram> {
    let mut by_pid: BTreeMap<u32, RunqueueHistogram> = BTreeMap::new();
    for (key, waits) in waits_by_key {
        if waits == 0 {
            continue;
        }
        let entry = by_pid.entry(key.tgid).or_insert_with(|| RunqueueHistogram {
            pid: key.tgid,
            comm: processes
                .get(key.tgid)
                .map(|p| p.comm.clone())
                .unwrap_or_default(),
            waits: 0,
            buckets: vec![0; RUNQ_BUCKETS as usize],
        });
        if let Some(slot) = entry.buckets.get_mut(key.bucket as usize) {
            *slot += waits;
            entry.waits += waits;
        }
    }
    let mut histograms: Vec<_> = by_pid.into_values().collect();
    histograms.sort_by_key(|h| std::cmp::Reverse(h.waits));
    histograms
}
fn state_name(state: u32) -> &'static str {
    match state {
        STATE_RUNQUEUE => "runqueue",
        STATE_SLEEP => "sleep",
        STATE_DISK => "disk",
        STATE_IDLE => "idle",
        _ => "other",
    }
}
