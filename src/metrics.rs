//! The daemon's Prometheus metrics: the only module that knows the
//! `prometheus-client` crate. Everything else records through the methods
//! below; `daemon::http` serves [`Metrics::encode`] on `/metrics`.

use crate::domain::{Attempt, Outcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectLabel {
    project_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    /// The HTTP status, or the kind of network error.
    status: String,
}

/// Every metric, registered once; cheap to update from the hot path.
pub struct Metrics {
    requests: Family<OutcomeLabel, Counter>,
    api_calls: Family<StatusLabel, Counter>,
    attempts: Counter,
    in_flight: Gauge,
    api_latency: Histogram,
    audit_write_latency: Histogram,
    audit_write_records: Histogram,
    lookup_latency: Histogram,
    queue_depth: Gauge<f64, AtomicU64>,
    reconnects: Counter,
    skipped_redeliveries: Counter,
    parked: Counter,
    ready: Gauge,
    paused: Gauge,
    projects_held: Family<ProjectLabel, Gauge>,
    concurrency: Gauge,
    concurrency_limit: Gauge,
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("aom_terminator");
        let m = Metrics {
            requests: Family::default(),
            api_calls: Family::default(),
            attempts: Counter::default(),
            in_flight: Gauge::default(),
            api_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            audit_write_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            audit_write_records: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            lookup_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            queue_depth: Gauge::default(),
            reconnects: Counter::default(),
            skipped_redeliveries: Counter::default(),
            parked: Counter::default(),
            ready: Gauge::default(),
            paused: Gauge::default(),
            projects_held: Family::default(),
            concurrency: Gauge::default(),
            concurrency_limit: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by final outcome", m.requests.clone());
        registry.register("api_calls", "API calls by answer", m.api_calls.clone());
        registry.register("attempts", "HTTP attempts made", m.attempts.clone());
        registry.register("in_flight", "API calls in flight", m.in_flight.clone());
        registry.register(
            "api_latency_seconds",
            "Latency of API calls",
            m.api_latency.clone(),
        );
        registry.register(
            "audit_write_seconds",
            "Duration of one audit flush",
            m.audit_write_latency.clone(),
        );
        registry.register(
            "audit_write_records",
            "Records committed by one audit flush",
            m.audit_write_records.clone(),
        );
        registry.register(
            "dedupe_lookup_seconds",
            "Duration of one dedupe lookup query (the ids of every message that arrived meanwhile)",
            m.lookup_latency.clone(),
        );
        registry.register(
            "queue_depth",
            "Messages ready in the request queue (sampled; NaN while the daemon cannot see the queue)",
            m.queue_depth.clone(),
        );
        registry.register(
            "reconnects",
            "Broker sessions lost (each is followed by a reconnect)",
            m.reconnects.clone(),
        );
        registry.register(
            "skipped_redeliveries",
            "Deliveries of already-final requests acked without a call",
            m.skipped_redeliveries.clone(),
        );
        registry.register(
            "requests_parked",
            "Requests of held projects put in the parking queue (a request parked twice counts twice)",
            m.parked.clone(),
        );
        registry.register(
            "ready",
            "1 while /readyz would answer 200 (broker connected, audit answering, not paused), else 0",
            m.ready.clone(),
        );
        registry.register(
            "paused",
            "1 while consumption is paused because the AOM API refuses the credentials (401), else 0",
            m.paused.clone(),
        );
        registry.register(
            "projects_held",
            "1 for each project whose calls the AOM API refuses (401) while others' go through: \
             its requests are parked, not failed",
            m.projects_held.clone(),
        );
        registry.register(
            "concurrency",
            "The configured most API calls in flight (CONCURRENCY)",
            m.concurrency.clone(),
        );
        registry.register(
            "concurrency_limit",
            "API calls allowed in flight now: CONCURRENCY, or less while the adaptive limit backs off from overload",
            m.concurrency_limit.clone(),
        );
        m.set_queue_depth(None);
        Metrics { registry, ..m }
    }

    /// `n` more requests reached `outcome`.
    pub fn finished(&self, outcome: Outcome, n: u64) {
        if n > 0 {
            self.requests
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.as_str(),
                })
                .inc_by(n);
        }
    }

    /// Requests that reached `outcome` so far.
    pub fn finished_count(&self, outcome: Outcome) -> u64 {
        self.requests
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .get()
    }

    /// An API call starts; [`Metrics::call_ended`] follows it.
    pub fn call_started(&self) {
        self.in_flight.inc();
    }

    pub fn call_ended(&self) {
        self.in_flight.dec();
    }

    pub fn calls_in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// An API call was answered (or failed on the network).
    pub fn answered(&self, attempt: &Attempt) {
        self.attempts.inc();
        let status = match (attempt.http_status, attempt.error_kind) {
            (Some(code), _) => code.to_string(),
            (None, Some(kind)) => kind.as_str().to_owned(),
            (None, None) => "unknown".to_owned(),
        };
        self.api_calls.get_or_create(&StatusLabel { status }).inc();
        self.api_latency.observe(attempt.latency.as_secs_f64());
    }

    /// One audit flush took `took` and committed `records`.
    pub fn audit_flushed(&self, took: Duration, records: usize) {
        self.audit_write_latency.observe(took.as_secs_f64());
        self.audit_write_records.observe(records as f64);
    }

    /// One dedupe lookup query took `took`.
    pub fn looked_up(&self, took: Duration) {
        self.lookup_latency.observe(took.as_secs_f64());
    }

    /// Messages ready in the request queue, or `None` when the daemon
    /// cannot see the queue (exported as NaN: unknown, not 0).
    pub fn set_queue_depth(&self, ready: Option<u32>) {
        self.queue_depth.set(ready.map_or(f64::NAN, f64::from));
    }

    /// A broker session was lost.
    pub fn session_lost(&self) {
        self.reconnects.inc();
    }

    pub fn skipped_redelivery(&self) {
        self.skipped_redeliveries.inc();
    }

    pub fn parked(&self) {
        self.parked.inc();
    }

    /// Whether the daemon is ready (what `/readyz` answers).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Whether consumption is paused on bad credentials (a 401).
    pub fn set_paused(&self, paused: bool) {
        self.paused.set(i64::from(paused));
    }

    /// Whether `project`'s requests are held (a 401 for it alone).
    pub fn set_project_held(&self, project: &str, held: bool) {
        let label = ProjectLabel {
            project_id: project.to_owned(),
        };
        if held {
            self.projects_held.get_or_create(&label).set(1);
        } else {
            self.projects_held.remove(&label);
        }
    }

    /// The configured `CONCURRENCY`, exported next to `in_flight`.
    pub fn set_concurrency(&self, limit: usize) {
        self.concurrency
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// The limit of calls in flight in force now.
    pub fn set_concurrency_limit(&self, limit: usize) {
        self.concurrency_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
