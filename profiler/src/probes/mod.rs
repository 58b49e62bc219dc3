//! Loading, configuring, attaching and reading the kernel programs: one module per probe
//! family, named like the family's file in `profiler-ebpf/src/`.

pub mod offcpu;
pub mod tracefs;

/// The eBPF object built from `profiler-ebpf` by build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler-ebpf"));
