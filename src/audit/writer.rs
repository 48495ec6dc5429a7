//! The one writer: commits whatever records queued up during its previous
//! flush, attempts and outcomes together, in one statement (multi-row
//! `INSERT ... SELECT FROM UNNEST`) on a connection of its own. A caller
//! learns that its record is committed, and only then may its message be
//! acked.

use super::{Audit, AuditError, FinalRecord, Record};
use crate::domain::Attempt;
use crate::metrics::Metrics;
use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The most records one flush commits.
const MAX_FLUSH: usize = 1000;

impl Audit {
    /// Commit `records` in one transaction.
    async fn write(conn: &mut PgConnection, records: &[&Record]) -> Result<(), AuditError> {
        let mut attempts = AttemptColumns::default();
        let mut finals = Vec::new();
        let mut skipped = Vec::new();
        for record in records {
            match record {
                Record::Final(f) => {
                    let of = AttemptsOf {
                        request_id: &f.request_id,
                        project_id: f.project_id.as_deref(),
                        workflow_id: f.workflow_id.as_deref(),
                        requested_by: f.requested_by.as_deref(),
                        campaign_id: f.campaign_id.as_deref(),
                    };
                    attempts.push(of, f.attempts_before, &f.attempts);
                    finals.push(f.as_ref());
                }
                Record::Unfinished(u) => {
                    let of = AttemptsOf {
                        request_id: &u.request_id,
                        project_id: u.project_id.as_deref(),
                        workflow_id: u.workflow_id.as_deref(),
                        requested_by: u.requested_by.as_deref(),
                        campaign_id: u.campaign_id.as_deref(),
                    };
                    attempts.push(of, u.attempts_before, &u.attempts);
                }
                Record::Skipped { request_id } => skipped.push(request_id.as_str()),
            }
        }
        // ON CONFLICT cannot touch one row twice in a statement: a request_id
        // that repeats within the flush goes into a later statement.
        let mut layers = layers(finals);
        if skipped.is_empty() && layers.len() <= 1 {
            // The common flush: attempts and outcomes in one statement, which
            // is atomic on its own: one round trip instead of four.
            let layer = layers.pop().unwrap_or_default();
            OutcomeColumns::from(layer.as_slice())
                .upsert(conn, Some(attempts))
                .await?;
            return Ok(());
        }
        let mut tx = conn.begin().await?;
        if !attempts.request_id.is_empty() {
            attempts.insert(&mut tx).await?;
        }
        for layer in layers {
            OutcomeColumns::from(layer.as_slice())
                .upsert(&mut tx, None)
                .await?;
        }
        if !skipped.is_empty() {
            sqlx::query(
                "UPDATE termination_outcomes o \
                 SET skipped_redeliveries = o.skipped_redeliveries + s.n \
                 FROM (SELECT id, count(*)::int AS n FROM UNNEST($1::text[]) AS id GROUP BY id) s \
                 WHERE o.request_id = s.id",
            )
            .bind(&skipped)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Split records so that no request_id appears twice in one layer.
fn layers(records: Vec<&FinalRecord>) -> Vec<Vec<&FinalRecord>> {
    let mut layers: Vec<Vec<&FinalRecord>> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for r in records {
        let depth = seen.entry(r.request_id.as_str()).or_insert(0);
        if layers.len() <= *depth {
            layers.push(Vec::new());
        }
        layers[*depth].push(r);
        *depth += 1;
    }
    layers
}

/// Whose attempts these are: the request and the report's dimensions, which
/// every attempt row carries for the rollup (see the rollups migration).
struct AttemptsOf<'a> {
    request_id: &'a str,
    project_id: Option<&'a str>,
    workflow_id: Option<&'a str>,
    requested_by: Option<&'a str>,
    campaign_id: Option<&'a str>,
}

/// The attempts of one flush, column by column, borrowed from the records.
#[derive(Default)]
struct AttemptColumns<'a> {
    request_id: Vec<&'a str>,
    attempt: Vec<i32>,
    http_status: Vec<Option<i32>>,
    error_kind: Vec<Option<&'static str>>,
    error_code: Vec<Option<&'a str>>,
    error_msg: Vec<Option<&'a str>>,
    body_excerpt: Vec<Option<&'a str>>,
    started_at: Vec<DateTime<Utc>>,
    latency_ms: Vec<f64>,
    campaign_id: Vec<Option<&'a str>>,
    region: Vec<Option<&'a str>>,
    endpoint_host: Vec<Option<&'a str>>,
    project_id: Vec<Option<&'a str>>,
    workflow_id: Vec<Option<&'a str>>,
    requested_by: Vec<Option<&'a str>>,
}

impl<'a> AttemptColumns<'a> {
    fn push(&mut self, of: AttemptsOf<'a>, before: u32, attempts: &'a [Attempt]) {
        for (i, a) in attempts.iter().enumerate() {
            let n = u64::from(before) + i as u64 + 1;
            self.request_id.push(of.request_id);
            self.attempt.push(i32::try_from(n).unwrap_or(i32::MAX));
            self.http_status.push(a.http_status.map(i32::from));
            self.error_kind.push(a.error_kind.map(|k| k.as_str()));
            self.error_code.push(a.error_code.as_deref());
            self.error_msg.push(a.error_msg.as_deref());
            self.body_excerpt.push(a.body_excerpt.as_deref());
            self.started_at.push(a.started_at);
            self.latency_ms.push(a.latency.as_secs_f64() * 1000.0);
            self.campaign_id.push(of.campaign_id);
            self.region.push(a.region.as_deref());
            self.endpoint_host.push(a.endpoint_host.as_deref());
            self.project_id.push(of.project_id);
            self.workflow_id.push(of.workflow_id);
            self.requested_by.push(of.requested_by);
        }
    }

    async fn insert(self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let query = sqlx::query(
            "INSERT INTO termination_attempts \
             (request_id, attempt, http_status, error_kind, error_code, error_msg, body_excerpt, \
              started_at, latency_ms, campaign_id, region, endpoint_host, project_id, \
              workflow_id, requested_by) \
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::int[], $4::text[], $5::text[], \
              $6::text[], $7::text[], $8::timestamptz[], $9::float8[], $10::text[], $11::text[], \
              $12::text[], $13::text[], $14::text[], $15::text[])",
        );
        self.bind_to(query).execute(tx).await?;
        Ok(())
    }

    /// Bind the fifteen columns, in table order, after whatever `query` has.
    fn bind_to<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        query
            .bind(self.request_id)
            .bind(self.attempt)
            .bind(self.http_status)
            .bind(self.error_kind)
            .bind(self.error_code)
            .bind(self.error_msg)
            .bind(self.body_excerpt)
            .bind(self.started_at)
            .bind(self.latency_ms)
            .bind(self.campaign_id)
            .bind(self.region)
            .bind(self.endpoint_host)
            .bind(self.project_id)
            .bind(self.workflow_id)
            .bind(self.requested_by)
    }
}

struct OutcomeColumns<'a> {
    request_id: Vec<&'a str>,
    project_id: Vec<Option<&'a str>>,
    workflow_id: Vec<Option<&'a str>>,
    execution_id: Vec<Option<&'a str>>,
    outcome: Vec<&'static str>,
    http_status: Vec<Option<i32>>,
    error_code: Vec<Option<&'a str>>,
    error_msg: Vec<Option<&'a str>>,
    attempts: Vec<i32>,
    reason: Vec<Option<&'a str>>,
    requested_by: Vec<Option<&'a str>>,
    received_at: Vec<DateTime<Utc>>,
    finished_at: Vec<DateTime<Utc>>,
    redelivered: Vec<bool>,
    message_id: Vec<Option<&'a str>>,
    replay_of: Vec<Option<&'a str>>,
    campaign_id: Vec<Option<&'a str>>,
}

impl<'a> From<&[&'a FinalRecord]> for OutcomeColumns<'a> {
    fn from(records: &[&'a FinalRecord]) -> Self {
        let n = records.len();
        let mut c = OutcomeColumns {
            request_id: Vec::with_capacity(n),
            project_id: Vec::with_capacity(n),
            workflow_id: Vec::with_capacity(n),
            execution_id: Vec::with_capacity(n),
            outcome: Vec::with_capacity(n),
            http_status: Vec::with_capacity(n),
            error_code: Vec::with_capacity(n),
            error_msg: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            reason: Vec::with_capacity(n),
            requested_by: Vec::with_capacity(n),
            received_at: Vec::with_capacity(n),
            finished_at: Vec::with_capacity(n),
            redelivered: Vec::with_capacity(n),
            message_id: Vec::with_capacity(n),
            replay_of: Vec::with_capacity(n),
            campaign_id: Vec::with_capacity(n),
        };
        for r in records {
            c.request_id.push(&r.request_id);
            c.project_id.push(r.project_id.as_deref());
            c.workflow_id.push(r.workflow_id.as_deref());
            c.execution_id.push(r.execution_id.as_deref());
            c.outcome.push(r.outcome.as_str());
            c.http_status.push(r.http_status.map(i32::from));
            c.error_code.push(r.error_code.as_deref());
            c.error_msg.push(r.error_msg.as_deref());
            let total = u64::from(r.attempts_before) + r.attempts.len() as u64;
            c.attempts.push(i32::try_from(total).unwrap_or(i32::MAX));
            c.reason.push(r.reason.as_deref());
            c.requested_by.push(r.requested_by.as_deref());
            c.received_at.push(r.received_at);
            c.finished_at.push(r.finished_at);
            c.redelivered.push(r.redelivered);
            c.message_id.push(r.message_id.as_deref());
            c.replay_of.push(r.replay_of.as_deref());
            c.campaign_id.push(r.campaign_id.as_deref());
        }
        c
    }
}

/// The outcome upsert, after `WITH `: insert, or replace a `rejected` row;
/// a row that already holds another final outcome is kept, and the
/// newcomer goes to the history. Binds $1..$17.
macro_rules! upsert_outcomes {
    () => {
        "input AS ( \
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::int[], $7::text[], $8::text[], $9::int[], $10::text[], $11::text[], \
             $12::timestamptz[], $13::timestamptz[], $14::bool[], $15::text[], $16::text[], \
             $17::text[]) \
           AS t(request_id, project_id, workflow_id, execution_id, outcome, http_status, \
             error_code, error_msg, attempts, reason, requested_by, received_at, \
             finished_at, redelivered, message_id, replay_of, campaign_id) \
         ), applied AS ( \
           INSERT INTO termination_outcomes AS o \
             (request_id, project_id, workflow_id, execution_id, outcome, http_status, \
              error_code, error_msg, attempts, reason, requested_by, received_at, \
              finished_at, redelivered, message_id, replay_of, campaign_id) \
           SELECT * FROM input \
           ON CONFLICT (request_id) DO UPDATE SET \
             project_id = EXCLUDED.project_id, workflow_id = EXCLUDED.workflow_id, \
             execution_id = EXCLUDED.execution_id, outcome = EXCLUDED.outcome, \
             http_status = EXCLUDED.http_status, error_code = EXCLUDED.error_code, \
             error_msg = EXCLUDED.error_msg, attempts = EXCLUDED.attempts, \
             reason = EXCLUDED.reason, requested_by = EXCLUDED.requested_by, \
             received_at = EXCLUDED.received_at, finished_at = EXCLUDED.finished_at, \
             redelivered = EXCLUDED.redelivered, message_id = EXCLUDED.message_id, \
             replay_of = EXCLUDED.replay_of, campaign_id = EXCLUDED.campaign_id, \
             recorded_at = clock_timestamp() \
           WHERE o.outcome = 'rejected' \
           RETURNING o.request_id \
         ) \
         INSERT INTO termination_outcome_history \
           (why, request_id, project_id, workflow_id, execution_id, outcome, http_status, \
            error_code, error_msg, attempts, reason, requested_by, received_at, \
            finished_at, redelivered, message_id, replay_of, campaign_id) \
         SELECT CASE WHEN i.outcome = 'rejected' THEN 'rejected_after_final' \
                     ELSE 'duplicate' END, i.* \
         FROM input i WHERE i.request_id NOT IN (SELECT request_id FROM applied)"
    };
}

impl OutcomeColumns<'_> {
    /// The outcome upsert, with the attempts' insert in the same statement
    /// when `attempts` is given.
    async fn upsert(
        self,
        conn: &mut sqlx::PgConnection,
        attempts: Option<AttemptColumns<'_>>,
    ) -> Result<(), sqlx::Error> {
        let sql = match attempts {
            Some(_) => concat!(
                "WITH att AS (INSERT INTO termination_attempts \
                   (request_id, attempt, http_status, error_kind, error_code, error_msg, \
                    body_excerpt, started_at, latency_ms, campaign_id, region, endpoint_host, \
                    project_id, workflow_id, requested_by) \
                   SELECT * FROM UNNEST($18::text[], $19::int[], $20::int[], $21::text[], \
                     $22::text[], $23::text[], $24::text[], $25::timestamptz[], $26::float8[], \
                     $27::text[], $28::text[], $29::text[], $30::text[], $31::text[], \
                     $32::text[])), ",
                upsert_outcomes!()
            ),
            None => concat!("WITH ", upsert_outcomes!()),
        };
        let query = sqlx::query(sql)
            .bind(self.request_id)
            .bind(self.project_id)
            .bind(self.workflow_id)
            .bind(self.execution_id)
            .bind(self.outcome)
            .bind(self.http_status)
            .bind(self.error_code)
            .bind(self.error_msg)
            .bind(self.attempts)
            .bind(self.reason)
            .bind(self.requested_by)
            .bind(self.received_at)
            .bind(self.finished_at)
            .bind(self.redelivered)
            .bind(self.message_id)
            .bind(self.replay_of)
            .bind(self.campaign_id);
        let query = match attempts {
            Some(a) => a.bind_to(query),
            None => query,
        };
        query.execute(conn).await?;
        Ok(())
    }
}

struct Job {
    record: Record,
    done: oneshot::Sender<bool>,
}

/// Hands records to the writer task. Cheap to clone. There is one writer:
/// Postgres' cost is mostly per flush (commit, WAL flush, protocol), and a
/// second writer halves the rows per flush (measured slower, BENCHMARKS.md);
/// one writer also completes messages in arrival order, so their acks
/// coalesce.
#[derive(Clone, Debug)]
pub struct AuditWriter {
    queue: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.record.fmt(f)
    }
}

impl AuditWriter {
    /// Start the writer. It runs until every `AuditWriter` clone is dropped
    /// and the queue is drained; `abort` makes pending writes give up.
    /// `flushes` observes each flush.
    pub fn spawn(
        audit: Audit,
        abort: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, jobs) = mpsc::channel(4 * MAX_FLUSH);
        let task = tokio::spawn(write_loop(audit, jobs, abort, metrics));
        (Self { queue }, task)
    }

    /// Commit one record; `true` once it is committed, `false` if the writer
    /// gave up (shutdown grace ran out while the database was away).
    pub async fn commit(&self, record: Record) -> bool {
        let (done, committed) = oneshot::channel();
        if self.queue.send(Job { record, done }).await.is_err() {
            return false;
        }
        committed.await.unwrap_or(false)
    }
}

async fn write_loop(
    audit: Audit,
    mut queue: mpsc::Receiver<Job>,
    abort: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let kept = audit.kept_for_writes();
    let mut jobs = Vec::with_capacity(MAX_FLUSH);
    while queue.recv_many(&mut jobs, MAX_FLUSH).await > 0 {
        let started = std::time::Instant::now();
        let records: Vec<&Record> = jobs.iter().map(|j| &j.record).collect();
        let committed = audit
            .until_done("audit write", &abort, || {
                kept.call(async |conn| Audit::write(conn, &records).await)
            })
            .await
            .is_some();
        metrics.audit_flushed(started.elapsed(), jobs.len());
        for job in jobs.drain(..) {
            let _ = job.done.send(committed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Outcome;

    fn record(id: &str) -> FinalRecord {
        FinalRecord {
            request_id: id.to_owned(),
            project_id: None,
            workflow_id: None,
            execution_id: None,
            outcome: Outcome::Rejected,
            http_status: None,
            error_code: None,
            error_msg: None,
            attempts: vec![],
            attempts_before: 0,
            reason: None,
            requested_by: None,
            received_at: Utc::now(),
            finished_at: Utc::now(),
            redelivered: false,
            message_id: None,
            replay_of: None,
            campaign_id: None,
        }
    }

    #[test]
    fn repeated_ids_go_to_later_layers() {
        let (a1, b, a2, a3) = (record("a"), record("b"), record("a"), record("a"));
        let ids =
            |l: &Vec<&FinalRecord>| l.iter().map(|r| r.request_id.clone()).collect::<Vec<_>>();
        let got: Vec<_> = layers(vec![&a1, &b, &a2, &a3]).iter().map(ids).collect();
        assert_eq!(got, vec![vec!["a", "b"], vec!["a"], vec!["a"]]);
    }
}
