//! One message, start to settled: parse, skip what is already final,
//! dispatch the rest, dead-letter what must be, commit every outcome, and
//! say whether the message may be acked. The daemon acks it.
//!
//! The order is what makes "nothing lost" hold: a dead letter is confirmed
//! before its outcome is committed, and a message is settled only after
//! every request in it has its outcome committed. A crash between steps
//! repeats a step (a dead letter, an API call), never skips one.
//!
//! The pipeline reaches the audit and the dead-letter queue through two
//! small traits, [`Store`] and [`Letters`], so that its rules can be tested
//! without a broker or a database (see `daemon::tests`).

use super::dispatch::{Api, Dispatcher, End};
use super::in_flight::{Claim, InFlight, follow};
use crate::audit::{FinalRecord, Record, Recorded, UnfinishedRecord};
use crate::domain::{
    Attempt, DeadLetter, Item, Message, Outcome, ParsedMessage, Rejection, TerminationRequest,
};
use crate::metrics::Metrics;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What the pipeline needs of the audit. Each call retries until it
/// succeeds or the shutdown grace runs out (then `false` or `None`).
pub trait Store: Send + Sync + 'static {
    /// Commit one record; `true` once it is committed.
    fn commit(&self, record: Record) -> impl Future<Output = bool> + Send;
    /// The ids among `ids` with a final outcome other than `rejected`.
    fn already_final(
        &self,
        ids: Vec<String>,
    ) -> impl Future<Output = Option<HashSet<String>>> + Send;
    /// What each of `ids` already has on record (attempts, throttling).
    fn attempts_recorded(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Option<HashMap<String, Recorded>>> + Send;
}

/// What the pipeline needs of the dead-letter and parking queues.
pub trait Letters: Send + Sync + 'static {
    /// Park a request of a held project until the broker confirms it;
    /// `false` as for [`Letters::publish`].
    fn park(
        &self,
        letter: &DeadLetter,
        held: &CancellationToken,
    ) -> impl Future<Output = bool> + Send;

    /// Publish until the broker confirms it; `false` if the shutdown grace
    /// runs out first, or at once when `held` fires (the message the letter
    /// comes from is back in the queue: its redelivery will do it again).
    fn publish(
        &self,
        letter: &DeadLetter,
        held: &CancellationToken,
    ) -> impl Future<Output = bool> + Send;
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Every request in it has its outcome committed: ack it.
    Settled,
    /// Something is not committed (shutdown, the broker took the message
    /// back, a dead letter not confirmed): leave it unacked, and the broker
    /// redelivers it.
    Unsettled,
}

pub struct Pipeline<S, L, A> {
    pub dispatcher: Dispatcher<A>,
    pub store: S,
    pub letters: L,
    pub in_flight: InFlight,
    pub concurrency: usize,
    pub source_queue: String,
    pub metrics: Arc<Metrics>,
}

/// What the message is, for every record made from it.
struct Context<'a> {
    message: &'a Message,
    received_at: DateTime<Utc>,
    /// Fires when the broker has taken the message back.
    held: &'a CancellationToken,
}

impl<S: Store, L: Letters, A: Api> Pipeline<S, L, A> {
    /// Take one message as far as it can go. `held` fires when the broker
    /// takes the message back (its session was lost): from then on no
    /// request of it starts; calls already made finish and are recorded.
    pub async fn handle(
        &self,
        message: &Message,
        parsed: ParsedMessage,
        held: &CancellationToken,
    ) -> Handled {
        let cx = Context {
            message,
            received_at: Utc::now(),
            held,
        };
        let complete = match parsed {
            ParsedMessage::Unreadable(rejection) => {
                tracing::warn!(
                    request_id = %rejection.request_id,
                    error = %rejection.error,
                    "rejected an unreadable message"
                );
                let letter = DeadLetter::rejected(
                    &message.source(),
                    &[(0, &rejection)],
                    Some(&rejection.error),
                );
                Box::pin(self.reject(&cx, letter, vec![rejection])).await
            }
            ParsedMessage::Requests(items) => {
                let mut valid = Vec::with_capacity(items.len());
                let mut invalid = Vec::new();
                for (index, item) in items.into_iter().enumerate() {
                    match item {
                        Item::Valid(r) => valid.push(r),
                        Item::Invalid(r) => invalid.push((index, r)),
                    }
                }
                let rejected_ok = invalid.is_empty() || {
                    for (index, r) in &invalid {
                        tracing::warn!(
                            request_id = %r.request_id,
                            workflow_id = r.workflow_id.as_deref().unwrap_or(""),
                            execution_id = r.execution_id.as_deref().unwrap_or(""),
                            index,
                            error = %r.error,
                            "rejected a request"
                        );
                    }
                    let refs: Vec<_> = invalid.iter().map(|(i, r)| (*i, r)).collect();
                    let letter = DeadLetter::rejected(&message.source(), &refs, None);
                    let invalid = invalid.into_iter().map(|(_, r)| r).collect();
                    Box::pin(self.reject(&cx, letter, invalid)).await
                };
                let valid_ok = self.run(&cx, valid).await;
                rejected_ok && valid_ok
            }
        };
        if complete {
            Handled::Settled
        } else {
            Handled::Unsettled
        }
    }

    /// Dead-letter the raw message (confirmed), then record each rejection.
    async fn reject(&self, cx: &Context<'_>, letter: DeadLetter, rejected: Vec<Rejection>) -> bool {
        if !self.letters.publish(&letter, cx.held).await {
            return false;
        }
        let finished_at = Utc::now();
        let commits = rejected.into_iter().map(|r| {
            self.store.commit(Record::Final(Box::new(FinalRecord {
                request_id: r.request_id,
                project_id: r.project_id,
                workflow_id: r.workflow_id,
                execution_id: r.execution_id,
                outcome: Outcome::Rejected,
                http_status: None,
                error_code: Some("invalid_request".to_owned()),
                error_msg: Some(r.error),
                attempts: Vec::new(),
                attempts_before: 0,
                reason: r.reason,
                requested_by: r.requested_by,
                received_at: cx.received_at,
                finished_at,
                redelivered: cx.message.redelivered,
                message_id: cx.message.message_id.clone(),
                replay_of: r.replay_of,
                campaign_id: r.campaign_id,
            })))
        });
        let committed = futures_util::future::join_all(commits).await;
        let ok = committed.iter().filter(|ok| **ok).count();
        self.metrics.finished(Outcome::Rejected, ok as u64);
        ok == committed.len()
    }

    /// The valid requests of one message, at most `concurrency` at a time
    /// from this message (the global call limit is the dispatcher's).
    async fn run(&self, cx: &Context<'_>, requests: Vec<TerminationRequest>) -> bool {
        if requests.is_empty() {
            return true;
        }
        // Claim first, look up second (in `one`, just before the call): a
        // request that finishes between the two is then either still claimed
        // (we follow it) or committed (the lookup sees it). The other order
        // could send it twice.
        let mut claims: Vec<Claim<'_>> = requests
            .iter()
            .map(|r| self.in_flight.claim(&r.request_id))
            .collect();
        // Only a redelivery can have attempts on record from before.
        let recorded = if cx.message.redelivered {
            let leading: Vec<String> = requests
                .iter()
                .zip(&claims)
                .filter(|(_, c)| matches!(c, Claim::Leader(_)))
                .map(|(r, _)| r.request_id.clone())
                .collect();
            match self.store.attempts_recorded(&leading).await {
                Some(recorded) => recorded,
                None => return false,
            }
        } else {
            HashMap::new()
        };
        let before =
            |req: &TerminationRequest| recorded.get(&req.request_id).copied().unwrap_or_default();
        if let [req] = requests.as_slice()
            && let Some(claim) = claims.pop()
        {
            // One request (most messages): no need for the machinery below.
            return self.one(cx, req, claim, before(req)).await;
        }
        // A hand-rolled buffer_unordered: futures are created only as slots
        // free up, so a batch of 10,000 holds `concurrency` of them at once.
        // Once the broker has taken the message back, no more start.
        let mut queue = requests.iter().zip(claims);
        let mut running = FuturesUnordered::new();
        let mut all_done = true;
        loop {
            while running.len() < self.concurrency && !cx.held.is_cancelled() {
                let Some((req, claim)) = queue.next() else {
                    break;
                };
                running.push(self.one(cx, req, claim, before(req)));
            }
            match running.next().await {
                Some(done) => all_done &= done,
                None => return all_done && queue.next().is_none(),
            }
        }
    }

    async fn one(
        &self,
        cx: &Context<'_>,
        req: &TerminationRequest,
        claim: Claim<'_>,
        before: Recorded,
    ) -> bool {
        let attempts_before = before.attempts;
        let skip = || async {
            let committed = self
                .store
                .commit(Record::Skipped {
                    request_id: req.request_id.clone(),
                })
                .await;
            if committed {
                self.metrics.skipped_redelivery();
            }
            committed
        };
        let leader = match claim {
            Claim::Follower(rx) => {
                // Someone else is sending this request_id right now.
                return if follow(rx).await {
                    tracing::debug!(request_id = %req.request_id, "duplicate in flight; not sent again");
                    skip().await
                } else {
                    false
                };
            }
            Claim::Leader(leader) => leader,
        };
        // Looked up just before the call, not once per message: another
        // daemon may have finished this request since the message arrived
        // (a redelivery after a broker cut). Lookups of requests about to
        // start together are answered by one query.
        let Some(finals) = self.store.already_final(vec![req.request_id.clone()]).await else {
            leader.finish(false);
            return false;
        };
        if finals.contains(&req.request_id) {
            tracing::debug!(request_id = %req.request_id, "already final; not sent again");
            let committed = skip().await;
            leader.finish(committed);
            return committed;
        }
        let dispatched = self
            .dispatcher
            .dispatch(req, cx.held, before.throttled_since)
            .await;
        let unfinished = |attempts: Vec<Attempt>| async move {
            // The calls were made: the audit shows them, and a redelivery
            // numbers its attempts after them.
            if !attempts.is_empty() {
                self.store
                    .commit(Record::Unfinished(Box::new(UnfinishedRecord {
                        request_id: req.request_id.clone(),
                        project_id: Some(req.project_id.to_string()),
                        workflow_id: Some(req.workflow_id.to_string()),
                        requested_by: req.requested_by.clone(),
                        campaign_id: req.campaign_id.clone(),
                        attempts_before,
                        attempts,
                    })))
                    .await;
            }
            false
        };
        let outcome = match dispatched.end {
            End::Final(outcome) => outcome,
            End::Unfinished => {
                // Recorded before the claim is let go, so that a redelivery
                // finds these attempts (and when throttling began).
                let settled = unfinished(dispatched.attempts).await;
                leader.finish(false);
                return settled;
            }
            End::Parked => {
                // Its project is held: parked (confirmed) before its message
                // is acked, moved back when the project is released. A copy
                // in flight meanwhile is settled by the parked one.
                let letter = DeadLetter::parked(
                    &cx.message.source(),
                    req,
                    "the AOM API refuses the credentials for this project",
                );
                if !Box::pin(self.letters.park(&letter, cx.held)).await {
                    let settled = unfinished(dispatched.attempts).await;
                    leader.finish(false);
                    return settled;
                }
                self.metrics.parked();
                unfinished(dispatched.attempts).await;
                leader.finish(true);
                return true;
            }
            End::Rejected(why) => {
                let mut record = final_record(
                    cx,
                    req,
                    Outcome::Rejected,
                    attempts_before,
                    dispatched.attempts,
                );
                record.error_code = Some("unroutable".to_owned());
                record.error_msg = Some(why);
                log_outcome(&record);
                let committed = self.store.commit(Record::Final(Box::new(record))).await;
                if committed {
                    self.metrics.finished(Outcome::Rejected, 1);
                }
                leader.finish(committed);
                return committed;
            }
        };
        if outcome == Outcome::FailedRetriesExhausted {
            let letter = DeadLetter::exhausted(
                &cx.message.source(),
                req,
                &dispatched.attempts,
                &self.source_queue,
            );
            if !Box::pin(self.letters.publish(&letter, cx.held)).await {
                let settled = unfinished(dispatched.attempts).await;
                leader.finish(false);
                return settled;
            }
        }
        let record = final_record(cx, req, outcome, attempts_before, dispatched.attempts);
        log_outcome(&record);
        let committed = self.store.commit(Record::Final(Box::new(record))).await;
        if committed {
            self.metrics.finished(outcome, 1);
        }
        leader.finish(committed);
        committed
    }
}

fn final_record(
    cx: &Context<'_>,
    req: &TerminationRequest,
    outcome: Outcome,
    attempts_before: u32,
    attempts: Vec<Attempt>,
) -> FinalRecord {
    let last = attempts.last();
    FinalRecord {
        request_id: req.request_id.clone(),
        project_id: Some(req.project_id.to_string()),
        workflow_id: Some(req.workflow_id.to_string()),
        execution_id: Some(req.execution_id.to_string()),
        outcome,
        http_status: last.and_then(|a| a.http_status),
        error_code: last.and_then(|a| a.error_code.clone()),
        error_msg: last.and_then(|a| a.error_msg.clone()),
        attempts_before,
        reason: req.reason.clone(),
        requested_by: req.requested_by.clone(),
        received_at: cx.received_at,
        finished_at: Utc::now(),
        redelivered: cx.message.redelivered,
        message_id: cx.message.message_id.clone(),
        replay_of: req.replay_of.clone(),
        campaign_id: req.campaign_id.clone(),
        attempts,
    }
}

fn log_outcome(r: &FinalRecord) {
    let kind = r
        .attempts
        .last()
        .and_then(|a| a.error_kind)
        .map(|k| k.as_str());
    macro_rules! emit {
        ($level:ident) => {
            tracing::$level!(
                request_id = %r.request_id,
                workflow_id = r.workflow_id.as_deref().unwrap_or(""),
                execution_id = r.execution_id.as_deref().unwrap_or(""),
                outcome = %r.outcome,
                http_status = r.http_status,
                error_kind = kind,
                error_code = r.error_code.as_deref(),
                attempts = r.attempts.len(),
                "request finished"
            )
        };
    }
    match r.outcome {
        Outcome::Succeeded => emit!(debug),
        _ => emit!(info),
    }
}
