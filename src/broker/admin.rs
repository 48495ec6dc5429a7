//! A short-lived connection for the operator tools (`enqueue`,
//! `dead-letters`, `report`'s fallback depth).

use super::topology::{declare_topology, depth};
use super::{BrokerError, call, confirmed, connect};
use crate::settings::AmqpSettings;
use lapin::options::{
    BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};

/// A short-lived connection for the operator tools: one confirm-mode
/// channel to take messages from a queue and publish to another.
pub struct Admin {
    connection: Connection,
    channel: Channel,
}

/// A message taken from a queue; unacked until `ack`, and returned to the
/// queue when the `Admin` closes.
pub struct Taken {
    pub body: Vec<u8>,
    pub headers: std::collections::BTreeMap<String, String>,
    /// When it was published (the AMQP `timestamp` property, Unix seconds),
    /// if its publisher said.
    pub timestamp: Option<u64>,
    acker: lapin::Acker,
}

impl Taken {
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.acker
            .ack(BasicAckOptions { multiple: false })
            .await
            .map(|_| ())
            .map_err(call("ack a message"))
    }
}

impl Admin {
    pub async fn open(s: &AmqpSettings) -> Result<Self, BrokerError> {
        let connection = connect(s, "aom-terminator-admin").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(call("open a channel"))?;
        declare_topology(&channel, s).await?;
        channel
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await
            .map_err(call("enable publisher confirms"))?;
        Ok(Self {
            connection,
            channel,
        })
    }

    /// The next ready message of `queue`, if any, held unacked.
    pub async fn take(&self, queue: &str) -> Result<Option<Taken>, BrokerError> {
        let got = self
            .channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(call("take a message"))?;
        Ok(got.map(|m| {
            let d = m.delivery;
            let headers = d
                .properties
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .map(|(k, v)| (k.to_string(), header_text(v)))
                        .collect()
                })
                .unwrap_or_default();
            Taken {
                timestamp: *d.properties.timestamp(),
                body: d.data,
                headers,
                acker: d.acker,
            }
        }))
    }

    /// Publish a persistent message to `queue` and wait for the broker's
    /// confirm; an unroutable message is an error, not a silent drop. It
    /// carries its publication time, from which `audit prune` tells the
    /// age of the queue's oldest message.
    pub async fn publish(&self, queue: &str, body: &[u8]) -> Result<(), BrokerError> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_timestamp(now_unix()),
            )
            .await
            .map_err(call("publish"))?
            .await
            .map_err(call("await the publisher confirm"))?;
        confirmed(confirm)
    }

    /// Messages ready in `queue` (AMQP cannot tell the unacked ones).
    pub async fn depth(&self, queue: &str) -> Option<u32> {
        depth(&self.channel, queue).await
    }

    /// Delete `queue` with whatever it holds; returns how many messages it
    /// held. A queue that does not exist is not an error.
    pub async fn delete_queue(&self, queue: &str) -> Result<u32, BrokerError> {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .map_err(call("delete a queue"))
    }

    /// Close; messages taken and not acked return to their queue.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

pub(super) fn header_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// Now, in Unix seconds (0 for a clock before 1970).
fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
