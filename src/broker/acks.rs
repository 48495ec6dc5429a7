//! Acks, coalesced per consume channel: one `basic.ack` with `multiple`
//! for every run of settled messages.

use crate::telemetry::cause_chain;
use lapin::options::BasicAckOptions;
use lapin::types::DeliveryTag;
use std::time::Duration;
use tokio::sync::mpsc;

/// The right to ack one delivered message, on the channel it came from.
/// Dropped without [`AckHandle::ack`], the message stays unacked and the
/// broker redelivers it when the channel closes.
pub struct AckHandle {
    tag: DeliveryTag,
    acker: lapin::Acker,
    acks: mpsc::UnboundedSender<AckCommand>,
}

impl AckHandle {
    pub(super) fn new(
        tag: DeliveryTag,
        acker: lapin::Acker,
        acks: mpsc::UnboundedSender<AckCommand>,
    ) -> Self {
        Self { tag, acker, acks }
    }

    /// Settle the message: it is acked on the channel it came from, soon,
    /// together with its neighbours (see [`Acks`]). If that channel is gone
    /// by then, the broker redelivers it and the audit's dedupe absorbs it.
    pub fn ack(self) {
        let settled = AckCommand::Settled(self.tag, self.acker);
        if self.acks.send(settled).is_err() {
            // The session is gone; its loss is logged once, by the daemon.
            tracing::debug!("could not ack a message (session closed); it will be redelivered");
        }
    }
}

pub(super) enum AckCommand {
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
pub(super) struct Acks {
    sink: mpsc::UnboundedSender<AckCommand>,
}

impl Acks {
    pub(super) fn spawn() -> Self {
        let (sink, commands) = mpsc::unbounded_channel();
        tokio::spawn(coalesce_acks(commands));
        Self { sink }
    }

    pub(super) fn sink(&self) -> mpsc::UnboundedSender<AckCommand> {
        self.sink.clone()
    }

    /// Send every settled ack now and wait until they are handed to the
    /// connection.
    pub(super) async fn flush(&self) {
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
            // A lost channel: the daemon logs the loss once.
            tracing::debug!(
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
