//! `profiler daemon`: back-to-back recording windows written to a data directory (oldest
//! removed past `--keep`), and a small HTTP server on 127.0.0.1 serving the latest window:
//! `/healthz`, `/captures`, `/metrics` (Prometheus text), `/flamegraph?kind=…`, `/profile`
//! (pprof, gzipped profile.proto), `/summary`.
//! SIGTERM or SIGINT ends the current window (written like any capture) and the daemon.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::DaemonArgs;

use crate::model::Capture;
use crate::render::prometheus::label;

/// What the HTTP side knows: the windows kept and the latest capture.
#[derive(Default)]
struct State {
    windows_total: u64,
    kept: Vec<PathBuf>,
    latest: Option<(PathBuf, Capture)>,
    regressions_total: u64,
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
}

/// Longest on-demand capture.
const CAPTURE_MAX_S: u64 = 600;
/// On-demand captures kept in the data directory.
const CAPTURES_KEPT: usize = 5;

/// `/capture?seconds=N[&pid=P]…`: records N seconds with the daemon's record options (the
/// pids, when given, replace its -p filter) into `DATA_DIR/capture-<unix ms>/` and answers
/// with the capture (JSON). One at a time; it runs alongside the windows.
async fn on_demand_capture(
    query: &str,
    state: &Mutex<State>,
) -> (&'static str, &'static str, Vec<u8>) {
    let mut seconds = 30u64;
    let mut pids = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        match (key, value.parse::<u64>()) {
            ("seconds", Ok(n)) if (1..=CAPTURE_MAX_S).contains(&n) => seconds = n,
            ("pid", Ok(n)) if n > 0 && n <= u64::from(u32::MAX) => pids.push(n.to_string()),
            _ => {
                return bad_request(format!(
                    "bad parameter {kv:?}: seconds=1..{CAPTURE_MAX_S}, pid=PID (repeatable)\n"
                ));
            }
        }
    }
    let settings = {
        let mut state = state.lock().expect("state lock");
        if state.capturing {
            return (
                "429 Too Many Requests",
                "text/plain",
                b"an on-demand capture is already running\n".to_vec(),
            );
        }
        let Some(settings) = state.settings.clone() else {
            return unavailable();
        };
        state.capturing = true;
        settings
    };
    let dir = settings
        .data_dir
        .join(format!("capture-{}", crate::record::unix_ms()));
    let mut record_args = Vec::new();
    let mut args = settings.record_args.iter();
    while let Some(arg) = args.next() {
        if !pids.is_empty() && (arg == "-p" || arg == "--pid") {
            args.next(); // replaced by the request's pids
        } else if !pids.is_empty() && (arg.starts_with("--pid=") || arg.starts_with("-p")) {
            // --pid=N, -pN
        } else {
            record_args.push(arg.clone());
        }
    }
    for pid in &pids {
        record_args.extend(["-p".to_string(), pid.clone()]);
    }
    let window = Settings {
        window: Duration::from_secs(seconds),
        record_args,
        ..settings.clone()
    };
    let result = match record_options(&window, &dir) {
        Ok(mut options) => {
            options.quiet = true;
            options.probes.measure_overhead = true;
            // Its own runtime on its own thread: the windows go on meanwhile.
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(crate::record::record(options)));
                let _ = tx.send(result);
            });
            rx.await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the capture thread died")))
        }
        Err(err) => Err(err),
    };
    state.lock().expect("state lock").capturing = false;
    prune_captures(&settings.data_dir);
    match result {
        Ok(capture) => (
            "200 OK",
            "application/json",
            serde_json::to_vec(&capture).unwrap_or_default(),
        ),
        Err(err) => (
            "500 Internal Server Error",
            "text/plain",
            format!("capture failed: {err:#}\n").into_bytes(),
        ),
    }
}

/// The directories under `data_dir` named `PREFIX<unix ms>`, oldest first.
fn dirs_named(data_dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Keeps the newest `CAPTURES_KEPT` on-demand captures.
fn prune_captures(data_dir: &Path) {
    let mut captures = dirs_named(data_dir, "capture-");
    while captures.len() > CAPTURES_KEPT {
        let _ = std::fs::remove_dir_all(captures.remove(0));
    }
}

/// A window kept on disk, by its directory name (`window-1795890779754`) or its unix ms.
fn kept_window(state: &State, name: &str) -> Option<PathBuf> {
    state
        .kept
        .iter()
        .find(|dir| {
            dir.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == name || n.strip_prefix("window-") == Some(name))
        })
        .cloned()
}

fn no_such_window(name: &str) -> (&'static str, &'static str, Vec<u8>) {
    (
        "404 Not Found",
        "text/plain",
        format!("no window {name:?} kept (see /captures)\n").into_bytes(),
    )
}

fn bad_request(text: String) -> (&'static str, &'static str, Vec<u8>) {
    ("400 Bad Request", "text/plain", text.into_bytes())
}

fn unavailable() -> (&'static str, &'static str, Vec<u8>) {
    (
        "503 Service Unavailable",
        "text/plain",
        b"no window yet\n".to_vec(),
    )
}

/// `profiler record --from-daemon ADDR`: asks the running daemon for an on-demand capture
/// and writes it (and its views) to the output directory like a local recording.
pub fn capture_from_daemon(
    address: &str,
    seconds: u64,
    pids: &[u32],
    output: &Path,
    top: usize,
) -> Result<()> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("cannot reach the daemon at {address}"))?;
    let mut target = format!("/capture?seconds={seconds}");
    for pid in pids {
        let _ = write!(target, "&pid={pid}");
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(seconds + 120)))
        .context("socket timeout")?;
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("cannot send the request to {address}"))?;
    eprintln!("asked the daemon at {address} for a {seconds} s capture");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("no answer from the daemon at {address}"))?;
    let at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{address} did not answer with HTTP"))?;
    let head = String::from_utf8_lossy(&response[..at]).into_owned();
    let body = &response[at + 4..];
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!(
            "the daemon refused: {} ({})",
            String::from_utf8_lossy(body).trim(),
            status
        );
    }
    let capture = Capture::from_slice(body).context("the daemon's answer")?;
    std::fs::create_dir_all(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    crate::record::write_outputs(&capture, output, top, true)
}

/// What the daemon costs and the mode its CPU budget put it in.
#[derive(Debug, Default, Clone)]
struct Cost {
    /// 0: full mode; 1..=SAMPLE_LEVELS: one off-CPU block and one query in `2^level`, the
    /// on-CPU frequency divided as much; beyond: also one window in `2^(level - 6)`.
    level: u32,
    oncpu_hz: Option<u64>,
    budget: Option<f64>,
    /// The last window's cost as a fraction of one CPU: userspace, eBPF programs.
    userspace: f64,
    ebpf: f64,
    /// Totals since the start.
    userspace_ns: u64,
    ebpf_ns: u64,
    /// Wall time of the last cycle not covered by its window (loading, attaching).
    gap_s: f64,
    /// Even the sparsest sampling did not bring the cost under the budget.
    over_budget: bool,
    /// Windows still to skip in this duty period (levels past `SAMPLE_LEVELS`).
    skip_left: u32,
    /// This duty period so far: CPU, eBPF run time, wall time.
    period_cpu_ns: u64,
    period_ebpf_ns: u64,
    period_wall_s: f64,
}

/// Levels 1..=6 sample events (one in 2 … 64); past that every program still runs per event
/// (a uprobe trap, a context switch), so whole windows are skipped: one recorded in
/// 2^(level - 6), up to one in 64.
const SAMPLE_LEVELS: u32 = 6;
const MAX_LEVEL: u32 = 12;

impl Cost {
    /// Next level from the last duty period's cost: over the budget, up enough steps to
    /// halve the cost each (at most three at once); under a third of it, back as many steps
    /// as it could double (one to three).
    fn adjust(&mut self) {
        let Some(budget) = self.budget else {
            self.level = 0;
            return;
        };
        let cost = self.userspace + self.ebpf;
        if cost > budget {
            let steps = ((cost / budget).log2().ceil() as u32).clamp(1, 3);
            self.over_budget = self.level == MAX_LEVEL;
            self.level = (self.level + steps).min(MAX_LEVEL);
        } else {
            self.over_budget = false;
            if cost < budget / 3.0 && self.level > 0 {
                // Far under the budget, back faster (each step about doubles the cost).
                let steps = (((budget / cost.max(1e-9)).log2().floor() as u32).saturating_sub(1))
                    .clamp(1, 3);
                self.level = self.level.saturating_sub(steps);
            }
        }
    }

    /// One window recorded in this many.
    fn duty(&self) -> u32 {
        1 << self.level.saturating_sub(SAMPLE_LEVELS)
    }

    fn sample_every(&self) -> u32 {
        1 << self.level.min(SAMPLE_LEVELS)
    }

    /// Adds a cycle (a recorded or skipped window) to the duty period.
    fn account(&mut self, cpu_ns: u64, ebpf_ns: u64, wall_s: f64) {
        self.userspace_ns += cpu_ns;
        self.ebpf_ns += ebpf_ns;
        self.period_cpu_ns += cpu_ns;
        self.period_ebpf_ns += ebpf_ns;
        self.period_wall_s += wall_s;
    }

    /// The end of a duty period: its cost decides the next level.
    fn finish_period(&mut self) -> Option<String> {
        let wall = self.period_wall_s.max(1e-3);
        self.userspace = self.period_cpu_ns as f64 / 1e9 / wall;
        self.ebpf = self.period_ebpf_ns as f64 / 1e9 / wall;
        self.period_cpu_ns = 0;
        self.period_ebpf_ns = 0;
        self.period_wall_s = 0.0;
        let level = self.level;
        self.adjust();
        (self.level != level).then(|| {
            format!(
                "profiler daemon: cost {:.2} % of a CPU (budget {:.2} %): {}",
                (self.userspace + self.ebpf) * 100.0,
                self.budget.unwrap_or(0.0) * 100.0,
                self.mode_description()
            )
        })
    }

    fn mode_description(&self) -> String {
        match (self.sample_every(), self.duty()) {
            (1, _) => "full mode".to_string(),
            (every, 1) => format!("sampled mode, 1 in {every} events"),
            (every, duty) => format!("sampled mode, 1 in {every} events, 1 window in {duty}"),
        }
    }

    fn apply(&self, options: &mut crate::record::RecordOptions) {
        let every = self.sample_every();
        options.probes.offcpu_sample_every = every;
        options.probes.db_sample_every = every;
        if let Some(oncpu) = options.probes.oncpu.as_mut() {
            oncpu.frequency = (oncpu.frequency >> self.level.min(SAMPLE_LEVELS)).max(1);
        }
    }
}

const EVENTS_KEPT: usize = 100;

/// Compares a finished window with the baseline; a significant regression becomes an event
/// (and the window's directory gets the differential flamegraph and reports).
fn regression_event(baseline: &Capture, window: &Capture, dir: &Path) -> Option<serde_json::Value> {
    use crate::compare::{Profile, Thresholds, compare};
    let base = Profile::from_capture(baseline, "baseline".into());
    let new = Profile::from_capture(window, dir.display().to_string());
    let report = compare(&base, &new, &Thresholds::default()).ok()?;
    if !report.regression {
        return None;
    }
    let diff_dir = dir.join("diff");
    let _ = crate::compare::report::write_all(&report, &diff_dir, 10);
    let names: Vec<String> = report
        .regressions
        .iter()
        .take(5)
        .map(|c| c.name.clone())
        .chain(
            report
                .query_regressions
                .iter()
                .take(5)
                .map(|q| q.fingerprint.clone()),
        )
        .collect();
    Some(serde_json::json!({
        "event": "regression",
        "window": dir.display().to_string(),
        "unix_ms": window.metadata.start_unix_ms,
        "regressions": names,
        "diff_svg": diff_dir.join("diff.svg").display().to_string(),
        "flamegraph_url": "/flamegraph?kind=diff",
    }))
}

/// The daemon's settings: flags, else the config file, else the defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub window: Duration,
    pub keep: usize,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub listen: String,
    pub baseline: Option<PathBuf>,
    /// Fraction of one CPU.
    pub max_cpu: Option<f64>,
    pub record_args: Vec<String>,
}

/// The config file: every key is also a flag.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    window: Option<String>,
    keep: Option<usize>,
    max_age: Option<String>,
    max_bytes: Option<u64>,
    listen: Option<String>,
    baseline: Option<PathBuf>,
    max_cpu: Option<String>,
    record: Option<Vec<String>>,
}

pub fn settings(args: &DaemonArgs) -> Result<Settings> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            toml::from_str::<FileConfig>(&text).map_err(|err| {
                anyhow::anyhow!(
                    "bad config {}: {}",
                    path.display(),
                    err.to_string().lines().next().unwrap_or_default()
                )
            })?
        }
        None => FileConfig::default(),
    };
    let duration = |flag: Option<Duration>, text: Option<&String>, name: &str| {
        flag.map(Ok)
            .or_else(|| {
                text.map(|t| {
                    crate::cli::parse_duration_text(t)
                        .map_err(|e| anyhow::anyhow!("config {name}: {e}"))
                })
            })
            .transpose()
    };
    let settings = Settings {
        data_dir: args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/profiler")),
        window: duration(args.window, file.window.as_ref(), "window")?
            .unwrap_or(Duration::from_secs(60)),
        keep: args.keep.or(file.keep).unwrap_or(60),
        max_age: duration(args.max_age, file.max_age.as_ref(), "max_age")?,
        max_bytes: args.max_bytes.or(file.max_bytes),
        listen: args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:9464".into()),
        baseline: args.baseline.clone().or(file.baseline),
        max_cpu: match (args.max_cpu, &file.max_cpu) {
            (Some(flag), _) => Some(flag),
            (None, Some(text)) => Some(
                crate::cli::parse_percent(text)
                    .map_err(|e| anyhow::anyhow!("config max_cpu: {e}"))?,
            ),
            (None, None) => None,
        },
        record_args: if args.record_args.is_empty() {
            file.record.unwrap_or_default()
        } else {
            args.record_args.clone()
        },
    };
    if settings.window.is_zero() {
        bail!("--window must be more than zero");
    }
    if settings.keep == 0 {
        bail!("--keep must be at least 1");
    }
    // Validate the recording options before anything is served.
    record_options(&settings, &settings.data_dir.join("check"))?;
    Ok(settings)
}

pub fn run(args: DaemonArgs) -> Result<()> {
    let settings = settings(&args)?;
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            settings.data_dir.display()
        )
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve_and_record(args, settings))
}

/// Bytes under a directory.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Removes the oldest windows past the count, age and size limits (the newest stays).
fn apply_retention(kept: &mut Vec<PathBuf>, settings: &Settings) {
    loop {
        if kept.len() <= 1 {
            return;
        }
        let too_many = kept.len() > settings.keep;
        let too_old = settings.max_age.is_some_and(|max| {
            std::fs::metadata(&kept[0])
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max)
        });
        let too_big = settings
            .max_bytes
            .is_some_and(|max| kept.iter().map(|d| dir_bytes(d)).sum::<u64>() > max);
        if !(too_many || too_old || too_big) {
            return;
        }
        let old = kept.remove(0);
        let _ = std::fs::remove_dir_all(&old);
    }
}

/// The `record` options of one window, from the daemon's trailing record arguments.
fn record_options(args: &Settings, dir: &Path) -> Result<crate::record::RecordOptions> {
    let window = format!("{}ms", args.window.as_millis());
    let mut argv: Vec<String> = ["profiler", "record", "--duration", &window, "-o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(dir.display().to_string());
    argv.extend(args.record_args.iter().cloned());
    let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(&argv)
        .map_err(|err| anyhow::anyhow!("bad record options after --: {}", first_line(&err)))?;
    match cli.command {
        crate::cli::Command::Record(record) => record.into_options(),
        _ => unreachable!("parsed as record"),
    }
}

fn first_line(err: &clap::Error) -> String {
    err.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

async fn serve_and_record(daemon_args: DaemonArgs, mut args: Settings) -> Result<()> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "profiler daemon: {} windows into {}, keeping {}; HTTP on http://{}",
        humantime(args.window),
        args.data_dir.display(),
        args.keep,
        listener.local_addr()?
    );
    let state = Arc::new(Mutex::new(State::default()));
    let server_state = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let state = Arc::clone(&server_state);
            tokio::spawn(async move {
                let mut request = vec![0u8; 8192];
                let n = stream.read(&mut request).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&request[..n]).into_owned();
                let target = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, content_type, body) = match target.split_once('?') {
                    Some(("/capture", query)) => on_demand_capture(query, &state).await,
                    None if target == "/capture" => on_demand_capture("", &state).await,
                    _ => respond(&target, &state),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
        }
    });

    let mut signals = Signals::new()?;
    let mut reload = false;
    let baseline = match &args.baseline {
        Some(path) => Some(Capture::load(path)?),
        None => None,
    };
    // Windows left by an earlier run (a restart) count for retention too.
    state.lock().expect("state lock").kept = dirs_named(&args.data_dir, "window-");
    let mut previous: Option<Capture> = None;
    let mut next: Option<Result<crate::record::Prepared>> = None;
    let mut mark = Mark::now();
    let mut last_error: Option<String> = None;
    let mut stop = false;
    let mut cost = Cost {
        budget: args.max_cpu,
        ..Cost::default()
    };
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
            None => window_options(&args, &cost).and_then(crate::record::prepare),
        };
        let (dir, result) = match prepared {
            Ok(prepared) => {
                let dir = prepared.output().to_path_buf();
                // On time, the window loads the next one before it stops (no gap between
                // them) — unless the budget skips the next window.
                let handoff: Option<crate::record::Handoff> = (cost.duty() == 1).then(|| {
                    let (args, cost) = (args.clone(), cost.clone());
                    Box::new(move || {
                        window_options(&args, &cost).and_then(|mut options| {
                            options.continues = true;
                            crate::record::prepare(options)
                        })
                    }) as crate::record::Handoff
                });
                // The window ends early on SIGTERM/SIGINT too (and is written): both
                // listeners see the signal.
                let window = prepared.run(handoff);
                tokio::pin!(window);
                let result = loop {
                    tokio::select! {
                        result = &mut window => break result,
                        _ = signals.term.recv() => stop = true,
                        _ = signals.int.recv() => stop = true,
                        _ = signals.hup.recv() => reload = true,
                    }
                };
                match result {
                    Ok((capture, following)) => {
                        next = following;
                        (dir, Ok(capture))
                    }
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
        let baseline_capture = match &baseline {
            Some(pinned) => Some(pinned),
            None => previous.as_ref(),
        };
        let event = baseline_capture.and_then(|b| regression_event(b, &capture, &dir));
        let mut state = state.lock().expect("state lock");
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
        previous = Some(capture.clone());
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
    crate::record::wait_for_detach();
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
    fn new() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
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
            cpu_ns: crate::record::process_cpu_ns(),
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

/// A window's record options: its directory, quiet, self-measuring, the budget's mode.
fn window_options(args: &Settings, cost: &Cost) -> Result<crate::record::RecordOptions> {
    let dir = args
        .data_dir
        .join(format!("window-{}", crate::record::unix_ms()));
    let mut options = record_options(args, &dir)?;
    options.quiet = true;
    options.probes.measure_overhead = true;
    options.probes.exclude_self = true;
    options.background_detach = true;
    cost.apply(&mut options);
    Ok(options)
}

/// SIGHUP: the config file again (a bad edit keeps the running settings; `listen` stays).
fn reload_settings(daemon_args: &DaemonArgs, args: &mut Settings, cost: &mut Cost) {
    match settings(daemon_args) {
        Ok(new) => {
            eprintln!("profiler daemon: configuration reloaded");
            let listen = std::mem::take(&mut args.listen);
            *args = Settings { listen, ..new };
            if cost.budget != args.max_cpu {
                // A new budget: the next window is recorded and judged against it.
                cost.budget = args.max_cpu;
                cost.skip_left = 0;
            }
        }
        Err(err) => eprintln!("profiler daemon: reload refused: {err:#}"),
    }
}

fn humantime(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn respond(target: &str, state: &Mutex<State>) -> (&'static str, &'static str, Vec<u8>) {
    let state = state.lock().expect("state lock");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    let text = |s: String| ("200 OK", "text/plain; charset=utf-8", s.into_bytes());
    match path {
        "/healthz" => text("ok\n".into()),
        "/events" => (
            "200 OK",
            "application/json",
            serde_json::to_vec(&state.events).unwrap_or_default(),
        ),
        "/captures" => {
            let list: Vec<String> = state.kept.iter().map(|p| p.display().to_string()).collect();
            (
                "200 OK",
                "application/json",
                serde_json::to_vec(&list).unwrap_or_default(),
            )
        }
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics(&state).into_bytes(),
        ),
        "/profile" => {
            let capture = match param("window") {
                // An older window: its capture from disk.
                Some(name) => match kept_window(&state, &name)
                    .map(|dir| Capture::load(&dir.join(crate::model::CAPTURE_FILE)))
                {
                    Some(Ok(capture)) => capture,
                    _ => return no_such_window(&name),
                },
                None => match &state.latest {
                    Some((_, capture)) => capture.clone(),
                    None => return unavailable(),
                },
            };
            match crate::render::pprof::gzipped(&capture) {
                Ok(body) => ("200 OK", "application/octet-stream", body),
                Err(err) => (
                    "500 Internal Server Error",
                    "text/plain",
                    format!("{err:#}\n").into_bytes(),
                ),
            }
        }
        "/summary" | "/flamegraph" => {
            let dir = match (param("window"), &state.latest) {
                (Some(name), _) => match kept_window(&state, &name) {
                    Some(dir) => dir,
                    None => return no_such_window(&name),
                },
                (None, Some((dir, _))) => dir.clone(),
                (None, None) => return unavailable(),
            };
            let file = if path == "/summary" {
                "summary.txt".to_string()
            } else {
                let kind = param("kind").unwrap_or_else(|| "offcpu".into());
                if kind == "diff" {
                    // The latest window's comparison with the baseline, when it regressed.
                    "diff/diff.svg".to_string()
                } else if matches!(kind.as_str(), "offcpu" | "oncpu" | "wallclock" | "db") {
                    format!("{kind}.svg")
                } else {
                    return (
                        "400 Bad Request",
                        "text/plain",
                        b"kind: offcpu, oncpu, wallclock, db or diff\n".to_vec(),
                    );
                }
            };
            match std::fs::read(dir.join(&file)) {
                Ok(body) if file.ends_with(".svg") => ("200 OK", "image/svg+xml", body),
                Ok(body) => ("200 OK", "text/plain; charset=utf-8", body),
                Err(_) => (
                    "404 Not Found",
                    "text/plain",
                    format!("no {file} in {}\n", dir.display()).into_bytes(),
                ),
            }
        }
        _ => (
            "404 Not Found",
            "text/plain",
            b"try /healthz /metrics /captures /flamegraph /profile /summary\n".to_vec(),
        ),
    }
}

/// Prometheus text format from the latest window (bounded: the 50 largest series per family).
fn metrics(state: &State) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP profiler_windows_total Recording windows completed."
    );
    let _ = writeln!(out, "# TYPE profiler_windows_total counter");
    let _ = writeln!(out, "profiler_windows_total {}", state.windows_total);
    let _ = writeln!(
        out,
        "# HELP profiler_regressions_total Windows that regressed against the baseline."
    );
    let _ = writeln!(out, "# TYPE profiler_regressions_total counter");
    let _ = writeln!(
        out,
        "profiler_regressions_total {}",
        state.regressions_total
    );
    family(
        &mut out,
        "profiler_window_errors_total",
        "counter",
        "Windows that could not run (said once on stderr).",
        &[("", state.window_errors_total as f64)],
    );
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
    {
        let _ = writeln!(
            out,
            "# HELP profiler_resident_bytes The daemon's resident memory."
        );
        let _ = writeln!(out, "# TYPE profiler_resident_bytes gauge");
        let _ = writeln!(out, "profiler_resident_bytes {}", rss * 1024);
    }
    cost_metrics(&mut out, &state.cost);
    state.cumulative.render(&mut out);
    let Some((_, capture)) = &state.latest else {
        return out;
    };
    let window_s = capture.metadata.duration_ns as f64 / 1e9;
    let _ = writeln!(
        out,
        "# HELP profiler_window_seconds Length of the latest window."
    );
    let _ = writeln!(out, "# TYPE profiler_window_seconds gauge");
    let _ = writeln!(out, "profiler_window_seconds {window_s}");
    let _ = writeln!(
        out,
        "# HELP profiler_counter Kernel-side and symbolization counters of the latest window \
         (drops, full maps, lost stacks, unresolved frames)."
    );
    let _ = writeln!(out, "# TYPE profiler_counter gauge");
    for (name, value) in &capture.metadata.counters {
        let _ = writeln!(out, "profiler_counter{{name=\"{}\"}} {value}", label(name));
    }
    let _ = writeln!(
        out,
        "# HELP profiler_map_fill_ratio How full the latest window left the eBPF maps (a full \
         map loses events; those are counted)."
    );
    let _ = writeln!(out, "# TYPE profiler_map_fill_ratio gauge");
    for map in ["offcpu", "oncpu", "stacks"] {
        let get = |what: &str| {
            capture
                .metadata
                .counters
                .get(&format!("map_{map}_{what}"))
                .copied()
        };
        if let (Some(entries), Some(capacity)) = (get("entries"), get("capacity")) {
            let _ = writeln!(
                out,
                "profiler_map_fill_ratio{{map=\"{map}\"}} {}",
                entries as f64 / capacity.max(1) as f64
            );
        }
    }
    if let Some(offcpu) = &capture.offcpu {
        let mut by_process: std::collections::BTreeMap<(String, String), f64> = Default::default();
        for stack in &offcpu.stacks {
            *by_process
                .entry((stack.comm.clone(), stack.state.clone()))
                .or_default() += stack.total_ns as f64 / 1e9;
        }
        let mut rows: Vec<_> = by_process.into_iter().collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let _ = writeln!(
            out,
            "# HELP profiler_offcpu_seconds Off-CPU seconds in the latest window, by process \
             name and state."
        );
        let _ = writeln!(out, "# TYPE profiler_offcpu_seconds gauge");
        for ((comm, state), seconds) in rows.into_iter().take(50) {
            let _ = writeln!(
                out,
                "profiler_offcpu_seconds{{comm=\"{}\",state=\"{}\"}} {seconds}",
                label(&comm),
                label(&state)
            );
        }
    }
    if let Some(db) = &capture.db {
        let _ = writeln!(
            out,
            "# HELP profiler_db_query_seconds Database query latency in the latest window, by \
             fingerprint (the 50 busiest)."
        );
        let _ = writeln!(out, "# TYPE profiler_db_query_seconds summary");
        for q in db.queries.iter().take(50) {
            let labels = format!(
                "source=\"{}\",comm=\"{}\",query=\"{}\"",
                label(&q.source),
                label(&q.comm),
                label(&q.fingerprint)
            );
            for (quantile, ns) in [("0.5", q.p50_ns), ("0.95", q.p95_ns), ("0.99", q.p99_ns)] {
                let _ = writeln!(
                    out,
                    "profiler_db_query_seconds{{{labels},quantile=\"{quantile}\"}} {}",
                    ns as f64 / 1e9
                );
            }
            let _ = writeln!(
                out,
                "profiler_db_query_seconds_sum{{{labels}}} {}",
                q.total_ns as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "profiler_db_query_seconds_count{{{labels}}} {}",
                q.calls
            );
        }
    }
    out
}

/// One metric family in the Prometheus text format: HELP, TYPE, then its samples (`labels`
/// already rendered, braces included, or empty).
fn family(out: &mut String, name: &str, kind: &str, help: &str, rows: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in rows {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// The daemon's own cost and the mode its CPU budget chose.
fn cost_metrics(out: &mut String, cost: &Cost) {
    let mut gauge =
        |name: &str, help: &str, rows: &[(&str, f64)]| family(out, name, "gauge", help, rows);
    let sampled = cost.level > 0;
    gauge(
        "profiler_window_duty",
        "Sampled mode past 1 in 64 events: one window recorded in this many.",
        &[("", f64::from(cost.duty()))],
    );
    gauge(
        "profiler_mode",
        "1 for the mode the CPU budget chose: full (every event) or sampled.",
        &[
            ("{mode=\"full\"}", f64::from(u8::from(!sampled))),
            ("{mode=\"sampled\"}", f64::from(u8::from(sampled))),
        ],
    );
    let every = f64::from(cost.sample_every());
    gauge(
        "profiler_sample_every",
        "Sampled mode: one off-CPU block (database query) recorded in this many.",
        &[("{family=\"offcpu\"}", every), ("{family=\"db\"}", every)],
    );
    if let Some(hz) = cost.oncpu_hz {
        gauge(
            "profiler_oncpu_frequency_hz",
            "On-CPU samples per second per CPU (lowered in sampled mode).",
            &[("", hz as f64)],
        );
    }
    if let Some(budget) = cost.budget {
        gauge(
            "profiler_cpu_budget_ratio",
            "--max-cpu: the cost allowed, as a fraction of one CPU.",
            &[("", budget)],
        );
    }
    gauge(
        "profiler_cost_ratio",
        "The last window's cost as a fraction of one CPU: the daemon's CPU time (userspace) \
         and its eBPF programs' run time (ebpf).",
        &[
            ("{part=\"userspace\"}", cost.userspace),
            ("{part=\"ebpf\"}", cost.ebpf),
        ],
    );
    gauge(
        "profiler_over_budget",
        "1 when even the sparsest sampling (1 in 64 events, 1 window in 64) leaves the cost \
         over the budget.",
        &[("", f64::from(u8::from(cost.over_budget)))],
    );
    gauge(
        "profiler_window_gap_seconds",
        "Wall time of the last cycle that its window did not cover (loading, attaching).",
        &[("", cost.gap_s)],
    );
    family(
        out,
        "profiler_cpu_seconds_total",
        "counter",
        "CPU the profiler used since it started: its own (userspace) and its eBPF programs' \
         run time (ebpf).",
        &[
            ("{part=\"userspace\"}", cost.userspace_ns as f64 / 1e9),
            ("{part=\"ebpf\"}", cost.ebpf_ns as f64 / 1e9),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_samples_events_then_skips_windows_and_comes_back() {
        let mut cost = Cost {
            budget: Some(0.01),
            ..Cost::default()
        };
        // 30 % of a CPU against 1 %: three steps at a time.
        cost.account(300_000_000, 0, 1.0);
        cost.finish_period();
        assert_eq!((cost.sample_every(), cost.duty()), (8, 1));
        for _ in 0..3 {
            cost.account(300_000_000, 0, 1.0);
            cost.finish_period();
        }
        assert_eq!((cost.sample_every(), cost.duty()), (64, 64));
        cost.account(300_000_000, 0, 1.0);
        cost.finish_period();
        assert!(cost.over_budget);
        // Far under the budget: back three steps at a time, then one.
        cost.account(1_000, 0, 1.0);
        cost.finish_period();
        assert_eq!(cost.level, 9);
        cost.account(4_000_000, 0, 1.0); // 0.4 %: more than a third of the budget
        cost.finish_period();
        assert_eq!(cost.level, 9);
        cost.account(2_000_000, 1_000_000, 1.0); // 0.3 %: one step
        cost.finish_period();
        assert_eq!(cost.level, 8);
    }

    #[test]
    fn metrics_without_a_window_still_say_how_many() {
        let text = metrics(&State::default());
        assert!(text.contains("profiler_windows_total 0"));
    }
}
