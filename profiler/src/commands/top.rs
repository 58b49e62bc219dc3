//! `profiler top`: a live view over the off-CPU, syscall and TCP families. Each refresh reads
//! the cumulative kernel maps (and the TCP events that arrived) and shows what changed since
//! the previous one.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use profiler_common::offcpu::{OffcpuKey, STATE_RUNQUEUE};
use profiler_common::syscalls::SyscallKey;

use crate::cli::TopArgs;
use crate::collect::db::DbAggregator;
use crate::collect::db::events::{DbOwners, drain_db_events};
use crate::collect::tcp::TcpAggregator;
use crate::collect::{check_privileges, check_task_exists};
use crate::model::{DbProfile, DbQuery, TcpEndpoint, TcpProfile};
use crate::probes::db::DbConfig;
use crate::probes::offcpu::OffcpuConfig;
use crate::probes::syscalls::{SyscallsConfig, name as syscall_name};
use crate::probes::{ProbeConfig, Probes};

/// Per-process figures of one refresh interval.
#[derive(Default, Clone, Copy)]
struct ProcessRow {
    blocked_ns: u64,
    runqueue_ns: u64,
}

#[derive(Default, Clone, Copy)]
struct SyscallRow {
    calls: u64,
    total_ns: u64,
    errors: u64,
}

pub fn run(args: TopArgs) -> Result<()> {
    check_privileges()?;
    for pid in &args.pids {
        check_task_exists(*pid, "process")?;
    }
    let config = ProbeConfig {
        pids: args.pids.clone(),
        btf_path: args.btf.clone(),
        offcpu: Some(OffcpuConfig::default()),
        syscalls: Some(SyscallsConfig::default()),
        tcp: true,
        exclude_self: !args.include_self,
        db: Some(DbConfig {
            optional: true,
            ..DbConfig::default()
        }),
        // The live view shows no stacks: no unwinding tables to build for them.
        unwind: crate::probes::unwind::UnwindMode::Fp,
        ..Default::default()
    };
    let mut probes = Probes::load(&config)?;
    let mut tcp_events = probes.take_tcp_events()?;
    let mut db_events = if probes.db_targets.is_empty() {
        None
    } else {
        Some(probes.take_db_events()?)
    };
    let mut db_owners = DbOwners::new(&args.pids);
    // From here on every event is counted: scripts (and the tests) can start their workload.
    eprintln!(
        "profiler top: attached; a view every {:.1} s",
        args.interval.as_secs_f64()
    );
    let tty = std::io::stdout().is_terminal();
    let _raw = if tty { RawTerminal::enter() } else { None };
    let quit = Arc::new(AtomicBool::new(false));
    if tty {
        spawn_key_reader(Arc::clone(&quit));
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to a static atomic.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }

    let mut offcpu_before: HashMap<OffcpuKey, u64> = HashMap::new();
    let mut syscalls_before: HashMap<SyscallKey, (u64, u64, u64)> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut refreshes = 0u64;
    let mut last = Instant::now();
    loop {
        sleep_unless_quit(args.interval, &quit);
        if quit.load(Ordering::Relaxed) || SIGNALLED.load(Ordering::Relaxed) {
            break;
        }
        let elapsed = last.elapsed();
        last = Instant::now();

        let mut processes: HashMap<u32, ProcessRow> = HashMap::new();
        for (key, value) in probes.offcpu_totals()? {
            let before = offcpu_before.insert(key, value.total_ns).unwrap_or(0);
            let delta = value.total_ns.saturating_sub(before);
            let row = processes.entry(key.tgid).or_default();
            if key.state == STATE_RUNQUEUE {
                row.runqueue_ns += delta;
            } else {
                row.blocked_ns += delta;
            }
        }
        let mut syscalls: Vec<((u32, u32), SyscallRow)> = Vec::new();
        for (key, stats) in probes.syscall_stats(0)? {
            let now = (stats.count, stats.total_ns, stats.errors);
            let before = syscalls_before.insert(key, now).unwrap_or((0, 0, 0));
            let row = SyscallRow {
                calls: now.0.saturating_sub(before.0),
                total_ns: now.1.saturating_sub(before.1),
                errors: now.2.saturating_sub(before.2),
            };
            if row.calls > 0 {
                syscalls.push(((key.tgid, key.nr), row));
            }
        }
        let mut tcp = TcpAggregator::default();
        while let Some(item) = tcp_events.next() {
            if let Some(record) = crate::probes::tcp::decode(&item) {
                tcp.add(&record);
            }
        }
        let tcp_lost = probes
            .tcp_counters()?
            .iter()
            .find(|(name, _)| *name == "events_lost")
            .map_or(0, |(_, v)| *v);
        let mut text = render(
            &processes,
            &mut syscalls,
            &tcp.profile(),
            tcp_lost,
            &mut names,
            elapsed,
            args.rows,
        );
        if let Some(events) = db_events.as_mut() {
            let mut db = DbAggregator::new(false);
            drain_db_events(events, &mut db, &mut db_owners, None, (0, u64::MAX));
            text.push_str(&render_queries(&db.profile(), args.rows));
        }
        let mut out = std::io::stdout().lock();
        if tty {
            // Home and clear; output processing (kept on) turns \n into \r\n.
            let _ = writeln!(out, "\x1b[H\x1b[2J{text}q quits");
        } else {
            let _ = writeln!(out, "{text}");
        }
        let _ = out.flush();
        refreshes += 1;
        if args.count.is_some_and(|n| refreshes >= n) {
            break;
        }
    }
    Ok(())
}

fn render(
    processes: &HashMap<u32, ProcessRow>,
    syscalls: &mut [((u32, u32), SyscallRow)],
    tcp: &TcpProfile,
    tcp_lost: u64,
    names: &mut HashMap<u32, String>,
    elapsed: Duration,
    rows: usize,
) -> String {
    let mut name = |pid: u32| -> String {
        names
            .entry(pid)
            .or_insert_with(|| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_else(|_| format!("[pid {pid}]"))
            })
            .clone()
    };
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut out = format!(
        "profiler top: last {:.1} s\n\nPROCESSES BY OFF-CPU TIME (blocks that ended in the interval)\n{:>8} {:<16} {:>12} {:>12}\n",
        elapsed.as_secs_f64(),
        "PID",
        "COMM",
        "BLOCKED ms",
        "RUNQUEUE ms"
    );
    let mut by_offcpu: Vec<_> = processes.iter().collect();
    by_offcpu
        .sort_by_key(|(pid, row)| (std::cmp::Reverse(row.blocked_ns + row.runqueue_ns), **pid));
    for (pid, row) in by_offcpu.iter().take(rows) {
        out.push_str(&format!(
            "{:>8} {:<16.16} {:>12.1} {:>12.1}\n",
            pid,
            name(**pid),
            ms(row.blocked_ns),
            ms(row.runqueue_ns)
        ));
    }
    out.push_str(&format!(
        "\nPROCESSES BY RUN-QUEUE TIME (waiting for a CPU)\n{:>8} {:<16} {:>12}\n",
        "PID", "COMM", "RUNQUEUE ms"
    ));
    let mut by_runq: Vec<_> = processes
        .iter()
        .filter(|(_, r)| r.runqueue_ns > 0)
        .collect();
    by_runq.sort_by_key(|(pid, row)| (std::cmp::Reverse(row.runqueue_ns), **pid));
    for (pid, row) in by_runq.iter().take(rows) {
        out.push_str(&format!(
            "{:>8} {:<16} {:>12.1}\n",
            pid,
            name(**pid),
            ms(row.runqueue_ns)
        ));
    }
    out.push_str(&format!(
        "\nSLOWEST SYSCALLS (by average)\n{:>8} {:<16} {:<18} {:>8} {:>7} {:>10} {:>10}\n",
        "PID", "COMM", "SYSCALL", "CALLS", "ERRORS", "AVG ms", "TOTAL ms"
    ));
    syscalls.sort_by(|a, b| {
        let avg = |r: &SyscallRow| r.total_ns / r.calls.max(1);
        avg(&b.1).cmp(&avg(&a.1)).then(a.0.cmp(&b.0))
    });
    for ((pid, nr), row) in syscalls.iter().take(rows) {
        out.push_str(&format!(
            "{:>8} {:<16.16} {:<18} {:>8} {:>7} {:>10.3} {:>10.1}\n",
            pid,
            name(*pid),
            syscall_name(*nr),
            row.calls,
            row.errors,
            ms(row.total_ns / row.calls.max(1)),
            ms(row.total_ns)
        ));
    }
    out.push_str(&format!(
        "\nTCP PEERS (connects and closes in the interval; events lost so far: {tcp_lost})\n\
         {:>8} {:<16} {:<7} {:<30} {:>6} {:>5} {:>12} {:>6} {:>8} {:>9}\n",
        "PID",
        "COMM",
        "ROLE",
        "ENDPOINT",
        "CONNS",
        "FAIL",
        "CONN avg ms",
        "CLOSED",
        "RETRANS",
        "SRTT ms"
    ));
    let mut peers: Vec<&TcpEndpoint> = tcp.endpoints.iter().collect();
    peers.sort_by(|a, b| {
        let avg = |e: &TcpEndpoint| e.connect_total_ns / (e.connects + e.connect_failures).max(1);
        b.retransmits
            .cmp(&a.retransmits)
            .then(avg(b).cmp(&avg(a)))
            .then(b.closed.cmp(&a.closed))
            .then(a.pid.cmp(&b.pid))
    });
    for e in peers.iter().take(rows) {
        let attempts = e.connects + e.connect_failures;
        let comm = if e.comm.is_empty() { "?" } else { &e.comm };
        out.push_str(&format!(
            "{:>8} {:<16.16} {:<7} {:<30} {:>6} {:>5} {:>12} {:>6} {:>8} {:>9}\n",
            e.pid,
            comm,
            e.role,
            e.label(),
            attempts,
            e.connect_failures,
            e.connect_total_ns
                .checked_div(attempts)
                .map_or("-".to_string(), |ns| format!("{:.3}", ms(ns))),
            e.closed,
            e.retransmits,
            (e.srtt_total_us * 1000)
                .checked_div(e.closed)
                .map_or("-".to_string(), |ns| format!("{:.3}", ms(ns))),
        ));
    }
    out
}

/// The queries of the interval: slowest (by total time) and most frequent.
fn render_queries(db: &DbProfile, rows: usize) -> String {
    let mut out = String::new();
    let row = |q: &DbQuery| {
        format!(
            "{:>8} {:>10.3} {:>10.3} {:>10.1}  {}\n",
            q.calls,
            q.total_ns.checked_div(q.calls).unwrap_or(0) as f64 / 1e6,
            q.max_ns as f64 / 1e6,
            q.total_ns as f64 / 1e6,
            q.fingerprint
        )
    };
    let header = format!(
        "{:>8} {:>10} {:>10} {:>10}  QUERY\n",
        "CALLS", "AVG ms", "MAX ms", "TOTAL ms"
    );
    out.push_str(&format!(
        "\nSLOWEST QUERIES (by total time in the interval)\n{header}"
    ));
    for q in db.queries.iter().take(rows) {
        out.push_str(&row(q));
    }
    let mut frequent: Vec<&DbQuery> = db.queries.iter().collect();
    frequent.sort_by(|a, b| {
        b.calls
            .cmp(&a.calls)
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    out.push_str(&format!("\nMOST FREQUENT QUERIES\n{header}"));
    for q in frequent.into_iter().take(rows) {
        out.push_str(&row(q));
    }
    out
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Relaxed);
}

fn sleep_unless_quit(total: Duration, quit: &AtomicBool) {
    let end = Instant::now() + total;
    while Instant::now() < end {
        if quit.load(Ordering::Relaxed) || SIGNALLED.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
}

/// `q` (or Ctrl-C, which raw mode delivers as a byte) quits.
fn spawn_key_reader(quit: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        let mut stdin = std::io::stdin();
        while stdin.read(&mut byte).is_ok_and(|n| n == 1) {
            if matches!(byte[0], b'q' | b'Q' | 3) {
                quit.store(true, Ordering::Relaxed);
                return;
            }
        }
    });
}

/// The terminal in non-canonical, no-echo mode for as long as this lives.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr on stdin with a zeroed termios to fill.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
        let _ = std::io::stdout().write_all(b"\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rows_sorted_by_time() {
        let mut processes = HashMap::new();
        processes.insert(
            1,
            ProcessRow {
                blocked_ns: 5_000_000,
                runqueue_ns: 0,
            },
        );
        processes.insert(
            2,
            ProcessRow {
                blocked_ns: 1_000_000,
                runqueue_ns: 9_000_000,
            },
        );
        let mut syscalls = vec![
            (
                (1, 0),
                SyscallRow {
                    calls: 2,
                    total_ns: 2_000_000,
                    errors: 0,
                },
            ),
            (
                (2, 35),
                SyscallRow {
                    calls: 1,
                    total_ns: 20_000_000,
                    errors: 1,
                },
            ),
        ];
        let mut names = HashMap::from([(1, "a".to_string()), (2, "b".to_string())]);
        let tcp = TcpProfile {
            endpoints: vec![
                TcpEndpoint {
                    pid: 1,
                    comm: "a".into(),
                    role: "connect".into(),
                    remote: "10.0.0.1".into(),
                    port: 80,
                    connects: 3,
                    connect_total_ns: 3_000_000,
                    ..TcpEndpoint::default()
                },
                TcpEndpoint {
                    pid: 2,
                    comm: "b".into(),
                    role: "connect".into(),
                    remote: "10.0.0.2".into(),
                    port: 5432,
                    connects: 1,
                    retransmits: 4,
                    ..TcpEndpoint::default()
                },
            ],
            ..TcpProfile::default()
        };
        let text = render(
            &processes,
            &mut syscalls,
            &tcp,
            0,
            &mut names,
            Duration::from_secs(1),
            10,
        );
        let offcpu = text.find("       2 b").unwrap();
        assert!(offcpu < text.find("       1 a").unwrap(), "{text}");
        let slow = text.find("SLOWEST").unwrap();
        assert!(text[slow..].find("nanosleep").unwrap() < text[slow..].find("read").unwrap());
        // Peers with retransmits first.
        let peers = &text[text.find("TCP PEERS").unwrap()..];
        assert!(peers.find("10.0.0.2:5432").unwrap() < peers.find("10.0.0.1:80").unwrap());
        assert!(peers.contains("1.000"), "{peers}");
    }
}
