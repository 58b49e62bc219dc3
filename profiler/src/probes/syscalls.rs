//! Syscalls family: attaches `profiler-ebpf/src/syscalls.rs` to raw_syscalls sys_enter and
//! sys_exit (tp_btf, or the classic tracepoints as a fallback) and reads its per-(process,
//! syscall) statistics and slow-call stacks.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya::maps::{MapData, PerCpuHashMap};
use aya::programs::{BtfTracePoint, TracePoint};
use profiler_common::syscalls::{SlowKey, SlowValue, SyscallKey, SyscallStats, counter, maps};

use super::offcpu::AttachMode;
use super::{Globals, Probes, global, kernel::tracefs, program, read_counters, read_hash};

#[derive(Debug, Clone)]
pub struct SyscallsConfig {
    /// Calls at least this long keep their user stack.
    pub slow_ns: u64,
    pub attach: AttachMode,
}

impl Default for SyscallsConfig {
    fn default() -> Self {
        Self {
            slow_ns: 10_000_000,
            attach: AttachMode::Auto,
        }
    }
}

pub(super) fn globals(config: &SyscallsConfig, globals: &mut Globals) -> Result<()> {
    let enter = tracefs::field_offsets("raw_syscalls", "sys_enter")?;
    let exit = tracefs::field_offsets("raw_syscalls", "sys_exit")?;
    let field = |fields: &HashMap<String, u32>, name: &str, event: &str| {
        fields
            .get(name)
            .copied()
            .with_context(|| format!("raw_syscalls:{event} has no field {name}"))
    };
    global(globals, "SLOW_SYSCALL_NS", config.slow_ns);
    global(
        globals,
        "TP_SYS_ENTER_ID_OFF",
        field(&enter, "id", "sys_enter")?,
    );
    global(
        globals,
        "TP_SYS_EXIT_ID_OFF",
        field(&exit, "id", "sys_exit")?,
    );
    global(
        globals,
        "TP_SYS_EXIT_RET_OFF",
        field(&exit, "ret", "sys_exit")?,
    );
    Ok(())
}

/// Attaches sys_exit then sys_enter; returns how they were hooked.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    config: &SyscallsConfig,
    btf_path: &Path,
) -> Result<&'static str> {
    match config.attach {
        AttachMode::TpBtf => attach_btf(ebpf, btf_path),
        AttachMode::Tracepoint => attach_tracepoint(ebpf),
        AttachMode::Auto => match attach_btf(ebpf, btf_path) {
            Ok(how) => Ok(how),
            Err(btf_err) => {
                // Neither half of the pair may stay attached beside the fallback's.
                for name in BTF_PROGRAMS.map(|(name, _)| name) {
                    if let Ok(prog) = program(ebpf, name).and_then(|p| {
                        <&mut BtfTracePoint>::try_from(p).map_err(anyhow::Error::from)
                    }) {
                        let _ = prog.unload();
                    }
                }
                attach_tracepoint(ebpf).with_context(|| {
                    format!("tp_btf/sys_enter and sys_exit failed too ({btf_err:#})")
                })
            }
        },
    }
}

/// Exit first, so that no call is entered without its exit being watched.
const BTF_PROGRAMS: [(&str, &str); 2] = [
    ("syscalls_exit_btf", "sys_exit"),
    ("syscalls_enter_btf", "sys_enter"),
];

fn attach_btf(ebpf: &mut Ebpf, btf_path: &Path) -> Result<&'static str> {
    let btf = aya::Btf::parse_file(btf_path, aya::Endianness::default())
        .context("parsing the kernel BTF failed")?;
    for (name, event) in BTF_PROGRAMS {
        let prog: &mut BtfTracePoint = program(ebpf, name)?.try_into()?;
        prog.load(event, &btf)
            .with_context(|| format!("loading tp_btf/{event} failed"))?;
        prog.attach()
            .with_context(|| format!("attaching tp_btf/{event} failed"))?;
    }
    Ok("tp_btf")
}

fn attach_tracepoint(ebpf: &mut Ebpf) -> Result<&'static str> {
    for (name, event) in [
        ("syscalls_exit_tp", "sys_exit"),
        ("syscalls_enter_tp", "sys_enter"),
    ] {
        let prog: &mut TracePoint = program(ebpf, name)?.try_into()?;
        prog.load()
            .with_context(|| format!("loading the {event} tracepoint program failed"))?;
        prog.attach("raw_syscalls", event)
            .with_context(|| format!("attaching to raw_syscalls:{event} failed"))?;
    }
    Ok("tracepoint")
}

impl Probes {
    /// Per (process, syscall) statistics, the CPUs' copies summed; the maximum is window
    /// `window`'s (0: the programs' first, the only one of a `record`).
    pub fn syscall_stats(&self, window: u64) -> Result<HashMap<SyscallKey, SyscallStats>> {
        let name = maps::STATS;
        let map = self
            .ebpf()
            .map(name)
            .with_context(|| format!("no map {name}"))?;
        let map: PerCpuHashMap<&MapData, SyscallKey, SyscallStats> = PerCpuHashMap::try_from(map)?;
        let mut out = HashMap::new();
        for entry in map.iter() {
            match entry {
                Ok((key, per_cpu)) => {
                    out.insert(key, sum(&per_cpu, window));
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(err) => return Err(err).with_context(|| format!("reading {name} failed")),
            }
        }
        Ok(out)
    }

    pub fn slow_syscalls(&self) -> Result<HashMap<SlowKey, SlowValue>> {
        read_hash(self.ebpf(), maps::SLOW)
    }

    pub fn syscall_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        read_counters(self.ebpf(), maps::COUNTERS, &counter::NAMES)
    }

    /// Starts the next window of the syscall maxima (each CPU's copy restarts its maximum
    /// at its next call, keeping this one's as the previous); returns its number. Calls that
    /// end from here on are in the maximum read for the new window and, until the old
    /// window's final snapshot, in the old one's too.
    pub fn start_syscall_window(&mut self) -> Result<u64> {
        let name = maps::WINDOW;
        let map = self
            .ebpf_mut()
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?;
        let mut map: aya::maps::Array<&mut MapData, u64> = aya::maps::Array::try_from(map)?;
        let window = map.get(&0, 0)?.wrapping_add(1);
        map.set(0, window, 0)?;
        Ok(window)
    }
}

/// What the syscall maps held at a window's start: each window's values are read as
/// differences from it (a daemon that keeps its programs across windows).
#[derive(Default, Clone)]
pub struct SyscallBase {
    stats: HashMap<SyscallKey, SyscallStats>,
    slow: HashMap<SlowKey, SlowValue>,
}

impl SyscallBase {
    pub fn new(
        stats: HashMap<SyscallKey, SyscallStats>,
        slow: HashMap<SlowKey, SlowValue>,
    ) -> Self {
        Self { stats, slow }
    }

    /// `stats` since the base: counts, times and the histogram as differences (the maximum
    /// is already the window's); keys with no call since are left out.
    pub fn stats_since(
        &self,
        stats: HashMap<SyscallKey, SyscallStats>,
    ) -> HashMap<SyscallKey, SyscallStats> {
        stats
            .into_iter()
            .filter_map(|(key, mut now)| {
                if let Some(base) = self.stats.get(&key) {
                    now.count = now.count.saturating_sub(base.count);
                    now.total_ns = now.total_ns.saturating_sub(base.total_ns);
                    now.errors = now.errors.saturating_sub(base.errors);
                    for (n, b) in now.hist.iter_mut().zip(base.hist) {
                        *n = n.saturating_sub(b);
                    }
                }
                (now.count > 0 || now.errors > 0).then_some((key, now))
            })
            .collect()
    }

    /// `slow` since the base; keys with no slow call since are left out.
    pub fn slow_since(&self, slow: HashMap<SlowKey, SlowValue>) -> HashMap<SlowKey, SlowValue> {
        slow.into_iter()
            .filter_map(|(key, mut now)| {
                if let Some(base) = self.slow.get(&key) {
                    now.count = now.count.saturating_sub(base.count);
                    now.total_ns = now.total_ns.saturating_sub(base.total_ns);
                }
                (now.count > 0).then_some((key, now))
            })
            .collect()
    }
}

/// One (process, syscall)'s statistics over all CPUs: counts and times add up, the maximum
/// is the largest of window `window`'s. A copy still on an older window had no call in this
/// one; a copy already on the next (it restarted after `start_syscall_window`, before this
/// window's final snapshot) keeps this window's as its previous maximum, and its calls since
/// are still this window's.
fn sum(per_cpu: &[SyscallStats], window: u64) -> SyscallStats {
    let mut total = SyscallStats::default();
    for cpu in per_cpu {
        total.count += cpu.count;
        total.total_ns += cpu.total_ns;
        let max = if cpu.max_window == window {
            cpu.max_ns
        } else if cpu.max_window == window.wrapping_add(1) {
            cpu.max_ns.max(cpu.prev_max_ns)
        } else {
            0
        };
        total.max_ns = total.max_ns.max(max);
        total.errors += cpu.errors;
        for (sum, n) in total.hist.iter_mut().zip(cpu.hist) {
            *sum += n;
        }
    }
    total
}

/// The name of syscall `nr` on the architecture this profiler runs on.
pub fn name(nr: u32) -> String {
    #[cfg(target_arch = "aarch64")]
    let table = crate::symbolize::syscall_names::AARCH64;
    #[cfg(not(target_arch = "aarch64"))]
    let table = crate::symbolize::syscall_names::X86_64;
    table
        .binary_search_by_key(&nr, |(n, _)| *n)
        .map(|i| table[i].1.to_string())
        .unwrap_or_else(|_| format!("syscall_{nr}"))
}

#[cfg(test)]
mod tests {
    use crate::symbolize::syscall_names::{AARCH64, X86_64};

    #[test]
    fn cpu_copies_add_up_and_keep_the_largest_maximum() {
        use profiler_common::syscalls::SyscallStats;
        let mut a = SyscallStats {
            count: 3,
            total_ns: 300,
            max_ns: 200,
            errors: 1,
            ..Default::default()
        };
        a.hist[8] = 3;
        let mut b = SyscallStats {
            count: 2,
            total_ns: 1_000,
            max_ns: 900,
            errors: 0,
            ..Default::default()
        };
        b.hist[8] = 1;
        b.hist[10] = 1;
        let total = super::sum(&[a, b, SyscallStats::default()], 0);
        assert_eq!(
            (total.count, total.total_ns, total.max_ns, total.errors),
            (5, 1_300, 900, 1)
        );
        assert_eq!((total.hist[8], total.hist[10]), (4, 1));
        assert_eq!(total.hist.iter().sum::<u64>(), 5);
    }

    #[test]
    fn the_maximum_is_the_windows_own() {
        use profiler_common::syscalls::SyscallStats;
        let copy = |max_window, max_ns, prev_max_ns| SyscallStats {
            count: 1,
            max_window,
            max_ns,
            prev_max_ns,
            ..Default::default()
        };
        // Window 3: a copy with no call since window 2 counts nothing towards the maximum,
        // one restarted for window 4 (a call after the bump, before the final snapshot)
        // keeps window 3's as its previous and its new call is window 3's too.
        let copies = [copy(2, 9_000, 0), copy(3, 500, 0), copy(4, 700, 800)];
        assert_eq!(super::sum(&copies, 3).max_ns, 800);
        assert_eq!(super::sum(&copies, 4).max_ns, 700);
        assert_eq!(super::sum(&copies, 2).max_ns, 9_000);
    }

    #[test]
    fn tables_are_sorted_and_known_numbers_have_their_names() {
        for table in [X86_64, AARCH64] {
            assert!(table.windows(2).all(|w| w[0].0 < w[1].0));
        }
        fn find(table: &[(u32, &'static str)], nr: u32) -> &'static str {
            table.iter().find(|(n, _)| *n == nr).unwrap().1
        }
        assert_eq!(find(X86_64, 0), "read");
        assert_eq!(find(X86_64, 35), "nanosleep");
        assert_eq!(find(X86_64, 202), "futex");
        assert_eq!(find(AARCH64, 63), "read");
        assert_eq!(find(AARCH64, 101), "nanosleep");
        assert_eq!(find(AARCH64, 98), "futex");
        assert_eq!(find(AARCH64, 79), "newfstatat");
        assert_eq!(super::name(999_999), "syscall_999999");
    }
}
