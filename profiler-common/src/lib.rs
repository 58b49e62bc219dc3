//! `#[repr(C)]` types shared by the kernel side (`profiler-ebpf`) and userspace (`profiler`).
//!
//! One module per probe family, named like the family's kernel file and userspace module;
//! `shared` holds what the families have in common (stacks, filters, new-task events).
#![no_std]

pub mod db;
pub mod offcpu;
pub mod oncpu;
pub mod python;
pub mod shared;
pub mod syscalls;
pub mod tcp;
pub mod unwind;
