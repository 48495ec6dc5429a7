//! Load limits in front of the terminate route: the API gateway's throttling (a token
//! bucket, `--rate-limit`: 429 `APIGW.0308`) and the backend's capacity (`--capacity`
//! calls served at once, the others waiting in a FIFO queue of at most `--queue-limit`:
//! 503 `AOM.0503` beyond it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};
use tokio_util::sync::CancellationToken;

use super::stats::Stats;

/// The body of a throttled call, as Huawei Cloud's API gateway writes it.
pub(super) fn throttled_body(limit: u32) -> String {
    format!(
        r#"{{"error_code":"APIGW.0308","error_msg":"The throttling threshold has been reached: policy user over ratelimit,limit:{limit},time:1 second"}}"#
    )
}

/// The body of a call refused because the backend's queue is full.
pub(super) const BODY_BUSY: &str = r#"{"error_code":"AOM.0503","error_msg":"service busy"}"#;

/// The burst of a bucket of `rate` calls per second: a tenth of it, at least 1.
pub(super) fn burst(rate: u32) -> u32 {
    (rate / 10).max(1)
}

struct Bucket {
    rate: u32,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// A call refused by the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Throttled {
    /// The configured calls per second (said in the body).
    pub(super) limit: u32,
    /// Whole seconds until a token is there again, at least 1.
    pub(super) retry_after_secs: u64,
}

/// The gateway's token bucket: `rate` calls per second, [`burst`] at once; off when unset.
pub(super) struct RateLimiter {
    bucket: Mutex<Option<Bucket>>,
}

impl RateLimiter {
    pub(super) fn new(rate: Option<u32>) -> Self {
        let limiter = RateLimiter {
            bucket: Mutex::new(None),
        };
        limiter.set(rate);
        limiter
    }

    /// A new limit (a full bucket), or none (`None`, or 0).
    pub(super) fn set(&self, rate: Option<u32>) {
        let bucket = rate.filter(|&r| r > 0).map(|rate| Bucket {
            rate,
            burst: f64::from(burst(rate)),
            tokens: f64::from(burst(rate)),
            last: Instant::now(),
        });
        *self.bucket.lock().unwrap_or_else(PoisonError::into_inner) = bucket;
    }

    /// Takes a token for a call arriving at `now`, or says how long until there is one.
    pub(super) fn check(&self, now: Instant) -> Result<(), Throttled> {
        let mut guard = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(bucket) = guard.as_mut() else {
            return Ok(());
        };
        let rate = f64::from(bucket.rate);
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(bucket.burst);
        bucket.last = bucket.last.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Err(Throttled {
            limit: bucket.rate,
            retry_after_secs: secs.max(1),
        })
    }
}

/// What the backend does with a call.
pub(super) enum Admission<'a> {
    /// Served now (`queued` false) or after waiting its turn; the permit (none without a
    /// capacity) is held until the call is answered.
    Served {
        _permit: Option<SemaphorePermit<'a>>,
        queued: bool,
    },
    /// The queue is full: 503 `AOM.0503`.
    Busy,
    /// The server shut down while the call waited.
    ShuttingDown,
}

/// At most `capacity` calls served at once; the others wait their turn (FIFO: tokio's
/// semaphore is fair), at most `queue_limit` of them (unbounded when unset).
pub(super) struct Capacity {
    semaphore: Option<Semaphore>,
    queue_limit: Option<u32>,
}

impl Capacity {
    pub(super) fn new(capacity: Option<u32>, queue_limit: Option<u32>) -> Self {
        Capacity {
            semaphore: capacity
                .filter(|&c| c > 0)
                .map(|c| Semaphore::new(usize::try_from(c).unwrap_or(Semaphore::MAX_PERMITS))),
            queue_limit,
        }
    }

    /// Waits for a place; counts the calls waiting in `stats` (`queued`, `max_queued`).
    pub(super) async fn admit(&self, stats: &Stats, shutdown: &CancellationToken) -> Admission<'_> {
        let Some(semaphore) = &self.semaphore else {
            return Admission::Served {
                _permit: None,
                queued: false,
            };
        };
        match semaphore.try_acquire() {
            Ok(permit) => {
                return Admission::Served {
                    _permit: Some(permit),
                    queued: false,
                };
            }
            Err(TryAcquireError::Closed) => return Admission::Busy,
            Err(TryAcquireError::NoPermits) => {}
        }
        let limit = self.queue_limit.map_or(u64::MAX, u64::from);
        let Ok(before) = stats
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                (q < limit).then_some(q + 1)
            })
        else {
            return Admission::Busy;
        };
        stats.max_queued.fetch_max(before + 1, Ordering::Relaxed);
        let _waiting = Waiting(&stats.queued);
        tokio::select! {
            permit = semaphore.acquire() => match permit {
                Ok(permit) => Admission::Served { _permit: Some(permit), queued: true },
                Err(_) => Admission::Busy,
            },
            () = shutdown.cancelled() => Admission::ShuttingDown,
        }
    }
}

/// Counts a call as waiting for as long as it lives (also when its client goes away).
struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_a_tenth_at_least_one() {
        assert_eq!(burst(1), 1);
        assert_eq!(burst(9), 1);
        assert_eq!(burst(10), 1);
        assert_eq!(burst(25), 2);
        assert_eq!(burst(1000), 100);
    }

    #[test]
    fn bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(Some(50));
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(limiter.check(t0), Ok(()));
        }
        let refused = limiter.check(t0).unwrap_err();
        assert_eq!(
            refused,
            Throttled {
                limit: 50,
                retry_after_secs: 1
            }
        );
        // 20 ms later one token (50/s) is back, and only one.
        let t1 = t0 + Duration::from_millis(20);
        assert_eq!(limiter.check(t1), Ok(()));
        assert!(limiter.check(t1).is_err());
        // Long idle refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| limiter.check(t2).is_ok()).count(), 5);
        // Off.
        limiter.set(None);
        assert!((0..1000).all(|_| limiter.check(t2).is_ok()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        // 1 call per second: the next token is a second away, then less, still said as 1.
        let limiter = RateLimiter::new(Some(1));
        let t0 = Instant::now();
        assert_eq!(limiter.check(t0), Ok(()));
        assert_eq!(limiter.check(t0).unwrap_err().retry_after_secs, 1);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limiter.check(t1).unwrap_err().retry_after_secs, 1);
    }

    #[test]
    fn throttled_body_is_the_gateways() {
        assert_eq!(
            throttled_body(7),
            r#"{"error_code":"APIGW.0308","error_msg":"The throttling threshold has been reached: policy user over ratelimit,limit:7,time:1 second"}"#
        );
    }

    #[tokio::test]
    async fn capacity_queues_then_refuses() {
        let stats = Stats::new();
        let shutdown = CancellationToken::new();
        let capacity = Capacity::new(Some(1), Some(1));
        let first = capacity.admit(&stats, &shutdown).await;
        assert!(matches!(first, Admission::Served { queued: false, .. }));
        let mut second = Box::pin(capacity.admit(&stats, &shutdown));
        assert!(futures_poll_once(second.as_mut()).await.is_none());
        assert_eq!(stats.queued.load(Ordering::Relaxed), 1);
        let third = capacity.admit(&stats, &shutdown).await;
        assert!(matches!(third, Admission::Busy));
        drop(first);
        assert!(matches!(
            second.await,
            Admission::Served { queued: true, .. }
        ));
        assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
        assert_eq!(stats.max_queued.load(Ordering::Relaxed), 1);
        // Without a capacity, everything is served at once.
        let open = Capacity::new(None, Some(0));
        assert!(matches!(
            open.admit(&stats, &shutdown).await,
            Admission::Served { queued: false, .. }
        ));
    }

    /// Polls a future once: `Some` with its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
