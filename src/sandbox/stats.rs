//! The sandbox's counters ([`Stats`]) and their public snapshot, [`SandboxStats`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use axum::http::Version;
use serde::{Deserialize, Serialize};

/// A snapshot of the sandbox's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStats {
    /// Terminate calls received (whatever their answer).
    pub calls: u64,
    /// Terminate calls answered, by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Terminate calls being handled now.
    pub in_flight: u64,
    /// Highest `in_flight` seen since start or the last reset.
    pub max_in_flight: u64,
    /// Token requests to the fake IAM.
    #[serde(default)]
    pub iam_calls: u64,
    /// Terminate calls answered (the sum of `by_status`), and the sum of their answer
    /// times (arrival of the request to its answer, in microseconds): their ratio is the
    /// latency the sandbox actually gave, which the benchmark prints beside the one it
    /// asked for.
    #[serde(default)]
    pub answered: u64,
    #[serde(default)]
    pub answer_micros: u64,
    /// Terminate calls waiting for the backend now (`--capacity`).
    #[serde(default)]
    pub queued: u64,
    /// Highest `queued` seen since start or the last reset.
    #[serde(default)]
    pub max_queued: u64,
    /// Token requests to the fake IAM by the project they are scoped to (its id, or its
    /// name when scoped by name).
    #[serde(default)]
    pub iam_calls_by_project: BTreeMap<String, u64>,
    /// Terminate calls by the host they were addressed to (the `Host` header, else the
    /// authority of an absolute-form target), port included when one was given. The
    /// sandbox answers every host alike; this says where a client meant to send a call.
    #[serde(default)]
    pub calls_by_host: BTreeMap<String, u64>,
    /// Project look-ups (`GET /v3/projects/{project_id}`) the fake IAM answered.
    #[serde(default)]
    pub iam_project_lookups: u64,
    /// Terminate calls by the HTTP version they came in (`HTTP/1.1`, `HTTP/2.0`).
    #[serde(default)]
    pub calls_by_version: BTreeMap<String, u64>,
}

/// The HTTP versions [`Stats`] counts calls by, in its `by_version` order.
pub(super) const VERSIONS: [Version; 5] = [
    Version::HTTP_09,
    Version::HTTP_10,
    Version::HTTP_11,
    Version::HTTP_2,
    Version::HTTP_3,
];

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct KeyCounts {
    /// All calls for the execution.
    pub(super) calls: u64,
    /// Calls that passed authentication and validation (drives `flaky`).
    accepted: u64,
}

pub(super) struct Stats {
    pub(super) calls: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) max_in_flight: AtomicU64,
    pub(super) answer_micros: AtomicU64,
    pub(super) queued: AtomicU64,
    pub(super) max_queued: AtomicU64,
    /// Index: status - 100.
    pub(super) by_status: [AtomicU64; 500],
    /// Key: [`execution_key`].
    pub(super) per_key: Mutex<HashMap<Box<[u8]>, KeyCounts>>,
    pub(super) by_host: Mutex<BTreeMap<String, u64>>,
    /// Index: the version's place in [`VERSIONS`].
    pub(super) by_version: [AtomicU64; VERSIONS.len()],
}

impl Stats {
    pub(super) fn new() -> Self {
        Stats {
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            answer_micros: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            max_queued: AtomicU64::new(0),
            by_status: std::array::from_fn(|_| AtomicU64::new(0)),
            per_key: Mutex::new(HashMap::new()),
            by_host: Mutex::new(BTreeMap::new()),
            by_version: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts a terminate call that came in `version`.
    pub(super) fn count_version(&self, version: Version) {
        if let Some(i) = VERSIONS.iter().position(|v| *v == version) {
            self.by_version[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The calls counted by version, the versions seen only.
    pub(super) fn by_version(&self) -> BTreeMap<String, u64> {
        VERSIONS
            .iter()
            .zip(&self.by_version)
            .filter_map(|(version, counter)| {
                let n = counter.load(Ordering::Relaxed);
                (n > 0).then(|| (format!("{version:?}"), n))
            })
            .collect()
    }

    /// Counts a terminate call addressed to `host`.
    pub(super) fn count_host(&self, host: &str) {
        let mut map = self.by_host.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(host) {
            Some(n) => *n += 1,
            None => {
                map.insert(host.to_owned(), 1);
            }
        }
    }

    pub(super) fn count_status(&self, status: u16) {
        if let Some(counter) = usize::from(status)
            .checked_sub(100)
            .and_then(|i| self.by_status.get(i))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a call for an execution; returns its number of accepted calls so far.
    pub(super) fn count_key(&self, key: Vec<u8>, accepted: bool) -> u64 {
        let mut map = self.per_key.lock().unwrap_or_else(PoisonError::into_inner);
        let counts = match map.get_mut(key.as_slice()) {
            Some(counts) => counts,
            None => map.entry(key.into_boxed_slice()).or_default(),
        };
        counts.calls += 1;
        if accepted {
            counts.accepted += 1;
        }
        counts.accepted
    }
}

/// Unambiguous map key of an execution: each of the first two ids preceded by its length.
pub(super) fn execution_key(project_id: &str, workflow_id: &str, execution_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + project_id.len() + workflow_id.len() + execution_id.len());
    for part in [project_id, workflow_id] {
        key.extend_from_slice(&(part.len() as u32).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key.extend_from_slice(execution_id.as_bytes());
    key
}

/// Counts a terminate call as in flight for as long as it lives (also when the client
/// goes away and the handler is dropped).
pub(super) struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    pub(super) fn enter(stats: &'a Stats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_and_accepted_calls_per_execution() {
        let stats = Stats::new();
        let key = || execution_key("p", "w", "e");
        assert_eq!(stats.count_key(key(), false), 0);
        assert_eq!(stats.count_key(key(), true), 1);
        assert_eq!(stats.count_key(key(), true), 2);
        assert_eq!(stats.count_key(execution_key("p", "w", "other"), true), 1);
        let map = stats.per_key.lock().unwrap();
        assert_eq!(map.get(key().as_slice()).map(|c| c.calls), Some(3));
    }

    #[test]
    fn counts_statuses_in_range_only() {
        let stats = Stats::new();
        for status in [100, 200, 200, 599, 99, 600, u16::MAX] {
            stats.count_status(status);
        }
        let counted: Vec<(u16, u64)> = stats
            .by_status
            .iter()
            .zip(100u16..)
            .map(|(counter, status)| (status, counter.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        assert_eq!(counted, [(100, 1), (200, 2), (599, 1)]);
    }

    #[test]
    fn counts_calls_by_http_version() {
        let stats = Stats::new();
        for version in [Version::HTTP_11, Version::HTTP_2, Version::HTTP_11] {
            stats.count_version(version);
        }
        let want = BTreeMap::from([("HTTP/1.1".to_owned(), 2), ("HTTP/2.0".to_owned(), 1)]);
        assert_eq!(stats.by_version(), want);
    }

    #[test]
    fn in_flight_tracks_its_maximum() {
        let stats = Stats::new();
        let a = InFlight::enter(&stats);
        let b = InFlight::enter(&stats);
        drop(a);
        let _c = InFlight::enter(&stats);
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 2);
        drop(b);
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 1);
        assert_eq!(stats.max_in_flight.load(Ordering::Relaxed), 2);
    }
}
