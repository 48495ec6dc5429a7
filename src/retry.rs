//! The retry policy for API calls: pure arithmetic, no sleeping.
//!
//! Exponential backoff with full jitter (a uniformly random delay between
//! zero and the capped exponential), so that thousands of requests that fail
//! together do not retry together. A `Retry-After` from the server may
//! lengthen a delay, up to [`RETRY_AFTER_CAP`].

use std::time::Duration;

/// The longest a `Retry-After` may push one delay.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// Attempts per request, counting the first.
    pub max_attempts: u32,
    /// How long a request may be throttled with no other answer.
    pub throttle_give_up: Duration,
}

impl RetryPolicy {
    /// The delay before the next attempt after `attempts_made` counted
    /// attempts failed retryably, or `None` when attempts have run out.
    /// `unit` in `0.0..=1.0` is the jitter draw, passed in to keep this pure.
    pub fn delay(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        if attempts_made >= self.max_attempts {
            return None;
        }
        Some(self.jittered(attempts_made, retry_after, unit))
    }

    /// The delay before the next attempt after `in_a_row` throttled answers
    /// (429, or 503 with `Retry-After`), the first `throttled_for` ago; or
    /// `None` once that is `throttle_give_up`. Throttling is the API saying
    /// "later", so it never uses up `max_attempts`.
    pub fn throttled(
        &self,
        in_a_row: u32,
        throttled_for: Duration,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        if throttled_for >= self.throttle_give_up {
            return None;
        }
        Some(self.jittered(in_a_row, retry_after, unit))
    }

    fn jittered(&self, failures: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let jittered = self.ceiling(failures).mul_f64(unit.clamp(0.0, 1.0));
        match retry_after {
            Some(ra) => jittered.max(ra.min(RETRY_AFTER_CAP)),
            None => jittered,
        }
    }

    /// The cap of the jitter window after `attempts_made` failures:
    /// `initial * 2^(attempts_made - 1)`, at most `max`.
    pub fn ceiling(&self, attempts_made: u32) -> Duration {
        let doublings = attempts_made.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// How long to wait between probes while paused on 401: 1 s, doubling, at
/// most 30 s.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSchedule {
    next: Duration,
}

impl ProbeSchedule {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    pub fn current(&self) -> Duration {
        self.next
    }

    pub fn failed(&mut self) {
        self.next = (self.next * 2).min(Self::MAX);
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for ProbeSchedule {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
        max_attempts: 5,
        throttle_give_up: Duration::from_secs(3600),
    };

    #[test]
    fn the_window_doubles_up_to_the_max() {
        let caps: Vec<_> = (1..=8).map(|n| POLICY.ceiling(n).as_millis()).collect();
        assert_eq!(caps, [200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
        assert_eq!(POLICY.ceiling(1000), Duration::from_secs(10));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_window() {
        assert_eq!(POLICY.delay(3, None, 0.0), Some(Duration::ZERO));
        assert_eq!(POLICY.delay(3, None, 1.0), Some(Duration::from_millis(800)));
        assert_eq!(POLICY.delay(3, None, 0.5), Some(Duration::from_millis(400)));
    }

    #[test]
    fn attempts_run_out_counting_the_first() {
        assert!(POLICY.delay(4, None, 0.5).is_some());
        assert_eq!(POLICY.delay(5, None, 0.5), None);
        let once = RetryPolicy {
            max_attempts: 1,
            ..POLICY
        };
        assert_eq!(once.delay(1, None, 0.5), None);
    }

    #[test]
    fn retry_after_lengthens_up_to_a_minute() {
        let ra = Some(Duration::from_secs(30));
        assert_eq!(POLICY.delay(1, ra, 1.0), Some(Duration::from_secs(30)));
        let huge = Some(Duration::from_secs(3600));
        assert_eq!(POLICY.delay(1, huge, 1.0), Some(RETRY_AFTER_CAP));
        // A short Retry-After does not shorten the backoff.
        let short = Some(Duration::from_millis(1));
        assert_eq!(
            POLICY.delay(3, short, 1.0),
            Some(Duration::from_millis(800))
        );
    }

    #[test]
    fn throttling_backs_off_never_runs_out_of_attempts_and_gives_up_in_time() {
        let ra = Some(Duration::from_secs(1));
        let minute = Duration::from_secs(60);
        // The hundredth 429 in a row is retried: attempts are not counted.
        assert_eq!(
            POLICY.throttled(100, minute, ra, 0.0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            POLICY.throttled(100, minute, None, 1.0),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            POLICY.throttled(2, minute, ra, 1.0),
            Some(Duration::from_secs(1))
        );
        let hour = Duration::from_secs(3600);
        assert_eq!(POLICY.throttled(1, hour, ra, 0.5), None);
        assert!(
            POLICY
                .throttled(1, hour - Duration::from_secs(1), ra, 0.5)
                .is_some()
        );
    }

    #[test]
    fn probes_back_off_from_one_to_thirty_seconds() {
        let mut s = ProbeSchedule::new();
        let mut seen = vec![];
        for _ in 0..7 {
            seen.push(s.current().as_secs());
            s.failed();
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30]);
        s.reset();
        assert_eq!(s.current(), ProbeSchedule::FIRST);
    }
}
