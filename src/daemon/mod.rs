//! The daemon (`aom-terminator run`): wires the adapters to the pipeline,
//! supervises the broker session, acks what the pipeline settled, and shuts
//! down at a safe point.
//!
//! Shutdown has two steps. `stop` (the signal): no new messages, no new
//! requests; in-flight requests go on. `abort` (`SHUTDOWN_GRACE` later):
//! whatever has not finished is left unacked for the broker to redeliver.

mod dispatch;
mod holds;
mod http;
mod in_flight;
mod limit;
mod mover;
mod pipeline;
mod ports;
#[cfg(test)]
mod project_tests;
mod supervise;
#[cfg(test)]
mod tests;

pub use dispatch::{Api, Dispatched, Dispatcher, End, Limits};
pub use holds::Holds;
pub use pipeline::{Handled, Letters, Pipeline, Store};

use crate::aom::{HttpOptions, TerminateClient};
use crate::audit::{Audit, AuditWriter, FinalLookups, fold};
use crate::broker::{self, AckHandle, DeadLetters, Parking};
use crate::domain::{Message, Outcome, ParsedMessage};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::settings::{ConfigError, DaemonConfig};
use crate::telemetry::{Repeats, cause_chain};
use backon::{BackoffBuilder, ExponentialBuilder};
use http::{BrokerUp, Readiness};
use in_flight::InFlight;
use ports::{AuditStore, BrokerLetters};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use supervise::{Supervised, supervise};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
/// was settled. `held` fires when the broker takes the message back (its
/// session was lost). Returns what happened.
pub async fn work<S: Store, L: Letters, A: Api>(
    pipeline: &Pipeline<S, L, A>,
    message: Message,
    parsed: ParsedMessage,
    ack: impl Acknowledge,
    held: &CancellationToken,
) -> Handled {
    let handled = pipeline.handle(&message, parsed, held).await;
    match handled {
        Handled::Settled => ack.ack(),
        // Counted in the lost session's summary instead.
        Handled::Unsettled if held.is_cancelled() => {}
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
    if !migrate_at_start(&audit, &cfg, &stop).await? {
        return Ok(());
    }
    let client = TerminateClient::new(
        &cfg.endpoint,
        &cfg.auth,
        HttpOptions {
            timeout: cfg.http_timeout,
            pool: cfg.concurrency,
            ca_pem: cfg.aom_ca_pem.as_deref(),
            version: cfg.http_version,
        },
    )?;
    let policy = RetryPolicy {
        initial: cfg.backoff_initial,
        max: cfg.backoff_max,
        max_attempts: cfg.max_attempts,
        throttle_give_up: cfg.throttle_give_up,
    };
    let metrics = Arc::new(Metrics::new());
    metrics.set_concurrency(cfg.concurrency);
    let broker_up = Arc::new(BrokerUp::default());
    let (writer, writer_task) =
        AuditWriter::spawn(audit.clone(), abort.clone(), Arc::clone(&metrics));
    let (lookups, lookup_task) =
        FinalLookups::spawn(audit.clone(), abort.clone(), Arc::clone(&metrics));
    let folds = fold::spawn(&audit, stop.clone());
    let dead_letters = DeadLetters::new(cfg.amqp.clone());
    let parking = Parking::new(cfg.amqp.clone());
    let (holds, released) = Holds::new(Arc::clone(&metrics));
    let holds = Arc::new(holds);
    let mover = tokio::spawn(mover::run(
        parking.clone(),
        Arc::clone(&holds),
        released,
        stop.clone(),
    ));
    let pipeline: Arc<LivePipeline> = Arc::new(Pipeline {
        dispatcher: Dispatcher::new(
            client,
            policy,
            Limits {
                concurrency: cfg.concurrency,
                control: cfg.concurrency_control,
                rate_limit: cfg.rate_limit,
            },
            Arc::clone(&metrics),
            holds,
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
            parking: parking.clone(),
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

    let last = supervise(
        Supervised {
            cfg: &cfg,
            pipeline: &pipeline,
            credits: &credits,
            tasks: &tasks,
            broker_up: &broker_up,
            dead_letters: &dead_letters,
            parking: &parking,
            metrics: &metrics,
        },
        &stop,
    )
    .await?;

    // Safe point: nothing new starts; wait for what is in flight (bounded
    // by `abort`), then let the writer drain, then close the broker.
    if let Some(s) = &last {
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
    if let Some(s) = &last {
        s.close().await;
    }
    summary.abort();
    mover.abort();
    folds.abort();
    tracing::info!("aom-terminator stopped");
    Ok(())
}

/// Apply the migrations, retrying what may pass. Before the database has
/// answered once, what only a person can fix (credentials, a database that
/// does not exist, TLS) is one line and exit 2 rather than a retry loop.
/// `Ok(false)` if stopped first.
async fn migrate_at_start(
    audit: &Audit,
    cfg: &DaemonConfig,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut backoff = reconnect_backoff();
    let mut failing = Repeats::default();
    let (host, port) = (&cfg.database.host, cfg.database.port);
    loop {
        let error = tokio::select! {
            result = audit.migrate() => match result {
                Ok(()) => {
                    if let Some(n) = failing.ended() {
                        tracing::info!(failed_attempts = n, "the audit database answers; migrations applied");
                    }
                    return Ok(true);
                }
                Err(e) => e,
            },
            () = stop.cancelled() => return Ok(false),
        };
        if let Some(why) = error.needs_a_person() {
            return Err(ConfigError(format!("the audit database at {host}:{port}: {why}")).into());
        }
        match failing.failed() {
            Some(n) => tracing::warn!(
                error.cause_chain = %cause_chain(&error),
                failed_attempts = n,
                "the audit database at {host}:{port} is unavailable; retrying until it answers"
            ),
            None => {
                tracing::debug!(error.cause_chain = %cause_chain(&error), "audit database unavailable")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(30))) => {}
            () = stop.cancelled() => return Ok(false),
        }
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
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
        if !self.pipeline.dispatcher.holds.is_open() {
            return Err("paused: the AOM API refuses the credentials".to_owned());
        }
        Ok(())
    }

    fn notes(&self) -> Vec<String> {
        let held = self.pipeline.dispatcher.holds.held();
        if held.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "projects held (the AOM API refuses the credentials for them; their requests are \
             parked): {}",
            held.join(", ")
        )]
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
