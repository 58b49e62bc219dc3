//! CPython frames: which processes run an interpreter the kernel walker knows (3.8–3.13),
//! where its fields are, and turning the (code object, instruction) pairs the walker appended
//! to a stack (`profiler_common::python`) into `py::QUALNAME (FILE:LINE)` frames, each group
//! in place of the `_PyEval_EvalFrameDefault` call that ran it.
//!
//! The field offsets were taken with `offsetof` from each version's own internal headers
//! (3.8.18, 3.9.18, 3.10.13, 3.11.7, 3.12.1, 3.13.0); 3.13's thread and interpreter offsets
//! are read from the process's own `_Py_DebugOffsets`, which must agree with the rest. They
//! are checked by `tests/jit.rs` against py-spy on every interpreter this machine has. Code
//! objects are read from the process's memory while it lives; a process gone by the end of
//! the capture keeps `[python code 0x…]` frames. 3.8–3.10 have no `co_qualname`: their
//! frames are named by `co_name`, as py-spy names them.

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use profiler_common::python::{
    ENTRY_BIT, LAYOUT_38, LAYOUT_310, LAYOUT_311, LAYOUT_312, MATCH_NATIVE_ID, MATCH_PTHREAD,
    NO_FIELD, PY_MARKER, PyProcess,
};

use crate::model::{Frame, FrameKind};

/// The minor version of a CPython interpreter file by its name (`python3.12`,
/// `libpython3.12.so.1.0`), for the versions the walker knows.
pub fn interpreter_minor(path: &str) -> Option<u32> {
    any_interpreter_minor(path).filter(|minor| (8..=13).contains(minor))
}

/// The minor version of any CPython 3 interpreter file, by its name.
pub fn any_interpreter_minor(path: &str) -> Option<u32> {
    let name = path.rsplit('/').next()?;
    let rest = name
        .strip_prefix("libpython3.")
        .or_else(|| name.strip_prefix("python3."))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let tail = &rest[digits.len()..];
    // ABI flags: d (debug), m (pymalloc, up to 3.7).
    let tail = tail
        .strip_prefix('d')
        .or_else(|| tail.strip_prefix('m'))
        .unwrap_or(tail);
    if !(tail.is_empty() || tail.starts_with(".so")) {
        return None;
    }
    digits.parse().ok()
}

/// One line, once per version and run, for a process whose CPython the walker does not know
/// (`why`: what refused a version it knows, e.g. its `_Py_DebugOffsets`).
pub fn note_unsupported(pid: u32, minor: u32, why: Option<&str>) {
    static NOTED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
    let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
    if !noted.contains(&minor) {
        noted.push(minor);
        match why {
            None => eprintln!(
                "profiler: note: pid {pid} runs Python 3.{minor}; Python frames are walked for \
                 CPython 3.8–3.13 only, its stacks show the interpreter's native frames"
            ),
            Some(why) => eprintln!(
                "profiler: note: pid {pid} runs Python 3.{minor} but {why}; its stacks show \
                 the interpreter's native frames"
            ),
        }
    }
}

/// A stack's code path as the Python program sees it: its frames, less those in the
/// interpreter's own file below the first Python frame. Those are the interpreter's calling
/// machinery, which changes as its adaptive interpreter specializes a call site (the first
/// executions of `cursor.execute(…)` go through `PyObject_Vectorcall`, later ones call
/// the C method directly): one line of Python, one code path.
pub fn code_path(frames: &[Frame]) -> Vec<&str> {
    let mut python = false;
    frames
        .iter()
        .filter(|f| {
            python |= f.name.starts_with("py::");
            !(python
                && f.module
                    .as_deref()
                    .is_some_and(|m| any_interpreter_minor(m).is_some()))
        })
        .map(|f| f.name.as_str())
        .collect()
}

/// `_PyRuntime`'s address in the file (its ELF virtual address), from the dynamic symbols.
pub fn runtime_symbol(path: &Path) -> Option<u64> {
    use object::{Object as _, ObjectSymbol as _};
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    file.dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name() == Ok("_PyRuntime") && s.address() != 0)
        .map(|s| s.address())
}

/// Where the walker finds threads and frames in CPython 3.`minor` in process `pid`,
/// `_PyRuntime` being at `runtime` there. 3.13 says where itself (`_Py_DebugOffsets`, read
/// from the process); 3.11 and 3.12 come from the table. `Err`: why not (one line).
pub fn process_layout(pid: u32, minor: u32, runtime: u64) -> Result<PyProcess, String> {
    let (
        interpreters_head,
        threads_head,
        thread_next,
        native_id,
        thread_frame,
        cframe_frame,
        layout,
    ) = match minor {
        // 3.8–3.10: thread_id (176) is the thread's pthread_t.
        8 | 9 => (32, 8, 8, 176, 24, NO_FIELD, LAYOUT_38),
        10 => (32, 8, 8, 176, 24, NO_FIELD, LAYOUT_310),
        11 => (40, 16, 8, 160, 56, 8, LAYOUT_311),
        12 => (40, 72, 8, 144, 56, 0, LAYOUT_312),
        13 => {
            let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
                .map_err(|e| format!("cannot open its memory: {e}"))?;
            let raw = read_at(&mem, runtime, DEBUG_OFFSETS_WORDS * 8)
                .ok_or("cannot read its _PyRuntime")?;
            let o = debug_offsets_313(&raw)?;
            (
                o.interpreters_head,
                o.threads_head,
                o.thread_next,
                o.native_thread_id,
                o.current_frame,
                NO_FIELD,
                LAYOUT_312,
            )
        }
        _ => return Err(format!("CPython 3.{minor} is not walked")),
    };
    Ok(PyProcess {
        runtime,
        interpreters_head,
        threads_head,
        thread_next,
        thread_native_id: native_id,
        thread_frame,
        cframe_frame,
        frame_layout: layout,
        thread_match: if minor <= 10 {
            MATCH_PTHREAD
        } else {
            MATCH_NATIVE_ID
        },
    })
}

/// The 64-bit words of 3.13's `_Py_DebugOffsets` read (through `code_object`).
const DEBUG_OFFSETS_WORDS: usize = 44;

/// The offsets the walker takes from 3.13's `_Py_DebugOffsets`.
#[derive(Debug, PartialEq, Eq)]
struct DebugOffsets {
    interpreters_head: u32,
    threads_head: u32,
    thread_next: u32,
    native_thread_id: u32,
    current_frame: u32,
}

/// 3.13's `_Py_DebugOffsets` (the first field of `_PyRuntime`; its layout is fixed within a
/// minor version). Where the walker and the code-object reader use fixed offsets (the frame
/// and code fields), they must agree with it; the thread and interpreter offsets, which
/// vary with build options, are taken from it.
fn debug_offsets_313(raw: &[u8]) -> Result<DebugOffsets, String> {
    let word = |i: usize| u64_at(raw, i as u64 * 8);
    if &raw[..8] != b"xdebugpy" {
        return Err("its _PyRuntime has no _Py_DebugOffsets cookie".into());
    }
    let version = word(1);
    if version >> 16 != 0x030d {
        return Err(format!("its _Py_DebugOffsets say version {version:#x}"));
    }
    if word(2) != 0 {
        return Err("it is a free-threaded build".into());
    }
    // interpreter_frame: size, previous, executable, instr_ptr, localsplus, owner;
    // code_object: size, filename, name, qualname, linetable, firstlineno, …, co_code_adaptive.
    let code = code_layout(13).expect("3.13 layout");
    let expected = [
        (29, 8, "_PyInterpreterFrame.previous"),
        (30, 0, "_PyInterpreterFrame.f_executable"),
        (31, 56, "_PyInterpreterFrame.instr_ptr"),
        (33, 70, "_PyInterpreterFrame.owner"),
        (35, code.filename, "co_filename"),
        (37, code.qualname, "co_qualname"),
        (38, code.linetable, "co_linetable"),
        (39, code.firstlineno, "co_firstlineno"),
        (43, code.code_adaptive, "co_code_adaptive"),
    ];
    for (index, want, field) in expected {
        if word(index) != want {
            return Err(format!(
                "its _Py_DebugOffsets put {field} at {}, not {want}",
                word(index)
            ));
        }
    }
    let small = |i: usize| u32::try_from(word(i)).map_err(|_| format!("offset {i} too large"));
    Ok(DebugOffsets {
        interpreters_head: small(5)?,
        threads_head: small(9)?,
        thread_next: small(21)?,
        native_thread_id: small(25)?,
        current_frame: small(23)?,
    })
}

/// `PyCodeObject` and unicode layout of 3.`minor`.
struct CodeLayout {
    filename: u64,
    qualname: u64,
    firstlineno: u64,
    linetable: u64,
    code_adaptive: u64,
    /// `sizeof(PyASCIIObject)`: where an ASCII string's characters start.
    ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where a compact non-ASCII string's start.
    compact_data: u64,
    /// The format of `linetable`.
    lines: Lines,
}

/// How a code object maps its instructions to lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lines {
    /// 3.8, 3.9: `co_lnotab`, (byte increment, signed line increment) pairs.
    Lnotab,
    /// 3.10: `co_linetable`, (byte length, signed line delta or -128: no line) pairs.
    Linetable310,
    /// 3.11+: the location table (Objects/locations.md), by code unit.
    Locations,
}

fn code_layout(minor: u32) -> Option<CodeLayout> {
    Some(match minor {
        // qualname: co_name (3.8–3.10 have no co_qualname; py-spy shows co_name too).
        8..=10 => CodeLayout {
            filename: 104,
            qualname: 112,
            firstlineno: 40,
            linetable: 120,
            code_adaptive: 0,
            ascii_data: 48,
            compact_data: 72,
            lines: if minor == 10 {
                Lines::Linetable310
            } else {
                Lines::Lnotab
            },
        },
        11 => CodeLayout {
            filename: 112,
            qualname: 128,
            firstlineno: 72,
            linetable: 136,
            code_adaptive: 184,
            ascii_data: 48,
            compact_data: 72,
            lines: Lines::Locations,
        },
        12 | 13 => CodeLayout {
            filename: 112,
            qualname: 128,
            firstlineno: 68,
            linetable: 136,
            code_adaptive: if minor == 12 { 192 } else { 200 },
            ascii_data: 40,
            compact_data: 56,
            lines: Lines::Locations,
        },
        _ => return None,
    })
}

/// A code object as shown: qualified name, file, first line and line table.
#[derive(Debug, Clone)]
struct Code {
    qualname: String,
    filename: String,
    firstlineno: i64,
    linetable: Vec<u8>,
}

/// Reads code objects of one process (cached by address for the symbolizer's life).
#[derive(Default)]
pub struct CodeReader {
    codes: HashMap<(u32, u64), Option<Code>>,
    pub unreadable: u64,
    pub frames: u64,
    /// Python frames no `_PyEval_EvalFrameDefault` of the native stack took: put after them.
    pub unplaced: u64,
}

fn read_at(mem: &std::fs::File, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr).ok()?;
    Some(buf)
}

fn u64_at(buf: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// A `str` object's text (compact ASCII, Latin-1, UCS-2 or UCS-4), at most 1 KiB of it.
fn read_str(mem: &std::fs::File, addr: u64, layout: &CodeLayout) -> Option<String> {
    let head = read_at(mem, addr, 40)?;
    let length = (u64_at(&head, 16) as usize).min(1024);
    let state = u32::from_le_bytes(head[32..36].try_into().ok()?);
    let (kind, compact, ascii) = ((state >> 2) & 7, state >> 5 & 1 == 1, state >> 6 & 1 == 1);
    if !compact {
        return None;
    }
    if ascii {
        let bytes = read_at(mem, addr + layout.ascii_data, length)?;
        return Some(String::from_utf8_lossy(&bytes).into_owned());
    }
    let width = match kind {
        1 | 2 | 4 => kind as usize,
        _ => return None,
    };
    let bytes = read_at(mem, addr + layout.compact_data, length * width)?;
    Some(
        bytes
            .chunks_exact(width)
            .map(|c| {
                let mut v = [0u8; 4];
                v[..width].copy_from_slice(c);
                char::from_u32(u32::from_le_bytes(v)).unwrap_or('\u{fffd}')
            })
            .collect(),
    )
}

fn read_code(pid: u32, addr: u64, layout: &CodeLayout) -> Option<Code> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let head = read_at(&mem, addr, 144)?;
    let qualname = read_str(&mem, u64_at(&head, layout.qualname), layout)?;
    let filename = read_str(&mem, u64_at(&head, layout.filename), layout).unwrap_or_default();
    let firstlineno = i32::from_le_bytes(
        head[layout.firstlineno as usize..layout.firstlineno as usize + 4]
            .try_into()
            .ok()?,
    );
    // co_linetable is a bytes object: ob_size at 16, the bytes at 32.
    let table = u64_at(&head, layout.linetable);
    let linetable = read_at(&mem, table, 32)
        .and_then(|h| read_at(&mem, table + 32, (u64_at(&h, 16) as usize).min(1 << 16)))
        .unwrap_or_default();
    Some(Code {
        qualname,
        filename,
        firstlineno: i64::from(firstlineno),
        linetable,
    })
}

/// The line of the instruction at byte `offset` from a 3.8/3.9 `co_lnotab`, as
/// `PyCode_Addr2Line` finds it. `None` before the first instruction (`u32::MAX`).
fn lnotab_line(code: &Code, offset: u64) -> Option<i64> {
    if offset >= u64::from(u32::MAX) {
        return None;
    }
    let mut line = code.firstlineno;
    let mut addr = 0u64;
    for pair in code.linetable.chunks_exact(2) {
        addr += u64::from(pair[0]);
        if addr > offset {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    Some(line)
}

/// The line of the instruction at byte `offset` from a 3.10 `co_linetable`, as
/// `PyCode_Addr2Line` finds it: ranges of `pair[0]` bytes, each moving the line by
/// `pair[1]` (-128: the range has no line). `None` before the first instruction or for a
/// range without a line.
fn linetable_310_line(code: &Code, offset: u64) -> Option<i64> {
    if offset >= u64::from(u32::MAX) {
        return None;
    }
    let mut line = code.firstlineno;
    let mut end = 0u64;
    for pair in code.linetable.chunks_exact(2) {
        let delta = pair[1] as i8;
        if delta != -128 {
            line += i64::from(delta);
        }
        end += u64::from(pair[0]);
        if offset < end {
            return (delta != -128).then_some(line);
        }
    }
    None
}

/// The line of code unit `index` from a 3.11+ location table (Objects/locations.md).
fn line_at(code: &Code, index: u64) -> Option<i64> {
    let table = &code.linetable;
    let mut at = 0;
    let mut line = code.firstlineno;
    let mut unit = 0u64;
    let varint = |at: &mut usize| -> u64 {
        let mut value = 0u64;
        let mut shift = 0;
        while *at < table.len() {
            let b = table[*at];
            *at += 1;
            value |= u64::from(b & 63) << shift;
            shift += 6;
            if b & 64 == 0 || shift > 60 {
                break;
            }
        }
        value
    };
    let svarint = |at: &mut usize| -> i64 {
        let v = varint(at);
        if v & 1 == 1 {
            -((v >> 1) as i64)
        } else {
            (v >> 1) as i64
        }
    };
    while at < table.len() {
        let first = table[at];
        at += 1;
        let kind = (first >> 3) & 15;
        let length = u64::from(first & 7) + 1;
        let (delta, known) = match kind {
            15 => (0, false),
            14 => {
                let d = svarint(&mut at);
                varint(&mut at);
                varint(&mut at);
                varint(&mut at);
                (d, true)
            }
            13 => (svarint(&mut at), true),
            10..=12 => {
                at += 2;
                (i64::from(kind) - 10, true)
            }
            _ => {
                at += 1;
                (0, true)
            }
        };
        line += delta;
        if index < unit + length {
            return known.then_some(line);
        }
        unit += length;
    }
    None
}

impl CodeReader {
    /// Reads now, while the process lives, the code objects a walked stack of `process`
    /// names (its instruction pointers as the kernel stored them), so that a process gone by
    /// the end of the capture still gets its Python frames named.
    pub fn prefetch(&mut self, process: &crate::symbolize::procmaps::ProcessInfo, ips: &[u64]) {
        let (_, Some(entries)) = split(ips) else {
            return;
        };
        let Some(minor) = process_minor(process.vmas.iter().map(|v| v.path.as_str())) else {
            return;
        };
        let Some(layout) = code_layout(minor) else {
            return;
        };
        for pair in entries.chunks_exact(2) {
            let code = pair[0] & !ENTRY_BIT;
            self.codes
                .entry((process.pid, code))
                .or_insert_with(|| read_code(process.pid, code, &layout));
        }
    }

    /// The frame of one Python entry (code object address, instruction address).
    fn frame(&mut self, pid: u32, minor: u32, code: u64, instr: u64) -> Frame {
        let layout = code_layout(minor);
        let read = self
            .codes
            .entry((pid, code))
            .or_insert_with(|| layout.as_ref().and_then(|l| read_code(pid, code, l)))
            .clone();
        self.frames += 1;
        let name = match read {
            Some(c) => {
                let line = match layout.map(|l| (l.lines, l.code_adaptive)) {
                    Some((Lines::Locations, adaptive)) => {
                        line_at(&c, instr.wrapping_sub(code + adaptive) / 2)
                    }
                    Some((Lines::Lnotab, _)) => lnotab_line(&c, instr),
                    Some((Lines::Linetable310, _)) => linetable_310_line(&c, instr),
                    None => None,
                }
                .unwrap_or(c.firstlineno);
                let file = c.filename.rsplit('/').next().unwrap_or("").to_string();
                return Frame {
                    name: format!("py::{} ({file}:{line})", c.qualname),
                    kind: FrameKind::User,
                    module: Some(c.filename),
                    offset: None,
                    inlined: false,
                    unresolved: false,
                };
            }
            None => {
                self.unreadable += 1;
                format!("[python code {code:#x}]")
            }
        };
        Frame {
            name,
            kind: FrameKind::User,
            module: None,
            offset: None,
            inlined: false,
            unresolved: true,
        }
    }

    /// `native` (root first) with the Python frames of `entries` (code, instruction pairs,
    /// innermost first) in place of the `_PyEval_EvalFrameDefault` frames that ran them.
    pub fn merge(
        &mut self,
        pid: u32,
        minor: u32,
        mut native: Vec<Frame>,
        entries: &[u64],
    ) -> Vec<Frame> {
        // Groups, innermost first: one per C-level call of the eval loop.
        let mut groups: Vec<Vec<Frame>> = vec![Vec::new()];
        for pair in entries.chunks_exact(2) {
            let (code, instr) = (pair[0] & !ENTRY_BIT, pair[1]);
            let frame = self.frame(pid, minor, code, instr);
            groups.last_mut().expect("a group").push(frame);
            if pair[0] & ENTRY_BIT != 0 {
                groups.push(Vec::new());
            }
        }
        groups.retain(|g| !g.is_empty());
        let evals: Vec<usize> = native
            .iter()
            .enumerate()
            .filter(|(_, f)| f.name == "_PyEval_EvalFrameDefault" && !f.inlined)
            .map(|(i, _)| i)
            .rev()
            .collect();
        let mut placed: Vec<(usize, Vec<Frame>)> = Vec::new();
        let mut rest: Vec<Frame> = Vec::new();
        for (i, mut group) in groups.into_iter().enumerate() {
            group.reverse(); // root first
            match evals.get(i) {
                Some(&at) => placed.push((at, group)),
                None => {
                    self.unplaced += group.len() as u64;
                    group.extend(rest);
                    rest = group;
                }
            }
        }
        // From the innermost eval frame outwards, so earlier indices stay valid.
        placed.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        for (at, group) in placed {
            native.splice(at..=at, group);
        }
        native.extend(rest);
        native
    }
}

/// Splits a walked stack's instruction pointers at `PY_MARKER`: native ones, Python entries.
pub fn split(ips: &[u64]) -> (&[u64], Option<&[u64]>) {
    match ips.iter().position(|&ip| ip == PY_MARKER) {
        Some(at) => (&ips[..at], Some(&ips[at + 1..])),
        None => (ips, None),
    }
}

/// The minor version of the interpreter a process runs, from its mapped files.
pub fn process_minor(paths: impl Iterator<Item = impl AsRef<str>>) -> Option<u32> {
    paths.filter_map(|p| interpreter_minor(p.as_ref())).next()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3.13.0 `_Py_DebugOffsets` as pyenv's build has it (through `code_object`).
    fn debug_offsets_3130() -> Vec<u8> {
        let mut words = [0u64; DEBUG_OFFSETS_WORDS];
        words[1] = 0x030d_00f0;
        words[5] = 632; // runtime_state.interpreters_head
        words[9] = 7344; // interpreter_state.threads_head
        words[21] = 8; // thread_state.next
        words[23] = 72; // thread_state.current_frame
        words[25] = 160; // thread_state.native_thread_id
        for (i, v) in [(29, 8), (30, 0), (31, 56), (33, 70)] {
            words[i] = v; // interpreter_frame
        }
        for (i, v) in [(35, 112), (37, 128), (38, 136), (39, 68), (43, 200)] {
            words[i] = v; // code_object
        }
        let mut raw: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        raw[..8].copy_from_slice(b"xdebugpy");
        raw
    }

    #[test]
    fn python_313_offsets_come_from_its_debug_offsets() {
        let raw = debug_offsets_3130();
        assert_eq!(
            debug_offsets_313(&raw),
            Ok(DebugOffsets {
                interpreters_head: 632,
                threads_head: 7344,
                thread_next: 8,
                native_thread_id: 160,
                current_frame: 72,
            })
        );
        let mut moved = raw.clone();
        moved[33 * 8] = 71;
        assert_eq!(
            debug_offsets_313(&moved),
            Err("its _Py_DebugOffsets put _PyInterpreterFrame.owner at 71, not 70".into())
        );
        let mut free_threaded = raw.clone();
        free_threaded[2 * 8] = 1;
        assert!(debug_offsets_313(&free_threaded).is_err());
        let mut no_cookie = raw;
        no_cookie[0] = b'y';
        assert!(debug_offsets_313(&no_cookie).is_err());
    }

    #[test]
    fn interpreters_are_known_by_name() {
        assert_eq!(interpreter_minor("/usr/bin/python3.11"), Some(11));
        assert_eq!(
            interpreter_minor("/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0"),
            Some(12)
        );
        assert_eq!(
            interpreter_minor("/usr/lib/libpython3.13d.so.1.0"),
            Some(13)
        );
        assert_eq!(interpreter_minor("/usr/bin/python3.10"), Some(10));
        assert_eq!(
            interpreter_minor("/root/.pyenv/versions/3.8.18/lib/libpython3.8.so.1.0"),
            Some(8)
        );
        assert_eq!(interpreter_minor("/usr/bin/python3.7m"), None);
        assert_eq!(
            any_interpreter_minor("/root/.pyenv/versions/3.7.16/lib/libpython3.7m.so.1.0"),
            Some(7)
        );
        assert_eq!(interpreter_minor("/usr/bin/python3.12-config"), None);
        assert_eq!(
            interpreter_minor("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            None
        );
    }

    /// The tables CPython 3.8 and 3.10 compiled for one function (first line 2), and the
    /// line of each instruction as `dis` says (3.8: findlinestarts; 3.10: co_lines()).
    #[test]
    fn lnotab_and_310_linetable_give_the_lines_dis_gives() {
        let expected: Vec<(u64, i64)> = (0..=40u64)
            .step_by(2)
            .map(|o| {
                let line = match o {
                    0..=6 => 3,
                    8..=24 => 5,
                    26..=32 => 6,
                    34 | 36 => 7,
                    _ => 8,
                };
                (o, line)
            })
            .collect();
        let code = |table: &[u8]| Code {
            qualname: "f".into(),
            filename: "lt.py".into(),
            firstlineno: 2,
            linetable: table.to_vec(),
        };
        let lnotab = code(&[0, 1, 8, 2, 18, 1, 8, 1, 4, 1]);
        let linetable = code(&[8, 1, 18, 2, 8, 1, 4, 1, 4, 1]);
        for (offset, line) in expected {
            assert_eq!(lnotab_line(&lnotab, offset), Some(line), "3.8 at {offset}");
            assert_eq!(
                linetable_310_line(&linetable, offset),
                Some(line),
                "3.10 at {offset}"
            );
        }
        // Before the first instruction: no line (the frame's first line is shown).
        assert_eq!(lnotab_line(&lnotab, u64::from(u32::MAX)), None);
        // A 3.10 range without a line (-128).
        assert_eq!(linetable_310_line(&code(&[4, 1, 4, 0x80]), 6), None);
    }

    #[test]
    fn the_location_table_gives_the_line_of_an_instruction() {
        // first line 10: 2 units short form (line 10), 3 units one-line form +1 (line 11),
        // 1 unit "no column" form with svarint -1 (line 10), 1 unit without location.
        let code = Code {
            qualname: "f".into(),
            filename: "f.py".into(),
            firstlineno: 10,
            linetable: vec![
                0x80 | 1, // short form (code 0), 2 units
                0x00,
                0x80 | (11 << 3) | 2,
                0x04,
                0x08,
                0x80 | (13 << 3),
                0x03,
                0x80 | (15 << 3),
            ],
        };
        assert_eq!(line_at(&code, 0), Some(10));
        assert_eq!(line_at(&code, 1), Some(10));
        assert_eq!(line_at(&code, 2), Some(11));
        assert_eq!(line_at(&code, 4), Some(11));
        assert_eq!(line_at(&code, 5), Some(10));
        assert_eq!(line_at(&code, 6), None);
    }

    #[test]
    fn python_groups_take_the_place_of_their_eval_frames() {
        let frame = |name: &str| Frame {
            name: name.into(),
            kind: FrameKind::User,
            module: None,
            offset: None,
            inlined: false,
            unresolved: false,
        };
        let native = vec![
            frame("main"),
            frame("_PyEval_EvalFrameDefault"),
            frame("call_c"),
            frame("_PyEval_EvalFrameDefault"),
            frame("time_sleep"),
        ];
        // Innermost first: inner, middle (entry of the inner eval call), outer (entry).
        let entries = [0x30, 0, 0x20 | ENTRY_BIT, 0, 0x10 | ENTRY_BIT, 0];
        let mut reader = CodeReader::default();
        // No such process: code frames stay unnamed, their places are what is checked.
        let merged = reader.merge(u32::MAX, 12, native, &entries);
        let names: Vec<&str> = merged.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "main",
                "[python code 0x10]",
                "call_c",
                "[python code 0x20]",
                "[python code 0x30]",
                "time_sleep"
            ]
        );
        assert_eq!(reader.unplaced, 0);
    }
}
