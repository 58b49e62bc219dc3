//! Kernel side of the profiler. One module per probe family; each module's programs and maps
//! are loaded and attached by the userspace module of the same name (`profiler/src/probes/`).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod common;
mod db;
mod offcpu;
mod oncpu;
mod python;
mod syscalls;
mod tcp;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
