//! The output directory of a capture: `capture.json`, folded stacks and flamegraphs per
//! family, `summary.txt`.
//!
//! Private and crash-safe: a capture holds process names, command paths, peer addresses and
//! query fingerprints, so the directories we create are 0700 and every file 0600. Each file
//! is written under a temporary name, synced and renamed, and `capture.json` comes last: a
//! file present is complete, and a directory with `capture.json` has all its views.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::model::Capture;
use crate::render;

/// Temporary files of ours start with this; a new recording into the directory removes them.
const TEMP_PREFIX: &str = ".profiler-tmp-";

/// Writes `capture.json`, the folded stacks and flamegraphs of each family recorded (their
/// roots grouped by `group_by`), and `summary.txt`, and prints the summary.
pub fn write_outputs(
    capture: &Capture,
    dir: &Path,
    top: usize,
    print: bool,
    group_by: render::GroupBy,
) -> Result<()> {
    let full = capture;
    let grouped = render::group_roots(capture, group_by);
    let capture = &grouped;
    if let Some(offcpu) = &capture.offcpu {
        let lines = render::folded(&offcpu.stacks, |s| s.total_ns, 1000);
        write_folded(&dir.join("offcpu.folded"), &lines)?;
        write_svg(&lines, &render::OFFCPU_STYLE, &dir.join("offcpu.svg"))?;
    }
    if let Some(oncpu) = &capture.oncpu {
        let lines = render::folded(&oncpu.stacks, |s| s.count, 1);
        write_folded(&dir.join("oncpu.folded"), &lines)?;
        write_svg(&lines, &render::ONCPU_STYLE, &dir.join("oncpu.svg"))?;
    }
    if let Some(syscalls) = &capture.syscalls {
        let lines = render::folded(&syscalls.slow, |s| s.total_ns, 1000);
        write_folded(&dir.join("syscalls.folded"), &lines)?;
    }
    if let Some(db) = &capture.db {
        let lines = render::db_folded(db);
        write_folded(&dir.join("db.folded"), &lines)?;
        write_svg(&lines, &render::DB_STYLE, &dir.join("db.svg"))?;
    }
    let wallclock = render::wallclock(capture);
    if !wallclock.is_empty() {
        write_folded(&dir.join("wallclock.folded"), &wallclock)?;
        write_svg(
            &wallclock,
            &render::WALLCLOCK_STYLE,
            &dir.join("wallclock.svg"),
        )?;
    }
    let capture = full;
    let summary = render::summary(capture, top);
    write_private(&dir.join("summary.txt"), |w| {
        w.write_all(summary.as_bytes())?;
        Ok(())
    })?;
    // Last: its presence says every other file is complete.
    write_private(&dir.join(crate::model::CAPTURE_FILE), |w| {
        serde_json::to_writer(w, capture)?;
        Ok(())
    })?;
    sync_dir(dir)?;
    if print {
        print!("{summary}");
        println!("wrote {}", dir.display());
    }
    Ok(())
}

fn write_svg(lines: &[String], style: &render::FlameStyle, path: &Path) -> Result<()> {
    write_private(path, |w| render::write_flamegraph(lines, style, w))
}

fn write_folded(path: &Path, lines: &[String]) -> Result<()> {
    write_private(path, |w| {
        for line in lines {
            w.write_all(line.as_bytes())?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// Writes `path` (mode 0600) through a temporary file in the same directory: written,
/// synced, then renamed over `path`, so `path` is never seen half-written.
pub(crate) fn write_private(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let temp = path.with_file_name(format!("{TEMP_PREFIX}{}", name.to_string_lossy()));
    let result = (|| -> Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        let mut writer = std::io::BufWriter::new(file);
        fill(&mut writer)?;
        let file = writer.into_inner().map_err(|err| err.into_error())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Makes a directory's entries (renames, new files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Creates `dir` and its missing parents with mode 0700 (an existing one is left as it is).
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))
}

pub(crate) fn prepare_output_dir(dir: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.is_dir()
        && meta.permissions().mode() & 0o022 != 0
    {
        // Anyone in the group (or everyone) could replace what we write there.
        eprintln!(
            "profiler: warning: {} is writable by {} (mode {:o}); the capture holds process \
             names, paths, addresses and queries — prefer a private directory",
            dir.display(),
            if meta.permissions().mode() & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            meta.permissions().mode() & 0o7777
        );
    }
    create_private_dir(dir)?;
    // Temporary files an interrupted run left behind.
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let probe = dir.join(format!("{TEMP_PREFIX}write-test"));
    std::fs::write(&probe, b"")
        .with_context(|| format!("cannot write to output directory {}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_no_temporary_is_left() {
        let dir = std::env::temp_dir().join(format!("profiler-outputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir.join("a/b")).unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("a/b"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let path = dir.join("a/b/f.txt");
        write_private(&path, |w| Ok(w.write_all(b"one")?)).unwrap();
        // A failed rewrite leaves the old file whole and no temporary behind.
        let failed = write_private(&path, |w| {
            w.write_all(b"half")?;
            anyhow::bail!("interrupted")
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = std::fs::read_dir(dir.join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.txt")]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
