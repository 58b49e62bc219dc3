//! Which eBPF programs and links a process holds, and whether they are still in the kernel:
//! ours exactly (by id, from the process's own `/proc/PID/fdinfo`), whatever else runs on
//! the host at the same time; the kernel's own list (`bpftool`) is the oracle.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Program and link ids behind a process's open descriptors (`prog_id:` / `link_id:` in
/// `/proc/PID/fdinfo/*`; a link's fdinfo names its program too).
pub fn held_by(pid: u32) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (mut programs, mut links) = (BTreeSet::new(), BTreeSet::new());
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            let parse = |v: &str| v.trim().parse::<u64>().ok();
            if let Some(id) = line.strip_prefix("prog_id:").and_then(parse) {
                programs.insert(id);
            } else if let Some(id) = line.strip_prefix("link_id:").and_then(parse) {
                links.insert(id);
            }
        }
    }
    (programs, links)
}

/// Ids the kernel lists now for `bpftool KIND show` (`prog` or `link`).
pub fn loaded(kind: &str) -> BTreeSet<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", kind, "show"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.iter().filter_map(|p| p["id"].as_u64()).collect()
}

/// Waits (up to 10 s: the kernel frees a closed program after an RCU grace period, a
/// tracing program's trampoline after an RCU-tasks one) until none of these programs and
/// links is loaded; panics naming what stayed. Returns how long it took.
pub fn assert_gone(programs: &BTreeSet<u64>, links: &BTreeSet<u64>, after: &str) -> Duration {
    let started = Instant::now();
    loop {
        let progs_left: Vec<u64> = loaded("prog").intersection(programs).copied().collect();
        let links_left: Vec<u64> = loaded("link").intersection(links).copied().collect();
        if progs_left.is_empty() && links_left.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "10 s after {after}, still loaded: programs {progs_left:?}, links {links_left:?} \
             (of {} programs and {} links the process held)",
            programs.len(),
            links.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
