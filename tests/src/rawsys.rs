//! Raw x86_64 system calls for the workloads. Inlined into the calling function, so the user
//! stack the kernel captures starts in that function (no libc frame, which has no frame
//! pointer, in between).

use std::arch::asm;
use std::time::Duration;

pub const SYS_READ: usize = 0;
pub const SYS_WRITE: usize = 1;
pub const SYS_NANOSLEEP: usize = 35;
pub const SYS_FUTEX: usize = 202;
pub const FUTEX_WAIT_PRIVATE: usize = 128;
pub const FUTEX_WAKE_PRIVATE: usize = 129;

/// # Safety
/// The arguments must be valid for system call `n`.
#[inline(always)]
pub unsafe fn syscall3(n: usize, a1: usize, a2: usize, a3: usize) -> isize {
    let ret: isize;
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a1, in("rsi") a2,
             in("rdx") a3, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// # Safety
/// The arguments must be valid for system call `n`.
#[inline(always)]
pub unsafe fn syscall4(n: usize, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
    let ret: isize;
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a1, in("rsi") a2,
             in("rdx") a3, in("r10") a4, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

pub fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// nanosleep(2) issued from the caller's own code.
#[inline(always)]
pub fn nanosleep(d: Duration) {
    let ts = timespec(d);
    // SAFETY: a valid timespec and no remainder pointer.
    let ret = unsafe { syscall3(SYS_NANOSLEEP, &ts as *const _ as usize, 0, 0) };
    assert_eq!(ret, 0, "nanosleep failed: {ret}");
}
