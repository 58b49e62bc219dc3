//! `#[repr(C)]` types shared by the kernel side (`profiler-ebpf`) and userspace (`profiler`).
//!
//! One module per probe family, named like the family's kernel file and userspace module.
#![no_std]

pub mod offcpu;
