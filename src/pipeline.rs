//! One message, start to ack: parse, skip what is already final, dispatch
//! the rest, dead-letter what must be, commit every outcome, then ack.
//!
//! The order is what makes "nothing lost" hold: a dead letter is confirmed
//! before its outcome is committed, and a message is acked only after every
//! request in it has its outcome committed. A crash between steps repeats a
//! step (a dead letter, an API call), never skips one.

use crate::audit::{Audit, AuditWriter, FinalLookups, FinalRecord, Record};
use crate::broker::{DeadLetter, DeadLetters, Header, Incoming};
use crate::dispatch::Dispatcher;
use crate::domain::{Item, Outcome, ParsedMessage, Rejection, TerminationRequest, truncate};
use crate::observe::{Metrics, OutcomeLabel};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A rejection header longer than this is cut (AMQP headers must fit in a frame).
const MAX_REJECTION_HEADER: usize = 16 * 1024;

pub struct Pipeline {
    pub dispatcher: Dispatcher,
    pub writer: AuditWriter,
    pub lookups: FinalLookups,
    pub audit: Audit,
    pub dead_letters: DeadLetters,
    pub in_flight: InFlight,
    pub concurrency: usize,
    pub source_queue: String,
    pub abort: CancellationToken,
    pub metrics: std::sync::Arc<Metrics>,
}

/// What the message is, for every record made from it.
struct Context<'a> {
    message: &'a Incoming,
    received_at: DateTime<Utc>,
}

impl Pipeline {
    /// Handle one message; ack it if every request in it reached a
    /// committed outcome. Returns whether it was settled for acking.
    pub async fn handle(&self, message: Incoming, parsed: ParsedMessage) -> bool {
        let cx = Context {
            message: &message,
            received_at: Utc::now(),
        };
        let complete = match parsed {
            ParsedMessage::Unreadable(rejection) => {
                tracing::warn!(
                    request_id = %rejection.request_id,
                    error = %rejection.error,
                    "rejected an unreadable message"
                );
                let letter = rejected_letter(&cx, &[(0, &rejection)], Some(&rejection.error));
                self.reject(&cx, letter, vec![rejection]).await
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
                let rejected_ok = if invalid.is_empty() {
                    true
                } else {
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
                    let letter = rejected_letter(&cx, &refs, None);
                    self.reject(&cx, letter, invalid.into_iter().map(|(_, r)| r).collect())
                        .await
                };
                let valid_ok = self.run(&cx, valid).await;
                rejected_ok && valid_ok
            }
        };
        if complete {
            message.ack();
            true
        } else {
            tracing::info!(
                message_id = message.message_id.as_deref().unwrap_or(""),
                "message left unacked (shutdown); the broker will redeliver it"
            );
            false
        }
    }

    /// Dead-letter the raw message (confirmed), then record each rejection.
    async fn reject(&self, cx: &Context<'_>, letter: DeadLetter, rejected: Vec<Rejection>) -> bool {
        if !self.dead_letters.publish(&letter, &self.abort).await {
            return false;
        }
        let finished_at = Utc::now();
        let commits = rejected.into_iter().map(|r| {
            self.writer.commit(Record::Final(Box::new(FinalRecord {
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
            })))
        });
        let committed = futures_util::future::join_all(commits).await;
        let ok = committed.iter().filter(|ok| **ok).count();
        self.count(Outcome::Rejected, ok as u64);
        ok == committed.len()
    }

    /// The valid requests of one message, at most `concurrency` at a time
    /// from this message (the global call limit is the dispatcher's).
    async fn run(&self, cx: &Context<'_>, requests: Vec<TerminationRequest>) -> bool {
        if requests.is_empty() {
            return true;
        }
        // Claim first, look up second: a request that finishes between the
        // two is then either still claimed (we follow it) or committed (the
        // lookup sees it). The other order could send it twice.
        let mut claims: Vec<Claim<'_>> = requests
            .iter()
            .map(|r| self.in_flight.claim(&r.request_id))
            .collect();
        let leading: Vec<String> = requests
            .iter()
            .zip(&claims)
            .filter(|(_, c)| matches!(c, Claim::Leader(_)))
            .map(|(r, _)| r.request_id.clone())
            .collect();
        let (finals, before) = match self.lookup(leading, cx.message.redelivered).await {
            Some(found) => found,
            None => return false,
        };
        let prepared = |req: &TerminationRequest| {
            (
                finals.contains(&req.request_id),
                before.get(&req.request_id).copied().unwrap_or(0),
            )
        };
        if let [req] = requests.as_slice()
            && let Some(claim) = claims.pop()
        {
            // One request (most messages): no need for the machinery below.
            let (already_final, attempts_before) = prepared(req);
            return self
                .one(cx, req, claim, already_final, attempts_before)
                .await;
        }
        // A hand-rolled buffer_unordered: futures are created only as slots
        // free up, so a batch of 10,000 holds `concurrency` of them at once.
        let mut queue = requests.iter().zip(claims);
        let mut running = FuturesUnordered::new();
        let mut all_done = true;
        loop {
            while running.len() < self.concurrency {
                let Some((req, claim)) = queue.next() else {
                    break;
                };
                let (already_final, attempts_before) = prepared(req);
                running.push(self.one(cx, req, claim, already_final, attempts_before));
            }
            match running.next().await {
                Some(done) => all_done &= done,
                None => return all_done,
            }
        }
    }

    async fn lookup(
        &self,
        ids: Vec<String>,
        redelivered: bool,
    ) -> Option<(HashSet<String>, HashMap<String, u32>)> {
        if ids.is_empty() {
            return Some(Default::default());
        }
        // Only a redelivery can have attempts on record from before.
        let before = if redelivered {
            self.audit
                .until_done("attempt lookup", &self.abort, || {
                    self.audit.attempts_recorded(&ids)
                })
                .await?
        } else {
            HashMap::new()
        };
        let finals = self.lookups.already_final(ids).await?;
        Some((finals, before))
    }

    async fn one(
        &self,
        cx: &Context<'_>,
        req: &TerminationRequest,
        claim: Claim<'_>,
        already_final: bool,
        attempts_before: u32,
    ) -> bool {
        let skip = || async {
            let committed = self
                .writer
                .commit(Record::Skipped {
                    request_id: req.request_id.clone(),
                })
                .await;
            if committed {
                self.metrics.skipped_redeliveries.inc();
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
        if already_final {
            tracing::debug!(request_id = %req.request_id, "already final; not sent again");
            let committed = skip().await;
            leader.finish(committed);
            return committed;
        }
        let dispatched = self.dispatcher.dispatch(req).await;
        let Some(outcome) = dispatched.outcome else {
            if !dispatched.attempts.is_empty() {
                self.writer
                    .commit(Record::Unfinished {
                        request_id: req.request_id.clone(),
                        attempts_before,
                        attempts: dispatched.attempts,
                    })
                    .await;
            }
            leader.finish(false);
            return false;
        };
        let last = dispatched.attempts.last();
        let record = FinalRecord {
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
            attempts: dispatched.attempts,
        };
        log_outcome(&record);
        if outcome == Outcome::FailedRetriesExhausted {
            let letter = exhausted_letter(cx, req, &record, &self.source_queue);
            if !self.dead_letters.publish(&letter, &self.abort).await {
                leader.finish(false);
                return false;
            }
        }
        let committed = self.writer.commit(Record::Final(Box::new(record))).await;
        if committed {
            self.count(outcome, 1);
        }
        leader.finish(committed);
        committed
    }

    fn count(&self, outcome: Outcome, n: u64) {
        if n > 0 {
            self.metrics
                .requests
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.as_str(),
                })
                .inc_by(n);
        }
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

fn common_headers(cx: &Context<'_>, source_queue: &str) -> Vec<(&'static str, Header)> {
    let mut h = vec![
        ("x-aom-source-queue", Header::Text(source_queue.to_owned())),
        (
            "x-aom-dead-lettered-at",
            Header::Text(Utc::now().to_rfc3339()),
        ),
        (
            "x-aom-redelivered",
            Header::Text(cx.message.redelivered.to_string()),
        ),
    ];
    if let Some(id) = &cx.message.message_id {
        h.push(("x-aom-source-message-id", Header::Text(id.clone())));
    }
    h
}

/// The raw message, with why it (or some of its elements) was rejected.
fn rejected_letter(
    cx: &Context<'_>,
    rejected: &[(usize, &Rejection)],
    whole_message_error: Option<&str>,
) -> DeadLetter {
    let mut headers = vec![("x-aom-outcome", Header::Text("rejected".to_owned()))];
    if let Some(error) = whole_message_error {
        headers.push((
            "x-aom-error",
            Header::Text(truncate(error, 1024).to_owned()),
        ));
    }
    let detail: Vec<_> = rejected
        .iter()
        .map(|(index, r)| {
            serde_json::json!({"index": index, "request_id": r.request_id, "error": r.error})
        })
        .collect();
    let mut detail = serde_json::Value::Array(detail).to_string();
    if detail.len() > MAX_REJECTION_HEADER {
        detail = format!(
            "{}… ({} rejections in all; the audit has each)",
            truncate(&detail, MAX_REJECTION_HEADER),
            rejected.len()
        );
    }
    headers.push(("x-aom-rejections", Header::Text(detail)));
    headers.push(("x-aom-rejected-count", Header::Int(rejected.len() as i64)));
    headers.extend(common_headers(cx, ""));
    DeadLetter {
        body: cx.message.body.clone(),
        content_type: "application/json",
        headers,
    }
}

/// A request whose attempts ran out, as a single-request message that can
/// be sent again as it is.
fn exhausted_letter(
    cx: &Context<'_>,
    req: &TerminationRequest,
    r: &FinalRecord,
    source_queue: &str,
) -> DeadLetter {
    let body = serde_json::json!({
        "request_id": req.request_id,
        "project_id": req.project_id.as_str(),
        "workflow_id": req.workflow_id.as_str(),
        "execution_id": req.execution_id.as_str(),
        "reason": req.reason,
        "requested_by": req.requested_by,
        "replay_of": req.replay_of,
    });
    let last = r.attempts.last();
    let mut headers = vec![
        (
            "x-aom-outcome",
            Header::Text(Outcome::FailedRetriesExhausted.as_str().to_owned()),
        ),
        ("x-aom-request-id", Header::Text(req.request_id.clone())),
        ("x-aom-attempts", Header::Int(r.attempts.len() as i64)),
    ];
    if let Some(status) = r.http_status {
        headers.push(("x-aom-http-status", Header::Int(i64::from(status))));
    }
    if let Some(kind) = last.and_then(|a| a.error_kind) {
        headers.push(("x-aom-error-kind", Header::Text(kind.as_str().to_owned())));
    }
    if let Some(code) = &r.error_code {
        headers.push(("x-aom-error-code", Header::Text(code.clone())));
    }
    if let Some(msg) = &r.error_msg {
        headers.push((
            "x-aom-error-msg",
            Header::Text(truncate(msg, 1024).to_owned()),
        ));
    }
    headers.extend(common_headers(cx, source_queue));
    DeadLetter {
        body: body.to_string().into_bytes(),
        content_type: "application/json",
        headers,
    }
}

/// Request ids being worked on right now, so that one sent by two messages
/// at once is sent once: the second waits for the first one's outcome.
#[derive(Debug, Default)]
pub struct InFlight {
    leaders: Mutex<HashMap<String, watch::Receiver<Option<bool>>>>,
}

pub enum Claim<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Option<bool>>),
}

/// The one working on a request_id. Tells followers whether its outcome
/// was committed; dropping it unfinished tells them "not committed".
pub struct Leader<'a> {
    owner: &'a InFlight,
    request_id: String,
    done: watch::Sender<Option<bool>>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<Option<bool>>>> {
        // Inserts and removes are single calls; a poisoned map is consistent.
        self.leaders.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn claim(&self, request_id: &str) -> Claim<'_> {
        let mut leaders = self.lock();
        if let Some(rx) = leaders.get(request_id) {
            return Claim::Follower(rx.clone());
        }
        let (done, rx) = watch::channel(None);
        leaders.insert(request_id.to_owned(), rx);
        Claim::Leader(Leader {
            owner: self,
            request_id: request_id.to_owned(),
            done,
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader<'_> {
    fn finish(self, committed: bool) {
        self.done.send_replace(Some(committed));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // Publish before unregistering: a newcomer either follows and sees
        // the result, or finds no leader and looks the outcome up.
        if self.done.borrow().is_none() {
            self.done.send_replace(Some(false));
        }
        self.owner.lock().remove(&self.request_id);
    }
}

async fn follow(mut rx: watch::Receiver<Option<bool>>) -> bool {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(false),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_follows_the_first() {
        let in_flight = InFlight::default();
        let Claim::Leader(leader) = in_flight.claim("r1") else {
            panic!("first claim leads")
        };
        let Claim::Follower(rx) = in_flight.claim("r1") else {
            panic!("second claim follows")
        };
        assert!(matches!(in_flight.claim("r2"), Claim::Leader(_)));
        leader.finish(true);
        assert!(follow(rx).await);
        assert!(in_flight.is_empty(), "a finished leader unregisters");
    }

    #[tokio::test]
    async fn an_unfinished_leader_tells_followers_nothing_was_committed() {
        let in_flight = InFlight::default();
        let leader = in_flight.claim("r1");
        let Claim::Follower(rx) = in_flight.claim("r1") else {
            panic!("second claim follows")
        };
        drop(leader);
        assert!(!follow(rx).await);
        assert!(matches!(in_flight.claim("r1"), Claim::Leader(_)));
    }
}
