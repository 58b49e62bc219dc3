//! Database family: finds PostgreSQL servers, reads their `query__start`/`query__done` USDT
//! probes from the binary, and attaches `profiler-ebpf/src/db.rs` to them with the probes'
//! semaphores raised by the kernel.
//!
//! Beside it: `libraries` (the client libraries probed in applications: libpq, SQLite,
//! MySQL/MariaDB), `postgres` (server binaries and their USDT probes) and `wire` (the
//! syscalls the wire decoder hooks).

mod libraries;
mod postgres;
mod wire;

use std::collections::HashSet;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use aya::programs::UProbe;
use profiler_common::db::{
    DbEvent, DbPending, FLAG_ERROR, FLAG_MORE_RESULTS, FLAG_PREPARE, FLAG_PREPARED, FLAG_STATEMENT,
    MysqlExec, PREPARE_NAME_MAX, QUERY_MAX, SOURCE_LIBPQ, SOURCE_MYSQL, SOURCE_SQLITE,
    SOURCE_WIRE_MYSQL, SOURCE_WIRE_POSTGRES, SOURCE_WIRE_REDIS, SqliteExec, WIRE_BATCH_HEADER,
    WIRE_BATCH_MARKER, WIRE_BATCH_MAX, counter, maps,
};

use super::{Globals, Probes, global, program, read_counters};
use crate::probes::kernel::btf::Btf;
use crate::probes::kernel::uprobe::{self, UprobeLink};
use crate::probes::kernel::usdt::UsdtProbe;

pub use libraries::{ClientLibrary, LIBPQ, LibraryTarget, MARIADB, MYSQLCLIENT, SQLITE};
use libraries::{find_library, first_argument_load_offset, library_target};
use postgres::discover_postgres;
pub use postgres::{PostgresTarget, postgres_binaries_installed};
use wire::{WIRE_TRACEPOINTS, wire_globals};

#[derive(Debug, Clone, Default)]
pub struct DbConfig {
    /// PostgreSQL server binaries to probe; found automatically when empty.
    pub postgres_binaries: Vec<PathBuf>,
    /// libpq libraries to probe; found automatically when empty.
    pub libpq: Vec<PathBuf>,
    /// SQLite libraries to probe; found automatically when empty.
    pub sqlite: Vec<PathBuf>,
    /// libmariadb / libmysqlclient libraries to probe; found automatically when empty.
    pub mysql: Vec<PathBuf>,
    /// Decode requests on the wire (PostgreSQL, Redis) from write/sendto and read/recvfrom.
    pub wire: bool,
    /// Not asked for explicitly: a server that cannot be probed is a note, not an error.
    pub optional: bool,
    /// Also time extended-protocol requests in the server (`statement__status`).
    pub postgres_extended: bool,
}

/// Everything the db family attaches to.
#[derive(Debug, Clone, Default)]
pub struct DbTargets {
    pub postgres: Vec<PostgresTarget>,
    pub libraries: Vec<LibraryTarget>,
    pub wire: bool,
    /// The servers' extended-protocol requests are timed too.
    pub postgres_extended: bool,
}

impl DbTargets {
    pub fn is_empty(&self) -> bool {
        self.postgres.is_empty() && self.libraries.is_empty() && !self.wire
    }

    /// What is probed, for messages.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.postgres
            .iter()
            .map(|t| t.path.clone())
            .chain(self.libraries.iter().map(|t| t.path.clone()))
            .chain(self.wire.then(|| {
                PathBuf::from(
                    "[wire: write/sendto/writev/sendmsg/sendmmsg, read/recvfrom/readv/recvmsg]",
                )
            }))
            .collect()
    }
}

/// The binaries to probe: the ones given; else the running servers (among `pids`); else,
/// for the whole host, the installed ones (servers started later are caught too). One per
/// file (device, inode).
pub fn discover(config: &DbConfig, pids: &[u32]) -> Result<DbTargets> {
    let postgres = discover_postgres(config, pids)?;
    let any_explicit =
        !config.libpq.is_empty() || !config.sqlite.is_empty() || !config.mysql.is_empty();
    let mut libraries = Vec::new();
    let mut seen = HashSet::new();
    // A library given with --mysql may be either client flavour: tried as MariaDB's first.
    let no_paths = Vec::new();
    for (library, given) in [
        (&LIBPQ, &config.libpq),
        (&SQLITE, &config.sqlite),
        (&MARIADB, &config.mysql),
        (&MYSQLCLIENT, &no_paths),
    ] {
        for path in given {
            if !path.is_file() {
                bail!("{} library {} does not exist", library.name, path.display());
            }
        }
        let paths = if any_explicit {
            given.clone()
        } else {
            find_library(library, pids)
        };
        for path in paths {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            match library_target(library, path) {
                Ok(target) => libraries.push(target),
                Err(err) if any_explicit => return Err(err),
                Err(err) => eprintln!("profiler: note: {err:#}"),
            }
        }
    }
    // Processes named with -p that hold no probed library and are no server may still talk
    // to a database by themselves (Go, Java, pure-Python drivers): watch their sockets.
    let wire = config.wire
        || (!pids.is_empty() && !any_explicit && postgres.is_empty() && libraries.is_empty());
    if wire && !config.wire {
        eprintln!(
            "profiler: note: no database server or client library found in the given \
             processes; watching their sockets for PostgreSQL, MySQL and Redis requests"
        );
    }
    let postgres_extended = config.postgres_extended && !postgres.is_empty();
    if postgres_extended && let Some(target) = postgres.iter().find(|t| t.status.is_none()) {
        bail!(
            "{} has no usable postgresql:statement__status probe: --pg-extended cannot time \
             its extended-protocol requests",
            target.path.display()
        );
    }
    Ok(DbTargets {
        postgres,
        libraries,
        wire,
        postgres_extended,
    })
}

/// The offset `accessor` loads from its first argument (`first_argument_load_offset`) in every
/// probed copy of `library`, when they all agree; 0 (unknown) otherwise.
fn agreed_load_offset(
    targets: &DbTargets,
    library: &ClientLibrary,
    accessor: &str,
    wide: bool,
) -> u32 {
    let offsets: HashSet<Option<u32>> = targets
        .libraries
        .iter()
        .filter(|t| t.library.name == library.name)
        .map(|t| {
            let at = t.functions.iter().find(|(n, _)| n == accessor)?.1;
            first_argument_load_offset(&t.path, at, wide)
        })
        .collect();
    match offsets.iter().collect::<Vec<_>>().as_slice() {
        [Some(off)] => *off,
        _ => 0,
    }
}

pub(super) fn globals(all: &DbTargets, btf: &Btf, globals: &mut Globals) -> Result<()> {
    let targets = all;
    // libpq's socket offset (for the endpoint of client-side queries), when all agree.
    let sock_off = agreed_load_offset(targets, &LIBPQ, "PQsocket", false);
    global(globals, "PGCONN_SOCK_OFF", sock_off);
    // Where a SQLite statement keeps its SQL (from sqlite3_sql's code), when all agree: the
    // text of statements prepared before the capture is read at their first step.
    let sql_off = agreed_load_offset(targets, &SQLITE, "sqlite3_sql", true);
    global(globals, "SQLITE_SQL_OFF", sql_off);
    if targets.wire {
        wire_globals(globals)?;
    }
    global(
        globals,
        "TASK_REAL_PARENT_OFF",
        btf.member_offset("task_struct", "real_parent")?,
    );
    global(
        globals,
        "TASK_TGID_OFF",
        btf.member_offset("task_struct", "tgid")?,
    );
    // The thread's run-queue wait (N+1 runs do not count it as time between queries): left
    // unset on kernels without CONFIG_SCHED_INFO.
    if let (Ok(info), Ok(delay)) = (
        btf.member_offset("task_struct", "sched_info"),
        btf.member_offset("sched_info", "run_delay"),
    ) {
        global(globals, "TASK_RUN_DELAY_OFF", info + delay);
    }
    // The way to a socket's peer (libpq and wire endpoints): left unset (the peer is then
    // looked up in /proc while the connection lives) when the kernel lays it out otherwise.
    let peer_offsets = [
        ("TASK_FILES_OFF", "task_struct", "files"),
        ("FILES_FDT_OFF", "files_struct", "fdt"),
        ("FDT_MAX_FDS_OFF", "fdtable", "max_fds"),
        ("FDT_FD_OFF", "fdtable", "fd"),
        ("FILE_INODE_OFF", "file", "f_inode"),
        ("FILE_PRIVATE_DATA_OFF", "file", "private_data"),
        ("INODE_MODE_OFF", "inode", "i_mode"),
        ("SOCKET_SK_OFF", "socket", "sk"),
        ("SKC_FAMILY_OFF", "sock_common", "skc_family"),
        ("SKC_DPORT_OFF", "sock_common", "skc_dport"),
        ("SKC_DADDR_OFF", "sock_common", "skc_daddr"),
        ("SKC_V6_DADDR_OFF", "sock_common", "skc_v6_daddr"),
    ]
    .map(|(global, ty, member)| (global, btf.member_offset(ty, member).ok()));
    if peer_offsets.iter().all(|(_, off)| off.is_some()) {
        // `struct sock` begins with its `sock_common`.
        if btf.member_offset("sock", "__sk_common").ok() == Some(0) {
            for (name, off) in peer_offsets {
                global(globals, name, off.expect("checked"));
            }
        }
    }
    let arg_register = |name: &str| {
        crate::probes::kernel::usdt::register_offset(name)
            .with_context(|| format!("no register {name} on this architecture"))
    };
    #[cfg(target_arch = "aarch64")]
    let (arg1, arg2, arg3, arg4, arg5, ret) = ("x0", "x1", "x2", "x3", "x4", "x0");
    #[cfg(not(target_arch = "aarch64"))]
    let (arg1, arg2, arg3, arg4, arg5, ret) = ("rdi", "rsi", "rdx", "rcx", "r8", "rax");
    global(globals, "ARG1_REG", arg_register(arg1)?);
    global(globals, "ARG4_REG", arg_register(arg4)?);
    global(globals, "ARG5_REG", arg_register(arg5)?);
    global(globals, "ARG2_REG", arg_register(arg2)?);
    global(globals, "ARG3_REG", arg_register(arg3)?);
    global(globals, "RET_REG", arg_register(ret)?);
    let targets = &targets.postgres;
    let Some(first) = targets.first() else {
        return Ok(());
    };
    let arg = &first.start.args[0];
    for other in &targets[1..] {
        if other.start.args.first() != Some(arg) {
            bail!(
                "{} and {} pass query__start's argument differently; probe one at a time \
                 (--postgres-binary)",
                first.path.display(),
                other.path.display()
            );
        }
    }
    let (kind, reg, disp) = arg.location.encode();
    global(globals, "PG_START_ARG_KIND", kind);
    global(globals, "PG_START_ARG_REG", reg);
    global(globals, "PG_START_ARG_DISP", disp);
    if all.postgres_extended {
        let status = |t: &PostgresTarget| t.status.as_ref().map(|s| s.args[0].clone());
        let arg = status(first).context("statement__status checked at discovery")?;
        if targets[1..]
            .iter()
            .any(|t| status(t).as_ref() != Some(&arg))
        {
            bail!(
                "the PostgreSQL binaries pass statement__status's argument differently; \
                 probe one at a time (--postgres-binary)"
            );
        }
        let (kind, reg, disp) = arg.location.encode();
        global(globals, "PG_STATUS_ARG_KIND", kind);
        global(globals, "PG_STATUS_ARG_REG", reg);
        global(globals, "PG_STATUS_ARG_DISP", disp);
        // Requests that execute nothing (a Parse alone) are no queries, where every server
        // shows where PortalRun executes.
        let gate = targets.iter().all(|t| t.execute.is_some());
        global(globals, "PG_EXECUTE_GATE", u32::from(gate));
        global(globals, "PG_EXTENDED_ON", 1u32);
    }
    Ok(())
}

/// Attaches done before start (so no start is seen without its done being watched).
pub(super) fn attach(ebpf: &mut Ebpf, all: &DbTargets) -> Result<Vec<UprobeLink>> {
    let mut links = Vec::new();
    if all.wire {
        for (event, name) in WIRE_TRACEPOINTS {
            let prog: &mut aya::programs::TracePoint = program(ebpf, name)?.try_into()?;
            prog.load()
                .with_context(|| format!("loading the {name} program failed"))?;
            prog.attach("syscalls", event)
                .with_context(|| format!("attaching to syscalls:{event} failed"))?;
        }
    }
    for target in &all.libraries {
        for (symbol, name, retprobe) in target.library.probes {
            let Some((_, offset)) = target.functions.iter().find(|(n, _)| n == symbol) else {
                continue; // an older library without this function
            };
            let prog: &mut UProbe = program(ebpf, name)?.try_into()?;
            if prog.fd().is_err() {
                prog.load()
                    .with_context(|| format!("loading the {name} program failed"))?;
            }
            let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
            links.push(uprobe::attach(
                fd.as_fd(),
                &target.path,
                *offset,
                0,
                *retprobe,
                None,
            )?);
        }
    }
    let targets = &all.postgres;
    if targets.is_empty() {
        return Ok(links);
    }
    for (name, pick) in [
        (
            "pg_query_done",
            (|t: &PostgresTarget| &t.done) as fn(&PostgresTarget) -> &UsdtProbe,
        ),
        ("pg_query_start", |t: &PostgresTarget| &t.start),
    ] {
        attach_usdt(ebpf, name, targets, pick, &mut links)?;
    }
    if all.postgres_extended {
        if targets.iter().all(|t| t.execute.is_some()) {
            attach_usdt(
                ebpf,
                "pg_execute_start",
                targets,
                |t| t.execute.as_ref().expect("checked"),
                &mut links,
            )?;
        } else {
            eprintln!(
                "profiler: note: PortalRun not found in every PostgreSQL binary: with \
                 --pg-extended a Parse-only request (PQprepare) counts as a query"
            );
        }
        attach_usdt(
            ebpf,
            "pg_statement_status",
            targets,
            |t| t.status.as_ref().expect("checked at discovery"),
            &mut links,
        )?;
    }
    Ok(links)
}

/// Program `name` on each target's probe `pick`.
fn attach_usdt(
    ebpf: &mut Ebpf,
    name: &str,
    targets: &[PostgresTarget],
    pick: fn(&PostgresTarget) -> &UsdtProbe,
    links: &mut Vec<UprobeLink>,
) -> Result<()> {
    {
        let prog: &mut UProbe = program(ebpf, name)?.try_into()?;
        prog.load()
            .with_context(|| format!("loading the {name} program failed"))?;
        let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
        for target in targets {
            let probe = pick(target);
            links.push(uprobe::attach(
                fd.as_fd(),
                &target.path,
                probe.offset,
                probe.semaphore_offset,
                false,
                None,
            )?);
        }
    }
    Ok(())
}

impl Probes {
    /// The ring buffer of finished queries; can be taken once.
    pub fn take_db_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .context("database event ring buffer already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn db_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        read_counters(self.ebpf(), maps::COUNTERS, &counter::NAMES)
    }

    /// Queries these programs saw start in `[from, until)` that have not ended yet: each
    /// source's in-flight map, by the start time its entries begin with (0 once ended).
    pub fn db_in_flight(&self, (from, until): (u64, u64)) -> Result<u64> {
        fn started<K: aya::Pod, V: aya::Pod>(
            ebpf: &Ebpf,
            name: &str,
            (from, until): (u64, u64),
        ) -> Result<u64> {
            let map = ebpf.map(name).with_context(|| format!("no map {name}"))?;
            let map: aya::maps::HashMap<&MapData, K, V> = aya::maps::HashMap::try_from(map)?;
            let mut n = 0;
            for entry in map.iter() {
                let value = match entry {
                    Ok((_, value)) => value,
                    Err(aya::maps::MapError::KeyNotFound) => continue,
                    Err(err) => return Err(err).with_context(|| format!("reading {name} failed")),
                };
                // SAFETY: V is plain data at least 8 bytes long (checked below by its
                // callers' types), starting with the start time.
                let start: u64 =
                    unsafe { std::ptr::read_unaligned(&value as *const V as *const u64) };
                if start != 0 && (from..until).contains(&start) {
                    n += 1;
                }
            }
            Ok(n)
        }
        let ebpf = self.ebpf();
        // Keys: (thread), (process, connection), (process, slot, connection), (process, fd).
        let range = (from, until);
        Ok(started::<u32, DbPending>(ebpf, maps::PENDING, range)?
            + started::<[u8; 16], DbPending>(ebpf, maps::CLIENT_PENDING, range)?
            + started::<[u8; 16], DbPending>(ebpf, maps::LIBPQ_COMMANDS, range)?
            + started::<[u8; 8], DbPending>(ebpf, maps::WIRE_PENDING, range)?
            + started::<[u8; 16], MysqlExec>(ebpf, maps::MYSQL_EXEC, range)?
            + started::<[u8; 16], SqliteExec>(ebpf, maps::SQLITE_EXEC, range)?
            + started::<u32, DbPending>(ebpf, maps::PG_EXTENDED, range)?)
    }
}

/// A socket's peer from an event (see `DbEvent::peer_family`).
fn peer_address(family: u16, port: u16, addr: [u8; 16]) -> Option<String> {
    let ip = match i32::from(family) {
        libc::AF_INET => std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]]),
        libc::AF_INET6 => std::net::IpAddr::from(addr),
        libc::AF_UNIX => return Some("unix".to_string()),
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port).to_string())
}

/// A decoded query event.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRecord {
    pub pid: u32,
    pub tid: u32,
    /// `postgres-usdt`, `libpq` or `sqlite`.
    pub source: &'static str,
    /// SQLite and MySQL prepared statements: the statement handle (prepare events name its
    /// text, statement events use it).
    pub handle: u64,
    /// SQLite, MySQL: `text` is empty; the statement's text came with its prepare event.
    pub statement: bool,
    /// MySQL: a further result of the multi-statement query last sent on connection
    /// `handle` (`text` is empty).
    pub more_results: bool,
    /// Wire sources: the request's first bytes as written (`text` is empty).
    pub raw: Vec<u8>,
    /// Wire sources: the reply's first bytes.
    pub reply: Vec<u8>,
    /// libpq and wire: the socket's peer as the kernel had it (`127.0.0.1:5432`, `[::1]:6379`,
    /// `unix`), when it could be read.
    pub peer: Option<String>,
    /// A PQsendPrepare: `text` is the statement and this its name (not a query itself).
    pub prepare_name: Option<String>,
    /// `text` is the name of a prepared statement (PQsendQueryPrepared).
    pub prepared: bool,
    pub error: bool,
    pub start_ns: u64,
    /// The thread's run-queue wait so far when the application called and when the query
    /// was reported (see `DbEvent::queued_start_ns`).
    pub queued_start_ns: u64,
    pub queued_end_ns: u64,
    /// The probe's own work before `start_ns`: the application called at
    /// `start_ns - probe_ns`.
    pub probe_ns: u64,
    pub user_stack_id: i32,
    /// The process's parent when the query ran (a backend's postmaster).
    pub ppid: u32,
    pub comm: String,
    pub duration_ns: u64,
    pub text: String,
    /// The text was cut at `QUERY_MAX` bytes.
    pub truncated: bool,
}

/// A long request write on the wire (a pipeline), kept until its reply's event.
#[derive(Debug, Clone, PartialEq)]
pub struct WireBatch {
    pub tgid: u32,
    /// The socket fd + 1.
    pub fd: u32,
    pub start_ns: u64,
    /// The write's length; `bytes` holds its first `WIRE_BATCH_MAX`.
    pub len: u64,
    pub bytes: Vec<u8>,
}

/// A `DbWireBatch` ring item (told apart from `DbEvent`s by its marker).
pub fn decode_batch(bytes: &[u8]) -> Option<WireBatch> {
    let header = bytes.get(..WIRE_BATCH_HEADER)?;
    let word = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let long = |at: usize| u64::from_ne_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if word(0) != WIRE_BATCH_MARKER {
        return None;
    }
    let len = long(24);
    let kept = (len as usize)
        .min(WIRE_BATCH_MAX)
        .min(bytes.len() - WIRE_BATCH_HEADER);
    Some(WireBatch {
        fd: word(4),
        tgid: word(8),
        start_ns: long(16),
        len,
        bytes: bytes[WIRE_BATCH_HEADER..WIRE_BATCH_HEADER + kept].to_vec(),
    })
}

pub fn decode(bytes: &[u8]) -> Option<QueryRecord> {
    if bytes.len() < std::mem::size_of::<DbEvent>() || decode_batch(bytes).is_some() {
        return None;
    }
    // SAFETY: DbEvent is plain data; read_unaligned copes with any alignment.
    let e: DbEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const DbEvent) };
    let len = (e.len as usize).min(QUERY_MAX);
    let until_nul = |bytes: &[u8]| -> String {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    let wire = matches!(
        e.source,
        SOURCE_WIRE_POSTGRES | SOURCE_WIRE_REDIS | SOURCE_WIRE_MYSQL
    );
    let (text, prepare_name) = if wire {
        (String::new(), None)
    } else if e.flags & FLAG_PREPARE != 0 && matches!(e.source, SOURCE_SQLITE | SOURCE_MYSQL) {
        (until_nul(&e.query[..len]), Some(String::new()))
    } else if e.flags & FLAG_PREPARE != 0 {
        let name = until_nul(&e.query[..PREPARE_NAME_MAX]);
        (
            until_nul(&e.query[PREPARE_NAME_MAX..len.max(PREPARE_NAME_MAX)]),
            Some(name),
        )
    } else {
        (until_nul(&e.query[..len]), None)
    };
    Some(QueryRecord {
        pid: e.tgid,
        tid: e.tid,
        source: match e.source {
            SOURCE_LIBPQ => "libpq",
            SOURCE_SQLITE => "sqlite",
            SOURCE_WIRE_POSTGRES => "wire-postgres",
            SOURCE_WIRE_REDIS => "wire-redis",
            SOURCE_MYSQL => "mysql",
            SOURCE_WIRE_MYSQL => "wire-mysql",
            _ => "postgres-usdt",
        },
        raw: if wire {
            e.query[..len].to_vec()
        } else {
            Vec::new()
        },
        reply: if wire { e.reply.to_vec() } else { Vec::new() },
        peer: peer_address(e.peer_family, e.peer_port, e.peer),
        handle: e.handle,
        statement: e.flags & FLAG_STATEMENT != 0,
        more_results: e.flags & FLAG_MORE_RESULTS != 0,
        prepare_name,
        prepared: e.flags & FLAG_PREPARED != 0,
        error: e.flags & FLAG_ERROR != 0,
        start_ns: e.start_ns,
        queued_start_ns: e.queued_start_ns,
        queued_end_ns: e.queued_end_ns,
        probe_ns: u64::from(e.probe_ns),
        user_stack_id: e.user_stack_id,
        ppid: e.ppid,
        comm: until_nul(&e.comm),
        duration_ns: e.duration_ns,
        text,
        truncated: len >= QUERY_MAX - 1,
    })
}

/// The parent of `pid` (from /proc/PID/stat), if it is alive.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: the fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `path` looks like it was given by us as a process's executable.
pub fn describe(path: &Path) -> String {
    match std::fs::read_link(path) {
        Ok(real) => format!("{} ({})", real.display(), path.display()),
        Err(_) => path.display().to_string(),
    }
}
