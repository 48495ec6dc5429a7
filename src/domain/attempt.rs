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

impl Attempt {
    /// The API said "later", not "no": a 429, or a 503 with `Retry-After`.
    /// Such an answer does not count toward `MAX_ATTEMPTS`; only
    /// `THROTTLE_GIVE_UP` ends a request that gets nothing else.
    pub fn is_throttled(&self) -> bool {
        match (self.http_status, self.verdict) {
            (Some(429), Verdict::Retryable { .. }) => true,
            (Some(503), Verdict::Retryable { retry_after }) => retry_after.is_some(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16, retry_after: Option<Duration>) -> Attempt {
        Attempt {
            started_at: Utc::now(),
            latency: Duration::ZERO,
            http_status: Some(status),
            error_kind: Some(ErrorKind::ServerError),
            error_code: None,
            error_msg: None,
            body_excerpt: None,
            verdict: Verdict::Retryable { retry_after },
            auth_generation: 0,
            region: None,
            endpoint_host: None,
        }
    }

    #[test]
    fn throttling_is_a_429_or_a_503_that_says_when() {
        let later = Some(Duration::from_secs(1));
        assert!(answered(429, None).is_throttled());
        assert!(answered(429, later).is_throttled());
        assert!(answered(503, later).is_throttled());
        assert!(!answered(503, None).is_throttled());
        assert!(!answered(500, later).is_throttled());
        let network = Attempt {
            http_status: None,
            error_kind: Some(ErrorKind::Timeout),
            ..answered(0, None)
        };
        assert!(!network.is_throttled());
    }
}
