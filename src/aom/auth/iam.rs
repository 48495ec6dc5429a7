//! IAM password authentication: `POST /v3/auth/tokens` (password method,
//! project scope), the token from the `X-Subject-Token` header, its expiry
//! from `token.expires_at`. The token is cached and renewed ahead of expiry
//! in the background; renewal is single-flight, so any number of callers
//! that need a new token at once cause one IAM call.

use super::AuthError;
use crate::domain::truncate;
use crate::settings::{IamSettings, ProjectScope};
use chrono::{DateTime, Utc};
use reqwest::header::HeaderValue;
use secrecy::ExposeSecret;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After a failed IAM call, callers get that failure back for this long
/// instead of calling IAM again (the 401 probe schedule paces the retries).
const FAILURE_HOLD: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct IamTokens {
    settings: IamSettings,
    http: reqwest::Client,
    state: Mutex<State>,
    renewing: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct State {
    token: Option<Cached>,
    generation: u64,
    failure: Option<(Instant, AuthError)>,
}

#[derive(Debug)]
struct Cached {
    value: HeaderValue,
    renew_at: Instant,
    usable_until: Instant,
    stale: bool,
}

enum Peek {
    Fresh(HeaderValue, u64),
    Due(HeaderValue, u64),
    Missing,
}

impl IamTokens {
    pub fn new(settings: IamSettings, http: reqwest::Client) -> Self {
        Self {
            settings,
            http,
            state: Mutex::new(State::default()),
            renewing: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn peek(&self) -> Peek {
        let state = self.lock();
        match &state.token {
            Some(t) if !t.stale && Instant::now() < t.usable_until => {
                if Instant::now() < t.renew_at {
                    Peek::Fresh(t.value.clone(), state.generation)
                } else {
                    Peek::Due(t.value.clone(), state.generation)
                }
            }
            _ => Peek::Missing,
        }
    }

    /// A valid token and its generation: the cached one, or a new one.
    pub async fn current(self: &Arc<Self>) -> Result<(HeaderValue, u64), AuthError> {
        match self.peek() {
            Peek::Fresh(v, g) => return Ok((v, g)),
            Peek::Due(v, g) => {
                self.renew_in_background();
                return Ok((v, g));
            }
            Peek::Missing => {}
        }
        let _turn = self.renewing.lock().await;
        // Whoever held the turn before us may have renewed already.
        if let Peek::Fresh(v, g) | Peek::Due(v, g) = self.peek() {
            return Ok((v, g));
        }
        if let Some((at, err)) = &self.lock().failure
            && at.elapsed() < FAILURE_HOLD
        {
            return Err(err.clone());
        }
        self.renew().await
    }

    fn renew_in_background(self: &Arc<Self>) {
        let Ok(turn) = Arc::clone(&self.renewing).try_lock_owned() else {
            return; // a renewal is already under way
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _turn = turn;
            if matches!(me.peek(), Peek::Due(..)) {
                // A failure is kept in `state`; the current token stays in
                // use until it expires, and the next caller tries again.
                let _ = me.renew().await;
            }
        });
    }

    /// After a 401 with a token of `generation`: mark it stale so that the
    /// next caller renews. Always worth one retry: the token is renewed.
    pub fn rejected(&self, generation: u64) -> bool {
        let mut state = self.lock();
        if state.generation == generation
            && let Some(t) = &mut state.token
        {
            t.stale = true;
        }
        true
    }

    async fn renew(&self) -> Result<(HeaderValue, u64), AuthError> {
        let result = self.request_token().await;
        let mut state = self.lock();
        match result {
            Ok((value, expires_at)) => {
                let now = Instant::now();
                let life = (expires_at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                let early = self.settings.renew_before.min(life / 2);
                state.generation += 1;
                state.failure = None;
                state.token = Some(Cached {
                    value: value.clone(),
                    renew_at: now + life.saturating_sub(early),
                    usable_until: now
                        + life.saturating_sub((life / 10).min(Duration::from_secs(10))),
                    stale: false,
                });
                tracing::info!(
                    user = %self.settings.user,
                    expires_at = %expires_at.to_rfc3339(),
                    "obtained an IAM token"
                );
                Ok((value, state.generation))
            }
            Err(e) => {
                tracing::warn!(error = %e, user = %self.settings.user, "IAM token request failed");
                state.failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    async fn request_token(&self) -> Result<(HeaderValue, DateTime<Utc>), AuthError> {
        let s = &self.settings;
        let scope = match &s.project {
            ProjectScope::Name(name) => serde_json::json!({"project": {"name": name}}),
            ProjectScope::Id(id) => serde_json::json!({"project": {"id": id}}),
        };
        let body = serde_json::json!({
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {
                        "name": s.user,
                        "password": s.password.expose_secret(),
                        "domain": {"name": s.domain},
                    }},
                },
                "scope": scope,
            }
        });
        let url = format!(
            "{}/v3/auth/tokens",
            s.endpoint.as_str().trim_end_matches('/')
        );
        let resp = self
            .http
            .post(url)
            .header("Content-Type", "application/json;charset=utf8")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| AuthError::Iam(crate::telemetry::cause_chain(&e.without_url())))?;
        let status = resp.status();
        let token = resp.headers().get("x-subject-token").cloned();
        let text = resp
            .text()
            .await
            .map_err(|e| AuthError::Iam(crate::telemetry::cause_chain(&e.without_url())))?;
        if !status.is_success() {
            return Err(AuthError::Iam(format!(
                "IAM answered {status}: {}",
                iam_error_message(&text)
            )));
        }
        let mut token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::Iam("IAM answered without X-Subject-Token".to_owned()))?;
        token.set_sensitive(true);
        let expires_at = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["token"]["expires_at"].as_str().map(str::to_owned))
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|d| d.with_timezone(&Utc))
            .ok_or_else(|| AuthError::Iam("IAM answered without token.expires_at".to_owned()))?;
        Ok((token, expires_at))
    }
}

/// Keystone's `{"error":{"message":…}}` or Huawei's `{"error_msg":…}`.
fn iam_error_message(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let msg = v["error"]["message"]
        .as_str()
        .or_else(|| v["error_msg"].as_str())
        .unwrap_or(body);
    truncate(msg.trim(), 300).to_owned()
}
