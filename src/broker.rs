//! The only file that knows lapin: topology, consuming, acking, and
//! publishing dead letters with publisher confirms.

use crate::config::AmqpSettings;
use crate::telemetry::cause_chain;
use futures_util::Stream;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, DeliveryTag, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to the broker at {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: lapin::Error,
    },
    #[error("broker call failed: {what}")]
    Call {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker did not confirm the publish ({0})")]
    NotConfirmed(&'static str),
}

fn call(what: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |source| BrokerError::Call { what, source }
}

/// Arguments of the request queue, spelled out rather than left to a
/// broker version's defaults: a quorum queue (replicated, durable), whose
/// messages go to the dead-letter queue once delivered `delivery_limit`
/// times (a message that keeps killing consumers must not loop forever;
/// RabbitMQ 3.10 has no default limit, 4.x defaults to 20).
pub fn request_queue_arguments(s: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert(
        "x-dead-letter-routing-key".into(),
        text(&s.dead_letter_queue),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(s.delivery_limit)),
    );
    args
}

/// The dead-letter queue is a durable classic queue. Not a quorum queue:
/// RabbitMQ 4.x gives quorum queues a default delivery limit of 20, and
/// operators inspect dead letters by taking them and putting them back, so
/// a few `dead-letters list` runs would make the broker drop them.
pub fn dead_letter_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("classic"));
    args
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// Declare both queues. Both are routed through the default exchange by
/// name, so no exchange or binding is needed. Idempotent.
pub async fn declare_topology(channel: &Channel, s: &AmqpSettings) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            s.dead_letter_queue.as_str().into(),
            DURABLE,
            dead_letter_queue_arguments(),
        )
        .await
        .map_err(call("declare the dead-letter queue"))?;
    channel
        .queue_declare(s.queue.as_str().into(), DURABLE, request_queue_arguments(s))
        .await
        .map_err(call("declare the request queue"))?;
    Ok(())
}

/// Messages ready in `queue`, by a passive declare (which ignores arguments).
async fn depth(channel: &Channel, queue: &str) -> Option<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..DURABLE
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()
        .map(|q| q.message_count())
}

/// A confirmed, routed publish is the only success.
fn confirmed(confirm: Confirmation) -> Result<(), BrokerError> {
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(BrokerError::NotConfirmed("unroutable")),
        Confirmation::Nack(_) => Err(BrokerError::NotConfirmed("nacked by the broker")),
        Confirmation::NotRequested => Err(BrokerError::NotConfirmed("confirms not enabled")),
    }
}

pub async fn connect(s: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    // No `enable_auto_recover()`: after a connection loss the daemon builds a
    // new connection, channels and consumer itself (see `daemon`), so the
    // delivery tags of a dead channel are never confused with a new one's.
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(s.uri.clone(), props)
        .await
        .map_err(|source| BrokerError::Connect {
            host: s.uri.authority.host.clone(),
            port: s.uri.authority.port,
            source,
        })
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
            d.map(|d| Incoming::new(d, acks.clone()))
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

    pub fn publish_channel(&self) -> Channel {
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

/// A delivered message.
pub struct Incoming {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub redelivered: bool,
    tag: DeliveryTag,
    acker: lapin::Acker,
    acks: mpsc::UnboundedSender<AckCommand>,
}

impl Incoming {
    fn new(d: lapin::message::Delivery, acks: mpsc::UnboundedSender<AckCommand>) -> Self {
        Self {
            message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
            redelivered: d.redelivered,
            body: d.data,
            tag: d.delivery_tag,
            acker: d.acker,
            acks,
        }
    }

    /// Settle the message: it is acked on the channel it came from, soon,
    /// together with its neighbours (see [`Acks`]). If that channel is gone
    /// by then, the broker redelivers it and the audit's dedupe absorbs it.
    pub fn ack(self) {
        let settled = AckCommand::Settled(self.tag, self.acker);
        if self.acks.send(settled).is_err() {
            tracing::warn!("could not ack a message (session closed); it will be redelivered");
        }
    }
}

enum AckCommand {
    Settled(DeliveryTag, lapin::Acker),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Settled messages wait this long at most for the messages delivered
/// before them to settle, before they are acked one by one.
const ACK_HOLD: Duration = Duration::from_millis(5);

/// The acks of one consume channel, coalesced. Delivery tags on a channel
/// are consecutive from 1, and only this daemon's consumer uses the
/// channel; when every message up to tag N is settled, one `basic.ack`
/// with `multiple` acks them all: one frame (and one broker-side settle)
/// per run of messages instead of one per message. A message settled while
/// an earlier one is still being worked on (a long retry, a big batch) is
/// acked on its own after [`ACK_HOLD`], so a slow message never holds the
/// others' prefetch slots. A multiple ack never covers an unsettled tag.
struct Acks {
    sink: mpsc::UnboundedSender<AckCommand>,
}

impl Acks {
    fn spawn() -> Self {
        let (sink, commands) = mpsc::unbounded_channel();
        tokio::spawn(coalesce_acks(commands));
        Self { sink }
    }

    fn sink(&self) -> mpsc::UnboundedSender<AckCommand> {
        self.sink.clone()
    }

    /// Send every settled ack now and wait until they are handed to the
    /// connection.
    async fn flush(&self) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        if self.sink.send(AckCommand::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }
}

async fn coalesce_acks(mut commands: mpsc::UnboundedReceiver<AckCommand>) {
    let mut pending = AckWindow::<lapin::Acker>::default();
    let mut batch = Vec::new();
    loop {
        let hold_expires = pending.oldest().map(|t| t + ACK_HOLD);
        tokio::select! {
            n = commands.recv_many(&mut batch, 4096) => {
                if n == 0 {
                    break;
                }
                // Let the other messages settled by the same audit flush
                // queue up behind this one: they go out in the same ack.
                tokio::task::yield_now().await;
                while let Ok(more) = commands.try_recv() {
                    batch.push(more);
                }
            }
            () = sleep_until_some(hold_expires) => {}
        }
        let mut flushes = Vec::new();
        let now = tokio::time::Instant::now();
        for command in batch.drain(..) {
            match command {
                AckCommand::Settled(tag, acker) => pending.settle(tag, acker, now),
                AckCommand::Flush(done) => flushes.push(done),
            }
        }
        let cutoff = if flushes.is_empty() {
            now.checked_sub(ACK_HOLD)
        } else {
            Some(now)
        };
        // The acks of one round cover disjoint tags, so lapin may send them
        // in any order; the next round waits until these are out, so that
        // a later multiple ack never overtakes a single ack it covers (the
        // broker closes the channel on an ack of an unknown tag).
        send_acks(pending.due(cutoff)).await;
        for done in flushes {
            let _ = done.send(());
        }
    }
    send_acks(pending.due(Some(tokio::time::Instant::now()))).await;
}

async fn send_acks(acks: Vec<(lapin::Acker, bool)>) {
    futures_util::future::join_all(acks.into_iter().map(|(acker, multiple)| async move {
        if let Err(e) = acker.ack(BasicAckOptions { multiple }).await {
            tracing::warn!(
                error.cause_chain = %cause_chain(&e),
                "could not ack (channel lost); the messages will be redelivered"
            );
        }
    }))
    .await;
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Which settled messages of one channel are not acked yet. `A` is what
/// acks a tag (lapin's `Acker`; a plain tag in the tests).
struct AckWindow<A> {
    /// Every tag below this is acked (or was acked on its own).
    next: DeliveryTag,
    /// Settled, not acked yet, with when they settled.
    settled: std::collections::BTreeMap<DeliveryTag, (A, tokio::time::Instant)>,
    /// Above `next`, acked on their own already, as ranges `first → last`.
    /// While one message is stuck at `next` (a long batch), every later one
    /// is acked alone: ranges keep that to a few entries, where a set of
    /// tags would grow with every message until the stuck one settles.
    acked_alone: std::collections::BTreeMap<DeliveryTag, DeliveryTag>,
}

impl<A> Default for AckWindow<A> {
    fn default() -> Self {
        Self {
            // The broker numbers a channel's deliveries from 1.
            next: 1,
            settled: Default::default(),
            acked_alone: Default::default(),
        }
    }
}

impl<A> AckWindow<A> {
    fn settle(&mut self, tag: DeliveryTag, acker: A, at: tokio::time::Instant) {
        self.settled.insert(tag, (acker, at));
    }

    fn oldest(&self) -> Option<tokio::time::Instant> {
        self.settled.values().map(|(_, at)| *at).min()
    }

    /// The acks to send now, `(acker, multiple)`: one multiple ack for the
    /// settled run that starts at the lowest unacked tag, then a single ack
    /// for every message settled at or before `alone_before` that the run
    /// did not reach. They cover disjoint tags.
    fn due(&mut self, alone_before: Option<tokio::time::Instant>) -> Vec<(A, bool)> {
        let mut due = Vec::new();
        let mut run = None;
        loop {
            if let Some((acker, _)) = self.settled.remove(&self.next) {
                run = Some(acker);
                self.next += 1;
            } else if let Some(last) = self.acked_alone.remove(&self.next) {
                self.next = last + 1;
            } else {
                break;
            }
        }
        if let Some(acker) = run {
            due.push((acker, true));
        }
        if let Some(before) = alone_before {
            let late: Vec<DeliveryTag> = self
                .settled
                .iter()
                .filter(|(_, (_, at))| *at <= before)
                .map(|(tag, _)| *tag)
                .collect();
            for tag in late {
                if let Some((acker, _)) = self.settled.remove(&tag) {
                    self.mark_acked_alone(tag);
                    due.push((acker, false));
                }
            }
        }
        due
    }

    /// Record `tag` as acked alone, merged with the ranges on either side.
    fn mark_acked_alone(&mut self, tag: DeliveryTag) {
        let mut first = tag;
        if let Some((&start, &last)) = self.acked_alone.range(..tag).next_back()
            && last + 1 == tag
        {
            first = start;
        }
        let last = self.acked_alone.remove(&(tag + 1)).unwrap_or(tag);
        self.acked_alone.insert(first, last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::time::Instant;

    #[test]
    fn a_settled_run_goes_out_as_one_multiple_ack() {
        let now = Instant::now();
        let mut w = AckWindow::default();
        for tag in [2, 1, 3] {
            w.settle(tag, tag, now);
        }
        assert_eq!(w.due(None), vec![(3, true)]);
        assert_eq!(w.due(None), vec![]);
    }

    #[test]
    fn a_gap_holds_later_tags_until_they_are_due_alone() {
        let now = Instant::now();
        let mut w = AckWindow::default();
        w.settle(1, 1, now);
        w.settle(3, 3, now);
        w.settle(4, 4, now + ACK_HOLD);
        // 2 is still being worked on: 1 goes, 3 and 4 wait.
        assert_eq!(w.due(now.checked_sub(ACK_HOLD)), vec![(1, true)]);
        // 3 has waited long enough; 4 not yet.
        assert_eq!(w.due(Some(now)), vec![(3, false)]);
        // 2 settles: the run 2..=4 passes over 3, already acked.
        w.settle(2, 2, now + ACK_HOLD);
        assert_eq!(w.due(Some(now)), vec![(4, true)]);
        assert!(w.settled.is_empty() && w.acked_alone.is_empty());
    }

    #[test]
    fn a_stuck_message_keeps_the_acked_alone_record_small() {
        let now = Instant::now();
        let mut w = AckWindow::default();
        // Tag 1 never settles; 2..=10_000 settle in rounds, out of order
        // within each, and are acked alone.
        for round in (2..=10_000u64).collect::<Vec<_>>().chunks(50) {
            for &tag in round.iter().rev() {
                w.settle(tag, tag, now);
            }
            let due = w.due(Some(now));
            assert_eq!(due.len(), round.len());
            assert!(due.iter().all(|(_, multiple)| !multiple));
        }
        assert_eq!(w.acked_alone.len(), 1, "{:?}", w.acked_alone);
        // Tag 1 settles at last: the run skips all the ones acked alone.
        w.settle(1, 1, now);
        assert_eq!(w.due(None), vec![(1, true)]);
        assert!(w.settled.is_empty() && w.acked_alone.is_empty());
        w.settle(10_001, 10_001, now);
        assert_eq!(w.due(None), vec![(10_001, true)]);
    }

    proptest! {
        /// Whatever the order and timing of settles: every tag is acked
        /// exactly once, and a multiple ack covers only settled tags.
        #[test]
        fn every_settled_tag_is_acked_once_and_no_unsettled_one(
            order in Just((1..=40u64).collect::<Vec<_>>()).prop_shuffle(),
            never in proptest::collection::btree_set(1..=40u64, 0..4),
            rounds in proptest::collection::vec((1usize..8, any::<bool>()), 1..40),
        ) {
            let start = Instant::now();
            let mut w = AckWindow::default();
            let mut settled = std::collections::BTreeSet::new();
            let mut acked = std::collections::BTreeMap::<u64, u32>::new();
            let mut covered_below = 1u64;
            let mut queue = order.into_iter().filter(|t| !never.contains(t));
            for (round, (n, late)) in rounds.into_iter().enumerate() {
                let at = start + ACK_HOLD * round as u32;
                for tag in queue.by_ref().take(n) {
                    settled.insert(tag);
                    w.settle(tag, tag, at);
                }
                let cutoff = if late { Some(at) } else { None };
                for (tag, multiple) in w.due(cutoff) {
                    if multiple {
                        for t in covered_below..=tag {
                            prop_assert!(settled.contains(&t), "multiple ack covers unsettled {t}");
                            if !acked.contains_key(&t) {
                                *acked.entry(t).or_default() += 1;
                            }
                        }
                        covered_below = tag + 1;
                    } else {
                        prop_assert!(settled.contains(&tag));
                        prop_assert!(tag >= covered_below, "alone ack of a tag already covered");
                        *acked.entry(tag).or_default() += 1;
                    }
                }
            }
            for tag in queue {
                settled.insert(tag);
                w.settle(tag, tag, start);
            }
            let end = start + ACK_HOLD * 100;
            for (tag, multiple) in w.due(Some(end)) {
                if multiple {
                    for t in covered_below..=tag {
                        prop_assert!(settled.contains(&t));
                        acked.entry(t).or_insert(1);
                    }
                    covered_below = tag + 1;
                } else {
                    *acked.entry(tag).or_default() += 1;
                }
            }
            prop_assert_eq!(acked.keys().copied().collect::<std::collections::BTreeSet<_>>(), settled);
            prop_assert!(acked.values().all(|n| *n == 1));
        }
    }
}

/// A header value of a dead letter.
#[derive(Debug, Clone)]
pub enum Header {
    Text(String),
    Int(i64),
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, Header)>,
}

/// Publishes dead letters on whatever publish channel is current: the
/// daemon swaps in a new one after every reconnect.
#[derive(Clone)]
pub struct DeadLetters {
    channel: watch::Receiver<Option<Channel>>,
    settings: AmqpSettings,
}

impl DeadLetters {
    pub fn new(settings: AmqpSettings) -> (watch::Sender<Option<Channel>>, Self) {
        let (tx, rx) = watch::channel(None);
        (
            tx,
            Self {
                channel: rx,
                settings,
            },
        )
    }

    /// Publish until the broker confirms it, retrying across reconnects;
    /// `false` only if `abort` fires first.
    pub async fn publish(&self, letter: &DeadLetter, abort: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        let mut rx = self.channel.clone();
        loop {
            let channel = rx.borrow_and_update().clone();
            if let Some(channel) = channel {
                match self.publish_once(&channel, letter).await {
                    Ok(()) => return true,
                    Err(e) => tracing::warn!(
                        error.cause_chain = %cause_chain(&e),
                        queue = %self.settings.dead_letter_queue,
                        "dead-letter publish failed; retrying"
                    ),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = rx.changed() => {}
                () = abort.cancelled() => return false,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
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
                self.settings.dead_letter_queue.as_str().into(),
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
            // The dead-letter queue was missing: declare it again so the
            // next try can land.
            declare_topology(channel, &self.settings).await?;
        }
        confirmed(confirm)
    }
}

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
                body: d.data,
                headers,
                acker: d.acker,
            }
        }))
    }

    /// Publish a persistent message to `queue` and wait for the broker's
    /// confirm; an unroutable message is an error, not a silent drop.
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
                    .with_delivery_mode(2),
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

    /// Close; messages taken and not acked return to their queue.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn header_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}
