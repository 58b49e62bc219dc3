//! CPython stacks: where the interpreter keeps a thread's Python frames, per version, and how
//! the kernel walker appends them to a walked user stack.
//!
//! For a process registered in `PY_PROCESSES` (by userspace, which found `_PyRuntime` in its
//! interpreter's symbols), the walker finds the current thread's `PyThreadState` (the
//! interpreter's thread list, by `native_thread_id`), then follows its `_PyInterpreterFrame`
//! chain from the innermost frame. After the native frames of the walked stack it writes
//! `PY_MARKER`, then two words per Python frame, innermost first: the code object's address
//! (`ENTRY_BIT` set on the outermost frame of each C-level call of the eval loop), and the
//! address of the instruction it was at. Userspace reads the code objects' names from the
//! process and puts each group of Python frames in place of its `_PyEval_EvalFrameDefault`.

/// Where the fields are in one CPython version (x86_64 and aarch64 alike: LP64).
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
    /// `LAYOUT_311` or `LAYOUT_312`: where `_PyInterpreterFrame`'s fields are.
    pub frame_layout: u32,
    pub _pad: u32,
}

pub const NO_FIELD: u32 = u32::MAX;

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
