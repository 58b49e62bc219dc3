//! The daemon's HTTP endpoints: `/`, `/healthz`, `/captures`, `/metrics`, `/flamegraph`,
//! `/profile`, `/summary`, `/events` (GET and HEAD), `/capture` (POST),
//! `/debug/pprof/profile` (GET: a fresh on-CPU capture as pprof, for Parca's and Grafana
//! Alloy's scrapers and `go tool pprof`); and the client side of `record --from-daemon`.
//!
//! HTTP/1.1 is hyper's (keep-alive, parsing, 431 for oversized headers). Around it, what a
//! service on a host in trouble needs: its own thread and runtime, so a window being
//! symbolized and written never delays an answer (a Prometheus scrape times out in 1 s); a
//! deadline for a request's headers, which also closes idle keep-alive connections; at most
//! `MAX_CONNECTIONS` open connections, the oldest idle one closed to make room (and a new
//! one refused at once when all are busy); and an accept loop that backs off when the
//! process is out of file descriptors instead of spinning.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::State;
use super::config::{Settings, record_options};
use super::metrics::metrics;
use super::windows::{kept_window, prune_captures};
use crate::model::Capture;

/// Longest on-demand capture.
const CAPTURE_MAX_S: u64 = 600;
/// On-demand captures kept in the data directory.
pub(crate) const CAPTURES_KEPT: usize = 5;
/// Open connections at most; past it the oldest idle one is closed for a new one.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// A request's headers must arrive within this (from its first byte, or from the end of the
/// previous response on a keep-alive connection: an idle connection is closed after it).
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Request line and headers, at most (431 past it).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// No endpoint takes a body: a declared one larger than this is refused (413).
const MAX_BODY_BYTES: u64 = 1024;

/// What the server allows beyond its defaults.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpOptions {
    /// `GET /capture` starts a capture too (`--allow-capture-get`); otherwise POST only.
    pub allow_capture_get: bool,
    /// /capture wants `Authorization: Bearer` this (`--capture-token-file`).
    pub capture_token: Option<String>,
}

type Reply = (StatusCode, &'static str, Vec<u8>);

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const PPROF: &str = "application/octet-stream";
/// On-CPU samples per second of `/debug/pprof/profile` when the daemon records no on-CPU
/// family (record's default).
const DEFAULT_ONCPU_HZ: u64 = 99;

/// `/capture?seconds=N[&pid=P]…`: records N seconds with the daemon's record options (the
/// pids, when given, replace its -p filter) into `DATA_DIR/capture-<unix ms>/` and answers
/// with the capture (JSON). One at a time; it runs alongside the windows.
async fn on_demand_capture(query: &str, state: &Mutex<State>, what: OnDemand) -> Reply {
    match capture_on_demand(query, state, what).await {
        Ok(capture) if what == OnDemand::Pprof => match crate::render::pprof::gzipped(&capture) {
            Ok(body) => (StatusCode::OK, PPROF, body),
            Err(err) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("{err:#}\n").into_bytes(),
            ),
        },
        Ok(capture) => (
            StatusCode::OK,
            JSON,
            serde_json::to_vec(&capture).unwrap_or_default(),
        ),
        Err(reply) => reply,
    }
}

/// What an on-demand capture records and answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDemand {
    /// `/capture`: the daemon's record options; the capture as JSON.
    Capture,
    /// `/debug/pprof/profile`: on-CPU samples only (Go's CPU profile, where Parca's and
    /// Grafana Alloy's scrapers look); gzipped pprof.
    Pprof,
}

async fn capture_on_demand(
    query: &str,
    state: &Mutex<State>,
    what: OnDemand,
) -> Result<Capture, Reply> {
    let mut seconds = 30u64;
    let mut pids = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        match (key, value.parse::<u64>()) {
            ("seconds", Ok(n)) if (1..=CAPTURE_MAX_S).contains(&n) => seconds = n,
            ("pid", Ok(n)) if n > 0 && n <= u64::from(u32::MAX) => pids.push(n.to_string()),
            _ => {
                return Err(bad_request(format!(
                    "bad parameter {kv:?}: seconds=1..{CAPTURE_MAX_S}, pid=PID (repeatable)\n"
                )));
            }
        }
    }
    let settings = {
        let mut state = state.lock().expect("state lock");
        if state.capturing {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                TEXT,
                b"an on-demand capture is already running\n".to_vec(),
            ));
        }
        let Some(settings) = state.settings.clone() else {
            return Err(unavailable());
        };
        state.capturing = true;
        settings
    };
    let name = format!("capture-{}", crate::collect::unix_ms());
    // Recorded under a staging name, renamed once complete (a crash leaves no capture that
    // reads as valid).
    let staging = settings.data_dir.join(super::windows::staging_name(&name));
    let dir = settings.data_dir.join(&name);
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
    let result = match record_options(&window, &staging) {
        Ok(mut options) => {
            options.quiet = true;
            if what == OnDemand::Pprof {
                let probes = &mut options.probes;
                let frequency = probes
                    .oncpu
                    .as_ref()
                    .map_or(DEFAULT_ONCPU_HZ, |o| o.frequency);
                probes.oncpu = Some(crate::probes::oncpu::OncpuConfig { frequency });
                probes.offcpu = None;
                probes.syscalls = None;
                probes.tcp = false;
                probes.db = None;
                options.db_required = false;
            }
            options.probes.measure_overhead = true;
            // Its own runtime on its own thread: the windows go on meanwhile.
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(crate::collect::record(options)))
                    .and_then(|capture| {
                        super::windows::publish(&staging, &dir)?;
                        Ok(capture)
                    });
                if result.is_err() {
                    let _ = std::fs::remove_dir_all(&staging);
                }
                let _ = tx.send(result);
            });
            rx.await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the capture thread died")))
        }
        Err(err) => Err(err),
    };
    state.lock().expect("state lock").capturing = false;
    prune_captures(&settings.data_dir);
    result.map_err(|err| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            format!("capture failed: {err:#}\n").into_bytes(),
        )
    })
}

fn no_such_window(name: &str) -> Reply {
    (
        StatusCode::NOT_FOUND,
        TEXT,
        format!("no window {name:?} kept (see /captures)\n").into_bytes(),
    )
}

fn bad_request(text: String) -> Reply {
    (StatusCode::BAD_REQUEST, TEXT, text.into_bytes())
}

fn unavailable() -> Reply {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        TEXT,
        b"no window yet\n".to_vec(),
    )
}

/// Equal secrets, compared in time that does not depend on where they differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// `profiler record --from-daemon ADDR`: asks the running daemon for an on-demand capture
/// and writes it (and its views) to the output directory like a local recording.
pub fn capture_from_daemon(
    address: &str,
    seconds: u64,
    pids: &[u32],
    output: &Path,
    top: usize,
    token: Option<&str>,
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
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST {target} HTTP/1.1\r\nHost: {address}\r\n{authorization}Content-Length: 0\r\n\
         Connection: close\r\n\r\n"
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
    crate::render::outputs::create_private_dir(output)?;
    crate::render::outputs::write_outputs(
        &capture,
        output,
        top,
        true,
        crate::render::GroupBy::Process,
    )
}

/// The open connections, by age: whether each is answering a request, and how to close it.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, Connection>,
}

struct Connection {
    busy: Arc<AtomicBool>,
    close: Arc<Notify>,
}

impl Connections {
    /// Room for one more: the oldest idle connection is told to close when all slots are
    /// taken. `None` when every connection is answering a request (the new one is refused).
    fn admit(&mut self) -> Option<(u64, Arc<AtomicBool>, Arc<Notify>)> {
        if self.open.len() >= MAX_CONNECTIONS {
            let idle = self
                .open
                .iter()
                .find(|(_, c)| !c.busy.load(Ordering::Acquire))
                .map(|(id, _)| *id)?;
            if let Some(evicted) = self.open.remove(&idle) {
                evicted.close.notify_one();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let (busy, close) = (Arc::new(AtomicBool::new(false)), Arc::new(Notify::new()));
        self.open.insert(
            id,
            Connection {
                busy: Arc::clone(&busy),
                close: Arc::clone(&close),
            },
        );
        Some((id, busy, close))
    }
}

/// Serves HTTP on `listener` from a thread and runtime of its own (the window loop's work
/// never delays an answer). Returns once the thread runs.
pub(super) fn start(
    listener: std::net::TcpListener,
    state: Arc<Mutex<State>>,
    options: HttpOptions,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("cannot make the HTTP socket non-blocking")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("profiler-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    std::thread::Builder::new()
        .name("profiler-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, state, options).await,
                    Err(err) => eprintln!("profiler daemon: HTTP stopped: {err}"),
                }
            })
        })
        .context("cannot start the HTTP thread")?;
    Ok(())
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, options: HttpOptions) {
    let options = Arc::new(options);
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES.max(8192) * 2)
        .keep_alive(true);
    let mut said_out_of_fds = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors or memory: accepting again at once would fail again
                // (and spin). Wait for connections to close.
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) && !said_out_of_fds
                {
                    eprintln!("profiler daemon: HTTP cannot accept ({err}); backing off");
                    said_out_of_fds = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        said_out_of_fds = false;
        let Some((id, busy, close)) = connections.lock().expect("connections lock").admit() else {
            // Every slot answers a request: closed at once (the client sees a reset/EOF).
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let connections = Arc::clone(&connections);
        let builder = builder.clone();
        let options = Arc::clone(&options);
        tokio::spawn(async move {
            let service = hyper::service::service_fn({
                let busy = Arc::clone(&busy);
                move |request| {
                    let state = Arc::clone(&state);
                    let busy = Arc::clone(&busy);
                    let options = Arc::clone(&options);
                    async move {
                        busy.store(true, Ordering::Release);
                        let response = handle(request, state, options).await;
                        busy.store(false, Ordering::Release);
                        Ok::<_, Infallible>(response)
                    }
                }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = close.notified() => {
                    // Evicted for a newer connection while idle: finish what is under way.
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
                }
            }
            connections
                .lock()
                .expect("connections lock")
                .open
                .remove(&id);
        });
    }
}

/// One request: the method checked against the endpoint, then its answer.
async fn handle(
    request: Request<Incoming>,
    state: Arc<Mutex<State>>,
    options: Arc<HttpOptions>,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let declared_body = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared_body.is_some_and(|n| n > MAX_BODY_BYTES)
        || request.headers().contains_key(TRANSFER_ENCODING)
    {
        let mut response = reply((
            StatusCode::PAYLOAD_TOO_LARGE,
            TEXT,
            b"no endpoint takes a request body\n".to_vec(),
        ));
        response
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    if path == "/capture" {
        let allowed = if options.allow_capture_get {
            "GET, POST"
        } else {
            "POST"
        };
        if method == Method::POST || (method == Method::GET && options.allow_capture_get) {
            if let Some(refused) = unauthorized(&request, &options) {
                return refused;
            }
            return reply(on_demand_capture(&query, &state, OnDemand::Capture).await);
        }
        return not_allowed(
            allowed,
            if method == Method::GET {
                "/capture starts a capture: POST it (or run the daemon with --allow-capture-get)\n"
            } else {
                "/capture: POST only\n"
            },
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return not_allowed("GET, HEAD", "read-only: GET or HEAD\n");
    }
    if path == "/debug/pprof/profile" {
        if method != Method::GET {
            return not_allowed("GET", "/debug/pprof/profile starts a capture: GET only\n");
        }
        if let Some(refused) = unauthorized(&request, &options) {
            return refused;
        }
        // Go's convention: 30 s unless `seconds=` says otherwise.
        let query = if query.split('&').any(|kv| kv.starts_with("seconds=")) {
            query
        } else if query.is_empty() {
            "seconds=30".to_string()
        } else {
            format!("{query}&seconds=30")
        };
        return reply(on_demand_capture(&query, &state, OnDemand::Pprof).await);
    }
    if path == "/healthz" {
        // Nothing locked, nothing read: liveness even while a window is written.
        return reply((StatusCode::OK, TEXT, b"ok\n".to_vec()));
    }
    // Files are read and rendered off the runtime's workers.
    let answer = tokio::task::spawn_blocking(move || respond(&path, &query, &state)).await;
    reply(answer.unwrap_or_else(|_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            b"the request failed\n".to_vec(),
        )
    }))
}

/// The 401 for a request that starts a capture without the daemon's token, if it has one.
fn unauthorized(
    request: &Request<Incoming>,
    options: &HttpOptions,
) -> Option<Response<Full<Bytes>>> {
    let token = options.capture_token.as_ref()?;
    let given = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if same_secret(given.as_bytes(), token.as_bytes()) {
        return None;
    }
    let mut response = reply((
        StatusCode::UNAUTHORIZED,
        TEXT,
        b"starting a capture needs the daemon's token: Authorization: Bearer TOKEN\n".to_vec(),
    ));
    response.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    Some(response)
}

fn not_allowed(allow: &'static str, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = reply((
        StatusCode::METHOD_NOT_ALLOWED,
        TEXT,
        text.as_bytes().to_vec(),
    ));
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn reply((status, content_type, body): Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn dir_name(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn respond(path: &str, query: &str, state: &Mutex<State>) -> Reply {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    match path {
        "/" | "/index.html" => {
            // Windows left by an earlier run: their digests are read once, without the lock.
            let missing: Vec<std::path::PathBuf> = {
                let state = state.lock().expect("state lock");
                state
                    .kept
                    .iter()
                    .filter(|dir| !state.digests.contains_key(*dir))
                    .cloned()
                    .collect()
            };
            let read: Vec<_> = missing
                .into_iter()
                .filter_map(|dir| {
                    let capture = Capture::load(&dir.join(crate::model::CAPTURE_FILE)).ok()?;
                    Some((dir, super::page::Digest::of(&capture)))
                })
                .collect();
            let mut state = state.lock().expect("state lock");
            for (dir, digest) in read {
                if state.kept.contains(&dir) {
                    state.digests.insert(dir, digest);
                }
            }
            (
                StatusCode::OK,
                "text/html; charset=utf-8",
                super::page::index(&state, &crate::collect::hostname()).into_bytes(),
            )
        }
        "/events" => {
            let state = state.lock().expect("state lock");
            (
                StatusCode::OK,
                JSON,
                serde_json::to_vec(&state.events).unwrap_or_default(),
            )
        }
        "/captures" => {
            let state = state.lock().expect("state lock");
            let list: Vec<String> = state.kept.iter().map(|p| p.display().to_string()).collect();
            (
                StatusCode::OK,
                JSON,
                serde_json::to_vec(&list).unwrap_or_default(),
            )
        }
        "/metrics" => {
            let text = metrics(&state.lock().expect("state lock"));
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text.into_bytes(),
            )
        }
        "/profile" => {
            let capture = match param("window") {
                // An older window: its capture from disk.
                Some(name) => {
                    let dir = kept_window(&state.lock().expect("state lock"), &name);
                    match dir.map(|dir| Capture::load(&dir.join(crate::model::CAPTURE_FILE))) {
                        Some(Ok(capture)) => capture,
                        _ => return no_such_window(&name),
                    }
                }
                None => match &state.lock().expect("state lock").latest {
                    Some((_, capture)) => capture.clone(),
                    None => return unavailable(),
                },
            };
            match crate::render::pprof::gzipped(&capture) {
                Ok(body) => (StatusCode::OK, PPROF, body),
                Err(err) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("{err:#}\n").into_bytes(),
                ),
            }
        }
        "/compare" => {
            let (Some(a), Some(b)) = (param("a"), param("b")) else {
                return bad_request("/compare?a=WINDOW&b=WINDOW (names from /captures)\n".into());
            };
            let dirs = {
                let state = state.lock().expect("state lock");
                (kept_window(&state, &a), kept_window(&state, &b))
            };
            let (dir_a, dir_b) = match dirs {
                (Some(dir_a), Some(dir_b)) => (dir_a, dir_b),
                (None, _) => return no_such_window(&a),
                (_, None) => return no_such_window(&b),
            };
            let load = |dir: &std::path::Path| -> anyhow::Result<crate::compare::Profile> {
                let capture = Capture::load(&dir.join(crate::model::CAPTURE_FILE))?;
                let name = dir.file_name().unwrap_or_default().to_string_lossy();
                Ok(crate::compare::Profile::from_capture(
                    &capture,
                    name.into_owned(),
                ))
            };
            let report = load(&dir_a).and_then(|base| {
                let new = load(&dir_b)?;
                crate::compare::compare(&base, &new, &crate::compare::Thresholds::default())
            });
            let report = match report {
                Ok(report) => report,
                Err(err) => {
                    return (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        TEXT,
                        format!("cannot compare {a} with {b}: {err:#}\n").into_bytes(),
                    );
                }
            };
            let (a, b) = (dir_name(&dir_a), dir_name(&dir_b));
            match param("format").as_deref() {
                Some("svg") => {
                    let mut svg = Vec::new();
                    match crate::compare::report::write_differential_svg(&report, &mut svg) {
                        Ok(()) => (StatusCode::OK, "image/svg+xml", svg),
                        Err(err) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            TEXT,
                            format!("{err:#}\n").into_bytes(),
                        ),
                    }
                }
                Some("json") => (
                    StatusCode::OK,
                    JSON,
                    serde_json::to_vec(&report).unwrap_or_default(),
                ),
                None | Some("html") => (
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    super::page::compare_page(&a, &b, &report).into_bytes(),
                ),
                Some(_) => bad_request("format: html (default), svg or json\n".into()),
            }
        }
        "/summary" | "/flamegraph" => {
            let dir = {
                let state = state.lock().expect("state lock");
                match (param("window"), &state.latest) {
                    (Some(name), _) => match kept_window(&state, &name) {
                        Some(dir) => dir,
                        None => return no_such_window(&name),
                    },
                    (None, Some((dir, _))) => dir.clone(),
                    (None, None) => return unavailable(),
                }
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
                    return bad_request("kind: offcpu, oncpu, wallclock, db or diff\n".into());
                }
            };
            match std::fs::read(dir.join(&file)) {
                Ok(body) if file.ends_with(".svg") => (StatusCode::OK, "image/svg+xml", body),
                Ok(body) => (StatusCode::OK, TEXT, body),
                Err(_) => (
                    StatusCode::NOT_FOUND,
                    TEXT,
                    format!(
                        "no {file} in {}\n",
                        dir.file_name().unwrap_or_default().to_string_lossy()
                    )
                    .into_bytes(),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            b"try / (the page), /healthz /metrics /captures /events /flamegraph /profile /summary \
              /compare /debug/pprof/profile\n"
                .to_vec(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_closes_the_oldest_idle_connection_and_refuses_when_all_are_busy() {
        let mut table = Connections::default();
        let mut admitted = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            admitted.push(table.admit().expect("room"));
        }
        // All idle: the oldest (id 0) makes room.
        let (id, _, _) = table.admit().expect("room after eviction");
        assert_eq!(id, MAX_CONNECTIONS as u64);
        assert!(!table.open.contains_key(&0));
        for (_, busy, _) in &admitted {
            busy.store(true, Ordering::Release);
        }
        // id 1.. busy, the newest idle: it goes.
        assert!(table.admit().is_some());
        assert!(!table.open.contains_key(&(MAX_CONNECTIONS as u64)));
        // Now every connection is busy except the one just admitted, then that one too.
        let newest = *table.open.keys().last().unwrap();
        table.open[&newest].busy.store(true, Ordering::Release);
        assert!(table.admit().is_none(), "all busy: refused");
        assert_eq!(table.open.len(), MAX_CONNECTIONS);
    }
}
