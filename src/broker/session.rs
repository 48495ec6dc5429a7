//! One broker session: a connection with a channel to consume on and one
//! to publish dead letters on, opened afresh after every connection loss.

use super::acks::{AckHandle, Acks};
use super::topology::{declare_topology, depth};
use super::{BrokerError, call, connect};
use crate::domain::{Message, PARKED_AT};
use crate::settings::AmqpSettings;
use crate::telemetry::cause_chain;
use futures_util::Stream;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A delivered message: plain data, the handle that acks it, and the
/// session's `lost` token: once it fires, the broker has taken the message
/// back (it goes to another consumer), and no work on it should start.
pub struct Incoming {
    pub message: Message,
    pub ack: AckHandle,
    pub lost: CancellationToken,
}

/// A live connection with one channel to consume on and one to publish
/// dead letters on.
///
/// Losing it is one event: [`Session::lost`] fires the moment lapin reports
/// a connection error, the consumer's stream ends, or the daemon gives the
/// session up, and everything working for it (consuming, waiting for
/// credits, publishing dead letters, the requests of its messages) sees it.
pub struct Session {
    connection: Connection,
    consume: Channel,
    publish: Channel,
    consumer_tag: String,
    acks: Acks,
    lost: CancellationToken,
    /// Why it was lost, as lapin said it (for the one log line).
    cause: Arc<Mutex<Option<String>>>,
}

impl Session {
    pub async fn open(s: &AmqpSettings, prefetch: u16) -> Result<Self, BrokerError> {
        let suffix = format!("{:08x}", fastrand::u32(..));
        let connection = connect(s, &format!("aom-terminator-{suffix}")).await?;
        let consume = connection
            .create_channel()
            .await
            .map_err(call("open the consume channel"))?;
        declare_topology(&consume, s).await?;
        // Per-consumer prefetch (`global: false`): bounds the messages
        // delivered and not yet acked.
        consume
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(call("set the prefetch"))?;
        let publish = connection
            .create_channel()
            .await
            .map_err(call("open the publish channel"))?;
        publish
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await
            .map_err(call("enable publisher confirms"))?;
        let lost = CancellationToken::new();
        let cause = Arc::new(Mutex::new(None));
        tokio::spawn(watch_connection(
            connection.events_listener(),
            lost.clone(),
            Arc::clone(&cause),
        ));
        Ok(Self {
            connection,
            consume,
            publish,
            // Random suffix: two daemons (or two sessions) never collide.
            consumer_tag: format!("aom-terminator-{suffix}"),
            acks: Acks::spawn(),
            lost,
            cause,
        })
    }

    /// Fires once the session is lost; see [`Session`].
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Why the session was lost, if lapin said.
    pub fn cause(&self) -> Option<String> {
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Give the session up: everything working for it stops, and the
    /// connection is closed (bounded), so that the broker takes back every
    /// message delivered on it now rather than when a heartbeat fails.
    pub async fn abandon(&self) {
        self.lost.cancel();
        let close = async {
            if self.connection.status().connected() {
                let _ = self.connection.close(200, "session abandoned".into()).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }

    pub async fn consume(
        &self,
        queue: &str,
    ) -> Result<impl Stream<Item = Result<Incoming, BrokerError>> + use<>, BrokerError> {
        let options = BasicConsumeOptions {
            no_local: false,
            // Manual acks: a message is acked only once all its outcomes are
            // committed in the audit.
            no_ack: false,
            // Competing consumers: other daemons may consume the same queue.
            exclusive: false,
            nowait: false,
        };
        let consumer = self
            .consume
            .basic_consume(
                queue.into(),
                self.consumer_tag.as_str().into(),
                options,
                FieldTable::default(),
            )
            .await
            .map_err(call("start consuming"))?;
        let acks = self.acks.sink();
        let lost = self.lost.clone();
        Ok(futures_util::StreamExt::map(consumer, move |d| {
            d.map(|d| Incoming {
                message: Message {
                    message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
                    // A request moved back from the parking queue may have
                    // had calls made for it (its 401s): as for a redelivery,
                    // the audit is asked for its attempts before.
                    redelivered: d.redelivered
                        || d.properties
                            .headers()
                            .as_ref()
                            .is_some_and(|h| h.inner().contains_key(PARKED_AT)),
                    body: d.data,
                },
                ack: AckHandle::new(d.delivery_tag, d.acker, acks.clone()),
                lost: lost.clone(),
            })
            .map_err(call("receive a delivery"))
        }))
    }

    /// Messages ready in `queue`, or `None` if the broker did not say.
    /// Asked on a channel of its own: a passive declare of a missing queue
    /// closes its channel, and that must never be the consume channel,
    /// whose unacked deliveries would all come back.
    pub async fn queue_depth(&self, queue: &str) -> Option<u32> {
        let probe = self.connection.create_channel().await.ok()?;
        let depth = depth(&probe, queue).await;
        if probe.status().connected() {
            let _ = probe.close(200, "depth probed".into()).await;
        }
        depth
    }

    /// The channel dead letters are published on (see [`super::DeadLetters::attach`]).
    pub(super) fn publish_channel(&self) -> Channel {
        self.publish.clone()
    }

    pub fn is_connected(&self) -> bool {
        !self.lost.is_cancelled()
            && self.connection.status().connected()
            && self.consume.status().connected()
    }

    /// Stop deliveries; what was delivered and is not acked stays with us
    /// until the channel closes.
    pub async fn cancel_consumer(&self) {
        if let Err(e) = self
            .consume
            .basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions { nowait: false },
            )
            .await
        {
            tracing::debug!(error.cause_chain = %cause_chain(&e), "cancelling the consumer failed");
        }
    }

    /// Close cleanly, after the acks already settled have gone out;
    /// unacked messages return to the queue.
    pub async fn close(&self) {
        // Bounded: a broker that stopped reading must not hold up the exit
        // (what is not acked is redelivered, and the audit's dedupe skips it).
        let _ = tokio::time::timeout(Duration::from_secs(5), self.acks.flush()).await;
        for channel in [&self.consume, &self.publish] {
            if channel.status().connected() {
                let _ = channel.close(200, "shutdown".into()).await;
            }
        }
        if self.connection.status().connected() {
            let _ = self.connection.close(200, "shutdown".into()).await;
        }
    }
}

/// Fire `lost` on the first connection error lapin reports, remembering it.
async fn watch_connection(
    events: impl Stream<Item = lapin::Event> + Send + 'static,
    lost: CancellationToken,
    cause: Arc<Mutex<Option<String>>>,
) {
    let mut events = std::pin::pin!(events);
    loop {
        tokio::select! {
            () = lost.cancelled() => return,
            event = futures_util::StreamExt::next(&mut events) => match event {
                Some(lapin::Event::Error(e)) => {
                    *cause.lock().unwrap_or_else(|p| p.into_inner()) = Some(cause_chain(&e));
                    lost.cancel();
                    return;
                }
                Some(_) => {}
                None => {
                    lost.cancel();
                    return;
                }
            },
        }
    }
}
