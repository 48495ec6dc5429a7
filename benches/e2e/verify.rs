//! The correctness checks of a run: every request audited and succeeded,
//! every call seen by the sandbox, the queues empty. A run that fails any of
//! them is NOT CORRECT, and no rate is printed for it.

use aom_terminator::broker::{dead_letter_queue_arguments, request_queue_arguments};
use aom_terminator::settings::DaemonConfig;

use crate::audit::AuditNumbers;
use crate::publish::queue_depth;
use crate::run::Names;
use anyhow::Result;
use lapin::Connection;

/// The audit holds `target` outcomes, all succeeded, and an attempt for
/// each of the sandbox's `calls`.
pub(crate) fn check_audit(
    audit: &Result<AuditNumbers>,
    target: i64,
    calls: u64,
    failures: &mut Vec<String>,
) {
    match audit {
        Ok(a) => {
            if a.outcomes != target {
                failures.push(format!(
                    "termination_outcomes has {} rows, expected {target}",
                    a.outcomes
                ));
            }
            if a.succeeded != target {
                failures.push(format!(
                    "{} outcomes are `succeeded`, expected all {target}",
                    a.succeeded
                ));
            }
            if u64::try_from(a.attempts).ok() != Some(calls) {
                failures.push(format!(
                    "termination_attempts has {} rows, expected one per sandbox call: {calls}",
                    a.attempts
                ));
            }
        }
        Err(e) => failures.push(format!("reading the audit: {e:#}")),
    }
}

/// What the sandbox saw, beyond its call count.
pub(crate) struct SandboxSeen {
    pub(crate) max_in_flight: Option<u64>,
    /// The sandbox's mean answer time (arrival → answer), ms.
    pub(crate) answer_ms: Option<f64>,
    /// Its calls, and those it refused: 429 (its rate limit), 503 (its
    /// capacity's queue full).
    pub(crate) calls: u64,
    pub(crate) throttled: u64,
    pub(crate) busy: u64,
}

/// The sandbox got exactly `requests` calls, plus one per call its limits
/// refused (429, 503), and answered nothing else but 200.
pub(crate) fn check_sandbox_stats(
    stats: &Result<serde_json::Value>,
    requests: u64,
    failures: &mut Vec<String>,
) -> SandboxSeen {
    let mut seen = SandboxSeen {
        max_in_flight: None,
        answer_ms: None,
        calls: 0,
        throttled: 0,
        busy: 0,
    };
    match stats {
        Ok(s) => {
            seen.max_in_flight = s.get("max_in_flight").and_then(serde_json::Value::as_u64);
            let field = |name: &str| s.get(name).and_then(serde_json::Value::as_u64);
            if let (Some(n), Some(us)) = (field("answered"), field("answer_micros"))
                && n > 0
            {
                seen.answer_ms = Some(us as f64 / n as f64 / 1000.0);
            }
            let status = |code: &str| {
                s.get("by_status")
                    .and_then(|b| b.get(code))
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            seen.throttled = status("429");
            seen.busy = status("503");
            let refused = seen.throttled + seen.busy;
            if let Some(by_status) = s.get("by_status").and_then(serde_json::Value::as_object)
                && let Some(other) = by_status
                    .keys()
                    .find(|k| !["200", "429", "503"].contains(&k.as_str()))
            {
                failures.push(format!("the sandbox answered {other}: {s}"));
            }
            match s.get("calls").and_then(serde_json::Value::as_u64) {
                Some(calls) if calls == requests + refused => seen.calls = calls,
                Some(calls) => failures.push(format!(
                    "the sandbox got {calls} calls, expected {requests} + {refused} refused"
                )),
                None => failures.push(format!("the sandbox stats have no `calls`: {s}")),
            }
        }
        Err(e) => failures.push(format!("reading the sandbox stats: {e:#}")),
    }
    seen
}

/// The request and dead-letter queues are empty.
pub(crate) async fn check_queues_empty(
    connection: &Connection,
    cfg: &DaemonConfig,
    names: &Names,
    failures: &mut Vec<String>,
) {
    for (what, queue, args) in [
        (
            "request queue",
            &names.queue,
            request_queue_arguments(&cfg.amqp),
        ),
        (
            "dead-letter queue",
            &names.dead_letter_queue,
            dead_letter_queue_arguments(),
        ),
    ] {
        match queue_depth(connection, queue, args).await {
            Ok(0) => {}
            Ok(n) => failures.push(format!("the {what} {queue} holds {n} messages, expected 0")),
            Err(e) => failures.push(format!("checking the {what}: {e:#}")),
        }
    }
}
