//! A connection a task keeps from one call to the next.

use super::AuditError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use std::time::Duration;

/// A kept connection's call that has had no answer for this long is given up and its
/// connection closed (a connection whose peer vanished without a word
/// would otherwise hang it for good); the call is then tried again.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection the writer (or the lookup task) keeps from one call to
/// the next. A connection
/// taken from a sqlx pool is pinged when it is taken and again when it is
/// given back: two more round trips to the database for every flush, each
/// a wake-up of both processes. The task keeps its connection instead, and
/// closes it after any error (it may be broken, or inside a failed
/// transaction); the next call takes a fresh one from the pool.
pub(super) struct Kept {
    pool: PgPool,
    /// Only its one task uses it; the lock is what lets each retry's future
    /// (made by `until_done`'s `FnMut`) borrow the connection.
    conn: tokio::sync::Mutex<Option<PoolConnection<Postgres>>>,
}

impl Kept {
    pub(super) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    pub(super) async fn call<T>(
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
