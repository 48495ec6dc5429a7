//! The broker side of the daemon: open a session, consume on it, and when
//! it is lost, say so once, let its work drain, and open the next.

use super::http::BrokerUp;
use super::{Handled, LivePipeline, reconnect_backoff, work};
use crate::broker::{DeadLetters, Incoming, Parking, Session};
use crate::domain::ParsedMessage;
use crate::metrics::Metrics;
use crate::settings::{ConfigError, DaemonConfig};
use crate::telemetry::{Repeats, cause_chain};
use futures_util::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A session lost sooner than this after it opened is retried with backoff.
const SHORT_SESSION: Duration = Duration::from_secs(2);

/// How often the supervisor checks that the connection is still alive (the
/// heartbeat notices a dead peer; this notices that the broker adapter has).
const LIVENESS_CHECK: Duration = Duration::from_secs(2);

/// What the broker supervision works with.
pub(super) struct Supervised<'a> {
    pub(super) cfg: &'a DaemonConfig,
    pub(super) pipeline: &'a Arc<LivePipeline>,
    pub(super) credits: &'a Arc<Semaphore>,
    pub(super) tasks: &'a TaskTracker,
    pub(super) broker_up: &'a BrokerUp,
    pub(super) dead_letters: &'a DeadLetters,
    pub(super) parking: &'a Parking,
    pub(super) metrics: &'a Metrics,
}

/// Open a broker session and consume on it; when it is lost, say so once,
/// let its work drain in the background and open the next, until `stop`.
/// Returns the session consuming when the stop came (its in-flight work
/// acks on it), or an error a person must fix (before the first session).
pub(super) async fn supervise(
    s: Supervised<'_>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Session>> {
    let Supervised {
        cfg,
        pipeline,
        credits,
        tasks,
        broker_up,
        dead_letters,
        parking,
        metrics,
    } = s;
    let mut reconnect = reconnect_backoff();
    // The session consuming when the stop came: kept open until the work
    // in flight is done, since it acks on it.
    let mut last: Option<Session> = None;
    let mut unavailable = Repeats::default();
    let mut lost_at: Option<Instant> = None;
    let mut ever_opened = false;
    while !stop.is_cancelled() {
        let session = tokio::select! {
            session = Session::open(&cfg.amqp, cfg.prefetch) => session,
            () = stop.cancelled() => break,
        };
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                if !ever_opened && let Some(why) = e.needs_a_person() {
                    let (host, port) = (&cfg.amqp.host, cfg.amqp.port);
                    return Err(ConfigError(format!("the broker at {host}:{port}: {why}")).into());
                }
                let delay = reconnect.next().unwrap_or(Duration::from_secs(30));
                match unavailable.failed() {
                    Some(0) => tracing::warn!(
                        error.cause_chain = %cause_chain(&e),
                        "broker unavailable; retrying until it answers"
                    ),
                    Some(n) => tracing::warn!(
                        error.cause_chain = %cause_chain(&e),
                        failed_attempts = n,
                        "broker still unavailable"
                    ),
                    None => {
                        tracing::debug!(error.cause_chain = %cause_chain(&e), "broker unavailable")
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    () = stop.cancelled() => break,
                }
            }
        };
        unavailable.ended();
        if !ever_opened {
            // Logged once both peers have answered: a start that fails is
            // then the one line of its error.
            tracing::info!(
                queue = %cfg.amqp.queue,
                dead_letter_queue = %cfg.amqp.dead_letter_queue,
                endpoint = %cfg.endpoint,
                auth = cfg.auth.mode(),
                concurrency = cfg.concurrency,
                prefetch = cfg.prefetch,
                metrics_addr = cfg.metrics_addr.map(|a| a.to_string()),
                "aom-terminator running"
            );
        }
        ever_opened = true;
        let opened_at = Instant::now();
        dead_letters.attach(&session);
        parking.attach(&session);
        let tally = Arc::new(Tally::default());
        let session_tasks = TaskTracker::new();
        let ended = consume(
            Consuming {
                session: &session,
                cfg,
                pipeline,
                credits,
                tasks,
                session_tasks: &session_tasks,
                tally: &tally,
                broker_up,
                stop,
            },
            || {
                if let Some(at) = lost_at.take() {
                    tracing::info!(
                        down_s = format!("{:.1}", at.elapsed().as_secs_f64()),
                        "broker connection restored; consuming again"
                    );
                }
            },
        )
        .await;
        if stop.is_cancelled() {
            last = Some(session);
            break;
        }
        // Lost: one event that everything working for the session sees.
        let cause = match (&ended, session.cause()) {
            (_, Some(cause)) => cause,
            (Err(e), None) => cause_chain(e.as_ref()),
            (Ok(()), None) => "the broker ended the consumer".to_owned(),
        };
        session.abandon().await;
        metrics.session_lost();
        metrics.set_queue_depth(None);
        lost_at.get_or_insert_with(Instant::now);
        tracing::warn!(
            error.cause_chain = %cause,
            "lost the broker connection; reconnecting. Its messages go back to the queue: \
             calls in flight finish and are recorded, requests not yet started are not started"
        );
        session_tasks.close();
        tokio::spawn(report_drained(session_tasks, tally));
        if opened_at.elapsed() < SHORT_SESSION {
            // Lost as soon as it was opened (the consumer refused, say):
            // back off, or this would spin.
            let delay = reconnect.next().unwrap_or(Duration::from_secs(30));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => {}
            }
        } else {
            reconnect = reconnect_backoff();
        }
    }

    Ok(last)
}

/// What `consume` works with.
struct Consuming<'a> {
    session: &'a Session,
    cfg: &'a DaemonConfig,
    pipeline: &'a Arc<LivePipeline>,
    credits: &'a Arc<Semaphore>,
    /// Every task, for shutdown; `session_tasks` only this session's.
    tasks: &'a TaskTracker,
    session_tasks: &'a TaskTracker,
    tally: &'a Arc<Tally>,
    broker_up: &'a BrokerUp,
    stop: &'a CancellationToken,
}

/// Take messages until shutdown (`Ok`), or until the session is lost
/// (`Err`, or `Ok` after the stream ended). `registered` runs once the
/// consumer is registered.
async fn consume(
    c: Consuming<'_>,
    registered: impl FnOnce(),
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Consuming {
        session,
        cfg,
        pipeline,
        credits,
        stop,
        ..
    } = c;
    let lost = session.lost();
    let mut deliveries = Box::pin(session.consume(&cfg.amqp.queue).await?);
    c.broker_up.consuming(lost.clone());
    registered();
    let mut liveness = tokio::time::interval(LIVENESS_CHECK);
    loop {
        let incoming = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            () = lost.cancelled() => return Err("the broker connection was lost".into()),
            _ = liveness.tick() => {
                if !session.is_connected() {
                    return Err("the broker connection is gone".into());
                }
                pipeline.metrics.set_queue_depth(session.queue_depth(&cfg.amqp.queue).await);
                continue;
            }
            next = deliveries.next() => match next {
                Some(Ok(incoming)) => incoming,
                Some(Err(e)) => return Err(Box::new(e)),
                None => return Ok(()),
            },
        };
        let Incoming {
            message,
            ack,
            lost: held,
        } = incoming;
        // Parse here, so that the requests held in memory are bounded
        // (PREFETCH_REQUESTS) however big the batches.
        let parsed = ParsedMessage::parse(&message.body, message.message_id.as_deref());
        let wanted = parsed.request_count().clamp(1, cfg.prefetch_requests) as u32;
        // Credits, then the pause (401, a failing audit): the message waits,
        // unstarted, while either holds; losing the session ends the wait.
        let ready = async {
            let credit = Arc::clone(credits).acquire_many_owned(wanted).await.ok()?;
            let open = pipeline.dispatcher.holds.wait_open(stop).await
                && pipeline.store.audit.wait_healthy(stop).await;
            open.then_some(credit)
        };
        let credit = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            () = lost.cancelled() => return Err("the broker connection was lost".into()),
            credit = ready => credit,
        };
        let Some(credit) = credit else {
            return Ok(()); // stopping (the semaphore is never closed)
        };
        let pipeline = Arc::clone(pipeline);
        let tally = Arc::clone(c.tally);
        c.tasks.spawn(c.session_tasks.track_future(async move {
            let _credit = credit;
            // Boxed: the task is moved a few times as it is spawned, and
            // a message's whole future is a few KiB (copied each time).
            let handled = Box::pin(work(&pipeline, message, parsed, ack, &held)).await;
            if held.is_cancelled() {
                tally.after_loss(handled);
            }
        }));
    }
}

/// What became of a lost session's messages, for its one summary line.
#[derive(Debug, Default)]
struct Tally {
    /// Left unacked: back in the queue, their unstarted requests not started.
    released: AtomicU64,
    /// Settled after the loss: their ack went nowhere, so they come back
    /// and are acked without a call (the audit has their outcomes).
    settled: AtomicU64,
}

impl Tally {
    fn after_loss(&self, handled: Handled) {
        let counter = match handled {
            Handled::Unsettled => &self.released,
            Handled::Settled => &self.settled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Once a lost session's work has drained, say what became of it.
async fn report_drained(tasks: TaskTracker, tally: Arc<Tally>) {
    let since = Instant::now();
    tasks.wait().await;
    tracing::info!(
        released_messages = tally.released.load(Ordering::Relaxed),
        settled_after_loss = tally.settled.load(Ordering::Relaxed),
        drained_in_s = format!("{:.1}", since.elapsed().as_secs_f64()),
        "the lost broker session's work has drained"
    );
}
