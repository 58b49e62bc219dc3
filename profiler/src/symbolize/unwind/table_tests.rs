//! Tests of the table builder (`table.rs`): rows against `readelf`'s, PLT and signal
//! frames, lookups.

use super::*;
use std::collections::HashMap;
use std::process::Command;

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// One line of `readelf --debug-dump=frames-interp`: the rules from `pc` on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OracleRow {
    cfa: String,
    rbp: String,
    ra: String,
}

/// binutils' own reading of a file's CFI: (pc → rules), with the FDE ranges.
/// readelf's rows (pc, rules) and FDE ranges (start, end).
type Oracle = (Vec<(u64, OracleRow)>, Vec<(u64, u64)>);

fn readelf_rows(path: &str) -> Option<Oracle> {
    let out = Command::new("readelf")
        .args(["--debug-dump=frames-interp", "-W", path])
        .output()
        .ok()?;
    // readelf exits with 1 on this libc though it printed every table: judge by the
    // output, and fail (not skip) below if it does not parse.
    if out.stdout.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    let mut ranges = Vec::new();
    let mut columns: Vec<String> = Vec::new();
    let mut in_fde = false;
    let mut fde_start = 0;
    let mut fde_had_rows = false;
    for line in text.lines() {
        if line.contains(" FDE ") {
            let Some(range) = line.split("pc=").nth(1) else {
                continue;
            };
            let (start, end) = range.trim().split_once("..").expect("readelf FDE range");
            let start = u64::from_str_radix(start, 16).expect("readelf FDE start");
            let end = u64::from_str_radix(end, 16).expect("readelf FDE end");
            if in_fde && !fde_had_rows {
                // An FDE without instructions prints no table: the CIE's rules.
                rows.push((fde_start, cie_default()));
            }
            ranges.push((start, end));
            in_fde = true;
            fde_start = start;
            fde_had_rows = false;
            continue;
        }
        if line.contains(" CIE ") || line.contains("ZERO terminator") {
            if in_fde && !fde_had_rows {
                rows.push((fde_start, cie_default()));
            }
            in_fde = false;
            continue;
        }
        let trimmed = line.trim();
        if trimmed.starts_with("LOC") {
            columns = trimmed.split_whitespace().map(str::to_string).collect();
            continue;
        }
        if !in_fde {
            continue;
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        if fields.len() != columns.len() || fields.is_empty() {
            continue;
        }
        let Ok(pc) = u64::from_str_radix(fields[0], 16) else {
            continue;
        };
        let column = |name: &str| {
            columns
                .iter()
                .position(|c| c == name)
                .map(|i| fields[i].to_string())
                .unwrap_or_else(|| "u".to_string())
        };
        fde_had_rows = true;
        rows.push((
            pc,
            OracleRow {
                cfa: column("CFA"),
                rbp: column("rbp"),
                ra: column("ra"),
            },
        ));
    }
    if in_fde && !fde_had_rows {
        rows.push((fde_start, cie_default()));
    }
    Some((rows, ranges))
}

fn cie_default() -> OracleRow {
    OracleRow {
        cfa: "rsp+8".into(),
        rbp: "u".into(),
        ra: "c-8".into(),
    }
}

/// What our row means, in readelf's words (None: we say nothing at this pc).
fn as_oracle(row: &UnwindRow) -> Option<OracleRow> {
    let rbp = match row.fp {
        FP_SAME => "u".to_string(),
        FP_UNDEFINED => "?".to_string(),
        slot => format!("c{}", i32::from(slot) * 8),
    };
    let cfa = match row.rule() {
        CFA_SP => format!("rsp+{}", row.cfa_offset_bytes()),
        CFA_FP => format!("rbp+{}", row.cfa_offset_bytes()),
        CFA_PLT | CFA_SIGNAL => "exp".to_string(),
        CFA_UNSUPPORTED => "unsupported".to_string(),
        CFA_END => {
            return Some(OracleRow {
                cfa: "end".into(),
                rbp,
                ra: "u".into(),
            });
        }
        _ => return None,
    };
    Some(OracleRow {
        cfa,
        rbp: if row.cfa_rule == CFA_PLT {
            "u".into()
        } else {
            rbp
        },
        ra: "c-8".into(),
    })
}

/// Every pc where readelf's table changes, and the one before each: our rows must give
/// the same CFA and rbp rule as binutils' reading at each of them.
#[test]
fn libc_rows_match_readelf_frames_interp() {
    let Ok(data) = std::fs::read(LIBC) else {
        eprintln!("skipped: no {LIBC}");
        return;
    };
    let Some((oracle, ranges)) = readelf_rows(LIBC) else {
        eprintln!("skipped: no readelf (binutils)");
        return;
    };
    let table = from_elf(&data).expect("libc's table");
    assert!(table.rows.len() > 1000, "{} rows", table.rows.len());
    assert!(oracle.len() > 10_000, "{} readelf rows", oracle.len());
    // The oracle's rule at each pc it lists (rows of one FDE are sorted; FDEs are not).
    let mut by_pc: HashMap<u64, OracleRow> = HashMap::new();
    for (pc, row) in &oracle {
        by_pc.insert(*pc, row.clone());
    }
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for (pc, expected) in &oracle {
        let ours = lookup(&table.rows, *pc).and_then(as_oracle);
        let expected = normalize(expected);
        let Some(ours) = ours else {
            mismatches.push(format!("{pc:#x}: no row, readelf {expected:?}"));
            continue;
        };
        checked += 1;
        if ours.cfa == "end" {
            // RA undefined: readelf shows ra u, whatever the CFA.
            if expected.ra != "u" {
                mismatches.push(format!("{pc:#x}: we end, readelf {expected:?}"));
            }
            continue;
        }
        if ours.cfa == "unsupported" {
            // Only a CFA in another register (setcontext's rdx+0) is beyond us.
            let other_register = expected.cfa.starts_with('r')
                && !expected.cfa.starts_with("rsp")
                && !expected.cfa.starts_with("rbp");
            if !other_register {
                mismatches.push(format!("{pc:#x}: unsupported, readelf {expected:?}"));
            }
            continue;
        }
        let rbp_matches =
            ours.rbp == expected.rbp || (ours.rbp == "?" && !expected.rbp.starts_with('c'));
        if ours.cfa != expected.cfa || !rbp_matches {
            mismatches.push(format!("{pc:#x}: ours {ours:?}, readelf {expected:?}"));
        }
    }
    // Past each FDE's end, unless another FDE starts there: no rule.
    let starts: std::collections::HashSet<u64> = ranges.iter().map(|r| r.0).collect();
    for (_, end) in &ranges {
        if !starts.contains(end) && lookup(&table.rows, *end).is_some() {
            mismatches.push(format!("{end:#x}: a rule past the FDE's end"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} pcs differ from readelf, e.g. {:?}",
        mismatches.len(),
        oracle.len(),
        &mismatches[..mismatches.len().min(10)]
    );
    assert!(checked > 10_000);
}

/// readelf prints `u` for an undefined rbp and for one never mentioned; `exp` CFAs are
/// compared as such.
fn normalize(row: &OracleRow) -> OracleRow {
    OracleRow {
        cfa: row.cfa.clone(),
        rbp: match row.rbp.as_str() {
            "s" => "u".to_string(),
            other => other.to_string(),
        },
        ra: row.ra.clone(),
    }
}

/// The PLT's CFA expression (readelf prints its opcodes with `-wf`) is recognized, with
/// the threshold of the stubs' second push.
#[test]
fn libc_plt_rows_are_recognized() {
    let Ok(data) = std::fs::read(LIBC) else {
        return;
    };
    let table = from_elf(&data).expect("libc's table");
    let file = object::File::parse(&*data).expect("elf");
    let plt = file.section_by_name(".plt").expect(".plt");
    let row = lookup(&table.rows, plt.address() + 0x20).expect("a PLT row");
    assert_eq!(row.cfa_rule, CFA_PLT, "{row:?}");
    assert_eq!((row.cfa_offset, row.fp), (8, 11));
}

/// `__restore_rt` (the signal trampoline) gets the signal-frame rule; `_start`-like
/// outermost code gets an end rule.
#[test]
fn libc_signal_trampoline_is_recognized() {
    let Ok(data) = std::fs::read(LIBC) else {
        return;
    };
    let table = from_elf(&data).expect("libc's table");
    let signal_rows = table
        .rows
        .iter()
        .filter(|r| r.cfa_rule == CFA_SIGNAL)
        .count();
    assert_eq!(signal_rows, 1, "one trampoline in libc");
    assert!(table.rows.iter().any(|r| r.cfa_rule == CFA_END), "clone3");
}

/// The rows we cannot follow are exactly those binutils shows with a CFA in an argument
/// register (setcontext, swapcontext, __start_context: CFA = rdi/rdx + 0) or with the
/// return address in a register (vfork keeps it in rdi across the syscall).
#[test]
fn libc_unsupported_rows_are_the_context_switchers() {
    let Ok(data) = std::fs::read(LIBC) else {
        return;
    };
    let Ok(out) = Command::new("readelf").args(["-wF", LIBC]).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let other_register: std::collections::HashSet<u64> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let pc = u64::from_str_radix(fields.next()?, 16).ok()?;
            let cfa = fields.next()?;
            let cfa_elsewhere =
                cfa.starts_with('r') && !cfa.starts_with("rsp") && !cfa.starts_with("rbp");
            // A register rule prints as `r5 (rdi)`; in libc only the return address has one.
            (cfa_elsewhere || line.contains(" (r")).then_some(pc)
        })
        .collect();
    let table = from_elf(&data).expect("libc's table");
    let unsupported: Vec<u64> = table
        .rows
        .iter()
        .filter(|r| r.cfa_rule == CFA_UNSUPPORTED)
        .map(|r| u64::from(r.pc))
        .collect();
    assert!(!unsupported.is_empty());
    for pc in &unsupported {
        assert!(
            other_register.contains(pc),
            "{pc:#x} is not one of {other_register:x?}"
        );
    }
    // Counted before merging: consecutive unsupported rows become one.
    assert!(table.stats.unsupported_rows >= unsupported.len() as u64);
}

/// By hand: `UNWIND_FILES=a,b [UNWIND_PCS=0x..,0x..] cargo test -p profiler --lib
/// table_sizes -- --ignored --nocapture` prints each file's rows (and the rows at the pcs).
#[test]
#[ignore]
fn table_sizes() {
    let files = std::env::var("UNWIND_FILES").unwrap_or_default();
    let pcs: Vec<u64> = std::env::var("UNWIND_PCS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|pc| u64::from_str_radix(pc.trim_start_matches("0x"), 16).ok())
        .collect();
    let mut total = 0;
    for path in files.split(',').filter(|p| !p.is_empty()) {
        let started = std::time::Instant::now();
        let table = from_elf(&std::fs::read(path).expect("readable")).expect("a table");
        total += table.rows.len();
        println!(
            "{path}: {} rows, {} bytes, {:?}, built in {:?}",
            table.rows.len(),
            table.rows.len() * std::mem::size_of::<UnwindRow>(),
            table.stats,
            started.elapsed()
        );
        for pc in &pcs {
            println!("  {pc:#x}: {:?}", lookup(&table.rows, *pc));
        }
    }
    println!(
        "total: {total} rows, {} bytes",
        total * std::mem::size_of::<UnwindRow>()
    );
}

#[test]
fn bias_of_a_shared_library_mapping() {
    let table = Table {
        segments: vec![Segment {
            file_offset: 0x26000,
            vaddr: 0x26000,
            file_size: 0x17b000,
            executable: true,
        }],
        ..Default::default()
    };
    assert_eq!(
        table.bias(0x7f00_0002_6000, 0x26000),
        Some(0x7f00_0000_0000)
    );
    assert_eq!(table.bias(0x7f00_0002_6000, 0x1000), None);
}

/// rustc/lld output: the code segment starts mid-page right after a read-only one
/// (`readelf -l`: R at 0..0x16268, R E at offset 0x16270 / vaddr 0x17270), so the
/// executable mapping at file offset 0x16000 also lies in the read-only segment's page.
#[test]
fn bias_of_code_sharing_a_page_with_the_segment_before() {
    let table = Table {
        segments: vec![
            Segment {
                file_offset: 0,
                vaddr: 0,
                file_size: 0x16268,
                executable: false,
            },
            Segment {
                file_offset: 0x16270,
                vaddr: 0x17270,
                file_size: 0x42eb0,
                executable: true,
            },
        ],
        ..Default::default()
    };
    // mapped at 0x5555_5556_a000 from file offset 0x16000 → vaddr 0x17000 there.
    assert_eq!(
        table.bias(0x5555_5556_a000, 0x16000),
        Some(0x5555_5556_a000 - 0x17000)
    );
}
