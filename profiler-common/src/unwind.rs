//! User-space stack unwinding without frame pointers: the compact tables userspace builds from
//! `.eh_frame` / `.debug_frame` (`profiler/src/unwind/`) and the kernel walks
//! (`profiler-ebpf/src/unwind.rs`), the per-process address map that points into them, and the
//! counters of every way a walk can stop early.
//!
//! One table per file (shared by every process that maps it), rows sorted by pc, all tables
//! concatenated in one global array of rows. A row holds the rule from its pc up to the next
//! row's pc. The return address is always at `CFA + RA_OFFSET` and the frame-pointer register
//! (rbp on x86_64, x29 on aarch64) is the only callee-saved register the walker restores, which
//! is what every architecture with a CFA-relative return address needs; nothing here names an
//! x86 register.

/// One unwinding rule, valid from `pc` to the next row's `pc` (8 bytes; a table of libc is
/// about 30 000 rows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnwindRow {
    /// File-relative virtual address (the ELF's own addresses: `st_value`, `.eh_frame` pcs).
    pub pc: u32,
    /// CFA = register (`cfa_rule`) + `cfa_offset` (see `cfa_offset_bytes`).
    pub cfa_offset: i16,
    /// One of the `CFA_*` rules, with `CFA_OFFSET_X8` when the offset counts 8-byte slots.
    pub cfa_rule: u8,
    /// How to restore the frame-pointer register: `FP_SAME` (unchanged), `FP_UNDEFINED`
    /// (a rule we cannot follow), else saved at `CFA + 8 * fp`. For `CFA_PLT` rows it holds
    /// the PLT entry's threshold instead (see `CFA_PLT`).
    pub fp: i8,
}

/// No rule covers this pc (a gap between functions): step by frame pointer.
pub const CFA_NONE: u8 = 0;
/// CFA = stack pointer + offset.
pub const CFA_SP: u8 = 1;
/// CFA = frame pointer + offset.
pub const CFA_FP: u8 = 2;
/// The PLT's expression: CFA = sp + offset + (((pc & 15) >= fp) ? 8 : 0) (lazy-binding
/// stubs push once more after a byte offset in each 16-byte entry).
pub const CFA_PLT: u8 = 3;
/// The return address is undefined: the outermost frame (`_start`, a thread's `clone3`).
pub const CFA_END: u8 = 4;
/// A signal trampoline (`__restore_rt`): the interrupted registers are in the `ucontext` the
/// stack pointer points into (offsets in `signal_frame`).
pub const CFA_SIGNAL: u8 = 5;
/// A CFA rule we cannot follow (other DWARF expressions, other registers, offsets that do not
/// fit): the walk stops there and counts it.
pub const CFA_UNSUPPORTED: u8 = 6;

/// Flag in `UnwindRow::cfa_rule`: `cfa_offset` counts 8-byte slots (frames bigger than
/// 32 KiB; CFA offsets of such frames are multiples of 8).
pub const CFA_OFFSET_X8: u8 = 0x80;
/// The rule part of `UnwindRow::cfa_rule`.
pub const CFA_RULE_MASK: u8 = 0x7f;

impl UnwindRow {
    /// The CFA offset in bytes.
    #[inline(always)]
    pub fn cfa_offset_bytes(&self) -> i64 {
        if self.cfa_rule & CFA_OFFSET_X8 != 0 {
            self.cfa_offset as i64 * 8
        } else {
            self.cfa_offset as i64
        }
    }

    /// One of the `CFA_*` rules, without flags.
    #[inline(always)]
    pub fn rule(&self) -> u8 {
        self.cfa_rule & CFA_RULE_MASK
    }
}

/// `UnwindRow::fp`: the frame pointer keeps its value.
pub const FP_SAME: i8 = 0;
/// `UnwindRow::fp`: the frame pointer's rule is not one we follow; it is unknown past here.
pub const FP_UNDEFINED: i8 = i8::MIN;

/// Where the return address is, relative to the CFA (x86_64 and aarch64 alike: the slot just
/// below the caller's stack pointer).
pub const RA_OFFSET: i64 = -8;

/// Offsets of the interrupted registers from the stack pointer of a signal trampoline
/// (`struct rt_sigframe`: the return address, then `ucontext` whose `uc_mcontext` is at 40).
pub mod signal_frame {
    pub const FP: u64 = 40 + 10 * 8;
    pub const SP: u64 = 40 + 15 * 8;
    pub const PC: u64 = 40 + 16 * 8;
}

/// One executable mapping of a process, and the table that covers it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// address - bias = file-relative virtual address (the rows' `pc`).
    pub bias: u64,
    /// Index of the table's first row in the global row array; `TABLE_FULL` when its table
    /// did not fit, and then `rows` is 0.
    pub first_row: u32,
    /// 0: no table for this file (no `.eh_frame`, or it did not fit): step by frame pointer.
    pub rows: u32,
}

/// `UnwindMapping::first_row` of a file whose table did not fit in the row array.
pub const TABLE_FULL: u32 = u32::MAX;
/// `UnwindMapping::first_row` of anonymous executable memory (JIT code): no table.
pub const ANONYMOUS: u32 = u32::MAX - 1;

/// Executable mappings per process in the kernel's map (sorted by start). A process with more
/// keeps the first ones by address and steps by frame pointer in the others.
pub const MAX_MAPPINGS: usize = 256;

/// A process's executable mappings, sorted by `start`, as the kernel searches them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessMappings {
    pub count: u32,
    /// `PROCESS_PYTHON`: the process is in the Python walker's map, so walks look it up.
    pub flags: u32,
    pub mappings: [UnwindMapping; MAX_MAPPINGS],
}

impl Default for ProcessMappings {
    fn default() -> Self {
        Self {
            count: 0,
            flags: 0,
            mappings: [UnwindMapping::default(); MAX_MAPPINGS],
        }
    }
}

/// `ProcessMappings::flags`: a CPython the walker knows runs in this process; only such
/// processes pay the lookup in the Python walker's map.
pub const PROCESS_PYTHON: u32 = 1;

/// Frames kept per walked stack (the kernel's own stack maps keep 127 too).
pub const MAX_FRAMES: usize = 127;

/// Binary-search steps: enough for 2^24 rows in one table (and for `MAX_MAPPINGS`).
pub const SEARCH_STEPS: u32 = 24;

/// A stack walked by the kernel, stored under a hash of its frames.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnwoundStack {
    /// The full 64-bit hash of the frames (the map key keeps 29 bits of it): tells a
    /// different stack under the same key apart.
    pub hash: u64,
    pub len: u32,
    /// `HOW_*` bits: how the walk went.
    pub how: u32,
    /// Instruction pointers, innermost first (return addresses past the first).
    pub frames: [u64; MAX_FRAMES],
}

impl Default for UnwoundStack {
    fn default() -> Self {
        Self {
            hash: 0,
            len: 0,
            how: 0,
            frames: [0; MAX_FRAMES],
        }
    }
}

/// `UnwoundStack::how`: at least one frame was stepped by frame pointer.
pub const HOW_FP_STEP: u32 = 1;
/// `UnwoundStack::how`: the walk stopped before the outermost frame (any error).
pub const HOW_TRUNCATED: u32 = 2;

/// Stack ids with this bit set (and not `OVERFLOW_STACK_BIT`) are walked stacks, stored in
/// `UNWIND_STACKS` under `id & !UNWOUND_STACK_BIT`.
pub const UNWOUND_STACK_BIT: i32 = 1 << 29;

/// `UNWIND_MODE` values.
pub const MODE_FP: u32 = 0;
pub const MODE_DWARF: u32 = 1;

/// Indexes into the per-CPU `UNWIND_COUNTERS` array.
pub mod counter {
    /// User stacks walked from the tables.
    pub const WALKS: u32 = 0;
    /// Walks that reached the outermost frame (return address undefined or 0).
    pub const WALK_OK: u32 = 1;
    /// The process had no tables loaded (not seen yet, or a kernel thread): frame-pointer
    /// stack from `bpf_get_stackid` instead.
    pub const NO_TABLE_PROCESS: u32 = 2;
    /// A pc in a mapped file without a table (no `.eh_frame`): stepped by frame pointer.
    pub const NO_TABLE_FILE: u32 = 3;
    /// A pc in a file whose table did not fit in the row array: stepped by frame pointer.
    pub const TABLE_FULL: u32 = 4;
    /// A pc in no known mapping (JIT code, anonymous memory) or in a gap between functions:
    /// stepped by frame pointer.
    pub const NO_ROW: u32 = 5;
    /// Frames stepped by frame pointer (any of the three above).
    pub const FP_STEPS: u32 = 6;
    /// Walks cut at `MAX_FRAMES`.
    pub const DEPTH_LIMIT: u32 = 7;
    /// Walks stopped because stack memory could not be read (not resident, or a bad CFA).
    pub const UNREADABLE: u32 = 8;
    /// Walks stopped at a CFA rule we cannot follow.
    pub const UNSUPPORTED_CFA: u32 = 9;
    /// Walks stopped because a frame did not move up the stack (a corrupt frame).
    pub const BAD_FRAME: u32 = 10;
    /// Frames recorded by walks.
    pub const FRAMES: u32 = 11;
    /// Walked stacks not stored (the stack map was full, or another stack held the key): the
    /// frame-pointer stack from `bpf_get_stackid` is taken instead.
    pub const STACK_MAP_FULL: u32 = 12;
    pub const STACK_COLLISION: u32 = 13;
    /// Signal frames stepped through.
    pub const SIGNAL_FRAMES: u32 = 14;
    /// Frame-pointer walks that ended at fp = 0: the outermost frame of frame-pointer code, or
    /// code with neither frame pointers nor a table (the two look the same).
    pub const FP_END: u32 = 15;
    /// Walks that ended at a return address outside every executable mapping: above an
    /// outermost frame whose CFI does not mark the end (e.g. Debian perf's `_start`), a
    /// library loaded after the process's tables were, or a corrupt frame.
    pub const OUTSIDE_CODE: u32 = 16;
    /// A pc in anonymous executable memory (JIT code): stepped by frame pointer.
    pub const ANONYMOUS_CODE: u32 = 17;
    /// Requests for a process's tables (a walk found none) the first-seen ring had no room
    /// for: its tables load at its next first-seen event instead.
    pub const ASK_LOST: u32 = 18;
    /// Number of counters.
    pub const COUNT: u32 = 19;

    /// Names, indexed like the counters (prefixed `unwind_` in the capture).
    pub const NAMES: [&str; COUNT as usize] = [
        "walks",
        "walk_ok",
        "no_table_process",
        "no_table_file",
        "table_full",
        "no_row",
        "fp_steps",
        "depth_limit",
        "unreadable",
        "unsupported_cfa",
        "bad_frame",
        "frames",
        "stack_map_full",
        "stack_collision",
        "signal_frames",
        "fp_end",
        "outside_code",
        "anonymous_code",
        "ask_lost",
    ];
}

/// Map names, shared so that the loader and the programs cannot disagree.
pub mod maps {
    pub const ROWS: &str = "UNWIND_ROWS";
    pub const PROCESSES: &str = "UNWIND_PROCESSES";
    pub const STACKS: &str = "UNWIND_STACKS";
    pub const SCRATCH: &str = "UNWIND_SCRATCH";
    pub const COUNTERS: &str = "UNWIND_COUNTERS";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::UnwindMapping {}
    unsafe impl aya::Pod for super::ProcessMappings {}
    unsafe impl aya::Pod for super::UnwoundStack {}
}
