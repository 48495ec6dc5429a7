//! One request through its attempts to an outcome, with at most
//! `CONCURRENCY` API calls in flight across the whole daemon (fewer while
//! the adaptive limit backs off, see `daemon::limit`), the per-project
//! holds that keep credentials which do not cover a project from failing
//! that project's requests (see `daemon::holds`), and throttling that never
//! uses up a request's attempts.

use super::holds::{Holds, Role};
use super::limit::CallLimit;
use crate::aom::{CallError, TerminateClient};
use crate::domain::{Attempt, ErrorKind, Outcome, ProjectId, TerminationRequest, Verdict};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::settings::ConcurrencyControl;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where a request ended.
#[derive(Debug)]
pub struct Dispatched {
    /// Every attempt made, in order (401 answers included).
    pub attempts: Vec<Attempt>,
    pub end: End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A final outcome.
    Final(Outcome),
    /// No call can be made for it (its region cannot be found): `rejected`
    /// with this reason.
    Rejected(String),
    /// Its project is held and another request probes for it: park it.
    Parked,
    /// Shutdown or a take-back cut it short: the request stays unacked.
    Unfinished,
}

/// The terminate API as the dispatcher sees it: one call, and a way to
/// say that a credential was refused. [`TerminateClient`] in the daemon; a
/// scripted fake in the unit tests.
pub trait Api: Send + Sync + 'static {
    /// One attempt; `Err` when no call was made: no credential could be had
    /// or the credentials do not cover the project, the region cannot be
    /// found, or TLS failed.
    fn terminate(
        &self,
        req: &TerminationRequest,
    ) -> impl Future<Output = Result<Attempt, CallError>> + Send;

    /// The API answered 401 to a call for `project` made with `generation`:
    /// whether a new credential may now be available (worth one immediate
    /// retry).
    fn rejected(&self, project: &ProjectId, generation: u64) -> bool;
}

impl Api for TerminateClient {
    async fn terminate(&self, req: &TerminationRequest) -> Result<Attempt, CallError> {
        TerminateClient::terminate(self, req).await
    }

    fn rejected(&self, project: &ProjectId, generation: u64) -> bool {
        self.auth().rejected(project, generation)
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

pub struct Dispatcher<A> {
    api: A,
    policy: RetryPolicy,
    /// The permits for calls in flight: CONCURRENCY, fixed or adaptive.
    pub calls: CallLimit,
    /// `RATE_LIMIT`: call starts per second, across the daemon.
    limiter: Option<Limiter>,
    /// Set by a 429: no call starts before this instant.
    throttled_until: Mutex<Option<Instant>>,
    /// One waiter at a time on the rate limiter, the rest queue here
    /// quietly (woken together, they would spin).
    limiter_turn: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    pub holds: Arc<Holds>,
    /// Soft stop: requests that have not made their first call stay unsent.
    stop: CancellationToken,
    /// Hard stop: the shutdown grace is over; whatever is in flight is left.
    abort: CancellationToken,
}

/// How many calls may run, and how fast they may start.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `CONCURRENCY`: calls in flight at once, across the daemon.
    pub concurrency: usize,
    /// `CONCURRENCY_CONTROL`: always `concurrency`, or fewer on overload.
    pub control: ConcurrencyControl,
    /// `RATE_LIMIT`: call starts per second.
    pub rate_limit: Option<NonZeroU32>,
}

impl<A: Api> Dispatcher<A> {
    pub fn new(
        api: A,
        policy: RetryPolicy,
        limits: Limits,
        metrics: Arc<Metrics>,
        holds: Arc<Holds>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) -> Self {
        // A small burst (a twentieth of a second's worth): the rate holds
        // over seconds, not only on average over minutes.
        let limiter = limits.rate_limit.map(|r| {
            let burst = NonZeroU32::new((r.get() / 20).max(1)).unwrap_or(NonZeroU32::MIN);
            governor::RateLimiter::direct(governor::Quota::per_second(r).allow_burst(burst))
        });
        Self {
            api,
            policy,
            calls: CallLimit::new(limits.concurrency, limits.control, Arc::clone(&metrics)),
            limiter,
            throttled_until: Mutex::new(None),
            limiter_turn: tokio::sync::Mutex::new(()),
            metrics,
            holds,
            stop,
            abort,
        }
    }

    /// The API this dispatcher calls.
    pub fn api(&self) -> &A {
        &self.api
    }

    /// Attempts until a final verdict, attempts run out, shutdown, the
    /// project is held (park it), or `held` fires (the broker took the
    /// request's message back: a call already made finishes, but no further
    /// call starts; the attempts made are returned unfinished, and the
    /// message's redelivery carries on).
    /// `throttled_since`: when an earlier delivery's throttled run began
    /// (from the audit), so that `THROTTLE_GIVE_UP` counts from there.
    pub async fn dispatch(
        &self,
        req: &TerminationRequest,
        held: &CancellationToken,
        throttled_since: Option<DateTime<Utc>>,
    ) -> Dispatched {
        let mut attempts = Vec::new();
        let mut counted = 0u32;
        // Throttled answers in a row, and when the first of them came.
        let since = throttled_since.map(|at| {
            let ago = (Utc::now() - at).to_std().unwrap_or_default();
            Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
        });
        let mut throttled = (0u32, since);
        let end = |attempts, end| Dispatched { attempts, end };
        if self.stop.is_cancelled() || held.is_cancelled() {
            return end(attempts, End::Unfinished);
        }
        let project = &req.project_id;
        let mut probed = None;
        let mut auth_retried = false;
        loop {
            let refused = match probed.take() {
                Some(answer) => Ok(answer),
                None if self.holds.is_held(project) => Err(None),
                None => match self.call(req, Some(held)).await {
                    Call::Answered(answer) => Ok(answer),
                    Call::Aborted => return end(attempts, End::Unfinished),
                    Call::Refused(CallError::Unroutable(why)) => {
                        return end(attempts, End::Rejected(why));
                    }
                    Call::Refused(e) => Err(Some(e.to_string())),
                },
            };
            let attempt = match refused {
                Ok(attempt) => attempt,
                Err(why) => {
                    let why = why.unwrap_or_else(|| "the project is held".to_owned());
                    match Box::pin(self.hold_or_probe(req, &mut attempts, &why, held)).await {
                        Probe::Aborted => return end(attempts, End::Unfinished),
                        Probe::Park => return end(attempts, End::Parked),
                        Probe::Unroutable(why) => return end(attempts, End::Rejected(why)),
                        Probe::Answered(answer) => answer,
                    }
                }
            };
            let verdict = attempt.verdict;
            let generation = attempt.auth_generation;
            if verdict != Verdict::Unauthorized {
                self.holds.seen(project);
            }
            let is_throttled = attempt.is_throttled();
            if !is_throttled {
                throttled = (0, None);
            }
            attempts.push(attempt);
            match verdict {
                Verdict::Succeeded => return end(attempts, End::Final(Outcome::Succeeded)),
                Verdict::Permanent => return end(attempts, End::Final(Outcome::FailedPermanent)),
                Verdict::Retryable { retry_after } => {
                    let unit = fastrand::f64();
                    let delay = if is_throttled {
                        // "Later", not "no": not counted; only a throttling
                        // that outlasts THROTTLE_GIVE_UP ends the request.
                        let (in_a_row, since) = &mut throttled;
                        *in_a_row += 1;
                        let since = *since.get_or_insert_with(Instant::now);
                        self.policy
                            .throttled(*in_a_row, since.elapsed(), retry_after, unit)
                    } else {
                        counted += 1;
                        self.policy.delay(counted, retry_after, unit)
                    };
                    let Some(delay) = delay else {
                        return end(attempts, End::Final(Outcome::FailedRetriesExhausted));
                    };
                    if attempts.last().and_then(|a| a.error_kind) == Some(ErrorKind::Throttled)
                        && self.calls.holds_on_429()
                    {
                        // The hold is what the API asked for (its
                        // Retry-After), not this request's own backoff:
                        // throttles no longer end requests, so backoffs
                        // grow to BACKOFF_MAX_MS, and holding everyone for
                        // the longest of them stalled a fixed limit.
                        self.throttle(retry_after.unwrap_or(delay).min(delay));
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
                        () = self.abort.cancelled() => return end(attempts, End::Unfinished),
                        () = held.cancelled() => return end(attempts, End::Unfinished),
                    }
                }
                Verdict::Unauthorized => {
                    // Not counted: the credentials are wrong, not the request.
                    // A renewed IAM token or a rotated token file is worth
                    // one immediate retry; otherwise hold the project.
                    if !auth_retried {
                        auth_retried = true;
                        if self.api.rejected(project, generation) {
                            continue;
                        }
                    }
                    let why = "the AOM API answered 401: the credentials are wrong or expired, \
                               or do not cover this project";
                    match Box::pin(self.hold_or_probe(req, &mut attempts, why, held)).await {
                        Probe::Aborted => return end(attempts, End::Unfinished),
                        Probe::Park => return end(attempts, End::Parked),
                        Probe::Unroutable(why) => return end(attempts, End::Rejected(why)),
                        Probe::Answered(answer) => probed = Some(answer),
                    }
                }
            }
        }
    }

    /// A 429 with a fixed limit: the API wants fewer calls from all of us,
    /// not a retry from each task on its own schedule. Hold every call
    /// start for `delay`.
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
            let Some(mut permit) = self.calls.acquire().await else {
                return Call::Aborted; // the semaphore is never closed
            };
            self.pace().await;
            permit.start();
            if held.is_some_and(CancellationToken::is_cancelled) {
                return Call::Aborted;
            }
            self.metrics.call_started();
            let answer = self.api.terminate(req).await;
            self.metrics.call_ended();
            match answer {
                Ok(attempt) => {
                    self.metrics.answered(&attempt);
                    permit.answered(&attempt);
                    Call::Answered(attempt)
                }
                Err(e) => Call::Refused(e),
            }
        };
        tokio::select! {
            call = work => call,
            () = self.abort.cancelled() => Call::Aborted,
        }
    }

    /// The request's project is refused. Hold it; unless another request
    /// already probes for it, probe with this one: wait the probe delay and
    /// retry it, until an answer is not a refusal (a verdict on the
    /// request, returned to be classified) or the project is released by
    /// someone else (then go on as usual).
    async fn hold_or_probe(
        &self,
        req: &TerminationRequest,
        attempts: &mut Vec<Attempt>,
        why: &str,
        held: &CancellationToken,
    ) -> Probe {
        let project = &req.project_id;
        if self.holds.hold(project, why) == Role::Park {
            return Probe::Park;
        }
        // The prober's message taken back: its redelivery parks or probes
        // anew, so this one stops (a probe already started finishes).
        let left = |probe| {
            self.holds.prober_left(project);
            probe
        };
        loop {
            let delay = self.holds.next_probe(project);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // Another project released: the credentials may have been
                // renewed; try now rather than at the end of a long delay.
                () = self.holds.some_release() => {}
                // A prober has no verdict to wait for: at a stop it leaves
                // at once, and its message goes back to the queue.
                () = self.stop.cancelled() => return left(Probe::Aborted),
                () = self.abort.cancelled() => return left(Probe::Aborted),
                () = held.cancelled() => return left(Probe::Aborted),
            }
            if !self.holds.is_held(project) {
                // Released by another daemon's moves or a racing answer.
                return match self.call(req, Some(held)).await {
                    Call::Answered(answer) => Probe::Answered(answer),
                    Call::Aborted => Probe::Aborted,
                    Call::Refused(CallError::Unroutable(why)) => Probe::Unroutable(why),
                    Call::Refused(e) => {
                        if self.holds.hold(project, &e.to_string()) == Role::Park {
                            return Probe::Park;
                        }
                        continue;
                    }
                };
            }
            match self.call(req, None).await {
                Call::Aborted => return left(Probe::Aborted),
                Call::Refused(CallError::Unroutable(why)) => {
                    self.holds.release(project);
                    return Probe::Unroutable(why);
                }
                Call::Refused(e) => self.holds.probe_failed(project, &e.to_string()),
                Call::Answered(attempt) if attempt.verdict == Verdict::Unauthorized => {
                    // Let the source refresh (re-read the file, renew the
                    // IAM token) before the next probe.
                    self.api.rejected(project, attempt.auth_generation);
                    self.holds
                        .probe_failed(project, "the AOM API still answers 401");
                    attempts.push(attempt);
                }
                Call::Answered(attempt) => {
                    self.holds.release(project);
                    return Probe::Answered(attempt);
                }
            }
        }
    }
}

enum Call {
    Answered(Attempt),
    /// No call was made (see [`Api::terminate`]).
    Refused(CallError),
    Aborted,
}

enum Probe {
    Aborted,
    Park,
    Unroutable(String),
    Answered(Attempt),
}
