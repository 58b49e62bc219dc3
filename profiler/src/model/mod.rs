//! The Capture: one model of what was recorded, from which every output is rendered and
//! which `diff` compares. Saved as versioned JSON (`capture.json`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

pub const CAPTURE_FORMAT: &str = "profiler-capture";
pub const CAPTURE_VERSION: u32 = 1;
pub const CAPTURE_FILE: &str = "capture.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Capture {
    /// Always `profiler-capture`: tells our files from others.
    pub format: String,
    /// Bumped on incompatible changes; readers refuse versions they do not know.
    pub version: u32,
    pub metadata: Metadata,
    /// Processes that appear in any family's stacks.
    #[serde(default)]
    pub processes: Vec<Process>,
    #[serde(default)]
    pub offcpu: Option<OffcpuProfile>,
    #[serde(default)]
    pub oncpu: Option<OncpuProfile>,
    #[serde(default)]
    pub syscalls: Option<SyscallProfile>,
    #[serde(default)]
    pub tcp: Option<TcpProfile>,
    #[serde(default)]
    pub db: Option<DbProfile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub host: String,
    pub kernel: String,
    pub profiler_version: String,
    /// Wall-clock start, milliseconds since the Unix epoch.
    pub start_unix_ms: u64,
    pub duration_ns: u64,
    /// End of each interval, nanoseconds from the start; the per-interval values of every
    /// stack line up with these.
    pub interval_ends_ns: Vec<u64>,
    pub filters: Filters,
    /// How the kernel side attached (`tp_btf` or `tracepoint`).
    pub attach: String,
    /// Kernel-side counters (drops, collisions, full maps) and symbolization counters.
    pub counters: BTreeMap<String, u64>,
    /// Sampled mode: one off-CPU block in this many was recorded and the figures are scaled
    /// up (0 or 1: every block).
    #[serde(default, skip_serializing_if = "all_recorded")]
    pub offcpu_sample_every: u32,
    /// Sampled mode: one database query in this many was timed (0 or 1: every query).
    #[serde(default, skip_serializing_if = "all_recorded")]
    pub db_sample_every: u32,
    /// Binaries whose user addresses did not all resolve to a symbol (stripped, no debug
    /// info, JIT or anonymous code, garbage from a broken walk), most unresolved first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unresolved_by_binary: Vec<UnresolvedBinary>,
}

/// Unresolved user addresses of one binary.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UnresolvedBinary {
    /// The binary's path, or `[vdso]`, `[anon]`, `[unknown]` (no mapping held the address).
    pub binary: String,
    pub unresolved: u64,
    /// Distinct addresses seen in it.
    pub addresses: u64,
}

fn all_recorded(every: &u32) -> bool {
    *every <= 1
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Filters {
    pub pids: Vec<u32>,
    pub tids: Vec<u32>,
    /// `--cgroup`: the cgroup2 subtrees recorded (paths from the cgroup2 root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<String>,
    pub min_block_ns: u64,
    pub max_block_ns: Option<u64>,
    pub state: String,
    pub threads: String,
}

/// Blocked time per stack; `Stack::total_ns` is time off the CPU, `count` the blocks. A
/// block that ended with a wakeup is split: the part before the wakeup keeps the thread's
/// state, the wait for a CPU after it is a `runqueue` stack with the same frames.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OffcpuProfile {
    pub stacks: Vec<Stack>,
    /// Run-queue latency per process.
    #[serde(default)]
    pub runqueue: Vec<RunqueueHistogram>,
}

/// Run-queue latency of one process: how long its threads waited for a CPU once runnable
/// (after a wakeup, or after being preempted).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunqueueHistogram {
    pub pid: u32,
    pub comm: String,
    pub waits: u64,
    /// `buckets[b]`: waits in [2^(b-1), 2^b) ns (`buckets[0]`: zero).
    pub buckets: Vec<u64>,
}

impl RunqueueHistogram {
    /// Upper bound (ns) of the bucket that holds quantile `q` of the waits.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        log2_quantile_ns(&self.buckets, self.waits, q)
    }
}

/// Upper bound (ns) of the log2 bucket (`b`: [2^(b-1), 2^b)) that holds quantile `q`.
pub fn log2_quantile_ns(buckets: &[u64], total: u64, q: f64) -> u64 {
    let target = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bucket, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= target {
            return if bucket == 0 {
                0
            } else {
                1u64 << bucket.min(63)
            };
        }
    }
    0
}

/// Syscall latency: per process and syscall, and the user stacks of slow calls.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyscallProfile {
    pub slow_threshold_ns: u64,
    /// Sorted by total time, largest first.
    pub stats: Vec<SyscallStat>,
    /// Calls at least `slow_threshold_ns` long: user frames, then `[syscall NAME]`; `state`
    /// is `syscall`.
    pub slow: Vec<Stack>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyscallStat {
    pub pid: u32,
    pub comm: String,
    pub nr: u32,
    pub name: String,
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// `buckets[b]`: calls that took [2^(b-1), 2^b) ns.
    pub buckets: Vec<u64>,
}

impl SyscallStat {
    pub fn quantile_ns(&self, q: f64) -> u64 {
        log2_quantile_ns(&self.buckets, self.count, q)
    }
}

/// CPU samples per stack; `Stack::count` is samples, `total_ns` their CPU time estimate
/// (samples × 1/frequency), `state` is `running`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OncpuProfile {
    pub frequency_hz: u64,
    pub stacks: Vec<Stack>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    /// The process was gone before the capture ended.
    pub exited: bool,
    /// Its cgroup2 path (`/proc/PID/cgroup`), read while it lived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The container it runs in, where the cgroup path shows a runtime's naming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Its systemd unit (`.service` or `.scope`), where the cgroup path shows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
}

/// Blocked time of one thread under one (kernel + user) stack and task state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stack {
    pub pid: u32,
    pub tid: u32,
    /// Process name (the root frame of flamegraphs).
    pub comm: String,
    /// Why the thread was off the CPU: `runqueue`, `sleep`, `disk`, `idle`, `other`.
    pub state: String,
    /// Root (outermost user frame) first, leaf (innermost kernel frame) last.
    pub frames: Vec<Frame>,
    pub total_ns: u64,
    pub count: u64,
    /// Blocked nanoseconds in each interval (see `Metadata::interval_ends_ns`).
    pub intervals: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Frame {
    pub name: String,
    pub kind: FrameKind,
    /// The file the frame lives in (user frames), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Offset in `module` (user) or the address (kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Inlined into its caller (the frame before it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// Could not be resolved to a symbol; `name` is `module+0xoffset`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unresolved: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    User,
    Kernel,
    /// Placeholders such as `[no user stack]`.
    Synthetic,
}

/// Database queries by fingerprint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DbProfile {
    /// Whether `example` holds query text with its literals (`--show-literals`).
    pub show_literals: bool,
    pub queries: Vec<DbQuery>,
    /// Client-side queries by the code path that issued them: the stack's leaf is a synthetic
    /// `[db] FINGERPRINT` frame; `total_ns` is query time, `count` calls.
    #[serde(default)]
    pub stacks: Vec<Stack>,
    /// N+1 suspects: one fingerprint issued many times in a row by one thread.
    #[serde(default)]
    pub n_plus_one: Vec<NPlusOne>,
    /// Per process: which sources timed its queries, or its database connections that no
    /// source decoded.
    #[serde(default)]
    pub coverage: Vec<DbCoverage>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DbCoverage {
    pub pid: u32,
    pub comm: String,
    /// A server: its queries were timed on the server's side (`postgres-usdt`).
    pub server: bool,
    /// (source, calls) of its timed queries.
    pub sources: Vec<(String, u64)>,
    /// With no timed query: its established TCP connections to database ports at the end
    /// of the capture (`ADDRESS:PORT KIND`, kind `postgres`, `mysql` or `redis`).
    pub untimed_connections: Vec<String>,
    /// What those connections carried during the capture (sock_diag's `bytes_acked` and
    /// `bytes_received` at its start and end): bytes sent, and received.
    #[serde(default)]
    pub untimed_bytes_sent: u64,
    #[serde(default)]
    pub untimed_bytes_received: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NPlusOne {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub source: String,
    pub fingerprint: String,
    /// Runs of at least 10 calls, each within 1 ms of the previous one's end (the thread's
    /// wait for a CPU in between not counted).
    pub runs: u64,
    pub longest_run: u64,
    /// Calls in those runs, and their time.
    pub queries: u64,
    pub total_ns: u64,
    /// The code path, root first (client-side sources). Stacks that differ only in a Python
    /// interpreter's own frames are one code path; this is the one most of its queries had.
    pub frames: Vec<Frame>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DbQuery {
    /// `postgres-usdt`: timed inside the server by its query__start/query__done probes;
    /// `libpq`: timed in the client, from PQsendQuery* to the last PQgetResult.
    pub source: String,
    /// The server (postmaster) whose backends ran it, or the client process.
    pub pid: u32,
    pub comm: String,
    /// The database the client talked to (`ip:port`, `[ip6]:port`, `unix`), when known:
    /// libpq and wire sources; empty otherwise.
    #[serde(default)]
    pub endpoint: String,
    /// Literals replaced by `?`, lists collapsed, whitespace and comments normalized.
    pub fingerprint: String,
    pub calls: u64,
    /// Queries that ended without their done probe (failed).
    pub errors: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// Standard deviation of the call latencies (all calls), for `diff`'s significance test.
    #[serde(default)]
    pub stddev_ns: f64,
    /// Exact quantiles (over a uniform sample of 100 000 calls at most).
    pub p50_ns: u64,
    pub p95_ns: u64,
    pub p99_ns: u64,
    /// `buckets[b]`: calls that took [2^(b-1), 2^b) ns.
    pub buckets: Vec<u64>,
    /// One query as sent, literals included (only with `--show-literals`).
    pub example: Option<String>,
    /// Some query text was cut at the kernel side's limit (256 bytes).
    pub truncated: bool,
}

/// TCP connections: per (process, role, remote endpoint) aggregates, and the connections one
/// by one up to a limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TcpProfile {
    pub endpoints: Vec<TcpEndpoint>,
    /// Closed connections and failed connects, in the order they ended.
    pub connections: Vec<TcpConnection>,
    /// Connections left out of `connections` by its limit (still in `endpoints`).
    pub connections_not_listed: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TcpEndpoint {
    /// 0 when no process acted on the socket in process context (e.g. reset by the peer
    /// before anyone accepted it).
    pub pid: u32,
    pub comm: String,
    /// `connect`: this process connected to `remote`:`port`; `accept`: clients at `remote`
    /// connected to this process's local `port`.
    pub role: String,
    pub remote: String,
    pub port: u16,
    pub connects: u64,
    pub connect_failures: u64,
    pub connect_total_ns: u64,
    pub connect_max_ns: u64,
    /// `connect_buckets[b]`: connects (established or failed) that took [2^(b-1), 2^b) ns.
    pub connect_buckets: Vec<u64>,
    /// Connections that closed.
    pub closed: u64,
    pub lifetime_total_ns: u64,
    pub lifetime_max_ns: u64,
    pub bytes_received: u64,
    /// Bytes the peer acknowledged.
    pub bytes_sent: u64,
    /// Retransmitted segments of the closed connections (the sockets' own counts).
    pub retransmits: u64,
    /// Sum and max of the smoothed RTT at close, microseconds.
    pub srtt_total_us: u64,
    pub srtt_max_us: u64,
}

impl TcpEndpoint {
    /// Upper bound (ns) of the log2 bucket that holds quantile `q` of the connect times.
    pub fn connect_quantile_ns(&self, q: f64) -> u64 {
        log2_quantile_ns(
            &self.connect_buckets,
            self.connects + self.connect_failures,
            q,
        )
    }

    /// `remote:port` for connects, `remote → :port` for accepted clients.
    pub fn label(&self) -> String {
        let host = if self.remote.contains(':') {
            format!("[{}]", self.remote)
        } else {
            self.remote.clone()
        };
        if self.role == "accept" {
            format!("{host} -> :{}", self.port)
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TcpConnection {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub role: String,
    /// `ip:port` (IPv6 as `[ip]:port`).
    pub local: String,
    pub remote: String,
    /// Connect latency (connects only).
    pub connect_ns: Option<u64>,
    /// The connect failed (refused, timed out, reset).
    pub failed: bool,
    /// From connect() or the accepted connection's establishment to CLOSE.
    pub lifetime_ns: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Retransmitted segments: the kernel's own count for the socket
    /// (`tcp_sock.total_retrans`, read at close).
    pub retransmits: u64,
    /// Retransmits the profiler saw happen (tcp:tcp_retransmit_skb). The kernel counts a
    /// few the tracepoint does not report (seen: 1 in 25 with forced drops), so the figure
    /// above is the socket's own.
    pub retransmit_events: u64,
    /// Smoothed RTT at close, microseconds.
    pub srtt_us: u64,
}

impl DbProfile {
    /// The queries no stack carries: timed without an issuing stack (a server's probes, the
    /// wire), by (pid, fingerprint) absent from `stacks`' `[db] FINGERPRINT` leaves.
    pub fn queries_without_stacks(&self) -> impl Iterator<Item = &DbQuery> {
        let with_stacks: std::collections::HashSet<(u32, &str)> = self
            .stacks
            .iter()
            .filter_map(|s| Some((s.pid, s.frames.last()?.name.strip_prefix("[db] ")?)))
            .collect();
        self.queries
            .iter()
            .filter(move |q| !with_stacks.contains(&(q.pid, q.fingerprint.as_str())))
    }
}

impl Capture {
    pub fn new(metadata: Metadata) -> Self {
        Self {
            format: CAPTURE_FORMAT.to_string(),
            version: CAPTURE_VERSION,
            metadata,
            processes: Vec::new(),
            offcpu: None,
            oncpu: None,
            syscalls: None,
            tcp: None,
            db: None,
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = std::io::BufWriter::new(file);
        serde_json::to_writer(&mut writer, self)
            .with_context(|| format!("cannot write {}", path.display()))?;
        std::io::Write::flush(&mut writer)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Loads a capture file, or `capture.json` inside a capture directory.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(CAPTURE_FILE)
        } else {
            path.to_path_buf()
        };
        let data =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        Self::from_slice(&data)
            .with_context(|| format!("{} is not a usable capture", file.display()))
    }

    pub fn from_slice(data: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct Header {
            format: String,
            version: u32,
        }
        let header: Header =
            serde_json::from_slice(data).context("not a profiler capture (no format/version)")?;
        if header.format != CAPTURE_FORMAT {
            bail!("unknown format {:?}", header.format);
        }
        if header.version != CAPTURE_VERSION {
            bail!(
                "capture version {} is not supported (this profiler reads version {CAPTURE_VERSION})",
                header.version
            );
        }
        serde_json::from_slice(data).context("corrupt capture")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small capture: one off-CPU stack of process 7 (`app`).
    pub(crate) fn sample() -> Capture {
        let mut capture = Capture::new(Metadata {
            unresolved_by_binary: Vec::new(),
            host: "h".into(),
            kernel: "6.1".into(),
            profiler_version: "0.1.0".into(),
            start_unix_ms: 1,
            duration_ns: 2_000_000_000,
            interval_ends_ns: vec![1_000_000_000, 2_000_000_000],
            filters: Filters::default(),
            attach: "tp_btf".into(),
            counters: BTreeMap::from([("stack_collisions".to_string(), 0)]),
            offcpu_sample_every: 0,
            db_sample_every: 0,
        });
        capture.offcpu = Some(OffcpuProfile {
            stacks: vec![Stack {
                pid: 7,
                tid: 8,
                comm: "app".into(),
                state: "sleep".into(),
                frames: vec![Frame {
                    name: "main".into(),
                    kind: FrameKind::User,
                    module: Some("/bin/app".into()),
                    offset: Some(0x10),
                    inlined: false,
                    unresolved: false,
                }],
                total_ns: 5,
                count: 1,
                intervals: vec![5, 0],
            }],
            runqueue: vec![],
        });
        capture
    }

    #[test]
    fn round_trips_through_json() {
        let capture = sample();
        let json = serde_json::to_vec(&capture).unwrap();
        assert_eq!(Capture::from_slice(&json).unwrap(), capture);
    }

    #[test]
    fn refuses_foreign_future_and_truncated_files() {
        assert!(Capture::from_slice(b"{\"format\":\"other\",\"version\":1}").is_err());
        let mut capture = sample();
        capture.version = CAPTURE_VERSION + 1;
        let err = Capture::from_slice(&serde_json::to_vec(&capture).unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("not supported"));
        let json = serde_json::to_vec(&sample()).unwrap();
        assert!(Capture::from_slice(&json[..json.len() / 2]).is_err());
        assert!(Capture::from_slice(b"\x00\x01garbage").is_err());
    }
}
