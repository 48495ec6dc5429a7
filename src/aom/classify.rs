//! What an answer means: pure classification of an HTTP status, headers
//! and body (or a transport error) into an [`Attempt`] with its verdict.
//! The table is in the README.

use crate::domain::{Attempt, ErrorKind, Verdict, truncate};
use crate::telemetry::cause_chain;
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use std::time::{Duration, SystemTime};

/// How much of an answer's body is kept in the audit.
const BODY_EXCERPT_CHARS: usize = 512;

/// Classify an HTTP answer. Pure; see the README's classification table.
pub fn classify_answer(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    started_at: DateTime<Utc>,
    latency: Duration,
) -> Attempt {
    let code = status.as_u16();
    let (verdict, error_kind) = match code {
        200..=299 => (Verdict::Succeeded, None),
        300..=399 => (Verdict::Permanent, Some(ErrorKind::Redirect)),
        401 => (Verdict::Unauthorized, Some(ErrorKind::Unauthorized)),
        429 => (
            Verdict::Retryable {
                retry_after: retry_after(headers, SystemTime::now()),
            },
            Some(ErrorKind::Throttled),
        ),
        400..=499 => (Verdict::Permanent, Some(ErrorKind::ClientError)),
        503 => (
            Verdict::Retryable {
                retry_after: retry_after(headers, SystemTime::now()),
            },
            Some(ErrorKind::ServerError),
        ),
        // 5xx, and anything outside the registered ranges, may pass.
        _ => (
            Verdict::Retryable { retry_after: None },
            Some(ErrorKind::ServerError),
        ),
    };
    let (error_code, error_msg, body_excerpt) = if verdict == Verdict::Succeeded {
        (None, None, None)
    } else {
        describe_error_body(body)
    };
    Attempt {
        started_at,
        latency,
        http_status: Some(code),
        error_kind,
        error_code,
        error_msg,
        body_excerpt,
        verdict,
        auth_generation: 0,
        region: None,
        endpoint_host: None,
    }
}

/// The API's error JSON gives `error_code` and `error_msg`; anything else
/// (a gateway's HTML) is kept as a short excerpt.
fn describe_error_body(body: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error_code: Option<serde_json::Value>,
        error_msg: Option<serde_json::Value>,
    }
    let text = String::from_utf8_lossy(body);
    let excerpt =
        (!text.trim().is_empty()).then(|| truncate(text.trim(), BODY_EXCERPT_CHARS).to_owned());
    let field = |v: Option<serde_json::Value>, max: usize| match v {
        Some(serde_json::Value::String(s)) => Some(truncate(&s, max).to_owned()),
        Some(serde_json::Value::Null) | None => None,
        Some(other) => Some(truncate(&other.to_string(), max).to_owned()),
    };
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => (
            field(parsed.error_code, 64),
            field(parsed.error_msg, 1024),
            excerpt,
        ),
        Err(_) => (None, None, excerpt),
    }
}

pub fn classify_transport_error(
    kind: ErrorKind,
    err: &(dyn std::error::Error + 'static),
    started_at: DateTime<Utc>,
    latency: Duration,
) -> Attempt {
    Attempt {
        started_at,
        latency,
        http_status: None,
        error_kind: Some(kind),
        error_code: None,
        error_msg: Some(truncate(&cause_chain(err), 1024).to_owned()),
        body_excerpt: None,
        verdict: Verdict::Retryable { retry_after: None },
        auth_generation: 0,
        region: None,
        endpoint_host: None,
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn answer(code: u16, headers: &[(&'static str, &str)], body: &str) -> Attempt {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_str(v).expect("test header"));
        }
        let status = StatusCode::from_u16(code).expect("test status");
        classify_answer(status, &map, body.as_bytes(), Utc::now(), Duration::ZERO)
    }

    #[test]
    fn classification_table() {
        let retry = Verdict::Retryable { retry_after: None };
        let cases = [
            (200, Verdict::Succeeded, None),
            (204, Verdict::Succeeded, None),
            (301, Verdict::Permanent, Some(ErrorKind::Redirect)),
            (400, Verdict::Permanent, Some(ErrorKind::ClientError)),
            (401, Verdict::Unauthorized, Some(ErrorKind::Unauthorized)),
            (403, Verdict::Permanent, Some(ErrorKind::ClientError)),
            (404, Verdict::Permanent, Some(ErrorKind::ClientError)),
            (409, Verdict::Permanent, Some(ErrorKind::ClientError)),
            (429, retry, Some(ErrorKind::Throttled)),
            (500, retry, Some(ErrorKind::ServerError)),
            (502, retry, Some(ErrorKind::ServerError)),
            (503, retry, Some(ErrorKind::ServerError)),
            (504, retry, Some(ErrorKind::ServerError)),
            (507, retry, Some(ErrorKind::ServerError)),
        ];
        for (code, verdict, kind) in cases {
            let a = answer(code, &[], "");
            assert_eq!((a.verdict, a.error_kind), (verdict, kind), "status {code}");
            assert_eq!(a.http_status, Some(code));
        }
    }

    #[test]
    fn error_json_is_parsed_and_html_is_excerpted() {
        let a = answer(
            404,
            &[],
            r#"{"error_code":"AOM.31001306","error_msg":"Execution not exist. recordInfo is not exist.","http_code":404}"#,
        );
        assert_eq!(a.error_code.as_deref(), Some("AOM.31001306"));
        assert_eq!(
            a.error_msg.as_deref(),
            Some("Execution not exist. recordInfo is not exist.")
        );
        let html = format!("<html><body>{}</body></html>", "x".repeat(2000));
        let a = answer(502, &[], &html);
        assert_eq!((a.error_code, a.error_msg), (None, None));
        let excerpt = a.body_excerpt.expect("excerpt kept");
        assert!(excerpt.starts_with("<html><body>xxx"));
        assert_eq!(excerpt.chars().count(), BODY_EXCERPT_CHARS);
        assert_eq!(
            answer(200, &[], r#"{"result":"success"}"#).body_excerpt,
            None
        );
    }

    #[test]
    fn retry_after_is_honoured_on_429_and_503_only() {
        let secs = |a: Attempt| match a.verdict {
            Verdict::Retryable { retry_after } => retry_after.map(|d| d.as_secs()),
            other => panic!("{other:?}"),
        };
        assert_eq!(secs(answer(429, &[("retry-after", "7")], "")), Some(7));
        assert_eq!(secs(answer(503, &[("retry-after", "3")], "")), Some(3));
        assert_eq!(secs(answer(500, &[("retry-after", "3")], "")), None);
    }

    #[test]
    fn retry_after_accepts_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        let mut map = HeaderMap::new();
        map.insert(RETRY_AFTER, HeaderValue::from_str(&later).expect("date"));
        assert_eq!(retry_after(&map, now), Some(Duration::from_secs(42)));
        map.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&map, now), None);
    }
}
