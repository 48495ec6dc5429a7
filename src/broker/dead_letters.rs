//! Dead letters (and parked requests), published with confirms on whatever
//! publish channel is current: the daemon attaches each new session's
//! channel after a reconnect, and a publish in progress waits for it.

use super::session::Session;
use super::topology::{declare_topology, text};
use super::{BrokerError, call, confirmed};
use crate::domain::{DeadLetter, Header};
use crate::settings::AmqpSettings;
use crate::telemetry::cause_chain;
use backon::{ExponentialBuilder, Retryable};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct DeadLetters {
    pub(super) channel: Arc<watch::Sender<Option<Channel>>>,
    pub(super) settings: AmqpSettings,
    /// Where the letters go: the dead-letter queue, or the parking queue.
    queue: String,
}

impl DeadLetters {
    /// A publisher to the dead-letter queue.
    pub fn new(settings: AmqpSettings) -> Self {
        let queue = settings.dead_letter_queue.clone();
        Self::to(settings, queue)
    }

    /// A publisher to `queue`, one of the daemon's queues.
    pub(super) fn to(settings: AmqpSettings, queue: String) -> Self {
        Self {
            channel: Arc::new(watch::Sender::new(None)),
            settings,
            queue,
        }
    }

    /// Publish on `session` from now on.
    pub fn attach(&self, session: &Session) {
        self.channel.send_replace(Some(session.publish_channel()));
    }

    /// Publish until the broker confirms it, retrying across reconnects;
    /// `false` only if `abort` fires first. A retry waits for its backoff
    /// or for a new session's channel, whichever comes first.
    pub async fn publish(&self, letter: &DeadLetter, abort: &CancellationToken) -> bool {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let channels = Arc::clone(&self.channel);
        let wait = move |delay: Duration| {
            let mut next = channels.subscribe();
            async move {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = next.changed() => {}
                }
            }
        };
        let attempt = || async {
            let channel = self.channel.borrow().clone();
            match channel {
                Some(channel) => self.publish_once(&channel, letter).await,
                None => Err(BrokerError::NoSession),
            }
        };
        let published = attempt
            .retry(backoff)
            .sleep(wait)
            .notify(|e: &BrokerError, _| {
                tracing::warn!(
                    error.cause_chain = %cause_chain(e),
                    queue = %self.queue,
                    "publish failed; retrying"
                );
            });
        tokio::select! {
            biased;
            result = published => result.is_ok(),
            () = abort.cancelled() => false,
        }
    }

    async fn publish_once(
        &self,
        channel: &Channel,
        letter: &DeadLetter,
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        for (name, value) in &letter.headers {
            let value = match value {
                Header::Text(s) => text(s),
                Header::Int(n) => AMQPValue::LongLongInt(*n),
            };
            headers.insert(ShortString::from(*name), value);
        }
        let properties = BasicProperties::default()
            .with_content_type(letter.content_type.into())
            .with_delivery_mode(2) // persistent
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                // Mandatory: an unroutable dead letter (queue deleted) comes
                // back instead of vanishing.
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &letter.body,
                properties,
            )
            .await
            .map_err(call("publish a dead letter"))?
            .await
            .map_err(call("await the publisher confirm"))?;
        if matches!(confirm, Confirmation::Ack(Some(_))) {
            // The queue was missing: declare the queues again so the
            // next try can land.
            declare_topology(channel, &self.settings).await?;
        }
        confirmed(confirm)
    }
}
