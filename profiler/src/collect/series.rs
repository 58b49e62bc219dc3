//! Per-interval values of the cumulative kernel maps: each snapshot's increase per key.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// Per-key deltas for every interval, kept sparse (most keys are idle most of the time),
/// and the latest cumulative (value, count) of every key.
pub(crate) struct Series<K> {
    /// What the maps held when this capture started counting (a daemon window that follows
    /// another: the maps were attached earlier, and their counts until then are the previous
    /// window's); every value is taken relative to it.
    base: HashMap<K, (u64, u64)>,
    pub(crate) latest: HashMap<K, (u64, u64)>,
    deltas: HashMap<K, Vec<(u32, u64)>>,
    pub(crate) ends: Vec<u64>,
    pub(crate) events: u64,
}

impl<K> Default for Series<K> {
    fn default() -> Self {
        Self {
            base: HashMap::new(),
            latest: HashMap::new(),
            deltas: HashMap::new(),
            ends: Vec::new(),
            events: 0,
        }
    }
}

impl<K: Copy + Eq + Hash> Series<K> {
    /// A series counting from `base` (the maps' values when the capture started counting).
    pub(crate) fn from_base(base: HashMap<K, (u64, u64)>) -> Self {
        Self {
            base,
            ..Self::default()
        }
    }

    /// Records cumulative (key, value, count) triples at `elapsed`.
    pub(crate) fn push(&mut self, totals: impl Iterator<Item = (K, u64, u64)>, elapsed: Duration) {
        let index = self.ends.len() as u32;
        self.ends.push(elapsed.as_nanos() as u64);
        let mut events = 0;
        for (key, value, count) in totals {
            let (value, count) = match self.base.get(&key) {
                Some((base_value, base_count)) => (
                    value.saturating_sub(*base_value),
                    count.saturating_sub(*base_count),
                ),
                None => (value, count),
            };
            if value == 0 && count == 0 && !self.latest.contains_key(&key) {
                continue; // nothing since the start
            }
            events += count;
            let before = self.latest.insert(key, (value, count)).map_or(0, |v| v.0);
            let delta = value.saturating_sub(before);
            if delta > 0 {
                self.deltas.entry(key).or_default().push((index, delta));
            }
        }
        self.events = events;
    }

    /// Every key the maps hold (as of the latest snapshot), base included.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.base.keys().chain(
            self.latest
                .keys()
                .filter(|key| !self.base.contains_key(*key)),
        )
    }

    /// The maps' values at the latest snapshot, as the kernel holds them (base included): the
    /// base of a window that follows this one on the same maps.
    pub(crate) fn cumulative(&self) -> HashMap<K, (u64, u64)> {
        let mut all = self.base.clone();
        for (key, (value, count)) in &self.latest {
            let base = all.entry(*key).or_default();
            *base = (base.0 + value, base.1 + count);
        }
        all
    }

    pub(crate) fn values(&self, key: &K) -> Vec<u64> {
        let mut dense = vec![0; self.ends.len()];
        for (index, value) in self.deltas.get(key).into_iter().flatten() {
            dense[*index as usize] = *value;
        }
        dense
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_from_a_base_counts_only_what_came_after_it() {
        let base: HashMap<u32, (u64, u64)> = [(1, (100, 2)), (2, (50, 1))].into_iter().collect();
        let mut series = Series::from_base(base);
        series.push(
            [(1, 130, 3), (2, 50, 1), (3, 7, 1)].into_iter(),
            Duration::from_secs(1),
        );
        assert_eq!(series.latest.get(&1), Some(&(30, 1)));
        assert_eq!(series.latest.get(&2), None, "nothing new");
        assert_eq!(series.latest.get(&3), Some(&(7, 1)));
        assert_eq!(series.values(&1), vec![30]);
        // Where the next window on the same maps starts counting from.
        let next = series.cumulative();
        assert_eq!(next.get(&1), Some(&(130, 3)));
        assert_eq!(next.get(&2), Some(&(50, 1)));
        assert_eq!(next.get(&3), Some(&(7, 1)));
    }
}
