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

/// The audit holds `target` outcomes, all succeeded, and `target` attempts.
pub(crate) fn check_audit(audit: &Result<AuditNumbers>, target: i64, failures: &mut Vec<String>) {
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
            if a.attempts != target {
                failures.push(format!(
                    "termination_attempts has {} rows, expected {target}",
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
}

/// The sandbox got exactly `requests` calls.
pub(crate) fn check_sandbox_stats(
    stats: &Result<serde_json::Value>,
    requests: u64,
    failures: &mut Vec<String>,
) -> SandboxSeen {
    let mut seen = SandboxSeen {
        max_in_flight: None,
        answer_ms: None,
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
            match s.get("calls").and_then(serde_json::Value::as_u64) {
                Some(calls) if calls == requests => {}
                Some(calls) => failures.push(format!(
                    "the sandbox got {calls} calls, expected {requests}"
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
