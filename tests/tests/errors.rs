//! Bad input gets one clear error line and a non-zero exit, never a panic.

use std::process::Command;

use profiler_tests::*;

fn assert_one_error_line(output: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit status; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {stderr}");
    assert!(lines[0].starts_with("profiler: error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unknown_pid_is_refused() {
    require_root();
    let dir = temp_dir("unknown-pid");
    let out = dir.join("out");
    let output = run_profiler(&[
        "record",
        "-d",
        "1s",
        "-p",
        "99999999",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_one_error_line(&output, "no process with id 99999999");
}

#[test]
fn missing_btf_is_refused() {
    require_root();
    let dir = temp_dir("no-btf");
    let out = dir.join("out");
    let output = run_profiler(&[
        "record",
        "-d",
        "1s",
        "--btf",
        "/nonexistent/vmlinux",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_one_error_line(&output, "no BTF");
}

#[test]
fn unwritable_output_dir_is_refused() {
    require_root();
    // A path below a regular file cannot be created, even by root.
    let output = run_profiler(&["record", "-d", "1s", "-o", "/etc/hostname/out"]);
    assert_one_error_line(&output, "output directory /etc/hostname/out");
}

#[test]
fn unprivileged_user_is_told_to_run_as_root() {
    require_root();
    // A copy nobody can execute regardless of where the workspace lives.
    let dir = temp_dir("unprivileged");
    let bin = dir.join("profiler");
    std::fs::copy(profiler_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("out");
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin)
        .args(["record", "-d", "1s", "-o"])
        .arg(&out)
        .output()
        .expect("setpriv (util-linux)");
    assert_one_error_line(&output, "needs root");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let output = run_profiler(&["record", "-d", "soon", "-o", "/tmp/x"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a duration"));
}

/// A process with no database library and no server in it: the db family says so in one
/// note line and watches its sockets instead (it may speak a protocol itself); a process
/// that never does leaves an empty query table, not an error.
#[test]
fn db_family_on_a_process_without_a_database_client_watches_its_sockets() {
    require_root();
    let dir = temp_dir("db-no-server");
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let output = run_profiler(&[
        "record",
        "-d",
        "1s",
        "--events",
        "db",
        "-p",
        &pid,
        "-o",
        dir.join("out").to_str().unwrap(),
    ]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let notes: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("profiler: note: "))
        .collect();
    assert_eq!(notes.len(), 1, "{stderr}");
    assert!(notes[0].contains("watching their sockets"), "{stderr}");
    let capture = read_capture(&dir.join("out"));
    assert_eq!(capture["db"]["queries"].as_array().map(Vec::len), Some(0));
}

#[test]
fn a_binary_without_query_probes_is_refused() {
    require_root();
    let dir = temp_dir("db-no-probes");
    for (i, (flag, path, needle)) in [
        (
            "--postgres-binary",
            "/bin/true",
            "no postgresql:query__start/query__done USDT probes",
        ),
        (
            "--postgres-binary",
            "/nonexistent/postgres",
            "/nonexistent/postgres does not exist",
        ),
        ("--libpq", "/bin/true", "has no PQgetResult symbol"),
        ("--mysql", "/bin/true", "has no mysql_real_query symbol"),
        ("--sqlite", "/nonexistent/libsqlite3.so", "does not exist"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.join(format!("out{i}"));
        let output = run_profiler(&[
            "record",
            "-d",
            "1s",
            "--events",
            "db",
            flag,
            path,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_one_error_line(&output, needle);
    }
}
