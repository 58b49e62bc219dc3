//! The client libraries the db family probes inside applications (libpq, SQLite,
//! MySQL/MariaDB): their functions, where a process maps them, and where in a `PGconn`
//! libpq keeps its socket.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

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
    pub(super) probes: &'static [(&'static str, &'static str, bool)],
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
        ("PQfinish", "libpq_finish", false),
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

pub(super) const MYSQL_PROBES: &[(&str, &str, bool)] = &[
    ("mysql_real_query", "mysql_query_return", true),
    ("mysql_read_query_result", "mysql_query_return", true),
    ("mysql_read_query_result", "mysql_read_result", false),
    ("mysql_real_query", "mysql_query", false),
    ("mysql_send_query", "mysql_query", false),
    // Prepared statements: ends (store_result, then the execute's return) before starts.
    (
        "mysql_stmt_store_result",
        "mysql_stmt_store_result_return",
        true,
    ),
    ("mysql_stmt_store_result", "mysql_stmt_store_result", false),
    ("mysql_stmt_execute", "mysql_stmt_execute_return", true),
    ("mysql_stmt_reset", "mysql_stmt_done", false),
    ("mysql_stmt_free_result", "mysql_stmt_done", false),
    ("mysql_stmt_close", "mysql_stmt_done", false),
    ("mysql_stmt_execute", "mysql_stmt_execute", false),
    ("mysql_stmt_prepare", "mysql_stmt_prepare", false),
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
    pub(super) functions: Vec<(String, u64)>,
}

/// Copies of `library`: the ones mapped by `pids`, or for the whole host the system's.
pub(super) fn find_library(library: &ClientLibrary, pids: &[u32]) -> Vec<PathBuf> {
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
pub(super) fn pgconn_socket_offset(path: &Path, function_offset: u64) -> Option<u32> {
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

pub(super) fn library_target(
    library: &'static ClientLibrary,
    path: PathBuf,
) -> Result<LibraryTarget> {
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
