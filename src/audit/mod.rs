//! The audit adapter: the only place that names `sqlx`. Every attempt and
//! every final outcome goes to Postgres before its message is acked; the
//! reports read it back.
//!
//! Writes are batched: every finished request hands its record to one
//! [`AuditWriter`] task, which drains whatever has queued up while its last
//! flush ran and commits it all in one statement. One [`FinalLookups`] task
//! likewise answers the dedupe lookups of every message that arrived during
//! its previous query. Both keep their own connection ([`kept`]).

pub mod campaigns;
pub mod fold;
mod kept;
mod lookups;
pub mod prune;
mod records;
pub mod report;
pub mod rollups;
mod writer;

pub use lookups::{FinalLookups, Recorded};
pub use records::{FinalRecord, Record, UnfinishedRecord};
pub use writer::AuditWriter;

use crate::settings::{ConfigError, DatabaseSettings};
use crate::telemetry::{Repeats, cause_chain, tls_failure};
use backon::{ExponentialBuilder, Retryable};
use kept::Kept;
use secrecy::ExposeSecret;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit database query failed")]
    Query(#[from] sqlx::Error),
    #[error("audit migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("audit database call got no answer within {0:?}")]
    Timeout(Duration),
}

impl AuditError {
    /// Why retrying cannot help, when that is so: the database refused the
    /// credentials, does not exist, or TLS failed (an unknown CA, a name
    /// that does not match, TLS required on one side and off on the other).
    /// `None` for what may pass (refused, timed out, restarting).
    pub fn needs_a_person(&self) -> Option<String> {
        match self {
            AuditError::Query(e) | AuditError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => {
                sqlx_needs_a_person(e)
            }
            _ => None,
        }
    }
}

fn sqlx_needs_a_person(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // invalid_password; invalid_authorization_specification (no
            // such role, or no pg_hba.conf entry: TLS off where it is required)
            Some("28P01" | "28000") => Some(format!("refused: {}", db.message())),
            // invalid_catalog_name
            Some("3D000") => Some(format!("no such database: {}", db.message())),
            _ => None,
        },
        sqlx::Error::Tls(e) => Some(format!("TLS failed: {}", cause_chain(e.as_ref()))),
        sqlx::Error::Io(io) => tls_failure(io).map(|why| format!("TLS failed: {why}")),
        sqlx::Error::Configuration(e) => Some(format!("bad settings: {}", cause_chain(e.as_ref()))),
        _ => None,
    }
}

/// Log directives that quiet sqlx's pool: it warns about slow acquires and
/// failed on-release tests while the database is away, and the daemon logs
/// the outage once itself.
/// Its notices (a migration table that exists already) are not news either.
pub const QUIET_LOGS: &str =
    "sqlx::pool::acquire=error,sqlx_core::pool::connection=error,sqlx::postgres::notice=warn";

/// Every libpq parameter of `DATABASE_URL`, as sqlx reads them.
fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, ConfigError> {
    PgConnectOptions::from_str(settings.url.expose_secret())
        .map_err(|e| ConfigError(format!("DATABASE_URL is not a valid postgres URL: {e}")))
}

#[derive(Clone, Debug)]
pub struct Audit {
    /// Lookups and everything else.
    pool: PgPool,
    /// Audit flushes only: the writer's one connection, so each flush runs
    /// on a backend that has its statement prepared and planned.
    writes: PgPool,
    /// Migrations only, with statement logging off: at DEBUG sqlx would log
    /// every migration's whole SQL text, tens of KiB at each start (more
    /// than a pipe holds, for a parent that reads the logs at exit).
    migrations: PgPool,
    /// False from a failed database call until the next one succeeds: the
    /// daemon takes no new messages meanwhile, and is not ready.
    healthy: Arc<watch::Sender<bool>>,
    /// The failures of the current outage, for one log line a minute.
    failing: Arc<Mutex<Repeats>>,
}

impl Audit {
    /// Lazy pools: nothing connects until the first query, so a database
    /// that is down at start is retried like one that goes down later.
    pub fn new(settings: &DatabaseSettings, max_connections: u32) -> Result<Self, ConfigError> {
        let options = connect_options(settings)?;
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
        let migrations = lazy(1, options.clone().disable_statement_logging());
        let writes = lazy(1, options);
        Ok(Self {
            pool,
            writes,
            migrations,
            healthy: Arc::new(watch::Sender::new(true)),
            failing: Arc::default(),
        })
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

    /// One WARN when the database starts failing (with the first error),
    /// one INFO when it answers again; the retries between log at DEBUG.
    fn set_healthy(&self, ok: bool, error: Option<&AuditError>) {
        let was = self.healthy.send_replace(ok);
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            if let Some(n) = failing.ended()
                && !was
            {
                tracing::info!(
                    failed_calls = n,
                    "the audit database answers again; resuming"
                );
            }
            return;
        }
        match failing.failed() {
            Some(0) => tracing::warn!(
                error.cause_chain = error.map(|e| cause_chain(e)),
                "the audit database is failing: no new messages are taken until it answers"
            ),
            Some(n) => tracing::warn!(
                error.cause_chain = error.map(|e| cause_chain(e)),
                failed_calls = n,
                "the audit database is still failing"
            ),
            None => {}
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
                self.set_healthy(false, Some(e));
                tracing::debug!(
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
            self.set_healthy(true, None);
        }
        result
    }

    pub async fn migrate(&self) -> Result<(), AuditError> {
        sqlx::migrate!("./migrations").run(&self.migrations).await?;
        Ok(())
    }
    /// A connection for the lookup task to keep.
    fn kept_for_lookups(&self) -> Kept {
        Kept::new(self.pool.clone())
    }

    /// A connection for the writer to keep.
    fn kept_for_writes(&self) -> Kept {
        Kept::new(self.writes.clone())
    }
}
