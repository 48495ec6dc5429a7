//! One HTTP attempt and what it means for its request: plain data, as the
//! AOM adapter classifies an answer and the audit records it.

use chrono::{DateTime, Utc};
use std::time::Duration;

/// What one attempt means for its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: terminated.
    Succeeded,
    /// 3xx or 4xx (but 401 and 429): the request itself is wrong; final.
    Permanent,
    /// 5xx, 429, network errors: try again later.
    Retryable { retry_after: Option<Duration> },
    /// 401: the credentials are wrong, not the request.
    Unauthorized,
}

/// Why an attempt did not succeed, as stored in `termination_attempts.error_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Timeout,
    Connect,
    Network,
    Redirect,
    Unauthorized,
    Throttled,
    ClientError,
    ServerError,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Network => "network",
            ErrorKind::Redirect => "redirect",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Throttled => "throttled",
            ErrorKind::ClientError => "client_error",
            ErrorKind::ServerError => "server_error",
        }
    }
}

/// One HTTP attempt, as recorded in `termination_attempts`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub started_at: DateTime<Utc>,
    pub latency: Duration,
    pub http_status: Option<u16>,
    pub error_kind: Option<ErrorKind>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub body_excerpt: Option<String>,
    pub verdict: Verdict,
    /// Which credential the call carried (see `aom::auth::Auth::rejected`).
    pub auth_generation: u64,
    /// The region the call was routed to (`None` without `{region}`).
    pub region: Option<String>,
    /// The host of the endpoint called.
    pub endpoint_host: Option<String>,
}
