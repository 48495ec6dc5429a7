//! The broker's ceiling: the same messages consumed by a bare consumer that
//! only acks, at the daemon's prefetch; and the held ceiling, the same
//! consumer holding each message for the API's latency first.

use aom_terminator::broker::request_queue_arguments;
use aom_terminator::sandbox::timer_aim;
use aom_terminator::settings::DaemonConfig;

use crate::Bench;
use crate::output::{thousands, thousands_f};
use crate::publish::publish_all;
use crate::scenario::Scenario;
use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::Connection;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Ceiling {
    pub(crate) messages: u64,
    pub(crate) requests: u64,
    pub(crate) elapsed: Duration,
}

impl Ceiling {
    pub(crate) fn msgs_per_s(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
    pub(crate) fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// The ceilings a scenario asks for.
pub(crate) struct Ceilings {
    /// A consumer that does nothing but ack.
    pub(crate) bare: Option<Ceiling>,
    /// The bare consumer again, holding each message for the API latency.
    pub(crate) held: Option<Ceiling>,
}

/// Measure the scenario's ceilings on `queue` (a queue of their own), and
/// print them.
pub(crate) async fn measure_ceilings(
    bench: &Bench,
    connection: &Connection,
    cfg: &DaemonConfig,
    queue: &str,
    bodies: &[Vec<u8>],
    scenario: &Scenario,
) -> Result<Ceilings> {
    let ceiling_at = async |hold: Duration| {
        measure_ceiling(
            bench,
            connection,
            cfg,
            queue,
            bodies,
            scenario.requests,
            hold,
        )
        .await
    };
    let bare = if scenario.ceiling {
        let c = ceiling_at(Duration::ZERO)
            .await
            .context("ceiling measurement")?;
        println!(
            "ceiling: {} msgs consumed and acked in {:.3} s by a bare consumer (prefetch {}): {} msgs/s{}",
            thousands(c.messages),
            c.elapsed.as_secs_f64(),
            cfg.prefetch,
            thousands_f(c.msgs_per_s()),
            if scenario.batch > 0 {
                format!(" = {} requests/s", thousands_f(c.requests_per_s()))
            } else {
                String::new()
            }
        );
        if c.messages < 1_000 {
            println!(
                "ceiling: note: only {} messages; a window this short says little",
                c.messages
            );
        }
        Some(c)
    } else {
        None
    };
    // With an API latency: the same bare consumer, holding each message for
    // the latency in one of CONCURRENCY slots before it acks. Little's law
    // with the broker's own cycle in it: what any consumer with this prefetch
    // and concurrency can reach.
    let held = if scenario.ceiling && scenario.latency_ms > 0 && scenario.batch == 0 {
        let c = ceiling_at(Duration::from_millis(scenario.latency_ms))
            .await
            .context("held ceiling measurement")?;
        println!(
            "held ceiling: a bare consumer that holds each message {} ms in one of {} slots, then acks it (prefetch {}): {} msgs/s",
            scenario.latency_ms,
            cfg.concurrency,
            cfg.prefetch,
            thousands_f(c.msgs_per_s()),
        );
        Some(c)
    } else {
        None
    };
    Ok(Ceilings { bare, held })
}

/// Publish the same messages to a separate queue with the request queue's
/// arguments, then consume them with a consumer that only acks, at the
/// daemon's prefetch: first delivery → last ack.
async fn measure_ceiling(
    bench: &Bench,
    connection: &Connection,
    cfg: &DaemonConfig,
    queue: &str,
    bodies: &[Vec<u8>],
    requests: u64,
    hold: Duration,
) -> Result<Ceiling> {
    let channel = connection
        .create_channel()
        .await
        .context("open a channel")?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            request_queue_arguments(&cfg.amqp),
        )
        .await
        .context("declare the ceiling queue")?;
    publish_all(bench, connection, queue, bodies).await?;
    channel
        .basic_qos(cfg.prefetch, BasicQosOptions { global: false })
        .await
        .context("set the prefetch")?;
    let tag = "aomt-bench-ceiling";
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consume the ceiling queue")?;
    let expected = bodies.len() as u64;
    let deadline = tokio::time::Instant::now() + bench.timeout;
    let mut first = None;
    let mut received = 0_u64;
    let mut acked = 0_u64;
    // Acks are pipelined, as a daemon with many messages in flight acks: a
    // lapin ack resolves once its frame is handed to the connection, and
    // awaiting each before taking the next delivery would measure that round
    // trip instead of the broker.
    let mut acks = FuturesUnordered::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency));
    while acked < expected {
        tokio::select! {
            delivery = consumer.next(), if received < expected => {
                let delivery = delivery
                    .context("the consumer ended")?
                    .context("receive a delivery")?;
                first.get_or_insert_with(Instant::now);
                received += 1;
                let acker = delivery.acker;
                // Held: each message takes one of `CONCURRENCY` slots (in
                // delivery order), keeps it `hold`, then is acked: a daemon
                // whose only cost is the API's latency. The hold is aimed as
                // the sandbox aims its latency (tokio's timer fires ~1 ms late).
                let slots = (hold > Duration::ZERO).then(|| Arc::clone(&slots));
                acks.push(async move {
                    if let Some(slots) = slots {
                        let _slot = slots.acquire_owned().await;
                        let at = tokio::time::Instant::now() + timer_aim(hold);
                        tokio::time::sleep_until(at).await;
                    }
                    acker.ack(BasicAckOptions { multiple: false }).await
                });
            }
            Some(ack) = acks.next() => {
                ack.context("ack")?;
                acked += 1;
            }
            () = tokio::time::sleep_until(deadline) => {
                bail!("timed out after {acked} of {expected} messages");
            }
        }
    }
    let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
    let _ = channel
        .basic_cancel(tag.into(), BasicCancelOptions { nowait: false })
        .await;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .context("delete the ceiling queue")?;
    let _ = channel.close(200, "done".into()).await;
    Ok(Ceiling {
        messages: expected,
        requests,
        elapsed,
    })
}
