//! The AOM terminate client: builds the request, sends it once, and
//! classifies the answer. Retrying is the dispatcher's job.

use crate::auth::{Auth, AuthError, AuthSettings, CallInfo};
use crate::domain::{TerminationRequest, truncate};
use crate::telemetry::cause_chain;
use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use std::time::{Duration, Instant, SystemTime};

/// RFC 3986 path segment: everything but the unreserved characters is
/// percent-encoded, so an id can never add or climb a path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How much of an answer's body is kept in the audit.
const BODY_EXCERPT_CHARS: usize = 512;
/// How much of an answer's body is read at all.
const BODY_READ_LIMIT: usize = 64 * 1024;
const JSON: &str = "application/json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

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
    /// Which credential the call carried (see [`Auth::rejected`]).
    pub auth_generation: u64,
}

#[derive(Clone)]
pub struct TerminateClient {
    http: reqwest::Client,
    /// The endpoint, parsed once; each call's URL is a copy with its path.
    base: Url,
    auth: Auth,
}

impl std::fmt::Debug for TerminateClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminateClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl TerminateClient {
    /// `pool` is the number of keep-alive connections kept per host: the
    /// concurrency, so that a steady load never reconnects.
    pub fn new(
        endpoint: &Url,
        auth: &AuthSettings,
        timeout: Duration,
        pool: usize,
    ) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            // A redirect means a misconfigured endpoint: surface it instead of
            // re-sending the POST somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(ApiError::Client)?;
        let auth = Auth::new(auth, http.clone())?;
        Ok(Self {
            http,
            base: endpoint.clone(),
            auth,
        })
    }

    /// The terminate route under the endpoint (and its path prefix, if any).
    /// Only the path is built per call: the host is not parsed again.
    pub fn url_for(&self, req: &TerminationRequest) -> Url {
        let path = format!(
            "{}/v1/{}/cms/workflow/{}/executions/{}/terminate",
            self.base.path().trim_end_matches('/'),
            utf8_percent_encode(req.project_id.as_str(), PATH_SEGMENT),
            utf8_percent_encode(req.workflow_id.as_str(), PATH_SEGMENT),
            utf8_percent_encode(req.execution_id.as_str(), PATH_SEGMENT),
        );
        let mut url = self.base.clone();
        url.set_path(&path);
        url
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// One attempt. A network error is an attempt too; only a credential
    /// that cannot be had (IAM refusing, say) fails, and no call is made.
    pub async fn terminate(&self, req: &TerminationRequest) -> Result<Attempt, AuthError> {
        let parsed = self.url_for(req);
        let credential = self
            .auth
            .credential(&CallInfo {
                method: "POST",
                url: &parsed,
                project_id: req.project_id.as_str(),
                content_type: JSON,
                body: b"",
            })
            .await?;
        let mut call = self
            .http
            .post(parsed)
            .header(CONTENT_TYPE, HeaderValue::from_static(JSON));
        for (name, value) in credential.headers {
            call = call.header(name, value);
        }
        let started_at = Utc::now();
        let clock = Instant::now();
        let sent = call.send().await;
        let answer = match sent {
            Ok(mut resp) => {
                let status = resp.status();
                let headers = std::mem::take(resp.headers_mut());
                match read_body(resp).await {
                    Ok(body) => Ok((status, headers, body)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let latency = clock.elapsed();
        let mut attempt = match answer {
            Ok((status, headers, body)) => {
                classify_answer(status, &headers, &body, started_at, latency)
            }
            Err(e) => classify_transport_error(&e, started_at, latency),
        };
        attempt.auth_generation = credential.generation;
        Ok(attempt)
    }
}

async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = BODY_READ_LIMIT.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= BODY_READ_LIMIT {
            break;
        }
    }
    Ok(body)
}

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

fn classify_transport_error(
    err: &reqwest::Error,
    started_at: DateTime<Utc>,
    latency: Duration,
) -> Attempt {
    let kind = if err.is_timeout() {
        ErrorKind::Timeout
    } else if err.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Network
    };
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
    use crate::domain::{ExecutionId, ProjectId, WorkflowId};

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

    #[test]
    fn ids_are_percent_encoded_path_segments() {
        let client = TerminateClient::new(
            &Url::parse("https://aom.example.com/prefix/").expect("url"),
            &AuthSettings::Token(secrecy::SecretString::from("t")),
            Duration::from_secs(1),
            1,
        )
        .expect("client");
        let req = TerminationRequest {
            request_id: "r".into(),
            project_id: ProjectId::parse("0123456789abcdef0123456789abcdef").expect("p"),
            workflow_id: WorkflowId::parse("wf/../x y").expect("w"),
            execution_id: ExecutionId::parse("ex?a=1#é").expect("e"),
            reason: None,
            requested_by: None,
            replay_of: None,
        };
        assert_eq!(
            client.url_for(&req).as_str(),
            "https://aom.example.com/prefix/v1/0123456789abcdef0123456789abcdef/cms/workflow/\
             wf%2F..%2Fx%20y/executions/ex%3Fa%3D1%23%C3%A9/terminate"
        );
        assert!(!format!("{client:?}").contains("\"t\""));
    }
}
