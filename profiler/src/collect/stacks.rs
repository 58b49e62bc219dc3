//! Aggregation keys (process, thread, kernel and user stack ids) → symbolized stacks, and
//! the helpers every family's stacks share.

use anyhow::Result;
use profiler_common::shared::KERNEL_THREAD_STACK;

use crate::model::{Frame, FrameKind, Stack};
use crate::probes::Probes;
use crate::symbolize::procmaps::ProcessCache;
use crate::symbolize::{Symbolizer, missing_stack_frame};

/// Turns aggregation keys into symbolized stacks.
pub(crate) struct StackBuilder<'a> {
    pub(crate) probes: &'a Probes,
    pub(crate) processes: &'a ProcessCache,
    pub(crate) symbolizer: &'a mut Symbolizer,
    /// Stacks of user threads shown without their user part (`[user stack …]`).
    pub(crate) user_stacks_missing: u64,
}

impl StackBuilder<'_> {
    pub(crate) fn build(
        &mut self,
        (tgid, tid, kernel_stack_id, user_stack_id): (u32, u32, i32, i32),
        state: &str,
        total_ns: u64,
        count: u64,
        intervals: Vec<u64>,
    ) -> Result<Stack> {
        let mut frames = Vec::new();
        let process = self.processes.get(tgid);
        match self.probes.stack(user_stack_id)? {
            Some(ips) => frames.extend(self.symbolizer.user_frames(process, &ips)),
            // A kernel thread has no user stack: nothing to show, nothing lost. The kernel
            // says so (it read the task's flags); /proc says so for those it did not tell.
            None if user_stack_id == KERNEL_THREAD_STACK
                || process.is_some_and(|p| p.kernel_thread) => {}
            None => {
                self.user_stacks_missing += 1;
                frames.push(missing_stack_frame(FrameKind::User, user_stack_id));
            }
        }
        match self.probes.stack(kernel_stack_id)? {
            Some(ips) => frames.extend(self.symbolizer.kernel_frames(&ips)),
            None => frames.push(missing_stack_frame(FrameKind::Kernel, kernel_stack_id)),
        }
        Ok(Stack {
            pid: tgid,
            tid,
            comm: comm_of(self.processes, tgid),
            state: state.to_string(),
            frames,
            total_ns,
            count,
            intervals,
        })
    }
}

/// A stack id that stands for "not captured" (-EFAULT).
pub(crate) const NO_STACK: i32 = -14;

pub(crate) fn comm_of(processes: &ProcessCache, pid: u32) -> String {
    processes
        .get(pid)
        .map(|p| p.comm.clone())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| format!("[pid {pid}]"))
}

pub(crate) fn synthetic_frame(name: String) -> Frame {
    Frame {
        name,
        kind: FrameKind::Synthetic,
        module: None,
        offset: None,
        inlined: false,
        unresolved: false,
    }
}

/// Sampled mode: a recorded stack stands for `every` of its kind.
pub(crate) fn scale_stack(stack: &mut Stack, every: u64) {
    stack.total_ns *= every;
    stack.count *= every;
    stack.intervals.iter_mut().for_each(|v| *v *= every);
}

pub(crate) fn sort_stacks(stacks: &mut [Stack]) {
    stacks.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.tid.cmp(&b.tid)));
}
