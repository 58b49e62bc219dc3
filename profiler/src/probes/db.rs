//! Database family: finds PostgreSQL servers, reads their `query__start`/`query__done` USDT
//! probes from the binary, and attaches `profiler-ebpf/src/db.rs` to them with the probes'
//! semaphores raised by the kernel.

use std::collections::HashSet;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use aya::programs::UProbe;
use profiler_common::db::{
    DbEvent, FLAG_ERROR, FLAG_PREPARE, FLAG_PREPARED, FLAG_STATEMENT, PREPARE_NAME_MAX, QUERY_MAX,
    SOURCE_LIBPQ, SOURCE_MYSQL, SOURCE_SQLITE, SOURCE_WIRE_MYSQL, SOURCE_WIRE_POSTGRES,
    SOURCE_WIRE_REDIS, counter, maps,
};

use super::{Globals, Probes, global, program, read_counters};
use crate::probes::kernel::btf::Btf;
use crate::probes::kernel::uprobe::{self, UprobeLink};
use crate::probes::kernel::usdt::{self, UsdtProbe};

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
}

/// A client library the db family probes in the application's process.
#[derive(Debug)]
pub struct ClientLibrary {
    pub name: &'static str,
    /// File name prefix in memory maps.
    prefix: &'static str,
    /// The file looked for in the system library directories.
    system_name: &'static str,
    /// Functions it must have.
    required: &'static [&'static str],
    /// (symbol, program, return probe), attached in this order: a return before its entry,
    /// ends before starts.
    probes: &'static [(&'static str, &'static str, bool)],
}

pub const LIBPQ: ClientLibrary = ClientLibrary {
    name: "libpq",
    prefix: "libpq.so",
    system_name: "libpq.so.5",
    required: &["PQgetResult", "PQsendQuery"],
    probes: &[
        ("PQgetResult", "libpq_get_result_return", true),
        ("PQgetResult", "libpq_get_result", false),
        ("PQsendQuery", "libpq_send_query", false),
        ("PQsendQueryParams", "libpq_send_query", false),
        ("PQsendQueryPrepared", "libpq_send_prepared", false),
        ("PQsendPrepare", "libpq_send_prepare", false),
    ],
};

pub const SQLITE: ClientLibrary = ClientLibrary {
    name: "SQLite",
    prefix: "libsqlite3.so",
    system_name: "libsqlite3.so.0",
    required: &["sqlite3_step", "sqlite3_prepare_v2", "sqlite3_reset"],
    probes: &[
        ("sqlite3_reset", "sqlite_reset", false),
        ("sqlite3_finalize", "sqlite_reset", false),
        ("sqlite3_step", "sqlite_step_return", true),
        ("sqlite3_step", "sqlite_step", false),
        ("sqlite3_prepare_v2", "sqlite_prepare_return", true),
        ("sqlite3_prepare_v3", "sqlite_prepare_return", true),
        ("sqlite3_prepare_v2", "sqlite_prepare_v2", false),
        ("sqlite3_prepare_v3", "sqlite_prepare_v3", false),
    ],
};

const MYSQL_PROBES: &[(&str, &str, bool)] = &[
    ("mysql_real_query", "mysql_query_return", true),
    ("mysql_read_query_result", "mysql_query_return", true),
    ("mysql_read_query_result", "mysql_read_result", false),
    ("mysql_real_query", "mysql_query", false),
    ("mysql_send_query", "mysql_query", false),
];

pub const MARIADB: ClientLibrary = ClientLibrary {
    name: "MariaDB client",
    prefix: "libmariadb.so",
    system_name: "libmariadb.so.3",
    required: &["mysql_real_query"],
    probes: MYSQL_PROBES,
};

pub const MYSQLCLIENT: ClientLibrary = ClientLibrary {
    name: "MySQL client",
    prefix: "libmysqlclient.so",
    system_name: "libmysqlclient.so.21",
    required: &["mysql_real_query"],
    probes: MYSQL_PROBES,
};

/// A client library file and where its functions are.
#[derive(Debug, Clone)]
pub struct LibraryTarget {
    pub library: &'static ClientLibrary,
    pub path: PathBuf,
    functions: Vec<(String, u64)>,
}

/// Everything the db family attaches to.
#[derive(Debug, Clone, Default)]
pub struct DbTargets {
    pub postgres: Vec<PostgresTarget>,
    pub libraries: Vec<LibraryTarget>,
    pub wire: bool,
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
            .chain(
                self.wire
                    .then(|| PathBuf::from("[wire: write/sendto, read/recvfrom]")),
            )
            .collect()
    }
}

/// The syscalls the wire decoder hooks: (tracepoint, program), ends before starts.
const WIRE_TRACEPOINTS: [(&str, &str); 6] = [
    ("sys_exit_read", "wire_read_return"),
    ("sys_exit_recvfrom", "wire_recvfrom_return"),
    ("sys_enter_read", "wire_read"),
    ("sys_enter_recvfrom", "wire_recvfrom"),
    ("sys_enter_write", "wire_write"),
    ("sys_enter_sendto", "wire_sendto"),
];

fn wire_globals(globals: &mut Globals) -> Result<()> {
    let mut offsets = [None::<u32>; 4];
    for (event, _) in WIRE_TRACEPOINTS {
        let fields = super::kernel::tracefs::field_offsets("syscalls", event)?;
        let names: &[(usize, &str)] = if event.starts_with("sys_exit") {
            &[(3, "ret")]
        } else if event.ends_with("sendto") {
            &[(0, "fd"), (1, "buff"), (2, "len")]
        } else if event.ends_with("recvfrom") {
            &[(0, "fd"), (1, "ubuf"), (2, "size")]
        } else {
            &[(0, "fd"), (1, "buf"), (2, "count")]
        };
        for (slot, name) in names {
            let offset = *fields
                .get(*name)
                .with_context(|| format!("syscalls:{event} has no field {name}"))?;
            if offsets[*slot].is_some_and(|o| o != offset) {
                bail!("syscalls:{event} lays out {name} unlike the other syscalls");
            }
            offsets[*slot] = Some(offset);
        }
    }
    for (slot, global_name) in [
        "TP_SYS_FD_OFF",
        "TP_SYS_BUF_OFF",
        "TP_SYS_LEN_OFF",
        "TP_SYS_RET_OFF",
    ]
    .into_iter()
    .enumerate()
    {
        global(globals, global_name, offsets[slot].expect("all set"));
    }
    Ok(())
}

/// Copies of `library`: the ones mapped by `pids`, or for the whole host the system's.
fn find_library(library: &ClientLibrary, pids: &[u32]) -> Vec<PathBuf> {
    if !pids.is_empty() {
        let mut out = Vec::new();
        for pid in pids {
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            for line in maps.lines() {
                if let Some(path) = line.split_whitespace().nth(5)
                    && Path::new(path)
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(library.prefix))
                {
                    out.push(PathBuf::from(format!("/proc/{pid}/root{path}")));
                }
            }
        }
        return out;
    }
    let mut out = Vec::new();
    for dir in ["/usr/lib", "/usr/lib64", "/usr/local/lib", "/lib"] {
        let mut dirs = vec![PathBuf::from(dir)];
        dirs.extend(
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().contains("-linux-"))
                }),
        );
        for d in dirs {
            let candidate = d.join(library.system_name);
            if candidate.is_file() {
                out.push(candidate);
            }
        }
    }
    out
}

/// Where `PQsocket()` reads the socket in a `PGconn`: its code is a NULL check and one
/// load from the first argument (x86_64 `mov eax, [rdi+disp]`; aarch64 `ldr w0, [x0, #imm]`).
fn pgconn_socket_offset(path: &Path, function_offset: u64) -> Option<u32> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut code = [0u8; 32];
    let mut file = std::fs::File::open(path).ok()?;
    file.seek(SeekFrom::Start(function_offset)).ok()?;
    file.read_exact(&mut code).ok()?;
    if cfg!(target_arch = "aarch64") {
        code.chunks_exact(4).find_map(|w| {
            let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            // LDR (immediate, 32-bit) with Rn = x0, Rt = w0.
            (w & 0xFFC0_03FF == 0xB940_0000).then(|| ((w >> 10) & 0xFFF) * 4)
        })
    } else {
        code.windows(6).find_map(|w| match w {
            [0x8b, 0x87, a, b, c, d] => Some(u32::from_le_bytes([*a, *b, *c, *d])),
            [0x8b, 0x47, d, ..] => Some(u32::from(*d)),
            _ => None,
        })
    }
}

fn library_target(library: &'static ClientLibrary, path: PathBuf) -> Result<LibraryTarget> {
    let mut names: Vec<&str> = library.probes.iter().map(|(n, _, _)| *n).collect();
    names.push("PQsocket");
    let functions = crate::probes::kernel::usdt::function_offsets(&path, &names)?;
    for name in library.required {
        if !functions.iter().any(|(n, _)| n == name) {
            bail!(
                "{} has no {name} symbol: not a {} library this profiler can probe",
                path.display(),
                library.name
            );
        }
    }
    Ok(LibraryTarget {
        library,
        path,
        functions,
    })
}

/// A PostgreSQL binary and its two query probes.
#[derive(Debug, Clone)]
pub struct PostgresTarget {
    pub path: PathBuf,
    start: UsdtProbe,
    done: UsdtProbe,
}

/// PostgreSQL server binaries installed the Debian way (`/usr/lib/postgresql/*/bin`).
pub fn postgres_binaries_installed() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/postgres"))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Executables of running PostgreSQL servers (`/proc/PID/exe`, which works across mount
/// namespaces), among `pids` or on the whole host.
fn running_postgres(pids: &[u32]) -> Vec<PathBuf> {
    let candidates: Vec<u32> = if pids.is_empty() {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    } else {
        pids.to_vec()
    };
    candidates
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|exe| {
                    exe.file_name()
                        .map(|n| n == "postgres" || n == "postmaster")
                })
                .unwrap_or(false)
        })
        .map(|pid| PathBuf::from(format!("/proc/{pid}/exe")))
        .collect()
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
    Ok(DbTargets {
        postgres,
        libraries,
        wire,
    })
}

fn discover_postgres(config: &DbConfig, pids: &[u32]) -> Result<Vec<PostgresTarget>> {
    let mut paths = config.postgres_binaries.clone();
    for path in &paths {
        if !path.is_file() {
            bail!("PostgreSQL binary {} does not exist", path.display());
        }
    }
    if paths.is_empty()
        && config.libpq.is_empty()
        && config.sqlite.is_empty()
        && config.mysql.is_empty()
    {
        paths = running_postgres(pids);
        if paths.is_empty() && pids.is_empty() {
            paths = postgres_binaries_installed();
        }
    }
    let mut seen = HashSet::new();
    let mut targets = Vec::new();
    for path in paths {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // the process exited meanwhile
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let probes = usdt::probes(&path)?;
        let find = |name: &str| {
            probes
                .iter()
                .find(|p| p.provider == "postgresql" && p.name == name)
                .cloned()
        };
        match (find("query__start"), find("query__done")) {
            (Some(start), _) if start.args.is_empty() => bail!(
                "{}: cannot read the argument of postgresql:query__start: {}",
                path.display(),
                start
                    .unsupported_args
                    .as_deref()
                    .unwrap_or("the probe has no argument")
            ),
            (Some(start), Some(done)) => targets.push(PostgresTarget { path, start, done }),
            _ => bail!(
                "{} has no postgresql:query__start/query__done USDT probes (a PostgreSQL built \
                 without --enable-dtrace); cannot time its queries",
                path.display()
            ),
        }
    }
    Ok(targets)
}

pub(super) fn globals(targets: &DbTargets, btf: &Btf, globals: &mut Globals) -> Result<()> {
    // libpq's socket offset (for the endpoint of client-side queries), when all agree.
    let offsets: HashSet<Option<u32>> = targets
        .libraries
        .iter()
        .filter(|t| t.library.name == LIBPQ.name)
        .map(|t| {
            let at = t.functions.iter().find(|(n, _)| n == "PQsocket")?.1;
            pgconn_socket_offset(&t.path, at)
        })
        .collect();
    let sock_off = match offsets.iter().collect::<Vec<_>>().as_slice() {
        [Some(off)] => *off,
        _ => 0,
    };
    global(globals, "PGCONN_SOCK_OFF", sock_off);
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
    Ok(links)
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
}

/// A decoded query event.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRecord {
    pub pid: u32,
    pub tid: u32,
    /// `postgres-usdt`, `libpq` or `sqlite`.
    pub source: &'static str,
    /// SQLite: the statement (prepare events name its text, statement events use it).
    pub handle: u64,
    /// SQLite: `text` is empty; the statement's text came with its prepare event.
    pub statement: bool,
    /// Wire sources: the request's first bytes as written (`text` is empty).
    pub raw: Vec<u8>,
    /// Wire sources: the reply's first bytes.
    pub reply: Vec<u8>,
    /// A PQsendPrepare: `text` is the statement and this its name (not a query itself).
    pub prepare_name: Option<String>,
    /// `text` is the name of a prepared statement (PQsendQueryPrepared).
    pub prepared: bool,
    pub error: bool,
    pub start_ns: u64,
    pub user_stack_id: i32,
    /// The process's parent when the query ran (a backend's postmaster).
    pub ppid: u32,
    pub comm: String,
    pub duration_ns: u64,
    pub text: String,
    /// The text was cut at `QUERY_MAX` bytes.
    pub truncated: bool,
}

pub fn decode(bytes: &[u8]) -> Option<QueryRecord> {
    if bytes.len() < std::mem::size_of::<DbEvent>() {
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
    } else if e.flags & FLAG_PREPARE != 0 && e.source == SOURCE_SQLITE {
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
        handle: e.handle,
        statement: e.flags & FLAG_STATEMENT != 0,
        prepare_name,
        prepared: e.flags & FLAG_PREPARED != 0,
        error: e.flags & FLAG_ERROR != 0,
        start_ns: e.start_ns,
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
