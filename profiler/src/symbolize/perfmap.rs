//! Perf maps: the names a JIT or an interpreter gives its generated code, in
//! `/tmp/perf-PID.map` (one `START SIZE NAME` line per code object, hexadecimal, appended as
//! code is generated). Node's `--perf-basic-prof` (with `--interpreted-frames-native-stack`
//! for interpreted functions), Java's perf-map-agent and Python 3.12+'s `-X perf` write them.
//! Addresses in anonymous executable memory are named from it.
//!
//! The file is the process's: read through `/proc/PID/root` under the pid the process has in
//! its own pid namespace (a container's `/tmp`), and only when it is a regular file (not a
//! symlink, not a FIFO that would block the read) owned by the process's user or root — as
//! `perf report` does, so another user cannot name a process's code. It is read
//! incrementally: each refresh parses only the lines appended since the last one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};

/// At most this much of one map is read (a long-running JIT's map can grow without bound).
const MAX_BYTES: u64 = 256 << 20;

/// One process's perf map, as read so far.
#[derive(Debug, Clone, Default)]
pub struct PerfMap {
    /// Where it was read from (for the frames' module).
    pub path: String,
    /// Code start → (end, name). A later line for the same start replaces the earlier one
    /// (a JIT that reused the address).
    entries: BTreeMap<u64, (u64, String)>,
    /// The file's inode and how far it was read: the next refresh reads on from there.
    inode: u64,
    read_len: u64,
    /// Lines that did not parse.
    pub bad_lines: u64,
    /// The file was longer than `MAX_BYTES`: the rest was not read.
    pub truncated: bool,
    /// Not read: not a regular file, or owned by another user than the process's or root.
    pub refused: bool,
}

impl PerfMap {
    /// The name of the code object holding `addr` and the offset in it.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let (start, (end, name)) = self.entries.range(..=addr).next_back()?;
        (addr < *end).then(|| (name.as_str(), addr - start))
    }

    /// Entries whose start lies in `[start, end)`, by start.
    pub fn entries_in(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, &str)> {
        self.entries
            .range(start..end)
            .map(|(s, (e, name))| (*s, *e, name.as_str()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds the complete lines of `text`; returns how many bytes they took (a last line
    /// without its newline is still being written: it is read next time).
    fn parse(&mut self, text: &[u8]) -> usize {
        let complete = match text.iter().rposition(|&b| b == b'\n') {
            Some(last) => last + 1,
            None => return 0,
        };
        for line in text[..complete].split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            match parse_line(&String::from_utf8_lossy(line)) {
                Some((start, size, name)) => {
                    self.entries
                        .insert(start, (start.saturating_add(size), name.to_string()));
                }
                None => self.bad_lines += 1,
            }
        }
        complete
    }
}

/// `START SIZE NAME` (hexadecimal, with or without `0x`; the name may hold spaces).
fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let mut fields = line.splitn(3, ' ');
    let start = hex(fields.next()?)?;
    let size = hex(fields.next()?)?;
    let name = fields.next()?.trim_end();
    (!name.is_empty() && size > 0).then_some((start, size, name))
}

/// The pid `pid` has in its own pid namespace (the last `NSpid` field) and its user ids
/// (real, effective).
fn namespace_pid_and_uids(pid: u32) -> Option<(u32, [u32; 2])> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut ns_pid = None;
    let mut uids = None;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("NSpid:") {
            ns_pid = rest.split_ascii_whitespace().last()?.parse().ok();
        } else if let Some(rest) = line.strip_prefix("Uid:") {
            let mut ids = rest.split_ascii_whitespace().map(|id| id.parse().ok());
            uids = Some([ids.next()??, ids.next()??]);
        }
    }
    Some((ns_pid.unwrap_or(pid), uids?))
}

/// Reads (or reads on) the perf map of live process `pid` into `map` (`None`: start one).
/// Returns `None` when the process has no perf map, and an empty one marked `refused` when
/// it has one we may not read.
pub fn refresh(pid: u32, map: Option<PerfMap>) -> Option<PerfMap> {
    let (ns_pid, uids) = namespace_pid_and_uids(pid)?;
    let path = format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map");
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .ok();
    let Some(opened) = file.as_mut() else {
        return map; // gone (or never there): keep what was read
    };
    let meta = opened.metadata().ok()?;
    if !meta.file_type().is_file() || (meta.uid() != 0 && !uids.contains(&meta.uid())) {
        return Some(PerfMap {
            path: format!("/tmp/perf-{ns_pid}.map"),
            refused: true,
            ..Default::default()
        });
    }
    let mut map = match map {
        Some(map) if map.inode == meta.ino() && map.read_len <= meta.len() => map,
        _ => PerfMap {
            path: format!("/tmp/perf-{ns_pid}.map"),
            inode: meta.ino(),
            ..Default::default()
        },
    };
    let end = meta.len().min(MAX_BYTES);
    map.truncated = meta.len() > MAX_BYTES;
    if end <= map.read_len {
        return Some(map);
    }
    let mut text = Vec::with_capacity((end - map.read_len) as usize);
    if opened.seek(SeekFrom::Start(map.read_len)).is_err()
        || opened
            .take(end - map.read_len)
            .read_to_end(&mut text)
            .is_err()
    {
        return Some(map);
    }
    map.read_len += map.parse(&text) as u64;
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_later_ones_replace_earlier_ones_at_the_same_start() {
        let mut map = PerfMap::default();
        let text: &[u8] = b"7f00 10 py::inner:/tmp/w.py\n0x7f20 8 JS:~outer /tmp/w.js:4:15\nbad line\n7f00 20 LazyCompile:*inner\n7f40 4 partial";
        assert_eq!(map.parse(text), text.len() - "7f40 4 partial".len());
        assert_eq!(map.bad_lines, 1);
        assert_eq!(map.lookup(0x7f00), Some(("LazyCompile:*inner", 0)));
        assert_eq!(map.lookup(0x7f1f), Some(("LazyCompile:*inner", 0x1f)));
        assert_eq!(map.lookup(0x7f27), Some(("JS:~outer /tmp/w.js:4:15", 7)));
        assert_eq!(map.lookup(0x7f28), None);
        assert_eq!(map.lookup(0x7eff), None);
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn a_map_is_read_on_from_where_it_stopped() {
        use std::io::Write as _;
        let pid = std::process::id();
        let Some((ns_pid, _)) = namespace_pid_and_uids(pid) else {
            return;
        };
        let path = format!("/tmp/perf-{ns_pid}.map");
        let mut file = File::create(&path).expect("create perf map");
        file.write_all(b"1000 10 first\n2000 1").unwrap();
        let map = refresh(pid, None).expect("our own map");
        assert_eq!(map.lookup(0x1004), Some(("first", 4)));
        assert_eq!(map.lookup(0x2000), None);
        file.write_all(b"0 second\n").unwrap();
        let map = refresh(pid, Some(map)).expect("our own map");
        assert_eq!(map.lookup(0x200f), Some(("second", 0xf)));
        assert_eq!(map.len(), 2);
        // Another user's file under the process's name is not read.
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let map = refresh(pid, None).expect("a refused map");
        assert!(map.refused && map.is_empty());
        std::fs::remove_file(&path).unwrap();
    }
}
