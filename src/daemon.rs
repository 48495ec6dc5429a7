//! The daemon: wires the parts together, supervises the broker session,
//! and shuts down at a safe point.
//!
//! Shutdown has two steps. `stop` (the signal): no new messages, no new
//! requests; in-flight requests go on. `abort` (`SHUTDOWN_GRACE` later):
//! whatever has not finished is left unacked for the broker to redeliver.

use crate::api::TerminateClient;
use crate::audit::{Audit, AuditWriter, FinalLookups, FlushMetrics};
use crate::broker::{DeadLetters, Session};
use crate::config::DaemonConfig;
use crate::dispatch::Dispatcher;
use crate::domain::ParsedMessage;
use crate::observe::{self, BrokerUp, Metrics, OutcomeLabel, Readiness};
use crate::pipeline::{InFlight, Pipeline};
use crate::retry::RetryPolicy;
use crate::telemetry::cause_chain;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the supervisor checks that the connection is still alive (the
/// heartbeat notices a dead peer; this notices that lapin has noticed).
const LIVENESS_CHECK: Duration = Duration::from_secs(2);

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
    let audit = Audit::new(cfg.database.0.clone(), 10);
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
    let (writer, writer_task) = AuditWriter::spawn(
        audit.clone(),
        abort.clone(),
        FlushMetrics {
            seconds: metrics.audit_write_latency.clone(),
            records: metrics.audit_write_records.clone(),
        },
    );
    let (lookups, lookup_task) =
        FinalLookups::spawn(audit.clone(), abort.clone(), metrics.lookup_latency.clone());
    let (publish_channel, dead_letters) = DeadLetters::new(cfg.amqp.clone());
    let pipeline = Arc::new(Pipeline {
        dispatcher: Dispatcher::new(
            client,
            policy,
            cfg.concurrency,
            cfg.rate_limit,
            Arc::clone(&metrics),
            stop.clone(),
            abort.clone(),
        ),
        writer,
        lookups,
        audit,
        dead_letters,
        in_flight: InFlight::default(),
        concurrency: cfg.concurrency,
        source_queue: cfg.amqp.queue.clone(),
        abort: abort.clone(),
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
            let task = observe::serve(addr, Arc::clone(&metrics), readiness, listener_stop.clone())
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
        publish_channel.send_replace(Some(session.publish_channel()));
        opened += 1;
        if opened > 1 {
            metrics.reconnects.inc();
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
    pipeline: &Arc<Pipeline>,
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
            || !pipeline.audit.wait_healthy(stop).await
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
                    pipeline.metrics.queue_depth.set(i64::from(depth));
                }
            }
            next = deliveries.next() => match next {
                Some(Ok(message)) => {
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
                        pipeline.handle(message, parsed).await
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
    pipeline: Arc<Pipeline>,
    broker: Arc<BrokerUp>,
}

impl Readiness for DaemonReadiness {
    fn ready(&self) -> Result<(), String> {
        if !self.broker.get() {
            return Err("the broker is not connected".to_owned());
        }
        if !self.pipeline.audit.is_healthy() {
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
    let count = |outcome: &'static str| {
        metrics
            .requests
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    };
    let mut last = 0u64;
    let mut tick = tokio::time::interval(EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let succeeded = count("succeeded");
        let failed = count("failed_permanent") + count("failed_retries_exhausted");
        let rejected = count("rejected");
        let done = succeeded + failed + rejected;
        if done != last {
            tracing::info!(
                done,
                succeeded,
                failed,
                rejected,
                rate_per_s = (done - last) as f64 / EVERY.as_secs_f64(),
                in_flight = metrics.in_flight.get(),
                "progress"
            );
            last = done;
        }
    }
}
