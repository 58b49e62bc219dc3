//! Command-line interface: flags, their parsing and the hand-off to the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::collect::RecordOptions;
use crate::probes::db::DbConfig;
use crate::probes::ebpf_log::EbpfLogLevel;
use crate::probes::offcpu::{AttachMode, OffcpuConfig, StateFilter};
use crate::probes::oncpu::OncpuConfig;
use crate::probes::syscalls::SyscallsConfig;
use crate::probes::unwind::UnwindMode;
use crate::probes::{ProbeConfig, ThreadFilter};

#[derive(Debug, Parser)]
#[command(
    name = "profiler",
    version,
    about = "eBPF kernel-level latency profiler"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Record for a while — where threads wait (off-CPU time with kernel and user stacks),
    /// where they run (on-CPU samples), syscall and TCP latency, database queries (--events
    /// picks the families) — then write the capture, folded stacks, flamegraphs and a summary
    /// to the output directory.
    Record(Box<RecordArgs>),
    /// Compare two captures (or two folded files) and flag significant regressions: a
    /// differential flamegraph, ranked functions and stacks, Markdown and JSON reports.
    /// Exit code: 0 no significant regression, 1 regression found (with
    /// --fail-on-regression), 2 usage or input error.
    Diff(DiffArgs),
    /// Re-render a saved capture in another format.
    Report(ReportArgs),
    /// Live view, refreshed every interval: processes by off-CPU and run-queue time, the
    /// slowest syscalls, TCP peers and database queries (where it finds a server or library
    /// to probe). `q` quits; when stdout is not a terminal it prints plain-text
    /// snapshots instead (for scripts).
    Top(TopArgs),
    /// Record back-to-back windows into a data directory (keeping the newest --keep) and
    /// serve them on http://127.0.0.1:9464: / (a page: windows, events, flamegraphs),
    /// /healthz, /metrics (Prometheus), /captures, /events, /summary,
    /// /flamegraph?kind=offcpu|oncpu|wallclock|db|diff, /profile (pprof), /capture?seconds=N,
    /// /debug/pprof/profile?seconds=N (a fresh CPU profile), /compare?a=WINDOW&b=WINDOW.
    /// Record options go after `--` (the daemon leaves itself out unless `--include-self`).
    Daemon(DaemonArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout, e.g.
    /// `profiler completions bash > /etc/bash_completion.d/profiler`.
    Completions(CompletionsArgs),
    /// Write the man pages (roff) into a directory: profiler.1 and profiler-SUBCOMMAND.1.
    #[command(hide = true)]
    Manpage {
        /// Where to write them.
        dir: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// TOML file with any of these settings (`data_dir`, `window`, `keep`, `max_age`,
    /// `max_bytes`, `listen`, `allow_remote`, `allow_capture_get`, `capture_token_file`,
    /// `pyroscope_url`, `otlp_endpoint`, `otlp_protocol`,
    /// `baseline`, `learn`, `max_cpu`,
    /// `record` = [record options]); flags win over it. SIGHUP re-reads it (applied from the
    /// next window; `listen` stays).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the windows' capture directories go [default: /var/lib/profiler].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Length of each recording window [default: 60s].
    #[arg(long, value_parser = parse_seconds)]
    pub window: Option<Duration>,
    /// Windows kept on disk; older ones are removed [default: 60].
    #[arg(long)]
    pub keep: Option<usize>,
    /// Remove windows older than this (e.g. 24h).
    #[arg(long, value_parser = parse_seconds)]
    pub max_age: Option<Duration>,
    /// Remove the oldest windows while all of them take more than this many bytes.
    #[arg(long)]
    pub max_bytes: Option<u64>,
    /// HTTP address [default: 127.0.0.1:9464]. Loopback only, unless --allow-remote.
    #[arg(long)]
    pub listen: Option<String>,
    /// Let --listen name an address other hosts can reach (the endpoints have no
    /// authentication: a warning line says so).
    #[arg(long)]
    pub allow_remote: bool,
    /// Let `GET /capture` start an on-demand capture too (default: POST only, so a link or
    /// a crawler cannot start one).
    #[arg(long)]
    pub allow_capture_get: bool,
    /// Require `Authorization: Bearer TOKEN` on /capture, TOKEN being this file's first line
    /// (keep it 0600; `record --from-daemon --token-file FILE` sends it). Read at start.
    #[arg(long, value_name = "FILE")]
    pub capture_token_file: Option<PathBuf>,
    /// Compare every window with this capture (directory or capture.json) instead of the
    /// window before it; a significant regression becomes an event.
    #[arg(long, value_name = "CAPTURE")]
    pub baseline: Option<PathBuf>,
    /// Without --baseline: for this long from start, windows only teach the daemon the host's
    /// normal (the recent windows and each stack's, function's and query's peak) and raise no
    /// regression event, so periodic work seen then (a checkpoint, a cron job) is not news
    /// later. `0s`: judge from the fourth window. Set at start [default: 10m].
    #[arg(long, value_parser = parse_seconds, value_name = "DURATION")]
    pub learn: Option<Duration>,
    /// Push every window to Grafana Pyroscope at this URL (e.g. `http://pyroscope:4040`;
    /// `https://` verifies the server against the system's CAs, or SSL_CERT_FILE's):
    /// a series per service (its systemd service, else container, else process name) and
    /// family (`process_cpu`, `off_cpu`, `db_query`), each a pprof. A bounded queue and
    /// retries with backoff; drops are counted (`profiler_export_dropped_total`), never
    /// waited for. Set at start.
    #[arg(long, value_name = "URL")]
    pub pyroscope_url: Option<String>,
    /// Push every window as OTLP profiles (protobuf over HTTP) to this collector base URL
    /// (e.g. `http://otel-collector:4318`; requests go to `/v1development/profiles`).
    /// Queued, retried and counted like --pyroscope-url. Set at start.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// How --otlp-endpoint is spoken to: `http/protobuf` (POST to URL/v1development/profiles)
    /// or `grpc` (HTTP/2, e.g. `http://otel-collector:4317`, or over TLS with `https://`)
    /// [default: http/protobuf].
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// CPU budget, in percent of one CPU (e.g. `1%`), or `off`: the daemon measures its own
    /// cost each window (its CPU time plus the kernel's run time of its eBPF programs) and,
    /// over the budget, records one off-CPU block and one query in 2, 4, … 64 (sampled mode)
    /// and lowers the on-CPU frequency, then records one window in 2 … 64; back to full mode
    /// once well under it. `off`: always full mode, whatever it costs [default: 1%].
    #[arg(long, value_parser = parse_budget, value_name = "PERCENT|off")]
    pub max_cpu: Option<Budget>,
    /// Options for each window's `record` (e.g. `-- --events offcpu,db -p 1234`).
    #[arg(last = true)]
    pub record_args: Vec<String>,
}

/// How OTLP is sent: protobuf over HTTP/1.1, or gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    #[value(name = "http/protobuf")]
    HttpProtobuf,
    #[value(name = "grpc")]
    Grpc,
}

impl OtlpProtocol {
    /// The exporter that speaks it.
    pub fn sink(self) -> crate::export::Sink {
        match self {
            OtlpProtocol::HttpProtobuf => crate::export::OTLP,
            OtlpProtocol::Grpc => crate::export::OTLP_GRPC,
        }
    }
}

/// The daemon's CPU budget: a fraction of one CPU, or none (full mode whatever it costs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Off,
    Fraction(f64),
}

/// The daemon's budget when neither a flag nor the config file sets one: the systemd unit's.
pub const DEFAULT_BUDGET: f64 = 0.01;

impl Budget {
    pub fn fraction(self) -> Option<f64> {
        match self {
            Budget::Off => None,
            Budget::Fraction(value) => Some(value),
        }
    }
}

/// `off`, or a percentage (`parse_percent`).
pub fn parse_budget(text: &str) -> Result<Budget, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(Budget::Off);
    }
    parse_percent(text)
        .map(Budget::Fraction)
        .map_err(|err| format!("{err}, or off"))
}

/// `1%`, `0.5%` or `2` (percent) → a fraction.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches('%').trim();
    match number.parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 100.0 * 1024.0 => Ok(value / 100.0),
        _ => Err(format!(
            "{text:?} is not a percentage such as 1% (more than 0)"
        )),
    }
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Only this process (repeatable). Default: the whole host.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Refresh interval.
    #[arg(long, default_value = "1s", value_parser = parse_seconds)]
    pub interval: Duration,
    /// Show the profiler's own process too (left out by default).
    #[arg(long)]
    pub include_self: bool,
    /// Stop after this many refreshes (default: until `q` or Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// Rows per table.
    #[arg(long, default_value_t = 10)]
    pub rows: usize,
    /// Kernel BTF to read struct offsets from.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux", hide = true)]
    pub btf: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Base: a capture directory or capture.json, or a folded file.
    pub base: PathBuf,
    /// New: the same kind of input as BASE.
    pub new: PathBuf,
    /// Write diff.svg, diff.folded, report.md and report.json here.
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Exit with 1 when a significant regression is found.
    #[arg(long)]
    pub fail_on_regression: bool,
    /// Minimum relative growth to flag, in percent.
    #[arg(long, default_value_t = 10.0, value_name = "PERCENT")]
    pub threshold: f64,
    /// Minimum absolute growth to flag: microseconds of off-CPU time per second for captures
    /// (default 1000, i.e. 1 ms/s), counts for folded files (default 1% of the base total).
    #[arg(long, value_name = "AMOUNT")]
    pub min_abs: Option<f64>,
    /// Family-wise false-positive rate of the significance test.
    #[arg(long, default_value_t = 0.01)]
    pub alpha: f64,
    /// Rows per ranked list.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Svg,
    Folded,
    Pprof,
    Json,
    Md,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A capture directory or capture.json.
    pub capture: PathBuf,
    #[arg(long, value_enum)]
    pub format: ReportFormat,
    /// Output file (default: standard output).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Stacks shown by the md format.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// The folded and svg formats' root frames: the process, or its cgroup, container or
    /// systemd unit with the process below.
    #[arg(long, value_enum, default_value_t = crate::render::GroupBy::Process)]
    pub group_by: crate::render::GroupBy,
}

#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// How long to record (e.g. 30s, 500ms, 2m; a plain number is seconds). Ctrl-C ends early
    /// and still writes everything.
    #[arg(short, long, default_value = "30s", value_parser = parse_seconds)]
    pub duration: Duration,
    /// Only this process (repeatable). Default: the whole host.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only this thread (repeatable).
    #[arg(long = "tid", value_name = "TID")]
    pub tids: Vec<u32>,
    /// Only tasks in this cgroup2 subtree (repeatable): its directory under the cgroup2 mount,
    /// or its path as /proc/PID/cgroup prints it (/system.slice/nginx.service). Filtered in
    /// the kernel; children created while recording are in.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,
    /// The flamegraphs' root frames: the process, or its cgroup, container or systemd unit
    /// with the process below.
    #[arg(long, value_enum, default_value_t = crate::render::GroupBy::Process)]
    pub group_by: crate::render::GroupBy,
    /// Only this container's tasks (repeatable): its id or a prefix of 12 or more hex digits,
    /// found in the cgroup2 tree by the naming of docker, containerd, CRI-O and podman.
    #[arg(long = "container", value_name = "ID")]
    pub containers: Vec<String>,
    /// Off-CPU: ignore blocks shorter than this (e.g. 1us, 2ms; a plain number is
    /// microseconds).
    #[arg(long, default_value = "1us", value_parser = parse_micros)]
    pub min_block: Duration,
    /// Off-CPU: ignore blocks longer than this (a plain number is microseconds).
    #[arg(long, value_parser = parse_micros)]
    pub max_block: Option<Duration>,
    /// Off-CPU: which waits count: any (including preemption), sleeping (interruptible), disk
    /// (uninterruptible).
    #[arg(long, value_enum, default_value_t = StateFilter::Any)]
    pub state: StateFilter,
    /// Trace user threads, kernel threads, or all (off-CPU, on-CPU and syscalls).
    #[arg(long, value_enum, default_value_t = ThreadFilter::All)]
    pub threads: ThreadFilter,
    /// Length of the intervals the capture keeps per-stack values for (used by comparisons).
    #[arg(long, default_value = "1s", value_parser = parse_seconds)]
    pub interval: Duration,
    /// Output directory (created if missing).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// How many stacks the text summary shows.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// How to hook sched_switch (offcpu) and raw_syscalls sys_enter/sys_exit (syscalls).
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Do not hook sched_wakeup: cheaper (one program run less per wakeup), but off-CPU time
    /// is not split into blocked time and the wait for a CPU after the wakeup.
    #[arg(long)]
    pub no_runqueue_split: bool,
    /// Stacks the main stack map holds (about 1 KiB of kernel memory each); stacks that
    /// collide there go to a 4096-entry overflow map, and are counted as lost after that.
    #[arg(long, default_value_t = 16384)]
    pub stack_storage_size: u32,
    /// Probe families to record, comma-separated: offcpu (where threads wait), oncpu
    /// (where they run, sampled), syscalls (latency per process and syscall), tcp (connect
    /// latency, lifetime, bytes, RTT and retransmits per process and remote endpoint), db
    /// (query latency: PostgreSQL servers from their USDT probes, clients through libpq,
    /// SQLite and MySQL/MariaDB libraries, --db-wire). Default: all; db where it finds a
    /// server or library to probe.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub events: Option<Vec<Event>>,
    /// PostgreSQL server binary whose query probes to attach (repeatable); default: the
    /// running servers (among -p), else the installed ones.
    #[arg(long = "postgres-binary", value_name = "PATH")]
    pub postgres_binaries: Vec<PathBuf>,
    /// libpq library to probe for client-side query latency (repeatable); default: the
    /// ones the -p processes map, else the system's libpq.so.5.
    #[arg(long = "libpq", value_name = "PATH")]
    pub libpq: Vec<PathBuf>,
    /// SQLite library to probe (repeatable); default: the ones the -p processes map, else
    /// the system's libsqlite3.so.0.
    #[arg(long = "sqlite", value_name = "PATH")]
    pub sqlite: Vec<PathBuf>,
    /// MySQL/MariaDB client library (libmariadb, libmysqlclient) to probe (repeatable);
    /// default: the ones the -p processes map, else the system's.
    #[arg(long = "mysql", value_name = "PATH")]
    pub mysql: Vec<PathBuf>,
    /// Also decode PostgreSQL and Redis requests on the wire (write/sendto → first
    /// read/recvfrom) for clients that use no probed library. Off by default: it runs a
    /// program on every read and write of the watched processes (the whole host without -p).
    #[arg(long)]
    pub db_wire: bool,
    /// Also time the PostgreSQL servers' extended-protocol requests (Parse/Bind/Execute …
    /// Sync: prepared statements, queries with parameters), from their statement__status
    /// probe: two more probe hits per request, simple queries included.
    #[arg(long)]
    pub pg_extended: bool,
    /// Keep one example of each query with its literals (default: only the fingerprint,
    /// literals replaced by `?`).
    #[arg(long)]
    pub show_literals: bool,
    /// Syscalls at least this long keep their user stack (a plain number is microseconds).
    #[arg(long, default_value = "10ms", value_parser = parse_micros)]
    pub slow_syscall: Duration,
    /// On-CPU samples per second on each CPU.
    #[arg(long, default_value_t = 99)]
    pub freq: u64,
    /// Sampled off-CPU mode: record one block in N, chosen at random (a power of two); the
    /// totals are scaled up by N. Cheaper for hosts that switch a lot.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub offcpu_sample: u32,
    /// Sampled database mode: time one query in N (PostgreSQL server probes and libpq; a
    /// power of two); calls and totals are scaled up by N.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub db_sample: u32,
    /// Say what the recording cost: the kernel's run time of our eBPF programs
    /// (`bpf_run_ns`, with BPF statistics on while recording: about 20 ns more per run).
    #[arg(long)]
    pub measure_overhead: bool,
    /// Record the profiler's own process too. By default it is left out, in the kernel, by
    /// every family: its waits between snapshots, its bpf and perf_event_open calls are not
    /// what anyone came to see (the daemon likewise; `daemon -- --include-self` keeps it).
    #[arg(long)]
    pub include_self: bool,
    /// The default now; kept so that existing scripts and daemon configs still parse.
    #[arg(long, hide = true, conflicts_with = "include_self")]
    pub exclude_self: bool,
    /// Ask the `profiler daemon` listening at this address (e.g. 127.0.0.1:9464) for the
    /// capture instead of loading probes here: it records --duration (whole seconds, at most
    /// 600) with its own options, of the -p processes when given, and this command writes the
    /// result to --output.
    #[arg(long, value_name = "ADDR")]
    pub from_daemon: Option<String>,
    /// With --from-daemon: the file holding the daemon's capture token (its
    /// --capture-token-file), sent as `Authorization: Bearer`.
    #[arg(long, value_name = "FILE", requires = "from_daemon")]
    pub token_file: Option<PathBuf>,
    /// Push the capture, once written, as OTLP profiles (protobuf over HTTP) to this
    /// collector base URL (e.g. `http://127.0.0.1:4318`; to `/v1development/profiles`).
    /// Retried 3 times; a push that fails is an error (the files stay written).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// How --otlp-endpoint is spoken to: http/protobuf or grpc.
    #[arg(
        long,
        value_enum,
        default_value = "http/protobuf",
        value_name = "PROTOCOL"
    )]
    pub otlp_protocol: OtlpProtocol,
    /// Push the capture, once written, to Grafana Pyroscope at this URL (its push API; see
    /// `profiler daemon --pyroscope-url`).
    #[arg(long, value_name = "URL")]
    pub pyroscope_url: Option<String>,
    /// How user stacks are walked (every family): dwarf (from .eh_frame tables, in the kernel;
    /// frame pointers where no table covers the code) or fp (frame pointers only).
    #[arg(long, value_enum, default_value_t = UnwindMode::Dwarf)]
    pub unwind: UnwindMode,
    /// Leave CPython's own frames out: a Python process's stacks show the interpreter's
    /// native frames (`_PyEval_EvalFrameDefault`…) instead of its Python functions, and its
    /// walks cost what any program's do.
    #[arg(long)]
    pub no_python_frames: bool,
    /// Print the eBPF programs' own diagnostics on stderr, up to this level (rare and
    /// rate-limited: e.g. an unwinding walk that stopped, with its pc and reason). Off: free.
    #[arg(long, value_enum, default_value_t = EbpfLogLevel::Off, value_name = "LEVEL")]
    pub ebpf_log: EbpfLogLevel,
    /// Kernel BTF to read struct offsets from.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux", hide = true)]
    pub btf: PathBuf,
}

/// A probe family `record` can attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Event {
    Offcpu,
    Oncpu,
    Syscalls,
    Tcp,
    Db,
}

impl RecordArgs {
    pub fn into_options(self) -> Result<RecordOptions> {
        if self.duration.is_zero() {
            bail!("--duration must be more than zero");
        }
        if self.interval.is_zero() {
            bail!("--interval must be more than zero");
        }
        if let Some(max) = self.max_block
            && max < self.min_block
        {
            bail!("--max-block is shorter than --min-block");
        }
        let db_named = !self.postgres_binaries.is_empty()
            || !self.libpq.is_empty()
            || !self.sqlite.is_empty()
            || !self.mysql.is_empty();
        let db_required = self.events.is_some() || db_named;
        let events = self.events.clone().unwrap_or_else(|| {
            vec![
                Event::Offcpu,
                Event::Oncpu,
                Event::Syscalls,
                Event::Tcp,
                Event::Db,
            ]
        });
        if events.is_empty() {
            bail!("--events names no probe family (offcpu, oncpu, syscalls, tcp, db)");
        }
        if db_named && !events.contains(&Event::Db) {
            bail!(
                "--postgres-binary, --libpq, --sqlite and --mysql need the db family \
                 (--events ...,db)"
            );
        }
        if !(1..=10_000).contains(&self.freq) {
            bail!("--freq must be between 1 and 10000 Hz");
        }
        for (flag, every) in [
            ("--offcpu-sample", self.offcpu_sample),
            ("--db-sample", self.db_sample),
        ] {
            if !every.is_power_of_two() || every > 1 << 16 {
                bail!("{flag} must be a power of two from 1 to 65536, not {every}");
            }
        }
        let cgroups = self
            .cgroups
            .iter()
            .map(|c| crate::probes::cgroup::resolve(c))
            .chain(
                self.containers
                    .iter()
                    .map(|c| crate::probes::cgroup::resolve_container(c)),
            )
            .collect::<Result<Vec<_>>>()?;
        let state_name = format!("{:?}", self.state).to_lowercase();
        let threads_name = format!("{:?}", self.threads).to_lowercase();
        Ok(RecordOptions {
            duration: self.duration,
            interval: self.interval,
            output: self.output,
            probes: ProbeConfig {
                pids: self.pids,
                tids: self.tids,
                cgroups,
                threads: self.threads,
                btf_path: self.btf,
                stack_storage_size: self.stack_storage_size,
                offcpu: events.contains(&Event::Offcpu).then(|| OffcpuConfig {
                    min_block_ns: self.min_block.as_nanos() as u64,
                    max_block_ns: self.max_block.map(|d| d.as_nanos() as u64),
                    state: self.state,
                    attach: self.attach,
                    runqueue_split: !self.no_runqueue_split,
                }),
                oncpu: events.contains(&Event::Oncpu).then_some(OncpuConfig {
                    frequency: self.freq,
                }),
                syscalls: events.contains(&Event::Syscalls).then_some(SyscallsConfig {
                    slow_ns: self.slow_syscall.as_nanos() as u64,
                    attach: self.attach,
                }),
                tcp: events.contains(&Event::Tcp),
                db: events.contains(&Event::Db).then(|| DbConfig {
                    postgres_binaries: self.postgres_binaries.clone(),
                    libpq: self.libpq.clone(),
                    sqlite: self.sqlite.clone(),
                    mysql: self.mysql.clone(),
                    wire: self.db_wire,
                    optional: !db_required,
                    postgres_extended: self.pg_extended,
                }),
                offcpu_sample_every: self.offcpu_sample,
                db_sample_every: self.db_sample,
                measure_overhead: self.measure_overhead,
                exclude_self: !self.include_self,
                unwind: self.unwind,
                python_frames: !self.no_python_frames,
                ebpf_log: self.ebpf_log,
            },
            state_name,
            threads_name,
            top: self.top,
            group_by: self.group_by,
            db_required: db_required && events.contains(&Event::Db),
            show_literals: self.show_literals,
            // Removing uprobes takes the kernel ~0.1 s each: the files are written meanwhile
            // and the command waits for the detach before it exits.
            background_detach: true,
            quiet: false,
            continues: false,
        })
    }
}

/// `30s`, `500ms`, `2m`, `1h`, `10us`, `5ns`; `bare_unit_ns` applies to a plain number.
fn parse_duration(text: &str, bare_unit_ns: u64) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 30s, 500ms, 10us)"))?;
    let unit_ns = match unit.trim() {
        "" => bare_unit_ns as f64,
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (ns, us, ms, s, m, h)"
            ));
        }
    };
    let ns = value * unit_ns;
    if !ns.is_finite() || ns < 0.0 || ns > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_nanos(ns as u64))
}

/// A duration as the flags take it (`30s`, `500ms`, `24h`; a plain number is seconds).
pub fn parse_duration_text(text: &str) -> Result<Duration, String> {
    parse_seconds(text)
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    parse_duration(text, 1_000_000_000)
}

fn parse_micros(text: &str) -> Result<Duration, String> {
    parse_duration(text, 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_seconds("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_seconds("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_seconds("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_seconds("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_micros("10").unwrap(), Duration::from_micros(10));
        assert_eq!(parse_micros("3ms").unwrap(), Duration::from_millis(3));
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("3 parsecs").is_err());
        assert!(parse_seconds("").is_err());
    }

    #[test]
    fn record_requires_an_output_dir() {
        assert!(Cli::try_parse_from(["profiler", "record"]).is_err());
        let cli = Cli::try_parse_from(["profiler", "record", "-o", "x", "-p", "1", "-p", "2"]);
        let Command::Record(args) = cli.unwrap().command else {
            panic!("not record")
        };
        assert_eq!(args.pids, vec![1, 2]);
        assert_eq!(args.duration, Duration::from_secs(30));
    }
}
