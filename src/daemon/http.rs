//! What the daemon serves about itself on `METRICS_ADDR`: `/metrics`,
//! `/healthz` and `/readyz`.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// What `/readyz` checks.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, else why not.
    fn ready(&self) -> Result<(), String>;
    /// What else a person should know, ready or not (held projects), as
    /// lines of `/readyz`'s body.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The broker session as readiness sees it: up from the moment its
/// consumer is registered until the session is lost.
#[derive(Debug, Default)]
pub struct BrokerUp(Mutex<Option<CancellationToken>>);

impl BrokerUp {
    /// A consumer is registered on the session whose loss fires `lost`.
    pub fn consuming(&self, lost: CancellationToken) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(lost);
    }

    pub fn get(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|lost| !lost.is_cancelled())
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
    tracing::debug!(%addr, "serving /metrics, /healthz and /readyz");
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
    // Readiness as a metric, computed as /readyz computes it, at each scrape.
    app.metrics.set_ready(app.readiness.ready().is_ok());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
}

async fn ready_handler(State(app): State<AppState>) -> impl IntoResponse {
    let (status, mut body) = match app.readiness.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    };
    for note in app.readiness.notes() {
        body.push_str(&note);
        body.push('\n');
    }
    (status, body)
}
