//! The fold of the rollups' deltas (migration `…11_rollup_deltas`). The
//! triggers that keep the rollups only append each statement's aggregate to
//! a delta table, so a daemon flush never updates the hot rollup rows;
//! `termination_rollup_fold()` adds the deltas into the rollups. `audit
//! prune` folds before it cuts; `report` reads the deltas beside the rollups
//! (as the `termination_summary` view does), so it counts what any writer
//! added without writing; the daemon folds every few seconds so the deltas
//! stay small. (The migration's header comment, which says `report` folds
//! too, predates this; applied migrations are not edited.)

use super::{Audit, AuditError};
use crate::telemetry::{Repeats, cause_chain};
use sqlx::PgPool;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the daemon folds. A fold costs one statement per delta table,
/// whatever the rate; between folds the deltas hold a row per flush and key.
pub const FOLD_EVERY: Duration = Duration::from_secs(5);

/// A fold that has had no answer for this long is given up (a connection
/// whose peer vanished would otherwise hang the task) and tried next time.
const FOLD_TIMEOUT: Duration = Duration::from_secs(60);

/// Fold every delta into its rollup; the number of delta rows folded. Safe
/// to run at any time and from any number of clients at once (see the
/// function's comment in the migration).
pub async fn fold(pool: &PgPool) -> Result<u64, AuditError> {
    let folded = tokio::time::timeout(
        FOLD_TIMEOUT,
        sqlx::query_scalar::<_, i64>("SELECT termination_rollup_fold()").fetch_one(pool),
    )
    .await
    .map_err(|_| AuditError::Timeout(FOLD_TIMEOUT))??;
    Ok(u64::try_from(folded).unwrap_or(0))
}

/// The daemon's fold task: folds every [`FOLD_EVERY`] until `stop`. A failed
/// fold is tried again next time and logged once per run of failures (the
/// writer's own retries report an outage that stops the daemon; a fold
/// that fails stops nothing: the deltas wait, and reports still count them).
pub fn spawn(audit: &Audit, stop: CancellationToken) -> JoinHandle<()> {
    let pool = audit.pool.clone();
    tokio::spawn(async move {
        let mut failing = Repeats::default();
        let mut every = tokio::time::interval(FOLD_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = stop.cancelled() => return,
            }
            let result = tokio::select! {
                result = fold(&pool) => result,
                () = stop.cancelled() => return,
            };
            match result {
                Ok(_) => {
                    if let Some(n) = failing.ended() {
                        tracing::info!(failed_folds = n, "the audit rollups fold again");
                    }
                }
                Err(e) => match failing.failed() {
                    Some(n) => tracing::warn!(
                        error.cause_chain = %cause_chain(&e),
                        failed_folds = n,
                        "the audit rollups' fold failed; retrying every {}s",
                        FOLD_EVERY.as_secs()
                    ),
                    None => tracing::debug!(error.cause_chain = %cause_chain(&e), "fold failed"),
                },
            }
        }
    })
}
