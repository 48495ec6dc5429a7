//! One broker session: a connection with a channel to consume on and one
//! to publish dead letters on, opened afresh after every connection loss.

use super::acks::{AckHandle, Acks};
use super::topology::{declare_topology, depth};
use super::{BrokerError, call, connect};
use crate::domain::Message;
use crate::settings::AmqpSettings;
use crate::telemetry::cause_chain;
use futures_util::Stream;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::time::Duration;

/// A delivered message: plain data, and the handle that acks it.
pub struct Incoming {
    pub message: Message,
    pub ack: AckHandle,
}

/// A live connection with one channel to consume on and one to publish
/// dead letters on.
pub struct Session {
    connection: Connection,
    consume: Channel,
    publish: Channel,
    consumer_tag: String,
    acks: Acks,
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
        Ok(Self {
            connection,
            consume,
            publish,
            // Random suffix: two daemons (or two sessions) never collide.
            consumer_tag: format!("aom-terminator-{suffix}"),
            acks: Acks::spawn(),
        })
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
        Ok(futures_util::StreamExt::map(consumer, move |d| {
            d.map(|d| Incoming {
                message: Message {
                    message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
                    redelivered: d.redelivered,
                    body: d.data,
                },
                ack: AckHandle::new(d.delivery_tag, d.acker, acks.clone()),
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
        self.connection.status().connected() && self.consume.status().connected()
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
