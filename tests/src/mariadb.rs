//! A throwaway MariaDB server for the database tests: mariadb-install-db in a temp dir,
//! mariadbd on a private unix socket, no networking, no grant tables; stopped and removed on
//! drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct MariaDb {
    pub dir: PathBuf,
    pub socket: PathBuf,
    server: Child,
}

impl MariaDb {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Started with extra server options (e.g. `--performance-schema=ON`).
    pub fn start_with(name: &str, options: &[&str]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("profiler-maria-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("server dir");
        let status = Command::new("chown")
            .arg("mysql:mysql")
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(
            status.success(),
            "chown mysql (is mariadb-server installed?)"
        );
        let data = dir.join("data");
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--user=mysql",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ])
            .output()
            .expect("mariadb-install-db (cargo xtask setup installs mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = dir.join("sock");
        let server = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("err.log").display()))
            .args(["--skip-networking", "--user=mysql", "--skip-grant-tables"])
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        let db = Self {
            dir,
            socket,
            server,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while db.try_sql("SELECT 1").is_none() {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                std::fs::read_to_string(db.dir.join("err.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        db
    }

    fn try_sql(&self, sql: &str) -> Option<String> {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-u", "root", "-N", "-B", "-e", sql])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs SQL with the mariadb client; tab-separated rows.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|| panic!("mariadb -e {sql:?} failed"))
    }

    /// A global status counter (`SHOW GLOBAL STATUS`), e.g. `Com_select`.
    pub fn status(&self, name: &str) -> u64 {
        self.sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"))
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no status {name}"))
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.server.id() as i32, libc::SIGTERM) };
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
