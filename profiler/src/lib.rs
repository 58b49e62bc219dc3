//! profiler: an eBPF kernel-level latency profiler.
//!
//! The stages, in the order data flows through them:
//!
//! ```text
//! kernel (profiler-ebpf/src/<family>.rs)
//!   │ maps, ring buffers
//!   ▼
//! probes/      ① load, configure, attach, detach; read maps   (kernel/: btf, tracefs, uprobe, usdt)
//! collect/     ② drain each interval, aggregate per family     (offcpu, oncpu, syscalls, tcp, db/)
//! symbolize/   ③ addresses → frames                            (blazesym, proc maps, syscall names)
//! model/       ④ the Capture every view reads
//! render/      ⑤ folded, flamegraph, summary, pprof, prometheus, outputs
//! compare/     ⑥ regression verdicts between captures          (statistics, diff report)
//! serve/       ⑦ the daemon: windows, budget, HTTP, events, metrics
//! commands/    thin wiring per subcommand; cli.rs: the flags
//! ```
//!
//! A family's name is the same at every layer: `profiler-ebpf/src/tcp.rs`,
//! `profiler-common/src/tcp.rs`, `probes/tcp.rs`, `collect/tcp.rs`, `tests/tests/tcp.rs`.

pub mod cli;
pub mod collect;
pub mod commands;
pub mod compare;
pub mod model;
pub mod probes;
pub mod render;
pub mod serve;
pub mod symbolize;

pub use commands::run;
