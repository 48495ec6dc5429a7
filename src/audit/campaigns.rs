//! Campaigns in the audit: recording one as `enqueue` starts it, and reading
//! its progress back through the `termination_campaign_progress` view (the
//! same view people query with SQL, so the tool and the SQL cannot disagree).

use super::AuditError;
use super::report::{ErrorCount, Reports};
use super::rollups::{OUTCOME_ROLLUP, TOP};
use crate::settings::{ConfigError, DatabaseSettings};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Connection as _;
use std::time::Duration;

/// One `enqueue` of one input into a campaign.
#[derive(Debug, Clone)]
pub struct NewCampaign<'a> {
    pub id: &'a str,
    pub requested_by: &'a str,
    /// The file's name, or `stdin`.
    pub source: &'a str,
    /// Hex SHA-256 of the input's bytes: the same input counts once.
    pub input_sha256: &'a str,
    /// The valid requests in this input.
    pub request_count: i64,
    pub note: Option<&'a str>,
}

/// The campaign as recorded after an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The campaign's request_count, this input included.
    pub request_count: i64,
    /// This input had been enqueued into the campaign before: nothing was added.
    pub input_seen_before: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error(transparent)]
    Settings(#[from] ConfigError),
    #[error("cannot connect to the audit database")]
    Connect(#[source] AuditError),
    #[error(
        "the audit database has no {0} table: run `aom-terminator migrate` (or start the daemon) against it first"
    )]
    NotMigrated(&'static str),
    #[error("recording the campaign failed")]
    Query(#[from] AuditError),
    #[error("the audit database did not answer within {0:?}")]
    Timeout(Duration),
}

/// Record `c` in `termination_campaigns` (created on its first enqueue) and
/// `termination_campaign_inputs`, in one transaction: two enqueues into one
/// campaign at once serialize on its row, and each input adds its count once.
/// The whole call is bounded by `limit`.
pub async fn record(
    settings: &DatabaseSettings,
    c: &NewCampaign<'_>,
    limit: Duration,
) -> Result<Recorded, CampaignError> {
    let options = super::connect_options(settings)?;
    let work = async {
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(|e| CampaignError::Connect(AuditError::Query(e)))?;
        let recorded = record_on(&mut conn, c).await;
        let _ = conn.close().await;
        recorded
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| CampaignError::Timeout(limit))?
}

async fn record_on(
    conn: &mut sqlx::PgConnection,
    c: &NewCampaign<'_>,
) -> Result<Recorded, CampaignError> {
    let q = |e: sqlx::Error| CampaignError::Query(AuditError::Query(e));
    for table in ["termination_campaigns", "termination_campaign_inputs"] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&mut *conn)
            .await
            .map_err(q)?;
        if !exists {
            return Err(CampaignError::NotMigrated(table));
        }
    }
    let mut tx = conn.begin().await.map_err(q)?;
    // A later enqueue may add a note; it never clears one.
    sqlx::query(
        "INSERT INTO termination_campaigns (id, requested_by, source, request_count, note) \
         VALUES ($1, $2, $3, 0, $4) \
         ON CONFLICT (id) DO UPDATE SET note = coalesce(EXCLUDED.note, termination_campaigns.note)",
    )
    .bind(c.id)
    .bind(c.requested_by)
    .bind(c.source)
    .bind(c.note)
    .execute(&mut *tx)
    .await
    .map_err(q)?;
    let added = sqlx::query(
        "INSERT INTO termination_campaign_inputs \
           (campaign_id, input_sha256, source, requested_by, request_count) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(c.id)
    .bind(c.input_sha256)
    .bind(c.source)
    .bind(c.requested_by)
    .bind(c.request_count)
    .execute(&mut *tx)
    .await
    .map_err(q)?
    .rows_affected()
        == 1;
    let request_count: i64 = sqlx::query_scalar(
        "UPDATE termination_campaigns SET request_count = request_count + $2 \
         WHERE id = $1 RETURNING request_count",
    )
    .bind(c.id)
    .bind(if added { c.request_count } else { 0 })
    .fetch_one(&mut *tx)
    .await
    .map_err(q)?;
    tx.commit().await.map_err(q)?;
    Ok(Recorded {
        request_count,
        input_seen_before: !added,
    })
}

/// One row of `termination_campaign_progress`, and the database's clock
/// when it was read (rates are measured on the clock that stamped the rows).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Progress {
    pub campaign_id: String,
    pub requested_by: Option<String>,
    pub source: Option<String>,
    pub note: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    /// Null for a campaign id no enqueue recorded.
    pub request_count: Option<i64>,
    pub done: i64,
    pub pending: Option<i64>,
    pub succeeded: i64,
    pub failed_permanent: i64,
    pub failed_retries_exhausted: i64,
    pub rejected: i64,
    pub replays: i64,
    pub done_last_minute: i64,
    pub first_outcome_at: Option<DateTime<Utc>>,
    pub last_outcome_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub now: DateTime<Utc>,
}

const PROGRESS: &str = "SELECT p.*, now() AS now FROM termination_campaign_progress p";

impl Reports {
    /// The progress of campaign `id`; `None` if no enqueue recorded it and no
    /// outcome carries it.
    pub async fn campaign(&self, id: &str) -> Result<Option<Progress>, AuditError> {
        Ok(
            sqlx::query_as(&format!("{PROGRESS} WHERE p.campaign_id = $1"))
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Campaign `id`'s outcomes other than success, by outcome, status and
    /// error code, most first (at most 20 rows, as `report`'s). From the
    /// outcomes' rollup (through its campaign index) and its deltas not yet
    /// folded (unindexed, but a fold every few seconds keeps them small): it
    /// reads the campaign's hours, not its requests, and keeps the counts of
    /// rows a prune removed.
    pub async fn campaign_errors(&self, id: &str) -> Result<Vec<ErrorCount>, AuditError> {
        Ok(sqlx::query_as(&format!(
            "SELECT r.outcome, r.http_status, r.error_code, sum(r.requests)::bigint AS count \
             FROM {OUTCOME_ROLLUP} r WHERE r.campaign_id = $1 AND r.outcome <> $2 \
             GROUP BY 1, 2, 3 HAVING sum(r.requests) <> 0 \
             ORDER BY count DESC, 1, 2, 3 LIMIT {TOP}",
        ))
        .bind(id)
        .bind(crate::domain::Outcome::Succeeded.as_str())
        .fetch_all(self.pool())
        .await?)
    }

    /// The `limit` most recently created campaigns that an enqueue recorded.
    pub async fn campaigns(&self, limit: i64) -> Result<Vec<Progress>, AuditError> {
        Ok(sqlx::query_as(&format!(
            "{PROGRESS} WHERE p.created_at IS NOT NULL \
             ORDER BY p.created_at DESC, p.campaign_id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }
}
