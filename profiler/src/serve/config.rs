//! The daemon's settings: flags, else the TOML config file, else the defaults; reloaded on
//! SIGHUP from the next window (a bad edit keeps the running settings).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::budget::Cost;
use crate::cli::DaemonArgs;

/// How long the daemon learns before judging windows, when nothing says.
pub const DEFAULT_LEARN: Duration = Duration::from_secs(600);

/// The daemon's settings: flags, else the config file, else the defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub window: Duration,
    pub keep: usize,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub listen: String,
    /// `listen` may be a non-loopback address.
    pub allow_remote: bool,
    /// `GET /capture` starts a capture too.
    pub allow_capture_get: bool,
    /// /capture wants `Authorization: Bearer` this.
    pub capture_token: Option<String>,
    pub baseline: Option<PathBuf>,
    /// Windows within this from start raise no event (without a baseline).
    pub learn: Duration,
    /// Where each window is pushed (Pyroscope, OTLP), checked at start.
    pub pyroscope: Option<crate::export::Endpoint>,
    pub otlp: Option<crate::export::Endpoint>,
    /// `--otlp-protocol`.
    pub otlp_protocol: crate::cli::OtlpProtocol,
    /// Fraction of one CPU; `None`: full mode whatever it costs.
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
    allow_remote: Option<bool>,
    allow_capture_get: Option<bool>,
    capture_token_file: Option<PathBuf>,
    baseline: Option<PathBuf>,
    learn: Option<String>,
    pyroscope_url: Option<String>,
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<String>,
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
        allow_remote: args.allow_remote || file.allow_remote.unwrap_or(false),
        allow_capture_get: args.allow_capture_get || file.allow_capture_get.unwrap_or(false),
        capture_token: match args.capture_token_file.clone().or(file.capture_token_file) {
            Some(path) => Some(read_token(&path)?),
            None => None,
        },
        baseline: args.baseline.clone().or(file.baseline),
        learn: duration(args.learn, file.learn.as_ref(), "learn")?.unwrap_or(DEFAULT_LEARN),
        pyroscope: match args.pyroscope_url.clone().or(file.pyroscope_url) {
            Some(url) => Some(crate::export::Endpoint::parse(&url).context("--pyroscope-url")?),
            None => None,
        },
        otlp: match args.otlp_endpoint.clone().or(file.otlp_endpoint) {
            Some(url) => Some(crate::export::Endpoint::parse(&url).context("--otlp-endpoint")?),
            None => None,
        },
        otlp_protocol: match (args.otlp_protocol, &file.otlp_protocol) {
            (Some(flag), _) => flag,
            (None, Some(text)) => {
                <crate::cli::OtlpProtocol as clap::ValueEnum>::from_str(text, false).map_err(
                    |_| anyhow::anyhow!("config otlp_protocol: {text:?}: http/protobuf or grpc"),
                )?
            }
            (None, None) => crate::cli::OtlpProtocol::HttpProtobuf,
        },
        max_cpu: match (args.max_cpu, &file.max_cpu) {
            (Some(flag), _) => flag.fraction(),
            (None, Some(text)) => crate::cli::parse_budget(text)
                .map_err(|e| anyhow::anyhow!("config max_cpu: {e}"))?
                .fraction(),
            (None, None) => Some(crate::cli::DEFAULT_BUDGET),
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

/// The `record` options of one window, from the daemon's trailing record arguments.
pub(crate) fn record_options(args: &Settings, dir: &Path) -> Result<crate::collect::RecordOptions> {
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

/// A window's record options: its directory, quiet, self-measuring, the budget's mode. The
/// daemon's own process is left out as `record` leaves itself out (`-- --include-self` keeps it).
pub(crate) fn window_options(
    args: &Settings,
    cost: &Cost,
) -> Result<crate::collect::RecordOptions> {
    // Written under a staging name, renamed once complete (see `windows`).
    let dir = args.data_dir.join(super::windows::staging_name(&format!(
        "window-{}",
        crate::collect::unix_ms()
    )));
    let mut options = record_options(args, &dir)?;
    options.quiet = true;
    options.probes.measure_overhead = true;
    options.background_detach = true;
    cost.apply(&mut options);
    Ok(options)
}

/// Where the HTTP server listens: `listen` resolved; a non-loopback address needs
/// `allow_remote` (and gets a warning line).
pub(crate) fn listen_address(settings: &Settings) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let address = settings
        .listen
        .to_socket_addrs()
        .with_context(|| format!("bad --listen address {:?}", settings.listen))?
        .next()
        .with_context(|| format!("--listen {:?} resolves to no address", settings.listen))?;
    if !address.ip().is_loopback() {
        if !settings.allow_remote {
            bail!(
                "--listen {address} is reachable from other hosts and the endpoints have no \
                 authentication; pass --allow-remote to listen there anyway"
            );
        }
        eprintln!(
            "profiler daemon: warning: HTTP on {address} is reachable from other hosts, without \
             authentication (--allow-remote)"
        );
    }
    Ok(address)
}

/// A token file's first line (at least 16 characters: a guessable token protects nothing).
pub fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.len() < 16 || token.chars().any(|c| c.is_control() || c == ' ') {
        bail!(
            "the token file {} must hold a token of at least 16 characters, no spaces, on its \
             first line",
            path.display()
        );
    }
    Ok(token)
}

/// SIGHUP: the config file again (a bad edit keeps the running settings; `listen` stays).
pub(crate) fn reload_settings(daemon_args: &DaemonArgs, args: &mut Settings, cost: &mut Cost) {
    match settings(daemon_args) {
        Ok(new) => {
            eprintln!("profiler daemon: configuration reloaded");
            let listen = std::mem::take(&mut args.listen);
            let (allow_remote, allow_capture_get) = (args.allow_remote, args.allow_capture_get);
            let capture_token = args.capture_token.take();
            let (pyroscope, otlp) = (args.pyroscope.take(), args.otlp.take());
            let otlp_protocol = args.otlp_protocol;
            *args = Settings {
                listen,
                allow_remote,
                allow_capture_get,
                capture_token,
                pyroscope,
                otlp,
                otlp_protocol,
                ..new
            };
            if cost.budget != args.max_cpu {
                // A new budget: the next window is recorded and judged against it.
                cost.budget = args.max_cpu;
                cost.skip_left = 0;
            }
        }
        Err(err) => eprintln!("profiler daemon: reload refused: {err:#}"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn daemon_settings(args: &[&str], config: Option<&str>) -> Result<Settings> {
        let dir = std::env::temp_dir().join(format!("profiler-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // One file per call: tests run in parallel.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = dir.join(format!("{call}.toml"));
        let mut all = vec!["profiler", "daemon"];
        let path = file.to_string_lossy().into_owned();
        if let Some(text) = config {
            std::fs::write(&file, text)?;
            all.extend(["--config", path.as_str()]);
        }
        all.extend(args);
        let Command::Daemon(daemon) = Cli::try_parse_from(all)?.command else {
            panic!("not daemon")
        };
        settings(&daemon)
    }

    #[test]
    fn the_cpu_budget_defaults_to_one_percent_and_can_be_turned_off() {
        assert_eq!(daemon_settings(&[], None).unwrap().max_cpu, Some(0.01));
        assert_eq!(
            daemon_settings(&["--max-cpu", "2%"], None).unwrap().max_cpu,
            Some(0.02)
        );
        assert_eq!(
            daemon_settings(&["--max-cpu", "off"], None)
                .unwrap()
                .max_cpu,
            None
        );
        assert_eq!(
            daemon_settings(&[], Some("max_cpu = \"off\"\n"))
                .unwrap()
                .max_cpu,
            None
        );
        assert_eq!(
            daemon_settings(&["--max-cpu", "3%"], Some("max_cpu = \"off\"\n"))
                .unwrap()
                .max_cpu,
            Some(0.03)
        );
        assert!(daemon_settings(&["--max-cpu", "lots"], None).is_err());
        assert!(daemon_settings(&[], Some("max_cpu = \"lots\"\n")).is_err());
    }

    #[test]
    fn push_endpoints_come_from_flags_or_the_config_file() {
        let settings = daemon_settings(
            &[],
            Some(
                "pyroscope_url = \"http://pyro:4040\"\notlp_endpoint = \"http://otel:4317\"\n\
                 otlp_protocol = \"grpc\"\n",
            ),
        )
        .unwrap();
        assert_eq!(settings.pyroscope.unwrap().url, "http://pyro:4040");
        assert_eq!(settings.otlp.unwrap().url, "http://otel:4317");
        assert_eq!(settings.otlp_protocol, crate::cli::OtlpProtocol::Grpc);
        let flags = daemon_settings(&["--otlp-endpoint", "http://a:4318"], None).unwrap();
        assert_eq!(flags.otlp_protocol, crate::cli::OtlpProtocol::HttpProtobuf);
        assert!(daemon_settings(&[], Some("otlp_protocol = \"carrier pigeon\"\n")).is_err());
        let https = daemon_settings(&["--pyroscope-url", "https://pyro:4040"], None).unwrap();
        assert_eq!(https.pyroscope.unwrap().url, "https://pyro:4040");
        assert!(daemon_settings(&["--pyroscope-url", "ftp://pyro:4040"], None).is_err());
        assert!(daemon_settings(&[], Some("otlp_endpoint = \"otel:4317\"\n")).is_err());
    }

    fn settings_with(record_args: &[&str]) -> Settings {
        Settings {
            data_dir: std::env::temp_dir(),
            window: Duration::from_secs(1),
            keep: 1,
            max_age: None,
            max_bytes: None,
            listen: String::new(),
            allow_remote: false,
            allow_capture_get: false,
            capture_token: None,
            baseline: None,
            learn: DEFAULT_LEARN,
            pyroscope: None,
            otlp: None,
            otlp_protocol: crate::cli::OtlpProtocol::HttpProtobuf,
            max_cpu: None,
            record_args: record_args.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn windows_leave_the_daemon_out_unless_its_record_options_include_it() {
        let cost = Cost::default();
        let default = window_options(&settings_with(&[]), &cost).unwrap();
        assert!(default.probes.exclude_self);
        let included = window_options(&settings_with(&["--include-self"]), &cost).unwrap();
        assert!(!included.probes.exclude_self);
    }

    /// The packaged /etc/profiler.toml: as shipped (all commented) it gives the defaults;
    /// with every setting uncommented, each key is one the daemon knows and its value the
    /// default it documents.
    #[test]
    fn the_packaged_config_documents_the_defaults() {
        let text = include_str!("../../contrib/profiler.toml");
        let defaults = daemon_settings(&[], None).unwrap();
        let shipped = daemon_settings(&[], Some(text)).unwrap();
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
        let settings: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.contains(" = ") && !l.starts_with(' '))
            .map(|l| format!("{l}\n"))
            .collect();
        let file: FileConfig = toml::from_str(&settings).expect("documented keys");
        assert_eq!(file.data_dir, Some(defaults.data_dir));
        assert_eq!(file.window.as_deref(), Some("60s"));
        assert_eq!(file.keep, Some(defaults.keep));
        assert_eq!(file.listen, Some(defaults.listen));
        assert_eq!(file.allow_remote, Some(false));
        assert_eq!(file.allow_capture_get, Some(false));
        assert_eq!(file.learn.as_deref(), Some("10m"));
        assert_eq!(defaults.learn, DEFAULT_LEARN);
        assert_eq!(
            crate::cli::parse_budget(file.max_cpu.as_deref().unwrap())
                .unwrap()
                .fraction(),
            defaults.max_cpu
        );
        assert!(file.record.is_some() && file.max_age.is_some() && file.baseline.is_some());
    }
}
