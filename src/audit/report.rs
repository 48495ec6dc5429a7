//! The report's queries: what happened, from the audit.

use crate::domain::Outcome;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::time::Duration;

use super::AuditError;
use crate::settings::{ConfigError, DatabaseSettings};

/// Which outcomes a report covers.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Finished at or after this time.
    pub since: Option<DateTime<Utc>>,
    pub workflow: Option<String>,
    pub requested_by: Option<String>,
    /// Only this campaign's requests.
    pub campaign: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub total: i64,
    /// Where the counted window starts: `since`, or the start of its hour
    /// when a prune removed the rows of that hour (`None`: all time).
    pub window_start: Option<DateTime<Utc>>,
    pub outcomes: Vec<Count>,
    pub errors: Vec<ErrorCount>,
    pub projects: Vec<ProjectCount>,
    pub workflows: Vec<WorkflowCount>,
    pub latency_ms: Latency,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ProjectCount {
    pub project_id: Option<String>,
    pub total: i64,
    pub succeeded: i64,
    pub failed: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Count {
    pub outcome: String,
    pub count: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ErrorCount {
    pub outcome: String,
    pub http_status: Option<i32>,
    pub error_code: Option<String>,
    pub count: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct WorkflowCount {
    pub project_id: Option<String>,
    pub workflow_id: Option<String>,
    pub total: i64,
    pub succeeded: i64,
    pub failed: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Latency {
    pub calls: i64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// A request that did not succeed, as `report --failed` lists it.
#[derive(Debug, sqlx::FromRow)]
pub struct Failed {
    pub project_id: String,
    pub workflow_id: String,
    pub execution_id: String,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
}

/// The filter every query shares: `$1` since, `$2` workflow, `$3`
/// requested_by, `$4` campaign.
const FILTER: &str = "($1::timestamptz IS NULL OR o.finished_at >= $1) \
     AND ($2::text IS NULL OR o.workflow_id = $2) \
     AND ($3::text IS NULL OR o.requested_by = $3) \
     AND ($4::text IS NULL OR o.campaign_id = $4)";

/// A connection pool for one report.
pub struct Reports {
    pool: PgPool,
}

impl Reports {
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, ReportError> {
        let options = super::connect_options(settings)?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| ReportError::Connect(AuditError::Query(e)))?;
        Ok(Self { pool })
    }

    /// For the other report queries of the audit (`campaigns`).
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Counts, errors, workflows and latency of `f`, from the rollups
    /// (`rollups`): its time does not grow with the audit.
    pub async fn summary(&self, f: &Filter) -> Result<Summary, AuditError> {
        super::rollups::summary(&self.pool, f).await
    }

    /// The requests that did not succeed and name a whole execution.
    pub async fn failed(&self, f: &Filter) -> Result<Vec<Failed>, AuditError> {
        let succeeded = Outcome::Succeeded.as_str();
        self.query_as(
            &format!(
                "SELECT o.project_id, o.workflow_id, o.execution_id, o.reason, o.requested_by \
                 FROM termination_outcomes o WHERE {FILTER} AND o.outcome <> '{succeeded}' \
                   AND o.project_id IS NOT NULL AND o.workflow_id IS NOT NULL \
                   AND o.execution_id IS NOT NULL \
                 ORDER BY o.project_id, o.workflow_id, o.execution_id"
            ),
            f,
        )
        .await
    }

    /// How many of `request_ids` have a final outcome. The primary key
    /// allows at most one each, so `request_ids.len()` means exactly one each.
    pub async fn outcomes_of(&self, request_ids: &[String]) -> Result<i64, AuditError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM termination_outcomes WHERE request_id = ANY($1::text[])",
        )
        .bind(request_ids)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn query_as<T>(&self, sql: &str, f: &Filter) -> Result<Vec<T>, AuditError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        Ok(sqlx::query_as(sql)
            .bind(f.since)
            .bind(&f.workflow)
            .bind(&f.requested_by)
            .bind(&f.campaign)
            .fetch_all(&self.pool)
            .await?)
    }
}

/// Whether the audit database answers: one connection, no retry (a pool
/// would retry a refused connection until its timeout), closed at once.
/// For a quick check before starting; bound it with a timeout of your own.
pub async fn reachable(settings: &DatabaseSettings) -> Result<(), ReportError> {
    use sqlx::Connection as _;
    let options = super::connect_options(settings)?;
    let connection = sqlx::PgConnection::connect_with(&options)
        .await
        .map_err(|e| ReportError::Connect(AuditError::Query(e)))?;
    let _ = connection.close().await;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Settings(#[from] ConfigError),
    #[error("cannot connect to the audit database")]
    Connect(#[source] AuditError),
}
