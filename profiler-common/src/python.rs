//! CPython stacks: where the interpreter keeps a thread's Python frames, per version, and how
//! the kernel walker appends them to a walked user stack.
//!
//! For a process registered in `PY_PROCESSES` (by userspace, which found `_PyRuntime` in its
//! interpreter's symbols), the walker finds the current thread's `PyThreadState` (the
//! interpreter's thread list, by `native_thread_id`; 3.8–3.10 by `thread_id`, its pthread),
//! then follows its `_PyInterpreterFrame` chain (3.8–3.10: `PyFrameObject`) from the innermost
//! frame. After the native frames of the walked stack it writes
//! `PY_MARKER`, then two words per Python frame, innermost first: the code object's address
//! (`ENTRY_BIT` set on the outermost frame of each C-level call of the eval loop), and the
//! address of the instruction it was at (3.8–3.10: its byte offset in `co_code`,
//! `u32::MAX` before the first instruction). Userspace reads the code objects' names from the
//! process and puts each group of Python frames in place of its `_PyEval_EvalFrameDefault`.

/// Where the fields are in one CPython version (LP64; 3.8–3.10's thread match is x86-64's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProcess {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// `_PyRuntimeState.interpreters.head`.
    pub interpreters_head: u32,
    /// `PyInterpreterState.threads.head`.
    pub threads_head: u32,
    /// `PyThreadState.next`, `.native_thread_id`.
    pub thread_next: u32,
    pub thread_native_id: u32,
    /// `PyThreadState.cframe` (3.11, 3.12) or `.current_frame` (3.13).
    pub thread_frame: u32,
    /// `_PyCFrame.current_frame`; `NO_FIELD` when `thread_frame` is the frame itself.
    pub cframe_frame: u32,
    /// `LAYOUT_38`, `LAYOUT_310`, `LAYOUT_311` or `LAYOUT_312`: where the frame's fields are.
    pub frame_layout: u32,
    /// How a thread state names its thread: `MATCH_NATIVE_ID` (`native_thread_id` is the
    /// tid, 3.11+) or `MATCH_PTHREAD` (`thread_id` is its `pthread_t`, the thread pointer:
    /// the task's fs base on x86-64; 3.8–3.10). `thread_native_id` is that field's offset.
    pub thread_match: u32,
}

pub const MATCH_NATIVE_ID: u32 = 0;
pub const MATCH_PTHREAD: u32 = 1;

pub const NO_FIELD: u32 = u32::MAX;

/// 3.8 and 3.9: a `PyFrameObject` chain, f_back at 24, f_code at 32, f_lasti (int, a byte
/// offset in co_code) at 104. Each frame is one C-level call of the eval loop.
pub const LAYOUT_38: u32 = 38;
/// 3.10: as 3.8, with f_lasti at 96 counting code units (2 bytes each).
pub const LAYOUT_310: u32 = 310;
/// 3.11: f_code at 32, previous at 48, prev_instr at 56, is_entry at 68, owner at 69.
pub const LAYOUT_311: u32 = 311;
/// 3.12 and 3.13: f_code/f_executable at 0, previous at 8, prev_instr/instr_ptr at 56,
/// owner at 70 (FRAME_OWNED_BY_CSTACK marks the shim frame each C-level call pushes).
pub const LAYOUT_312: u32 = 312;
/// `_PyInterpreterFrame.owner` of 3.12+'s shim frames.
pub const OWNED_BY_CSTACK: u8 = 3;

/// Python frames taken per stack at most.
pub const MAX_PY_FRAMES: u32 = 48;
/// Threads of an interpreter searched for the current one at most.
pub const MAX_THREADS: u32 = 64;

/// Separates a walked stack's native frames from its Python ones.
pub const PY_MARKER: u64 = 0xffff_ffff_ffff_fff0;
/// Set on a Python frame's code address: the outermost frame of one C-level eval call.
pub const ENTRY_BIT: u64 = 1 << 63;

/// A walked stack with Python frames was stored for the first time (`PY_NEW_STACKS`): its
/// process and key in the walked-stack map, so that userspace reads the code objects it names
/// at once, while the process lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PyNewStack {
    pub tgid: u32,
    pub key: u32,
}

pub mod maps {
    pub const PROCESSES: &str = "PY_PROCESSES";
    pub const COUNTERS: &str = "PY_COUNTERS";
    pub const NEW_STACKS: &str = "PY_NEW_STACKS";
}

pub mod counter {
    /// Stacks of registered Python processes walked for Python frames.
    pub const WALKS: u32 = 0;
    /// Python frames recorded.
    pub const FRAMES: u32 = 1;
    /// The current thread was in no thread list (a thread that never ran Python).
    pub const NO_THREAD: u32 = 2;
    /// Interpreter memory that could not be read.
    pub const UNREADABLE: u32 = 3;
    /// Walks cut by the frame limit or the stack's room.
    pub const TRUNCATED: u32 = 4;
    /// New-stack notices the ring buffer had no room for (their code objects are read at
    /// the next interval or the end instead).
    pub const NOTIFY_LOST: u32 = 5;
    /// ns spent in Python walks (only with `--measure-overhead`: timing them costs too).
    pub const WALK_NS: u32 = 6;
    pub const COUNT: u32 = 7;

    pub const NAMES: [&str; COUNT as usize] = [
        "walks",
        "frames",
        "no_thread",
        "unreadable",
        "truncated",
        "notify_lost",
        "walk_ns",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding.
    unsafe impl aya::Pod for super::PyProcess {}
    unsafe impl aya::Pod for super::PyNewStack {}
}
