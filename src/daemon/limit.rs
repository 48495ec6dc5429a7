//! The permits for API calls: `CONCURRENCY` of them, fixed, or fewer as the
//! adaptive limit ([`crate::limit`]) decides from the API's answers.
//!
//! One fair semaphore holds `CONCURRENCY` permits. The adaptive limit lowers
//! it by withholding permits (forgetting free ones at once, and the rest as
//! calls give them back) and raises it by returning them, so a call's
//! acquire stays one semaphore wait either way.

use crate::domain::{Attempt, ErrorKind};
use crate::limit::{AdaptiveLimit, Answer};
use crate::metrics::Metrics;
use crate::settings::ConcurrencyControl;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

pub struct CallLimit {
    cap: usize,
    permits: Semaphore,
    in_flight: AtomicUsize,
    /// `None` with `CONCURRENCY_CONTROL=fixed`.
    adaptive: Option<Mutex<Adaptive>>,
    metrics: Arc<Metrics>,
}

struct Adaptive {
    /// Its limit is the one the permits are at.
    control: AdaptiveLimit,
    /// Permits still to withhold as calls give them back.
    owed: usize,
    /// The limit last logged: a change of more than 2× from it is logged.
    logged: usize,
}

/// The right to make one call. Give it back with [`CallPermit::answered`]
/// (the answer teaches the adaptive limit) or by dropping it (no answer).
pub struct CallPermit<'a> {
    owner: &'a CallLimit,
    permit: Option<SemaphorePermit<'a>>,
    started: Instant,
}

impl CallLimit {
    pub fn new(cap: usize, control: ConcurrencyControl, metrics: Arc<Metrics>) -> Self {
        let cap = cap.max(1);
        let (start, adaptive) = match control {
            ConcurrencyControl::Fixed => (cap, None),
            ConcurrencyControl::Adaptive => {
                let control = AdaptiveLimit::new(cap, Instant::now().into_std());
                let start = control.limit();
                let adaptive = Adaptive {
                    control,
                    owed: 0,
                    logged: start,
                };
                (start, Some(Mutex::new(adaptive)))
            }
        };
        metrics.set_concurrency_limit(start);
        Self {
            cap,
            permits: Semaphore::new(start),
            in_flight: AtomicUsize::new(0),
            adaptive,
            metrics,
        }
    }

    /// The limit in force: `CONCURRENCY`, or what the adaptive limit says.
    pub fn current(&self) -> usize {
        self.adaptive
            .as_ref()
            .map_or(self.cap, |a| lock(a).control.limit())
    }

    /// Whether a 429 should hold every call start for its `Retry-After`:
    /// with a fixed limit, the one way it has to slow down. An adaptive
    /// limit cuts itself instead: a hold of a second after every 429 would
    /// throw away most of what a rate limit allows (each throttled request
    /// still waits its own `Retry-After`, which bounds the calls when even
    /// one at a time is refused).
    pub fn holds_on_429(&self) -> bool {
        self.adaptive.is_none()
    }

    /// Wait for a permit. `None` never happens (the semaphore is never
    /// closed), but is not worth a panic.
    pub async fn acquire(&self) -> Option<CallPermit<'_>> {
        let permit = self.permits.acquire().await.ok()?;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(CallPermit {
            owner: self,
            permit: Some(permit),
            started: Instant::now(),
        })
    }

    fn release(&self, permit: SemaphorePermit<'_>, answer: Option<&Attempt>, started: Instant) {
        let in_flight = self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(adaptive) = &self.adaptive else {
            drop(permit);
            return;
        };
        let mut a = lock(adaptive);
        if let Some(attempt) = answer {
            let before = a.control.limit();
            let changed = a.control.on_answer(Answer {
                started: started.into_std(),
                answered: Instant::now().into_std(),
                overloaded: overloads(attempt),
                in_flight,
            });
            if let Some(limit) = changed {
                self.apply(&mut a, before, limit);
            }
        }
        if a.owed > 0 {
            a.owed -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
    }

    /// Bring the permits from `from` to `limit`: withhold or return the
    /// difference.
    fn apply(&self, a: &mut Adaptive, from: usize, limit: usize) {
        if limit < from {
            let fewer = from - limit;
            let forgotten = self.permits.forget_permits(fewer);
            a.owed += fewer - forgotten;
        } else {
            let more = limit - from;
            let forgiven = more.min(a.owed);
            a.owed -= forgiven;
            self.permits.add_permits(more - forgiven);
        }
        self.metrics.set_concurrency_limit(limit);
        if limit >= 2 * a.logged || 2 * limit <= a.logged {
            tracing::info!(
                from = a.logged,
                to = limit,
                concurrency = self.cap,
                "the adaptive concurrency limit changed by more than 2x"
            );
            a.logged = limit;
        }
    }
}

impl CallPermit<'_> {
    /// The call starts now: the adaptive limit times the API from here, not
    /// from the permit, since the wait for `RATE_LIMIT` or a 429 hold in
    /// between is the daemon's own, not the API's.
    pub fn start(&mut self) {
        self.started = Instant::now();
    }

    /// The call was answered (or failed on the network): give the permit
    /// back and let the answer adjust the limit.
    pub fn answered(mut self, attempt: &Attempt) {
        if let Some(permit) = self.permit.take() {
            self.owner.release(permit, Some(attempt), self.started);
        }
    }
}

impl Drop for CallPermit<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.owner.release(permit, None, self.started);
        }
    }
}

/// What tells the limit the API has too much: a 429, a 503 (with or
/// without `Retry-After`), a timeout. Other errors are about the request or
/// the network, not the load.
fn overloads(attempt: &Attempt) -> bool {
    matches!(attempt.http_status, Some(429 | 503)) || attempt.error_kind == Some(ErrorKind::Timeout)
}

fn lock(a: &Mutex<Adaptive>) -> MutexGuard<'_, Adaptive> {
    // Every update is a few assignments; a panic elsewhere cannot leave the
    // state half-written, so a poisoned lock is still good to use.
    a.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::time::Duration;

    use crate::daemon::tests::answer as attempt;

    #[tokio::test(start_paused = true)]
    async fn a_cut_withholds_permits_even_those_in_use_and_growth_returns_them() {
        let metrics = Arc::new(Metrics::new());
        let limit = CallLimit::new(8, ConcurrencyControl::Adaptive, Arc::clone(&metrics));
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(limit.acquire().await.expect("permit"));
        }
        assert_eq!(limit.permits.available_permits(), 0);
        // A window of eight answers, all 429: the limit goes to 2 (a
        // quarter); the six permits it withholds are in use, so they are
        // withheld as they come back.
        tokio::time::advance(Duration::from_millis(5)).await;
        for permit in held.drain(..) {
            permit.answered(&attempt(429));
        }
        assert_eq!(limit.current(), 2);
        assert_eq!(limit.permits.available_permits(), 2);
        assert!(
            metrics
                .encode()
                .contains("aom_terminator_concurrency_limit 2")
        );
        // Two in flight, a third waits.
        let a = limit.acquire().await.expect("permit");
        let b = limit.acquire().await.expect("permit");
        let third = limit.acquire();
        tokio::pin!(third);
        assert!((&mut third).now_or_never().is_none(), "waits");
        // Good answers from calls started after the cut grow it back.
        tokio::time::advance(Duration::from_millis(5)).await;
        a.answered(&attempt(200));
        b.answered(&attempt(200));
        let c = third.await.expect("a permit once one is back");
        assert!(limit.current() >= 2);
        drop(c);
        assert_eq!(limit.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(
            limit.permits.available_permits(),
            limit.current(),
            "the permits are the limit"
        );
    }

    /// `n` calls that waited `wait` after their permit (RATE_LIMIT, a 429
    /// hold), `started` or not, then took 10 ms at the API.
    async fn calls_after_a_wait(limit: &CallLimit, n: usize, wait: Duration, started: bool) {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(limit.acquire().await.expect("permit"));
        }
        tokio::time::advance(wait).await;
        if started {
            held.iter_mut().for_each(CallPermit::start);
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        for permit in held {
            permit.answered(&attempt(200));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_times_the_api_from_the_call_not_from_the_permit() {
        let limit = CallLimit::new(32, ConcurrencyControl::Adaptive, Arc::new(Metrics::new()));
        calls_after_a_wait(&limit, 32, Duration::ZERO, true).await;
        let before = limit.current();
        // A second's wait for the daemon's own pacing is not the API
        // slowing down...
        calls_after_a_wait(&limit, 32, Duration::from_secs(1), true).await;
        assert!(limit.current() >= before, "{} < {before}", limit.current());
        // ...while the same second at the API is.
        calls_after_a_wait(&limit, 32, Duration::from_secs(1), false).await;
        assert!(limit.current() < before, "{} >= {before}", limit.current());
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_keeps_concurrency_whatever_the_answers() {
        let metrics = Arc::new(Metrics::new());
        let limit = CallLimit::new(4, ConcurrencyControl::Fixed, metrics);
        for _ in 0..100 {
            let permit = limit.acquire().await.expect("permit");
            permit.answered(&attempt(429));
        }
        assert_eq!(limit.current(), 4);
        assert_eq!(limit.permits.available_permits(), 4);
    }
}
