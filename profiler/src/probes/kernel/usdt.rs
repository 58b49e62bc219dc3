//! USDT (SystemTap SDT) probes of an ELF file: the `.note.stapsdt` notes, where each probe
//! sits in the file, its semaphore, and how to read its arguments (the `8@%rbx`,
//! `-4@-144(%rbp)`, `8@$5` specs the assembler wrote), decoded for the eBPF side.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// Where an argument lives when the probe fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgLocation {
    /// In a register: byte offset of that register in `struct pt_regs`.
    Register { reg_offset: u32 },
    /// In memory at register + displacement.
    Memory { reg_offset: u32, displacement: i64 },
    /// A constant.
    Constant(i64),
}

/// How the eBPF side reads an argument: `ARG_KIND_*`, pt_regs offset, displacement/value.
pub const ARG_KIND_REGISTER: u32 = 1;
pub const ARG_KIND_MEMORY: u32 = 2;
pub const ARG_KIND_CONSTANT: u32 = 3;

impl ArgLocation {
    pub fn encode(&self) -> (u32, u32, i64) {
        match *self {
            ArgLocation::Register { reg_offset } => (ARG_KIND_REGISTER, reg_offset, 0),
            ArgLocation::Memory {
                reg_offset,
                displacement,
            } => (ARG_KIND_MEMORY, reg_offset, displacement),
            ArgLocation::Constant(value) => (ARG_KIND_CONSTANT, 0, value),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsdtArg {
    /// Bytes; negative for signed values.
    pub size: i8,
    pub location: ArgLocation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    /// File offset of the probe's instruction (what a uprobe attaches to).
    pub offset: u64,
    /// File offset of its semaphore (a u16 the tracer must raise), 0 when it has none.
    pub semaphore_offset: u64,
    pub args: Vec<UsdtArg>,
    /// Why `args` is empty although the probe has arguments (a spec this profiler cannot
    /// read, e.g. `-4@40+CheckpointStats(%rip)`): only an error for whoever uses the probe.
    pub unsupported_args: Option<String>,
}

/// Every USDT probe of the ELF file at `path`.
pub fn probes(path: &Path) -> Result<Vec<UsdtProbe>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    probes_in(&data).with_context(|| format!("reading the USDT notes of {}", path.display()))
}

pub fn probes_in(data: &[u8]) -> Result<Vec<UsdtProbe>> {
    let file = object::File::parse(data).context("not an ELF file this profiler can read")?;
    let Some(notes) = file.section_by_name(".note.stapsdt") else {
        return Ok(Vec::new());
    };
    let notes = notes.data().context("unreadable .note.stapsdt")?;
    let sdt_base = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let little = file.is_little_endian();
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (s.address(), size, offset)
        })
        .collect();
    let to_offset = |vaddr: u64| -> Option<u64> {
        segments
            .iter()
            .find(|(addr, size, _)| vaddr >= *addr && vaddr < addr + size)
            .map(|(addr, _, offset)| vaddr - addr + offset)
    };
    let word = |bytes: &[u8]| -> u64 {
        let b: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
        if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    let half = |bytes: &[u8]| -> usize {
        let b: [u8; 4] = bytes[..4].try_into().expect("4 bytes");
        (if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }) as usize
    };
    let align4 = |n: usize| (n + 3) & !3;

    let mut out = Vec::new();
    let mut at = 0;
    while at + 12 <= notes.len() {
        let namesz = half(&notes[at..]);
        let descsz = half(&notes[at + 4..]);
        let kind = half(&notes[at + 8..]);
        let name_start = at + 12;
        let desc_start = name_start + align4(namesz);
        let next = desc_start + align4(descsz);
        if next > notes.len() || desc_start + descsz > notes.len() {
            bail!("truncated note at offset {at}");
        }
        at = next;
        let owner = &notes[name_start..name_start + namesz];
        if kind != 3 || owner.strip_suffix(b"\0").unwrap_or(owner) != b"stapsdt" {
            continue;
        }
        let desc = &notes[desc_start..desc_start + descsz];
        if desc.len() < 24 {
            bail!("short stapsdt note");
        }
        let (mut pc, base, mut semaphore) = (word(desc), word(&desc[8..]), word(&desc[16..]));
        // Prelinked or moved: the notes' addresses are relative to where .stapsdt.base was.
        if let Some(actual) = sdt_base {
            pc = pc.wrapping_add(actual.wrapping_sub(base));
            if semaphore != 0 {
                semaphore = semaphore.wrapping_add(actual.wrapping_sub(base));
            }
        }
        let mut strings = desc[24..].split(|b| *b == 0);
        let mut next_str =
            || String::from_utf8_lossy(strings.next().unwrap_or_default()).into_owned();
        let (provider, name, args) = (next_str(), next_str(), next_str());
        let offset = to_offset(pc)
            .with_context(|| format!("probe {provider}:{name} at {pc:#x} is in no segment"))?;
        let semaphore_offset = if semaphore == 0 {
            0
        } else {
            to_offset(semaphore).with_context(|| {
                format!("semaphore of {provider}:{name} at {semaphore:#x} is in no segment")
            })?
        };
        let (args, unsupported_args) = match args
            .split_whitespace()
            .map(parse_arg)
            .collect::<Result<Vec<_>>>()
        {
            Ok(args) => (args, None),
            Err(err) => (Vec::new(), Some(format!("{err:#}"))),
        };
        out.push(UsdtProbe {
            provider,
            name,
            offset,
            semaphore_offset,
            args,
            unsupported_args,
        });
    }
    Ok(out)
}

/// File offset range `[start, end)` of the function `name` (dynamic or static symbol table),
/// when the symbol has a size.
pub fn function_range(path: &Path, name: &str) -> Result<Option<(u64, u64)>> {
    use object::ObjectSymbol as _;
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = object::File::parse(&*data).with_context(|| {
        format!(
            "{} is not an ELF file this profiler can read",
            path.display()
        )
    })?;
    let Some(symbol) = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name() == Ok(name) && s.address() != 0 && s.size() != 0)
    else {
        return Ok(None);
    };
    Ok(file_offset(&file, symbol.address()).map(|start| (start, start + symbol.size())))
}

/// Where virtual address `address` of an ELF file lies in the file: through the loadable
/// segment that holds it (`None`: in none, or only in a segment's memory-only tail).
fn file_offset(file: &object::File<'_>, address: u64) -> Option<u64> {
    use object::{Object as _, ObjectSegment as _};
    file.segments().find_map(|s| {
        let (offset, size) = s.file_range();
        let start = s.address();
        (address >= start && address < start + size).then(|| address - start + offset)
    })
}

/// File offsets of the named functions (dynamic or static symbol table), for uprobes.
pub fn function_offsets(path: &Path, names: &[&str]) -> Result<Vec<(String, u64)>> {
    use object::ObjectSymbol as _;
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = object::File::parse(&*data).with_context(|| {
        format!(
            "{} is not an ELF file this profiler can read",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        let Ok(name) = symbol.name() else { continue };
        if !names.contains(&name) || symbol.address() == 0 || out.iter().any(|(n, _)| n == name) {
            continue;
        }
        let offset = file_offset(&file, symbol.address())
            .with_context(|| format!("{name} in {} is in no segment", path.display()))?;
        out.push((name.to_string(), offset));
    }
    Ok(out)
}

/// One argument spec: `SIZE@LOCATION`, LOCATION being `%reg`, `DISP(%reg)` or `$CONST`
/// (x86_64), or `xN`, `[xN, DISP]` (aarch64).
pub fn parse_arg(spec: &str) -> Result<UsdtArg> {
    let (size, location) = spec
        .split_once('@')
        .with_context(|| format!("argument spec {spec:?} has no '@'"))?;
    let size: i8 = size
        .parse()
        .with_context(|| format!("bad size in argument spec {spec:?}"))?;
    if ![1, 2, 4, 8].contains(&size.unsigned_abs()) {
        bail!("unsupported size {size} in argument spec {spec:?}");
    }
    let register = |name: &str| {
        register_offset(name)
            .with_context(|| format!("unsupported register {name:?} in argument spec {spec:?}"))
    };
    let location = if let Some(value) = location.strip_prefix('$') {
        ArgLocation::Constant(
            value
                .parse()
                .with_context(|| format!("bad constant in argument spec {spec:?}"))?,
        )
    } else if let Some(reg) = location.strip_prefix('%') {
        ArgLocation::Register {
            reg_offset: register(reg)?,
        }
    } else if let Some((disp, rest)) = location.split_once("(%") {
        let reg = rest
            .strip_suffix(')')
            .with_context(|| format!("bad memory operand in argument spec {spec:?}"))?;
        let displacement = if disp.is_empty() {
            0
        } else {
            disp.parse()
                .with_context(|| format!("unsupported displacement in argument spec {spec:?}"))?
        };
        ArgLocation::Memory {
            reg_offset: register(reg)?,
            displacement,
        }
    } else if let Some(inner) = location.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
        let (reg, disp) = inner.split_once(',').unwrap_or((inner, "0"));
        ArgLocation::Memory {
            reg_offset: register(reg.trim())?,
            displacement: disp
                .trim()
                .parse()
                .with_context(|| format!("bad displacement in argument spec {spec:?}"))?,
        }
    } else {
        ArgLocation::Register {
            reg_offset: register(location)?,
        }
    };
    Ok(UsdtArg { size, location })
}

/// Offset of a register (any width alias) in the running architecture's `struct pt_regs`.
#[cfg(target_arch = "x86_64")]
pub fn register_offset(name: &str) -> Option<u32> {
    const REGS: [(&[&str], u32); 18] = [
        (&["r15", "r15d", "r15w", "r15b"], 0),
        (&["r14", "r14d", "r14w", "r14b"], 8),
        (&["r13", "r13d", "r13w", "r13b"], 16),
        (&["r12", "r12d", "r12w", "r12b"], 24),
        (&["rbp", "ebp", "bp", "bpl"], 32),
        (&["rbx", "ebx", "bx", "bl"], 40),
        (&["r11", "r11d", "r11w", "r11b"], 48),
        (&["r10", "r10d", "r10w", "r10b"], 56),
        (&["r9", "r9d", "r9w", "r9b"], 64),
        (&["r8", "r8d", "r8w", "r8b"], 72),
        (&["rax", "eax", "ax", "al"], 80),
        (&["rcx", "ecx", "cx", "cl"], 88),
        (&["rdx", "edx", "dx", "dl"], 96),
        (&["rsi", "esi", "si", "sil"], 104),
        (&["rdi", "edi", "di", "dil"], 112),
        (&["rip", "eip", "ip", "ipl"], 128),
        (&["rsp", "esp", "sp", "spl"], 152),
        (&["orig_rax"], 120),
    ];
    REGS.iter()
        .find(|(names, _)| names.contains(&name))
        .map(|(_, offset)| *offset)
}

/// Offset of a register in the running architecture's `struct pt_regs` (user_pt_regs:
/// x0..x30, sp, pc).
#[cfg(target_arch = "aarch64")]
pub fn register_offset(name: &str) -> Option<u32> {
    if name == "sp" {
        return Some(31 * 8);
    }
    let n: u32 = name
        .strip_prefix('x')
        .or_else(|| name.strip_prefix('w'))?
        .parse()
        .ok()?;
    (n <= 30).then_some(n * 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn parses_the_argument_specs_compilers_write() {
        assert_eq!(
            parse_arg("8@%rbx").unwrap(),
            UsdtArg {
                size: 8,
                location: ArgLocation::Register { reg_offset: 40 }
            }
        );
        assert_eq!(
            parse_arg("8@-144(%rbp)").unwrap().location,
            ArgLocation::Memory {
                reg_offset: 32,
                displacement: -144
            }
        );
        assert_eq!(
            parse_arg("-4@%eax").unwrap(),
            UsdtArg {
                size: -4,
                location: ArgLocation::Register { reg_offset: 80 }
            }
        );
        assert_eq!(
            parse_arg("4@$42").unwrap().location,
            ArgLocation::Constant(42)
        );
        assert_eq!(
            parse_arg("8@(%rdi)").unwrap().location,
            ArgLocation::Memory {
                reg_offset: 112,
                displacement: 0
            }
        );
        assert!(parse_arg("8@foo(%rip)").is_err());
        assert!(parse_arg("3@%rax").is_err());
        assert!(parse_arg("8@%xmm0").is_err());
        assert!(parse_arg("rax").is_err());
    }

    #[test]
    fn a_file_without_notes_has_no_probes_and_garbage_is_an_error() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        assert!(probes_in(&exe).unwrap().is_empty());
        assert!(probes_in(b"not an elf file at all").is_err());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn finds_postgres_query_probes_when_installed() {
        let postgres = crate::probes::db::postgres_binaries_installed()
            .into_iter()
            .next()
            .expect("PostgreSQL is not installed (cargo xtask setup installs it)");
        let probes = probes(&postgres).unwrap();
        let start = probes
            .iter()
            .find(|p| p.provider == "postgresql" && p.name == "query__start")
            .expect("query__start");
        assert_ne!(start.semaphore_offset, 0);
        assert_eq!(start.args.len(), 1);
        assert_eq!(start.args[0].size, 8);
    }
}
