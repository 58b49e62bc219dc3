//! Protocol-buffer encoding, by hand: the few wire types pprof's `profile.proto` and the
//! OTLP profiles messages use (varints, fixed64, length-delimited fields, packed repeated
//! varints), and a string table that hands out indices.

use std::collections::HashMap;

/// Strings by index, the empty string first (both formats want index 0 to be "").
#[derive(Default)]
pub struct Strings {
    pub table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    pub fn new() -> Self {
        let mut s = Self::default();
        s.id("");
        s
    }

    pub fn id(&mut self, text: &str) -> i64 {
        if let Some(&id) = self.index.get(text) {
            return id;
        }
        let id = self.table.len() as i64;
        self.table.push(text.to_string());
        self.index.insert(text.to_string(), id);
        id
    }
}

pub fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

/// A varint field (int32/int64/uint32/uint64/bool with non-negative values).
pub fn int_field(out: &mut Vec<u8>, field: u32, value: u64) {
    key(out, field, 0);
    varint(out, value);
}

/// A fixed64 field.
pub fn fixed64_field(out: &mut Vec<u8>, field: u32, value: u64) {
    key(out, field, 1);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A length-delimited field: bytes, a string or an embedded message.
pub fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A packed repeated varint field.
pub fn packed(out: &mut Vec<u8>, field: u32, values: &[u64]) {
    let mut body = Vec::new();
    for v in values {
        varint(&mut body, *v);
    }
    bytes_field(out, field, &body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_encode_like_protobuf() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        let mut out = Vec::new();
        int_field(&mut out, 1, 150);
        assert_eq!(out, [0x08, 0x96, 0x01]);
        let mut out = Vec::new();
        fixed64_field(&mut out, 3, 1);
        assert_eq!(out, [0x19, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut out = Vec::new();
        packed(&mut out, 4, &[3, 270]);
        assert_eq!(out, [0x22, 0x03, 0x03, 0x8e, 0x02]);
    }
}
