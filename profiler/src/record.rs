//! `profiler record`: attach, collect per-interval snapshots until the duration ends or the
//! user interrupts, then symbolize and write the capture and its views to the output dir.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use profiler_common::offcpu::{
    NewTaskEvent, OffcpuKey, OffcpuValue, STATE_DISK, STATE_IDLE, STATE_RUNQUEUE, STATE_SLEEP,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::model::{Capture, Filters, FrameKind, Metadata, OffcpuProfile, Process, Stack};
use crate::probes::offcpu::{OffcpuConfig, OffcpuProbe};
use crate::procmaps::ProcessCache;
use crate::render;
use crate::symbolize::{Symbolizer, missing_stack_frame};

pub struct RecordOptions {
    pub duration: Duration,
    pub interval: Duration,
    pub output: PathBuf,
    pub offcpu: OffcpuConfig,
    pub state_name: String,
    pub threads_name: String,
    /// Stacks shown in the text summary.
    pub top: usize,
}

/// Runs a capture and writes everything to `options.output`. Returns the capture.
pub async fn record(options: RecordOptions) -> Result<Capture> {
    check_privileges()?;
    crate::probes::offcpu::preflight(&options.offcpu)?;
    for pid in &options.offcpu.pids {
        check_task_exists(*pid, "process")?;
    }
    for tid in &options.offcpu.tids {
        check_task_exists(*tid, "thread")?;
    }
    prepare_output_dir(&options.output)?;

    let mut probe = OffcpuProbe::load(&options.offcpu)?;
    // SAFETY: the ring buffer owns its fd, which stays open as long as the AsyncFd holds it.
    let mut new_tasks =
        unsafe { AsyncFd::register_with_interest(probe.take_new_tasks()?, Interest::READABLE) }
            .map_err(|err| anyhow::anyhow!("cannot poll the new-task ring buffer: {err}"))?;
    let mut processes = ProcessCache::default();
    for pid in &options.offcpu.pids {
        processes.observe(*pid, "");
    }

    let started = Instant::now();
    let start_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut series = Series::default();
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + options.interval,
        options.interval,
    );
    let deadline = tokio::time::sleep(options.duration);
    tokio::pin!(deadline);
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let progress = Progress::new(options.duration);
    eprintln!(
        "recording off-CPU time ({}) of {} for {:.1} s; Ctrl-C stops early",
        probe.attached_with,
        target_description(&options.offcpu),
        options.duration.as_secs_f64()
    );

    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = sigint.recv() => { progress.interrupted(); break }
            _ = sigterm.recv() => { progress.interrupted(); break }
            _ = ticker.tick() => {
                let totals = probe.totals()?;
                for key in totals.keys() {
                    if processes.get(key.tgid).is_none() {
                        processes.observe(key.tgid, "");
                    }
                }
                series.push(&totals, started.elapsed());
                progress.update(started.elapsed(), &series, processes.len(), &probe);
            }
            guard = new_tasks.readable_mut() => {
                let mut guard = guard.context("polling the new-task ring buffer failed")?;
                drain_new_tasks(guard.get_inner_mut(), &mut processes);
                guard.clear_ready();
            }
        }
    }
    let totals = probe.totals()?;
    series.push(&totals, started.elapsed());
    drain_new_tasks(new_tasks.get_mut(), &mut processes);
    progress.finish();
    processes.refresh_all();

    let mut counters: BTreeMap<String, u64> = probe
        .counters()?
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();

    let mut symbolizer = Symbolizer::new();
    let mut stacks = Vec::new();
    for (key, value) in &totals {
        let mut frames = Vec::new();
        match probe.stack(key.user_stack_id)? {
            Some(ips) => frames.extend(symbolizer.user_frames(processes.get(key.tgid), &ips)),
            None => frames.push(missing_stack_frame(FrameKind::User, key.user_stack_id)),
        }
        match probe.stack(key.kernel_stack_id)? {
            Some(ips) => frames.extend(symbolizer.kernel_frames(&ips)),
            None => frames.push(missing_stack_frame(FrameKind::Kernel, key.kernel_stack_id)),
        }
        stacks.push(Stack {
            pid: key.tgid,
            tid: key.tid,
            comm: processes
                .get(key.tgid)
                .map(|p| p.comm.clone())
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| format!("[pid {}]", key.tgid)),
            state: state_name(key.state).to_string(),
            frames,
            total_ns: value.total_ns,
            count: value.count,
            intervals: series.values(key),
        });
    }
    let attached_with = probe.attached_with;
    drop(probe); // detach before the (slow) writing
    stacks.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.tid.cmp(&b.tid)));

    let stats = symbolizer.stats;
    counters.insert("user_frames".into(), stats.user_addresses);
    counters.insert("kernel_frames".into(), stats.kernel_addresses);
    counters.insert("unresolved_user_frames".into(), stats.unresolved_user);
    counters.insert("unresolved_kernel_frames".into(), stats.unresolved_kernel);

    let mut seen_pids: Vec<u32> = stacks.iter().map(|s| s.pid).collect();
    seen_pids.sort_unstable();
    seen_pids.dedup();
    let process_list = seen_pids
        .iter()
        .map(|pid| {
            let info = processes.get(*pid);
            Process {
                pid: *pid,
                comm: info.map(|p| p.comm.clone()).unwrap_or_default(),
                exe: info.and_then(|p| p.exe.clone()),
                exited: info.is_none_or(|p| p.exited),
            }
        })
        .collect();

    let mut capture = Capture::new(Metadata {
        host: hostname(),
        kernel: kernel_release(),
        profiler_version: env!("CARGO_PKG_VERSION").to_string(),
        start_unix_ms,
        duration_ns: series.ends.last().copied().unwrap_or(0),
        interval_ends_ns: series.ends.clone(),
        filters: Filters {
            pids: options.offcpu.pids.clone(),
            tids: options.offcpu.tids.clone(),
            min_block_ns: options.offcpu.min_block_ns,
            max_block_ns: options.offcpu.max_block_ns,
            state: options.state_name.clone(),
            threads: options.threads_name.clone(),
        },
        attach: attached_with.to_string(),
        counters,
    });
    capture.offcpu = Some(OffcpuProfile {
        stacks,
        processes: process_list,
    });
    write_outputs(&capture, &options.output, options.top)?;
    Ok(capture)
}

/// Writes `capture.json`, `offcpu.folded`, `offcpu.svg` and `summary.txt`, and prints the
/// summary.
pub fn write_outputs(capture: &Capture, dir: &Path, top: usize) -> Result<()> {
    capture.save(&dir.join(crate::model::CAPTURE_FILE))?;
    let stacks = capture
        .offcpu
        .as_ref()
        .map(|o| o.stacks.as_slice())
        .unwrap_or_default();
    let lines = render::folded(stacks);
    let folded_path = dir.join("offcpu.folded");
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    std::fs::write(&folded_path, text)
        .with_context(|| format!("cannot write {}", folded_path.display()))?;
    render::flamegraph_svg(&lines, "Off-CPU time", "us", &dir.join("offcpu.svg"))?;
    let summary = render::summary(capture, top);
    std::fs::write(dir.join("summary.txt"), &summary)
        .with_context(|| format!("cannot write {}", dir.join("summary.txt").display()))?;
    print!("{summary}");
    println!("wrote {}", dir.display());
    Ok(())
}

/// Per-key deltas for every interval, kept sparse (most keys are idle most of the time).
#[derive(Default)]
struct Series {
    previous: HashMap<OffcpuKey, u64>,
    deltas: HashMap<OffcpuKey, Vec<(u32, u64)>>,
    ends: Vec<u64>,
    blocks: u64,
}

impl Series {
    fn push(&mut self, totals: &HashMap<OffcpuKey, OffcpuValue>, elapsed: Duration) {
        let index = self.ends.len() as u32;
        self.ends.push(elapsed.as_nanos() as u64);
        let mut blocks = 0;
        for (key, value) in totals {
            blocks += value.count;
            let before = self.previous.insert(*key, value.total_ns).unwrap_or(0);
            let delta = value.total_ns.saturating_sub(before);
            if delta > 0 {
                self.deltas.entry(*key).or_default().push((index, delta));
            }
        }
        self.blocks = blocks;
    }

    fn values(&self, key: &OffcpuKey) -> Vec<u64> {
        let mut dense = vec![0; self.ends.len()];
        for (index, value) in self.deltas.get(key).into_iter().flatten() {
            dense[*index as usize] = *value;
        }
        dense
    }
}

fn drain_new_tasks(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    processes: &mut ProcessCache,
) {
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<NewTaskEvent>() {
            continue;
        }
        // SAFETY: the kernel wrote a whole NewTaskEvent; read_unaligned copes with alignment.
        let event: NewTaskEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        let len = event.comm.iter().position(|&b| b == 0).unwrap_or(16);
        let comm = String::from_utf8_lossy(&event.comm[..len]);
        processes.observe(event.tgid, &comm);
    }
}

fn target_description(config: &OffcpuConfig) -> String {
    let ids = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    match (config.pids.is_empty(), config.tids.is_empty()) {
        (true, true) => "the whole host".to_string(),
        (false, true) => format!("pid {}", ids(&config.pids)),
        (true, false) => format!("tid {}", ids(&config.tids)),
        (false, false) => format!("pid {} tid {}", ids(&config.pids), ids(&config.tids)),
    }
}

fn state_name(state: u32) -> &'static str {
    match state {
        STATE_RUNQUEUE => "runqueue",
        STATE_SLEEP => "sleep",
        STATE_DISK => "disk",
        STATE_IDLE => "idle",
        _ => "other",
    }
}

struct Progress {
    duration: Duration,
    tty: bool,
}

impl Progress {
    fn new(duration: Duration) -> Self {
        Self {
            duration,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&self, elapsed: Duration, series: &Series, processes: usize, probe: &OffcpuProbe) {
        let secs = elapsed.as_secs();
        if !self.tty && !secs.is_multiple_of(5) {
            return;
        }
        let lost: u64 = probe
            .counters()
            .map(|c| {
                c.iter()
                    .filter(|(n, _)| {
                        matches!(*n, "stack_collisions" | "agg_map_full" | "start_map_full")
                    })
                    .map(|(_, v)| v)
                    .sum()
            })
            .unwrap_or(0);
        let line = format!(
            "recording off-CPU: {secs}/{} s, {} blocks, {} stacks, {} processes, {lost} lost",
            self.duration.as_secs(),
            series.blocks,
            series.previous.len(),
            processes,
        );
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn interrupted(&self) {
        if self.tty {
            eprintln!();
        }
        eprintln!("interrupted: writing what was captured");
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Loading eBPF programs needs root, or CAP_BPF with CAP_PERFMON (5.8+).
fn check_privileges() -> Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    bail!(
        "recording needs root (or the CAP_BPF and CAP_PERFMON capabilities) to load eBPF \
         programs; run it as root"
    )
}

fn check_task_exists(id: u32, what: &str) -> Result<()> {
    if id == 0 || !Path::new(&format!("/proc/{id}")).exists() {
        bail!("no {what} with id {id} (nothing in /proc/{id})");
    }
    Ok(())
}

fn prepare_output_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    let probe = dir.join(".profiler-write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("cannot write to output directory {}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
