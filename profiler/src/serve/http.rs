//! The daemon's HTTP endpoints on loopback: `/healthz`, `/captures`, `/metrics`,
//! `/flamegraph`, `/profile`, `/summary`, `/events`, `/capture`; and the client side of
//! `record --from-daemon`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use std::fmt::Write as _;
use std::time::Duration;

use super::State;
use super::config::{Settings, record_options};
use super::metrics::metrics;
use super::windows::{kept_window, prune_captures};
use crate::model::Capture;

/// Longest on-demand capture.
const CAPTURE_MAX_S: u64 = 600;
/// On-demand captures kept in the data directory.
pub(crate) const CAPTURES_KEPT: usize = 5;

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
        .join(format!("capture-{}", crate::collect::unix_ms()));
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
                    .and_then(|rt| rt.block_on(crate::collect::record(options)));
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
    crate::render::outputs::write_outputs(&capture, output, top, true)
}

/// Answers each connection on its own task: one read of the request, then the response.
pub(super) fn spawn_server(listener: TcpListener, server_state: Arc<Mutex<State>>) {
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
        "/" | "/index.html" => (
            "200 OK",
            "text/html; charset=utf-8",
            super::page::index(&state, &crate::collect::hostname()).into_bytes(),
        ),
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
            b"try / (the page), /healthz /metrics /captures /events /flamegraph /profile /summary\n"
                .to_vec(),
        ),
    }
}
