//! Turns captured instruction pointers into frames with blazesym: kernel frames from
//! kallsyms, user frames from the ELF files (with DWARF for inlined functions and demangled
//! names) at the (file, offset) the process's cached maps give. What cannot be resolved becomes
//! `module+0xoffset`, never dropped, and is counted.
//!
//! Beside the facade: `procmaps` (a process's memory maps, kept past its exit),
//! `perfmap` (names of JIT-generated code), `syscall_names` (syscall numbers → names) and
//! `unwind` (`.eh_frame` → the rows the kernel
//! walks user stacks with, per file).

pub mod perfmap;
pub mod procmaps;
pub mod python;
pub mod syscall_names;
pub mod unwind;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use blazesym::symbolize::source::{Elf, Kernel, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer as Blazesym};

use crate::model::{Frame, FrameKind, UnresolvedBinary};
use procmaps::{Location, ProcessInfo};

/// Frame counts, for the capture's counters.
#[derive(Debug, Default, Clone)]
pub struct SymbolizeStats {
    pub user_addresses: u64,
    pub kernel_addresses: u64,
    pub unresolved_user: u64,
    pub unresolved_kernel: u64,
    /// User frames named from a perf map (JIT or interpreter code).
    pub perf_map_frames: u64,
    /// Distinct user addresses per binary (path, or `[vdso]`, `[anon]`, `[unknown]`…):
    /// (unresolved, all).
    pub user_by_binary: BTreeMap<String, (u64, u64)>,
}

impl SymbolizeStats {
    fn user_address(&mut self, binary: &str, resolved: bool) {
        self.user_addresses += 1;
        let entry = self.user_by_binary.entry(binary.to_string()).or_default();
        entry.1 += 1;
        if !resolved {
            self.unresolved_user += 1;
            entry.0 += 1;
        }
    }

    /// Binaries with unresolved user addresses, most unresolved first.
    pub fn unresolved_by_binary(&self) -> Vec<UnresolvedBinary> {
        let mut list: Vec<UnresolvedBinary> = self
            .user_by_binary
            .iter()
            .filter(|(_, (unresolved, _))| *unresolved > 0)
            .map(|(binary, (unresolved, addresses))| UnresolvedBinary {
                binary: binary.clone(),
                unresolved: *unresolved,
                addresses: *addresses,
            })
            .collect();
        list.sort_by(|a, b| {
            b.unresolved
                .cmp(&a.unresolved)
                .then(a.binary.cmp(&b.binary))
        });
        list
    }
}

/// Batches and caches symbolization. Not `Send` (blazesym's symbolizer is not): keep it on
/// one thread.
pub struct Symbolizer {
    blazesym: Blazesym,
    kernel: HashMap<u64, Vec<Frame>>,
    user: HashMap<(String, u64), Vec<Frame>>,
    pub stats: SymbolizeStats,
    /// CPython code objects read for Python frames, and their counts.
    pub python: python::CodeReader,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

/// A user address made ready for lookup.
enum UserKey {
    /// Shown as the first path, read from the second (see `procmaps`), at an offset.
    File(String, String, u64),
    Special(String, u64),
    /// Named by the process's perf map: the name, the map, the offset in the code.
    PerfMap(String, String, u64),
    Unknown(u64),
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            blazesym: Blazesym::builder()
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .enable_code_info(true)
                .build(),
            kernel: HashMap::new(),
            user: HashMap::new(),
            stats: SymbolizeStats::default(),
            python: python::CodeReader::default(),
        }
    }

    /// Kernel frames for `ips` (innermost first, as captured), returned root first.
    pub fn kernel_frames(&mut self, ips: &[u64]) -> Vec<Frame> {
        let addrs: Vec<u64> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| adjust(i, ip))
            .collect();
        let missing: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.kernel.contains_key(a))
            .collect();
        if !missing.is_empty() {
            self.resolve_kernel(&missing);
        }
        let mut frames = Vec::new();
        for addr in addrs.iter().rev() {
            frames.extend(self.kernel[addr].iter().cloned());
        }
        strip_tracing_frames(&mut frames);
        frames
    }

    fn resolve_kernel(&mut self, addrs: &[u64]) {
        let src = Source::Kernel(Kernel::default());
        let results = self
            .blazesym
            .symbolize(&src, Input::AbsAddr(addrs))
            .unwrap_or_default();
        for (i, &addr) in addrs.iter().enumerate() {
            self.stats.kernel_addresses += 1;
            let frames = match results.get(i) {
                Some(Symbolized::Sym(sym)) => expand(sym, FrameKind::Kernel, None, addr),
                _ => {
                    self.stats.unresolved_kernel += 1;
                    vec![unresolved(FrameKind::Kernel, "[kernel]", addr, None)]
                }
            };
            self.kernel.insert(addr, frames);
        }
    }

    /// User frames for `ips` (innermost first) in `process` (whose maps were cached while it
    /// lived), returned root first.
    pub fn user_frames(&mut self, process: Option<&ProcessInfo>, ips: &[u64]) -> Vec<Frame> {
        let (native, python_entries) = python::split(ips);
        let frames = self.native_user_frames(process, native);
        match (python_entries, process) {
            (Some(entries), Some(process)) if !entries.is_empty() => {
                match python::process_minor(process.vmas.iter().map(|v| v.path.as_str())) {
                    Some(minor) => {
                        // Under `-X perf` the perf map names the same Python functions again
                        // (without their lines), at its trampolines: the walked frames say it.
                        let mut frames = frames;
                        frames.retain(|f| {
                            !(f.name.starts_with("py::")
                                && f.module
                                    .as_deref()
                                    .is_some_and(|m| m.starts_with("/tmp/perf-")))
                        });
                        self.python.merge(process.pid, minor, frames, entries)
                    }
                    None => frames,
                }
            }
            _ => frames,
        }
    }

    /// User frames of the native part of a walked stack (see `user_frames`).
    fn native_user_frames(&mut self, process: Option<&ProcessInfo>, ips: &[u64]) -> Vec<Frame> {
        let keys: Vec<UserKey> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| {
                let addr = adjust(i, ip);
                match process.map(|p| p.locate(addr)) {
                    Some(Location::File { path, open, offset }) => {
                        UserKey::File(path.to_string(), open.to_string(), offset)
                    }
                    Some(Location::Special { name, offset }) => {
                        UserKey::Special(name.to_string(), offset)
                    }
                    Some(Location::PerfMap {
                        symbol,
                        map,
                        offset,
                    }) => UserKey::PerfMap(symbol.to_string(), map.to_string(), offset),
                    _ => UserKey::Unknown(addr),
                }
            })
            .collect();
        let mut by_file: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
        for key in &keys {
            if let UserKey::File(path, open, offset) = key
                && !self.user.contains_key(&(open.clone(), *offset))
            {
                by_file.entry((path, open)).or_default().push(*offset);
            }
        }
        let by_file: Vec<(String, String, Vec<u64>)> = by_file
            .into_iter()
            .map(|((p, open), mut o)| {
                o.sort_unstable();
                o.dedup();
                (p.to_string(), open.to_string(), o)
            })
            .collect();
        for (path, open, offsets) in by_file {
            self.resolve_file(&path, &open, &offsets);
        }
        let mut frames = Vec::new();
        for key in keys.iter().rev() {
            match key {
                UserKey::File(_, open, offset) => {
                    frames.extend(self.user[&(open.clone(), *offset)].iter().cloned())
                }
                UserKey::Special(name, offset) => {
                    self.stats.user_address(name, false);
                    frames.push(unresolved(
                        FrameKind::User,
                        &basename(name),
                        *offset,
                        Some(name),
                    ));
                }
                UserKey::PerfMap(symbol, map, offset) => {
                    self.stats.user_address(map, true);
                    self.stats.perf_map_frames += 1;
                    frames.push(Frame {
                        name: symbol.clone(),
                        kind: FrameKind::User,
                        module: Some(map.clone()),
                        offset: Some(*offset),
                        inlined: false,
                        unresolved: false,
                    });
                }
                UserKey::Unknown(addr) => {
                    self.stats.user_address("[unknown]", false);
                    frames.push(unresolved(FrameKind::User, "[unknown]", *addr, None));
                }
            }
        }
        frames
    }

    /// Frames of `offsets` in the file shown as `path` and read from `open`.
    fn resolve_file(&mut self, path: &str, open: &str, offsets: &[u64]) {
        let src = Source::Elf(Elf::new(open));
        let results = self
            .blazesym
            .symbolize(&src, Input::FileOffset(offsets))
            .unwrap_or_default();
        let module = basename(path);
        for (i, &offset) in offsets.iter().enumerate() {
            let frames = match results.get(i) {
                Some(Symbolized::Sym(sym)) => {
                    self.stats.user_address(path, true);
                    expand(sym, FrameKind::User, Some(path), offset)
                }
                _ => {
                    self.stats.user_address(path, false);
                    vec![unresolved(FrameKind::User, &module, offset, Some(path))]
                }
            };
            self.user.insert((open.to_string(), offset), frames);
        }
    }
}

/// The innermost kernel frames of a stack taken in a tracepoint are the tracing machinery
/// itself (our program, `bpf_trace_run*`, `__traceiter_*`, `perf_trace_*`…): cut them so the
/// stack ends where the thread really was (`__schedule`).
fn strip_tracing_frames(frames: &mut Vec<Frame>) {
    const TRACING: [&str; 7] = [
        "bpf_prog_",
        "bpf_trace_run",
        "__bpf_trace_",
        "__traceiter_",
        "perf_trace_",
        "trace_call_bpf",
        "perf_tp_event",
    ];
    let is_tracing = |f: &Frame| TRACING.iter().any(|p| f.name.starts_with(p));
    // Only look at the innermost few frames: a real kernel path never has these deeper.
    let window = frames.len().saturating_sub(10);
    if let Some(outermost) = frames[window..].iter().position(is_tracing) {
        frames.truncate(window + outermost);
    }
}

fn basename(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

/// Return addresses point after the call; step back into the call instruction for every
/// frame but the innermost so that inlining and line info describe the call site.
fn adjust(index: usize, ip: u64) -> u64 {
    if index == 0 { ip } else { ip.saturating_sub(1) }
}

/// A symbol and the functions inlined at the address, outermost first.
fn expand(
    sym: &blazesym::symbolize::Sym<'_>,
    kind: FrameKind,
    module: Option<&str>,
    offset: u64,
) -> Vec<Frame> {
    let mut frames = vec![Frame {
        name: sym.name.to_string(),
        kind,
        module: module.map(str::to_string),
        offset: Some(offset),
        inlined: false,
        unresolved: false,
    }];
    for inlined in sym.inlined.iter() {
        frames.push(Frame {
            name: inlined.name.to_string(),
            kind,
            module: module.map(str::to_string),
            offset: Some(offset),
            inlined: true,
            unresolved: false,
        });
    }
    frames
}

fn unresolved(kind: FrameKind, module_name: &str, offset: u64, module: Option<&str>) -> Frame {
    Frame {
        name: format!("{module_name}+{offset:#x}"),
        kind,
        module: module.map(str::to_string),
        offset: Some(offset),
        inlined: false,
        unresolved: true,
    }
}

/// A placeholder frame for a stack that was not captured (the reason is in the name).
pub fn missing_stack_frame(kind: FrameKind, stack_id: i32) -> Frame {
    let what = match kind {
        FrameKind::Kernel => "kernel",
        _ => "user",
    };
    let reason = match -stack_id {
        14 => "none",               // EFAULT: no such stack (kernel thread) or not walkable
        17 => "lost: collision",    // EEXIST: stack map hash collision
        12 | 7 => "lost: map full", // ENOMEM / E2BIG
        _ => "lost",
    };
    Frame {
        name: format!("[{what} stack {reason}]"),
        kind: FrameKind::Synthetic,
        module: None,
        offset: None,
        inlined: false,
        unresolved: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unresolved_addresses_are_counted_per_binary_most_first() {
        let mut stats = SymbolizeStats::default();
        stats.user_address("/usr/bin/app", true);
        stats.user_address("/usr/bin/app", false);
        stats.user_address("[unknown]", false);
        stats.user_address("[unknown]", false);
        stats.user_address("/lib/libc.so.6", true);
        assert_eq!((stats.user_addresses, stats.unresolved_user), (5, 3));
        let list = stats.unresolved_by_binary();
        let got: Vec<(&str, u64, u64)> = list
            .iter()
            .map(|b| (b.binary.as_str(), b.unresolved, b.addresses))
            .collect();
        assert_eq!(got, [("[unknown]", 2, 2), ("/usr/bin/app", 1, 2)]);
    }

    #[inline(never)]
    fn a_distinctively_named_function() -> u64 {
        a_distinctively_named_function as *const () as u64
    }

    #[test]
    fn resolves_own_function_through_file_offset() {
        let mut cache = crate::symbolize::procmaps::ProcessCache::default();
        let pid = std::process::id();
        cache.observe(pid, "test");
        let addr = a_distinctively_named_function() + 1;
        let mut symbolizer = Symbolizer::new();
        let frames = symbolizer.user_frames(cache.get(pid), &[addr]);
        assert!(
            frames
                .iter()
                .any(|f| f.name.ends_with("a_distinctively_named_function")),
            "{frames:?}"
        );
        assert_eq!(symbolizer.stats.unresolved_user, 0);
    }

    #[test]
    fn unknown_addresses_keep_their_address() {
        let mut symbolizer = Symbolizer::new();
        let frames = symbolizer.user_frames(None, &[0x1234]);
        assert_eq!(frames[0].name, "[unknown]+0x1234");
        assert!(frames[0].unresolved);
        assert_eq!(symbolizer.stats.unresolved_user, 1);
    }

    #[test]
    fn missing_stacks_say_why() {
        assert_eq!(
            missing_stack_frame(FrameKind::User, -14).name,
            "[user stack none]"
        );
        assert_eq!(
            missing_stack_frame(FrameKind::Kernel, -17).name,
            "[kernel stack lost: collision]"
        );
    }
}
