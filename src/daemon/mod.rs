//! The daemon (`aom-terminator run`): wires the adapters to the pipeline,
//! supervises the broker session, acks what the pipeline settled, and shuts
//! down at a safe point.
//!
//! Shutdown has two steps. `stop` (the signal): no new messages, no new
//! requests; in-flight requests go on. `abort` (`SHUTDOWN_GRACE` later):
//! whatever has not finished is left unacked for the broker to redeliver.

mod dispatch;
mod http;
mod in_flight;
mod pipeline;
mod ports;
#[cfg(test)]
mod tests;

pub use dispatch::{Api, Dispatcher};
pub use pipeline::{Handled, Letters, Pipeline, Store};

use crate::aom::TerminateClient;
use crate::audit::{Audit, AuditWriter, FinalLookups};
use crate::broker::{self, AckHandle, DeadLetters, Incoming, Session};
use crate::domain::{Message, Outcome, ParsedMessage};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::settings::DaemonConfig;
use crate::telemetry::cause_chain;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use http::{BrokerUp, Readiness};
use in_flight::InFlight;
use ports::{AuditStore, BrokerLetters};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the supervisor checks that the connection is still alive (the
/// heartbeat notices a dead peer; this notices that the broker adapter has).
const LIVENESS_CHECK: Duration = Duration::from_secs(2);

/// The pipeline as the daemon runs it: the audit in Postgres, dead letters
/// on the broker, the real API.
type LivePipeline = Pipeline<AuditStore, BrokerLetters, TerminateClient>;

/// The right to ack a message: the pipeline says whether to, the daemon
/// does it. [`AckHandle`] in the daemon; a recorder in the tests.
pub trait Acknowledge: Send + 'static {
    fn ack(self);
}

impl Acknowledge for AckHandle {
    fn ack(self) {
        AckHandle::ack(self);
    }
}

/// The unit of work: one message through the pipeline, then acked if it
/// was settled. Returns what happened.
pub async fn work<S: Store, L: Letters, A: Api>(
    pipeline: &Pipeline<S, L, A>,
    message: Message,
    parsed: ParsedMessage,
    ack: impl Acknowledge,
) -> Handled {
    let handled = pipeline.handle(&message, parsed).await;
    match handled {
        Handled::Settled => ack.ack(),
        Handled::Unsettled => tracing::info!(
            message_id = message.message_id.as_deref().unwrap_or(""),
            "message left unacked (shutdown); the broker will redeliver it"
        ),
    }
    handled
}

/// Run until `shutdown` resolves, then stop cleanly. Errors only on what
/// retrying cannot fix.
pub async fn run(cfg: DaemonConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let grace = cfg.shutdown_grace;
    let signal = {
        let (stop, abort) = (stop.clone(), abort.clone());
        async move {
            shutdown.await;
            tracing::info!(
                grace_s = grace.as_secs(),
                "shutdown requested: finishing in-flight requests"
            );
            stop.cancel();
            tokio::time::sleep(grace).await;
            tracing::warn!("shutdown grace is over: leaving unfinished requests unacked");
            abort.cancel();
        }
    };
    // The signal branch never completes: after the grace it only cancels
    // `abort`, and `serve` then winds down.
    tokio::select! {
        result = serve(cfg, stop.clone(), abort.clone()) => result,
        () = async { signal.await; std::future::pending::<()>().await } => Ok(()),
    }
}

async fn serve(
    cfg: DaemonConfig,
    stop: CancellationToken,
    abort: CancellationToken,
) -> anyhow::Result<()> {
    // What only the adapters can check (the full URL grammars) is checked
    // before anything connects: a bad setting is one line and exit 2.
    broker::uri(&cfg.amqp)?;
    let audit = Audit::new(&cfg.database, 10)?;
    if audit
        .until_done("audit migrations", &stop, || audit.migrate())
        .await
        .is_none()
    {
        return Ok(());
    }
    let client = TerminateClient::new(&cfg.endpoint, &cfg.auth, cfg.http_timeout, cfg.concurrency)?;
    let policy = RetryPolicy {
        initial: cfg.backoff_initial,
        max: cfg.backoff_max,
        max_attempts: cfg.max_attempts,
    };
    let metrics = Arc::new(Metrics::new());
    let broker_up = Arc::new(BrokerUp::default());
    let (writer, writer_task) =
        AuditWriter::spawn(audit.clone(), abort.clone(), Arc::clone(&metrics));
    let (lookups, lookup_task) =
        FinalLookups::spawn(audit.clone(), abort.clone(), Arc::clone(&metrics));
    let dead_letters = DeadLetters::new(cfg.amqp.clone());
    let pipeline: Arc<LivePipeline> = Arc::new(Pipeline {
        dispatcher: Dispatcher::new(
            client,
            policy,
            cfg.concurrency,
            cfg.rate_limit,
            Arc::clone(&metrics),
            stop.clone(),
            abort.clone(),
        ),
        store: AuditStore {
            writer,
            lookups,
            audit: audit.clone(),
            abort: abort.clone(),
        },
        letters: BrokerLetters {
            dead_letters: dead_letters.clone(),
            abort: abort.clone(),
        },
        in_flight: InFlight::default(),
        concurrency: cfg.concurrency,
        source_queue: cfg.amqp.queue.clone(),
        metrics: Arc::clone(&metrics),
    });
    // Bound before anything is consumed: a taken port is a start-up error.
    // It serves until the work is done (readiness holds the pipeline).
    let listener_stop = CancellationToken::new();
    let listener = match cfg.metrics_addr {
        Some(addr) => {
            let readiness = Arc::new(DaemonReadiness {
                pipeline: Arc::clone(&pipeline),
                broker: Arc::clone(&broker_up),
            });
            let task = http::serve(addr, Arc::clone(&metrics), readiness, listener_stop.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (METRICS_ADDR): {e}"))?;
            Some(task)
        }
        None => None,
    };
    let summary = tokio::spawn(summarise(Arc::clone(&metrics), stop.clone()));
    let tasks = TaskTracker::new();
    let credits = Arc::new(Semaphore::new(cfg.prefetch_requests));
    tracing::info!(
        queue = %cfg.amqp.queue,
        dead_letter_queue = %cfg.amqp.dead_letter_queue,
        endpoint = %cfg.endpoint,
        auth = cfg.auth.mode(),
        concurrency = cfg.concurrency,
        prefetch = cfg.prefetch,
        "aom-terminator running"
    );

    let mut reconnect = reconnect_backoff();
    let mut sessions: Vec<Session> = Vec::new();
    let mut opened = 0u64;
    while !stop.is_cancelled() {
        let session = tokio::select! {
            s = Session::open(&cfg.amqp, cfg.prefetch) => s,
            () = stop.cancelled() => break,
        };
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                let delay = reconnect.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(
                    error.cause_chain = %cause_chain(&e),
                    retry_in_ms = delay.as_millis() as u64,
                    "broker unavailable; retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    () = stop.cancelled() => break,
                }
            }
        };
        dead_letters.attach(&session);
        opened += 1;
        if opened > 1 {
            metrics.reconnected();
        }
        broker_up.set(true);
        match consume(&session, &cfg, &pipeline, &credits, &tasks, &stop).await {
            Ok(()) if stop.is_cancelled() => {}
            Ok(()) => {
                reconnect = reconnect_backoff();
                tracing::warn!("broker session ended; reconnecting");
            }
            Err(e) => tracing::warn!(
                error.cause_chain = %cause_chain(e.as_ref()),
                "broker session failed; reconnecting"
            ),
        }
        broker_up.set(false);
        // Keep the session (and its channels) until shutdown: in-flight
        // work from it may still ack on it if it is alive after all.
        sessions.push(session);
        sessions.retain(Session::is_connected);
    }

    // Safe point: nothing new starts; wait for what is in flight (bounded
    // by `abort`), then let the writer drain, then close the broker.
    for s in &sessions {
        s.cancel_consumer().await;
    }
    tasks.close();
    tasks.wait().await;
    listener_stop.cancel();
    if let Some(listener) = listener {
        let _ = listener.await;
    }
    drop(pipeline);
    for (name, task) in [
        ("audit writer", writer_task),
        ("audit lookups", lookup_task),
    ] {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "{name} ended abnormally");
        }
    }
    for s in &sessions {
        s.close().await;
    }
    summary.abort();
    tracing::info!("aom-terminator stopped");
    Ok(())
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Take messages until shutdown (`Ok`), or until the session dies (`Err`
/// or `Ok` after the stream ended).
async fn consume(
    session: &Session,
    cfg: &DaemonConfig,
    pipeline: &Arc<LivePipeline>,
    credits: &Arc<Semaphore>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut deliveries = Box::pin(session.consume(&cfg.amqp.queue).await?);
    let credits = Arc::clone(credits);
    let mut liveness = tokio::time::interval(LIVENESS_CHECK);
    loop {
        // Paused on 401, or on a failing database: take nothing new until
        // the credentials work and the audit can be written.
        if !pipeline.dispatcher.gate.wait_open(stop).await
            || !pipeline.store.audit.wait_healthy(stop).await
        {
            return Ok(());
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            _ = liveness.tick() => {
                if !session.is_connected() {
                    return Err("the broker connection is gone".into());
                }
                if let Some(depth) = session.queue_depth(&cfg.amqp.queue).await {
                    pipeline.metrics.set_queue_depth(depth);
                }
            }
            next = deliveries.next() => match next {
                Some(Ok(Incoming { message, ack })) => {
                    // Parse here, so that the requests held in memory are
                    // bounded (PREFETCH_REQUESTS) however big the batches.
                    let parsed = ParsedMessage::parse(&message.body, message.message_id.as_deref());
                    let wanted = parsed.request_count().clamp(1, cfg.prefetch_requests) as u32;
                    let held = tokio::select! {
                        held = Arc::clone(&credits).acquire_many_owned(wanted) => held,
                        () = stop.cancelled() => return Ok(()),
                    };
                    let Ok(held) = held else { return Ok(()) }; // never closed
                    let pipeline = Arc::clone(pipeline);
                    tasks.spawn(async move {
                        let _held = held;
                        work(&pipeline, message, parsed, ack).await
                    });
                }
                Some(Err(e)) => return Err(Box::new(e)),
                None => return Ok(()),
            },
        }
    }
}

/// `/readyz`: the broker is connected, the audit database answers, and the
/// daemon is not paused on bad credentials.
struct DaemonReadiness {
    pipeline: Arc<LivePipeline>,
    broker: Arc<BrokerUp>,
}

impl Readiness for DaemonReadiness {
    fn ready(&self) -> Result<(), String> {
        if !self.broker.get() {
            return Err("the broker is not connected".to_owned());
        }
        if !self.pipeline.store.audit.is_healthy() {
            return Err("the audit database is failing".to_owned());
        }
        if !self.pipeline.dispatcher.gate.is_open() {
            return Err("paused: the AOM API refuses the credentials".to_owned());
        }
        Ok(())
    }
}

/// One line a minute while there is work: what was done, and how fast.
async fn summarise(metrics: Arc<Metrics>, stop: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(60);
    let count = |outcome| metrics.finished_count(outcome);
    let mut last = 0u64;
    let mut tick = tokio::time::interval(EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let succeeded = count(Outcome::Succeeded);
        let failed = count(Outcome::FailedPermanent) + count(Outcome::FailedRetriesExhausted);
        let rejected = count(Outcome::Rejected);
        let done = succeeded + failed + rejected;
        if done != last {
            tracing::info!(
                done,
                succeeded,
                failed,
                rejected,
                rate_per_s = (done - last) as f64 / EVERY.as_secs_f64(),
                in_flight = metrics.calls_in_flight(),
                "progress"
            );
            last = done;
        }
    }
}
