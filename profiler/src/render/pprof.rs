//! pprof output: a gzipped `profile.proto` (github.com/google/pprof/proto/profile.proto),
//! encoded by hand (the message is small and stable).
//!
//! One profile holds every family the capture has that pprof can show, each as a pair of
//! sample types (a sample has a value for every type; the other families' are 0):
//! off-CPU `offcpu_blocks`/count and `offcpu_time`/nanoseconds; on-CPU `samples`/count and
//! `cpu`/nanoseconds (Go's CPU-profile names, which Parca and Pyroscope know); database
//! `queries`/count and `query_time`/nanoseconds. One location and function per distinct
//! frame, the process name as the outermost frame. Each sample carries labels: `pid`,
//! `tid`, off-CPU `state`, `query` (a database sample's fingerprint), and the process's
//! `cgroup`, `container_id` and `systemd_unit` where known.

use std::collections::HashMap;
use std::io::Write as _;

use anyhow::{Context as _, Result};

use crate::model::{Capture, Stack};
use crate::render::frame_label;
use crate::render::proto::{Strings, bytes_field, int_field, packed};

/// A family pprof shows, as two sample types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Offcpu,
    Oncpu,
    Db,
}

impl Kind {
    /// (type, unit) of its count and of its time.
    pub fn sample_types(self) -> [(&'static str, &'static str); 2] {
        match self {
            Kind::Offcpu => [("offcpu_blocks", "count"), ("offcpu_time", "nanoseconds")],
            Kind::Oncpu => [("samples", "count"), ("cpu", "nanoseconds")],
            Kind::Db => [("queries", "count"), ("query_time", "nanoseconds")],
        }
    }

    /// The families `capture` holds (off-CPU when it holds none, so a profile always has a
    /// sample type).
    pub fn present(capture: &Capture) -> Vec<Kind> {
        let mut kinds = Vec::new();
        if capture.offcpu.is_some() {
            kinds.push(Kind::Offcpu);
        }
        if capture.oncpu.is_some() {
            kinds.push(Kind::Oncpu);
        }
        if capture.db.is_some() {
            kinds.push(Kind::Db);
        }
        if kinds.is_empty() {
            kinds.push(Kind::Offcpu);
        }
        kinds
    }
}

/// One sample before encoding: its frames (outermost first), labels and family values.
struct Sample<'a> {
    comm: &'a str,
    frames: Vec<String>,
    pid: u32,
    tid: u32,
    state: Option<&'a str>,
    query: Option<&'a str>,
    count: u64,
    total_ns: u64,
}

fn stack_sample(kind: Kind, stack: &Stack) -> Sample<'_> {
    Sample {
        comm: &stack.comm,
        frames: stack.frames.iter().map(frame_label).collect(),
        pid: stack.pid,
        tid: stack.tid,
        state: (kind == Kind::Offcpu).then_some(stack.state.as_str()),
        query: match kind {
            Kind::Db => stack
                .frames
                .last()
                .and_then(|f| f.name.strip_prefix("[db] ")),
            _ => None,
        },
        count: stack.count,
        total_ns: stack.total_ns,
    }
}

/// The samples of `kind` in `capture` for the processes `keep` accepts. Database queries
/// timed without a stack (a server's probes) are samples under `comm;[db SOURCE] FINGERPRINT`,
/// as in db.folded.
fn samples<'a>(capture: &'a Capture, kind: Kind, keep: &dyn Fn(u32) -> bool) -> Vec<Sample<'a>> {
    let stacks: &[Stack] = match kind {
        Kind::Offcpu => capture.offcpu.as_ref().map_or(&[], |o| &o.stacks),
        Kind::Oncpu => capture.oncpu.as_ref().map_or(&[], |o| &o.stacks),
        Kind::Db => capture.db.as_ref().map_or(&[], |d| &d.stacks),
    };
    let mut out: Vec<Sample> = stacks
        .iter()
        .filter(|s| keep(s.pid))
        .map(|s| stack_sample(kind, s))
        .collect();
    if let (Kind::Db, Some(db)) = (kind, &capture.db) {
        out.extend(
            db.queries_without_stacks()
                .filter(|q| keep(q.pid))
                .map(|q| Sample {
                    comm: if q.comm.is_empty() {
                        "postgres"
                    } else {
                        &q.comm
                    },
                    frames: vec![format!("[db {}] {}", q.source, q.fingerprint)],
                    pid: q.pid,
                    tid: 0,
                    state: None,
                    query: Some(q.fingerprint.as_str()),
                    count: q.calls,
                    total_ns: q.total_ns,
                }),
        );
    }
    out
}

fn value_type(strings: &mut Strings, kind: &str, unit: &str) -> Vec<u8> {
    let mut m = Vec::new();
    int_field(&mut m, 1, strings.id(kind) as u64);
    int_field(&mut m, 2, strings.id(unit) as u64);
    m
}

/// A `Label`: a string (`str`) or a number (`num`).
fn label(strings: &mut Strings, key: &str, value: LabelValue) -> Vec<u8> {
    let mut m = Vec::new();
    int_field(&mut m, 1, strings.id(key) as u64);
    match value {
        LabelValue::Str(text) => int_field(&mut m, 2, strings.id(text) as u64),
        LabelValue::Num(n) => int_field(&mut m, 3, n),
    }
    m
}

enum LabelValue<'a> {
    Str(&'a str),
    Num(u64),
}

/// The uncompressed profile.proto bytes of every family `capture` holds.
pub fn encode(capture: &Capture) -> Vec<u8> {
    encode_selected(capture, &Kind::present(capture), &|_| true)
}

/// The uncompressed profile.proto bytes of `kinds`, for the processes `keep` accepts.
pub fn encode_selected(capture: &Capture, kinds: &[Kind], keep: &dyn Fn(u32) -> bool) -> Vec<u8> {
    let mut strings = Strings::new();
    let mut out = Vec::new();
    for kind in kinds {
        for (name, unit) in kind.sample_types() {
            let t = value_type(&mut strings, name, unit);
            bytes_field(&mut out, 1, &t);
        }
    }
    let processes: HashMap<u32, &crate::model::Process> =
        capture.processes.iter().map(|p| (p.pid, p)).collect();
    let mut locations: HashMap<String, u64> = HashMap::new();
    let mut location_msgs = Vec::new();
    let mut function_msgs = Vec::new();
    for (slot, kind) in kinds.iter().enumerate() {
        for sample in samples(capture, *kind, keep) {
            let names = std::iter::once(sample.comm.to_string()).chain(sample.frames);
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
            let mut values = vec![0u64; kinds.len() * 2];
            values[slot * 2] = sample.count;
            values[slot * 2 + 1] = sample.total_ns;
            let mut message = Vec::new();
            packed(&mut message, 1, &ids);
            packed(&mut message, 2, &values);
            let mut labels = vec![label(
                &mut strings,
                "pid",
                LabelValue::Num(sample.pid.into()),
            )];
            if sample.tid != 0 {
                labels.push(label(
                    &mut strings,
                    "tid",
                    LabelValue::Num(sample.tid.into()),
                ));
            }
            if let Some(state) = sample.state {
                labels.push(label(&mut strings, "state", LabelValue::Str(state)));
            }
            if let Some(query) = sample.query {
                labels.push(label(&mut strings, "query", LabelValue::Str(query)));
            }
            if let Some(process) = processes.get(&sample.pid) {
                for (key, value) in [
                    ("cgroup", &process.cgroup),
                    ("container_id", &process.container_id),
                    ("systemd_unit", &process.systemd_unit),
                ] {
                    if let Some(value) = value {
                        labels.push(label(&mut strings, key, LabelValue::Str(value)));
                    }
                }
            }
            for l in &labels {
                bytes_field(&mut message, 3, l);
            }
            bytes_field(&mut out, 2, &message);
        }
    }
    for location in &location_msgs {
        bytes_field(&mut out, 4, location);
    }
    for function in &function_msgs {
        bytes_field(&mut out, 5, function);
    }
    // The period: an on-CPU sample's CPU time when on-CPU is shown, else 1 ns of off-CPU
    // time (or query time).
    let oncpu_hz = capture
        .oncpu
        .as_ref()
        .map(|o| o.frequency_hz)
        .filter(|hz| *hz > 0);
    let (period, every) = match oncpu_hz {
        Some(hz) if kinds.contains(&Kind::Oncpu) => (
            value_type(&mut strings, "cpu", "nanoseconds"),
            1_000_000_000 / hz,
        ),
        _ => {
            let [_, (name, unit)] = kinds[0].sample_types();
            (value_type(&mut strings, name, unit), 1)
        }
    };
    let [_, (default_type, _)] = kinds[0].sample_types();
    let default_type = strings.id(default_type) as u64;
    for s in &strings.table {
        bytes_field(&mut out, 6, s.as_bytes());
    }
    int_field(&mut out, 9, capture.metadata.start_unix_ms * 1_000_000);
    int_field(&mut out, 10, capture.metadata.duration_ns);
    bytes_field(&mut out, 11, &period);
    int_field(&mut out, 12, every);
    int_field(&mut out, 14, default_type);
    out
}

/// Gzipped profile, as `go tool pprof` and most pprof consumers expect.
pub fn gzipped(capture: &Capture) -> Result<Vec<u8>> {
    gzip(&encode(capture))
}

/// `bytes` gzipped.
pub fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(bytes)
        .context("compressing the profile failed")?;
    encoder.finish().context("compressing the profile failed")
}
