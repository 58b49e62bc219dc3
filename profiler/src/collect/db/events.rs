//! Database events from the kernel: whose each query is (server, client, -p filter), the
//! wire requests decoded, and the db family's part of the Capture with its issuing stacks.

use std::collections::HashMap;

use anyhow::Result;

use super::{DbAggregator, Observed};
use crate::collect::stacks::{NO_STACK, StackBuilder, scale_stack, sort_stacks, synthetic_frame};
use crate::model::{DbProfile, NPlusOne};
use crate::symbolize::procmaps::ProcessCache;

/// Whose a query is, and whether it passes -p: a server-side query belongs to the server
/// (the backend's parent, the postmaster; -p SERVER_PID selects its backends), a client-side
/// one to the client process.
pub(crate) struct DbOwners {
    pids: Vec<u32>,
    /// Prepared statements' text by (process, name), from PQsendPrepare.
    prepared: HashMap<(u32, String), String>,
    /// SQLite and MySQL statements' text by (process, statement handle), from their prepare.
    statements: HashMap<(u32, u64), String>,
    pub(crate) filtered_out: u64,
    /// Wire requests whose bytes did not decode.
    pub(crate) undecoded: u64,
    /// Fingerprints by `frame_hash` of the text the kernel saw: names the `[db]` frames of
    /// off-CPU stacks.
    pub(crate) frames: HashMap<u32, String>,
    endpoints: HashMap<(u32, u64), String>,
    /// Wire: long request writes (pipelines) by (process, socket + 1, start), until their
    /// reply's event names them: the bytes kept and the write's length.
    batches: HashMap<(u32, u64, u64), (Vec<u8>, u64)>,
    /// Wire: pipelined writes whose requests went on past the bytes kept (the rest is not
    /// counted).
    pub(crate) pipeline_cut: u64,
    /// MySQL multi-statement queries (and CALLs) by (process, connection), until the
    /// connection's next query.
    multi: HashMap<(u32, u64), MultiStatement>,
}

/// A MySQL query of several statements (or a CALL, whose procedure may return several
/// results): its first is timed by mysql_real_query, each further result by a
/// mysql_next_result.
struct MultiStatement {
    /// The statements whose results are still to come.
    rest: std::collections::VecDeque<String>,
    /// The statement whose result came last.
    last: String,
    /// The stack that sent them.
    user_stack_id: i32,
}

/// Connections with a multi-statement query kept at most (their further results are
/// named from it).
const MULTI_MAX: usize = 4096;

/// Pipelined writes kept at most while waiting for their replies (a reply never seen:
/// the process died or the capture ended).
const BATCHES_MAX: usize = 4096;

/// `ip:port` (`[ip6]:port`) of the peer of socket `fd` of process `pid`, or `unix`, from
/// /proc (the process's own network namespace).
fn socket_endpoint(pid: u32, fd: u64) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let inode = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .to_string();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[9] == inode {
                return proc_net_address(f[2], v6);
            }
        }
    }
    let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    unix.lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(6) == Some(inode.as_str()))
        .then(|| "unix".to_string())
}

/// `/proc/net/tcp{,6}` address (`0100007F:1538`: 32-bit words in host order, port in hex).
pub(crate) fn proc_net_address(text: &str, v6: bool) -> Option<String> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::new();
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let addr = if v6 {
        let octets: [u8; 16] = bytes.try_into().ok()?;
        std::net::IpAddr::V6(std::net::Ipv6Addr::from(octets))
    } else {
        let octets: [u8; 4] = bytes.try_into().ok()?;
        std::net::IpAddr::V4(std::net::Ipv4Addr::from(octets))
    };
    Some(std::net::SocketAddr::new(addr, port).to_string())
}

impl DbOwners {
    pub(crate) fn new(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            prepared: HashMap::new(),
            statements: HashMap::new(),
            filtered_out: 0,
            undecoded: 0,
            frames: HashMap::new(),
            endpoints: HashMap::new(),
            batches: HashMap::new(),
            pipeline_cut: 0,
            multi: HashMap::new(),
        }
    }

    /// MySQL through its client library: a query of several statements is timed
    /// statement by statement — its first by the query's own event (given the first
    /// statement's text here), each further one by a `more_results` event (given the next
    /// statement's text and the query's stack). A CALL's results after the first are its
    /// own, named `[further result] CALL …`.
    fn split_multi_statement(&mut self, query: &mut crate::probes::db::QueryRecord) {
        let key = (query.pid, query.handle);
        if query.more_results {
            match self.multi.get_mut(&key) {
                Some(multi) => {
                    query.user_stack_id = multi.user_stack_id;
                    query.text = match multi.rest.pop_front() {
                        Some(next) => {
                            multi.last.clone_from(&next);
                            next
                        }
                        None => format!("[further result] {}", multi.last),
                    };
                }
                None => query.text = "[further result of a query sent before the capture]".into(),
            }
            return;
        }
        let statements = crate::collect::db::fingerprint::split_statements(&query.text);
        let call = statements.first().is_some_and(|s| {
            s.get(..5)
                .is_some_and(|word| word.eq_ignore_ascii_case("call "))
        });
        if statements.len() < 2 && !call {
            self.multi.remove(&key);
            return;
        }
        let mut rest: std::collections::VecDeque<String> =
            statements.iter().map(|s| s.to_string()).collect();
        let first = rest.pop_front().unwrap_or_default();
        if self.multi.len() >= MULTI_MAX && !self.multi.contains_key(&key) {
            self.multi.clear();
        }
        self.multi.insert(
            key,
            MultiStatement {
                rest,
                last: first.clone(),
                user_stack_id: query.user_stack_id,
            },
        );
        query.text = first;
    }

    /// The address behind a client's socket, looked up once per (process, fd).
    fn endpoint(&mut self, pid: u32, fd: u64) -> String {
        self.endpoints
            .entry((pid, fd))
            .or_insert_with(|| socket_endpoint(pid, fd).unwrap_or_default())
            .clone()
    }

    fn owner(&mut self, query: &crate::probes::db::QueryRecord) -> Option<u32> {
        let owner = if query.source == "postgres-usdt" && query.ppid != 0 {
            query.ppid
        } else {
            query.pid
        };
        let wanted =
            self.pids.is_empty() || self.pids.contains(&query.pid) || self.pids.contains(&owner);
        if !wanted {
            self.filtered_out += 1;
        }
        wanted.then_some(owner)
    }
}

pub(crate) fn drain_db_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    db: &mut DbAggregator,
    owners: &mut DbOwners,
    mut processes: Option<&mut ProcessCache>,
    (started_from, started_before): (u64, u64),
) {
    while let Some(item) = ring.next() {
        if let Some(batch) = crate::probes::db::decode_batch(&item) {
            if owners.batches.len() >= BATCHES_MAX {
                owners.batches.clear();
            }
            owners.batches.insert(
                (batch.tgid, u64::from(batch.fd), batch.start_ns),
                (batch.bytes, batch.len),
            );
            continue;
        }
        if let Some(query) = crate::probes::db::decode(&item)
            // Statement definitions (SQLite prepares carry no time, libpq prepares are no
            // queries) go to both windows: later executions are named from them.
            && (query.start_ns == 0
                || query.prepare_name.is_some()
                || (started_from..started_before).contains(&query.start_ns))
            && let Some(owner) = owners.owner(&query)
        {
            let mut query = query;
            // What the kernel hashed for the off-CPU frame: libpq's text argument (a
            // prepared statement's name), a simple query's text on the wire.
            let frame = match query.source {
                "libpq" | "mysql"
                    if query.prepare_name.is_none() && !query.statement && !query.more_results =>
                {
                    Some(profiler_common::db::frame_hash(query.text.as_bytes()))
                }
                "wire-postgres" if query.raw.first() == Some(&b'Q') => Some(
                    profiler_common::db::frame_hash(&query.raw[5.min(query.raw.len())..]),
                ),
                _ => None,
            };
            // A pipeline written at once: every request in it, each timed like the first
            // (from the write to the first byte of the replies).
            // A write of at most QUERY_MAX bytes is whole in the event; a longer one came
            // before it as a batch.
            let batch = owners
                .batches
                .remove(&(query.pid, query.handle, query.start_ns));
            let batch_cut = batch
                .as_ref()
                .is_some_and(|(bytes, len)| *len > bytes.len() as u64);
            if let Some((bytes, _)) = batch {
                query.raw = bytes;
            }
            let mut more: Vec<String> = Vec::new();
            if query.source == "wire-redis" {
                let (requests, cut) = crate::collect::db::wire::redis_all(&query.raw);
                if batch_cut || (cut && !requests.is_empty()) {
                    owners.pipeline_cut += 1;
                }
                more = requests.into_iter().skip(1).map(|r| r.text).collect();
            }
            if query.source.starts_with("wire-") {
                let decoded = match query.source {
                    "wire-redis" => crate::collect::db::wire::redis(&query.raw),
                    "wire-mysql" => crate::collect::db::wire::mysql(&query.raw),
                    _ => crate::collect::db::wire::postgres(&query.raw),
                };
                let Some(request) = decoded else {
                    owners.undecoded += 1;
                    continue;
                };
                if let Some(name) = request.parse_name {
                    owners
                        .prepared
                        .insert((query.pid, format!("wire:{name}")), request.text.clone());
                }
                // MySQL: a prepare's reply names the statement, which executes then use
                // (per connection); the prepare itself is not counted as a query.
                let socket = query.handle;
                if request.prepare {
                    if let Some(id) = crate::collect::db::wire::mysql_prepared_id(&query.reply) {
                        owners
                            .prepared
                            .insert((query.pid, format!("mysql:{socket}:{id}")), request.text);
                    }
                    continue;
                }
                let prepared_key = match (&request.bind_name, request.execute_id) {
                    (Some(name), _) => Some(format!("wire:{name}")),
                    (None, Some(id)) => Some(format!("mysql:{socket}:{id}")),
                    (None, None) => None,
                };
                query.text = prepared_key
                    .and_then(|key| owners.prepared.get(&(query.pid, key)).cloned())
                    .unwrap_or(request.text);
            }
            if matches!(query.source, "sqlite" | "mysql") && query.prepare_name.is_some() {
                owners
                    .statements
                    .insert((query.pid, query.handle), query.text);
                continue;
            }
            if let Some(name) = query.prepare_name {
                owners.prepared.insert((query.pid, name), query.text);
                continue;
            }
            if query.source == "mysql" && !query.statement {
                owners.split_multi_statement(&mut query);
            }
            let text = if query.statement {
                owners
                    .statements
                    .get(&(query.pid, query.handle))
                    .cloned()
                    .unwrap_or_else(|| "[statement prepared before the capture]".to_string())
            } else if query.prepared {
                owners
                    .prepared
                    .get(&(query.pid, query.text.clone()))
                    .cloned()
                    .unwrap_or_else(|| format!("EXECUTE {}", query.text))
            } else {
                query.text
            };
            if query.user_stack_id >= 0
                && let Some(processes) = processes.as_deref_mut()
            {
                // Its memory maps, while it lives, to symbolize the issuing stacks: read again
                // (at most every 500 ms) because a process first seen at exec, before its
                // libraries were mapped, would otherwise keep maps without them.
                processes.observe(query.pid, &query.comm);
            }
            if let Some(frame) = frame
                && !owners.frames.contains_key(&frame)
            {
                owners
                    .frames
                    .insert(frame, crate::collect::db::fingerprint(&text));
            }
            let endpoint = match query.source {
                "libpq" | "wire-postgres" | "wire-mysql" | "wire-redis" if query.handle > 0 => {
                    match &query.peer {
                        Some(peer) => peer.clone(),
                        None => owners.endpoint(query.pid, query.handle - 1),
                    }
                }
                _ => String::new(),
            };
            for text in std::iter::once(&text).chain(&more) {
                db.add(&Observed {
                    source: query.source,
                    pid: owner,
                    comm: &query.comm,
                    tid: query.tid,
                    text,
                    truncated: query.truncated,
                    error: query.error,
                    start_ns: query.start_ns,
                    duration_ns: query.duration_ns,
                    queued_start_ns: query.queued_start_ns,
                    queued_end_ns: query.queued_end_ns,
                    probe_ns: query.probe_ns,
                    user_stack_id: query.user_stack_id,
                    endpoint: &endpoint,
                });
            }
        }
    }
}

/// The db family's part of the Capture: queries by fingerprint, the code paths that issued
/// them, and N+1 suspects.
pub(crate) fn profile(
    db: &DbAggregator,
    builder: &mut StackBuilder,
    sample_every: u32,
    pids: &[u32],
    socket_bytes: &super::socket_bytes::SocketBytes,
) -> Result<DbProfile> {
    let mut profile = db.profile();
    profile.coverage =
        super::coverage::coverage(&profile.queries, pids, std::process::id(), socket_bytes);
    for (_, pid, fingerprint, stack_id, tid, calls, total_ns) in db.stack_usage() {
        if stack_id < 0 {
            continue; // server-side: no client code path
        }
        let mut stack = builder.build(
            (pid, tid, NO_STACK, stack_id),
            "db",
            total_ns,
            calls,
            Vec::new(),
        )?;
        stack.frames.pop(); // no kernel stack was taken
        stack
            .frames
            .push(synthetic_frame(format!("[db] {fingerprint}")));
        profile.stacks.push(stack);
    }
    let every = u64::from(sample_every.max(1));
    if every > 1 {
        // Sampled mode: each timed query stands for `every` queries (latency
        // quantiles are those of the sample).
        for query in &mut profile.queries {
            query.calls *= every;
            query.errors *= every;
            query.total_ns *= every;
            query.buckets.iter_mut().for_each(|b| *b *= every);
        }
        for stack in &mut profile.stacks {
            scale_stack(stack, every);
        }
    }
    sort_stacks(&mut profile.stacks);
    for suspect in db.suspects() {
        let frames = if suspect.user_stack_id >= 0 {
            let mut stack = builder.build(
                (suspect.pid, suspect.tid, NO_STACK, suspect.user_stack_id),
                "db",
                0,
                0,
                Vec::new(),
            )?;
            stack.frames.pop();
            stack.frames
        } else {
            Vec::new()
        };
        profile.n_plus_one.push(NPlusOne {
            pid: suspect.pid,
            tid: suspect.tid,
            comm: suspect.comm,
            source: suspect.source,
            fingerprint: suspect.fingerprint,
            runs: suspect.runs,
            longest_run: suspect.longest_run,
            queries: suspect.queries,
            total_ns: suspect.total_ns,
            frames,
        });
    }
    profile.n_plus_one = merge_code_paths(std::mem::take(&mut profile.n_plus_one));
    Ok(profile)
}

/// One suspect per code path: suspects of one process, source and fingerprint whose stacks
/// differ only in a Python interpreter's calling machinery (`python::code_path`) are one.
/// The merged suspect shows the stack of the one with the most queries.
fn merge_code_paths(suspects: Vec<NPlusOne>) -> Vec<NPlusOne> {
    let mut merged: Vec<NPlusOne> = Vec::with_capacity(suspects.len());
    for suspect in suspects {
        let path = crate::symbolize::python::code_path(&suspect.frames);
        let same = merged.iter_mut().find(|m| {
            (m.pid, &m.source, &m.fingerprint)
                == (suspect.pid, &suspect.source, &suspect.fingerprint)
                && crate::symbolize::python::code_path(&m.frames) == path
        });
        let Some(into) = same else {
            merged.push(suspect);
            continue;
        };
        if suspect.queries > into.queries {
            into.frames = suspect.frames;
            into.tid = suspect.tid;
        }
        into.runs += suspect.runs;
        into.queries += suspect.queries;
        into.total_ns += suspect.total_ns;
        into.longest_run = into.longest_run.max(suspect.longest_run);
    }
    merged.sort_by(|a, b| {
        b.queries
            .cmp(&a.queries)
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    merged
}
#[cfg(test)]
mod tests {
    use crate::model::{Frame, FrameKind, NPlusOne};

    fn frame(name: &str, module: &str) -> Frame {
        Frame {
            name: name.to_string(),
            kind: FrameKind::User,
            module: Some(module.to_string()),
            offset: None,
            inlined: false,
            unresolved: false,
        }
    }

    /// The first executions of a Python call site go through the interpreter's generic call
    /// path, later ones through its specialized one: one code path, one suspect.
    #[test]
    fn suspects_differing_only_in_the_interpreters_frames_are_one() {
        let python = "/usr/bin/python3.11";
        let script = "/srv/app.py";
        let generic = vec![
            frame("Py_RunMain", python),
            frame("py::main (app.py:9)", script),
            frame("py::Repo.items (app.py:4)", script),
            frame("PyObject_Vectorcall", python),
            frame("_sqlite3.so+0xbec3", "/usr/lib/_sqlite3.so"),
            frame("sqlite3_step", "/usr/lib/libsqlite3.so.0"),
        ];
        let mut specialized = generic.clone();
        specialized.remove(3);
        let mut elsewhere = specialized.clone();
        elsewhere[2] = frame("py::Repo.other (app.py:7)", script);
        let suspect = |frames: Vec<Frame>, runs: u64| NPlusOne {
            pid: 7,
            source: "sqlite".into(),
            fingerprint: "SELECT ?".into(),
            runs,
            longest_run: 30,
            queries: 30 * runs,
            total_ns: 1000 * runs,
            frames,
            ..NPlusOne::default()
        };
        let merged = super::merge_code_paths(vec![
            suspect(generic, 1),
            suspect(specialized.clone(), 24),
            suspect(elsewhere.clone(), 2),
        ]);
        assert_eq!(merged.len(), 2, "{merged:#?}");
        assert_eq!(
            (merged[0].runs, merged[0].queries, merged[0].total_ns),
            (25, 750, 25_000)
        );
        assert_eq!(merged[0].frames, specialized, "the stack most queries had");
        assert_eq!(merged[1].frames, elsewhere);
    }

    #[test]
    fn proc_net_addresses_decode() {
        assert_eq!(
            super::proc_net_address("0100007F:1538", false).as_deref(),
            Some("127.0.0.1:5432")
        );
        assert_eq!(
            super::proc_net_address("00000000000000000000000001000000:18EB", true).as_deref(),
            Some("[::1]:6379")
        );
        assert!(super::proc_net_address("zz:1", false).is_none());
    }
}
