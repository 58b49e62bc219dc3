//! Just enough of a BTF reader to find struct member offsets and function prototypes in the
//! running kernel's `/sys/kernel/btf/vmlinux`.
//!
//! Rust eBPF gets no CO-RE relocations, so the offsets the kernel programs need
//! (`task_struct.pid`, …) are computed here and passed to them as globals.

use std::path::Path;

use anyhow::{Context as _, Result, bail};

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;
const KIND_PTR: u32 = 2;

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset from the start of the enclosing struct.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    members: Vec<Member>,
    /// FUNC_PROTO parameter count.
    params: u32,
}

/// A parsed BTF blob: its types (index = type id) and string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

impl Btf {
    /// Reads and parses a BTF file (normally `/sys/kernel/btf/vmlinux`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&data).with_context(|| format!("{} is not valid BTF", path.display()))
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        let u16_at = |off: usize| -> Result<u16> {
            let b = data.get(off..off + 2).context("truncated")?;
            Ok(u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |off: usize| -> Result<u32> {
            let b = data.get(off..off + 4).context("truncated")?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0)? != BTF_MAGIC {
            bail!("bad magic (only little-endian BTF is supported)");
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("string section out of bounds")?
            .to_vec();
        let start = hdr_len + type_off;
        let end = start + type_len;
        if end > data.len() {
            bail!("type section out of bounds");
        }
        // Type id 0 is `void`.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            size_or_type: 0,
            members: Vec::new(),
            params: 0,
        }];
        let mut off = start;
        while off < end {
            let name_off = u32_at(off)?;
            let info = u32_at(off + 4)?;
            let size_or_type = u32_at(off + 8)?;
            off += 12;
            let vlen = info & 0xffff;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let mut params = 0;
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => off += 4,
                KIND_ARRAY => off += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(off + 8)?;
                        members.push(Member {
                            name_off: u32_at(off)?,
                            type_id: u32_at(off + 4)?,
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                        off += 12;
                    }
                }
                KIND_ENUM => off += 8 * vlen as usize,
                KIND_FUNC_PROTO => {
                    params = vlen;
                    off += 8 * vlen as usize;
                }
                KIND_DATASEC | KIND_ENUM64 => off += 12 * vlen as usize,
                _ => {}
            }
            types.push(Type {
                name_off,
                kind,
                size_or_type,
                members,
                params,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..len]).unwrap_or("")
    }

    fn find(&self, name: &str, kind: u32) -> Option<&Type> {
        self.types
            .iter()
            .find(|t| t.kind == kind && self.name(t.name_off) == name)
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs and unions.
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Result<u32> {
        let ty = self
            .find(struct_name, KIND_STRUCT)
            .with_context(|| format!("struct {struct_name} not in the kernel's BTF"))?;
        self.find_member(ty, member, 0)
            .map(|bits| bits / 8)
            .with_context(|| format!("{struct_name}.{member} not in the kernel's BTF"))
    }

    fn find_member(&self, ty: &Type, member: &str, base_bits: u32) -> Option<u32> {
        for m in &ty.members {
            let name = self.name(m.name_off);
            if name == member {
                return Some(base_bits + m.bit_offset);
            }
            if name.is_empty() {
                let inner = self.types.get(m.type_id as usize)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(found) = self.find_member(inner, member, base_bits + m.bit_offset)
                {
                    return Some(found);
                }
            }
        }
        None
    }

    /// Whether `struct name` has a member called `member`.
    pub fn has_member(&self, struct_name: &str, member: &str) -> bool {
        self.member_offset(struct_name, member).is_ok()
    }

    /// Number of parameters of the prototype behind `typedef name` (a pointer to a
    /// FUNC_PROTO, as `btf_trace_<tracepoint>` typedefs are), counting the leading `void *`.
    pub fn typedef_proto_params(&self, name: &str) -> Option<u32> {
        let mut ty = self.find(name, KIND_TYPEDEF)?;
        for _ in 0..4 {
            ty = self.types.get(ty.size_or_type as usize)?;
            match ty.kind {
                KIND_FUNC_PROTO => return Some(ty.params),
                KIND_PTR | KIND_TYPEDEF => continue,
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_struct_fields_in_the_running_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let btf = Btf::from_file(path).expect("kernel BTF");
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        // pid_t pid; pid_t tgid; are adjacent in every kernel since 2.6.
        assert_eq!(tgid, pid + 4);
        let comm = btf.member_offset("task_struct", "comm").unwrap();
        assert!(comm > tgid);
        // sched_switch gained prev_state as a 4th argument in 5.18: (void *ctx, preempt, prev,
        // next, prev_state).
        let params = btf.typedef_proto_params("btf_trace_sched_switch").unwrap();
        assert!(params == 4 || params == 5, "got {params}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, clearly").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
    }
}
