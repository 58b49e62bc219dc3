//! Kernel-side diagnostics (`--ebpf-log LEVEL`): the programs' aya-log records (rare,
//! rate-limited events such as an unwinding walk that stopped, with its pc and reason),
//! printed through the `log` facade as one line each on stderr by a thread that drains their
//! ring buffer. Off by default, and then free: the logging code sits behind a read-only
//! global the verifier knows, so it is dropped from the programs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::Ebpf;

/// Which kernel-side log records to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, clap::ValueEnum)]
pub enum EbpfLogLevel {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl EbpfLogLevel {
    /// aya-log's numbering (`AYA_LOG_LEVEL`): 0 logs nothing, 1 errors … 5 everything.
    pub fn number(self) -> u8 {
        self as u8
    }

    fn filter(self) -> log::LevelFilter {
        match self {
            Self::Off => log::LevelFilter::Off,
            Self::Error => log::LevelFilter::Error,
            Self::Warn => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }
}

/// One line per record on stderr: `profiler: ebpf LEVEL: MESSAGE`.
struct StderrLog {
    max: log::LevelFilter,
}

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.max
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "profiler: ebpf {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Drains the records while it lives.
pub struct EbpfLog {
    stop: Arc<AtomicBool>,
}

impl Drop for EbpfLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts printing the records of the loaded programs.
pub fn start(ebpf: &mut Ebpf, level: EbpfLogLevel) -> Result<EbpfLog> {
    let logger: &'static StderrLog = Box::leak(Box::new(StderrLog {
        max: level.filter(),
    }));
    let mut reader = aya_log::EbpfLogger::init_with_logger(ebpf, logger)
        .context("cannot read the eBPF programs' log records")?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("ebpf-log".into())
        .spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                reader.flush();
            }
        })
        .context("cannot start the eBPF log thread")?;
    Ok(EbpfLog { stop })
}
