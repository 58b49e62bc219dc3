//! A throwaway PostgreSQL cluster for the database tests and benchmarks: initdb in a temp
//! dir as the `postgres` user, started with pg_ctl on a free port and a private socket
//! directory, pg_stat_statements preloaded; stopped and removed on drop.

use std::path::PathBuf;
use std::process::{Command, Output};

pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    pub bin: PathBuf,
    pub postmaster_pid: u32,
}

/// The newest installed PostgreSQL's bin directory (Debian layout).
pub fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL is not installed (/usr/lib/postgresql missing); `cargo xtask setup` \
             installs it",
        )
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().expect("no PostgreSQL server binary")
}

fn as_postgres(program: &std::path::Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PgCluster {
    pub fn start(name: &str) -> Self {
        let bin = pg_bin_dir();
        let dir = std::env::temp_dir().join(format!("profiler-pg-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        check(
            "chown",
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .output()
                .expect("chown"),
        );
        let data = dir.join("data");
        check(
            "initdb",
            as_postgres(&bin.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&data)
                .output()
                .expect("initdb"),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pg_stat_statements \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            dir.display()
        );
        check(
            "pg_ctl start",
            as_postgres(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("log"))
                .args(["-w", "-o", &options, "start"])
                .output()
                .expect("pg_ctl"),
        );
        let pidfile = std::fs::read_to_string(data.join("postmaster.pid")).expect("postmaster.pid");
        let postmaster_pid = pidfile.lines().next().unwrap().trim().parse().unwrap();
        Self {
            dir,
            port,
            bin,
            postmaster_pid,
        }
    }

    fn client(&self, program: &str) -> Command {
        let mut c = as_postgres(&self.bin.join(program));
        c.arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()]);
        c
    }

    /// Runs SQL with psql; rows as lines, columns separated by `|`.
    pub fn psql(&self, sql: &str) -> String {
        check(
            "psql",
            self.client("psql")
                .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, "postgres"])
                .output()
                .expect("psql"),
        )
    }

    /// Runs pgbench with `args` against the `postgres` database; returns its stdout.
    pub fn pgbench(&self, args: &[&str]) -> String {
        check(
            "pgbench",
            self.client("pgbench")
                .args(args)
                .arg("postgres")
                .output()
                .expect("pgbench"),
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// pgbench -r's per-statement average latency in milliseconds, by statement text.
pub fn pgbench_statement_latencies(output: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut in_section = false;
    for line in output.lines() {
        if line.contains("statement latencies in milliseconds") {
            in_section = true;
            continue;
        }
        if !in_section {
            continue;
        }
        let mut fields = line.split_whitespace();
        // "  0.093  SELECT …" (PostgreSQL 15 also prints a failures column on some builds).
        let Some(Ok(ms)) = fields.next().map(str::parse::<f64>) else {
            break;
        };
        let rest: Vec<&str> = fields.collect();
        let text_start = rest
            .iter()
            .position(|f| f.parse::<f64>().is_err())
            .unwrap_or(rest.len());
        out.push((rest[text_start..].join(" "), ms));
    }
    out
}
