//! What the daemon exposes about itself: Prometheus metrics (the
//! `prometheus-client` crate) and the health endpoints, on `METRICS_ADDR`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The HTTP status, or the kind of network error.
    pub status: String,
}

/// Every metric, registered once; cheap to update from the hot path.
pub struct Metrics {
    pub requests: Family<OutcomeLabel, Counter>,
    pub api_calls: Family<StatusLabel, Counter>,
    pub attempts: Counter,
    pub in_flight: Gauge,
    pub api_latency: Histogram,
    pub audit_write_latency: Histogram,
    pub audit_write_records: Histogram,
    pub lookup_latency: Histogram,
    pub queue_depth: Gauge,
    pub reconnects: Counter,
    pub skipped_redeliveries: Counter,
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
            "Messages ready in the request queue (sampled)",
            m.queue_depth.clone(),
        );
        registry.register(
            "reconnects",
            "Broker sessions opened after the first",
            m.reconnects.clone(),
        );
        registry.register(
            "skipped_redeliveries",
            "Deliveries of already-final requests acked without a call",
            m.skipped_redeliveries.clone(),
        );
        Metrics { registry, ..m }
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

/// What `/readyz` checks.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, else why not.
    fn ready(&self) -> Result<(), String>;
}

/// Broker connectivity, as the supervisor sees it.
#[derive(Debug, Default)]
pub struct BrokerUp(AtomicBool);

impl BrokerUp {
    pub fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<dyn Readiness>,
}

/// Bind `addr` now (a taken port is a start-up error), serve until `stop`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<dyn Readiness>,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, readiness });
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    }))
}

async fn metrics_handler(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
}

async fn ready_handler(State(app): State<AppState>) -> impl IntoResponse {
    match app.readiness.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
