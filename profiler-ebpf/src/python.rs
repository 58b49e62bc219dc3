//! CPython frames appended to a walked user stack (`profiler_common::python` has the format).
//!
//! Per walk of a registered Python process: the current thread's `PyThreadState` is the one
//! remembered from its last walk (when it still names the thread) or is looked up in the
//! interpreter's thread list (a `bpf_loop` step per thread), then its frame chain is
//! followed (a `bpf_loop` step per frame, one 72-byte read each). Both loops are bounded;
//! every way they end early is counted.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
    },
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use profiler_common::python::{
    ENTRY_BIT, LAYOUT_38, LAYOUT_310, LAYOUT_311, MATCH_PTHREAD, MAX_PY_FRAMES, MAX_THREADS,
    NO_FIELD, OWNED_BY_CSTACK, PY_MARKER, PyNewStack, PyProcess, counter,
};
use profiler_common::unwind::{MAX_FRAMES, UnwoundStack};

use crate::common::bounded_loop;

/// tgid → where its interpreter keeps its threads and frames (userspace fills it).
#[map(name = "PY_PROCESSES")]
static PROCESSES: HashMap<u32, PyProcess> = HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// tid → its `PyThreadState` at its last walk (checked before use: the thread list is
/// searched again when it no longer names the thread).
#[map(name = "PY_THREADS")]
static THREADS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "PY_NEW_STACKS")]
static NEW_STACKS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Tells userspace of a new walked stack with Python frames (stored under `key`).
#[inline(always)]
pub fn notify(tgid: u32, key: u32) {
    if NEW_STACKS
        .output::<PyNewStack>(&PyNewStack { tgid, key }, 0)
        .is_err()
    {
        count(counter::NOTIFY_LOST);
    }
}

#[map(name = "PY_COUNTERS")]
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

#[inline(always)]
fn read(addr: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// The thread search's state (on the program's stack).
#[repr(C)]
struct ThreadSearch {
    tstate: u64,
    tid: u64,
    next: u64,
    native_id: u64,
    found: u64,
}

extern "C" fn thread_step(_index: u64, ctx: *mut c_void) -> i64 {
    let search = unsafe { &mut *(ctx as *mut ThreadSearch) };
    if search.tstate == 0 {
        return 1;
    }
    match read(search.tstate.wrapping_add(search.native_id)) {
        Some(id) if id == search.tid => {
            search.found = 1;
            return 1;
        }
        Some(_) => {}
        None => {
            search.tstate = 0;
            return 1;
        }
    }
    search.tstate = read(search.tstate.wrapping_add(search.next)).unwrap_or(0);
    0
}

/// The frame walk's state (on the program's stack).
#[repr(C)]
struct FrameWalk {
    frame: u64,
    hash: u64,
    stack: *mut UnwoundStack,
    layout: u32,
    /// Next free slot of `stack.frames`.
    len: u32,
    recorded: u32,
    /// The counter that says why the walk ended early (0: it did not).
    cut: u32,
}

extern "C" fn frame_step(_index: u64, ctx: *mut c_void) -> i64 {
    let walk = unsafe { &mut *(ctx as *mut FrameWalk) };
    match step(walk) {
        Some(()) => 0,
        None => 1,
    }
}

#[inline(always)]
fn step(walk: &mut FrameWalk) -> Option<()> {
    if walk.frame == 0 {
        return None;
    }
    if walk.layout == LAYOUT_38 || walk.layout == LAYOUT_310 {
        return frame_object_step(walk);
    }
    let Ok(raw) = (unsafe { bpf_probe_read_user(walk.frame as *const [u64; 9]) }) else {
        walk.cut = counter::UNREADABLE;
        return None;
    };
    // Bytes 64..72 are raw[8], little-endian.
    let (code, previous, instr, owner, entry) = if walk.layout == LAYOUT_311 {
        let entry = (raw[8] >> 32) as u8; // is_entry at 68
        let owner = (raw[8] >> 40) as u8; // owner at 69
        (raw[4], raw[6], raw[7], owner, entry != 0)
    } else {
        let owner = (raw[8] >> 48) as u8; // owner at 70
        (raw[0], raw[1], raw[7], owner, false)
    };
    walk.frame = previous;
    let stack = unsafe { &mut *walk.stack };
    if walk.layout != LAYOUT_311 && owner == OWNED_BY_CSTACK {
        // The shim a C-level call of the eval loop pushes: the frame recorded just before it
        // is the outermost one of that call.
        if walk.recorded > 0 {
            let at = walk.len.wrapping_sub(2) as usize;
            if at < MAX_FRAMES {
                stack.frames[at] |= ENTRY_BIT;
            }
        }
        return Some(());
    }
    record(walk, code | if entry { ENTRY_BIT } else { 0 }, instr)
}

/// Appends one Python frame (code word, instruction word) to the walk's stack.
#[inline(always)]
fn record(walk: &mut FrameWalk, code: u64, instr: u64) -> Option<()> {
    let at = walk.len as usize;
    if at + 1 >= MAX_FRAMES {
        walk.cut = counter::TRUNCATED;
        return None;
    }
    let stack = unsafe { &mut *walk.stack };
    stack.frames[at] = code;
    stack.frames[at + 1] = instr;
    walk.hash = (walk.hash ^ code).wrapping_mul(0x0000_0100_0000_01b3);
    walk.hash = (walk.hash ^ instr).wrapping_mul(0x0000_0100_0000_01b3);
    walk.len += 2;
    walk.recorded += 1;
    Some(())
}

/// 1 with `--measure-overhead`: walks are timed (`counter::WALK_NS`).
#[unsafe(no_mangle)]
static PY_TIMED: u32 = 0;

/// Appends the current thread's Python frames to `stack` (its native frames take `len`
/// slots), updating `len` and `hash`, when `tgid` is a registered Python process (returns
/// whether it is); timed when `PY_TIMED` says so.
#[inline(always)]
pub fn append(tgid: u32, stack: *mut UnwoundStack, len: &mut u32, hash: &mut u64) -> bool {
    if crate::common::config(&PY_TIMED) == 0 {
        return append_frames(tgid, stack, len, hash);
    }
    let start = unsafe { bpf_ktime_get_ns() };
    let python = append_frames(tgid, stack, len, hash);
    count_by(
        counter::WALK_NS,
        unsafe { bpf_ktime_get_ns() }.wrapping_sub(start),
    );
    python
}

/// `append`'s walk. A BPF subprogram of its own: inlined, its state pushed the walking
/// programs past the 512-byte stack.
#[inline(never)]
fn append_frames(tgid: u32, stack: *mut UnwoundStack, len: &mut u32, hash: &mut u64) -> bool {
    let Some(py) = (unsafe { PROCESSES.get(&tgid) }) else {
        return false;
    };
    count(counter::WALKS);
    let tid = bpf_get_current_pid_tgid() & 0xffff_ffff;
    let Some(tstate) = thread_state(py, tid) else {
        return true;
    };
    let frame = match read(tstate.wrapping_add(u64::from(py.thread_frame))) {
        Some(frame) if py.cframe_frame == NO_FIELD => frame,
        Some(cframe) if cframe != 0 => {
            read(cframe.wrapping_add(u64::from(py.cframe_frame))).unwrap_or(0)
        }
        _ => 0,
    };
    let at = *len as usize;
    if at >= MAX_FRAMES {
        count(counter::TRUNCATED);
        return true;
    }
    unsafe { (*stack).frames[at] = PY_MARKER };
    let mut walk = FrameWalk {
        frame,
        hash: (*hash ^ PY_MARKER).wrapping_mul(0x0000_0100_0000_01b3),
        stack,
        layout: py.frame_layout,
        len: *len + 1,
        recorded: 0,
        cut: 0,
    };
    bounded_loop(MAX_PY_FRAMES, frame_step, &mut walk);
    if walk.cut != 0 {
        count(walk.cut);
    } else if walk.frame != 0 {
        count(counter::TRUNCATED); // more frames than MAX_PY_FRAMES
    }
    count_by(counter::FRAMES, u64::from(walk.recorded));
    *len = walk.len;
    *hash = walk.hash;
    true
}

/// The `PyThreadState` of thread `tid`: the one it had at its last walk when that one still
/// says it is `tid` (one read), else searched for in the interpreter's thread list (two
/// reads, then two per thread) and remembered. `None`: counted why.
#[inline(always)]
fn thread_state(py: &PyProcess, tid: u64) -> Option<u64> {
    let native_id = u64::from(py.thread_native_id);
    let key = tid as u32;
    // What the thread state holds for this thread: its tid, or (3.8–3.10) its pthread_t.
    let want = if py.thread_match == MATCH_PTHREAD {
        thread_pointer()
    } else {
        tid
    };
    if let Some(&tstate) = unsafe { THREADS.get(&key) }
        && read(tstate.wrapping_add(native_id)) == Some(want)
    {
        return Some(tstate);
    }
    let Some(tstate) = first_thread(py) else {
        count(counter::UNREADABLE);
        return None;
    };
    let mut search = ThreadSearch {
        tstate,
        tid: want,
        next: u64::from(py.thread_next),
        native_id,
        found: 0,
    };
    bounded_loop(MAX_THREADS, thread_step, &mut search);
    if search.found == 0 {
        count(counter::NO_THREAD);
        return None;
    }
    let _ = THREADS.insert(&key, &search.tstate, 0);
    Some(search.tstate)
}

/// Where `task_struct.thread.fsbase` is (from BTF; 0: unknown).
#[unsafe(no_mangle)]
static TASK_FSBASE_OFF: u32 = 0;

/// The current thread's thread pointer (x86-64: its fs base), which glibc's `pthread_self()`
/// returns and CPython 3.8–3.10 keep as `PyThreadState.thread_id`; 0 when unknown.
#[inline(always)]
fn thread_pointer() -> u64 {
    let off = crate::common::config(&TASK_FSBASE_OFF);
    if off == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() };
    unsafe { bpf_probe_read_kernel((task + u64::from(off)) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn first_thread(py: &PyProcess) -> Option<u64> {
    let interpreter = read(py.runtime.wrapping_add(u64::from(py.interpreters_head)))?;
    if interpreter == 0 {
        return None;
    }
    read(interpreter.wrapping_add(u64::from(py.threads_head)))
}

/// One `PyFrameObject` (3.8–3.10): f_back at 24, f_code at 32, f_lasti at 104 (3.8, 3.9:
/// bytes) or 96 (3.10: code units). Each is one call of the eval loop: all are entries.
#[inline(always)]
fn frame_object_step(walk: &mut FrameWalk) -> Option<()> {
    let Ok(raw) = (unsafe { bpf_probe_read_user(walk.frame as *const [u64; 14]) }) else {
        walk.cut = counter::UNREADABLE;
        return None;
    };
    let (previous, code) = (raw[3], raw[4]);
    let lasti = if walk.layout == LAYOUT_310 {
        (raw[12] as u32 as i32).wrapping_mul(2)
    } else {
        raw[13] as u32 as i32
    };
    walk.frame = previous;
    // Before its first instruction (-1): u32::MAX.
    record(walk, code | ENTRY_BIT, u64::from(lasti.max(-1) as u32))
}
