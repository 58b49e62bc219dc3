//! ⑧ Profiles leaving the host, to the stores a fleet already runs: Grafana Pyroscope's push
//! API (`pyroscope`) and OpenTelemetry's OTLP profiles over HTTP or gRPC (`otlp`). Each
//! format turns a capture into one request body; this module sends it, over TCP or TLS
//! (rustls, the system's CAs or `SSL_CERT_FILE`'s) for `https://` endpoints.
//!
//! The daemon's window loop only queues (`Exporter`: a bounded queue; a full one drops the
//! window's push, counted); a thread of its own sends, retrying a failed attempt with
//! backoff. When the endpoint is down or refuses, one line says so, one more when it works
//! again, and the counters (`profiler_export_*_total{exporter="…"}`) say how many pushes
//! went, failed an attempt, or were dropped. Nothing here can block or grow the window loop.
//! `record` pushes its capture once, waiting for the answer (`push_once`).

pub mod otlp;
pub mod pyroscope;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;

use crate::model::{Capture, Process};

/// Windows waiting to be pushed, at most; past it a window's push is dropped (counted).
pub const QUEUE: usize = 16;
/// Attempts per push (the first and its retries).
const ATTEMPTS: u32 = 4;
/// The wait before the first retry, doubled for each next one.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// What the pushes say they are.
const USER_AGENT: &str = concat!("profiler/", env!("CARGO_PKG_VERSION"));
/// Connecting, sending and reading the answer, at most.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A store's format: its name (in lines and metrics), where on the endpoint its requests go,
/// their content type, and how a capture becomes one (`None`: nothing in it to send).
#[derive(Clone, Copy)]
pub struct Sink {
    pub name: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: fn(&Capture) -> Option<Vec<u8>>,
    /// gRPC (HTTP/2, length-prefixed message, status in the trailers) rather than a plain
    /// HTTP/1.1 POST.
    grpc: bool,
    /// The body is sent gzipped (HTTP `Content-Encoding: gzip`; gRPC `grpc-encoding: gzip`
    /// with the message's compressed flag), as OTLP exporters do by default.
    gzip: bool,
}

pub const PYROSCOPE: Sink = Sink {
    name: "pyroscope",
    path: "/push.v1.PusherService/Push",
    content_type: "application/json",
    body: pyroscope::push_request,
    grpc: false,
    // Its profiles are gzipped pprof already.
    gzip: false,
};

/// OTLP/HTTP with a protobuf body.
pub const OTLP: Sink = Sink {
    name: "otlp",
    path: otlp::PATH,
    content_type: "application/x-protobuf",
    body: otlp::export_request,
    grpc: false,
    gzip: true,
};

/// OTLP/gRPC.
pub const OTLP_GRPC: Sink = Sink {
    name: "otlp",
    path: otlp::GRPC_PATH,
    content_type: "application/grpc",
    body: otlp::export_request,
    grpc: true,
    gzip: true,
};

/// What an exporter did, for /metrics.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Pushes the endpoint took (2xx).
    pub pushed: AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: AtomicU64,
    /// Pushes given up: the queue was full, every attempt failed, the endpoint refused the
    /// request (4xx), or the daemon stopped before it was sent.
    pub dropped: AtomicU64,
    /// Bytes of the request bodies the store took (as sent: compressed where the format is).
    pub bytes: AtomicU64,
    /// CPU time spent turning windows into request bodies (nanoseconds).
    pub encode_ns: AtomicU64,
    /// Pushes queued, and those the sender is done with (sent or given up).
    queued: AtomicU64,
    settled: AtomicU64,
}

/// Where pushes go: `http://HOST[:PORT][/PREFIX]` or `https://…`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    authority: String,
    prefix: String,
    /// https: the certificates trusted (the system's, or `SSL_CERT_FILE` / `SSL_CERT_DIR`
    /// when set) and the name the server's certificate must carry.
    tls: Option<(
        Arc<rustls::RootCertStore>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self> {
        let uri: hyper::Uri = url
            .parse()
            .with_context(|| format!("{url:?} is not a URL"))?;
        let (tls, default_port) = match uri.scheme_str() {
            Some("http") => (false, 80),
            Some("https") => (true, 443),
            _ => bail!("{url:?}: must start with http:// or https://"),
        };
        let Some(authority) = uri.authority() else {
            bail!("{url:?} has no host");
        };
        if uri.query().is_some() {
            bail!("{url:?}: no query string");
        }
        let tls = if tls {
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .with_context(|| format!("{url:?}: {host:?} is not a host name"))?;
            Some((Arc::new(trusted_roots()?), name))
        } else {
            None
        };
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        Ok(Self {
            url: url.to_string(),
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
            tls,
        })
    }

    /// The scheme and authority requests name (gRPC's `:scheme` and `:authority`).
    fn origin(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

/// The certificate authorities https pushes trust: the system's store, or the PEM file
/// `SSL_CERT_FILE` and the directories `SSL_CERT_DIR` name (as OpenSSL reads them).
fn trusted_roots() -> Result<rustls::RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or("none found".to_string(), ToString::to_string);
        bail!(
            "https: no trusted CA certificate could be loaded ({why}); install the system's \
             (ca-certificates) or name a PEM file in SSL_CERT_FILE"
        );
    }
    Ok(roots)
}

/// One request body.
struct Push {
    /// Shared by every attempt (a retry sends the same bytes without copying them).
    body: Bytes,
}

/// The daemon's sending side of one store.
pub struct Exporter {
    queue: SyncSender<Push>,
    pub stats: Arc<ExportStats>,
    sink: Sink,
    endpoint: Endpoint,
    /// Closed by the sender once it has sent or given up everything queued.
    done: Receiver<()>,
}

impl Exporter {
    pub fn start(sink: Sink, endpoint: Endpoint) -> Result<Self> {
        let (queue, pushes) = std::sync::mpsc::sync_channel(QUEUE);
        let stats = Arc::new(ExportStats::default());
        let sender = (endpoint.clone(), Arc::clone(&stats));
        let (finished, done) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(format!("{}-push", sink.name))
            .spawn(move || {
                send_loop(sink, &sender.0, &sender.1, pushes);
                drop(finished);
            })
            .with_context(|| format!("cannot start the {} push thread", sink.name))?;
        Ok(Self {
            queue,
            stats,
            sink,
            endpoint,
            done,
        })
    }

    pub fn name(&self) -> &'static str {
        self.sink.name
    }

    pub fn url(&self) -> &str {
        &self.endpoint.url
    }

    /// Queues `capture`'s push; never waits.
    pub fn push(&self, capture: &Capture) {
        let started = thread_cpu_ns();
        let body = self.sink.encode(capture);
        self.stats
            .encode_ns
            .fetch_add(thread_cpu_ns().saturating_sub(started), Ordering::Relaxed);
        let Some(body) = body else {
            return; // nothing recorded that this store shows
        };
        match self.queue.try_send(Push { body }) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// At exit: waits up to `within` for what is queued to be sent; what is not is dropped
    /// (counted) and said in one line.
    pub fn finish(self, within: Duration) {
        let Self {
            queue,
            stats,
            done,
            endpoint,
            sink,
        } = self;
        drop(queue);
        let _ = done.recv_timeout(within);
        let unsent = stats
            .queued
            .load(Ordering::Relaxed)
            .saturating_sub(stats.settled.load(Ordering::Relaxed));
        if unsent > 0 {
            stats.dropped.fetch_add(unsent, Ordering::Relaxed);
            eprintln!(
                "profiler daemon: {unsent} window(s) not pushed to {} ({}) at exit (not taken \
                 within {within:?})",
                endpoint.url, sink.name
            );
        }
    }
}

impl Sink {
    /// `capture`'s request body as sent (`None`: nothing in it this store shows).
    fn encode(&self, capture: &Capture) -> Option<Bytes> {
        let body = (self.body)(capture)?;
        if !self.gzip {
            return Some(body.into());
        }
        // Compressing into memory does not fail; if it ever did, nothing is sent (the body
        // uncompressed would contradict its Content-Encoding).
        crate::render::pprof::gzip(&body).ok().map(Bytes::from)
    }
}

/// This thread's CPU time (CLOCK_THREAD_CPUTIME_ID), in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `record`'s push: `capture` to `endpoint`, retried like the daemon's, waited for.
pub fn push_once(sink: Sink, endpoint: &Endpoint, capture: &Capture) -> Result<bool> {
    let Some(body) = sink.encode(capture) else {
        return Ok(false);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let push = Push { body };
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        match runtime.block_on(send(sink, endpoint, &push)) {
            Ok(()) => return Ok(true),
            Err(Failure::Retry(_)) if attempt < ATTEMPTS => {
                std::thread::sleep(backoff);
                backoff *= 2;
            }
            Err(failure) => bail!(
                "pushing the capture to {} ({}) failed: {}",
                endpoint.url,
                sink.name,
                failure.text()
            ),
        }
    }
    unreachable!("the last attempt returns")
}

/// The service a process is shown as: its systemd service, else its container (the id's
/// first 12 digits), else its name.
pub fn service_name(process: &Process) -> String {
    if let Some(unit) = process
        .systemd_unit
        .as_deref()
        .and_then(|u| u.strip_suffix(".service"))
    {
        return unit.to_string();
    }
    if let Some(id) = &process.container_id {
        return format!("container-{}", &id[..id.len().min(12)]);
    }
    process.comm.clone()
}

fn send_loop(sink: Sink, endpoint: &Endpoint, stats: &ExportStats, pushes: Receiver<Push>) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!(
            "profiler daemon: cannot start the {} push runtime; pushes dropped",
            sink.name
        );
        for _ in pushes {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        return;
    };
    // Whether the last push failed (so the next failure is not said again).
    let mut failing = false;
    let mut dropped_since = 0u64;
    for push in pushes {
        let mut backoff = FIRST_BACKOFF;
        let mut outcome: Result<(), Failure> = Err(Failure::Retry(String::new()));
        for attempt in 1..=ATTEMPTS {
            outcome = runtime.block_on(send(sink, endpoint, &push));
            match &outcome {
                Ok(()) => break,
                Err(Failure::Refused(_)) => break,
                Err(Failure::Retry(_)) => {
                    stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    if attempt < ATTEMPTS {
                        std::thread::sleep(backoff);
                        backoff *= 2;
                    }
                }
            }
        }
        match outcome {
            Ok(()) => {
                stats.pushed.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes
                    .fetch_add(push.body.len() as u64, Ordering::Relaxed);
                stats.settled.fetch_add(1, Ordering::Relaxed);
                if failing {
                    eprintln!(
                        "profiler daemon: {} push to {} works again ({dropped_since} \
                         push(es) dropped meanwhile)",
                        sink.name, endpoint.url
                    );
                    failing = false;
                }
            }
            Err(failure) => {
                if matches!(failure, Failure::Refused(_)) {
                    stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                }
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                stats.settled.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    eprintln!(
                        "profiler daemon: {} push to {} failed: {}; dropping pushes that \
                         fail {ATTEMPTS} attempts (profiler_export_dropped_total) until it \
                         works",
                        sink.name,
                        endpoint.url,
                        failure.text()
                    );
                    failing = true;
                    dropped_since = 0;
                }
                dropped_since += 1;
            }
        }
    }
}

/// Why a push failed: worth retrying (no connection, timeout, 5xx, 429) or not (4xx).
enum Failure {
    Retry(String),
    Refused(String),
}

impl Failure {
    fn text(&self) -> &str {
        match self {
            Failure::Retry(text) | Failure::Refused(text) => text,
        }
    }
}

/// A connection to the endpoint: TCP, or TLS over it for https (ALPN `h2` for gRPC, else
/// `http/1.1`).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn connect(
    endpoint: &Endpoint,
    h2: bool,
) -> Result<hyper_util::rt::TokioIo<Box<dyn Io>>, Failure> {
    let tcp = tokio::net::TcpStream::connect(&endpoint.authority)
        .await
        .map_err(|err| Failure::Retry(format!("cannot connect: {err}")))?;
    let Some((roots, name)) = &endpoint.tls else {
        return Ok(hyper_util::rt::TokioIo::new(Box::new(tcp)));
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| Failure::Refused(format!("TLS: {err}")))?
        .with_root_certificates(Arc::clone(roots))
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name.clone(), tcp)
        .await
        // A certificate that does not verify will not verify on retry either; the daemon
        // still retries (the endpoint may be mid-rotation), `record` says why at once.
        .map_err(|err| Failure::Retry(format!("TLS: {err}")))?;
    Ok(hyper_util::rt::TokioIo::new(Box::new(tls)))
}

async fn send(sink: Sink, endpoint: &Endpoint, push: &Push) -> Result<(), Failure> {
    if sink.grpc {
        return match tokio::time::timeout(TIMEOUT, send_grpc(sink, endpoint, push)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Retry(format!("no answer within {TIMEOUT:?}"))),
        };
    }
    let attempt = async {
        let stream = connect(endpoint, false).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(stream)
            .await
            .map_err(|err| Failure::Retry(format!("{err}")))?;
        tokio::spawn(connection);
        let mut request = hyper::Request::post(format!("{}{}", endpoint.prefix, sink.path))
            .header(hyper::header::HOST, endpoint.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, sink.content_type)
            .header(hyper::header::USER_AGENT, USER_AGENT);
        if sink.gzip {
            request = request.header(hyper::header::CONTENT_ENCODING, "gzip");
        }
        let request = request
            .body(Full::new(push.body.clone()))
            .map_err(|err| Failure::Refused(format!("{err}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| Failure::Retry(format!("{err}")))?;
        let status = response.status();
        let text = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&text[..text.len().min(200)])
            .trim()
            .to_string();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == hyper::StatusCode::TOO_MANY_REQUESTS {
            Err(Failure::Retry(format!("HTTP {status}: {text}")))
        } else {
            Err(Failure::Refused(format!("HTTP {status}: {text}")))
        }
    };
    match tokio::time::timeout(TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Retry(format!("no answer within {TIMEOUT:?}"))),
    }
}

/// One unary gRPC call over HTTP/2 (prior knowledge on http, ALPN on https): the message framed with its
/// 5-byte prefix; the outcome in `grpc-status` (trailers, or the headers of a trailers-only
/// answer). Codes OTLP calls retryable (CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
/// ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS) are retried.
async fn send_grpc(sink: Sink, endpoint: &Endpoint, push: &Push) -> Result<(), Failure> {
    let stream = connect(endpoint, true).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), stream)
            .await
            .map_err(|err| Failure::Retry(format!("HTTP/2: {err}")))?;
    tokio::spawn(connection);
    let mut framed = Vec::with_capacity(push.body.len() + 5);
    framed.push(u8::from(sink.gzip)); // the compressed flag
    framed.extend_from_slice(&(push.body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&push.body);
    let mut request = hyper::Request::post(format!(
        "{}{}{}",
        endpoint.origin(),
        endpoint.prefix,
        sink.path
    ))
    .header(hyper::header::CONTENT_TYPE, sink.content_type)
    .header("te", "trailers")
    .header(hyper::header::USER_AGENT, USER_AGENT);
    if sink.gzip {
        request = request.header("grpc-encoding", "gzip");
    }
    let request = request
        .body(Full::new(Bytes::from(framed)))
        .map_err(|err| Failure::Refused(format!("{err}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| Failure::Retry(format!("{err}")))?;
    let status = response.status();
    if !status.is_success() {
        return Err(if status.is_server_error() {
            Failure::Retry(format!("HTTP {status}"))
        } else {
            Failure::Refused(format!("HTTP {status}"))
        });
    }
    let headers = response.headers().clone();
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|err| Failure::Retry(format!("{err}")))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Some(code) = field("grpc-status") else {
        return Err(Failure::Retry("no grpc-status in the answer".into()));
    };
    let code: u32 = code.trim().parse().unwrap_or(2);
    if code == 0 {
        return Ok(());
    }
    let text = format!(
        "gRPC status {code}: {}",
        field("grpc-message").unwrap_or_default()
    );
    if matches!(code, 1 | 4 | 8 | 10 | 11 | 14 | 15) {
        Err(Failure::Retry(text))
    } else {
        Err(Failure::Refused(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_or_https_with_a_host() {
        let e = Endpoint::parse("http://127.0.0.1:4040").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.prefix.as_str()),
            ("127.0.0.1:4040", "")
        );
        let e = Endpoint::parse("http://pyroscope.internal/base/").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.prefix.as_str()),
            ("pyroscope.internal:80", "/base")
        );
        let e = Endpoint::parse("https://otel.internal/").unwrap();
        assert_eq!(e.authority, "otel.internal:443");
        assert_eq!(e.origin(), "https://otel.internal:443");
        for bad in ["ftp://x:4040", "x:4040", "http://x:4040/?a=b", "not a url"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn services_are_units_then_containers_then_names() {
        let mut p = Process {
            pid: 1,
            comm: "postgres".into(),
            exe: None,
            exited: false,
            cgroup: None,
            container_id: None,
            systemd_unit: Some("postgresql@15-main.service".into()),
        };
        assert_eq!(service_name(&p), "postgresql@15-main");
        p.systemd_unit = Some("docker-ab.scope".into());
        p.container_id = Some("3f1e7a0b9c2d4e5f60718293".into());
        assert_eq!(service_name(&p), "container-3f1e7a0b9c2d");
        p.container_id = None;
        assert_eq!(service_name(&p), "postgres");
    }
}
