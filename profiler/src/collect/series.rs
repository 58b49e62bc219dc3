//! Per-interval values of the cumulative kernel maps: each snapshot's increase per key.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// Per-key deltas for every interval, kept sparse (most keys are idle most of the time),
/// and the latest cumulative (value, count) of every key.
pub(crate) struct Series<K> {
    pub(crate) latest: HashMap<K, (u64, u64)>,
    deltas: HashMap<K, Vec<(u32, u64)>>,
    pub(crate) ends: Vec<u64>,
    pub(crate) events: u64,
}

impl<K> Default for Series<K> {
    fn default() -> Self {
        Self {
            latest: HashMap::new(),
            deltas: HashMap::new(),
            ends: Vec::new(),
            events: 0,
        }
    }
}

impl<K: Copy + Eq + Hash> Series<K> {
    /// Records cumulative (key, value, count) triples at `elapsed`.
    pub(crate) fn push(&mut self, totals: impl Iterator<Item = (K, u64, u64)>, elapsed: Duration) {
        let index = self.ends.len() as u32;
        self.ends.push(elapsed.as_nanos() as u64);
        let mut events = 0;
        for (key, value, count) in totals {
            events += count;
            let before = self.latest.insert(key, (value, count)).map_or(0, |v| v.0);
            let delta = value.saturating_sub(before);
            if delta > 0 {
                self.deltas.entry(key).or_default().push((index, delta));
            }
        }
        self.events = events;
    }

    pub(crate) fn values(&self, key: &K) -> Vec<u64> {
        let mut dense = vec![0; self.ends.len()];
        for (index, value) in self.deltas.get(key).into_iter().flatten() {
            dense[*index as usize] = *value;
        }
        dense
    }
}
