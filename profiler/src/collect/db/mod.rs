//! Database family, aggregated: per-fingerprint latency statistics and N+1 suspects from the
//! queries every source reports (server probes, client libraries, the wire).
//!
//! Beside it: `fingerprint` (query normalization), `wire` (decoding client requests) and
//! `coverage` (which source timed each process, and database connections none decoded).

pub mod coverage;
pub mod events;
pub mod fingerprint;
pub mod socket_bytes;
pub mod wire;

use std::collections::HashMap;

use crate::model::{DbProfile, DbQuery};

pub use fingerprint::{FINGERPRINT_MAX, fingerprint};

/// Latencies kept per fingerprint for exact quantiles; beyond, a uniform reservoir sample.
const SAMPLES_MAX: usize = 100_000;
const BUCKETS: usize = 40;
/// N+1 suspects: at least this many calls of one fingerprint in a row from one thread…
pub const N_PLUS_ONE_MIN_RUN: u64 = 10;
/// …each called within this long of the previous one's end, not counting time the thread
/// spent waiting for a CPU in between (a loop preempted mid-round on a busy host is still one
/// loop; the scheduler's delay is not the program's), nor the probe's own work at the call
/// (walking a deep stack takes tens of microseconds, sometimes far more: it is ours).
pub const N_PLUS_ONE_MAX_GAP_NS: u64 = 1_000_000;

/// One query as observed.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub source: &'a str,
    /// The server (server-side sources) or the client process.
    pub pid: u32,
    pub comm: &'a str,
    pub tid: u32,
    pub text: &'a str,
    pub truncated: bool,
    pub error: bool,
    pub start_ns: u64,
    pub duration_ns: u64,
    /// The thread's run-queue wait so far (the kernel's `run_delay`) when the application
    /// called and when the query was reported (at or after its end), both plus 1; 0 when
    /// unknown.
    pub queued_start_ns: u64,
    pub queued_end_ns: u64,
    /// The probe's work (stack walk, text read) between the call and `start_ns`: not the
    /// application's time, left out of the gap before the query.
    pub probe_ns: u64,
    /// The issuing code path (client-side sources), negative when none.
    pub user_stack_id: i32,
    /// The database's address, when known (else empty).
    pub endpoint: &'a str,
}

/// (source, process, fingerprint).
type QueryKey = (String, u32, String);

/// Consecutive calls of one fingerprint by one thread.
#[derive(Debug, Clone)]
struct Run {
    key: QueryKey,
    comm: String,
    stack_id: i32,
    count: u64,
    total_ns: u64,
    last_end_ns: u64,
    /// The thread's run-queue wait so far when its last query was reported.
    last_queued_ns: u64,
}

/// An N+1 suspect before its stack is symbolized.
#[derive(Debug, Clone, Default)]
pub struct Suspect {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub source: String,
    pub fingerprint: String,
    pub user_stack_id: i32,
    pub runs: u64,
    pub longest_run: u64,
    pub queries: u64,
    pub total_ns: u64,
}

#[derive(Debug, Default)]
struct Stat {
    source: String,
    pid: u32,
    comm: String,
    calls: u64,
    errors: u64,
    total_ns: u64,
    max_ns: u64,
    buckets: Vec<u64>,
    samples: Vec<u64>,
    seen: u64,
    /// Welford's running mean and sum of squared deviations (ns).
    mean: f64,
    m2: f64,
    example: Option<String>,
    truncated: bool,
    /// Calls and time per issuing stack (user stack id) and thread.
    stacks: HashMap<(i32, u32), (u64, u64)>,
}

/// Per (source, server process, fingerprint) statistics.
#[derive(Debug, Default)]
pub struct DbAggregator {
    stats: HashMap<(QueryKey, String), Stat>,
    show_literals: bool,
    rng: u64,
    runs: HashMap<(String, u32, u32), Run>,
    suspects: HashMap<(QueryKey, i32), Suspect>,
}

impl DbAggregator {
    pub fn new(show_literals: bool) -> Self {
        Self {
            show_literals,
            rng: 0x9E37_79B9_7F4A_7C15,
            ..Self::default()
        }
    }

    pub fn add(&mut self, q: &Observed) {
        let (source, pid, comm, text, truncated, error, duration_ns) = (
            q.source,
            q.pid,
            q.comm,
            q.text,
            q.truncated,
            q.error,
            q.duration_ns,
        );
        let fp = fingerprint(text);
        let key: QueryKey = (source.to_string(), pid, fp);
        if !error {
            self.follow_run(&key, q);
        }
        let stat = self
            .stats
            .entry((key, q.endpoint.to_string()))
            .or_insert_with(|| Stat {
                source: source.to_string(),
                pid,
                comm: comm.to_string(),
                buckets: vec![0; BUCKETS],
                ..Stat::default()
            });
        stat.truncated |= truncated;
        if self.show_literals && stat.example.is_none() {
            stat.example = Some(text.to_string());
        }
        if error {
            stat.errors += 1;
            return;
        }
        stat.calls += 1;
        stat.total_ns += duration_ns;
        let x = duration_ns as f64;
        let d = x - stat.mean;
        stat.mean += d / stat.calls as f64;
        stat.m2 += d * (x - stat.mean);
        let per_stack = stat.stacks.entry((q.user_stack_id, q.tid)).or_default();
        per_stack.0 += 1;
        per_stack.1 += duration_ns;
        stat.max_ns = stat.max_ns.max(duration_ns);
        let bucket = (64 - duration_ns.leading_zeros() as usize).min(BUCKETS - 1);
        stat.buckets[bucket] += 1;
        stat.seen += 1;
        if stat.samples.len() < SAMPLES_MAX {
            stat.samples.push(duration_ns);
        } else {
            // Reservoir sampling (xorshift): every call equally likely to be kept.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let slot = self.rng % stat.seen;
            if (slot as usize) < SAMPLES_MAX {
                stat.samples[slot as usize] = duration_ns;
            }
        }
    }

    /// Extends the thread's run of one fingerprint, or closes it and starts another.
    fn follow_run(&mut self, key: &QueryKey, q: &Observed) {
        // Per source too: one call can be seen twice (client library and server probes).
        let thread = (q.source.to_string(), q.pid, q.tid);
        let end = q.start_ns + q.duration_ns;
        if let Some(run) = self.runs.get_mut(&thread)
            && run.key == *key
            && Self::own_gap(run, q) <= N_PLUS_ONE_MAX_GAP_NS
        {
            run.count += 1;
            run.total_ns += q.duration_ns;
            run.last_end_ns = end;
            run.last_queued_ns = q.queued_end_ns;
            return;
        }
        let new = Run {
            key: key.clone(),
            comm: q.comm.to_string(),
            stack_id: q.user_stack_id,
            count: 1,
            total_ns: q.duration_ns,
            last_end_ns: end,
            last_queued_ns: q.queued_end_ns,
        };
        let tid = thread.2;
        if let Some(old) = self.runs.insert(thread, new) {
            Self::close_run(&mut self.suspects, tid, old);
        }
    }

    /// The time between the run's last query and the call of `q` that the thread spent
    /// running or sleeping (its run-queue wait in between left out; both readings are taken
    /// while the thread runs, the first at or after the last query's end, the second at the
    /// call, so no wait outside the gap is taken out).
    fn own_gap(run: &Run, q: &Observed) -> u64 {
        let called = q.start_ns.saturating_sub(q.probe_ns);
        let gap = called.saturating_sub(run.last_end_ns);
        let queued = if run.last_queued_ns == 0 || q.queued_start_ns == 0 {
            0 // unknown
        } else {
            q.queued_start_ns.saturating_sub(run.last_queued_ns)
        };
        gap.saturating_sub(queued)
    }

    fn close_run(suspects: &mut HashMap<(QueryKey, i32), Suspect>, tid: u32, run: Run) {
        if run.count < N_PLUS_ONE_MIN_RUN {
            return;
        }
        let suspect = suspects
            .entry((run.key.clone(), run.stack_id))
            .or_insert_with(|| Suspect {
                pid: run.key.1,
                tid,
                comm: run.comm.clone(),
                source: run.key.0.clone(),
                fingerprint: run.key.2.clone(),
                user_stack_id: run.stack_id,
                ..Suspect::default()
            });
        suspect.runs += 1;
        suspect.longest_run = suspect.longest_run.max(run.count);
        suspect.queries += run.count;
        suspect.total_ns += run.total_ns;
    }

    /// N+1 suspects (runs still open count too), most queries first.
    pub fn suspects(&self) -> Vec<Suspect> {
        let mut suspects = self.suspects.clone();
        for ((_, _, tid), run) in &self.runs {
            Self::close_run(&mut suspects, *tid, run.clone());
        }
        let mut out: Vec<Suspect> = suspects.into_values().collect();
        out.sort_by(|a, b| {
            b.queries
                .cmp(&a.queries)
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        out
    }

    /// (source, pid, fingerprint, user stack id, tid, calls, total ns) of every issuing stack.
    pub fn stack_usage(&self) -> Vec<(String, u32, String, i32, u32, u64, u64)> {
        let mut out = Vec::new();
        for (((source, pid, fp), _), stat) in &self.stats {
            for ((stack, tid), (calls, total)) in &stat.stacks {
                out.push((
                    source.clone(),
                    *pid,
                    fp.clone(),
                    *stack,
                    *tid,
                    *calls,
                    *total,
                ));
            }
        }
        out
    }

    /// Queries sorted by total time.
    pub fn profile(&self) -> DbProfile {
        let mut queries: Vec<DbQuery> = self
            .stats
            .iter()
            .map(|(((_, _, fp), endpoint), s)| {
                let mut samples = s.samples.clone();
                samples.sort_unstable();
                let q = |p: f64| -> u64 {
                    if samples.is_empty() {
                        0
                    } else {
                        samples[((samples.len() - 1) as f64 * p).round() as usize]
                    }
                };
                DbQuery {
                    source: s.source.clone(),
                    pid: s.pid,
                    comm: s.comm.clone(),
                    endpoint: endpoint.clone(),
                    fingerprint: fp.clone(),
                    calls: s.calls,
                    errors: s.errors,
                    total_ns: s.total_ns,
                    max_ns: s.max_ns,
                    stddev_ns: if s.calls > 1 {
                        (s.m2 / (s.calls - 1) as f64).sqrt()
                    } else {
                        0.0
                    },
                    p50_ns: q(0.5),
                    p95_ns: q(0.95),
                    p99_ns: q(0.99),
                    buckets: s.buckets.clone(),
                    example: s.example.clone(),
                    truncated: s.truncated,
                }
            })
            .collect();
        queries.sort_by(|a, b| {
            b.total_ns
                .cmp(&a.total_ns)
                .then(b.calls.cmp(&a.calls))
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        DbProfile {
            show_literals: self.show_literals,
            queries,
            ..DbProfile::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(text: &str, duration_ns: u64, start_ns: u64) -> Observed<'_> {
        Observed {
            source: "postgres-usdt",
            pid: 10,
            comm: "postgres",
            tid: 11,
            text,
            truncated: false,
            error: false,
            start_ns,
            duration_ns,
            queued_start_ns: 0,
            queued_end_ns: 0,
            probe_ns: 0,
            user_stack_id: 3,
            endpoint: "10.0.0.5:5432",
        }
    }

    #[test]
    fn tight_runs_of_one_fingerprint_are_n_plus_one_suspects() {
        let mut agg = DbAggregator::new(false);
        let mut t = 0;
        // Three runs of 30 lookups (100 us each, 50 us apart), each followed by another query.
        for _ in 0..3 {
            for i in 0..30 {
                agg.add(&obs(
                    &format!("SELECT * FROM users WHERE id = {i}"),
                    100_000,
                    t,
                ));
                t += 150_000;
            }
            agg.add(&obs("SELECT count(*) FROM orders", 100_000, t));
            t += 150_000;
        }
        // A slow trickle of the same lookup (2 ms apart) is no suspect.
        for i in 0..30 {
            agg.add(&obs(
                &format!("SELECT * FROM items WHERE id = {i}"),
                100_000,
                t,
            ));
            t += 2_100_000;
        }
        let suspects = agg.suspects();
        assert_eq!(suspects.len(), 1, "{suspects:?}");
        let s = &suspects[0];
        assert_eq!(s.fingerprint, "SELECT * FROM users WHERE id = ?");
        assert_eq!((s.runs, s.longest_run, s.queries), (3, 30, 90));
        assert_eq!(s.total_ns, 90 * 100_000);
        assert_eq!(s.user_stack_id, 3);
    }

    #[test]
    fn run_queue_wait_between_calls_does_not_break_a_run() {
        // 12 lookups 5 ms apart (end to start); `queued` of each gap spent waiting for a CPU.
        let suspects = |queued: u64, known: bool| {
            let mut agg = DbAggregator::new(false);
            let mut waited = 1_000_000_000;
            for i in 0..12u64 {
                let start = i * 5_100_000;
                let before = waited;
                waited += queued;
                agg.add(&Observed {
                    queued_start_ns: if known { before + queued } else { 0 },
                    queued_end_ns: if known { before + queued } else { 0 },
                    ..obs("SELECT * FROM t WHERE id = 1", 100_000, start)
                });
            }
            agg.suspects()
        };
        // 4.5 ms of the 5 ms waiting: 0.5 ms of the program's own, one run.
        let one = suspects(4_500_000, true);
        assert_eq!((one.len(), one[0].runs, one[0].longest_run), (1, 1, 12));
        // 3.5 ms waiting: 1.5 ms of its own, no run of 10.
        assert!(suspects(3_500_000, true).is_empty());
        // The wait unknown (0): the whole gap counts.
        assert!(suspects(4_500_000, false).is_empty());
    }

    #[test]
    fn the_probes_own_work_at_the_call_is_not_the_programs_gap() {
        // 12 lookups whose calls come 0.2 ms after the previous one's end; the probe then
        // walks the stack for 1.3 ms before the query's clock starts.
        let mut agg = DbAggregator::new(false);
        for i in 0..12u64 {
            agg.add(&Observed {
                probe_ns: 1_300_000,
                ..obs(
                    "SELECT * FROM t WHERE id = 1",
                    100_000,
                    i * 1_600_000 + 1_300_000,
                )
            });
        }
        let suspects = agg.suspects();
        assert_eq!(suspects.len(), 1, "{suspects:?}");
        assert_eq!((suspects[0].runs, suspects[0].longest_run), (1, 12));
    }

    #[test]
    fn a_thread_that_never_waited_before_has_its_first_wait_taken_out() {
        // The kernel's readings are its run_delay plus 1: a thread that had never waited
        // reads 1 at the first query's end, then waits 4.5 ms of the next 5 ms gap.
        let mut agg = DbAggregator::new(false);
        let mut waited = 1;
        for i in 0..12u64 {
            if i > 0 {
                waited += 4_500_000;
            }
            agg.add(&Observed {
                queued_start_ns: waited,
                queued_end_ns: waited,
                ..obs("SELECT * FROM t WHERE id = 1", 100_000, i * 5_100_000)
            });
        }
        let suspects = agg.suspects();
        assert_eq!(suspects.len(), 1, "{suspects:?}");
        assert_eq!((suspects[0].runs, suspects[0].longest_run), (1, 12));
    }

    #[test]
    fn statistics_per_fingerprint_with_exact_quantiles_and_errors() {
        let mut agg = DbAggregator::new(false);
        for i in 1..=100u64 {
            let text = format!("SELECT * FROM t WHERE id = {i}");
            agg.add(&obs(&text, i * 1000, 10_000_000 * i));
        }
        agg.add(&Observed {
            error: true,
            ..obs("SELECT * FROM t WHERE id = 5", 0, 0)
        });
        agg.add(&obs("COMMIT", 10, 0));
        let profile = agg.profile();
        assert_eq!(profile.queries.len(), 2);
        let q = &profile.queries[0];
        assert_eq!(q.fingerprint, "SELECT * FROM t WHERE id = ?");
        assert_eq!((q.calls, q.errors), (100, 1));
        assert_eq!(q.total_ns, 5_050_000);
        // 1..=100 us: sample standard deviation 29.011 us.
        assert!((q.stddev_ns - 29_011.49).abs() < 1.0, "{}", q.stddev_ns);
        assert_eq!(
            (q.p50_ns, q.p95_ns, q.p99_ns, q.max_ns),
            (51_000, 95_000, 99_000, 100_000)
        );
        assert_eq!(q.buckets.iter().sum::<u64>(), 100);
        assert!(q.example.is_none(), "literals stay out unless asked for");
        let mut shown = DbAggregator::new(true);
        shown.add(&obs("SELECT 42", 1, 0));
        assert_eq!(
            shown.profile().queries[0].example.as_deref(),
            Some("SELECT 42")
        );
    }
}
