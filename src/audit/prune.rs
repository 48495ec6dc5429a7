//! Retention: remove audit rows older than a cut, in small batches. The
//! rollups keep the removed rows' counts and latency buckets (no trigger
//! fires on DELETE), so reports over any window keep their totals.
//!
//! Each batch is one short statement that takes row locks only: the
//! daemon's inserts never wait on it, and an upsert of an old request_id
//! waits at most one batch. Batches pick their rows with `FOR UPDATE SKIP
//! LOCKED`, so two prunes at once take different rows, and each counts only
//! the rows its own statements deleted.

use super::AuditError;
use super::report::Reports;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

/// What a prune removed (or, dry, would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub outcomes: u64,
    pub attempts: u64,
    /// Superseded and duplicate verdicts (`termination_outcome_history`).
    pub history: u64,
}

/// The three tables, each with the time that ages its rows and the key a
/// batch deletes by.
const TABLES: [(&str, &str, &str); 3] = [
    ("termination_outcomes", "finished_at", "request_id"),
    ("termination_attempts", "started_at", "id"),
    ("termination_outcome_history", "finished_at", "id"),
];

impl Reports {
    /// Rows older than `cut`, counted.
    pub async fn count_older(&self, cut: DateTime<Utc>) -> Result<Pruned, AuditError> {
        let pool = self.pool();
        let mut n = [0u64; 3];
        for (slot, (table, time, _)) in n.iter_mut().zip(TABLES) {
            let count: i64 =
                sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {time} < $1"))
                    .bind(cut)
                    .fetch_one(pool)
                    .await?;
            *slot = u64::try_from(count).unwrap_or(0);
        }
        Ok(Pruned {
            outcomes: n[0],
            attempts: n[1],
            history: n[2],
        })
    }

    /// Remove every row older than `cut`, `batch` rows per statement, and log
    /// the prune in `termination_prunes` (before the first delete, so that a
    /// report knows the rows before `cut` may be gone).
    pub async fn prune(&self, cut: DateTime<Utc>, batch: u32) -> Result<Pruned, AuditError> {
        let pool = self.pool();
        // Not needed for the totals (the deltas outlive the rows they
        // count), but a prune is a quiet moment to leave them empty.
        super::fold::fold(pool).await?;
        let id: i64 =
            sqlx::query_scalar("INSERT INTO termination_prunes (cut) VALUES ($1) RETURNING id")
                .bind(cut)
                .fetch_one(pool)
                .await?;
        let mut n = [0u64; 3];
        for (slot, (table, time, key)) in n.iter_mut().zip(TABLES) {
            let sql = format!(
                "WITH doomed AS (SELECT {key} FROM {table} WHERE {time} < $1 LIMIT $2 \
               FOR UPDATE SKIP LOCKED) \
             DELETE FROM {table} t USING doomed d WHERE t.{key} = d.{key}"
            );
            loop {
                let deleted = sqlx::query(&sql)
                    .bind(cut)
                    .bind(i64::from(batch))
                    .execute(pool)
                    .await?
                    .rows_affected();
                *slot += deleted;
                if deleted > 0 {
                    continue;
                }
                // None free to take: done, unless another transaction (a
                // second prune's batch) holds the last ones; it commits soon.
                let left: bool = sqlx::query_scalar(&format!(
                    "SELECT EXISTS (SELECT 1 FROM {table} WHERE {time} < $1)"
                ))
                .bind(cut)
                .fetch_one(pool)
                .await?;
                if !left {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let pruned = Pruned {
            outcomes: n[0],
            attempts: n[1],
            history: n[2],
        };
        sqlx::query(
            "UPDATE termination_prunes SET finished_at = now(), outcomes_removed = $2, \
           attempts_removed = $3, history_removed = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(pruned.outcomes as i64)
        .bind(pruned.attempts as i64)
        .bind(pruned.history as i64)
        .execute(pool)
        .await?;
        Ok(pruned)
    }
}
