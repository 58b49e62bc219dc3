//! ② Collection: loads and attaches the families asked for (through `probes`), drains their
//! maps and ring buffers every interval until the capture ends, then builds the Capture:
//! one file per family (`offcpu`, `oncpu`, `syscalls`, `tcp`, `db/`), the shared pieces
//! beside them (`series` per-interval values, `stacks` keys → symbolized stacks, `tasks`
//! first-seen processes, `host` clocks and host facts).

pub mod db;
mod host;
mod offcpu;
mod oncpu;
pub(crate) mod series;
mod stacks;
mod syscalls;
mod tasks;
pub mod tcp;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use profiler_common::offcpu::{OffcpuKey, RunqKey};
use profiler_common::oncpu::OncpuKey;
use profiler_common::shared::OVERFLOW_STACK_BIT;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::model::{Capture, Filters, Metadata, Process};
use crate::probes::syscalls::SyscallBase;
use crate::probes::{ProbeConfig, Probes};
use crate::render::outputs::{prepare_output_dir, write_outputs};
use crate::render::progress::{Progress, families_description, target_description};
use crate::symbolize::Symbolizer;
use crate::symbolize::procmaps::ProcessCache;
use db::DbAggregator;
use db::events::{DbOwners, drain_db_events};
pub(crate) use host::hostname;
use host::{kernel_release, ktime_ns};
pub use host::{process_cpu_ns, unix_ms};
use series::Series;
use stacks::StackBuilder;
use tasks::drain_new_tasks;
use tcp::{TcpAggregator, drain_tcp_events};

/// How long a window that handed over to new programs waits for the queries it saw start
/// to end.
const HANDOFF_QUERY_GRACE: Duration = Duration::from_secs(1);
/// A daemon keeps one set of programs across windows for at most this long: new ones start
/// from empty maps (what exited processes left in them goes with the old set).
const RENEW_AFTER: Duration = Duration::from_secs(5 * 60);
/// Counters that say how things stand (table sizes and capacities), not how often something
/// happened: a window that keeps its programs shows them as they are, not as differences.
const STATE_COUNTERS: &[&str] = &[
    "unwind_table_files",
    "unwind_table_rows",
    "unwind_table_row_capacity",
    "unwind_table_prepare_ns",
    "unwind_table_ready_ns",
];

pub struct RecordOptions {
    pub duration: Duration,
    pub interval: Duration,
    pub output: PathBuf,
    pub probes: ProbeConfig,
    pub state_name: String,
    pub threads_name: String,
    /// Stacks shown in the text summary.
    pub top: usize,
    /// The flamegraphs' root frames.
    pub group_by: crate::render::GroupBy,
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

/// Reads the code objects of the new walked stacks with Python frames the kernel announced,
/// while their processes live (`symbolize::python`).
fn read_python_stacks(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    codes: &mut crate::symbolize::python::CodeReader,
    processes: &mut ProcessCache,
    probes: &Probes,
) {
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<profiler_common::python::PyNewStack>() {
            continue;
        }
        // SAFETY: the kernel writes whole `PyNewStack`s; read unaligned from the ring.
        let event: profiler_common::python::PyNewStack =
            unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        if processes.get(event.tgid).is_none() {
            processes.observe(event.tgid, "");
        }
        let id = event.key as i32 | profiler_common::unwind::UNWOUND_STACK_BIT;
        if let (Some(process), Ok(Some(ips))) = (processes.get(event.tgid), probes.stack(id)) {
            codes.prefetch(process, &ips);
        }
    }
}

/// A capture whose probes are loaded and attached; `run` records it.
pub struct Prepared {
    options: RecordOptions,
    probes: Probes,
    new_tasks: EventRing,
    /// New walked stacks with Python frames (their code objects are read at once).
    python_stacks: Option<EventRing>,
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
    /// The off-CPU and on-CPU maps' values when the capture started counting, if it was
    /// attached before that (`count_from_now`).
    offcpu_base: HashMap<OffcpuKey, (u64, u64)>,
    oncpu_base: HashMap<OncpuKey, (u64, u64)>,
    /// The processes the previous window knew (`count_from_now`).
    processes_seed: Vec<crate::symbolize::procmaps::ProcessInfo>,
    /// What the kernel counters and the syscall maps held when the capture started counting
    /// (a window that follows another on the same maps, or was attached before it counted).
    counter_base: BTreeMap<String, u64>,
    syscall_base: SyscallBase,
    runq_base: HashMap<RunqKey, u64>,
    /// Why this window's end must load new programs, known at its start (a map that filled
    /// past what a window's churn may add).
    renew_next: Option<&'static str>,
    /// The window of the syscall maxima this capture reads (`Probes::start_syscall_window`).
    syscall_window: u64,
    /// Python code objects read so far (kept with the programs across windows).
    python_codes: crate::symbolize::python::CodeReader,
    /// Programs loaded for this capture: 0 when it kept the previous window's.
    programs_loaded: u64,
    /// When these programs were loaded (renewed after `RENEW_AFTER`).
    loaded_at: Instant,
    /// With the db family: what each established TCP socket had carried when the capture
    /// started (the coverage says what untimed connections carried since).
    socket_bytes: db::socket_bytes::SocketBytes,
}

impl Prepared {
    /// A daemon window loaded while the previous one still counts: from now on, what the
    /// maps gain is this capture's, what they held is the previous window's (which has just
    /// taken its final snapshot). Its clock, start time and query/TCP split start at that
    /// snapshot (`boundary`), so consecutive windows neither overlap nor leave a gap. It also
    /// starts from the processes the previous window knew (`known`).
    pub fn count_from_now(
        &mut self,
        known: &ProcessCache,
        boundary: Instant,
        boundary_unix_ms: u64,
    ) -> Result<()> {
        self.processes_seed = known.seed();
        self.counter_base = family_counters(&self.probes, &self.options.probes)?;
        if self.probes.offcpu_attached_with.is_some() {
            self.runq_base = self.probes.runqueue_histograms()?;
        }
        if self.probes.syscalls_slow_ns.is_some() {
            self.syscall_base =
                SyscallBase::new(self.probes.syscall_stats(0)?, self.probes.slow_syscalls()?);
        }
        if !self.probes.db_targets.is_empty() {
            self.socket_bytes = db::socket_bytes::established();
        }
        // Its clock starts where the previous window's ends (the start of its final snapshot),
        // so the two meet exactly.
        self.started = boundary;
        self.start_unix_ms = boundary_unix_ms;
        self.attach_ktime = ktime_ns().saturating_sub(boundary.elapsed().as_nanos() as u64);
        // What changes while the maps are read (milliseconds) is in neither window.
        if self.probes.offcpu_attached_with.is_some() {
            self.offcpu_base = self
                .probes
                .offcpu_totals()?
                .into_iter()
                .map(|(k, v)| (k, (v.total_ns, v.count)))
                .collect();
        }
        if self.probes.oncpu_frequency.is_some() {
            self.oncpu_base = self
                .probes
                .oncpu_counts()?
                .into_iter()
                .map(|(k, v)| (k, (v, v)))
                .collect();
        }
        Ok(())
    }

    pub fn output(&self) -> &Path {
        &self.options.output
    }

    /// Not recorded after all: detach (in the background) and remove its directory.
    pub fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.options.output);
        detach_in_background(self.probes);
    }
}

/// Runs when a capture's time is up, before it stops: the daemon says what its next window
/// records. The window keeps its programs for it when they fit (`renewal_reason`), else it
/// loads and attaches new ones before it stops, so no time goes unrecorded between windows.
pub type Handoff = Box<dyn FnOnce() -> Result<RecordOptions>>;

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
    let loaded_at = Instant::now();
    let mut probes = Probes::load(config)?;
    let programs_loaded = probes.programs_loaded();
    // The db family attaches last: its queries from here on are this capture's.
    let attach_ktime = ktime_ns();
    // SAFETY: the ring buffer owns its fd, which stays open as long as the AsyncFd holds it.
    let new_tasks =
        unsafe { AsyncFd::register_with_interest(probes.take_new_tasks()?, Interest::READABLE) }
            .map_err(|err| anyhow::anyhow!("cannot poll the new-task ring buffer: {err}"))?;
    let python_stacks = match probes.take_python_stacks()? {
        // SAFETY: as above.
        Some(ring) => Some(
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(
                |err| anyhow::anyhow!("cannot poll the Python stack ring buffer: {err}"),
            )?,
        ),
        None => None,
    };
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
    let started = probes.counting_since;
    let socket_bytes = match probes.db_targets.is_empty() {
        true => Default::default(),
        false => db::socket_bytes::established(),
    };
    // Wall-clock time of that same instant.
    let start_unix_ms = unix_ms().saturating_sub(started.elapsed().as_millis() as u64);
    Ok(Prepared {
        options,
        probes,
        new_tasks,
        python_stacks,
        tcp_events,
        db_events,
        cpu_at_start,
        attach_ktime,
        started,
        start_unix_ms,
        offcpu_base: HashMap::new(),
        oncpu_base: HashMap::new(),
        processes_seed: Vec::new(),
        socket_bytes,
        counter_base: BTreeMap::new(),
        syscall_base: SyscallBase::default(),
        runq_base: HashMap::new(),
        renew_next: None,
        syscall_window: 0,
        python_codes: Default::default(),
        programs_loaded,
        loaded_at,
    })
}

/// Why a daemon window loads new programs for the next one instead of keeping its own
/// (`None`: it keeps them). `counters` are the window's own (differences).
fn renewal_reason(
    now: &RecordOptions,
    next: &RecordOptions,
    loaded_at: Instant,
    counters: &BTreeMap<String, u64>,
    fill: &MapFill,
) -> Option<&'static str> {
    if format!("{:?}", now.probes) != format!("{:?}", next.probes) {
        return Some("settings");
    }
    if next
        .probes
        .pids
        .iter()
        .chain(&next.probes.tids)
        .any(|id| check_task_exists(*id, "process").is_err())
    {
        return Some("process_gone");
    }
    if loaded_at.elapsed() >= RENEW_AFTER {
        return Some("age");
    }
    // Exited threads' entries stay in kept maps: new ones start empty before they fill.
    if fill.offcpu * 2 >= u64::from(profiler_common::offcpu::TOTALS_MAX)
        || fill.oncpu * 2 >= u64::from(profiler_common::oncpu::COUNTS_MAX)
    {
        return Some("map_half_full");
    }
    // A stack map hashes stacks into buckets: past a quarter full, collisions lose stacks.
    if fill.stacks * 4 >= u64::from(next.probes.stack_storage_size) {
        return Some("stack_map_quarter_full");
    }
    if counters
        .iter()
        .any(|(name, value)| name.ends_with("_full") && *value > 0)
    {
        return Some("map_full");
    }
    None
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
            mut probes,
            mut new_tasks,
            mut python_stacks,
            mut tcp_events,
            mut db_events,
            cpu_at_start,
            started,
            start_unix_ms,
            attach_ktime,
            offcpu_base,
            oncpu_base,
            processes_seed,
            socket_bytes,
            counter_base,
            syscall_base,
            runq_base,
            renew_next,
            syscall_window,
            python_codes,
            programs_loaded,
            loaded_at,
        } = self;
        // Following a window that is still attached: what happened before we were is its.
        let from_ktime = if options.continues { attach_ktime } else { 0 };
        let config = &options.probes;
        let mut tcp = TcpAggregator::default();
        let mut db = DbAggregator::new(options.show_literals);
        let mut db_owners = DbOwners::new(&config.pids);
        let mut processes = ProcessCache::seeded(processes_seed);
        for pid in &config.pids {
            processes.observe(*pid, "");
        }

        let mut offcpu_series: Series<OffcpuKey> = Series::from_base(offcpu_base);
        let mut oncpu_series: Series<OncpuKey> = Series::from_base(oncpu_base);
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

        // Python code objects of the stacks walked so far, read while their processes live.
        let mut python_codes = python_codes;
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
                guard = async { python_stacks.as_mut().expect("checked").readable_mut().await }, if python_stacks.is_some() => {
                    let mut guard = guard.context("polling the Python stack ring buffer failed")?;
                    read_python_stacks(guard.get_inner_mut(), &mut python_codes, &mut processes, &probes);
                    guard.clear_ready();
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
        // What the daemon's next window records; it keeps these programs when they fit, else
        // new ones attach now, while these still count, and count from this one's final
        // snapshot (no overlap, no gap).
        let mut next: Option<Result<Prepared>> = None;
        let mut keep: Option<RecordOptions> = None;
        let mut renewed: Option<&'static str> = None;
        if let (Some(handoff), false) = (handoff, interrupted) {
            match handoff() {
                Ok(next_options) => {
                    let so_far = counters_since(&family_counters(&probes, config)?, &counter_base);
                    let fill = MapFill::of(&offcpu_series, &oncpu_series);
                    let reason = renew_next.or_else(|| {
                        renewal_reason(&options, &next_options, loaded_at, &so_far, &fill)
                    });
                    match reason {
                        None => keep = Some(next_options),
                        Some(reason) => {
                            renewed = Some(reason);
                            next = Some(prepare(next_options));
                        }
                    }
                }
                Err(err) => next = Some(Err(err)),
            }
        }
        // Kept programs: the syscall maxima of the next window start here; the maps are read
        // at once (this window's counts and maxima, the next one's base), so that a call
        // that ends from here on is in one window, counts and maximum alike.
        let next_syscall_window = match (&keep, probes.syscalls_slow_ns) {
            (Some(_), Some(_)) => probes.start_syscall_window()?,
            _ => syscall_window,
        };
        let syscall_maps = match probes.syscalls_slow_ns {
            Some(_) => Some((
                probes.syscall_stats(syscall_window)?,
                probes.slow_syscalls()?,
            )),
            None => None,
        };
        snapshot(
            &probes,
            &mut offcpu_series,
            &mut oncpu_series,
            &mut processes,
        )?;
        let cpu_at_boundary = process_cpu_ns();
        let runq_now = match probes.offcpu_attached_with {
            Some(_) => probes.runqueue_histograms()?,
            None => HashMap::new(),
        };
        // The next capture counts from this final snapshot on (its maps' values until now are
        // this capture's).
        let ends = if probes.offcpu_attached_with.is_some() {
            offcpu_series.ends.clone()
        } else if probes.oncpu_frequency.is_some() {
            oncpu_series.ends.clone()
        } else {
            // Families without snapshots: one interval, the whole capture.
            vec![started.elapsed().as_nanos() as u64]
        };
        // Where this window ends: the start of its final snapshot.
        let end_ns = ends.last().copied().unwrap_or_default();
        let boundary = started + Duration::from_nanos(end_ns);
        let boundary_unix_ms = start_unix_ms + (end_ns as f64 / 1e6).round() as u64;
        if let Some(Ok(following)) = next.as_mut()
            && let Err(err) = following.count_from_now(&processes, boundary, boundary_unix_ms)
        {
            next = Some(Err(err));
        }
        // Queries that started, and TCP events that happened, once new programs count are
        // their capture's. Kept programs share their rings: what is in them is this
        // window's, what comes later the next one's.
        let until_ktime = match &next {
            Some(Ok(next)) => next.attach_ktime,
            _ => u64::MAX,
        };
        drain_new_tasks(new_tasks.get_mut(), &mut processes, &probes);
        // Queries that started before new programs attached are this one's: give those
        // still running a moment to end, or the next window (which did not see them start)
        // and this one would both miss them. What is still running is counted. Kept
        // programs time them for the next window.
        let db_in_flight_at_end = match (probes.db_targets.is_empty(), &keep) {
            (true, _) | (false, Some(_)) => 0,
            (false, None) => {
                let grace = match &next {
                    Some(Ok(_)) => HANDOFF_QUERY_GRACE,
                    _ => Duration::ZERO,
                };
                let waited = tokio::time::Instant::now();
                loop {
                    let running = probes.db_in_flight((from_ktime, until_ktime))?;
                    if running == 0 || waited.elapsed() >= grace {
                        break running;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
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
        // The kernel's counters and syscall maps, read once: this window's values are their
        // differences from its base, and the next window on these programs starts from them.
        let raw_counters = family_counters(&probes, config)?;
        let mut counters = counters_since(&raw_counters, &counter_base);
        if !probes.db_targets.is_empty() {
            counters.insert("db_filtered_out".into(), db_owners.filtered_out);
            counters.insert("db_wire_undecoded".into(), db_owners.undecoded);
            counters.insert("db_wire_pipeline_cut".into(), db_owners.pipeline_cut);
            counters.insert("db_in_flight_at_end".into(), db_in_flight_at_end);
            counters.insert(
                "db_pg_extended".into(),
                u64::from(config.db.as_ref().is_some_and(|d| d.postgres_extended)),
            );
        }
        counters.insert("programs_loaded".into(), programs_loaded);
        if let Some(reason) = renewed {
            counters.insert(format!("programs_renewed_{reason}"), 1);
        }
        map_fill_counters(
            &mut counters,
            config,
            &probes,
            &MapFill::of(&offcpu_series, &oncpu_series),
        );
        let mut symbolizer = Symbolizer::new();
        symbolizer.python = python_codes;
        let mut builder = StackBuilder {
            probes: &probes,
            processes: &processes,
            symbolizer: &mut symbolizer,
            user_stacks_missing: 0,
        };
        let offcpu = match probes.offcpu_attached_with {
            Some(_) => Some(offcpu::profile(
                &offcpu_series,
                &mut builder,
                &db_owners.frames,
                config.offcpu_sample_every,
                runq_now
                    .iter()
                    .map(|(key, waits)| {
                        let before = runq_base.get(key).copied().unwrap_or(0);
                        (*key, waits.saturating_sub(before))
                    })
                    .collect(),
            )?),
            None => None,
        };
        let oncpu = match probes.oncpu_frequency {
            Some(frequency) => Some(oncpu::profile(frequency, &oncpu_series, &mut builder)?),
            None => None,
        };
        let syscalls = match (probes.syscalls_slow_ns, &syscall_maps) {
            (Some(slow_threshold_ns), Some((stats, slow))) => Some(syscalls::profile(
                syscall_base.stats_since(stats.clone()),
                syscall_base.slow_since(slow.clone()),
                slow_threshold_ns,
                &mut builder,
            )?),
            _ => None,
        };
        let tcp = probes.tcp.then(|| tcp.profile());
        let db = match probes.db_targets.is_empty() {
            true => None,
            false => Some(db::events::profile(
                &db,
                &mut builder,
                config.db_sample_every,
                &config.pids,
                &socket_bytes,
            )?),
        };
        // User threads' stacks shown as `[user stack …]` (kernel threads have none to lose).
        counters.insert(
            "stacks_without_user_stack".into(),
            builder.user_stacks_missing,
        );
        let attached_with = probes.offcpu_attached_with.unwrap_or("none");
        let stats = std::mem::take(&mut symbolizer.stats);
        let python_frames_named = symbolizer.python.frames - symbolizer.python.unreadable;
        let python_code_unreadable = symbolizer.python.unreadable;
        let python_frames_unplaced = symbolizer.python.unplaced;
        let next = match keep {
            // The next window counts on these programs from this one's final snapshot.
            Some(next_options) => {
                let mut python_codes = std::mem::take(&mut symbolizer.python);
                python_codes.frames = 0;
                python_codes.unreadable = 0;
                python_codes.unplaced = 0;
                let socket_bytes = match probes.db_targets.is_empty() {
                    true => Default::default(),
                    false => db::socket_bytes::established(),
                };
                let (stats, slow) = syscall_maps.unwrap_or_default();
                // Entries of exited processes stay in kept maps: past a quarter of the
                // syscall map at this boundary, the next window ends on new programs (their
                // first window's churn alone can fill it).
                let renew_next = (stats.len() as u64 * 4
                    >= u64::from(profiler_common::syscalls::STATS_MAX))
                .then_some("syscall_map_quarter_full");
                match prepare_output_dir(&next_options.output) {
                    Err(err) => {
                        if next_options.background_detach {
                            detach_in_background(probes);
                        }
                        Some(Err(err))
                    }
                    Ok(()) => Some(Ok(Prepared {
                        options: next_options,
                        probes,
                        new_tasks,
                        python_stacks,
                        tcp_events,
                        db_events,
                        cpu_at_start: cpu_at_boundary,
                        started: boundary,
                        // Every event in the shared rings from here on is the next window's.
                        attach_ktime: 0,
                        start_unix_ms: boundary_unix_ms,
                        offcpu_base: offcpu_series.cumulative(),
                        oncpu_base: oncpu_series.cumulative(),
                        processes_seed: processes.seed(),
                        socket_bytes,
                        counter_base: raw_counters,
                        syscall_base: SyscallBase::new(stats, slow),
                        runq_base: runq_now,
                        renew_next,
                        syscall_window: next_syscall_window,
                        python_codes,
                        programs_loaded: 0,
                        loaded_at,
                    })),
                }
            }
            None => {
                if options.background_detach {
                    detach_in_background(probes);
                } else {
                    drop(probes); // detach before the (slow) writing
                }
                next
            }
        };

        counters.insert(
            "profiler_cpu_ns".into(),
            process_cpu_ns().saturating_sub(cpu_at_start),
        );
        counters.insert("user_frames".into(), stats.user_addresses);
        counters.insert("kernel_frames".into(), stats.kernel_addresses);
        counters.insert("unresolved_user_frames".into(), stats.unresolved_user);
        counters.insert("unresolved_kernel_frames".into(), stats.unresolved_kernel);
        // Mapped files neither their path nor /proc/PID/map_files reached: their frames stay
        // unresolved.
        counters.insert("unreachable_files".into(), processes.unreachable_files);
        // Perf maps (names of JIT and interpreter code): read, refused, damaged.
        counters.insert("perf_map_frames".into(), stats.perf_map_frames);
        counters.insert("python_frames_named".into(), python_frames_named);
        counters.insert("python_code_unreadable".into(), python_code_unreadable);
        counters.insert("python_frames_unplaced".into(), python_frames_unplaced);
        let maps: Vec<_> = processes
            .iter()
            .filter_map(|p| p.perf_map.as_ref())
            .collect();
        counters.insert(
            "perf_maps".into(),
            maps.iter().filter(|m| !m.refused).count() as u64,
        );
        counters.insert(
            "perf_maps_refused".into(),
            maps.iter().filter(|m| m.refused).count() as u64,
        );
        counters.insert(
            "perf_maps_truncated".into(),
            maps.iter().filter(|m| m.truncated).count() as u64,
        );
        counters.insert(
            "perf_map_bad_lines".into(),
            maps.iter().map(|m| m.bad_lines).sum(),
        );

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
                    cgroup: info.and_then(|p| p.cgroup.clone()),
                    container_id: info
                        .and_then(|p| p.cgroup.as_deref())
                        .and_then(crate::probes::cgroup::container_id),
                    systemd_unit: info
                        .and_then(|p| p.cgroup.as_deref())
                        .and_then(crate::probes::cgroup::systemd_unit),
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
                cgroups: config.cgroups.iter().map(|c| c.path.clone()).collect(),
                min_block_ns: config.offcpu.as_ref().map(|o| o.min_block_ns).unwrap_or(0),
                max_block_ns: config.offcpu.as_ref().and_then(|o| o.max_block_ns),
                state: options.state_name.clone(),
                threads: options.threads_name.clone(),
            },
            attach: attached_with.to_string(),
            counters,
            offcpu_sample_every: config.offcpu_sample_every,
            db_sample_every: config.db_sample_every,
            unresolved_by_binary: stats.unresolved_by_binary(),
        });
        capture.processes = process_list;
        capture.offcpu = offcpu;
        capture.oncpu = oncpu;
        capture.syscalls = syscalls;
        capture.tcp = tcp;
        capture.db = db;
        write_outputs(
            &capture,
            &options.output,
            options.top,
            !options.quiet,
            options.group_by,
        )?;
        Ok((capture, next))
    }
}

/// The kernel-side counters of every family attached, named by family, as the kernel holds
/// them (since the programs were loaded).
fn family_counters(probes: &Probes, config: &ProbeConfig) -> Result<BTreeMap<String, u64>> {
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
    }
    Ok(counters)
}

/// `counters` since `base` (what they were when the capture started counting); the
/// `STATE_COUNTERS` as they are.
fn counters_since(
    counters: &BTreeMap<String, u64>,
    base: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    counters
        .iter()
        .map(|(name, value)| {
            let since = match STATE_COUNTERS.contains(&name.as_str()) {
                true => *value,
                false => value.saturating_sub(base.get(name).copied().unwrap_or(0)),
            };
            (name.clone(), since)
        })
        .collect()
}

/// How full the kernel's aggregation maps are, from the latest snapshot.
struct MapFill {
    offcpu: u64,
    oncpu: u64,
    /// Stacks the off-CPU and on-CPU entries name (in the frame-pointer stack map).
    stacks: u64,
}

impl MapFill {
    fn of(offcpu: &Series<OffcpuKey>, oncpu: &Series<OncpuKey>) -> Self {
        let stacks: std::collections::HashSet<i32> = offcpu
            .keys()
            .flat_map(|k| [k.kernel_stack_id, k.user_stack_id])
            .chain(
                oncpu
                    .keys()
                    .flat_map(|k| [k.kernel_stack_id, k.user_stack_id]),
            )
            .filter(|id| *id >= 0 && id & OVERFLOW_STACK_BIT == 0)
            .collect();
        Self {
            offcpu: offcpu.keys().count() as u64,
            oncpu: oncpu.keys().count() as u64,
            stacks: stacks.len() as u64,
        }
    }
}

/// How full the aggregation maps got (entries, capacity): a full map loses events.
fn map_fill_counters(
    counters: &mut BTreeMap<String, u64>,
    config: &ProbeConfig,
    probes: &Probes,
    fill: &MapFill,
) {
    if probes.offcpu_attached_with.is_some() {
        counters.insert("map_offcpu_entries".into(), fill.offcpu);
        counters.insert(
            "map_offcpu_capacity".into(),
            u64::from(profiler_common::offcpu::TOTALS_MAX),
        );
    }
    if probes.oncpu_frequency.is_some() {
        counters.insert("map_oncpu_entries".into(), fill.oncpu);
        counters.insert(
            "map_oncpu_capacity".into(),
            u64::from(profiler_common::oncpu::COUNTS_MAX),
        );
    }
    counters.insert("map_stacks_entries".into(), fill.stacks);
    counters.insert(
        "map_stacks_capacity".into(),
        u64::from(config.stack_storage_size),
    );
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
