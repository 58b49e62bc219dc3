//! Database family: query latency from probes in database servers and client libraries.
//! Today: PostgreSQL's `query__start` / `query__done` USDT probes. One event per query.

/// Bytes of query text kept (longer text is cut).
pub const QUERY_MAX: usize = 256;
/// libpq: commands one connection may have waiting for results at once (pipeline mode)
/// and still be timed, each from its send to the end of its own results.
pub const PIPELINE_SLOTS: u32 = 32;

/// Where an event comes from.
pub const SOURCE_POSTGRES_USDT: u32 = 1;
/// libpq in the client: PQsendQuery* / PQsendPrepare entry to PQgetResult returning NULL.
pub const SOURCE_LIBPQ: u32 = 2;
/// SQLite in the process: time inside sqlite3_step from a statement's first step to the
/// one that returns DONE or an error (or to its reset).
pub const SOURCE_SQLITE: u32 = 3;
/// Seen on the wire (write/sendto of a request, the first read/recvfrom with data after it
/// on the same socket), for clients that use no probed library.
pub const SOURCE_WIRE_POSTGRES: u32 = 4;
pub const SOURCE_WIRE_REDIS: u32 = 5;
/// libmariadb / libmysqlclient: mysql_real_query, or mysql_send_query to
/// mysql_read_query_result, per connection; prepared statements from mysql_stmt_execute to
/// mysql_stmt_store_result (or the execute's return), per statement handle.
pub const SOURCE_MYSQL: u32 = 6;
/// MySQL's COM_QUERY on the wire.
pub const SOURCE_WIRE_MYSQL: u32 = 7;

/// The query ended without its done probe: a new query started on the same thread first
/// (PostgreSQL leaves a failed query with a longjmp past `query__done`).
pub const FLAG_ERROR: u32 = 1;
/// libpq: `query` holds a prepared statement's name (PQsendQueryPrepared).
pub const FLAG_PREPARED: u32 = 2;
/// libpq: a PQsendPrepare; `query` holds the name at [0, PREPARE_NAME_MAX) and the text
/// after it. Not a query of its own: it tells userspace what the name stands for.
pub const FLAG_PREPARE: u32 = 4;
pub const PREPARE_NAME_MAX: usize = 64;
/// SQLite, MySQL prepared statements: `handle` is a statement whose text came with an
/// earlier FLAG_PREPARE event of the same handle (`query` is empty).
pub const FLAG_STATEMENT: u32 = 8;
/// MySQL: a further result of the multi-statement query last sent on connection `handle`
/// (mysql_next_result; `query` is empty): userspace names it from that query's text.
pub const FLAG_MORE_RESULTS: u32 = 16;

/// How a probe argument is read (see `profiler/src/probes/kernel/usdt.rs`).
pub const ARG_KIND_REGISTER: u32 = 1;
pub const ARG_KIND_MEMORY: u32 = 2;
pub const ARG_KIND_CONSTANT: u32 = 3;

/// A query in flight on a thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbPending {
    /// 0 when no query is in flight.
    pub start_ns: u64,
    /// The thread's run-queue wait so far (`sched_info.run_delay`) when the clock started;
    /// 0 when unknown.
    pub queued_ns: u64,
    pub source: u32,
    /// Bytes of `query` used (without the NUL).
    pub len: u32,
    /// The caller's user stack (client-side sources), or a negative error.
    pub user_stack_id: i32,
    /// libpq: the command's place in its connection's pipeline (commands sent so far).
    pub seq: u32,
    /// How long the probe worked (stack walk, text read) between the application's call and
    /// `start_ns`: the call was at `start_ns - probe_ns`, and `queued_ns` was read then.
    pub probe_ns: u32,
    pub _pad: u32,
    pub query: [u8; QUERY_MAX],
}

/// SQLite: an execution of a statement: from its first step to DONE, an error or a reset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqliteExec {
    pub first_ns: u64,
    /// The thread's run-queue wait so far at the first step.
    pub first_queued_ns: u64,
    /// Time spent inside sqlite3_step so far.
    pub in_step_ns: u64,
    /// Entry of the step in progress.
    pub step_ns: u64,
    /// The user stack that stepped it first (the code path that ran the statement).
    pub user_stack_id: i32,
    /// As `DbPending::probe_ns`.
    pub probe_ns: u32,
}

/// MySQL: an execution of a prepared statement.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MysqlExec {
    pub start_ns: u64,
    /// The thread's run-queue wait so far at the start.
    pub queued_ns: u64,
    /// When mysql_stmt_execute returned (0: not yet).
    pub executed_ns: u64,
    pub user_stack_id: i32,
    /// As `DbPending::probe_ns`.
    pub probe_ns: u32,
}

/// A thread waiting for a client-side query: the off-CPU family files the thread's blocked
/// time under the query (`frame`) and the code path that issued it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbInflight {
    /// `frame_hash` of the query text (never 0).
    pub frame: u32,
    /// The issuing user stack.
    pub user_stack_id: i32,
}

/// Bytes of query text `frame_hash` looks at.
pub const FRAME_HASH_BYTES: usize = 128;

/// A hash of the query text that ignores digits, quoted strings and whitespace: the same
/// for calls that differ only in literals. Computed alike in the kernel (at the call) and
/// in userspace (to name the frame).
#[inline(always)]
pub fn frame_hash(text: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut quoted = false;
    let mut i = 0;
    while i < FRAME_HASH_BYTES && i < text.len() {
        let b = text[i];
        if b == 0 {
            break;
        }
        if b == b'\'' {
            quoted = !quoted;
        } else if !quoted && !b.is_ascii_digit() && b != b' ' && b != b'\n' && b != b'\t' {
            hash = (hash ^ b as u32).wrapping_mul(0x0100_0193);
        }
        i += 1;
    }
    hash | 1
}
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbEvent {
    pub tgid: u32,
    pub tid: u32,
    pub source: u32,
    pub flags: u32,
    pub start_ns: u64,
    /// 0 for abandoned queries (`FLAG_ERROR`).
    pub duration_ns: u64,
    /// The thread's run-queue wait so far (`sched_info.run_delay`) when the clock started
    /// and when the event was sent (at or after the query's end), plus 1: 0 when unknown
    /// (a thread that never waited reads 1). Userspace
    /// takes the time a thread waited for a CPU between two queries out of the gap between
    /// them (N+1 runs).
    pub queued_start_ns: u64,
    pub queued_end_ns: u64,
    pub len: u32,
    pub user_stack_id: i32,
    /// The process's parent (for a server backend: the postmaster).
    pub ppid: u32,
    /// As `DbPending::probe_ns`: the application called at `start_ns - probe_ns`.
    pub probe_ns: u32,
    /// SQLite, MySQL statements: the statement handle the event is about; libpq and wire:
    /// the socket fd + 1.
    pub handle: u64,
    /// Wire: the first bytes of the response (MySQL's PREPARE_OK carries the statement id
    /// that later COM_STMT_EXECUTEs name).
    pub reply: [u8; 16],
    /// libpq and wire: the socket's peer, read by the kernel when the event was sent (the
    /// connection may be closed before userspace could look): `AF_INET`/`AF_INET6` with the
    /// address in network order and the port in host order, `AF_UNIX`, or 0 when unknown.
    pub peer_family: u16,
    pub peer_port: u16,
    pub _pad2: u32,
    pub peer: [u8; 16],
    pub comm: [u8; 16],
    pub query: [u8; QUERY_MAX],
}

/// Bytes of a pipelined write kept (`DbWireBatch`).
pub const WIRE_BATCH_MAX: usize = 4096;

/// Wire: a request write longer than `QUERY_MAX` (several requests written at once, a
/// pipeline, or one long one): its first `WIRE_BATCH_MAX` bytes, sent at the write, as
/// long as the write (`WIRE_BATCH_HEADER` bytes, then the write's). The request's `DbEvent`
/// (at its reply) has the same process, socket and start time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbWireBatch {
    /// `WIRE_BATCH_MARKER`, where a `DbEvent` has its (never all-ones) tgid.
    pub marker: u32,
    /// The socket fd + 1 (as `DbEvent::handle`).
    pub fd: u32,
    pub tgid: u32,
    pub _pad: u32,
    pub start_ns: u64,
    /// The write's length (bytes past `WIRE_BATCH_MAX` are not sent).
    pub len: u64,
    pub bytes: [u8; WIRE_BATCH_MAX],
}

pub const WIRE_BATCH_MARKER: u32 = u32::MAX;
pub const WIRE_BATCH_HEADER: usize = 32;

pub mod counter {
    pub const QUERIES: u32 = 0;
    pub const PENDING_MAP_FULL: u32 = 1;
    pub const EVENTS_LOST: u32 = 2;
    /// Queries that started again before the previous one reported done.
    pub const ABANDONED: u32 = 3;
    /// Query text that could not be read from the process.
    pub const TEXT_UNREADABLE: u32 = 4;
    /// Client-side calls whose user stack could not be taken.
    pub const STACK_LOST: u32 = 5;
    /// Wire: a request sent while another was still waiting for its response on the same
    /// socket (pipelining): only the first is timed.
    pub const PIPELINED: u32 = 6;
    /// libpq: a command sent while `PIPELINE_SLOTS` others of its connection were still
    /// waiting for their results (pipeline mode): counted, not timed.
    pub const PIPELINE_TOO_DEEP: u32 = 7;
    /// SQLite: statements prepared before the capture whose text was read from the
    /// statement itself at their first step.
    pub const SQLITE_TEXT_AT_STEP: u32 = 8;
    pub const COUNT: u32 = 9;

    pub const NAMES: [&str; COUNT as usize] = [
        "queries",
        "pending_map_full",
        "events_lost",
        "abandoned",
        "text_unreadable",
        "stack_lost",
        "pipelined",
        "pipeline_too_deep",
        "sqlite_text_at_step",
    ];
}

pub mod maps {
    pub const PENDING: &str = "DB_PENDING";
    pub const EVENTS: &str = "DB_EVENTS";
    pub const COUNTERS: &str = "DB_COUNTERS";
    /// Queries in flight, per source (each value begins with its start time, 0 once done).
    pub const CLIENT_PENDING: &str = "DB_CLIENT_PENDING";
    pub const LIBPQ_COMMANDS: &str = "DB_LIBPQ_COMMANDS";
    pub const WIRE_PENDING: &str = "DB_WIRE_PENDING";
    pub const MYSQL_EXEC: &str = "DB_MYSQL_EXEC";
    pub const SQLITE_EXEC: &str = "DB_SQLITE_EXEC";
    pub const PG_EXTENDED: &str = "DB_PG_EXTENDED";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and bytes with explicit padding.
    unsafe impl aya::Pod for super::DbInflight {}
    unsafe impl aya::Pod for super::DbPending {}
    unsafe impl aya::Pod for super::DbEvent {}
    unsafe impl aya::Pod for super::DbWireBatch {}
    unsafe impl aya::Pod for super::MysqlExec {}
    unsafe impl aya::Pod for super::SqliteExec {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_hash_ignores_literals_and_layout() {
        let a = super::frame_hash(b"SELECT * FROM t WHERE id = 42 AND name = 'x'");
        let b = super::frame_hash(b"SELECT *  FROM t\nWHERE id = 7 AND name = 'yyy'\0junk");
        let c = super::frame_hash(b"SELECT * FROM u WHERE id = 42");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(super::frame_hash(b""), 0);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(
            core::mem::size_of::<super::DbPending>(),
            40 + super::QUERY_MAX
        );
        assert_eq!(
            core::mem::size_of::<super::DbEvent>(),
            128 + super::QUERY_MAX
        );
        assert_eq!(core::mem::size_of::<super::SqliteExec>(), 40);
        assert_eq!(core::mem::size_of::<super::MysqlExec>(), 32);
        assert_eq!(
            core::mem::size_of::<super::DbWireBatch>(),
            super::WIRE_BATCH_HEADER + super::WIRE_BATCH_MAX
        );
    }
}
