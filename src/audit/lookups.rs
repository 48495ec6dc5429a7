//! Dedupe lookups: which requests already have a final outcome, and how
//! many attempts a redelivered request already has on record.

use super::{Audit, AuditError};
use crate::metrics::Metrics;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

impl Audit {
    /// The ids among `ids` that already have a final outcome other than
    /// `rejected` (a rejection never blocks a later valid request).
    async fn already_final(
        conn: &mut PgConnection,
        ids: &[&str],
    ) -> Result<HashSet<String>, AuditError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT request_id FROM termination_outcomes \
             WHERE request_id = ANY($1) AND outcome <> 'rejected'",
        )
        .bind(ids)
        .fetch_all(conn)
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// What each of `ids` already has on record: its attempts, and since
    /// when it has been throttled (see [`Recorded`]).
    pub async fn attempts_recorded(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Recorded>, AuditError> {
        // The trailing run of 429s and 503s: the audit does not keep
        // `Retry-After`, so a 503 counts as throttled here.
        let rows: Vec<(String, i32, Option<DateTime<Utc>>)> = sqlx::query_as(
            "WITH a AS ( \
                 SELECT request_id, attempt, started_at, \
                        coalesce(http_status IN (429, 503), false) AS throttled \
                 FROM termination_attempts WHERE request_id = ANY($1)), \
             last AS ( \
                 SELECT request_id, max(attempt) AS attempts, \
                        coalesce(max(attempt) FILTER (WHERE NOT throttled), 0) AS other \
                 FROM a GROUP BY request_id) \
             SELECT last.request_id, last.attempts, min(a.started_at) \
             FROM last LEFT JOIN a ON a.request_id = last.request_id \
                 AND a.throttled AND a.attempt > last.other \
             GROUP BY last.request_id, last.attempts",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, n, since)| {
                let attempts = u32::try_from(n).unwrap_or(0);
                (
                    id,
                    Recorded {
                        attempts,
                        throttled_since: since,
                    },
                )
            })
            .collect())
    }
}

/// What the audit already has of a redelivered request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Its attempts so far: a redelivery numbers its own after them.
    pub attempts: u32,
    /// When the run of throttled answers its last attempts belong to began,
    /// if they were throttled: `THROTTLE_GIVE_UP` counts from there, not
    /// from the redelivery. (A request throttled for longer than the
    /// broker's `consumer_timeout` has its message taken back and
    /// redelivered; without this its give-up would never come.)
    pub throttled_since: Option<DateTime<Utc>>,
}

struct LookupJob {
    ids: Vec<String>,
    reply: oneshot::Sender<HashSet<String>>,
}

/// Answers "which of these already have a final outcome?" for many
/// messages with one query: lookups that arrive while one runs are
/// answered together by the next. One task, for the writer's reason (two
/// were slower).
#[derive(Clone, Debug)]
pub struct FinalLookups {
    queue: mpsc::Sender<LookupJob>,
}

impl std::fmt::Debug for LookupJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LookupJob({} ids)", self.ids.len())
    }
}

impl FinalLookups {
    pub fn spawn(
        audit: Audit,
        abort: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, jobs) = mpsc::channel(4096);
        let task = tokio::spawn(lookup_loop(audit, jobs, abort, metrics));
        (Self { queue }, task)
    }

    /// The ids among `ids` with a final outcome other than `rejected`;
    /// `None` if the lookup gave up (shutdown grace ran out).
    pub async fn already_final(&self, ids: Vec<String>) -> Option<HashSet<String>> {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(LookupJob { ids, reply }).await.is_err() {
            return None;
        }
        answer.await.ok()
    }
}

/// Ids per lookup query at most (one message can bring 10,000).
const MAX_LOOKUP_IDS: usize = 20_000;

async fn lookup_loop(
    audit: Audit,
    mut queue: mpsc::Receiver<LookupJob>,
    abort: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let kept = audit.kept_for_lookups();
    let mut jobs = Vec::new();
    while queue.recv_many(&mut jobs, 512).await > 0 {
        // One multiple ack frees many prefetch slots at once, so messages
        // arrive in bursts and ask within microseconds of each other. Let
        // the whole burst in before querying: one query answers it, where
        // answering the first alone made the rest wait for a second one
        // (a third fewer queries, and ~6 % more messages/s at prefetch 64).
        tokio::task::yield_now().await;
        while jobs.len() < 512
            && let Ok(job) = queue.try_recv()
        {
            jobs.push(job);
        }
        // Answer in chunks of whole jobs that fit one query.
        while !jobs.is_empty() {
            let mut take = 0;
            let mut count = 0;
            while take < jobs.len() && (take == 0 || count + jobs[take].ids.len() <= MAX_LOOKUP_IDS)
            {
                count += jobs[take].ids.len();
                take += 1;
            }
            let chunk: Vec<LookupJob> = jobs.drain(..take).collect();
            let ids: Vec<&str> = chunk
                .iter()
                .flat_map(|j| j.ids.iter().map(String::as_str))
                .collect();
            let started = std::time::Instant::now();
            let Some(found) = audit
                .until_done("final-outcome lookup", &abort, || {
                    kept.call(async |conn| Audit::already_final(conn, &ids).await)
                })
                .await
            else {
                // Shutdown: dropping the replies tells every caller.
                jobs.clear();
                break;
            };
            metrics.looked_up(started.elapsed());
            for job in chunk {
                let mine = job
                    .ids
                    .into_iter()
                    .filter(|id| found.contains(id))
                    .collect();
                let _ = job.reply.send(mine);
            }
        }
    }
}
