//! User stacks walked from `.eh_frame`-derived tables, for code without frame pointers.
//!
//! Per walk: the user registers (pc, sp, fp) come from the task's `pt_regs` (saved at its
//! kernel entry) or, for a sample taken in user mode, from the perf event's own registers.
//! Each frame is one `bpf_loop` step (so the verifier checks the step once, whatever the
//! depth): binary search of the process's mappings (`UNWIND_PROCESSES`, ≤ 256, sorted), binary
//! search of the file's rows (`UNWIND_ROWS`, one global array; a table is a slice of it),
//! then the rule: CFA from sp or fp plus an offset, the return address read at CFA-8
//! (`bpf_probe_read_user`), the caller's fp read where the row says it was saved. A pc no
//! table covers (JIT code, a file without `.eh_frame`, a gap between functions) takes one
//! frame-pointer step instead. Every way a walk ends, and every fallback, has a counter in
//! `UNWIND_COUNTERS`; nothing is dropped silently.
//!
//! Cost: two binary searches (array lookups the verifier inlines) and two user reads per
//! frame, a hash of the frames, and one hash-map lookup per walk; a new stack (rare) is
//! copied into `UNWIND_STACKS`. A process whose tables userspace has not loaded yet, and a
//! kernel thread, get the frame-pointer stack from `bpf_get_stackid` as before.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::bpf_task_pt_regs,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use profiler_common::unwind::{
    ANONYMOUS, CFA_END, CFA_FP, CFA_PLT, CFA_SIGNAL, CFA_SP, FP_SAME, FP_UNDEFINED, HOW_FP_STEP,
    HOW_TRUNCATED, MAX_FRAMES, MAX_MAPPINGS, MODE_DWARF, MODE_FP, PROCESS_PYTHON, ProcessMappings,
    RA_OFFSET, SEARCH_STEPS, TABLE_FULL, UNWOUND_STACK_BIT, UnwindMapping, UnwindRow, UnwoundStack,
    counter, signal_frame,
};

use aya_log_ebpf::{debug, warn};

use crate::common::{bounded_loop, config};

/// `MODE_DWARF`: walk user stacks from the tables; `MODE_FP`: `bpf_get_stackid` only.
#[unsafe(no_mangle)]
static UNWIND_MODE: u32 = MODE_FP;

/// 1: log walks that stop on a failure through aya-log (`--ebpf-log`), at most one line per
/// CPU per second. 0 (the default): the verifier drops the logging code, it costs nothing.
#[unsafe(no_mangle)]
static UNWIND_LOG: u32 = 0;

/// When this CPU last logged a failed walk.
#[map(name = "UNWIND_LOG_LAST")]
static LOG_LAST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Failures already logged, (tgid, reason, pc): each is logged once.
#[map(name = "UNWIND_LOGGED")]
static LOGGED: LruHashMap<[u64; 2], u8> = LruHashMap::with_max_entries(4096, 0);

/// Every file's rows, back to back; userspace sizes it and writes it through mmap.
#[map(name = "UNWIND_ROWS")]
static ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// tgid → its executable mappings, sorted by start.
#[map(name = "UNWIND_PROCESSES")]
static PROCESSES: HashMap<u32, ProcessMappings> =
    HashMap::with_max_entries(8192, BPF_F_NO_PREALLOC);

/// Walked stacks by the low bits of their hash (the id is those bits | UNWOUND_STACK_BIT).
#[map(name = "UNWIND_STACKS")]
static STACKS: HashMap<u32, UnwoundStack> = HashMap::with_max_entries(16384, 0);

/// The stack being walked (too big for the BPF stack).
#[map(name = "UNWIND_SCRATCH")]
static SCRATCH: PerCpuArray<UnwoundStack> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "UNWIND_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    count_by(index, 1);
}

#[inline(always)]
fn count_by(index: u32, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += by };
    }
}

/// The user registers a walk starts from.
#[derive(Clone, Copy)]
pub struct UserRegs {
    pub pc: u64,
    pub sp: u64,
    pub fp: u64,
}

// `struct pt_regs` (x86_64): offsets of the registers the walker needs.
const PT_REGS_BP: usize = 4 * 8;
const PT_REGS_IP: usize = 16 * 8;
const PT_REGS_CS: usize = 17 * 8;
const PT_REGS_SP: usize = 19 * 8;

/// Reads the user registers from a `struct pt_regs`; `None` unless they are user-mode ones.
#[inline(always)]
unsafe fn regs_at(regs: *const u8) -> Option<UserRegs> {
    let read = |off: usize| unsafe { bpf_probe_read_kernel(regs.add(off) as *const u64) }.ok();
    let cs = read(PT_REGS_CS)?;
    if cs & 3 != 3 {
        return None; // a kernel thread, or kernel-mode registers
    }
    Some(UserRegs {
        pc: read(PT_REGS_IP)?,
        sp: read(PT_REGS_SP)?,
        fp: read(PT_REGS_BP)?,
    })
}

/// The current task's user registers, as saved when it entered the kernel.
#[inline(always)]
pub fn current_user_regs() -> Option<UserRegs> {
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const u8;
        if regs.is_null() {
            return None;
        }
        regs_at(regs)
    }
}

/// A perf event's or a uprobe's registers (`ctx`: `struct bpf_perf_event_data`, which
/// starts with the `pt_regs`, or the `pt_regs` themselves) when they are user-mode ones,
/// else the task's saved ones.
#[inline(always)]
fn sampled_user_regs(ctx: *const u8) -> Option<UserRegs> {
    // Direct context loads: the verifier allows these offsets of a perf event's context.
    let read = |off: usize| unsafe { core::ptr::read_volatile(ctx.add(off) as *const u64) };
    if read(PT_REGS_CS) & 3 == 3 {
        return Some(UserRegs {
            pc: read(PT_REGS_IP),
            sp: read(PT_REGS_SP),
            fp: read(PT_REGS_BP),
        });
    }
    current_user_regs()
}

/// Stack id for the user stack of a sampled task or a uprobe (`ctx`: its context).
#[inline(always)]
pub fn sampled_stack(tgid: u32, ctx: *const u8) -> Option<i32> {
    if !enabled() {
        return None;
    }
    let regs = sampled_user_regs(ctx)?;
    walk(tgid, regs)
}

/// Whether stacks are walked from tables at all (`--unwind dwarf`).
#[inline(always)]
pub fn enabled() -> bool {
    config(&UNWIND_MODE) == MODE_DWARF
}

/// The walk's state, on the program's stack; each `bpf_loop` step reads and updates it.
#[repr(C)]
struct Walk {
    pc: u64,
    sp: u64,
    fp: u64,
    hash: u64,
    len: u32,
    how: u32,
    /// The counter that says why the walk ended (0: still walking).
    outcome: u32,
    /// 1: `pc` is an interrupted pc (from a signal frame), not a return address.
    pc_exact: u32,
    mappings: *const ProcessMappings,
    stack: *mut UnwoundStack,
}

/// Processes whose walks found no tables → when they last asked userspace for them.
#[map(name = "UNWIND_ASKED")]
static ASKED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

/// A process asks again for its tables at most this often.
const ASK_EVERY_NS: u64 = 100_000_000;

/// A walk found no tables for `tgid` (a process that exec'd, or one whose first-seen event
/// has not come yet: families announce a task when they aggregate its first event, which for
/// a blocked task is when it wakes): a first-seen notice, so userspace loads its tables
/// while it blocks rather than after. At most every `ASK_EVERY_NS` per process.
#[inline(always)]
fn ask_for_tables(tgid: u32) {
    let now = unsafe { bpf_ktime_get_ns() };
    if unsafe { ASKED.get(&tgid) }.is_some_and(|last| now.wrapping_sub(*last) < ASK_EVERY_NS) {
        return;
    }
    let _ = ASKED.insert(&tgid, &now, 0);
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let comm = unsafe {
        (bpf_get_current_task_btf() as *const u8)
            .add(config(&crate::common::TASK_COMM_OFF) as usize)
    };
    if !crate::common::notify_new_task(tgid, pid_tgid as u32, comm) {
        count(counter::ASK_LOST);
    }
}

/// `tgid` exec'd: its tables are its old program's. Dropped here, at once, so that its
/// first walks as the new program ask for new ones (userspace, told of the exec through the
/// ring, drops its own record of them too).
#[inline(always)]
pub fn forget_process(tgid: u32) {
    let _ = PROCESSES.remove(&tgid);
    let _ = ASKED.remove(&tgid);
}

/// Walks the user stack of process `tgid` from `regs`. `None`: no tables for this process,
/// or the walked stack could not be stored (full map, or another stack under its key): the
/// caller takes the frame-pointer stack instead. `Some(id)`: a stack id with
/// `UNWOUND_STACK_BIT`, or -EFAULT when not even the first frame could be recorded.
#[inline(always)]
pub fn walk(tgid: u32, regs: UserRegs) -> Option<i32> {
    let Some(mappings) = (unsafe { PROCESSES.get(tgid) }) else {
        count(counter::NO_TABLE_PROCESS);
        ask_for_tables(tgid);
        return None;
    };
    let stack = SCRATCH.get_ptr_mut(0)?;
    count(counter::WALKS);
    let mut state = Walk {
        pc: regs.pc,
        sp: regs.sp,
        fp: regs.fp,
        hash: 0xcbf2_9ce4_8422_2325,
        len: 0,
        how: 0,
        outcome: 0,
        pc_exact: 0,
        mappings,
        stack,
    };
    bounded_loop(MAX_FRAMES as u32 + 1, step, &mut state);
    let outcome = if state.outcome == 0 {
        counter::DEPTH_LIMIT
    } else {
        state.outcome
    };
    count(outcome);
    count_by(counter::FRAMES, u64::from(state.len));
    if config(&UNWIND_LOG) != 0 {
        log_failure(tgid, outcome, state.pc, state.len);
    }
    if outcome != counter::WALK_OK {
        state.how |= HOW_TRUNCATED;
    }
    if state.len == 0 {
        return Some(-14); // EFAULT, as bpf_get_stackid says for an unreadable stack
    }
    // A Python process: its interpreter's frames after the native ones (the flag spares
    // every other process the map lookup).
    let python = mappings.flags & PROCESS_PYTHON != 0
        && crate::python::append(tgid, stack, &mut state.len, &mut state.hash);
    let mut hash = state.hash ^ u64::from(state.len);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    let key = (hash as u32 ^ (hash >> 32) as u32) & (UNWOUND_STACK_BIT as u32 - 1);
    let id = key as i32 | UNWOUND_STACK_BIT;
    if let Some(stored) = unsafe { STACKS.get(key) } {
        if stored.hash == hash {
            return Some(id);
        }
        count(counter::STACK_COLLISION);
        return None;
    }
    unsafe {
        (*stack).hash = hash;
        (*stack).len = state.len;
        (*stack).how = state.how;
    }
    match STACKS.insert(key, unsafe { &*stack }, BPF_NOEXIST as u64) {
        Ok(()) => {
            if python {
                crate::python::notify(tgid, key);
            }
            Some(id)
        }
        // Another CPU stored this stack (or a colliding one) meanwhile.
        Err(-17) => Some(id),
        Err(_) => {
            count(counter::STACK_MAP_FULL);
            None
        }
    }
}

/// One line for a walk that stopped on a failure: its reason, the pc it stopped at and how
/// many frames it had. Once per (process, reason, pc), and at most one line per CPU per
/// second. A function of its own (a BPF subprogram): inlined, the logging's stack pushed
/// syscalls_exit past the 512-byte limit.
#[inline(never)]
fn log_failure(tgid: u32, outcome: u32, pc: u64, frames: u32) {
    if !matches!(
        outcome,
        counter::UNSUPPORTED_CFA | counter::UNREADABLE | counter::BAD_FRAME | counter::OUTSIDE_CODE
    ) {
        return;
    }
    let Some(last) = LOG_LAST.get_ptr_mut(0) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if unsafe { *last } != 0 && now.wrapping_sub(unsafe { *last }) < 1_000_000_000 {
        return;
    }
    let key = [u64::from(tgid) << 32 | u64::from(outcome), pc];
    if LOGGED.insert(&key, &1, BPF_NOEXIST as u64).is_err() {
        return; // logged before (or by another CPU just now)
    }
    match outcome {
        counter::UNSUPPORTED_CFA => warn!(
            &(),
            "unwind: tgid {} stopped at pc {:x} after {} frames: unsupported CFA rule",
            tgid,
            pc,
            frames
        ),
        counter::UNREADABLE => warn!(
            &(),
            "unwind: tgid {} stopped at pc {:x} after {} frames: unreadable stack memory",
            tgid,
            pc,
            frames
        ),
        counter::BAD_FRAME => warn!(
            &(),
            "unwind: tgid {} stopped at pc {:x} after {} frames: a frame that does not move up the stack",
            tgid,
            pc,
            frames
        ),
        counter::OUTSIDE_CODE => debug!(
            &(),
            "unwind: tgid {} stopped after {} frames: return address {:x} outside code",
            tgid,
            frames,
            pc
        ),
        _ => return,
    }
    unsafe { *last = now };
}

/// One frame: `bpf_loop` callback. Returns 1 to stop.
extern "C" fn step(index: u64, ctx: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(ctx as *mut Walk) };
    match step_frame(walk, index) {
        Some(()) => 0,
        None => 1,
    }
}

/// Records `walk.pc` as frame `index` and moves to the caller; `None` once the walk ends
/// (with `walk.outcome` set).
///
/// The frame index is `bpf_loop`'s, not a count kept in `walk`: the verifier treats it as
/// any value, so it checks this step once; a count it could follow would make it check
/// every depth apart.
#[inline(always)]
fn step_frame(walk: &mut Walk, index: u64) -> Option<()> {
    let index = index as usize;
    if index >= MAX_FRAMES {
        walk.outcome = counter::DEPTH_LIMIT;
        return None;
    }
    // A return address points after its call; the call itself is one byte before.
    let lookup_pc = if index == 0 || walk.pc_exact != 0 {
        walk.pc
    } else {
        walk.pc - 1
    };
    walk.pc_exact = 0;
    let mappings = unsafe { &*walk.mappings };
    let mapping = find_mapping(mappings, lookup_pc);
    if mapping.is_none() && index > 0 {
        // Not code: the slot above an outermost frame that has no end marker (some
        // binaries' _start), or a corrupt frame. Not recorded.
        walk.outcome = counter::OUTSIDE_CODE;
        return None;
    }
    let stack = unsafe { &mut *walk.stack };
    stack.frames[index] = walk.pc;
    walk.len = index as u32 + 1;
    walk.hash = (walk.hash ^ walk.pc).wrapping_mul(0x0000_0100_0000_01b3);
    let row = match mapping {
        None => {
            count(counter::NO_ROW);
            None
        }
        Some(mapping) if mapping.rows == 0 => {
            count(match mapping.first_row {
                TABLE_FULL => counter::TABLE_FULL,
                ANONYMOUS => counter::ANONYMOUS_CODE,
                _ => counter::NO_TABLE_FILE,
            });
            None
        }
        Some(mapping) => {
            let row = find_row(mapping, lookup_pc.wrapping_sub(mapping.bias));
            if row.is_none() {
                count(counter::NO_ROW);
            }
            row
        }
    };
    let Some(row) = row else {
        return frame_pointer_step(walk);
    };
    let offset = row.cfa_offset_bytes() as u64;
    let cfa = match row.rule() {
        CFA_SP => walk.sp.wrapping_add(offset),
        CFA_FP => walk.fp.wrapping_add(offset),
        CFA_PLT => {
            let extra = if (walk.pc & 15) as i64 >= i64::from(row.fp) {
                8
            } else {
                0
            };
            walk.sp.wrapping_add(offset).wrapping_add(extra)
        }
        CFA_END => {
            walk.outcome = counter::WALK_OK;
            return None;
        }
        CFA_SIGNAL => return signal_step(walk),
        _ => {
            walk.outcome = counter::UNSUPPORTED_CFA;
            return None;
        }
    };
    // The usual frame saves fp right below the return address: one read for both.
    if row.fp == -2 && RA_OFFSET == -8 && row.rule() != CFA_PLT {
        let Ok([fp, ra]) =
            (unsafe { bpf_probe_read_user(cfa.wrapping_sub(16) as *const [u64; 2]) })
        else {
            walk.outcome = counter::UNREADABLE;
            return None;
        };
        return move_to(walk, ra, cfa, fp);
    }
    let Ok(ra) = (unsafe { bpf_probe_read_user((cfa as i64 + RA_OFFSET) as u64 as *const u64) })
    else {
        walk.outcome = counter::UNREADABLE;
        return None;
    };
    let fp = match row.fp {
        _ if row.rule() == CFA_PLT => walk.fp,
        FP_SAME => walk.fp,
        FP_UNDEFINED => 0,
        slot => {
            let at = cfa.wrapping_add((i64::from(slot) * 8) as u64);
            let Ok(fp) = (unsafe { bpf_probe_read_user(at as *const u64) }) else {
                walk.outcome = counter::UNREADABLE;
                return None;
            };
            fp
        }
    };
    move_to(walk, ra, cfa, fp)
}

/// Moves to the caller frame, checking that the stack unwinds upwards.
#[inline(always)]
fn move_to(walk: &mut Walk, pc: u64, sp: u64, fp: u64) -> Option<()> {
    if pc == 0 {
        walk.outcome = counter::WALK_OK;
        return None;
    }
    if sp <= walk.sp {
        walk.outcome = counter::BAD_FRAME;
        return None;
    }
    walk.pc = pc;
    walk.sp = sp;
    walk.fp = fp;
    Some(())
}

/// One frame-pointer step: [fp] is the caller's fp, [fp + 8] the return address.
#[inline(always)]
fn frame_pointer_step(walk: &mut Walk) -> Option<()> {
    count(counter::FP_STEPS);
    walk.how |= HOW_FP_STEP;
    let fp = walk.fp;
    if fp == 0 {
        // The outermost frame of frame-pointer code (its entry zeroes fp), or a function
        // without frame pointers and without a table: nothing tells them apart.
        walk.outcome = counter::FP_END;
        return None;
    }
    let Ok(saved) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else {
        walk.outcome = counter::UNREADABLE;
        return None;
    };
    move_to(walk, saved[1], fp.wrapping_add(16), saved[0])
}

/// Through a signal trampoline: the interrupted registers are in the frame's ucontext.
#[inline(always)]
fn signal_step(walk: &mut Walk) -> Option<()> {
    count(counter::SIGNAL_FRAMES);
    let base = walk.sp;
    let read = |off: u64| unsafe { bpf_probe_read_user(base.wrapping_add(off) as *const u64) };
    let (Ok(pc), Ok(sp), Ok(fp)) = (
        read(signal_frame::PC),
        read(signal_frame::SP),
        read(signal_frame::FP),
    ) else {
        walk.outcome = counter::UNREADABLE;
        return None;
    };
    if pc == 0 {
        walk.outcome = counter::WALK_OK;
        return None;
    }
    // The interrupted code's sp need not be above the trampoline's (sigaltstack).
    walk.pc = pc;
    walk.sp = sp;
    walk.fp = fp;
    // The interrupted pc is not a return address: look it up as is.
    walk.pc_exact = 1;
    Some(())
}

// The two searches below halve a range a fixed number of times without branching on the
// data (a branch per halving makes the verifier follow both sides of every halving: it hit
// its 1M-instruction limit; a `bpf_loop` step per halving passed but cost ~1 µs a walk).
// `lt_mask(a, b)` is all ones when a < b, else 0 (both below 2^63).
#[inline(always)]
fn lt_mask(a: u64, b: u64) -> u64 {
    ((a as i64).wrapping_sub(b as i64) >> 63) as u64
}

/// The mapping that holds `pc`: the last one starting at or below it, if it ends above.
#[inline(always)]
fn find_mapping(mappings: &ProcessMappings, pc: u64) -> Option<&UnwindMapping> {
    let mut n = mappings.count as u64;
    if n == 0 {
        return None;
    }
    if n > MAX_MAPPINGS as u64 {
        // Userspace never writes more. (Not clamped: a path where `n` is a constant lets
        // the verifier follow every halving apart, hundreds of paths.)
        return None;
    }
    let mut base: u64 = 0;
    // 2^8 = MAX_MAPPINGS.
    for _ in 0..8 {
        if n <= 1 {
            break; // an exit, not a fork: the verifier still follows one path
        }
        let half = n / 2;
        let probe = &mappings.mappings[(base + half) as usize & (MAX_MAPPINGS - 1)];
        // Move up unless pc < probe.start; a half of 0 (n = 1) moves nowhere.
        base += half & !lt_mask(pc, probe.start);
        n -= half;
    }
    let mapping = &mappings.mappings[base as usize & (MAX_MAPPINGS - 1)];
    (mapping.start <= pc && pc < mapping.end).then_some(mapping)
}

/// The last row at or before `pc` in the mapping's table, unless it says "no rule".
#[inline(always)]
fn find_row(mapping: &UnwindMapping, pc: u64) -> Option<UnwindRow> {
    if pc > u64::from(u32::MAX) || mapping.rows == 0 {
        return None;
    }
    let mut n = u64::from(mapping.rows);
    if n > 1 << SEARCH_STEPS {
        return None; // a table too big to search (counted as no row)
    }
    let first = mapping.first_row;
    let mut base: u64 = 0;
    for _ in 0..SEARCH_STEPS {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        let probe = ROWS.get(first.wrapping_add((base + half) as u32))?;
        base += half & !lt_mask(pc, u64::from(probe.pc));
        n -= half;
    }
    let row = *ROWS.get(first.wrapping_add(base as u32))?;
    // Before the table's first row, or in a gap between functions.
    (u64::from(row.pc) <= pc && row.rule() != profiler_common::unwind::CFA_NONE).then_some(row)
}

/// Stack id for the current task's user stack: walked from the tables when they are loaded
/// for `tgid`, else `None` (the caller uses `bpf_get_stackid`).
#[inline(always)]
pub fn current_stack(tgid: u32) -> Option<i32> {
    if !enabled() {
        return None;
    }
    let regs = current_user_regs()?;
    walk(tgid, regs)
}
