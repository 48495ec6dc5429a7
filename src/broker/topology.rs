//! The queues: declared with every argument spelled out, so that no
//! broker version's defaults decide how they behave.

use super::{BrokerError, call};
use crate::settings::AmqpSettings;
use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};

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

pub(super) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// Declare the three queues. All are routed through the default exchange by
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
    // Classic, like the dead-letter queue, for the same reason: parked
    // requests are taken and put back (a pass of the mover republishes the
    // ones still held), which a quorum queue's delivery limit would count.
    channel
        .queue_declare(
            s.parking_queue.as_str().into(),
            DURABLE,
            dead_letter_queue_arguments(),
        )
        .await
        .map_err(call("declare the parking queue"))?;
    channel
        .queue_declare(s.queue.as_str().into(), DURABLE, request_queue_arguments(s))
        .await
        .map_err(call("declare the request queue"))?;
    Ok(())
}

/// Messages ready in `queue`, by a passive declare (which ignores arguments).
pub(super) async fn depth(channel: &Channel, queue: &str) -> Option<u32> {
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
