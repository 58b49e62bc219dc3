//! `profiler record`: attach the probe families asked for, collect per-interval snapshots until
//! the duration ends or the user interrupts, then symbolize and write the capture and its
//! views to the output dir.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use profiler_common::offcpu::{
    OffcpuKey, RUNQ_BUCKETS, STATE_DISK, STATE_IDLE, STATE_RUNQUEUE, STATE_SLEEP,
};
use profiler_common::oncpu::OncpuKey;
use profiler_common::shared::{NewTaskEvent, OVERFLOW_STACK_BIT};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::dbstats::{DbAggregator, Observed};
use crate::model::{
    Capture, Filters, Frame, FrameKind, Metadata, NPlusOne, OffcpuProfile, OncpuProfile, Process,
    RunqueueHistogram, Stack, SyscallProfile, SyscallStat,
};
use crate::probes::{ProbeConfig, Probes};
use crate::procmaps::ProcessCache;
use crate::render;
use crate::symbolize::{Symbolizer, missing_stack_frame};
use crate::tcpstats::TcpAggregator;

pub struct RecordOptions {
    pub duration: Duration,
    pub interval: Duration,
    pub output: PathBuf,
    pub probes: ProbeConfig,
    pub state_name: String,
    pub threads_name: String,
    /// Stacks shown in the text summary.
    pub top: usize,
    /// The db family was asked for explicitly: finding no server is an error.
    pub db_required: bool,
    pub show_literals: bool,
    /// Detach on a background thread (uprobes take ~0.1 s each to remove): the daemon's next
    /// window starts meanwhile. `wait_for_detach` waits for them.
    pub background_detach: bool,
    /// No summary on stdout and no progress (the daemon's windows).
    pub quiet: bool,
    /// Loaded by a window that is still recording (the daemon's handoff): the events from
    /// before this capture was attached are that window's.
    pub continues: bool,
}

static DETACHING: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Detaches on a background thread (uprobes take ~0.1 s each to remove).
fn detach_in_background(probes: Probes) {
    let mut detaching = DETACHING.lock().expect("detach lock");
    detaching.retain(|h| !h.is_finished());
    detaching.push(std::thread::spawn(move || drop(probes)));
}

/// Waits until every program detached in the background is gone.
pub fn wait_for_detach() {
    let handles = std::mem::take(&mut *DETACHING.lock().expect("detach lock"));
    for handle in handles {
        let _ = handle.join();
    }
}

/// Runs a capture and writes everything to `options.output`. Returns the capture.
pub async fn record(options: RecordOptions) -> Result<Capture> {
    let (capture, _) = prepare(options)?.run(None).await?;
    Ok(capture)
}

type EventRing = AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>;

/// A capture whose probes are loaded and attached; `run` records it.
pub struct Prepared {
    options: RecordOptions,
    probes: Probes,
    new_tasks: EventRing,
    tcp_events: Option<EventRing>,
    db_events: Option<EventRing>,
    cpu_at_start: u64,
    /// When the probes were attached: the capture covers from here.
    started: Instant,
    /// CLOCK_MONOTONIC (the kernel's `bpf_ktime_get_ns`) once attached: queries that start
    /// from here on are this capture's; earlier ones belong to the previous window (which
    /// still ran when they started).
    attach_ktime: u64,
    start_unix_ms: u64,
}

impl Prepared {
    pub fn output(&self) -> &Path {
        &self.options.output
    }

    /// Not recorded after all: detach (in the background) and remove its directory.
    pub fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.options.output);
        detach_in_background(self.probes);
    }
}

/// Runs when a capture's time is up, before it stops: the daemon loads and attaches its next
/// window here, so no time goes unrecorded between windows.
pub type Handoff = Box<dyn FnOnce() -> Result<Prepared>>;

/// Checks the options, loads and attaches the probes (needs a tokio runtime).
pub fn prepare(options: RecordOptions) -> Result<Prepared> {
    check_privileges()?;
    let config = &options.probes;
    for pid in &config.pids {
        check_task_exists(*pid, "process")?;
    }
    for tid in &config.tids {
        check_task_exists(*tid, "thread")?;
    }
    prepare_output_dir(&options.output)?;

    let cpu_at_start = process_cpu_ns();
    let mut probes = Probes::load(config)?;
    // The db family attaches last: its queries from here on are this capture's.
    let attach_ktime = ktime_ns();
    // SAFETY: the ring buffer owns its fd, which stays open as long as the AsyncFd holds it.
    let new_tasks =
        unsafe { AsyncFd::register_with_interest(probes.take_new_tasks()?, Interest::READABLE) }
            .map_err(|err| anyhow::anyhow!("cannot poll the new-task ring buffer: {err}"))?;
    let tcp_events = match probes.tcp {
        // SAFETY: as above.
        true => Some(
            unsafe {
                AsyncFd::register_with_interest(probes.take_tcp_events()?, Interest::READABLE)
            }
            .map_err(|err| anyhow::anyhow!("cannot poll the TCP event ring buffer: {err}"))?,
        ),
        false => None,
    };
    if options.db_required && probes.db_targets.is_empty() {
        bail!(
            "no PostgreSQL server or libpq/SQLite client found {}; name them with \
             --postgres-binary, --libpq or --sqlite PATH",
            if config.pids.is_empty() {
                "running or installed on this host"
            } else {
                "among the given processes"
            }
        );
    }
    let db_events = match probes.db_targets.is_empty() {
        true => None,
        // SAFETY: as above.
        false => Some(
            unsafe {
                AsyncFd::register_with_interest(probes.take_db_events()?, Interest::READABLE)
            }
            .map_err(|err| anyhow::anyhow!("cannot poll the database event ring buffer: {err}"))?,
        ),
    };
    Ok(Prepared {
        options,
        probes,
        new_tasks,
        tcp_events,
        db_events,
        cpu_at_start,
        attach_ktime,
        started: Instant::now(),
        start_unix_ms: unix_ms(),
    })
}

impl Prepared {
    /// Records until the duration ends or SIGINT/SIGTERM, then (on time, not on a signal)
    /// runs `handoff` while this capture's probes still count, and builds, writes and
    /// returns the capture with what `handoff` returned.
    pub async fn run(
        self,
        handoff: Option<Handoff>,
    ) -> Result<(Capture, Option<Result<Prepared>>)> {
        let Prepared {
            options,
            probes,
            mut new_tasks,
            mut tcp_events,
            mut db_events,
            cpu_at_start,
            started,
            start_unix_ms,
            attach_ktime,
        } = self;
        // Following a window that is still attached: what happened before we were is its.
        let from_ktime = if options.continues { attach_ktime } else { 0 };
        let config = &options.probes;
        let mut tcp = TcpAggregator::default();
        let mut db = DbAggregator::new(options.show_literals);
        let mut db_owners = DbOwners::new(&config.pids);
        let mut processes = ProcessCache::default();
        for pid in &config.pids {
            processes.observe(*pid, "");
        }

        let mut offcpu_series: Series<OffcpuKey> = Series::default();
        let mut oncpu_series: Series<OncpuKey> = Series::default();
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + options.interval,
            options.interval,
        );
        // The TCP programs wake us only when their ring fills up; drain it often.
        let mut tcp_drain = tokio::time::interval(Duration::from_millis(100));
        let deadline = tokio::time::sleep(options.duration.saturating_sub(started.elapsed()));
        tokio::pin!(deadline);
        let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let progress = Progress::new(options.duration, options.quiet);
        if !options.quiet {
            eprintln!(
                "recording {} of {} for {:.1} s; Ctrl-C stops early",
                families_description(&probes),
                target_description(config),
                options.duration.as_secs_f64()
            );
        }

        let snapshot = |probes: &Probes,
                        offcpu_series: &mut Series<OffcpuKey>,
                        oncpu_series: &mut Series<OncpuKey>,
                        processes: &mut ProcessCache|
         -> Result<()> {
            let elapsed = started.elapsed();
            if probes.offcpu_attached_with.is_some() {
                let totals = probes.offcpu_totals()?;
                for key in totals.keys() {
                    if processes.get(key.tgid).is_none() {
                        processes.observe(key.tgid, "");
                    }
                }
                offcpu_series.push(
                    totals.iter().map(|(k, v)| (*k, v.total_ns, v.count)),
                    elapsed,
                );
            }
            if probes.oncpu_frequency.is_some() {
                let counts = probes.oncpu_counts()?;
                for key in counts.keys() {
                    if processes.get(key.tgid).is_none() {
                        processes.observe(key.tgid, "");
                    }
                }
                oncpu_series.push(counts.iter().map(|(k, v)| (*k, *v, *v)), elapsed);
            }
            Ok(())
        };

        let mut interrupted = false;
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = sigint.recv() => { progress.interrupted(); interrupted = true; break }
                _ = sigterm.recv() => { progress.interrupted(); interrupted = true; break }
                _ = ticker.tick() => {
                    snapshot(&probes, &mut offcpu_series, &mut oncpu_series, &mut processes)?;
                    progress.update(started.elapsed(), &offcpu_series, &oncpu_series, processes.len(), &probes);
                }
                guard = new_tasks.readable_mut() => {
                    let mut guard = guard.context("polling the new-task ring buffer failed")?;
                    drain_new_tasks(guard.get_inner_mut(), &mut processes, &probes);
                    guard.clear_ready();
                }
                _ = tcp_drain.tick(), if tcp_events.is_some() || db_events.is_some() => {
                    if let Some(events) = tcp_events.as_mut() {
                        drain_tcp_events(events.get_mut(), &mut tcp, &mut processes, (from_ktime, u64::MAX));
                    }
                    if let Some(events) = db_events.as_mut() {
                        drain_db_events(events.get_mut(), &mut db, &mut db_owners, Some(&mut processes), (from_ktime, u64::MAX));
                    }
                }
                guard = async { db_events.as_mut().expect("checked").readable_mut().await }, if db_events.is_some() => {
                    let mut guard = guard.context("polling the database event ring buffer failed")?;
                    drain_db_events(guard.get_inner_mut(), &mut db, &mut db_owners, Some(&mut processes), (from_ktime, u64::MAX));
                    guard.clear_ready();
                }
                guard = async { tcp_events.as_mut().expect("checked").readable_mut().await }, if tcp_events.is_some() => {
                    let mut guard = guard.context("polling the TCP event ring buffer failed")?;
                    drain_tcp_events(guard.get_inner_mut(), &mut tcp, &mut processes, (from_ktime, u64::MAX));
                    guard.clear_ready();
                }
            }
        }
        // The next capture attaches while this one still counts: the two overlap by the
        // moment between its start and this final snapshot, with no gap.
        let next = match (handoff, interrupted) {
            (Some(handoff), false) => Some(handoff()),
            _ => None,
        };
        // Queries that started, and TCP events that happened, once the next capture was
        // attached are its own.
        let until_ktime = match &next {
            Some(Ok(next)) => next.attach_ktime,
            _ => u64::MAX,
        };
        snapshot(
            &probes,
            &mut offcpu_series,
            &mut oncpu_series,
            &mut processes,
        )?;
        let ends = if probes.offcpu_attached_with.is_some() {
            offcpu_series.ends.clone()
        } else if probes.oncpu_frequency.is_some() {
            oncpu_series.ends.clone()
        } else {
            // Families without snapshots: one interval, the whole capture.
            vec![started.elapsed().as_nanos() as u64]
        };
        drain_new_tasks(new_tasks.get_mut(), &mut processes, &probes);
        if let Some(events) = tcp_events.as_mut() {
            drain_tcp_events(
                events.get_mut(),
                &mut tcp,
                &mut processes,
                (from_ktime, until_ktime),
            );
        }
        if let Some(events) = db_events.as_mut() {
            drain_db_events(
                events.get_mut(),
                &mut db,
                &mut db_owners,
                Some(&mut processes),
                (from_ktime, until_ktime),
            );
        }
        progress.finish();
        processes.refresh_all();

        let mut counters: BTreeMap<String, u64> = BTreeMap::new();
        if probes.offcpu_attached_with.is_some() {
            for (name, value) in probes.offcpu_counters()? {
                counters.insert(name.to_string(), value);
            }
        }
        if probes.oncpu_frequency.is_some() {
            for (name, value) in probes.oncpu_counters()? {
                counters.insert(format!("oncpu_{name}"), value);
            }
        }
        for (name, value) in probes.unwind_counters()? {
            counters.insert(name, value);
        }
        let program_stats = probes.program_stats();
        counters.insert("program_misses".to_string(), program_stats.recursion_misses);
        if config.measure_overhead {
            // What our programs cost the traced threads (kernel time, on their CPUs).
            counters.insert("bpf_run_ns".to_string(), program_stats.run_time_ns);
            counters.insert("bpf_runs".to_string(), program_stats.runs);
        }
        if probes.syscalls_slow_ns.is_some() {
            for (name, value) in probes.syscall_counters()? {
                counters.insert(format!("syscalls_{name}"), value);
            }
        }
        if probes.tcp {
            for (name, value) in probes.tcp_counters()? {
                counters.insert(format!("tcp_{name}"), value);
            }
        }
        if !probes.db_targets.is_empty() {
            for (name, value) in probes.db_counters()? {
                counters.insert(format!("db_{name}"), value);
            }
            counters.insert("db_filtered_out".into(), db_owners.filtered_out);
            counters.insert("db_wire_undecoded".into(), db_owners.undecoded);
        }

        let mut symbolizer = Symbolizer::new();
        let mut builder = StackBuilder {
            probes: &probes,
            processes: &processes,
            symbolizer: &mut symbolizer,
        };
        // How full the aggregation maps got (entries, capacity): a full map loses events.
        if probes.offcpu_attached_with.is_some() {
            counters.insert(
                "map_offcpu_entries".into(),
                offcpu_series.latest.len() as u64,
            );
            counters.insert(
                "map_offcpu_capacity".into(),
                u64::from(profiler_common::offcpu::TOTALS_MAX),
            );
        }
        if probes.oncpu_frequency.is_some() {
            counters.insert("map_oncpu_entries".into(), oncpu_series.latest.len() as u64);
            counters.insert(
                "map_oncpu_capacity".into(),
                u64::from(profiler_common::oncpu::COUNTS_MAX),
            );
        }
        let stack_ids: std::collections::HashSet<i32> = offcpu_series
            .latest
            .keys()
            .flat_map(|k| [k.kernel_stack_id, k.user_stack_id])
            .chain(
                oncpu_series
                    .latest
                    .keys()
                    .flat_map(|k| [k.kernel_stack_id, k.user_stack_id]),
            )
            .filter(|id| *id >= 0 && id & OVERFLOW_STACK_BIT == 0)
            .collect();
        counters.insert("map_stacks_entries".into(), stack_ids.len() as u64);
        counters.insert(
            "map_stacks_capacity".into(),
            u64::from(config.stack_storage_size),
        );
        let offcpu = match probes.offcpu_attached_with {
            Some(_) => {
                let mut stacks = Vec::new();
                for (key, (total_ns, count)) in &offcpu_series.latest {
                    let mut stack = builder.build(
                        (key.tgid, key.tid, key.kernel_stack_id, key.user_stack_id),
                        state_name(key.state),
                        *total_ns,
                        *count,
                        offcpu_series.values(key),
                    )?;
                    if key.db_frame != 0 {
                        // Waiting for a database query: the query as a frame between the code
                        // path that issued it and the kernel's wait.
                        let name = db_owners
                            .frames
                            .get(&key.db_frame)
                            .map_or_else(|| "[db] query".to_string(), |fp| format!("[db] {fp}"));
                        let at = stack
                            .frames
                            .iter()
                            .position(|f| f.kind == FrameKind::Kernel)
                            .unwrap_or(stack.frames.len());
                        stack.frames.insert(at, synthetic_frame(name));
                    }
                    stacks.push(stack);
                }
                let every = u64::from(config.offcpu_sample_every.max(1));
                if every > 1 {
                    // Sampled mode: each recorded block stands for `every` blocks.
                    for stack in &mut stacks {
                        scale_stack(stack, every);
                    }
                }
                sort_stacks(&mut stacks);
                let mut runqueue = runqueue_histograms(&probes, &processes)?;
                for histogram in &mut runqueue {
                    histogram.waits *= every;
                    histogram.buckets.iter_mut().for_each(|b| *b *= every);
                }
                Some(OffcpuProfile { stacks, runqueue })
            }
            None => None,
        };
        let oncpu = match probes.oncpu_frequency {
            Some(frequency) => {
                // Each sample stands for one sampling period of CPU time.
                let period_ns = 1_000_000_000 / frequency.max(1);
                let mut stacks = Vec::new();
                for (key, (samples, _)) in &oncpu_series.latest {
                    let intervals = oncpu_series
                        .values(key)
                        .iter()
                        .map(|s| s * period_ns)
                        .collect();
                    stacks.push(builder.build(
                        (key.tgid, key.tid, key.kernel_stack_id, key.user_stack_id),
                        "running",
                        samples * period_ns,
                        *samples,
                        intervals,
                    )?);
                }
                sort_stacks(&mut stacks);
                Some(OncpuProfile {
                    frequency_hz: frequency,
                    stacks,
                })
            }
            None => None,
        };
        let syscalls = match probes.syscalls_slow_ns {
            Some(slow_threshold_ns) => {
                let mut stats: Vec<SyscallStat> = probes
                    .syscall_stats()?
                    .into_iter()
                    .map(|(key, value)| SyscallStat {
                        pid: key.tgid,
                        comm: comm_of(&processes, key.tgid),
                        nr: key.nr,
                        name: crate::probes::syscalls::name(key.nr),
                        count: value.count,
                        errors: value.errors,
                        total_ns: value.total_ns,
                        max_ns: value.max_ns,
                        buckets: value.hist.to_vec(),
                    })
                    .collect();
                stats.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.pid.cmp(&b.pid)));
                let mut slow = Vec::new();
                for (key, value) in probes.slow_syscalls()? {
                    let mut stack = builder.build(
                        (key.tgid, key.tid, NO_STACK, key.user_stack_id),
                        "syscall",
                        value.total_ns,
                        value.count,
                        Vec::new(),
                    )?;
                    // No kernel stack was taken (at sys_exit it is only the exit path): drop its
                    // placeholder; the syscall's name says more.
                    stack.frames.pop();
                    stack.frames.push(synthetic_frame(format!(
                        "[syscall {}]",
                        crate::probes::syscalls::name(key.nr)
                    )));
                    slow.push(stack);
                }
                sort_stacks(&mut slow);
                Some(SyscallProfile {
                    slow_threshold_ns,
                    stats,
                    slow,
                })
            }
            None => None,
        };
        let tcp = probes.tcp.then(|| tcp.profile());
        let db = match probes.db_targets.is_empty() {
            true => None,
            false => {
                let mut profile = db.profile();
                for (_, pid, fingerprint, stack_id, tid, calls, total_ns) in db.stack_usage() {
                    if stack_id < 0 {
                        continue; // server-side: no client code path
                    }
                    let mut stack = builder.build(
                        (pid, tid, NO_STACK, stack_id),
                        "db",
                        total_ns,
                        calls,
                        Vec::new(),
                    )?;
                    stack.frames.pop(); // no kernel stack was taken
                    stack
                        .frames
                        .push(synthetic_frame(format!("[db] {fingerprint}")));
                    profile.stacks.push(stack);
                }
                let every = u64::from(config.db_sample_every.max(1));
                if every > 1 {
                    // Sampled mode: each timed query stands for `every` queries (latency
                    // quantiles are those of the sample).
                    for query in &mut profile.queries {
                        query.calls *= every;
                        query.errors *= every;
                        query.total_ns *= every;
                        query.buckets.iter_mut().for_each(|b| *b *= every);
                    }
                    for stack in &mut profile.stacks {
                        scale_stack(stack, every);
                    }
                }
                sort_stacks(&mut profile.stacks);
                for suspect in db.suspects() {
                    let frames = if suspect.user_stack_id >= 0 {
                        let mut stack = builder.build(
                            (suspect.pid, suspect.tid, NO_STACK, suspect.user_stack_id),
                            "db",
                            0,
                            0,
                            Vec::new(),
                        )?;
                        stack.frames.pop();
                        stack.frames
                    } else {
                        Vec::new()
                    };
                    profile.n_plus_one.push(NPlusOne {
                        pid: suspect.pid,
                        tid: suspect.tid,
                        comm: suspect.comm,
                        source: suspect.source,
                        fingerprint: suspect.fingerprint,
                        runs: suspect.runs,
                        longest_run: suspect.longest_run,
                        queries: suspect.queries,
                        total_ns: suspect.total_ns,
                        frames,
                    });
                }
                Some(profile)
            }
        };
        let attached_with = probes.offcpu_attached_with.unwrap_or("none");
        if options.background_detach {
            detach_in_background(probes);
        } else {
            drop(probes); // detach before the (slow) writing
        }

        counters.insert(
            "profiler_cpu_ns".into(),
            process_cpu_ns().saturating_sub(cpu_at_start),
        );
        let stats = symbolizer.stats;
        counters.insert("user_frames".into(), stats.user_addresses);
        counters.insert("kernel_frames".into(), stats.kernel_addresses);
        counters.insert("unresolved_user_frames".into(), stats.unresolved_user);
        counters.insert("unresolved_kernel_frames".into(), stats.unresolved_kernel);

        let mut seen_pids: Vec<u32> = offcpu
            .iter()
            .flat_map(|o| &o.stacks)
            .chain(oncpu.iter().flat_map(|o| &o.stacks))
            .map(|s| s.pid)
            .chain(syscalls.iter().flat_map(|s| &s.stats).map(|s| s.pid))
            .chain(tcp.iter().flat_map(|t| &t.endpoints).map(|e| e.pid))
            .chain(db.iter().flat_map(|d| &d.queries).map(|q| q.pid))
            .filter(|pid| *pid != 0)
            .collect();
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
            duration_ns: ends.last().copied().unwrap_or(0),
            interval_ends_ns: ends,
            filters: Filters {
                pids: config.pids.clone(),
                tids: config.tids.clone(),
                min_block_ns: config.offcpu.as_ref().map(|o| o.min_block_ns).unwrap_or(0),
                max_block_ns: config.offcpu.as_ref().and_then(|o| o.max_block_ns),
                state: options.state_name.clone(),
                threads: options.threads_name.clone(),
            },
            attach: attached_with.to_string(),
            counters,
            offcpu_sample_every: config.offcpu_sample_every,
            db_sample_every: config.db_sample_every,
        });
        capture.processes = process_list;
        capture.offcpu = offcpu;
        capture.oncpu = oncpu;
        capture.syscalls = syscalls;
        capture.tcp = tcp;
        capture.db = db;
        write_outputs(&capture, &options.output, options.top, !options.quiet)?;
        Ok((capture, next))
    }
}

/// Turns aggregation keys into symbolized stacks.
struct StackBuilder<'a> {
    probes: &'a Probes,
    processes: &'a ProcessCache,
    symbolizer: &'a mut Symbolizer,
}

impl StackBuilder<'_> {
    fn build(
        &mut self,
        (tgid, tid, kernel_stack_id, user_stack_id): (u32, u32, i32, i32),
        state: &str,
        total_ns: u64,
        count: u64,
        intervals: Vec<u64>,
    ) -> Result<Stack> {
        let mut frames = Vec::new();
        match self.probes.stack(user_stack_id)? {
            Some(ips) => frames.extend(self.symbolizer.user_frames(self.processes.get(tgid), &ips)),
            None => frames.push(missing_stack_frame(FrameKind::User, user_stack_id)),
        }
        match self.probes.stack(kernel_stack_id)? {
            Some(ips) => frames.extend(self.symbolizer.kernel_frames(&ips)),
            None => frames.push(missing_stack_frame(FrameKind::Kernel, kernel_stack_id)),
        }
        Ok(Stack {
            pid: tgid,
            tid,
            comm: comm_of(self.processes, tgid),
            state: state.to_string(),
            frames,
            total_ns,
            count,
            intervals,
        })
    }
}

fn runqueue_histograms(
    probes: &Probes,
    processes: &ProcessCache,
) -> Result<Vec<RunqueueHistogram>> {
    let mut by_pid: BTreeMap<u32, RunqueueHistogram> = BTreeMap::new();
    for (key, waits) in probes.runqueue_histograms()? {
        let entry = by_pid.entry(key.tgid).or_insert_with(|| RunqueueHistogram {
            pid: key.tgid,
            comm: processes
                .get(key.tgid)
                .map(|p| p.comm.clone())
                .unwrap_or_default(),
            waits: 0,
            buckets: vec![0; RUNQ_BUCKETS as usize],
        });
        if let Some(slot) = entry.buckets.get_mut(key.bucket as usize) {
            *slot += waits;
            entry.waits += waits;
        }
    }
    let mut histograms: Vec<_> = by_pid.into_values().collect();
    histograms.sort_by_key(|h| std::cmp::Reverse(h.waits));
    Ok(histograms)
}

/// A stack id that stands for "not captured" (-EFAULT).
const NO_STACK: i32 = -14;

fn comm_of(processes: &ProcessCache, pid: u32) -> String {
    processes
        .get(pid)
        .map(|p| p.comm.clone())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| format!("[pid {pid}]"))
}

fn synthetic_frame(name: String) -> Frame {
    Frame {
        name,
        kind: FrameKind::Synthetic,
        module: None,
        offset: None,
        inlined: false,
        unresolved: false,
    }
}

/// Sampled mode: a recorded stack stands for `every` of its kind.
fn scale_stack(stack: &mut Stack, every: u64) {
    stack.total_ns *= every;
    stack.count *= every;
    stack.intervals.iter_mut().for_each(|v| *v *= every);
}

/// Wall-clock time, milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's `bpf_ktime_get_ns`.
fn ktime_ns() -> u64 {
    // SAFETY: clock_gettime fills the struct it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (user + system) this process has used so far.
pub fn process_cpu_ns() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

fn sort_stacks(stacks: &mut [Stack]) {
    stacks.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.tid.cmp(&b.tid)));
}

/// Writes `capture.json`, the folded stacks and flamegraphs of each family recorded, and
/// `summary.txt`, and prints the summary.
pub fn write_outputs(capture: &Capture, dir: &Path, top: usize, print: bool) -> Result<()> {
    capture.save(&dir.join(crate::model::CAPTURE_FILE))?;
    if let Some(offcpu) = &capture.offcpu {
        let lines = render::folded(&offcpu.stacks, |s| s.total_ns, 1000);
        write_folded(&dir.join("offcpu.folded"), &lines)?;
        render::flamegraph_svg(&lines, &render::OFFCPU_STYLE, &dir.join("offcpu.svg"))?;
    }
    if let Some(oncpu) = &capture.oncpu {
        let lines = render::folded(&oncpu.stacks, |s| s.count, 1);
        write_folded(&dir.join("oncpu.folded"), &lines)?;
        render::flamegraph_svg(&lines, &render::ONCPU_STYLE, &dir.join("oncpu.svg"))?;
    }
    if let Some(syscalls) = &capture.syscalls {
        let lines = render::folded(&syscalls.slow, |s| s.total_ns, 1000);
        write_folded(&dir.join("syscalls.folded"), &lines)?;
    }
    if let Some(db) = &capture.db {
        let lines = render::db_folded(db);
        write_folded(&dir.join("db.folded"), &lines)?;
        render::flamegraph_svg(&lines, &render::DB_STYLE, &dir.join("db.svg"))?;
    }
    let wallclock = render::wallclock(capture);
    if !wallclock.is_empty() {
        write_folded(&dir.join("wallclock.folded"), &wallclock)?;
        render::flamegraph_svg(
            &wallclock,
            &render::WALLCLOCK_STYLE,
            &dir.join("wallclock.svg"),
        )?;
    }
    let summary = render::summary(capture, top);
    std::fs::write(dir.join("summary.txt"), &summary)
        .with_context(|| format!("cannot write {}", dir.join("summary.txt").display()))?;
    if print {
        print!("{summary}");
        println!("wrote {}", dir.display());
    }
    Ok(())
}

fn write_folded(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Per-key deltas for every interval, kept sparse (most keys are idle most of the time),
/// and the latest cumulative (value, count) of every key.
struct Series<K> {
    latest: HashMap<K, (u64, u64)>,
    deltas: HashMap<K, Vec<(u32, u64)>>,
    ends: Vec<u64>,
    events: u64,
}

impl<K> Default for Series<K> {
    fn default() -> Self {
        Self {
            latest: HashMap::new(),
            deltas: HashMap::new(),
            ends: Vec::new(),
            events: 0,
        }
    }
}

impl<K: Copy + Eq + Hash> Series<K> {
    /// Records cumulative (key, value, count) triples at `elapsed`.
    fn push(&mut self, totals: impl Iterator<Item = (K, u64, u64)>, elapsed: Duration) {
        let index = self.ends.len() as u32;
        self.ends.push(elapsed.as_nanos() as u64);
        let mut events = 0;
        for (key, value, count) in totals {
            events += count;
            let before = self.latest.insert(key, (value, count)).map_or(0, |v| v.0);
            let delta = value.saturating_sub(before);
            if delta > 0 {
                self.deltas.entry(key).or_default().push((index, delta));
            }
        }
        self.events = events;
    }

    fn values(&self, key: &K) -> Vec<u64> {
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
    probes: &Probes,
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
        probes.unwind_process(event.tgid);
    }
}

/// Whose a query is, and whether it passes -p: a server-side query belongs to the server
/// (the backend's parent, the postmaster; -p SERVER_PID selects its backends), a client-side
/// one to the client process.
pub(crate) struct DbOwners {
    pids: Vec<u32>,
    /// Prepared statements' text by (process, name), from PQsendPrepare.
    prepared: HashMap<(u32, String), String>,
    /// SQLite statements' text by (process, statement pointer), from their prepare.
    statements: HashMap<(u32, u64), String>,
    filtered_out: u64,
    /// Wire requests whose bytes did not decode.
    undecoded: u64,
    /// Fingerprints by `frame_hash` of the text the kernel saw: names the `[db]` frames of
    /// off-CPU stacks.
    pub(crate) frames: HashMap<u32, String>,
    endpoints: HashMap<(u32, u64), String>,
}

/// `ip:port` (`[ip6]:port`) of the peer of socket `fd` of process `pid`, or `unix`, from
/// /proc (the process's own network namespace).
fn socket_endpoint(pid: u32, fd: u64) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let inode = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .to_string();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[9] == inode {
                return proc_net_address(f[2], v6);
            }
        }
    }
    let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    unix.lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(6) == Some(inode.as_str()))
        .then(|| "unix".to_string())
}

/// `/proc/net/tcp{,6}` address (`0100007F:1538`: 32-bit words in host order, port in hex).
pub(crate) fn proc_net_address(text: &str, v6: bool) -> Option<String> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::new();
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let addr = if v6 {
        let octets: [u8; 16] = bytes.try_into().ok()?;
        std::net::IpAddr::V6(std::net::Ipv6Addr::from(octets))
    } else {
        let octets: [u8; 4] = bytes.try_into().ok()?;
        std::net::IpAddr::V4(std::net::Ipv4Addr::from(octets))
    };
    Some(std::net::SocketAddr::new(addr, port).to_string())
}

impl DbOwners {
    pub(crate) fn new(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            prepared: HashMap::new(),
            statements: HashMap::new(),
            filtered_out: 0,
            undecoded: 0,
            frames: HashMap::new(),
            endpoints: HashMap::new(),
        }
    }

    /// The address behind a client's socket, looked up once per (process, fd).
    fn endpoint(&mut self, pid: u32, fd: u64) -> String {
        self.endpoints
            .entry((pid, fd))
            .or_insert_with(|| socket_endpoint(pid, fd).unwrap_or_default())
            .clone()
    }

    fn owner(&mut self, query: &crate::probes::db::QueryRecord) -> Option<u32> {
        let owner = if query.source == "postgres-usdt" && query.ppid != 0 {
            query.ppid
        } else {
            query.pid
        };
        let wanted =
            self.pids.is_empty() || self.pids.contains(&query.pid) || self.pids.contains(&owner);
        if !wanted {
            self.filtered_out += 1;
        }
        wanted.then_some(owner)
    }
}

pub(crate) fn drain_db_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    db: &mut DbAggregator,
    owners: &mut DbOwners,
    mut processes: Option<&mut ProcessCache>,
    (started_from, started_before): (u64, u64),
) {
    while let Some(item) = ring.next() {
        if let Some(query) = crate::probes::db::decode(&item)
            // Statement definitions (SQLite prepares carry no time, libpq prepares are no
            // queries) go to both windows: later executions are named from them.
            && (query.start_ns == 0
                || query.prepare_name.is_some()
                || (started_from..started_before).contains(&query.start_ns))
            && let Some(owner) = owners.owner(&query)
        {
            let mut query = query;
            // What the kernel hashed for the off-CPU frame: libpq's text argument (a
            // prepared statement's name), a simple query's text on the wire.
            let frame = match query.source {
                "libpq" | "mysql" if query.prepare_name.is_none() => {
                    Some(profiler_common::db::frame_hash(query.text.as_bytes()))
                }
                "wire-postgres" if query.raw.first() == Some(&b'Q') => Some(
                    profiler_common::db::frame_hash(&query.raw[5.min(query.raw.len())..]),
                ),
                _ => None,
            };
            if query.source.starts_with("wire-") {
                let decoded = match query.source {
                    "wire-redis" => crate::wire::redis(&query.raw),
                    "wire-mysql" => crate::wire::mysql(&query.raw),
                    _ => crate::wire::postgres(&query.raw),
                };
                let Some(request) = decoded else {
                    owners.undecoded += 1;
                    continue;
                };
                if let Some(name) = request.parse_name {
                    owners
                        .prepared
                        .insert((query.pid, format!("wire:{name}")), request.text.clone());
                }
                // MySQL: a prepare's reply names the statement, which executes then use
                // (per connection); the prepare itself is not counted as a query.
                let socket = query.handle;
                if request.prepare {
                    if let Some(id) = crate::wire::mysql_prepared_id(&query.reply) {
                        owners
                            .prepared
                            .insert((query.pid, format!("mysql:{socket}:{id}")), request.text);
                    }
                    continue;
                }
                let prepared_key = match (&request.bind_name, request.execute_id) {
                    (Some(name), _) => Some(format!("wire:{name}")),
                    (None, Some(id)) => Some(format!("mysql:{socket}:{id}")),
                    (None, None) => None,
                };
                query.text = prepared_key
                    .and_then(|key| owners.prepared.get(&(query.pid, key)).cloned())
                    .unwrap_or(request.text);
            }
            if query.source == "sqlite" && query.prepare_name.is_some() {
                owners
                    .statements
                    .insert((query.pid, query.handle), query.text);
                continue;
            }
            if let Some(name) = query.prepare_name {
                owners.prepared.insert((query.pid, name), query.text);
                continue;
            }
            let text = if query.statement {
                owners
                    .statements
                    .get(&(query.pid, query.handle))
                    .cloned()
                    .unwrap_or_else(|| "[statement prepared before the capture]".to_string())
            } else if query.prepared {
                owners
                    .prepared
                    .get(&(query.pid, query.text.clone()))
                    .cloned()
                    .unwrap_or_else(|| format!("EXECUTE {}", query.text))
            } else {
                query.text
            };
            if query.user_stack_id >= 0
                && let Some(processes) = processes.as_deref_mut()
            {
                // Its memory maps, while it lives, to symbolize the issuing stacks: read again
                // (at most every 500 ms) because a process first seen at exec, before its
                // libraries were mapped, would otherwise keep maps without them.
                processes.observe(query.pid, &query.comm);
            }
            if let Some(frame) = frame
                && !owners.frames.contains_key(&frame)
            {
                owners
                    .frames
                    .insert(frame, crate::dbstats::fingerprint(&text));
            }
            let endpoint = match query.source {
                "libpq" | "wire-postgres" | "wire-mysql" | "wire-redis" if query.handle > 0 => {
                    owners.endpoint(query.pid, query.handle - 1)
                }
                _ => String::new(),
            };
            db.add(&Observed {
                source: query.source,
                pid: owner,
                comm: &query.comm,
                tid: query.tid,
                text: &text,
                truncated: query.truncated,
                error: query.error,
                start_ns: query.start_ns,
                duration_ns: query.duration_ns,
                user_stack_id: query.user_stack_id,
                endpoint: &endpoint,
            });
        }
    }
}

fn drain_tcp_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    tcp: &mut TcpAggregator,
    processes: &mut ProcessCache,
    (from, until): (u64, u64),
) {
    while let Some(item) = ring.next() {
        if let Some(record) = crate::probes::tcp::decode(&item)
            && (from..until).contains(&record.at_ns)
        {
            if record.pid != 0 && processes.get(record.pid).is_none() {
                processes.observe(record.pid, &record.comm);
            }
            tcp.add(&record);
        }
    }
}

fn families_description(probes: &Probes) -> String {
    let mut parts = Vec::new();
    if let Some(how) = probes.offcpu_attached_with {
        parts.push(format!("off-CPU time ({how})"));
    }
    if let Some(frequency) = probes.oncpu_frequency {
        parts.push(format!("on-CPU samples ({frequency} Hz)"));
    }
    if probes.syscalls_slow_ns.is_some() {
        parts.push("syscall latency".to_string());
    }
    if probes.tcp {
        parts.push("TCP connections".to_string());
    }
    if !probes.db_targets.is_empty() {
        parts.push(format!(
            "database queries ({})",
            probes
                .db_targets
                .iter()
                .map(|p| crate::probes::db::describe(p))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    match parts.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => parts.join(""),
    }
}

fn target_description(config: &ProbeConfig) -> String {
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
    quiet: bool,
}

impl Progress {
    fn new(duration: Duration, quiet: bool) -> Self {
        Self {
            duration,
            tty: std::io::stderr().is_terminal() && !quiet,
            quiet,
        }
    }

    fn update(
        &self,
        elapsed: Duration,
        offcpu: &Series<OffcpuKey>,
        oncpu: &Series<OncpuKey>,
        processes: usize,
        probes: &Probes,
    ) {
        let secs = elapsed.as_secs();
        if self.quiet || (!self.tty && !secs.is_multiple_of(5)) {
            return;
        }
        let is_loss = |n: &str| matches!(n, "stack_collisions" | "agg_map_full" | "start_map_full");
        let mut lost = 0;
        // Only the families that are attached: the others' maps hold nothing.
        let offcpu_counters = probes
            .offcpu_attached_with
            .map(|_| probes.offcpu_counters());
        let oncpu_counters = probes.oncpu_frequency.map(|_| probes.oncpu_counters());
        for counters in [offcpu_counters, oncpu_counters]
            .into_iter()
            .flatten()
            .flatten()
        {
            lost += counters
                .iter()
                .filter(|(n, _)| is_loss(n))
                .map(|(_, v)| v)
                .sum::<u64>();
        }
        let line = format!(
            "recording: {secs}/{} s, {} blocks, {} samples, {} stacks, {} processes, {lost} lost",
            self.duration.as_secs(),
            offcpu.events,
            oncpu.events,
            offcpu.latest.len() + oncpu.latest.len(),
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
pub(crate) fn check_privileges() -> Result<()> {
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

pub(crate) fn check_task_exists(id: u32, what: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn proc_net_addresses_decode() {
        assert_eq!(
            super::proc_net_address("0100007F:1538", false).as_deref(),
            Some("127.0.0.1:5432")
        );
        assert_eq!(
            super::proc_net_address("00000000000000000000000001000000:18EB", true).as_deref(),
            Some("[::1]:6379")
        );
        assert!(super::proc_net_address("zz:1", false).is_none());
    }
}
