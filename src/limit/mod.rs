//! The adaptive concurrency limit: pure arithmetic on the API's answers,
//! with the caller's timestamps (no clock, no sleeping), so that it can be
//! driven by synthetic signals in tests.
//!
//! Loss-based, like TCP CUBIC and the AWS SDKs' adaptive retry mode: the
//! limit starts at the cap (`CONCURRENCY`) or 128, whichever is lower, and
//! until the first overload grows by one call per good answer (doubling
//! every round trip, TCP's slow start), so that a large cap does not open
//! with a burst an API's queue must refuse, and an API without limits
//! reaches the cap within a few round trips. On overload it is cut, and it
//! grows back along a cubic curve that is slow near the limit where
//! overload last struck and quick far from it.
//!
//! - Overload is a 429, a 503, a timeout, or latency well above its recent
//!   minimum: the fastest answer of a window at 1.5 times the minimum of the
//!   last 15-30 s, and 5 ms above it. The fastest, not the mean: on a busy
//!   host one late wake-up lifts a mean, while a queue at the API delays
//!   every call. Only a window of 16 answers or more is judged on latency:
//!   the fastest of one or two answers is noise on a busy host.
//! - The limit is judged once per window (as many answers as the limit),
//!   so a burst of 429s from one round of calls is one cut, not hundreds.
//!   Answers to calls started before the last cut are ignored: they report
//!   on the old limit.
//! - A cut keeps the share of the window that succeeded, between a quarter
//!   and 0.7 (CUBIC's β). Replicas sharing one rate limit each see 429s in
//!   proportion to their own rate; multiplicative cuts with the same
//!   growth make them converge to equal shares without coordination.

use std::time::{Duration, Instant};

/// CUBIC's usual cut: keep 70%.
const BETA: f64 = 0.7;
/// The deepest cut in one window, when nearly every call was refused.
const DEEPEST_CUT: f64 = 0.25;
/// CUBIC's growth constant, in calls per second cubed.
const GROWTH: f64 = 0.4;
/// Where the limit starts (or at the cap, if lower).
const INITIAL: f64 = 128.0;
/// Latency this many times its recent minimum is overload...
const LATENCY_RATIO: f64 = 1.5;
/// ...if it is also this much above it.
const LATENCY_FLOOR: Duration = Duration::from_millis(5);
/// The fewest answers a window needs to be judged on latency.
const LATENCY_MIN_ANSWERS: u32 = 16;
/// The minimum latency is the minimum over the last one to two of these.
const MIN_LATENCY_WINDOW: Duration = Duration::from_secs(15);

/// One answer as the controller sees it.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// When its call started, and when it was answered.
    pub started: Instant,
    pub answered: Instant,
    /// 429, 503, a timeout: the API says it has too much.
    pub overloaded: bool,
    /// Calls in flight when it was answered (itself included).
    pub in_flight: usize,
}

/// The limit of calls in flight, between 1 and the cap.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    cap: f64,
    limit: f64,
    /// The last cut: when, the limit before it, and the cubic's time to
    /// grow back to it. `None` until the first overload.
    cut: Option<Cut>,
    window: Window,
    min_latency: WindowedMin,
}

#[derive(Debug, Clone, Copy)]
struct Cut {
    at: Instant,
    before: f64,
    /// Seconds until the cubic is back at `before` (CUBIC's K).
    plateau_s: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    answers: u32,
    overloaded: u32,
    fastest: Option<Duration>,
    most_in_flight: usize,
}

impl AdaptiveLimit {
    /// A limit of at most `cap` (at least 1).
    pub fn new(cap: usize, now: Instant) -> Self {
        let cap = cap.max(1) as f64;
        Self {
            cap,
            limit: cap.min(INITIAL),
            cut: None,
            window: Window::default(),
            min_latency: WindowedMin::new(now),
        }
    }

    /// The current limit: whole calls, at least 1.
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// Take one answer into account. Returns the new limit when the
    /// whole-call limit changed.
    pub fn on_answer(&mut self, a: Answer) -> Option<usize> {
        if self.cut.is_some_and(|c| a.started < c.at) {
            return None; // it reports on the limit before the last cut
        }
        let before = self.limit();
        if self.cut.is_none() && !a.overloaded && self.used(a.in_flight) {
            self.limit = (self.limit + 1.0).min(self.cap); // slow start
        }
        let latency = a.answered.saturating_duration_since(a.started);
        if !a.overloaded {
            self.min_latency.observe(latency, a.answered);
        }
        let w = &mut self.window;
        w.answers += 1;
        w.overloaded += u32::from(a.overloaded);
        w.fastest = Some(w.fastest.map_or(latency, |f| f.min(latency)));
        w.most_in_flight = w.most_in_flight.max(a.in_flight);
        if f64::from(w.answers) >= self.limit.floor().max(1.0) {
            let window = std::mem::take(&mut self.window);
            self.judge(window, a.answered);
        }
        let after = self.limit();
        (after != before).then_some(after)
    }

    fn judge(&mut self, w: Window, now: Instant) {
        let answers = f64::from(w.answers);
        let queueing = match (w.fastest, self.min_latency.get()) {
            (Some(fastest), Some(min)) if w.answers >= LATENCY_MIN_ANSWERS => {
                fastest.as_secs_f64() > LATENCY_RATIO * min.as_secs_f64()
                    && fastest > min + LATENCY_FLOOR
            }
            _ => false,
        };
        if w.overloaded > 0 || queueing {
            let kept = 1.0 - f64::from(w.overloaded) / answers;
            self.cut(kept.clamp(DEEPEST_CUT, BETA), now);
        } else if self.used(w.most_in_flight) {
            self.grow(now);
        }
    }

    /// Grow only a limit that is being used: one that a slow producer
    /// never reaches says nothing about the API.
    fn used(&self, in_flight: usize) -> bool {
        in_flight as f64 >= self.limit / 2.0
    }

    fn cut(&mut self, keep: f64, now: Instant) {
        let before = self.limit;
        self.limit = (before * keep).max(1.0);
        let plateau_s = (before * (1.0 - keep) / GROWTH).cbrt();
        self.cut = Some(Cut {
            at: now,
            before,
            plateau_s,
        });
    }

    fn grow(&mut self, now: Instant) {
        let Some(cut) = self.cut else {
            return; // still at the cap
        };
        let t = now.saturating_duration_since(cut.at).as_secs_f64() - cut.plateau_s;
        let cubic = cut.before + GROWTH * t * t * t;
        // At least one call per window, as plain AIMD would (CUBIC's
        // "TCP-friendly" region): a small limit must not wait for the cube.
        let target = cubic.max(self.limit + 1.0 / self.limit.max(1.0));
        self.limit = target.clamp(1.0, self.cap);
    }
}

/// The minimum over a sliding time window, kept as two halves: the minimum
/// of this half and of the one before. A rise in the API's base latency is
/// accepted within two halves.
#[derive(Debug, Clone)]
struct WindowedMin {
    current: Option<Duration>,
    previous: Option<Duration>,
    since: Instant,
}

impl WindowedMin {
    fn new(now: Instant) -> Self {
        Self {
            current: None,
            previous: None,
            since: now,
        }
    }

    fn observe(&mut self, sample: Duration, now: Instant) {
        if now.saturating_duration_since(self.since) >= MIN_LATENCY_WINDOW {
            self.previous = self.current;
            self.current = None;
            self.since = now;
        }
        self.current = Some(self.current.map_or(sample, |c| c.min(sample)));
    }

    fn get(&self) -> Option<Duration> {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests;
