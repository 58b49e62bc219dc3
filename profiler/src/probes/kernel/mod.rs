//! Kernel-facing helpers the probe families share, one file per job: the running kernel's
//! BTF (struct offsets, prototypes), tracefs (tracepoint formats), the uprobe PMU (attach
//! with a USDT semaphore) and USDT notes of ELF files.

pub mod btf;
pub mod tracefs;
pub mod uprobe;
pub mod usdt;
