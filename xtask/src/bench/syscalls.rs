//! `cargo xtask bench syscalls`: the syscalls family's cost per syscall on `dd bs=1` (two
//! syscalls per block, each as cheap as a syscall gets), against nothing attached and against
//! the floor: an empty program (`r0 = 0; exit`) on raw_syscalls sys_enter and on sys_exit,
//! attached as raw tracepoints — the same dispatch as tp_btf, so the least any tool that
//! times each call in eBPF adds. Variants alternate, rotated each round; medians with range.
//! The figure is dd's own CPU time (user + system, from wait4's rusage) per syscall: the
//! programs run in dd's context, so their cost is in it, and other load on the host is not.
//! Wall time is shown beside it. Separate runs with `--measure-overhead` give the programs'
//! own run time (bpf_stats).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Result, bail};

use anyhow::Context as _;

use super::{Variant, ebpf_ns_per_run, env_number, median, paired_ratio, range};

/// What runs beside dd.
#[derive(Clone, Copy)]
enum Tracer {
    Nothing,
    /// Empty raw tracepoint programs on sys_enter and sys_exit.
    Floor,
    /// `record` with these arguments.
    Profiler(&'static [&'static str]),
}

const VARIANTS: [(&str, Tracer); 5] = [
    ("nothing attached", Tracer::Nothing),
    ("floor: empty programs (raw_tp)", Tracer::Floor),
    (
        "syscalls family (tp_btf)",
        Tracer::Profiler(&["--events", "syscalls", "--attach", "tp-btf"]),
    ),
    (
        "syscalls family (tracepoint)",
        Tracer::Profiler(&["--events", "syscalls", "--attach", "tracepoint"]),
    ),
    ("all families (default)", Tracer::Profiler(&[])),
];

pub(super) fn run() -> Result<()> {
    let rounds = env_number("BENCH_ROUNDS", 7) as usize;
    let blocks = env_number("BENCH_DD_BLOCKS", 500_000);
    println!(
        "[bench syscalls] dd if=/dev/zero of=/dev/null bs=1 count={blocks} (2 syscalls per \
         block), whole host, {rounds} rounds, variants alternating"
    );
    let mut results = vec![Vec::new(); VARIANTS.len()];
    let mut wall = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for i in 0..VARIANTS.len() {
            let index = (i + round) % VARIANTS.len();
            let (label, tracer) = VARIANTS[index];
            let (cpu, elapsed) = with_tracer(tracer, &[], || dd_per_syscall(blocks))?;
            println!("  round {round}: {label:<32} {cpu:>7.1} CPU ns/syscall ({elapsed:.1} wall)");
            results[index].push(cpu);
            wall[index].push(elapsed);
        }
    }
    // Ratios per round against that round's untraced run (the pair), then their median.
    let base = median(&mut results[0].clone());
    let floor = median(&mut results[1].clone());
    println!("[bench syscalls] dd's CPU time per syscall, medians over {rounds} rounds:");
    for (i, (label, _)) in VARIANTS.iter().enumerate() {
        let (ratio, r_low, r_high) = paired_ratio(&results[i], &results[0]);
        let (low, high) = range(&results[i]);
        let m = median(&mut results[i]);
        let w = median(&mut wall[i]);
        println!(
            "  {label:<32} {m:>7.1} ns/syscall (range {low:.1}–{high:.1}; wall {w:.1})  ratio \
             {ratio:.3}x (range {r_low:.3}–{r_high:.3})  added {:+.1} ns/syscall ({:+.1} above \
             the floor)",
            m - base,
            m - floor
        );
    }
    // Kernel run time per program run (two runs per syscall), in untimed runs: statistics
    // cost about 20 ns per run themselves.
    for (label, tracer) in &VARIANTS[2..4] {
        let mut per_run = Vec::new();
        for _ in 0..rounds.min(3) {
            with_tracer(*tracer, &["--measure-overhead"], || dd_per_syscall(blocks))?;
            if let Some(ns) = ebpf_ns_per_run()? {
                per_run.push(ns);
            }
        }
        if !per_run.is_empty() {
            let (low, high) = range(&per_run);
            println!(
                "  eBPF run time, {label:<28} {:>5.1} ns per program run (range \
                 {low:.1}–{high:.1}), two runs per syscall",
                median(&mut per_run)
            );
        }
    }
    Ok(())
}

/// `dd if=/dev/zero of=/dev/null bs=1 count=N` (2N syscalls): dd's CPU time (user + system)
/// and its wall time, each in ns per syscall.
fn dd_per_syscall(blocks: u64) -> Result<(f64, f64)> {
    let start = std::time::Instant::now();
    let child = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            "of=/dev/null",
            "bs=1",
            &format!("count={blocks}"),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot run dd")?;
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into the locals passed.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let elapsed = start.elapsed().as_nanos() as f64;
    if pid < 0 {
        bail!("waiting for dd failed: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("dd failed (wait status {status})");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e9 + t.tv_usec as f64 * 1e3;
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    let syscalls = (2 * blocks) as f64;
    Ok((cpu / syscalls, elapsed / syscalls))
}

fn with_tracer<T>(tracer: Tracer, extra: &[&str], work: impl FnOnce() -> Result<T>) -> Result<T> {
    match tracer {
        Tracer::Nothing => work(),
        Tracer::Floor => {
            let _attached = attach_empty_programs()?;
            work()
        }
        Tracer::Profiler(args) => {
            let args: Vec<&str> = args.iter().chain(extra).copied().collect();
            let child = super::start_profiler(&args)?;
            let result = work();
            super::stop(child, Variant::Profiler)?;
            result
        }
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD: the fields used, the rest zero.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    rest: [u64; 13],
}

/// `union bpf_attr` for BPF_RAW_TRACEPOINT_OPEN.
#[repr(C)]
struct RawTracepointOpenAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// Loads `r0 = 0; exit` twice and attaches it to the sys_enter and sys_exit raw tracepoints;
/// detached when the returned descriptors are closed.
fn attach_empty_programs() -> Result<Vec<OwnedFd>> {
    // BPF_ALU64|BPF_MOV|BPF_K r0, 0 and BPF_JMP|BPF_EXIT.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut fds = Vec::new();
    for tracepoint in [c"sys_enter", c"sys_exit"] {
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            rest: [0; 13],
        };
        // SAFETY: bpf(2) with a valid, fully initialized attribute of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &attr as *const ProgLoadAttr,
                size_of::<ProgLoadAttr>(),
            )
        };
        if fd < 0 {
            bail!(
                "loading an empty raw_tp program failed: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a new descriptor that nothing else owns.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let attr = RawTracepointOpenAttr {
            name: tracepoint.as_ptr() as u64,
            prog_fd: prog.as_raw_fd() as u32,
            _pad: 0,
        };
        // SAFETY: as above.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_RAW_TRACEPOINT_OPEN,
                &attr as *const RawTracepointOpenAttr,
                size_of::<RawTracepointOpenAttr>(),
            )
        };
        if fd < 0 {
            bail!(
                "attaching the empty program to raw tracepoint {tracepoint:?} failed: {}",
                std::io::Error::last_os_error()
            );
        }
        fds.push(prog);
        // SAFETY: as above.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    Ok(fds)
}
