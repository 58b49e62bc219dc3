//! The daemon's HTTP side against hostile and careless clients, on the real daemon: each
//! request gets the status HTTP says it should (the oracle is the RFC's status for the
//! case: 405 with `Allow`, 431, 413, 400, 404), idle and slow connections are closed after
//! the header timeout (the daemon's own `/proc/PID/fd` is the count), a window being
//! written never delays an answer, and the windows go on throughout (`/metrics`).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use profiler_tests::daemon::Daemon;
use profiler_tests::*;

/// One request on a fresh connection (`Connection: close`): the response head and body.
fn request(port: u16, raw: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    stream.write_all(raw).ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let at = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((
        String::from_utf8_lossy(&response[..at]).into_owned(),
        response[at + 4..].to_vec(),
    ))
}

fn call(port: u16, method: &str, target: &str) -> (String, Vec<u8>) {
    request(
        port,
        format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap_or_else(|| panic!("no answer to {method} {target}"))
}

fn status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = call(port, "GET", "/metrics");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// Waits until the daemon has completed `n` windows.
fn wait_for_windows(port: u16, n: f64, within: Duration) {
    let deadline = Instant::now() + within;
    while metric(port, "profiler_windows_total") < n {
        assert!(Instant::now() < deadline, "fewer than {n} windows");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The daemon's open sockets (its `/proc/PID/fd` entries that are sockets).
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// While windows of the whole host (every family, 1 s long) are symbolized and written,
/// /healthz and /metrics still answer within 1 s each (a Prometheus scrape's timeout);
/// before the HTTP server had its own thread they waited for the window, up to 2.4 s here.
#[test]
fn http_answers_while_a_window_is_written() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("http-latency");
    let port = free_port();
    let mut daemon = Daemon::spawn(&dir.join("data"), port, &["--window", "1s"], &[]);
    wait_for_windows(port, 1.0, Duration::from_secs(120));
    let first = metric(port, "profiler_windows_total");
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    // Three window ends (each symbolizes and writes the whole host's window).
    let until = Instant::now() + Duration::from_secs(180);
    while Instant::now() < until && metric(port, "profiler_windows_total") < first + 3.0 {
        for path in ["/healthz", "/metrics"] {
            let asked = Instant::now();
            let (head, _) = call(port, "GET", path);
            let took = asked.elapsed();
            assert_eq!(status(&head), 200, "{path}: {head}");
            slowest = slowest.max(took);
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let windows = metric(port, "profiler_windows_total") - first;
    println!(
        "{answered} answers over {windows} window ends: slowest {:.1} ms",
        slowest.as_secs_f64() * 1e3
    );
    assert!(windows >= 3.0, "only {windows} windows ended meanwhile");
    assert!(
        slowest < Duration::from_secs(1),
        "an answer took {slowest:?} while windows were written"
    );
    daemon.stop();
}

/// Methods, sizes, malformed and split requests, path tricks and absurd parameters: each
/// gets its status, and the windows go on meanwhile.
#[test]
fn hostile_requests_get_their_status_and_the_windows_go_on() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("http-hostile");
    let port = free_port();
    let mut daemon = Daemon::spawn(
        &dir.join("data"),
        port,
        &["--window", "2s"],
        &["--events", "offcpu", "-p", "1"],
    );
    wait_for_windows(port, 1.0, Duration::from_secs(60));
    let windows_before = metric(port, "profiler_windows_total");

    // Reads are GET or HEAD; anything else is 405 with Allow.
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
        let (head, _) = call(port, method, "/metrics");
        assert_eq!(status(&head), 405, "{method} /metrics: {head}");
        assert_eq!(header(&head, "allow"), Some("GET, HEAD"), "{head}");
    }
    let (head, body) = call(port, "HEAD", "/metrics");
    assert_eq!(status(&head), 200, "{head}");
    assert!(body.is_empty(), "HEAD answered with a body");
    assert!(
        header(&head, "content-length").is_some_and(|n| n.parse::<usize>().unwrap() > 100),
        "{head}"
    );
    // /capture starts a capture: POST only.
    let (head, _) = call(port, "GET", "/capture?seconds=1");
    assert_eq!(status(&head), 405, "{head}");
    assert_eq!(header(&head, "allow"), Some("POST"), "{head}");

    // Content types.
    for (target, content_type) in [
        ("/metrics", "text/plain; version=0.0.4; charset=utf-8"),
        ("/captures", "application/json"),
        ("/events", "application/json"),
        ("/flamegraph?kind=offcpu", "image/svg+xml"),
        ("/summary", "text/plain; charset=utf-8"),
        ("/profile", "application/octet-stream"),
        ("/", "text/html; charset=utf-8"),
    ] {
        let (head, _) = call(port, "GET", target);
        assert_eq!(status(&head), 200, "{target}: {head}");
        assert_eq!(
            header(&head, "content-type"),
            Some(content_type),
            "{target}"
        );
    }
    let (head, _) = call(port, "GET", "/nothing-here");
    assert_eq!(status(&head), 404, "{head}");

    // Path tricks: a window is one of the kept ones by name, a kind one of five words.
    for trick in [
        "../../../../etc/passwd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2E%2E%2F%2E%2E",
        "window-1%00",
        "%00",
        "/etc/passwd",
        "window-..",
    ] {
        for endpoint in ["/flamegraph?kind=offcpu&", "/summary?", "/profile?"] {
            let target = format!("{endpoint}window={trick}");
            let (head, body) = call(port, "GET", &target);
            assert_eq!(status(&head), 404, "{target}: {head}");
            assert!(
                !String::from_utf8_lossy(&body).contains("root:"),
                "{target}"
            );
        }
    }
    for trick in [
        "../../etc/passwd",
        "offcpu%00",
        "..%2Foffcpu",
        "offcpu.svg",
        "%2E%2E",
    ] {
        let (head, _) = call(port, "GET", &format!("/flamegraph?kind={trick}"));
        assert_eq!(status(&head), 400, "kind={trick}: {head}");
    }
    // Absurd capture parameters: 400, nothing started.
    for query in [
        "seconds=0",
        "seconds=-1",
        "seconds=601",
        "seconds=99999999999999999999999999",
        "seconds=1e9",
        "seconds=",
        "seconds=%31",
        "pid=0",
        "pid=-5",
        "pid=99999999999",
        "window=../x",
    ] {
        let (head, body) = call(port, "POST", &format!("/capture?{query}"));
        assert_eq!(
            status(&head),
            400,
            "{query}: {head} {}",
            String::from_utf8_lossy(&body)
        );
    }
    // A body where none is taken.
    let (head, _) = request(
        port,
        b"POST /capture?seconds=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
    )
    .unwrap();
    assert_eq!(status(&head), 413, "{head}");
    // Oversized headers: 431.
    let mut huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..64 {
        huge.extend(format!("X-Filler-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    huge.extend(b"\r\n");
    let (head, _) = request(port, &huge).expect("an answer to oversized headers");
    assert_eq!(status(&head), 431, "{head}");
    // Not HTTP at all.
    let (head, _) = request(port, b"HELLO THERE\r\n\r\n").expect("an answer to garbage");
    assert_eq!(status(&head), 400, "{head}");

    // A request split across TCP segments is read whole.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    for part in [
        &b"GET /hea"[..],
        b"lthz HTTP/1.1\r\nHo",
        b"st: x\r\nConnection: close\r\n",
        b"\r\n",
    ] {
        stream.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("ok\n"),
        "{response}"
    );
    // Keep-alive: two requests on one connection.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert_eq!(response.matches("HTTP/1.1 200 OK").count(), 2, "{response}");

    // The windows went on, none failed.
    wait_for_windows(port, windows_before + 2.0, Duration::from_secs(60));
    assert_eq!(metric(port, "profiler_window_errors_total"), 0.0);
    daemon.stop();
}

/// 1000 idle connections and a slow-drip request: the daemon keeps at most 256 open (the
/// oldest idle closed for a newer one), /healthz still answers within 1 s, and after the
/// header timeout (10 s) every idle or dripping connection is closed: the daemon's sockets
/// are back to what they were.
#[test]
fn idle_and_slow_connections_are_closed_and_healthz_still_answers() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("http-idle");
    let port = free_port();
    let mut daemon = Daemon::spawn(
        &dir.join("data"),
        port,
        &["--window", "2s"],
        &["--events", "offcpu", "-p", "1"],
    );
    wait_for_windows(port, 1.0, Duration::from_secs(60));
    let windows_before = metric(port, "profiler_windows_total");
    let sockets_before = sockets_of(daemon.pid() as u32);

    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let held = sockets_of(daemon.pid() as u32) - sockets_before;
    let asked = Instant::now();
    let (head, body) = call(port, "GET", "/healthz");
    let took = asked.elapsed();
    println!(
        "with 1000 idle connections open: the daemon holds {held} of them; /healthz in {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    assert_eq!((status(&head), body.as_slice()), (200, &b"ok\n"[..]));
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
    assert!(held <= 256 + 1, "{held} connections held");
    // The ones it let go were closed, not left hanging: a read sees the end at once.
    let mut closed = 0;
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        if matches!(stream.read(&mut [0u8; 1]), Ok(0))
            || matches!(stream.read(&mut [0u8; 1]), Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset)
        {
            closed += 1;
        }
    }
    assert!(closed >= 1000 - 256, "only {closed} of 1000 closed");

    // Slowloris: a header byte every 500 ms, never finished (started after the idle
    // connections, so it is the newest: cut by the header timeout, not to make room).
    let mut drip = TcpStream::connect(("127.0.0.1", port)).unwrap();
    drip.set_nodelay(true).unwrap();
    let dripping = std::thread::spawn(move || {
        let started = Instant::now();
        let header = b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in header.iter().cycle() {
            if drip.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            if started.elapsed() > Duration::from_secs(60) {
                break;
            }
        }
        started.elapsed()
    });

    // After the header timeout every idle connection is closed by the daemon.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sockets = sockets_of(daemon.pid() as u32);
        if sockets <= sockets_before {
            println!(
                "sockets back to {sockets} (from {}) after the timeout",
                sockets_before + held
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sockets} sockets still open (before: {sockets_before})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let dripped_for = dripping.join().unwrap();
    println!(
        "the slow-drip request was cut after {:.1} s",
        dripped_for.as_secs_f64()
    );
    assert!(
        dripped_for < Duration::from_secs(30),
        "dripped {dripped_for:?}"
    );
    let mut open = 0;
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if !matches!(stream.read(&mut [0u8; 1]), Ok(0) | Err(_)) {
            open += 1;
        }
    }
    drop(idle);
    assert_eq!(open, 0, "{open} connections still readable");
    assert_eq!(call(port, "GET", "/healthz").1, b"ok\n");
    assert!(metric(port, "profiler_windows_total") > windows_before);
    assert_eq!(metric(port, "profiler_window_errors_total"), 0.0);
    daemon.stop();
}

/// Only loopback by default: another address needs --allow-remote, which says so.
#[test]
fn a_non_loopback_address_needs_allow_remote() {
    require_root();
    let _serial = serial();
    let dir = temp_dir("http-remote");
    let port = free_port();
    let refused = Command::new(profiler_bin())
        .args(["daemon", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .args(["--", "--events", "offcpu", "-p", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--allow-remote"), "{stderr}");

    let mut daemon = Daemon::from_child(
        Command::new(profiler_bin())
            .args(["daemon", "--allow-remote", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen", &format!("0.0.0.0:{port}")])
            .args(["--window", "2s", "--", "--events", "offcpu", "-p", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while request(port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").is_none() {
        assert!(Instant::now() < deadline, "never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stderr = daemon.stop();
    // Every line that warns, however worded: exactly one, and it is this one.
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("reachable from other hosts"),
        "{stderr}"
    );
}
