//! What the daemon committed: the audit tables in the run's database.

use anyhow::{Context, Result, bail};
use sqlx::PgConnection;

pub(crate) struct AuditNumbers {
    pub(crate) outcomes: i64,
    pub(crate) succeeded: i64,
    pub(crate) attempts: i64,
    pub(crate) drain_s: Option<f64>,
    pub(crate) first_received_epoch: Option<f64>,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) max_ms: Option<f64>,
    pub(crate) published_p50_s: Option<f64>,
    pub(crate) published_p99_s: Option<f64>,
}

/// Outcomes committed so far, cheaply: the newest attempt id is one index
/// probe, where `count(*)` every 100 ms would scan the growing table and
/// load the Postgres being measured. Ids can run ahead of commits (and
/// attempts can outnumber outcomes), so the exact count is taken only once
/// the id says the run could be complete, and once a second regardless (a
/// run whose requests make no attempts, rejections, still ends).
pub(crate) async fn progress(
    db: &mut PgConnection,
    target: i64,
    exact: bool,
) -> Result<i64, sqlx::Error> {
    if !exact {
        let newest: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM termination_attempts")
            .fetch_one(&mut *db)
            .await?;
        if newest.unwrap_or(0) < target {
            return Ok(newest.unwrap_or(0).min(target - 1));
        }
    }
    sqlx::query_scalar("SELECT count(*) FROM termination_outcomes")
        .fetch_one(db)
        .await
}

/// `published_at[m]` is when message m was published; request `r-{i}` was
/// in message i / `batch`.
pub(crate) async fn audit_numbers(
    db: &mut PgConnection,
    published_at: &[f64],
    batch: u64,
) -> Result<AuditNumbers> {
    type Row = (
        i64,
        i64,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let row: Row = sqlx::query_as(
        "SELECT count(*), \
                count(*) FILTER (WHERE outcome = 'succeeded'), \
                EXTRACT(EPOCH FROM max(recorded_at) - min(received_at))::float8, \
                EXTRACT(EPOCH FROM min(received_at))::float8, \
                percentile_cont(0.5) WITHIN GROUP \
                    (ORDER BY EXTRACT(EPOCH FROM recorded_at - received_at)::float8) * 1000, \
                percentile_cont(0.99) WITHIN GROUP \
                    (ORDER BY EXTRACT(EPOCH FROM recorded_at - received_at)::float8) * 1000, \
                max(EXTRACT(EPOCH FROM recorded_at - received_at)::float8) * 1000 \
         FROM termination_outcomes",
    )
    .fetch_one(&mut *db)
    .await
    .context("query termination_outcomes")?;
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM termination_attempts")
        .fetch_one(&mut *db)
        .await
        .context("query termination_attempts")?;
    let published: (Option<f64>, Option<f64>, i64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s), \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY s), \
                count(*) FILTER (WHERE s IS NULL) \
         FROM (SELECT EXTRACT(EPOCH FROM recorded_at)::float8 \
                      - ($1::float8[])[substr(request_id, 3)::bigint / $2 + 1] AS s \
               FROM termination_outcomes WHERE request_id LIKE 'r-%') t",
    )
    .bind(published_at)
    .bind(i64::try_from(batch).context("batch size")?)
    .fetch_one(&mut *db)
    .await
    .context("query publish → commit times")?;
    if published.2 > 0 {
        bail!(
            "{} outcomes could not be matched to their message's publish time",
            published.2
        );
    }
    Ok(AuditNumbers {
        outcomes: row.0,
        succeeded: row.1,
        attempts,
        drain_s: row.2,
        first_received_epoch: row.3,
        p50_ms: row.4,
        p99_ms: row.5,
        max_ms: row.6,
        published_p50_s: published.0,
        published_p99_s: published.1,
    })
}
