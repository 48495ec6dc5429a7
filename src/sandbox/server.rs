//! The HTTP side: the axum router, the terminate handler (latency, authentication,
//! validation, scripted and bucketed answers), the response bodies, and the control
//! endpoints.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Sandbox;
use super::args::Outcome;
use super::limits::{Admission, BODY_BUSY, Throttled, throttled_body};
use super::projects::parse_token_projects;
use super::script::{Script, parse_script};
use super::stats::{InFlight, SandboxStats, execution_key};

/// The terminate route, in axum's path syntax.
const TERMINATE_ROUTE: &str =
    "/v1/{project_id}/cms/workflow/{workflow_id}/executions/{execution_id}/terminate";

const BODY_SUCCESS: &str = r#"{"result":"success"}"#;
const BODY_400: &str = r#"{"error_code":"AOM.31001418","error_msg":"The task does not support the current operation.","http_code":400}"#;
const BODY_401: &str =
    r#"{"error_code":"AOM.31009004","error_msg":"auth failed.","http_code":401}"#;
const BODY_404: &str = r#"{"error_code":"AOM.31001306","error_msg":"Execution not exist. recordInfo is not exist.","http_code":404}"#;
const BODY_500: &str = r#"{"error_code":"AOM.31001405","error_msg":"workflow internal server error.","http_code":500}"#;
const BODY_502: &str = "<html><body><h1>502 Bad Gateway</h1></body></html>";
const BODY_504: &str = "<html><body><h1>504 Gateway Time-out</h1></body></html>";

const REDIRECT_LOCATION: &str = "http://127.0.0.1:1/elsewhere";
const INVALID_ERROR_CODE: &str = "AOM.SANDBOX.INVALID";

/// Request bodies are read (and dropped) up to this size so connections stay reusable.
const MAX_DRAINED_BODY: usize = 64 * 1024;
#[derive(Clone)]
pub(super) struct AppState {
    pub(super) sandbox: Sandbox,
    /// Cut short the sleeps of a server that is shutting down.
    pub(super) shutdown: CancellationToken,
}

/// How late tokio's timer fires on average: it wakes on the first 1 ms tick
/// after the deadline (measured here: a 50 ms sleep takes ~51.1 ms).
const TIMER_LAG: Duration = Duration::from_millis(1);

/// What to ask tokio's timer for so that the wake-up comes `latency` later
/// on average: [`TIMER_LAG`] less, but at most half of it, so that a
/// sub-millisecond latency is not dropped altogether. The benchmark's held
/// ceiling times its holds with it too.
pub fn timer_aim(latency: Duration) -> Duration {
    latency - TIMER_LAG.min(latency / 2)
}

impl AppState {
    /// Sleeps at least `duration` unless the server shuts down first; false
    /// if it does.
    async fn sleep(&self, duration: Duration) -> bool {
        self.sleep_until(tokio::time::Instant::now() + duration)
            .await
    }

    /// Waits the base latency counted from `arrived`, on time on average
    /// ([`timer_aim`]); false if the server shuts down first.
    async fn wait_latency(&self, arrived: tokio::time::Instant, latency: Duration) -> bool {
        self.sleep_until(arrived + timer_aim(latency)).await
    }

    async fn sleep_until(&self, at: tokio::time::Instant) -> bool {
        if at <= tokio::time::Instant::now() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep_until(at) => true,
            () = self.shutdown.cancelled() => false,
        }
    }
}

pub(super) fn router(state: AppState) -> Router {
    Router::new()
        .route(TERMINATE_ROUTE, post(terminate))
        .route("/_sandbox/stats", get(get_stats))
        .route("/_sandbox/reset", post(reset))
        .route("/_sandbox/token", post(set_token))
        .route("/_sandbox/token-projects", post(set_token_projects))
        .route("/v3/auth/tokens", post(issue_token))
        .route("/v3/projects/{project_id}", get(show_project))
        .with_state(state)
}

/// What a terminate call answers.
enum Reply {
    Status(u16),
    Invalid(&'static str),
    /// Refused by the gateway's rate limit: 429 `APIGW.0308`.
    Throttled(Throttled),
    /// The backend's queue is full: 503 `AOM.0503`.
    Busy,
}

/// The terminate route's path parameters: project, workflow, execution.
type Ids = (String, String, String);

async fn terminate(
    State(app): State<AppState>,
    path: Result<Path<Ids>, PathRejection>,
    request: Request,
) -> Response {
    let arrived = tokio::time::Instant::now();
    let inner = &app.sandbox.inner;
    let stats = &inner.stats;
    stats.calls.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(stats);
    let (parts, body) = request.into_parts();
    stats.count_host(addressed_host(&parts).unwrap_or_default());
    stats.count_version(parts.version);
    // Read the (normally empty) body: AK/SK signatures cover it, and the
    // connection stays reusable.
    let body = axum::body::to_bytes(body, MAX_DRAINED_BODY)
        .await
        .unwrap_or_default();
    let ids = path.ok().map(|Path(ids)| ids);
    // The gateway throttles first; then the backend takes the call when it has room,
    // and holds that place until the call is answered.
    let throttle = inner.rate.check(std::time::Instant::now());
    let admission = match throttle {
        Ok(()) => Some(inner.capacity.admit(stats, &app.shutdown).await),
        Err(_) => None,
    };
    let reply = match (throttle, &admission) {
        (Err(throttled), _) => Reply::Throttled(throttled),
        (Ok(()), Some(Admission::Busy)) => Reply::Busy,
        (Ok(()), Some(Admission::ShuttingDown) | None) => Reply::Status(503),
        (Ok(()), Some(Admission::Served { queued, .. })) => {
            // A call that waited its turn gets the whole latency from then on.
            let started = if *queued {
                tokio::time::Instant::now()
            } else {
                arrived
            };
            decide(&app, started, ids.as_ref(), &parts, &body).await
        }
    };
    if matches!(reply, Reply::Throttled(_) | Reply::Busy)
        && let Some((project_id, workflow_id, execution_id)) = &ids
    {
        // Counted for the execution, but never accepted: its script is not reached.
        stats.count_key(execution_key(project_id, workflow_id, execution_id), false);
    }
    let status = match reply {
        Reply::Status(status) => status,
        Reply::Invalid(_) => 400,
        Reply::Throttled(_) => 429,
        Reply::Busy => 503,
    };
    stats.count_status(status);
    let took = u64::try_from(arrived.elapsed().as_micros()).unwrap_or(u64::MAX);
    stats.answer_micros.fetch_add(took, Ordering::Relaxed);
    let response = match reply {
        Reply::Status(status) => respond(status),
        Reply::Invalid(msg) => error_response(StatusCode::BAD_REQUEST, INVALID_ERROR_CODE, msg),
        Reply::Throttled(throttled) => throttled_response(throttled),
        Reply::Busy => busy_response(),
    };
    drop(admission);
    response
}

/// The host a call was addressed to: its `Host` header, else the authority of its
/// target (HTTP/2's `:authority`, or an absolute-form target: a client that sends
/// through the sandbox as its HTTP proxy writes both).
pub(super) fn addressed_host(parts: &axum::http::request::Parts) -> Option<&str> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

async fn decide(
    app: &AppState,
    started: tokio::time::Instant,
    ids: Option<&Ids>,
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> Reply {
    if !app.wait_latency(started, app.sandbox.inner.latency).await {
        return Reply::Status(503);
    }
    let project = ids.map(|(project_id, _, _)| project_id.as_str());
    let authenticated = app.sandbox.inner.identity.admits(parts, body, project);
    let Some((project_id, workflow_id, execution_id)) = ids else {
        return if authenticated {
            Reply::Invalid("the path parameters are not valid percent-encoded UTF-8")
        } else {
            Reply::Status(401)
        };
    };
    let script = validate(&parts.headers, project_id, workflow_id, execution_id);
    let accepted = app.sandbox.inner.stats.count_key(
        execution_key(project_id, workflow_id, execution_id),
        authenticated && script.is_ok(),
    );
    if !authenticated {
        return Reply::Status(401);
    }
    let outage = app.sandbox.inner.outage.load(Ordering::Relaxed);
    if outage != 0 {
        return Reply::Status(outage);
    }
    let outcome = match script {
        Err(msg) => return Reply::Invalid(msg),
        Ok(Script::Answer(outcome)) => outcome,
        Ok(Script::Slow(delay)) => {
            return Reply::Status(if app.sleep(delay).await { 200 } else { 503 });
        }
        Ok(Script::None) => {
            match app
                .sandbox
                .inner
                .ratios
                .pick(project_id, workflow_id, execution_id)
            {
                Some(outcome) => outcome,
                None => return Reply::Status(200),
            }
        }
    };
    Reply::Status(match outcome {
        Outcome::Status(status) => status,
        Outcome::Flaky(k) if accepted <= u64::from(k) => 500,
        Outcome::Flaky(_) => 200,
    })
}

/// The real API's checks, then the scripted prefix.
fn validate(
    headers: &HeaderMap,
    project_id: &str,
    workflow_id: &str,
    execution_id: &str,
) -> Result<Script, &'static str> {
    if project_id.chars().count() != 32 {
        return Err("project_id must be exactly 32 characters");
    }
    if !(1..=64).contains(&workflow_id.chars().count()) {
        return Err("workflow_id must be 1..64 characters");
    }
    if !(1..=64).contains(&execution_id.chars().count()) {
        return Err("execution_id must be 1..64 characters");
    }
    let json = headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"application/json"))
    });
    if !json {
        return Err("Content-Type must be application/json");
    }
    parse_script(execution_id)
}

fn respond(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status {
        200 => json_response(code, BODY_SUCCESS),
        400 => json_response(code, BODY_400),
        401 => json_response(code, BODY_401),
        404 => json_response(code, BODY_404),
        500 => json_response(code, BODY_500),
        502 => html_response(code, BODY_502),
        504 => html_response(code, BODY_504),
        204 => code.into_response(),
        201..=299 => json_response(code, BODY_SUCCESS),
        300..=399 => (
            code,
            [(
                header::LOCATION,
                HeaderValue::from_static(REDIRECT_LOCATION),
            )],
        )
            .into_response(),
        _ => {
            let error_code = format!("AOM.SANDBOX.{status}");
            let error_msg = format!("sandbox scripted {status}");
            let mut response = error_response(code, &error_code, &error_msg);
            if matches!(status, 429 | 503) {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            response
        }
    }
}

fn throttled_response(throttled: Throttled) -> Response {
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        throttled_body(throttled.limit),
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(throttled.retry_after_secs),
    );
    response
}

fn busy_response() -> Response {
    let mut response = json_response(StatusCode::SERVICE_UNAVAILABLE, BODY_BUSY);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn json_response(code: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    (
        code,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.into(),
    )
        .into_response()
}

fn html_response(code: StatusCode, body: &'static str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/html"))],
        body,
    )
        .into_response()
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error_code: &'a str,
    error_msg: &'a str,
    http_code: u16,
}

fn error_response(code: StatusCode, error_code: &str, error_msg: &str) -> Response {
    let body = ErrorBody {
        error_code,
        error_msg,
        http_code: code.as_u16(),
    };
    match serde_json::to_string(&body) {
        Ok(body) => (
            code,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(_) => code.into_response(),
    }
}

async fn issue_token(State(app): State<AppState>, body: axum::body::Bytes) -> Response {
    app.sandbox.inner.identity.issue_token(&body)
}

async fn show_project(
    State(app): State<AppState>,
    Path(project_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    app.sandbox
        .inner
        .identity
        .show_project(&headers, &project_id)
}

async fn get_stats(State(app): State<AppState>) -> axum::Json<SandboxStats> {
    axum::Json(app.sandbox.stats())
}

async fn reset(State(app): State<AppState>) -> StatusCode {
    app.sandbox.reset_stats();
    StatusCode::NO_CONTENT
}

async fn set_token(State(app): State<AppState>, body: String) -> StatusCode {
    let token = body.trim();
    app.sandbox
        .set_expected_token((!token.is_empty()).then(|| token.to_owned()));
    tracing::info!(
        token_required = !token.is_empty(),
        "sandbox expected token changed"
    );
    StatusCode::NO_CONTENT
}

/// `POST /_sandbox/token-projects`: the body, as `--token-projects`, becomes the token
/// coverage; an empty body lifts it. A bad body answers 400 saying why.
async fn set_token_projects(State(app): State<AppState>, body: String) -> Response {
    let body = body.trim();
    match parse_token_projects(body) {
        Ok(projects) => {
            let listed = !projects.is_empty();
            app.sandbox.set_token_projects(listed.then_some(projects));
            tracing::info!(listed, "sandbox token projects changed");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(err) => (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testkit::{PROJECT, call, raw, start, terminate_path};
    use crate::sandbox::{SandboxArgs, parse_ratios};
    use tokio::net::TcpStream;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn end_to_end() {
        let running = start(SandboxArgs {
            expected_token: Some("secret".into()),
            ..SandboxArgs::default()
        })
        .await;
        let addr = running.local_addr();
        assert_eq!(running.base_url(), format!("http://{addr}"));
        let sb = running.sandbox().clone();

        let r = call(addr, "secret", "exec-1").await;
        assert_eq!((r.status, r.body.as_str()), (200, BODY_SUCCESS));
        assert_eq!(r.header("content-type"), Some("application/json"));

        let r = call(addr, "secret", "e404-x").await;
        assert_eq!((r.status, r.body.as_str()), (404, BODY_404));

        // A wrong or missing token is refused before anything else, scripts included.
        let r = call(addr, "wrong", "e404-x").await;
        assert_eq!((r.status, r.body.as_str()), (401, BODY_401));
        let r = raw(
            addr,
            "POST",
            &terminate_path(PROJECT, "wf-1", "exec-1"),
            &[("Content-Type", "application/json")],
            "",
        )
        .await;
        assert_eq!(r.status, 401);
        let r = call(addr, "wrong", "exec-bad").await;
        assert_eq!(r.status, 401);

        // flaky: 500 then 200; the refused call above does not consume the failure.
        let r = call(addr, "secret", "flaky-1").await;
        assert_eq!((r.status, r.body.as_str()), (500, BODY_500));
        let r = call(addr, "secret", "flaky-1").await;
        assert_eq!(r.status, 200);
        for expected in [500, 500, 200, 200] {
            assert_eq!(call(addr, "secret", "flaky2-x").await.status, expected);
        }

        let r = call(addr, "secret", "e302-x").await;
        assert_eq!(r.status, 302);
        assert_eq!(r.header("location"), Some(REDIRECT_LOCATION));
        assert_eq!(r.body, "");
        let r = call(addr, "secret", "e502-x").await;
        assert_eq!(r.status, 502);
        assert_eq!(r.header("content-type"), Some("text/html"));
        assert_eq!(r.body, BODY_502);
        let r = call(addr, "secret", "e429-x").await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(
            r.body,
            r#"{"error_code":"AOM.SANDBOX.429","error_msg":"sandbox scripted 429","http_code":429}"#
        );
        assert_eq!(call(addr, "secret", "e400-x").await.body, BODY_400);

        // Validation.
        let r = raw(
            addr,
            "POST",
            &terminate_path("short", "wf-1", "exec-1"),
            &[
                ("Content-Type", "application/json"),
                ("X-Auth-Token", "secret"),
            ],
            "",
        )
        .await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("AOM.SANDBOX.INVALID"), "{}", r.body);
        assert!(r.body.contains("project_id"), "{}", r.body);
        let long = "x".repeat(65);
        let r = call(addr, "secret", &long).await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("execution_id"), "{}", r.body);
        let r = raw(
            addr,
            "POST",
            &terminate_path(PROJECT, "wf-1", "exec-1"),
            &[("Content-Type", "text/plain"), ("X-Auth-Token", "secret")],
            "",
        )
        .await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("Content-Type"), "{}", r.body);
        assert_eq!(call(addr, "secret", "e600-x").await.status, 400);

        // Percent-encoded segments are decoded; a body is accepted and ignored.
        let r = raw(
            addr,
            "POST",
            &terminate_path(PROJECT, "wf%2F1", "exec%201"),
            &[
                ("Content-Type", "application/json; charset=utf-8"),
                ("X-Auth-Token", "secret"),
            ],
            "{}",
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(sb.calls_for(PROJECT, "wf/1", "exec 1"), 1);

        // Stats: 1+1+3 (401) +2 +4 +1+1+1+1 +3 (400) +1 (e600) +1 = 20 calls.
        let stats = sb.stats();
        assert_eq!(stats.calls, 20, "{stats:?}");
        let by_status: Vec<(u16, u64)> = stats.by_status.into_iter().collect();
        assert_eq!(
            by_status,
            [
                (200, 5),
                (302, 1),
                (400, 5),
                (401, 3),
                (404, 1),
                (429, 1),
                (500, 3),
                (502, 1)
            ]
        );
        assert_eq!(stats.in_flight, 0);
        assert!(stats.max_in_flight >= 1);
        assert_eq!(sb.calls_for(PROJECT, "wf-1", "exec-1"), 3);
        assert_eq!(sb.calls_for(PROJECT, "wf-1", "flaky-1"), 2);
        assert_eq!(sb.calls_for(PROJECT, "wf-1", "flaky2-x"), 4);
        assert_eq!(sb.calls_for(PROJECT, "wf-1", "e404-x"), 2);
        assert_eq!(sb.calls_for(PROJECT, "wf-1", "never"), 0);

        // The same stats over HTTP.
        let r = raw(addr, "GET", "/_sandbox/stats", &[], "").await;
        assert_eq!(r.status, 200);
        let over_http: SandboxStats = serde_json::from_str(&r.body).unwrap();
        assert_eq!(over_http.calls, 20);
        assert_eq!(over_http.by_status.get(&400), Some(&5));

        // Reset (over HTTP) forgets everything, flaky executions included.
        let r = raw(addr, "POST", "/_sandbox/reset", &[], "").await;
        assert_eq!(r.status, 204);
        assert_eq!(sb.stats(), SandboxStats::default());
        assert_eq!(sb.calls_for(PROJECT, "wf-1", "flaky-1"), 0);
        assert_eq!(call(addr, "secret", "flaky-1").await.status, 500);

        // Token changes, through the handle and over HTTP.
        sb.set_expected_token(None);
        assert_eq!(call(addr, "anything", "exec-1").await.status, 200);
        let r = raw(addr, "POST", "/_sandbox/token", &[], "new-token\n").await;
        assert_eq!(r.status, 204);
        assert_eq!(call(addr, "secret", "exec-1").await.status, 401);
        assert_eq!(call(addr, "new-token", "exec-1").await.status, 200);
        raw(addr, "POST", "/_sandbox/token", &[], "").await;
        assert_eq!(call(addr, "whatever", "exec-1").await.status, 200);

        running.shutdown().await;
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_slow_ratios_and_drop() {
        let running = start(SandboxArgs {
            latency: Duration::from_millis(50),
            fail_ratios: parse_ratios("503=1").unwrap(),
            ..SandboxArgs::default()
        })
        .await;
        let addr = running.local_addr();

        let t = std::time::Instant::now();
        let r = call(addr, "t", "slow-200-x").await;
        assert_eq!(r.status, 200);
        // The base latency aims TIMER_LAG early; the scripted delay is a minimum.
        assert!(
            t.elapsed() >= Duration::from_millis(200) + timer_aim(Duration::from_millis(50)),
            "{:?}",
            t.elapsed()
        );
        let stats = running.sandbox().stats();
        assert_eq!(stats.answered, 1);
        assert!(
            stats.answer_micros >= 249_000,
            "the answer time covers both waits: {stats:?}"
        );

        // Every unscripted execution lands in the 503 bucket.
        let r = call(addr, "t", "exec-1").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));

        // Concurrent slow calls show up in max_in_flight.
        let calls: Vec<_> = (0..4)
            .map(|i| tokio::spawn(async move { call(addr, "t", &format!("slow-300-{i}")).await }))
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap().status, 200);
        }
        assert!(running.sandbox().stats().max_in_flight >= 2);

        // Dropping the handle stops the server.
        drop(running);
        let closed = async {
            loop {
                if TcpStream::connect(addr).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("server still accepting after drop");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_cuts_slow_calls_short() {
        let running = start(SandboxArgs::default()).await;
        let addr = running.local_addr();
        let slow = tokio::spawn(async move { call(addr, "t", "slow-60000-x").await });
        while running.sandbox().stats().in_flight == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        running.shutdown().await;
        // Answered 503 by the shutdown, not 200 after its minute.
        assert_eq!(slow.await.unwrap().status, 503);
    }
}
