//! One file's unwinding table: its call-frame information (`.eh_frame`, and `.debug_frame`
//! for the functions `.eh_frame` leaves out) turned into the kernel's compact rows
//! (`profiler_common::unwind::UnwindRow`), sorted by pc.
//!
//! gimli evaluates the CFI programs; what is ours is the reduction of each of its rows to the
//! three facts the kernel walker follows (where the CFA is, whether the return address is
//! defined, where the caller's frame pointer was saved) and the recognition of the two
//! DWARF expressions every glibc system has: the PLT stubs' CFA and the signal trampoline's.
//! Anything else is kept as a `CFA_UNSUPPORTED` row so the walker stops there and counts it.

use anyhow::{Context as _, Result, bail};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, Reader, Register, RegisterRule,
    UnwindContext, UnwindSection,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use profiler_common::unwind::{
    CFA_END, CFA_FP, CFA_NONE, CFA_OFFSET_X8, CFA_PLT, CFA_SIGNAL, CFA_SP, CFA_UNSUPPORTED,
    FP_SAME, FP_UNDEFINED, RA_OFFSET, UnwindRow, signal_frame,
};

/// DWARF register numbers of the registers the walker uses.
#[derive(Debug, Clone, Copy)]
struct Registers {
    sp: Register,
    fp: Register,
    ra: Register,
    pc: Register,
}

const X86_64: Registers = Registers {
    sp: Register(7),
    fp: Register(6),
    ra: Register(16),
    pc: Register(16),
};

const AARCH64: Registers = Registers {
    sp: Register(31),
    fp: Register(29),
    ra: Register(30),
    pc: Register(32),
};

/// A loadable segment, to turn a mapping's file offset into the table's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub file_offset: u64,
    pub vaddr: u64,
    pub file_size: u64,
    pub executable: bool,
}

/// What building a table found, for the capture's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    pub fdes: u64,
    /// Rows whose CFA rule the walker cannot follow.
    pub unsupported_rows: u64,
    /// FDEs gimli could not parse (skipped; their pcs step by frame pointer).
    pub bad_fdes: u64,
}

/// One file's table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub rows: Vec<UnwindRow>,
    pub segments: Vec<Segment>,
    pub build_id: Option<Vec<u8>>,
    pub stats: TableStats,
}

impl Table {
    /// The file-relative bias of a mapping of this file: address - bias = table pc.
    /// `None` when no loadable segment holds `file_offset`.
    pub fn bias(&self, start: u64, file_offset: u64) -> Option<u64> {
        // The mapping starts at a page boundary, at or below the segment's own offset; the
        // page it starts on may end the segment before (lld packs a read-only segment and
        // the code into one page), so the executable one is looked for first.
        let holds = |s: &&Segment| {
            let page_start = s.file_offset & !0xfff;
            file_offset >= page_start && file_offset < s.file_offset + s.file_size
        };
        let segment = self
            .segments
            .iter()
            .filter(|s| s.executable)
            .find(holds)
            .or_else(|| self.segments.iter().find(holds))?;
        Some(
            start
                .wrapping_sub(file_offset)
                .wrapping_add(segment.file_offset)
                .wrapping_sub(segment.vaddr),
        )
    }
}

/// A rule for an address range, before rows are merged.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    rows_from: usize,
    rows_to: usize,
}

/// Builds the table of an ELF file held in memory.
pub fn from_elf(data: &[u8]) -> Result<Table> {
    let file = object::File::parse(data).context("not an ELF file we can read")?;
    let registers = match file.architecture() {
        object::Architecture::X86_64 => X86_64,
        object::Architecture::Aarch64 => AARCH64,
        other => bail!("no unwinding for {other:?} code"),
    };
    let segments = file
        .segments()
        .filter_map(|segment| {
            let (file_offset, file_size) = segment.file_range();
            let executable = match segment.flags() {
                object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                _ => true,
            };
            (file_size > 0).then_some(Segment {
                file_offset,
                vaddr: segment.address(),
                file_size,
                executable,
            })
        })
        .collect();
    let build_id = file.build_id().ok().flatten().map(|id| id.to_vec());
    let endian = if file.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    };
    let section_address = |name: &str| file.section_by_name(name).map(|s| s.address());
    let mut bases = BaseAddresses::default();
    if let Some(address) = section_address(".text") {
        bases = bases.set_text(address);
    }
    if let Some(address) = section_address(".got") {
        bases = bases.set_got(address);
    }
    let mut spans = Vec::new();
    let mut raw_rows = Vec::new();
    let mut stats = TableStats::default();
    if let Some(section) = file.section_by_name(".eh_frame") {
        let bytes = section.data().context("reading .eh_frame failed")?;
        let mut eh_frame = EhFrame::new(bytes, endian);
        eh_frame.set_address_size(8);
        let bases = bases.clone().set_eh_frame(section.address());
        collect(
            &eh_frame,
            &bases,
            registers,
            &mut spans,
            &mut raw_rows,
            &mut stats,
        );
    }
    if let Some(section) = file.section_by_name(".debug_frame") {
        let bytes = section.data().context("reading .debug_frame failed")?;
        let mut debug_frame = DebugFrame::new(bytes, endian);
        debug_frame.set_address_size(8);
        // Only for functions .eh_frame does not describe.
        let mut covered: Vec<(u64, u64)> = spans.iter().map(|s| (s.start, s.end)).collect();
        covered.sort_unstable();
        let mut extra_spans = Vec::new();
        collect(
            &debug_frame,
            &bases,
            registers,
            &mut extra_spans,
            &mut raw_rows,
            &mut stats,
        );
        for span in extra_spans {
            let at = covered.partition_point(|(start, _)| *start <= span.start);
            let inside = at > 0 && covered[at - 1].1 > span.start;
            if !inside {
                spans.push(span);
            }
        }
    }
    Ok(Table {
        rows: merge(spans, &raw_rows),
        segments,
        build_id,
        stats,
    })
}

/// Every FDE of a section: its range, and its rows appended to `rows` as (pc, row).
fn collect<R: Reader<Offset = usize>, S: UnwindSection<R>>(
    section: &S,
    bases: &BaseAddresses,
    registers: Registers,
    spans: &mut Vec<Span>,
    rows: &mut Vec<(u64, UnwindRow)>,
    stats: &mut TableStats,
) {
    let mut context = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    loop {
        let entry = match entries.next() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            // A malformed entry: its length cannot be trusted, nothing after it can be read.
            Err(_) => {
                stats.bad_fdes += 1;
                break;
            }
        };
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = match partial.parse(S::cie_from_offset) {
            Ok(fde) => fde,
            Err(_) => {
                stats.bad_fdes += 1;
                continue;
            }
        };
        stats.fdes += 1;
        if fde.len() == 0 {
            continue;
        }
        let rows_from = rows.len();
        let mut table = match fde.rows(section, bases, &mut context) {
            Ok(table) => table,
            Err(_) => {
                stats.bad_fdes += 1;
                continue;
            }
        };
        let mut failed = false;
        loop {
            match table.next_row() {
                Ok(Some(row)) => {
                    let converted = convert(section, row, registers);
                    if converted.cfa_rule == CFA_UNSUPPORTED {
                        stats.unsupported_rows += 1;
                    }
                    rows.push((row.start_address(), converted));
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            stats.bad_fdes += 1;
            rows.truncate(rows_from);
            continue;
        }
        spans.push(Span {
            start: fde.initial_address(),
            end: fde.end_address(),
            rows_from,
            rows_to: rows.len(),
        });
    }
}

/// Reduces one gimli row to the walker's rule.
fn convert<R: Reader<Offset = usize>, S: UnwindSection<R>>(
    section: &S,
    row: &gimli::UnwindTableRow<usize>,
    registers: Registers,
) -> UnwindRow {
    let unsupported = UnwindRow {
        pc: 0,
        cfa_offset: 0,
        cfa_rule: CFA_UNSUPPORTED,
        fp: FP_UNDEFINED,
    };
    let ra = row.register(registers.ra);
    if matches!(ra, Some(RegisterRule::Undefined)) {
        return UnwindRow {
            cfa_rule: CFA_END,
            fp: FP_SAME,
            ..unsupported
        };
    }
    match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let cfa_rule = if *register == registers.sp {
                CFA_SP
            } else if *register == registers.fp {
                CFA_FP
            } else {
                return unsupported;
            };
            // Exact when it fits, else in 8-byte slots (frames over 32 KiB).
            let (cfa_offset, scaled) = match i16::try_from(*offset) {
                Ok(exact) => (exact, 0),
                Err(_) => match i16::try_from(offset / 8) {
                    Ok(slots) if offset % 8 == 0 => (slots, CFA_OFFSET_X8),
                    _ => return unsupported,
                },
            };
            // Where the return address is: the walker assumes one slot below the CFA.
            match ra {
                Some(RegisterRule::Offset(offset)) if offset == RA_OFFSET => {}
                _ => return unsupported,
            }
            UnwindRow {
                pc: 0,
                cfa_offset,
                cfa_rule: cfa_rule | scaled,
                fp: fp_rule(row.register(registers.fp)),
            }
        }
        CfaRule::Expression(expression) => {
            let Ok(expression) = expression.get(section) else {
                return unsupported;
            };
            let Ok(bytes) = expression.0.to_slice() else {
                return unsupported;
            };
            if let Some((cfa_offset, threshold)) = plt_expression(&bytes, registers) {
                return UnwindRow {
                    pc: 0,
                    cfa_offset,
                    cfa_rule: CFA_PLT,
                    fp: threshold,
                };
            }
            if is_signal_frame(section, &bytes, row, registers) {
                return UnwindRow {
                    pc: 0,
                    cfa_offset: 0,
                    cfa_rule: CFA_SIGNAL,
                    fp: FP_UNDEFINED,
                };
            }
            unsupported
        }
    }
}

fn fp_rule(rule: Option<RegisterRule<usize>>) -> i8 {
    match rule {
        // Not mentioned: callee-saved registers keep their value by the ABI's default.
        None | Some(RegisterRule::SameValue) => FP_SAME,
        Some(RegisterRule::Offset(offset)) if offset % 8 == 0 && offset != 0 => {
            i8::try_from(offset / 8)
                .ok()
                .filter(|slot| *slot != FP_UNDEFINED)
                .unwrap_or(FP_UNDEFINED)
        }
        Some(_) => FP_UNDEFINED,
    }
}

const DW_OP_AND: u8 = 0x1a;
const DW_OP_DEREF: u8 = 0x06;
const DW_OP_GE: u8 = 0x2a;
const DW_OP_LIT0: u8 = 0x30;
const DW_OP_BREG0: u8 = 0x70;
const DW_OP_PLUS: u8 = 0x22;
const DW_OP_SHL: u8 = 0x24;

/// `DW_OP_breg(sp) N; DW_OP_breg(pc) 0; DW_OP_lit15; DW_OP_and; DW_OP_litK; DW_OP_ge;
/// DW_OP_lit3; DW_OP_shl; DW_OP_plus` → (N, K): the PLT stubs' CFA.
fn plt_expression(bytes: &[u8], registers: Registers) -> Option<(i16, i8)> {
    let (sp, rest) = breg(bytes)?;
    if sp.0 != registers.sp {
        return None;
    }
    let (pc, rest) = breg(rest)?;
    if pc.0 != registers.pc || pc.1 != 0 {
        return None;
    }
    match rest {
        [
            lit15,
            DW_OP_AND,
            lit_k,
            DW_OP_GE,
            lit3,
            DW_OP_SHL,
            DW_OP_PLUS,
        ] if *lit15 == DW_OP_LIT0 + 15
            && *lit3 == DW_OP_LIT0 + 3
            && (DW_OP_LIT0..DW_OP_LIT0 + 32).contains(lit_k) =>
        {
            Some((i16::try_from(sp.1).ok()?, (lit_k - DW_OP_LIT0) as i8))
        }
        _ => None,
    }
}

/// The Linux signal trampoline (`__restore_rt`): CFA = *(sp + SP), and the return address
/// at sp + PC — the offsets of `signal_frame`.
fn is_signal_frame<R: Reader<Offset = usize>, S: UnwindSection<R>>(
    section: &S,
    bytes: &[u8],
    row: &gimli::UnwindTableRow<usize>,
    registers: Registers,
) -> bool {
    let Some(((register, offset), [DW_OP_DEREF])) = breg(bytes) else {
        return false;
    };
    if register != registers.sp || offset != signal_frame::SP as i64 {
        return false;
    }
    let Some(RegisterRule::Expression(ra)) = row.register(registers.ra) else {
        return false;
    };
    let Ok(ra) = ra.get(section) else {
        return false;
    };
    let Ok(ra) = ra.0.to_slice() else {
        return false;
    };
    matches!(breg(&ra), Some(((register, offset), []))
        if register == registers.sp && offset == signal_frame::PC as i64)
}

/// `DW_OP_bregN offset` at the start of `bytes` → ((register N, offset), rest).
fn breg(bytes: &[u8]) -> Option<((Register, i64), &[u8])> {
    let (&op, mut rest) = bytes.split_first()?;
    if !(DW_OP_BREG0..DW_OP_BREG0 + 32).contains(&op) {
        return None;
    }
    let mut reader = gimli::EndianSlice::new(rest, gimli::LittleEndian);
    let offset = reader.read_sleb128().ok()?;
    rest = &rest[rest.len() - reader.len()..];
    Some(((Register(u16::from(op - DW_OP_BREG0)), offset), rest))
}

/// Sorted, merged rows: each FDE's rows, a `CFA_NONE` row where an FDE ends and no other
/// starts, and no row that repeats the rule before it.
fn merge(mut spans: Vec<Span>, raw_rows: &[(u64, UnwindRow)]) -> Vec<UnwindRow> {
    spans.sort_by_key(|span| span.start);
    let mut out: Vec<UnwindRow> = Vec::with_capacity(raw_rows.len() + spans.len());
    let none = UnwindRow {
        pc: 0,
        cfa_offset: 0,
        cfa_rule: CFA_NONE,
        fp: FP_SAME,
    };
    let mut covered_to = 0u64;
    for span in spans {
        // Overlapping FDEs (broken or duplicate CFI): the first one wins.
        if span.start < covered_to || span.end > u64::from(u32::MAX) {
            continue;
        }
        for (pc, row) in &raw_rows[span.rows_from..span.rows_to] {
            push(
                &mut out,
                UnwindRow {
                    pc: *pc as u32,
                    ..*row
                },
            );
        }
        push(
            &mut out,
            UnwindRow {
                pc: span.end as u32,
                ..none
            },
        );
        covered_to = span.end;
    }
    out
}

/// Appends a row: one that starts where the previous one did replaces it (a function
/// starting right where the previous one ended replaces its end marker), and one with the
/// previous row's rule is not needed.
fn push(out: &mut Vec<UnwindRow>, row: UnwindRow) {
    if let Some(last) = out.last_mut()
        && last.pc == row.pc
    {
        *last = row;
        if out.len() >= 2 && same_rule(&out[out.len() - 2], &row) {
            out.pop();
        }
        return;
    }
    if let Some(last) = out.last()
        && same_rule(last, &row)
    {
        return;
    }
    out.push(row);
}

fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    (a.cfa_offset, a.cfa_rule, a.fp) == (b.cfa_offset, b.cfa_rule, b.fp)
}

/// The row that applies at `pc` (a file-relative address), if any.
pub fn lookup(rows: &[UnwindRow], pc: u64) -> Option<&UnwindRow> {
    let pc = u32::try_from(pc).ok()?;
    let at = rows.partition_point(|row| row.pc <= pc);
    rows.get(at.checked_sub(1)?)
        .filter(|row| row.cfa_rule != CFA_NONE)
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
