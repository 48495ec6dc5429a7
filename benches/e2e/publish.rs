//! The requests, as messages, and the pre-fill that publishes them.

use crate::Bench;
use crate::scenario::Scenario;
use anyhow::{Context, Result, anyhow, bail};
use aom_terminator::domain::{WireRequest, batch_body};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, PublisherConfirm};
use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PROJECT_ID: &str = "0123456789abcdef0123456789abcdef";
const WORKFLOW_ID: &str = "wf-bench";
/// Publishes in flight (not yet confirmed) while pre-filling a queue.
const CONFIRM_WINDOW: usize = 4096;

/// Request `i`'s ids: its request_id and execution_id.
fn ids(i: u64) -> (String, String) {
    (format!("r-{i}"), format!("ex-{i}"))
}

/// The request with these ids, in the library's one wire format.
fn wire<'a>((request_id, execution_id): &'a (String, String)) -> WireRequest<'a> {
    WireRequest {
        request_id,
        project_id: PROJECT_ID,
        workflow_id: WORKFLOW_ID,
        execution_id,
        reason: None,
        requested_by: None,
        replay_of: None,
        region: None,
        campaign_id: None,
    }
}

pub(crate) fn message_bodies(scenario: &Scenario) -> Vec<Vec<u8>> {
    if scenario.batch == 0 {
        (0..scenario.requests)
            .map(|i| wire(&ids(i)).to_body())
            .collect()
    } else {
        (0..scenario.requests)
            .step_by(usize::try_from(scenario.batch).unwrap_or(usize::MAX))
            .map(|first| {
                let last = (first + scenario.batch).min(scenario.requests);
                let ids: Vec<_> = (first..last).map(ids).collect();
                batch_body(ids.iter().map(wire))
            })
            .collect()
    }
}

/// Now, in Unix seconds (the clock Postgres' timestamps use).
pub(crate) fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The pre-fill: how long it took, and when each message was published
/// (Unix seconds, in body order).
pub(crate) struct Published {
    pub(crate) took: Duration,
    pub(crate) at_epoch: Vec<f64>,
}

/// Publish every body (persistent, mandatory) with publisher confirms, up to
/// `CONFIRM_WINDOW` unconfirmed at a time.
pub(crate) async fn publish_all(
    bench: &Bench,
    connection: &Connection,
    queue: &str,
    bodies: &[Vec<u8>],
) -> Result<Published> {
    let channel = connection
        .create_channel()
        .await
        .context("open a publish channel")?;
    channel
        .confirm_select(ConfirmSelectOptions { nowait: false })
        .await
        .context("enable publisher confirms")?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + bench.timeout;
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(CONFIRM_WINDOW);
    let mut at_epoch = Vec::with_capacity(bodies.len());
    for body in bodies {
        at_epoch.push(epoch_now());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .context("publish")?;
        pending.push_back(confirm);
        if pending.len() >= CONFIRM_WINDOW
            && let Some(oldest) = pending.pop_front()
        {
            confirmed(oldest, deadline).await?;
        }
    }
    while let Some(oldest) = pending.pop_front() {
        confirmed(oldest, deadline).await?;
    }
    let took = started.elapsed();
    let _ = channel.close(200, "done".into()).await;
    Ok(Published { took, at_epoch })
}

async fn confirmed(confirm: PublisherConfirm, deadline: tokio::time::Instant) -> Result<()> {
    let confirmation = tokio::time::timeout_at(deadline, confirm)
        .await
        .map_err(|_| anyhow!("timed out waiting for publisher confirms"))?
        .context("await a publisher confirm")?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("a message was returned unroutable"),
        Confirmation::Nack(_) => bail!("the broker nacked a publish"),
        Confirmation::NotRequested => bail!("publisher confirms are not enabled"),
    }
}

/// Messages ready in a queue (passive declare; unacked ones not counted).
pub(crate) async fn queue_depth(
    connection: &Connection,
    queue: &str,
    args: FieldTable,
) -> Result<u32> {
    // A fresh channel: a failed passive declare closes the channel it ran on.
    let channel = connection
        .create_channel()
        .await
        .context("open a channel")?;
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .with_context(|| format!("passive declare of {queue}"))?;
    let _ = channel.close(200, "done".into()).await;
    Ok(q.message_count())
}
