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
    // Multi-statement queries' further results.
    ("mysql_next_result", "mysql_next_result_return", true),
    ("mysql_next_result", "mysql_next_result", false),
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

/// The offset a one-load accessor reads from its first argument: `PQsocket()` (the socket in
/// a `PGconn`, 4 bytes) and `sqlite3_sql()` (the SQL text pointer in a `Vdbe`, 8 bytes) are
/// a NULL check and one load (x86_64 `mov eax|rax, [rdi+disp]`; aarch64 `ldr w0|x0,
/// [x0, #imm]`). `wide`: an 8-byte load.
pub(super) fn first_argument_load_offset(
    path: &Path,
    function_offset: u64,
    wide: bool,
) -> Option<u32> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut code = [0u8; 32];
    let mut file = std::fs::File::open(path).ok()?;
    file.seek(SeekFrom::Start(function_offset)).ok()?;
    file.read_exact(&mut code).ok()?;
    load_offset_in(&code, wide)
}

/// See `first_argument_load_offset`: the offset in the accessor's code.
fn load_offset_in(code: &[u8], wide: bool) -> Option<u32> {
    if cfg!(target_arch = "aarch64") {
        // LDR (immediate, unsigned offset) with Rn = x0, Rt = w0 / x0; imm12 scaled by size.
        let (opcode, scale) = if wide {
            (0xF940_0000, 8)
        } else {
            (0xB940_0000, 4)
        };
        code.chunks_exact(4).find_map(|w| {
            let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            (w & 0xFFC0_03FF == opcode).then(|| ((w >> 10) & 0xFFF) * scale)
        })
    } else {
        // The load's opcode and ModRM (rax/eax from [rdi + disp]); REX.W before it when wide.
        code.windows(7).find_map(|w| {
            let rex_ok = |i: usize| !wide || (i > 0 && w[i - 1] == 0x48);
            match w {
                [_, 0x8b, 0x87, a, b, c, d] if rex_ok(1) => {
                    Some(u32::from_le_bytes([*a, *b, *c, *d]))
                }
                [_, 0x8b, 0x47, d, ..] if rex_ok(1) => Some(u32::from(*d)),
                _ => None,
            }
        })
    }
}

pub(super) fn library_target(
    library: &'static ClientLibrary,
    path: PathBuf,
) -> Result<LibraryTarget> {
    let mut names: Vec<&str> = library.probes.iter().map(|(n, _, _)| *n).collect();
    names.push("PQsocket");
    names.push("sqlite3_sql");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn accessor_offsets_are_read_from_their_load() {
        // Debian's libpq PQsocket: test rdi,rdi; je; mov eax,[rdi+0x1b8]; ret.
        let pq_socket = [
            0x48, 0x85, 0xff, 0x74, 0x07, 0x8b, 0x87, 0xb8, 0x01, 0x00, 0x00, 0xc3, 0xb8, 0xff,
            0xff, 0xff, 0xff, 0xc3, 0x66, 0x66,
        ];
        assert_eq!(load_offset_in(&pq_socket, false), Some(0x1b8));
        // Debian's libsqlite3 sqlite3_sql: test rdi,rdi; je; mov rax,[rdi+0xf8]; ret.
        let sqlite3_sql = [
            0x48, 0x85, 0xff, 0x74, 0x0b, 0x48, 0x8b, 0x87, 0xf8, 0x00, 0x00, 0x00, 0xc3, 0x0f,
            0x1f, 0x00, 0x31, 0xc0, 0xc3,
        ];
        assert_eq!(load_offset_in(&sqlite3_sql, true), Some(0xf8));
        // A 4-byte load is no pointer: not taken for the 8-byte one.
        assert_eq!(load_offset_in(&pq_socket, true), None);
    }
}
