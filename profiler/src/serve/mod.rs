//! `profiler daemon`: back-to-back recording windows written to a data directory (oldest
//! removed past `--keep`), and an HTTP server on 127.0.0.1 serving the latest window:
//! `/healthz`, `/captures`, `/metrics` (Prometheus text), `/flamegraph?kind=…`, `/profile`
//! (pprof, gzipped profile.proto), `/summary`.
//! SIGTERM or SIGINT ends the current window (written like any capture) and the daemon.
//!
//! The window loop runs on this thread's runtime and blocks it while a window is
//! symbolized and written; the HTTP server has a thread and runtime of its own, so it
//! answers meanwhile. Everything the daemon writes is private (umask 077, data directory
//! 0700).
//!
//! One file per seam: `config` (flags, config file, SIGHUP reload), `windows` (the data
//! directory and retention), `budget` (the CPU budget and its sampled modes), `events`
//! (regression verdicts per window), `http` (the endpoints) and `metrics` (Prometheus text).

mod budget;
mod config;
mod events;
mod http;
mod metrics;
mod page;
mod windows;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::DaemonArgs;
use crate::model::Capture;

use budget::Cost;
pub use config::{Settings, read_token, settings};
use config::{reload_settings, window_options};
use events::{Baseline, EVENTS_KEPT};
pub use http::capture_from_daemon;
use windows::{apply_retention, dirs_named};

/// What the HTTP side knows: the windows kept and the latest capture.
#[derive(Default)]
struct State {
    windows_total: u64,
    kept: Vec<PathBuf>,
    pub(crate) latest: Option<(PathBuf, Capture)>,
    regressions_total: u64,
    /// Windows still only teach the normal (`--learn`): no event yet.
    learning: bool,
    /// The latest regression events (at most `EVENTS_KEPT`), oldest first.
    events: Vec<serde_json::Value>,
    cost: Cost,
    cumulative: crate::render::prometheus::Cumulative,
    /// The running settings (what an on-demand capture records with).
    settings: Option<Settings>,
    /// An on-demand capture is running.
    capturing: bool,
    /// Windows that failed to run.
    window_errors_total: u64,
    /// What each exporter did, by its name.
    export: Vec<(&'static str, Arc<crate::export::ExportStats>)>,
    /// What the page shows of each kept window (windows left by an earlier run are read
    /// when the page is first asked for).
    digests: std::collections::HashMap<PathBuf, page::Digest>,
}

pub fn run(args: DaemonArgs) -> Result<()> {
    let settings = settings(&args)?;
    let address = config::listen_address(&settings)?;
    // Whatever we create (windows, diffs, captures) is for root's eyes only.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    prepare_data_dir(&settings.data_dir)?;
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("cannot listen on {address}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve_and_record(args, settings, listener))
}

/// The data directory, 0700 (an existing one is made private), without what an interrupted
/// run left half-written.
fn prepare_data_dir(data_dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    crate::render::outputs::create_private_dir(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let mode = std::fs::metadata(data_dir)
        .with_context(|| format!("cannot read data directory {}", data_dir.display()))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", data_dir.display()))?;
        eprintln!(
            "profiler daemon: data directory {} was mode {mode:o}; now 700",
            data_dir.display()
        );
    }
    let removed = windows::remove_leftovers(data_dir, false);
    if removed > 0 {
        eprintln!(
            "profiler daemon: removed {removed} half-written window(s) or capture(s) left by an \
             earlier run"
        );
    }
    Ok(())
}

async fn serve_and_record(
    daemon_args: DaemonArgs,
    mut args: Settings,
    listener: std::net::TcpListener,
) -> Result<()> {
    eprintln!(
        "profiler daemon: {} windows into {}, keeping {}; HTTP on http://{}",
        humantime(args.window),
        args.data_dir.display(),
        args.keep,
        listener.local_addr()?
    );
    let state = Arc::new(Mutex::new(State::default()));
    http::start(
        listener,
        Arc::clone(&state),
        http::HttpOptions {
            allow_capture_get: args.allow_capture_get,
            capture_token: args.capture_token.clone(),
        },
    )?;

    let mut exporters = Vec::new();
    for (sink, endpoint) in [
        (crate::export::PYROSCOPE, &args.pyroscope),
        (args.otlp_protocol.sink(), &args.otlp),
    ] {
        if let Some(endpoint) = endpoint {
            let exporter = crate::export::Exporter::start(sink, endpoint.clone())?;
            eprintln!(
                "profiler daemon: pushing every window to {} ({})",
                exporter.url(),
                exporter.name()
            );
            state
                .lock()
                .expect("state lock")
                .export
                .push((exporter.name(), Arc::clone(&exporter.stats)));
            exporters.push(exporter);
        }
    }
    let mut signals = Signals::new()?;
    let mut reload = false;
    let mut baseline = match &args.baseline {
        Some(path) => Baseline::new(Some(&Capture::load(path)?), args.learn),
        None => Baseline::new(None, args.learn),
    };
    state.lock().expect("state lock").learning = baseline.learning();
    if baseline.learning() {
        eprintln!(
            "profiler daemon: learning this host's normal for {} before any regression event \
             (--learn)",
            humantime(args.learn)
        );
    }
    // Windows left by an earlier run (a restart) count for retention too.
    state.lock().expect("state lock").kept = dirs_named(&args.data_dir, "window-");
    let mut next: Option<Result<crate::collect::Prepared>> = None;
    let mut mark = Mark::now();
    let mut last_error: Option<String> = None;
    let mut stop = false;
    let mut cost = Cost::with_budget(args.max_cpu);
    while !stop {
        if cost.skip_left > 0 {
            // Duty-cycled: this window is not recorded.
            if let Some(Ok(unused)) = next.take() {
                unused.discard();
            }
            signals.sleep(args.window, &mut stop, &mut reload).await;
            cost.skip_left -= 1;
            let (cpu_ns, wall) = mark.lap();
            cost.account(cpu_ns, 0, wall);
            if cost.skip_left == 0
                && let Some(line) = cost.finish_period()
            {
                eprintln!("{line}");
            }
            state.lock().expect("state lock").cost = cost.clone();
            if reload {
                reload = false;
                reload_settings(&daemon_args, &mut args, &mut cost);
            }
            continue;
        }
        state.lock().expect("state lock").settings = Some(args.clone());
        // The window loaded by the previous one's handoff, else a new one.
        let prepared = match next.take() {
            Some(prepared) => prepared,
            None => window_options(&args, &cost).and_then(crate::collect::prepare),
        };
        let (dir, result) = match prepared {
            Ok(prepared) => {
                let dir = prepared.output().to_path_buf();
                // On time, the window hands over to the next one before it stops (no gap
                // between them): its programs go on counting for it, or new ones attach when
                // the settings changed or the maps filled — unless the budget skips the next
                // window.
                let handoff: Option<crate::collect::Handoff> = (cost.duty() == 1).then(|| {
                    let (args, cost) = (args.clone(), cost.clone());
                    Box::new(move || {
                        window_options(&args, &cost).map(|mut options| {
                            options.continues = true;
                            options
                        })
                    }) as crate::collect::Handoff
                });
                // The window ends early on SIGTERM/SIGINT too (and is written): both
                // listeners see the signal.
                let window = prepared.run(handoff);
                tokio::pin!(window);
                let result = loop {
                    tokio::select! {
                        biased;
                        _ = signals.term.recv() => stop = true,
                        _ = signals.int.recv() => stop = true,
                        _ = signals.hup.recv() => reload = true,
                        result = &mut window => break result,
                    }
                };
                // A signal that came while the window was symbolized and written (one
                // uninterrupted poll) is still pending: seen now, it stops the daemon
                // before another window starts (that window would not see it).
                signals.pending(&mut stop, &mut reload).await;
                // Complete: from its staging name to its own.
                let published = windows::published_path(&dir);
                match result.and_then(|(capture, following)| {
                    next = following;
                    windows::publish(&dir, &published)?;
                    Ok(capture)
                }) {
                    Ok(capture) => (published, Ok(capture)),
                    Err(err) => (dir, Err(err)),
                }
            }
            Err(err) => (PathBuf::new(), Err(err)),
        };
        let capture = match result {
            Ok(capture) => {
                last_error = None;
                capture
            }
            Err(err) => {
                // A window that cannot run (the -p process exited, a library went away)
                // does not end the daemon: say why once, count it, try again shortly.
                let message = format!("{err:#}");
                if last_error.as_deref() != Some(message.as_str()) {
                    eprintln!("profiler daemon: window failed (retrying): {message}");
                }
                last_error = Some(message);
                state.lock().expect("state lock").window_errors_total += 1;
                if !dir.as_os_str().is_empty() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                // A window loaded by the handoff before this one failed to write (a full
                // disk) left its staging directory too; an on-demand capture's stays.
                windows::remove_leftovers(&args.data_dir, true);
                if let Some(Ok(unused)) = next.take() {
                    unused.discard();
                }
                if !stop {
                    let pause = args.window.min(Duration::from_secs(5));
                    signals.sleep(pause, &mut stop, &mut reload).await;
                }
                if reload {
                    reload = false;
                    reload_settings(&daemon_args, &mut args, &mut cost);
                }
                continue;
            }
        };
        for exporter in &exporters {
            exporter.push(&capture);
        }
        let was_learning = baseline.learning();
        let event = baseline.judge(&capture, &dir);
        if was_learning && !baseline.learning() {
            eprintln!(
                "profiler daemon: learned from {} windows; regression events from the next one",
                baseline.learned()
            );
        }
        let mut state = state.lock().expect("state lock");
        state.learning = baseline.learning();
        if let Some(event) = event {
            // One JSON line per event, for log shippers.
            eprintln!("{event}");
            state.regressions_total += 1;
            state.events.push(event);
            if state.events.len() > EVENTS_KEPT {
                state.events.remove(0);
            }
        }
        state.windows_total += 1;
        state.kept.push(dir.clone());
        apply_retention(&mut state.kept, &args);
        state
            .digests
            .insert(dir.clone(), page::Digest::of(&capture));
        let kept: std::collections::HashSet<PathBuf> = state.kept.iter().cloned().collect();
        state.digests.retain(|dir, _| kept.contains(dir));
        // The cycle's cost: our CPU since the previous window was done (recording, loading
        // the next window, writing, comparing, detaching) and our programs' run time, per
        // second of wall time.
        let (userspace_ns, wall) = mark.lap();
        let ebpf_ns = capture
            .metadata
            .counters
            .get("bpf_run_ns")
            .copied()
            .unwrap_or(0);
        cost.account(userspace_ns, ebpf_ns, wall);
        cost.gap_s = (wall - capture.metadata.duration_ns as f64 / 1e9).max(0.0);
        cost.skip_left = cost.duty() - 1;
        if cost.skip_left == 0
            && let Some(line) = cost.finish_period()
        {
            eprintln!("{line}");
        }
        cost.oncpu_hz = capture.oncpu.as_ref().map(|o| o.frequency_hz);
        state.cost = cost.clone();
        state.cumulative.add(&capture);
        state.latest = Some((dir, capture));
        drop(state);
        // A window's symbolization and aggregation leave freed heap behind; hand it back so
        // the resident size stays that of one window.
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free memory.
        unsafe {
            libc::malloc_trim(0);
        }
        if reload {
            reload = false;
            reload_settings(&daemon_args, &mut args, &mut cost);
        }
    }
    if let Some(Ok(unused)) = next.take() {
        unused.discard();
    }
    crate::collect::wait_for_detach();
    for exporter in exporters {
        exporter.finish(Duration::from_secs(5));
    }
    eprintln!("profiler daemon: stopped; probes detached");
    Ok(())
}

/// The signals the daemon obeys: SIGTERM/SIGINT stop it, SIGHUP reloads its config.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    /// Takes the signals already delivered, without waiting.
    async fn pending(&mut self, stop: &mut bool, reload: &mut bool) {
        // One of each kind at most.
        for _ in 0..3 {
            tokio::select! {
                biased;
                _ = self.term.recv() => *stop = true,
                _ = self.int.recv() => *stop = true,
                _ = self.hup.recv() => *reload = true,
                _ = std::future::ready(()) => return,
            }
        }
    }

    /// Sleeps `duration`, or until a signal: SIGTERM/SIGINT set `stop`, SIGHUP `reload`.
    async fn sleep(&mut self, duration: Duration, stop: &mut bool, reload: &mut bool) {
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = self.term.recv() => *stop = true,
            _ = self.int.recv() => *stop = true,
            _ = self.hup.recv() => *reload = true,
        }
    }
}

/// CPU time and wall time since the last lap.
struct Mark {
    at: std::time::Instant,
    cpu_ns: u64,
}

impl Mark {
    fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            cpu_ns: crate::collect::process_cpu_ns(),
        }
    }

    /// (CPU ns, wall s) since the last lap; starts the next.
    fn lap(&mut self) -> (u64, f64) {
        let now = Self::now();
        let lap = (
            now.cpu_ns.saturating_sub(self.cpu_ns),
            (now.at - self.at).as_secs_f64().max(1e-3),
        );
        *self = now;
        lap
    }
}

fn humantime(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
