//! The parking queue: where the requests of a held project wait (a 401
//! for that project alone), durably, without taking the prefetch window
//! from the other projects.
//!
//! A request is parked with a confirm before the message it came from is
//! acked, and moved back with a confirm before its parked copy is acked: a
//! crash in between repeats a request (the audit's dedupe skips a repeat of
//! one already final), never loses one.

use super::admin::header_text;
use super::dead_letters::DeadLetters;
use super::session::Session;
use super::{BrokerError, call, confirmed};
use crate::domain::{DeadLetter, PARKED_PROJECT};
use crate::settings::AmqpSettings;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use tokio_util::sync::CancellationToken;

/// What one pass over the parking queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Sent back to the request queue.
    pub back: u64,
    /// Still held: put back at the tail of the parking queue.
    pub kept: u64,
}

#[derive(Clone)]
pub struct Parking {
    letters: DeadLetters,
}

impl Parking {
    pub fn new(settings: AmqpSettings) -> Self {
        let queue = settings.parking_queue.clone();
        Self {
            letters: DeadLetters::to(settings, queue),
        }
    }

    /// Publish on `session` from now on.
    pub fn attach(&self, session: &Session) {
        self.letters.attach(session);
    }

    /// Park a request until the broker confirms it (retrying across
    /// reconnects); `false` only if `abort` fires first.
    pub async fn park(&self, letter: &DeadLetter, abort: &CancellationToken) -> bool {
        self.letters.publish(letter, abort).await
    }

    /// One pass over the parked requests (those there when it starts):
    /// each whose project `stays` says is still held goes back to the
    /// tail of the parking queue, the others to the request queue.
    pub async fn move_back(&self, stays: impl Fn(&str) -> bool) -> Result<Moved, BrokerError> {
        let channel = self
            .letters
            .channel
            .borrow()
            .clone()
            .ok_or(BrokerError::NoSession)?;
        let settings = &self.letters.settings;
        let parked = settings.parking_queue.as_str();
        let mut moved = Moved::default();
        // The pass's length, from the first get's count of what is left: a
        // request kept goes to the tail, and must not be seen twice.
        let mut left: Option<u32> = None;
        while left != Some(0) {
            let Some(got) = channel
                .basic_get(parked.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(call("take a parked request"))?
            else {
                break;
            };
            let remaining = left.get_or_insert(got.message_count.saturating_add(1));
            *remaining -= 1;
            let d = got.delivery;
            let project = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(PARKED_PROJECT).map(header_text));
            // A message without the header (put there by hand) goes back:
            // the request queue's own rules then judge it.
            let keep = project.as_deref().is_some_and(&stays);
            let target = if keep {
                parked
            } else {
                settings.queue.as_str()
            };
            let published = async {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        target.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &d.data,
                        d.properties.clone().with_delivery_mode(2),
                    )
                    .await
                    .map_err(call("move a parked request"))?
                    .await
                    .map_err(call("await the publisher confirm"))?;
                confirmed(confirm)
            };
            if let Err(e) = published.await {
                // Not moved: it stays parked, in its place.
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
                return Err(e);
            }
            d.acker
                .ack(BasicAckOptions { multiple: false })
                .await
                .map_err(call("ack a moved parked request"))?;
            if keep {
                moved.kept += 1;
            } else {
                moved.back += 1;
            }
        }
        Ok(moved)
    }
}
