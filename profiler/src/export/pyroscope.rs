//! Grafana Pyroscope's push API (`POST /push.v1.PusherService/Push`, Connect's JSON form of
//! `push.v1.PushRequest`): one request per capture holding a series per service and family —
//! `process_cpu` (on-CPU samples, Go's `samples`/`cpu` types), `off_cpu` (blocks and blocked
//! time) and `db_query` (queries and query time) — each a gzipped pprof (render/pprof.rs)
//! labelled `service_name` and `host`. (Pyroscope's older `/ingest` guesses the profile name
//! from the sample types and would file off-CPU time under `process_cpu`.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use super::service_name;
use crate::model::{Capture, Process};
use crate::render::pprof::{Kind, encode_selected, gzip};

/// The profile name Pyroscope files a family under.
fn profile_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Oncpu => "process_cpu",
        Kind::Offcpu => "off_cpu",
        Kind::Db => "db_query",
    }
}

/// The processes of each service that have samples of `kind` in `capture`.
fn services(capture: &Capture, kind: Kind) -> BTreeMap<String, HashSet<u32>> {
    let by_pid: HashMap<u32, &Process> = capture.processes.iter().map(|p| (p.pid, p)).collect();
    let mut services: BTreeMap<String, HashSet<u32>> = BTreeMap::new();
    let mut add = |pid: u32, comm: &str| {
        let service = by_pid
            .get(&pid)
            .map_or_else(|| comm.to_string(), |p| service_name(p));
        services.entry(service).or_default().insert(pid);
    };
    match kind {
        Kind::Offcpu => capture
            .offcpu
            .iter()
            .flat_map(|o| &o.stacks)
            .for_each(|s| add(s.pid, &s.comm)),
        Kind::Oncpu => capture
            .oncpu
            .iter()
            .flat_map(|o| &o.stacks)
            .for_each(|s| add(s.pid, &s.comm)),
        Kind::Db => {
            if let Some(db) = &capture.db {
                db.stacks.iter().for_each(|s| add(s.pid, &s.comm));
                db.queries.iter().for_each(|q| add(q.pid, &q.comm));
            }
        }
    }
    services
}

/// The push API's JSON for `capture`: a series per service and family, each one gzipped
/// pprof of that service's processes. `None` when the capture has no sample to push.
pub fn push_request(capture: &Capture) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let host = capture.metadata.host.clone();
    let mut series = Vec::new();
    for kind in Kind::present(capture) {
        for (service, pids) in services(capture, kind) {
            let Ok(profile) = gzip(&encode_selected(capture, &[kind], &|pid| {
                pids.contains(&pid)
            })) else {
                continue;
            };
            series.push(serde_json::json!({
                "labels": [
                    {"name": "__name__", "value": profile_name(kind)},
                    {"name": "service_name", "value": service},
                    {"name": "host", "value": host},
                ],
                "samples": [{
                    "ID": uuid(),
                    "rawProfile": base64::engine::general_purpose::STANDARD.encode(profile),
                }],
            }));
        }
    }
    if series.is_empty() {
        return None;
    }
    serde_json::to_vec(&serde_json::json!({ "series": series })).ok()
}

/// A random (version 4) UUID, as the push API's sample ids are.
fn uuid() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // No entropy: unique enough from the clock and a counter.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        bytes[..8].copy_from_slice(&crate::collect::unix_ms().to_le_bytes());
        bytes[8..].copy_from_slice(&n.to_le_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4() {
        let (a, b) = (uuid(), uuid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
