//! The audit in Postgres: the only file that knows SQL.
//!
//! Writes are batched: every finished request hands its record to one
//! [`AuditWriter`] task, which drains whatever has queued up while its last
//! flush ran and commits it all in one transaction (multi-row
//! `INSERT ... SELECT FROM UNNEST`). A caller learns that its record is
//! committed, and only then may its message be acked.

use crate::api::Attempt;
use crate::domain::Outcome;
use crate::telemetry::cause_chain;
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::Connection;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, Postgres};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// The most records one flush commits.
const MAX_FLUSH: usize = 1000;
/// A kept connection's call that has had no answer for this long is given up and its
/// connection closed (a connection whose peer vanished without a word
/// would otherwise hang it for good); the call is then tried again.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit database query failed")]
    Query(#[from] sqlx::Error),
    #[error("audit migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("audit database call got no answer within {0:?}")]
    Timeout(Duration),
}

/// A request's final outcome with every attempt that led to it.
#[derive(Debug, Clone)]
pub struct FinalRecord {
    pub request_id: String,
    pub project_id: Option<String>,
    pub workflow_id: Option<String>,
    pub execution_id: Option<String>,
    pub outcome: Outcome,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub attempts: Vec<Attempt>,
    /// Attempts recorded by earlier deliveries; numbering continues after them.
    pub attempts_before: u32,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
    pub received_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub redelivered: bool,
    pub message_id: Option<String>,
    /// The request this one replays from the dead-letter queue.
    pub replay_of: Option<String>,
}

/// One thing to commit.
#[derive(Debug, Clone)]
pub enum Record {
    Final(Box<FinalRecord>),
    /// Attempts of a request that did not reach a final outcome (shutdown):
    /// the calls were made, so the audit shows them.
    Unfinished {
        request_id: String,
        attempts_before: u32,
        attempts: Vec<Attempt>,
    },
    /// A delivery of a request that already had its final outcome.
    Skipped {
        request_id: String,
    },
}

#[derive(Clone, Debug)]
pub struct Audit {
    /// Lookups and everything else.
    pool: PgPool,
    /// Audit flushes only: the writer's one connection, so each flush runs
    /// on a backend that has its statement prepared and planned.
    writes: PgPool,
    /// False from a failed database call until the next one succeeds: the
    /// daemon takes no new messages meanwhile, and is not ready.
    healthy: Arc<watch::Sender<bool>>,
}

impl Audit {
    /// Lazy pools: nothing connects until the first query, so a database
    /// that is down at start is retried like one that goes down later.
    pub fn new(options: PgConnectOptions, max_connections: u32) -> Self {
        let lazy = |max: u32, options: PgConnectOptions| {
            PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options)
        };
        // Plan every lookup for its actual ids: a generic plan made while
        // the table was small scans it whole, every time, ever after. The
        // flushes keep Postgres' default: their plan does not depend on the
        // table's size, and re-planning the upsert for every flush cost a
        // sixth of the database's time.
        let pool = lazy(
            max_connections,
            options
                .clone()
                .options([("plan_cache_mode", "force_custom_plan")]),
        );
        let writes = lazy(1, options);
        Self {
            pool,
            writes,
            healthy: Arc::new(watch::Sender::new(true)),
        }
    }

    pub fn is_healthy(&self) -> bool {
        *self.healthy.borrow()
    }

    /// Wait until the database answers again; `false` if `cancel` fires first.
    pub async fn wait_healthy(&self, cancel: &CancellationToken) -> bool {
        let mut rx = self.healthy.subscribe();
        tokio::select! {
            ok = rx.wait_for(|ok| *ok) => ok.is_ok(),
            () = cancel.cancelled() => false,
        }
    }

    fn set_healthy(&self, ok: bool) {
        let was = self.healthy.send_replace(ok);
        if was && !ok {
            tracing::error!(
                "the audit database is failing: no new messages are taken until it answers"
            );
        } else if !was && ok {
            tracing::info!("the audit database answers again; resuming");
        }
    }

    /// Run a database call until it succeeds, backing off between tries, or
    /// until `abort` fires (then `None`). The daemon never gives up on the
    /// audit by itself: an outcome it cannot record is an outcome it cannot ack.
    pub async fn until_done<T, F, Fut>(
        &self,
        what: &str,
        abort: &CancellationToken,
        call: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AuditError>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let retried = call.retry(backoff).sleep(tokio::time::sleep).notify(
            |e: &AuditError, delay: Duration| {
                self.set_healthy(false);
                tracing::warn!(
                    error.cause_chain = %cause_chain(e),
                    retry_in_ms = delay.as_millis() as u64,
                    "{what} failed; retrying"
                );
            },
        );
        let result = tokio::select! {
            biased;
            result = retried => result.ok(),
            () = abort.cancelled() => None,
        };
        if result.is_some() {
            self.set_healthy(true);
        }
        result
    }

    pub async fn migrate(&self) -> Result<(), AuditError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

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

    /// A connection for the lookup task to keep.
    fn kept_for_lookups(&self) -> Kept {
        Kept::new(self.pool.clone())
    }

    /// A connection for the writer to keep.
    fn kept_for_writes(&self) -> Kept {
        Kept::new(self.writes.clone())
    }

    /// How many attempts each of `ids` already has on record.
    pub async fn attempts_recorded(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, u32>, AuditError> {
        let rows: Vec<(String, i32)> = sqlx::query_as(
            "SELECT request_id, max(attempt) FROM termination_attempts \
             WHERE request_id = ANY($1) GROUP BY request_id",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, n)| (id, u32::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// Commit `records` in one transaction.
    async fn write(conn: &mut PgConnection, records: &[&Record]) -> Result<(), AuditError> {
        let mut attempts = AttemptColumns::default();
        let mut finals = Vec::new();
        let mut skipped = Vec::new();
        for record in records {
            match record {
                Record::Final(f) => {
                    attempts.push(&f.request_id, f.attempts_before, &f.attempts);
                    finals.push(f.as_ref());
                }
                Record::Unfinished {
                    request_id,
                    attempts_before,
                    attempts: list,
                } => attempts.push(request_id, *attempts_before, list),
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

/// The connection the writer (or the lookup task) keeps from one call to
/// the next. A connection
/// taken from a sqlx pool is pinged when it is taken and again when it is
/// given back: two more round trips to the database for every flush, each
/// a wake-up of both processes. The task keeps its connection instead, and
/// closes it after any error (it may be broken, or inside a failed
/// transaction); the next call takes a fresh one from the pool.
struct Kept {
    pool: PgPool,
    /// Only its one task uses it; the lock is what lets each retry's future
    /// (made by `until_done`'s `FnMut`) borrow the connection.
    conn: tokio::sync::Mutex<Option<PoolConnection<Postgres>>>,
}

impl Kept {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn call<T>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let mut slot = self.conn.lock().await;
        let conn = match slot.take() {
            Some(conn) => slot.insert(conn),
            None => slot.insert(self.pool.acquire().await?),
        };
        let result = match tokio::time::timeout(CALL_TIMEOUT, f(conn)).await {
            Ok(result) => result,
            Err(_) => Err(AuditError::Timeout(CALL_TIMEOUT)),
        };
        if result.is_err()
            && let Some(mut broken) = slot.take()
        {
            broken.close_on_drop();
        }
        result
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
}

impl<'a> AttemptColumns<'a> {
    fn push(&mut self, request_id: &'a str, before: u32, attempts: &'a [Attempt]) {
        for (i, a) in attempts.iter().enumerate() {
            let n = u64::from(before) + i as u64 + 1;
            self.request_id.push(request_id);
            self.attempt.push(i32::try_from(n).unwrap_or(i32::MAX));
            self.http_status.push(a.http_status.map(i32::from));
            self.error_kind.push(a.error_kind.map(|k| k.as_str()));
            self.error_code.push(a.error_code.as_deref());
            self.error_msg.push(a.error_msg.as_deref());
            self.body_excerpt.push(a.body_excerpt.as_deref());
            self.started_at.push(a.started_at);
            self.latency_ms.push(a.latency.as_secs_f64() * 1000.0);
        }
    }

    async fn insert(self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let query = sqlx::query(
            "INSERT INTO termination_attempts \
             (request_id, attempt, http_status, error_kind, error_code, error_msg, body_excerpt, \
              started_at, latency_ms) \
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::int[], $4::text[], $5::text[], \
              $6::text[], $7::text[], $8::timestamptz[], $9::float8[])",
        );
        self.bind_to(query).execute(tx).await?;
        Ok(())
    }

    /// Bind the nine columns, in table order, after whatever `query` has.
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
        }
        c
    }
}

/// The outcome upsert, after `WITH `: insert, or replace a `rejected` row;
/// a row that already holds another final outcome is kept, and the
/// newcomer goes to the history. Binds $1..$16.
macro_rules! upsert_outcomes {
    () => {
        "input AS ( \
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::int[], $7::text[], $8::text[], $9::int[], $10::text[], $11::text[], \
             $12::timestamptz[], $13::timestamptz[], $14::bool[], $15::text[], $16::text[]) \
           AS t(request_id, project_id, workflow_id, execution_id, outcome, http_status, \
             error_code, error_msg, attempts, reason, requested_by, received_at, \
             finished_at, redelivered, message_id, replay_of) \
         ), applied AS ( \
           INSERT INTO termination_outcomes AS o \
             (request_id, project_id, workflow_id, execution_id, outcome, http_status, \
              error_code, error_msg, attempts, reason, requested_by, received_at, \
              finished_at, redelivered, message_id, replay_of) \
           SELECT * FROM input \
           ON CONFLICT (request_id) DO UPDATE SET \
             project_id = EXCLUDED.project_id, workflow_id = EXCLUDED.workflow_id, \
             execution_id = EXCLUDED.execution_id, outcome = EXCLUDED.outcome, \
             http_status = EXCLUDED.http_status, error_code = EXCLUDED.error_code, \
             error_msg = EXCLUDED.error_msg, attempts = EXCLUDED.attempts, \
             reason = EXCLUDED.reason, requested_by = EXCLUDED.requested_by, \
             received_at = EXCLUDED.received_at, finished_at = EXCLUDED.finished_at, \
             redelivered = EXCLUDED.redelivered, message_id = EXCLUDED.message_id, \
             replay_of = EXCLUDED.replay_of, recorded_at = clock_timestamp() \
           WHERE o.outcome = 'rejected' \
           RETURNING o.request_id \
         ) \
         INSERT INTO termination_outcome_history \
           (why, request_id, project_id, workflow_id, execution_id, outcome, http_status, \
            error_code, error_msg, attempts, reason, requested_by, received_at, \
            finished_at, redelivered, message_id, replay_of) \
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
                    body_excerpt, started_at, latency_ms) \
                   SELECT * FROM UNNEST($17::text[], $18::int[], $19::int[], $20::text[], \
                     $21::text[], $22::text[], $23::text[], $24::timestamptz[], $25::float8[])), ",
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
            .bind(self.replay_of);
        let query = match attempts {
            Some(a) => a.bind_to(query),
            None => query,
        };
        query.execute(conn).await?;
        Ok(())
    }
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
    /// `seconds` observes each lookup query.
    pub fn spawn(
        audit: Audit,
        abort: CancellationToken,
        seconds: Histogram,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, jobs) = mpsc::channel(4096);
        let task = tokio::spawn(lookup_loop(audit, jobs, abort, seconds));
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
    seconds: Histogram,
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
            seconds.observe(started.elapsed().as_secs_f64());
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
        flushes: FlushMetrics,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, jobs) = mpsc::channel(4 * MAX_FLUSH);
        let task = tokio::spawn(write_loop(audit, jobs, abort, flushes));
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

/// How long each audit flush took, and how many records it committed.
#[derive(Clone, Debug)]
pub struct FlushMetrics {
    pub seconds: Histogram,
    pub records: Histogram,
}

async fn write_loop(
    audit: Audit,
    mut queue: mpsc::Receiver<Job>,
    abort: CancellationToken,
    flushes: FlushMetrics,
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
        flushes.seconds.observe(started.elapsed().as_secs_f64());
        flushes.records.observe(jobs.len() as f64);
        for job in jobs.drain(..) {
            let _ = job.done.send(committed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
