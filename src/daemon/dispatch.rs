//! One request through its attempts to an outcome, with at most
//! `CONCURRENCY` API calls in flight across the whole daemon, and the 401
//! pause that keeps bad credentials from failing anybody's request.

use crate::aom::{CallError, TerminateClient};
use crate::domain::{Attempt, ErrorKind, Outcome, TerminationRequest, Verdict};
use crate::metrics::Metrics;
use crate::retry::{ProbeSchedule, RetryPolicy};
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where a request ended.
#[derive(Debug)]
pub struct Dispatched {
    /// Every attempt made, in order (401 answers included).
    pub attempts: Vec<Attempt>,
    /// `None` when shutdown cut it short: the request stays unacked.
    pub outcome: Option<Outcome>,
}

/// The terminate API as the dispatcher sees it: one call, and a way to
/// say that a credential was refused. [`TerminateClient`] in the daemon; a
/// scripted fake in the unit tests.
pub trait Api: Send + Sync + 'static {
    /// One attempt; `Err` when no credential could be had or TLS failed (a
    /// fault of the configuration: no verdict on the request).
    fn terminate(
        &self,
        req: &TerminationRequest,
    ) -> impl Future<Output = Result<Attempt, CallError>> + Send;

    /// The API answered 401 to a call made with `generation`: whether a new
    /// credential may now be available (worth one immediate retry).
    fn rejected(&self, generation: u64) -> bool;
}

impl Api for TerminateClient {
    async fn terminate(&self, req: &TerminationRequest) -> Result<Attempt, CallError> {
        TerminateClient::terminate(self, req).await
    }

    fn rejected(&self, generation: u64) -> bool {
        self.auth().rejected(generation)
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

pub struct Dispatcher<A> {
    api: A,
    policy: RetryPolicy,
    calls: Arc<Semaphore>,
    /// `RATE_LIMIT`: call starts per second, across the daemon.
    limiter: Option<Limiter>,
    /// Set by a 429: no call starts before this instant.
    throttled_until: Mutex<Option<Instant>>,
    /// One waiter at a time on the rate limiter, the rest queue here
    /// quietly (woken together, they would spin).
    limiter_turn: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    pub gate: AuthGate,
    /// Soft stop: requests that have not made their first call stay unsent.
    stop: CancellationToken,
    /// Hard stop: the shutdown grace is over; whatever is in flight is left.
    abort: CancellationToken,
}

impl<A: Api> Dispatcher<A> {
    pub fn new(
        api: A,
        policy: RetryPolicy,
        concurrency: usize,
        rate_limit: Option<NonZeroU32>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) -> Self {
        // A small burst (a twentieth of a second's worth): the rate holds
        // over seconds, not only on average over minutes.
        let limiter = rate_limit.map(|r| {
            let burst = NonZeroU32::new((r.get() / 20).max(1)).unwrap_or(NonZeroU32::MIN);
            governor::RateLimiter::direct(governor::Quota::per_second(r).allow_burst(burst))
        });
        Self {
            api,
            policy,
            calls: Arc::new(Semaphore::new(concurrency)),
            limiter,
            throttled_until: Mutex::new(None),
            limiter_turn: tokio::sync::Mutex::new(()),
            metrics,
            gate: AuthGate::new(),
            stop,
            abort,
        }
    }

    /// The API this dispatcher calls.
    pub fn api(&self) -> &A {
        &self.api
    }

    /// Attempts until a final verdict, attempts run out, shutdown, or
    /// `held` fires (the broker took the request's message back: a call
    /// already made finishes, but no further call starts; the attempts made
    /// are returned unfinished, and the message's redelivery carries on).
    pub async fn dispatch(&self, req: &TerminationRequest, held: &CancellationToken) -> Dispatched {
        let mut attempts = Vec::new();
        let mut counted = 0u32;
        let unfinished = |attempts| Dispatched {
            attempts,
            outcome: None,
        };
        if self.stop.is_cancelled() || held.is_cancelled() {
            return unfinished(attempts);
        }
        let mut probed = None;
        let mut auth_retried = false;
        loop {
            let attempt = match probed.take() {
                Some(answer) => answer,
                None => {
                    let open = tokio::select! {
                        open = self.gate.wait_open(&self.abort) => open,
                        () = held.cancelled() => false,
                    };
                    if !open {
                        return unfinished(attempts);
                    }
                    match self.call(req, Some(held)).await {
                        Call::Answered(answer) => answer,
                        Call::Aborted => return unfinished(attempts),
                        Call::NoCredential(e) => {
                            let why = e.to_string();
                            match self.probe_until_authorized(req, &mut attempts, &why).await {
                                Probe::Aborted => return unfinished(attempts),
                                Probe::Reopened => continue,
                                Probe::Answered(answer) => answer,
                            }
                        }
                    }
                }
            };
            let verdict = attempt.verdict;
            let generation = attempt.auth_generation;
            attempts.push(attempt);
            match verdict {
                Verdict::Succeeded => return finished(attempts, Outcome::Succeeded),
                Verdict::Permanent => return finished(attempts, Outcome::FailedPermanent),
                Verdict::Retryable { retry_after } => {
                    counted += 1;
                    let throttled =
                        attempts.last().and_then(|a| a.error_kind) == Some(ErrorKind::Throttled);
                    let Some(delay) = self.policy.delay(counted, retry_after, fastrand::f64())
                    else {
                        return finished(attempts, Outcome::FailedRetriesExhausted);
                    };
                    if throttled {
                        self.throttle(delay);
                    }
                    tracing::debug!(
                        request_id = %req.request_id,
                        workflow_id = %req.workflow_id,
                        execution_id = %req.execution_id,
                        attempt = attempts.len(),
                        delay_ms = delay.as_millis() as u64,
                        "retryable answer; backing off"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.abort.cancelled() => return unfinished(attempts),
                        () = held.cancelled() => return unfinished(attempts),
                    }
                }
                Verdict::Unauthorized => {
                    // Not counted: the credentials are wrong, not the request.
                    // A renewed IAM token or a rotated token file is worth
                    // one immediate retry; otherwise pause and probe.
                    if !auth_retried {
                        auth_retried = true;
                        if self.api.rejected(generation) {
                            continue;
                        }
                    }
                    let why = "the AOM API answered 401: the credentials are wrong or expired";
                    match self.probe_until_authorized(req, &mut attempts, why).await {
                        Probe::Aborted => return unfinished(attempts),
                        Probe::Reopened => {}
                        Probe::Answered(answer) => probed = Some(answer),
                    }
                }
            }
        }
    }

    /// A 429: the API wants fewer calls from all of us, not a retry from
    /// each task on its own schedule. Hold every call start for `delay`.
    fn throttle(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut held = self
            .throttled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if held.is_none_or(|h| h < until) {
            if held.is_none_or(|h| h < Instant::now()) {
                tracing::warn!(
                    pause_ms = delay.as_millis() as u64,
                    "the AOM API is throttling (429): pausing all calls"
                );
            }
            *held = Some(until);
        }
    }

    /// Wait for the 429 hold and the rate limit before starting a call.
    async fn pace(&self) {
        loop {
            let until = *self
                .throttled_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
        if let Some(limiter) = &self.limiter {
            let _turn = self.limiter_turn.lock().await;
            while let Err(not_until) = limiter.check() {
                let clock = governor::clock::DefaultClock::default();
                let wait = not_until.wait_time_from(governor::clock::Clock::now(&clock));
                tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
            }
        }
    }

    /// One API call under a concurrency permit. With `held`, the call is
    /// not made if it fires while the call waits for its turn.
    async fn call(&self, req: &TerminationRequest, held: Option<&CancellationToken>) -> Call {
        let work = async {
            let Ok(_permit) = self.calls.acquire().await else {
                return Call::Aborted; // the semaphore is never closed
            };
            self.pace().await;
            if held.is_some_and(CancellationToken::is_cancelled) {
                return Call::Aborted;
            }
            self.metrics.call_started();
            let answer = self.api.terminate(req).await;
            self.metrics.call_ended();
            match answer {
                Ok(attempt) => {
                    self.metrics.answered(&attempt);
                    Call::Answered(attempt)
                }
                Err(e) => Call::NoCredential(e),
            }
        };
        tokio::select! {
            call = work => call,
            () = self.abort.cancelled() => Call::Aborted,
        }
    }

    /// Called after a 401. Takes its turn as the single prober: waits the
    /// probe delay and retries this request, until an answer is not 401 (a
    /// verdict on the request, returned to be classified) or somebody else's
    /// probe has reopened the gate.
    async fn probe_until_authorized(
        &self,
        req: &TerminationRequest,
        attempts: &mut Vec<Attempt>,
        why: &str,
    ) -> Probe {
        self.gate.close(why);
        self.metrics.set_paused(true);
        loop {
            let _turn = tokio::select! {
                turn = self.gate.probe_turn.lock() => turn,
                () = self.abort.cancelled() => return Probe::Aborted,
            };
            if self.gate.is_open() {
                return Probe::Reopened;
            }
            let delay = self.gate.schedule().current();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.abort.cancelled() => return Probe::Aborted,
            }
            // A probe is about the credentials, not the request's message:
            // it goes on even if that message was taken back, or the gate
            // would never reopen.
            match self.call(req, None).await {
                Call::Aborted => return Probe::Aborted,
                Call::NoCredential(e) => self.gate.probe_failed(&e.to_string()),
                Call::Answered(attempt) if attempt.verdict == Verdict::Unauthorized => {
                    // Let the source refresh (re-read the file, renew the
                    // IAM token) before the next probe.
                    self.api.rejected(attempt.auth_generation);
                    self.gate.probe_failed("the AOM API still answers 401");
                    attempts.push(attempt);
                }
                Call::Answered(attempt) => {
                    self.gate.open();
                    self.metrics.set_paused(false);
                    return Probe::Answered(attempt);
                }
            }
        }
    }
}

enum Call {
    Answered(Attempt),
    NoCredential(CallError),
    Aborted,
}

enum Probe {
    Aborted,
    Reopened,
    Answered(Attempt),
}

fn finished(attempts: Vec<Attempt>, outcome: Outcome) -> Dispatched {
    Dispatched {
        attempts,
        outcome: Some(outcome),
    }
}

/// Open while the credentials work. Closed by a 401: no new messages are
/// taken, no new calls start, and one request at a time probes the API,
/// 1 s apart at first, growing to 30 s.
#[derive(Debug)]
pub struct AuthGate {
    open: watch::Sender<bool>,
    probe_turn: tokio::sync::Mutex<()>,
    schedule: Mutex<ProbeSchedule>,
}

impl AuthGate {
    fn new() -> Self {
        Self {
            open: watch::Sender::new(true),
            probe_turn: tokio::sync::Mutex::new(()),
            schedule: Mutex::new(ProbeSchedule::new()),
        }
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Wait until the gate is open; `false` if `cancel` fires first.
    pub async fn wait_open(&self, cancel: &CancellationToken) -> bool {
        let mut rx = self.open.subscribe();
        tokio::select! {
            open = rx.wait_for(|open| *open) => open.is_ok(),
            () = cancel.cancelled() => false,
        }
    }

    fn close(&self, why: &str) {
        let was_open = self.open.send_replace(false);
        if was_open {
            tracing::error!(
                "{why}. Pausing: no new messages are taken, affected requests stay unacked, \
                 and the API is probed until it accepts the credentials"
            );
        }
    }

    fn open(&self) {
        self.lock_schedule().reset();
        if !self.open.send_replace(true) {
            tracing::info!("the AOM API accepts the credentials again; resuming");
        }
    }

    fn probe_failed(&self, why: &str) {
        let mut s = self.lock_schedule();
        s.failed();
        tracing::warn!(
            next_probe_in_s = s.current().as_secs(),
            "still paused: {why}"
        );
    }

    fn schedule(&self) -> ProbeSchedule {
        *self.lock_schedule()
    }

    fn lock_schedule(&self) -> std::sync::MutexGuard<'_, ProbeSchedule> {
        // The schedule is two numbers; a panic elsewhere cannot leave it
        // half-written, so a poisoned lock is still good to use.
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }
}
