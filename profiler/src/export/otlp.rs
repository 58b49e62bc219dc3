//! OpenTelemetry profiles over OTLP: an `ExportProfilesServiceRequest`
//! (`opentelemetry.proto.collector.profiles.v1development`, protobuf) posted to
//! `ENDPOINT/v1development/profiles` (OTLP/HTTP), or sent to `ProfilesService/Export`
//! (OTLP/gRPC).
//!
//! The signal is alpha and its messages changed incompatibly between releases; this encodes
//! **opentelemetry-proto v1.10.0** (field numbers below), the version PyPI's
//! `opentelemetry-proto` 1.43–1.45 and the `opentelemetry-proto` crate 0.32–0.33 are
//! generated from. The tests decode what we send with PyPI's classes.
//!
//! Layout: one dictionary for the request (strings, functions, locations, stacks,
//! attributes; entry 0 of each is the zero value, as the spec wants); a `ResourceProfiles`
//! per process (`host.name`, `service.name` — its systemd service, else container, else
//! name —, `process.pid`, `process.executable.name`, `process.executable.path`,
//! `container.id`); in it one profile per family it has samples of:
//! - `samples`/count, period `cpu`/nanoseconds (on-CPU samples);
//! - `off_cpu`/nanoseconds (blocked time);
//! - `db_query`/nanoseconds (query time; server-timed queries under `[db SOURCE] FINGERPRINT`).
//!
//! Each sample carries `thread.id`, and `profiler.offcpu.state` (off-CPU) or
//! `db.query.text` (the query's fingerprint).

use std::collections::HashMap;

use crate::model::{Capture, Process, Stack};
use crate::render::frame_label;
use crate::render::proto::{Strings, bytes_field, fixed64_field, int_field, packed};

/// Where OTLP/HTTP takes profiles, under the endpoint's base URL.
pub const PATH: &str = "/v1development/profiles";
/// The gRPC method OTLP/gRPC takes them with.
pub const GRPC_PATH: &str =
    "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// One sample before encoding.
struct Sample<'a> {
    pid: u32,
    tid: u32,
    /// Leaf first.
    frames: Vec<String>,
    value: u64,
    attribute: Option<(&'static str, &'a str)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Oncpu,
    Offcpu,
    Db,
}

fn stack_sample<'a>(stack: &'a Stack, value: u64, family: Family) -> Sample<'a> {
    Sample {
        pid: stack.pid,
        tid: stack.tid,
        frames: stack.frames.iter().rev().map(frame_label).collect(),
        value,
        attribute: match family {
            Family::Offcpu => Some(("profiler.offcpu.state", stack.state.as_str())),
            Family::Db => stack
                .frames
                .last()
                .and_then(|f| f.name.strip_prefix("[db] "))
                .map(|q| ("db.query.text", q)),
            Family::Oncpu => None,
        },
    }
}

/// Every sample of `capture`, by family.
fn samples(capture: &Capture) -> Vec<(Family, Sample<'_>)> {
    let mut out = Vec::new();
    if let Some(o) = &capture.oncpu {
        out.extend(
            o.stacks
                .iter()
                .map(|s| (Family::Oncpu, stack_sample(s, s.count, Family::Oncpu))),
        );
    }
    if let Some(o) = &capture.offcpu {
        out.extend(
            o.stacks
                .iter()
                .map(|s| (Family::Offcpu, stack_sample(s, s.total_ns, Family::Offcpu))),
        );
    }
    if let Some(db) = &capture.db {
        out.extend(
            db.stacks
                .iter()
                .map(|s| (Family::Db, stack_sample(s, s.total_ns, Family::Db))),
        );
        out.extend(db.queries_without_stacks().map(|q| {
            (
                Family::Db,
                Sample {
                    pid: q.pid,
                    tid: 0,
                    frames: vec![format!("[db {}] {}", q.source, q.fingerprint)],
                    value: q.total_ns,
                    attribute: Some(("db.query.text", q.fingerprint.as_str())),
                },
            )
        }));
    }
    out.retain(|(_, s)| s.value > 0);
    out
}

/// An attribute's value.
enum Value<'a> {
    Str(&'a str),
    Int(u64),
}

fn any_value(value: &Value) -> Vec<u8> {
    let mut m = Vec::new();
    match value {
        Value::Str(text) => bytes_field(&mut m, 1, text.as_bytes()),
        Value::Int(n) => int_field(&mut m, 3, *n),
    }
    m
}

/// A `KeyValue` (resource attributes).
fn key_value(key: &str, value: Value) -> Vec<u8> {
    let mut m = Vec::new();
    bytes_field(&mut m, 1, key.as_bytes());
    bytes_field(&mut m, 2, &any_value(&value));
    m
}

/// The dictionary's tables as they fill.
struct Dictionary {
    strings: Strings,
    functions: Vec<Vec<u8>>,
    locations: Vec<Vec<u8>>,
    location_of: HashMap<String, u64>,
    stacks: Vec<Vec<u8>>,
    stack_of: HashMap<Vec<u64>, u64>,
    attributes: Vec<Vec<u8>>,
    attribute_of: HashMap<(String, String), u64>,
}

impl Dictionary {
    fn new() -> Self {
        // Entry 0 of every table is its zero value.
        Self {
            strings: Strings::new(),
            functions: vec![Vec::new()],
            locations: vec![Vec::new()],
            location_of: HashMap::new(),
            stacks: vec![Vec::new()],
            stack_of: HashMap::new(),
            attributes: vec![Vec::new()],
            attribute_of: HashMap::new(),
        }
    }

    /// A location of its own per function name (no addresses: frames are symbolized).
    fn location(&mut self, name: &str) -> u64 {
        if let Some(&index) = self.location_of.get(name) {
            return index;
        }
        let mut function = Vec::new();
        int_field(&mut function, 1, self.strings.id(name) as u64);
        let function_index = self.functions.len() as u64;
        self.functions.push(function);
        let mut line = Vec::new();
        int_field(&mut line, 1, function_index);
        let mut location = Vec::new();
        bytes_field(&mut location, 3, &line);
        let index = self.locations.len() as u64;
        self.locations.push(location);
        self.location_of.insert(name.to_string(), index);
        index
    }

    fn stack(&mut self, frames: &[String]) -> u64 {
        let locations: Vec<u64> = frames.iter().map(|f| self.location(f)).collect();
        if let Some(&index) = self.stack_of.get(&locations) {
            return index;
        }
        let mut stack = Vec::new();
        packed(&mut stack, 1, &locations);
        let index = self.stacks.len() as u64;
        self.stacks.push(stack);
        self.stack_of.insert(locations, index);
        index
    }

    fn attribute(&mut self, key: &str, value: Value) -> u64 {
        let text = match &value {
            Value::Str(s) => format!("s{s}"),
            Value::Int(n) => format!("i{n}"),
        };
        if let Some(&index) = self.attribute_of.get(&(key.to_string(), text.clone())) {
            return index;
        }
        let mut kv = Vec::new();
        int_field(&mut kv, 1, self.strings.id(key) as u64);
        bytes_field(&mut kv, 2, &any_value(&value));
        let index = self.attributes.len() as u64;
        self.attributes.push(kv);
        self.attribute_of.insert((key.to_string(), text), index);
        index
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> Vec<u8> {
        let mut m = Vec::new();
        int_field(&mut m, 1, self.strings.id(kind) as u64);
        int_field(&mut m, 2, self.strings.id(unit) as u64);
        m
    }

    fn encode(self) -> Vec<u8> {
        let mut out = Vec::new();
        bytes_field(&mut out, 1, &[]); // mapping_table[0]
        for location in &self.locations {
            bytes_field(&mut out, 2, location);
        }
        for function in &self.functions {
            bytes_field(&mut out, 3, function);
        }
        bytes_field(&mut out, 4, &[]); // link_table[0]
        for s in &self.strings.table {
            bytes_field(&mut out, 5, s.as_bytes());
        }
        for attribute in &self.attributes {
            bytes_field(&mut out, 6, attribute);
        }
        for stack in &self.stacks {
            bytes_field(&mut out, 7, stack);
        }
        out
    }
}

/// The `ExportProfilesServiceRequest` of `capture`, or `None` when it has no sample.
pub fn export_request(capture: &Capture) -> Option<Vec<u8>> {
    let samples = samples(capture);
    if samples.is_empty() {
        return None;
    }
    let processes: HashMap<u32, &Process> = capture.processes.iter().map(|p| (p.pid, p)).collect();
    // By process, then family, in a stable order.
    let mut by_process: std::collections::BTreeMap<u32, Vec<(Family, &Sample)>> =
        std::collections::BTreeMap::new();
    for (family, sample) in &samples {
        by_process
            .entry(sample.pid)
            .or_default()
            .push((*family, sample));
    }
    let mut dictionary = Dictionary::new();
    let start_ns = capture.metadata.start_unix_ms * 1_000_000;
    let oncpu_period = capture
        .oncpu
        .as_ref()
        .map_or(0, |o| 1_000_000_000 / o.frequency_hz.max(1));
    let mut request = Vec::new();
    for (pid, samples) in by_process {
        let process = processes.get(&pid);
        let comm = process.map_or_else(|| comm_of(capture, pid), |p| p.comm.clone());
        let mut resource = Vec::new();
        let service = process.map_or_else(|| comm.clone(), |p| super::service_name(p));
        let mut attributes = vec![
            key_value("host.name", Value::Str(&capture.metadata.host)),
            key_value("service.name", Value::Str(&service)),
            key_value("process.pid", Value::Int(pid.into())),
            key_value("process.executable.name", Value::Str(&comm)),
        ];
        if let Some(p) = process {
            if let Some(exe) = &p.exe {
                attributes.push(key_value("process.executable.path", Value::Str(exe)));
            }
            if let Some(id) = &p.container_id {
                attributes.push(key_value("container.id", Value::Str(id)));
            }
        }
        for attribute in &attributes {
            bytes_field(&mut resource, 1, attribute);
        }
        let mut scope_profiles = Vec::new();
        let mut scope = Vec::new();
        bytes_field(&mut scope, 1, b"profiler");
        bytes_field(&mut scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
        bytes_field(&mut scope_profiles, 1, &scope);
        for family in [Family::Oncpu, Family::Offcpu, Family::Db] {
            let of_family: Vec<&Sample> = samples
                .iter()
                .filter(|(f, _)| *f == family)
                .map(|(_, s)| *s)
                .collect();
            if of_family.is_empty() {
                continue;
            }
            let mut profile = Vec::new();
            let (sample_type, period_type, period) = match family {
                Family::Oncpu => (
                    dictionary.value_type("samples", "count"),
                    dictionary.value_type("cpu", "nanoseconds"),
                    oncpu_period,
                ),
                Family::Offcpu => (
                    dictionary.value_type("off_cpu", "nanoseconds"),
                    dictionary.value_type("off_cpu", "nanoseconds"),
                    1,
                ),
                Family::Db => (
                    dictionary.value_type("db_query", "nanoseconds"),
                    dictionary.value_type("db_query", "nanoseconds"),
                    1,
                ),
            };
            bytes_field(&mut profile, 1, &sample_type);
            for sample in of_family {
                let mut message = Vec::new();
                int_field(&mut message, 1, dictionary.stack(&sample.frames));
                let mut attributes = Vec::new();
                if sample.tid != 0 {
                    attributes
                        .push(dictionary.attribute("thread.id", Value::Int(sample.tid.into())));
                }
                if let Some((key, value)) = sample.attribute {
                    attributes.push(dictionary.attribute(key, Value::Str(value)));
                }
                if !attributes.is_empty() {
                    packed(&mut message, 2, &attributes);
                }
                packed(&mut message, 4, &[sample.value]);
                bytes_field(&mut profile, 2, &message);
            }
            fixed64_field(&mut profile, 3, start_ns);
            int_field(&mut profile, 4, capture.metadata.duration_ns);
            bytes_field(&mut profile, 5, &period_type);
            int_field(&mut profile, 6, period);
            bytes_field(&mut scope_profiles, 2, &profile);
        }
        let mut resource_profiles = Vec::new();
        bytes_field(&mut resource_profiles, 1, &resource);
        bytes_field(&mut resource_profiles, 2, &scope_profiles);
        bytes_field(&mut request, 1, &resource_profiles);
    }
    bytes_field(&mut request, 2, &dictionary.encode());
    Some(request)
}

/// A process's name from its samples when the capture lists no such process.
fn comm_of(capture: &Capture, pid: u32) -> String {
    let stacks = capture
        .oncpu
        .iter()
        .flat_map(|o| &o.stacks)
        .chain(capture.offcpu.iter().flat_map(|o| &o.stacks))
        .chain(capture.db.iter().flat_map(|d| &d.stacks));
    let from_query = || {
        capture
            .db
            .iter()
            .flat_map(|d| &d.queries)
            .find(|q| q.pid == pid)
            .map(|q| q.comm.clone())
    };
    stacks
        .into_iter()
        .find(|s| s.pid == pid)
        .map(|s| s.comm.clone())
        .or_else(from_query)
        .unwrap_or_default()
}
