//! A daemon under test and plain HTTP/1.1 calls to it (one request per connection, so the
//! answer is whatever the server sent before closing).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn call(port: u16, method: &str, target: &str) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .ok()?;
    stream
        .write_all(
            format!(
                "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let at = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..at]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response[at + 4..].to_vec()))
}

pub fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = call(port, "GET", "/metrics").expect("/metrics answers");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// A daemon that is SIGKILLed if the test fails.
pub struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on our own, unreaped child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

impl Daemon {
    /// `--events offcpu -p 1`, 1 s windows: small windows, many of them.
    pub fn start(data: &Path, port: u16) -> Self {
        Self::start_with(data, port, &["--events", "offcpu", "-p", "1"])
    }

    /// 1 s windows, each recorded with `record_args`.
    pub fn start_with(data: &Path, port: u16, record_args: &[&str]) -> Self {
        Self::spawn(data, port, &["--window", "1s"], record_args)
    }

    /// In full mode with `daemon_args`, each window recorded with `record_args`; once it
    /// answers /healthz.
    pub fn spawn(data: &Path, port: u16, daemon_args: &[&str], record_args: &[&str]) -> Self {
        let child = Command::new(crate::profiler_bin())
            .arg("daemon")
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(daemon_args)
            // Full mode: the default 1 % budget would skip windows under load.
            .args(["--max-cpu", "off"])
            .arg("--")
            .args(record_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start daemon");
        let daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while call(port, "GET", "/healthz").is_none() {
            assert!(Instant::now() < deadline, "the daemon never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    /// A daemon started some other way (say, on another address).
    pub fn from_child(child: std::process::Child) -> Self {
        Daemon(child)
    }

    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// SIGTERM; its stderr once it exited (successfully: asserted).
    pub fn stop(&mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let status = self.0.wait().unwrap();
        let mut stderr = String::new();
        self.0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(status.success(), "{status}: {stderr}");
        stderr
    }
}

/// Every window the daemon wrote under `data` (published ones), oldest first, read back.
pub fn window_captures(data: &Path) -> Vec<serde_json::Value> {
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir(data)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("window-"))
        })
        .collect();
    dirs.sort();
    dirs.iter().map(|d| crate::read_capture(d)).collect()
}

/// Percent-encodes a PromQL expression for a URL query.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server (Debian's, installed by `cargo xtask setup`) scraping one
/// target every second, its data in a directory of the test's; killed on drop.
pub struct Prometheus {
    child: std::process::Child,
    pub port: u16,
}

impl Prometheus {
    /// Scrapes `127.0.0.1:target` every second; once ready.
    pub fn start(dir: &Path, target: u16) -> Self {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: profiler\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (cargo xtask setup installs the Debian package)");
        let prometheus = Prometheus { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while call(port, "GET", "/-/ready").is_none_or(|(status, _)| status != 200) {
            assert!(Instant::now() < deadline, "Prometheus never became ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// One instant query through Prometheus's HTTP API: (labels, value) per result.
    pub fn query(&self, expr: &str) -> Vec<(serde_json::Value, f64)> {
        let (status, body) = call(
            self.port,
            "GET",
            &format!("/api/v1/query?query={}", url_encode(expr)),
        )
        .expect("Prometheus API");
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "{expr}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("Prometheus JSON");
        json["data"]["result"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .map(|r| {
                (
                    r["metric"].clone(),
                    r["value"][1].as_str().unwrap().parse::<f64>().unwrap(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
