//! pprof output: a gzipped `profile.proto` (github.com/google/pprof/proto/profile.proto),
//! encoded by hand (the message is small and stable). Two sample values: off-CPU blocks
//! (count) and off-CPU time (nanoseconds); one location and function per distinct frame,
//! the process name as the outermost frame.

use std::collections::HashMap;
use std::io::Write as _;

use anyhow::{Context as _, Result};

use crate::model::Capture;
use crate::render::frame_label;

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self::default();
        s.id(""); // index 0 must be the empty string
        s
    }
    fn id(&mut self, text: &str) -> i64 {
        if let Some(&id) = self.index.get(text) {
            return id;
        }
        let id = self.table.len() as i64;
        self.table.push(text.to_string());
        self.index.insert(text.to_string(), id);
        id
    }
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn int_field(out: &mut Vec<u8>, field: u32, value: u64) {
    key(out, field, 0);
    varint(out, value);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn packed(out: &mut Vec<u8>, field: u32, values: &[u64]) {
    let mut body = Vec::new();
    for v in values {
        varint(&mut body, *v);
    }
    bytes_field(out, field, &body);
}

fn value_type(strings: &mut Strings, kind: &str, unit: &str) -> Vec<u8> {
    let mut m = Vec::new();
    int_field(&mut m, 1, strings.id(kind) as u64);
    int_field(&mut m, 2, strings.id(unit) as u64);
    m
}

/// The uncompressed profile.proto bytes.
pub fn encode(capture: &Capture) -> Vec<u8> {
    let mut strings = Strings::new();
    let mut out = Vec::new();
    let t = value_type(&mut strings, "offcpu_blocks", "count");
    bytes_field(&mut out, 1, &t);
    let t = value_type(&mut strings, "offcpu_time", "nanoseconds");
    bytes_field(&mut out, 1, &t);

    let mut locations: HashMap<String, u64> = HashMap::new();
    let mut location_msgs = Vec::new();
    let mut function_msgs = Vec::new();
    for stack in capture.offcpu.iter().flat_map(|o| &o.stacks) {
        let names = std::iter::once(stack.comm.clone()).chain(stack.frames.iter().map(frame_label));
        let mut ids = Vec::new();
        for name in names {
            let next = locations.len() as u64 + 1;
            let id = *locations.entry(name.clone()).or_insert_with(|| {
                let mut function = Vec::new();
                int_field(&mut function, 1, next);
                int_field(&mut function, 2, strings.id(&name) as u64);
                int_field(&mut function, 3, strings.id(&name) as u64);
                function_msgs.push(function);
                let mut line = Vec::new();
                int_field(&mut line, 1, next);
                let mut location = Vec::new();
                int_field(&mut location, 1, next);
                bytes_field(&mut location, 4, &line);
                location_msgs.push(location);
                next
            });
            ids.push(id);
        }
        ids.reverse(); // pprof lists the leaf first
        let mut sample = Vec::new();
        packed(&mut sample, 1, &ids);
        packed(&mut sample, 2, &[stack.count, stack.total_ns]);
        bytes_field(&mut out, 2, &sample);
    }
    for location in &location_msgs {
        bytes_field(&mut out, 4, location);
    }
    for function in &function_msgs {
        bytes_field(&mut out, 5, function);
    }
    let period = value_type(&mut strings, "offcpu_time", "nanoseconds");
    for s in &strings.table {
        bytes_field(&mut out, 6, s.as_bytes());
    }
    int_field(&mut out, 9, capture.metadata.start_unix_ms * 1_000_000);
    int_field(&mut out, 10, capture.metadata.duration_ns);
    bytes_field(&mut out, 11, &period);
    int_field(&mut out, 12, 1);
    out
}

/// Gzipped profile, as `go tool pprof` and most pprof consumers expect.
pub fn gzipped(capture: &Capture) -> Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(&encode(capture))
        .context("compressing the profile failed")?;
    encoder.finish().context("compressing the profile failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_encode_like_protobuf() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        let mut out = Vec::new();
        int_field(&mut out, 1, 150);
        assert_eq!(out, [0x08, 0x96, 0x01]);
    }
}
