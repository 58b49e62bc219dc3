//! First-seen tasks: the kernel tells us of each new (process, thread) as it first records
//! it, so its memory maps are read while it lives, and of each exec (new maps, name and
//! unwinding tables).

use profiler_common::shared::NewTaskEvent;

use crate::probes::Probes;
use crate::symbolize::procmaps::ProcessCache;

pub(super) fn drain_new_tasks(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    processes: &mut ProcessCache,
    probes: &Probes,
) {
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<NewTaskEvent>() {
            continue;
        }
        // SAFETY: the kernel wrote a whole NewTaskEvent; read_unaligned copes with alignment.
        let event: NewTaskEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        let len = event.comm.iter().position(|&b| b == 0).unwrap_or(16);
        let comm = String::from_utf8_lossy(&event.comm[..len]);
        if event.exec != 0 {
            // Another program in the same process: new maps, name and tables.
            processes.exec(event.tgid, &comm);
            probes.unwind_process_after_exec(event.tgid);
            continue;
        }
        processes.observe(event.tgid, &comm);
        // New code to walk: its unwinding tables (built once per file, shared).
        probes.unwind_process(event.tgid);
    }
}
