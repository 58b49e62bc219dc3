//! Tables for generated code whose layout is known: CPython's perf trampolines.
//!
//! With `-X perf` (3.12+), CPython runs every Python function through a small trampoline
//! copied into anonymous executable memory, one per code object, named in the process's perf
//! map (`py::QUALNAME:FILE`). On x86_64 CPython 3.12 and 3.13 (without frame pointers) the
//! trampoline is `sub $8,%rsp; call *%rcx; add $8,%rsp; ret`: no frame pointer, no unwind
//! information, so neither a frame-pointer step nor a table would get past it. Its layout is
//! fixed, though, and checked here against the process's own memory: a table is made for
//! each arena of trampolines from the perf map's entries in it, and the walker steps through
//! them like through any function, so the Python function names land in the stack in order.

use std::os::unix::fs::FileExt as _;

use profiler_common::unwind::{CFA_SP, FP_SAME, UnwindRow};

use super::table::Table;
use crate::symbolize::perfmap::PerfMap;

/// The x86_64 trampoline of CPython 3.12 and 3.13 (Python/asm_trampoline.S).
const TRAMPOLINE: [u8; 11] = [
    0x48, 0x83, 0xec, 0x08, // sub $8, %rsp
    0xff, 0xd1, // call *%rcx
    0x48, 0x83, 0xc4, 0x08, // add $8, %rsp
    0xc3, // ret
];

/// CFA offsets within one trampoline: from its start, after the `sub`, after the `add`.
const ROWS: [(u32, i16); 3] = [(0, 8), (4, 16), (10, 8)];

/// CFA past the last known trampoline: one made after the table, met as a caller (its
/// return address after the `call`), as the walker meets every trampoline but a leaf.
const AFTER_KNOWN: i16 = 16;

/// The table of the arena of trampolines at `[start, end)` of process `pid`, with its rows
/// relative to `start`; `None` when the perf map names no Python function there, or the
/// code is not the known trampoline.
pub fn python_trampolines(pid: u32, start: u64, end: u64, map: &PerfMap) -> Option<Table> {
    let entries: Vec<u64> = map
        .entries_in(start, end)
        .filter(|(_, _, name)| name.starts_with("py::"))
        .map(|(at, _, _)| at)
        .collect();
    let first = *entries.first()?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut code = [0u8; TRAMPOLINE.len()];
    mem.read_exact_at(&mut code, first).ok()?;
    if code != TRAMPOLINE {
        return None;
    }
    Some(Table {
        rows: rows(entries.iter().map(|at| (at - start) as u32)),
        ..Default::default()
    })
}

/// Rows for trampolines at `offsets` (ascending).
fn rows(offsets: impl Iterator<Item = u32>) -> Vec<UnwindRow> {
    let row = |pc: u32, cfa: i16| UnwindRow {
        pc,
        cfa_offset: cfa,
        cfa_rule: CFA_SP,
        fp: FP_SAME,
    };
    let mut rows: Vec<UnwindRow> = Vec::new();
    for offset in offsets {
        // The next trampoline may start where this one's "after" row is: it replaces it.
        if rows.last().is_some_and(|last| last.pc >= offset) {
            rows.pop();
        }
        rows.extend(ROWS.iter().map(|&(at, cfa)| row(offset + at, cfa)));
        rows.push(row(offset + TRAMPOLINE.len() as u32, AFTER_KNOWN));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_trampoline_gets_its_three_rules_and_unknown_ones_after_them_the_callers() {
        // 3.12 packs them every 11 bytes, 3.13 every 16.
        let rows = rows([0, 11, 32].into_iter());
        let pcs: Vec<(u32, i64)> = rows.iter().map(|r| (r.pc, r.cfa_offset_bytes())).collect();
        assert_eq!(
            pcs,
            [
                (0, 8),
                (4, 16),
                (10, 8),
                (11, 8),
                (15, 16),
                (21, 8),
                (22, 16),
                (32, 8),
                (36, 16),
                (42, 8),
                (43, 16)
            ]
        );
        assert!(rows.iter().all(|r| r.rule() == CFA_SP && r.fp == FP_SAME));
    }
}
