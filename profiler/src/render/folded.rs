//! Folded-stack lines (`comm;root;…;leaf value`), the text form every flamegraph and `diff`
//! reads: per family, the wall-clock view (on- and off-CPU per thread) and query time.

use std::collections::BTreeMap;

use crate::model::{Capture, Frame, FrameKind, Stack};

/// What the flamegraphs' root frames are: the process (its name), or where it runs, with the
/// process below (`--group-by`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    #[default]
    Process,
    /// The process's cgroup2 path.
    Cgroup,
    /// `container:ID` (12 digits), or `[host]` for processes in no container.
    Container,
    /// The process's systemd unit, or `[no unit]`.
    Unit,
}

/// `capture`'s stacks with the group as their root and the process name as the next frame
/// (for the folded files and flamegraphs; `capture.json` keeps the stacks as they are).
pub fn group_roots(capture: &Capture, by: GroupBy) -> Capture {
    let mut grouped = capture.clone();
    if by == GroupBy::Process {
        return grouped;
    }
    let processes: std::collections::HashMap<u32, &crate::model::Process> =
        capture.processes.iter().map(|p| (p.pid, p)).collect();
    let group_of = |pid: u32| -> String {
        let process = processes.get(&pid);
        match by {
            GroupBy::Process => String::new(),
            GroupBy::Cgroup => process
                .and_then(|p| p.cgroup.clone())
                .unwrap_or_else(|| "[no cgroup]".to_string()),
            GroupBy::Container => process
                .and_then(|p| p.container_id.as_deref())
                .map(|id| format!("container:{}", &id[..id.len().min(12)]))
                .unwrap_or_else(|| "[host]".to_string()),
            GroupBy::Unit => process
                .and_then(|p| p.systemd_unit.clone())
                .unwrap_or_else(|| "[no unit]".to_string()),
        }
    };
    let regroup = |stacks: &mut Vec<Stack>| {
        for stack in stacks {
            let comm = std::mem::replace(&mut stack.comm, group_of(stack.pid));
            stack.frames.insert(
                0,
                Frame {
                    name: comm,
                    kind: FrameKind::Synthetic,
                    module: None,
                    offset: None,
                    inlined: false,
                    unresolved: false,
                },
            );
        }
    };
    if let Some(offcpu) = grouped.offcpu.as_mut() {
        regroup(&mut offcpu.stacks);
    }
    if let Some(oncpu) = grouped.oncpu.as_mut() {
        regroup(&mut oncpu.stacks);
    }
    if let Some(syscalls) = grouped.syscalls.as_mut() {
        regroup(&mut syscalls.slow);
    }
    if let Some(db) = grouped.db.as_mut() {
        regroup(&mut db.stacks);
    }
    grouped
}

/// Folded-stack lines (`comm;root;…;leaf value`), identical stacks merged, sorted. `value`
/// picks what a stack weighs (ns, samples); merged sums are divided by `divisor` (1000: ns →
/// microseconds) and rounded; lines that round to zero are left out.
/// Kernel frames carry the `_[k]` suffix that FlameGraph and inferno colour as kernel code.
pub fn folded(stacks: &[Stack], value: impl Fn(&Stack) -> u64, divisor: u64) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for stack in stacks {
        *merged.entry(folded_path(stack)).or_default() += value(stack);
    }
    let divisor = divisor.max(1);
    merged
        .into_iter()
        .filter_map(|(path, sum)| {
            let rounded = (sum + divisor / 2) / divisor;
            (rounded > 0).then(|| format!("{path} {rounded}"))
        })
        .collect()
}

/// The leaf a wall-clock stack ends in: where the time went.
pub fn wallclock_leaf(stack: &Stack) -> &'static str {
    match stack.state.as_str() {
        "running" => "[running]",
        "runqueue" => "[runqueue]",
        "disk" => "[disk]",
        "idle" => "[idle]",
        "sleep"
            if stack
                .frames
                .iter()
                .any(|f| f.kind == FrameKind::Kernel && f.name.contains("futex")) =>
        {
            "[lock]"
        }
        "sleep" => "[sleep]",
        _ => "[other]",
    }
}

/// Wall-clock view: per thread (`comm;[tid N];…`), on-CPU samples as CPU time and off-CPU
/// time in one set of folded lines, in microseconds, each ending in `wallclock_leaf`.
/// Needs both families; without one of them it would silently mislead, so it is empty.
pub fn wallclock(capture: &Capture) -> Vec<String> {
    let (Some(offcpu), Some(oncpu)) = (&capture.offcpu, &capture.oncpu) else {
        return Vec::new();
    };
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for stack in oncpu.stacks.iter().chain(&offcpu.stacks) {
        let mut path = clean(&stack.comm);
        path.push_str(&format!(";[tid {}]", stack.tid));
        for frame in &stack.frames {
            path.push(';');
            path.push_str(&frame_label(frame));
        }
        path.push(';');
        path.push_str(wallclock_leaf(stack));
        *merged.entry(path).or_default() += stack.total_ns;
    }
    merged
        .into_iter()
        .filter_map(|(path, ns)| {
            let us = (ns + 500) / 1000;
            (us > 0).then(|| format!("{path} {us}"))
        })
        .collect()
}

/// The `;`-joined path of a stack, process name first.
pub fn folded_path(stack: &Stack) -> String {
    let mut path = clean(&stack.comm);
    for frame in &stack.frames {
        path.push(';');
        path.push_str(&frame_label(frame));
    }
    path
}

pub fn frame_label(frame: &Frame) -> String {
    let name = clean(&frame.name);
    match frame.kind {
        FrameKind::Kernel => format!("{name}_[k]"),
        _ => name,
    }
}

/// Folded lines are `;`-separated and end with ` count`: keep names from breaking either.
fn clean(name: &str) -> String {
    let name = name.replace(';', ":").replace(['\n', '\r'], " ");
    if name.is_empty() {
        "[unnamed]".to_string()
    } else {
        name
    }
}

/// `db.folded`, microseconds of query time: client-side queries under the code path that
/// issued them (`comm;frames…;[db] FINGERPRINT`), server-side ones under their server
/// (`server;[db postgres-usdt] FINGERPRINT`).
pub fn db_folded(db: &crate::model::DbProfile) -> Vec<String> {
    let mut lines = folded(&db.stacks, |s| s.total_ns, 1000);
    lines.extend(
        db.queries_without_stacks()
            .filter(|q| q.total_ns >= 1000)
            .map(|q| {
                format!(
                    "{};[db {}] {} {}",
                    clean(if q.comm.is_empty() {
                        "postgres"
                    } else {
                        &q.comm
                    }),
                    q.source,
                    clean(&q.fingerprint),
                    q.total_ns / 1000
                )
            }),
    );
    lines
}
