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
//! export/      ⑧ pushes to profile stores                      (Pyroscope, OTLP)
//! commands/    thin wiring per subcommand; cli.rs: the flags
//! ```
//!
//! A family's name is the same at every layer: `profiler-ebpf/src/tcp.rs`,
//! `profiler-common/src/tcp.rs`, `probes/tcp.rs`, `collect/tcp.rs`, `tests/tests/tcp.rs`.

// In flow order (a comment per stage keeps rustfmt from sorting them).
// ① load, configure, attach, detach; read the maps
pub mod probes;
// ② drain each interval, aggregate per family
pub mod collect;
// ③ addresses → frames
pub mod symbolize;
// ④ the Capture
pub mod model;
// ⑤ views of a Capture
pub mod render;
// ⑥ verdicts between Captures
pub mod compare;
// ⑦ the daemon
pub mod serve;
// ⑧ profiles leaving the host
pub mod export;
// thin wiring per subcommand
pub mod commands;
// the flags
pub mod cli;

pub use commands::run;
