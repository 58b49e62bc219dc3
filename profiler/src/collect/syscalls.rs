//! Syscalls family, collected: per (process, syscall) statistics and the stacks of slow calls.

use std::collections::HashMap;

use anyhow::Result;
use profiler_common::syscalls::{SlowKey, SlowValue, SyscallKey, SyscallStats};

use super::stacks::{NO_STACK, StackBuilder, comm_of, sort_stacks, synthetic_frame};
use crate::model::{SyscallProfile, SyscallStat};

/// The capture's syscall statistics and slow calls (what the maps gained while it counted;
/// see `SyscallBase`).
pub(super) fn profile(
    stats: HashMap<SyscallKey, SyscallStats>,
    slow_calls: HashMap<SlowKey, SlowValue>,
    slow_threshold_ns: u64,
    builder: &mut StackBuilder,
) -> Result<SyscallProfile> {
    let mut stats: Vec<SyscallStat> = stats
        .into_iter()
        .map(|(key, value)| SyscallStat {
            pid: key.tgid,
            comm: comm_of(builder.processes, key.tgid),
            nr: key.nr,
            name: crate::probes::syscalls::name(key.nr),
            count: value.count,
            errors: value.errors,
            total_ns: value.total_ns,
            max_ns: value.max_ns,
            buckets: value.hist.to_vec(),
        })
        .collect();
    stats.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.pid.cmp(&b.pid)));
    let mut slow = Vec::new();
    for (key, value) in slow_calls {
        let mut stack = builder.build(
            (key.tgid, key.tid, NO_STACK, key.user_stack_id),
            "syscall",
            value.total_ns,
            value.count,
            Vec::new(),
        )?;
        // No kernel stack was taken (at sys_exit it is only the exit path): drop its
        // placeholder; the syscall's name says more.
        stack.frames.pop();
        stack.frames.push(synthetic_frame(format!(
            "[syscall {}]",
            crate::probes::syscalls::name(key.nr)
        )));
        slow.push(stack);
    }
    sort_stacks(&mut slow);
    Ok(SyscallProfile {
        slow_threshold_ns,
        stats,
        slow,
    })
}
