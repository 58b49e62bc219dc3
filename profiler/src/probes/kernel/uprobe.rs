//! Attaching a loaded eBPF program to a uprobe through perf_event_open(2) on the `uprobe` PMU,
//! which (unlike the attach call of the eBPF library) takes a reference-counter offset: the
//! kernel then raises a USDT semaphore in every process that maps the file, now and later,
//! and lowers it when the probe goes away.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use anyhow::{Context as _, Result, bail};

const PMU_DIR: &str = "/sys/bus/event_source/devices/uprobe";
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

/// An attached uprobe; closing the perf event detaches it (and lowers the semaphore).
#[derive(Debug)]
pub struct UprobeLink {
    _fd: OwnedFd,
}

fn pmu_type() -> Result<u32> {
    let text = std::fs::read_to_string(format!("{PMU_DIR}/type"))
        .context("this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe)")?;
    Ok(text.trim().parse()?)
}

/// Bit of `config` that makes a return probe, from the PMU's format directory.
fn retprobe_bit() -> Result<u32> {
    let text = std::fs::read_to_string(format!("{PMU_DIR}/format/retprobe"))
        .context("the uprobe PMU does not describe its retprobe bit")?;
    text.trim()
        .strip_prefix("config:")
        .and_then(|b| b.parse().ok())
        .context("unexpected uprobe retprobe format")
}

/// Attaches program `prog` at file offset `offset` of `path` for every process (or only
/// `pid`); `ref_ctr_offset` (file offset of a USDT semaphore, 0 for none) is raised while the
/// probe is attached.
pub fn attach(
    prog: BorrowedFd<'_>,
    path: &Path,
    offset: u64,
    ref_ctr_offset: u64,
    retprobe: bool,
    pid: Option<u32>,
) -> Result<UprobeLink> {
    let path_c = CString::new(path.as_os_str().as_bytes()).context("path with a NUL byte")?;
    let mut config = ref_ctr_offset << 32;
    if retprobe {
        config |= 1u64 << retprobe_bit()?;
    }
    // struct perf_event_attr, PERF_ATTR_SIZE_VER5 (112 bytes) is enough here.
    let mut attr = [0u8; 128];
    let put32 = |attr: &mut [u8; 128], at: usize, v: u32| {
        attr[at..at + 4].copy_from_slice(&v.to_ne_bytes())
    };
    let put64 = |attr: &mut [u8; 128], at: usize, v: u64| {
        attr[at..at + 8].copy_from_slice(&v.to_ne_bytes())
    };
    put32(&mut attr, 0, pmu_type()?); // type
    put32(&mut attr, 4, 112); // size
    put64(&mut attr, 8, config); // config
    put64(&mut attr, 16, 1); // sample_period
    put64(&mut attr, 56, path_c.as_ptr() as u64); // config1: uprobe_path
    put64(&mut attr, 64, offset); // config2: probe_offset
    let (pid_arg, cpu_arg): (libc::c_int, libc::c_int) = match pid {
        Some(pid) => (pid as libc::c_int, -1),
        None => (-1, 0),
    };
    // SAFETY: attr is a valid perf_event_attr of the size it declares; path_c outlives the
    // call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            pid_arg,
            cpu_arg,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "cannot create a uprobe at {}+{offset:#x}{}: {err}",
            path.display(),
            if ref_ctr_offset != 0 {
                " with a USDT semaphore"
            } else {
                ""
            }
        );
    }
    // SAFETY: a new fd that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    // SAFETY: ioctls on our perf event fd with a program fd argument.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) != 0 {
            bail!(
                "cannot attach the program to the uprobe at {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        if libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) != 0 {
            bail!(
                "cannot enable the uprobe at {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(UprobeLink { _fd: fd })
}
