//! IAM password authentication: `POST /v3/auth/tokens` (password method,
//! project scope), the token from the `X-Subject-Token` header, its expiry
//! from `token.expires_at`.
//!
//! An IAM token covers one project, so there is one token per project the
//! requests name, obtained on demand by project id. Each is cached and
//! renewed ahead of expiry in the background; renewal is single-flight per
//! project, so any number of callers that need a project's new token at once
//! cause one IAM call, and projects never wait on each other.
//!
//! A project IAM refuses to scope a token for (the user has no role there) is
//! not covered: [`AuthError::NotCovered`], and the dispatcher holds that
//! project only. A refusal is told apart from wrong credentials by the home
//! project (`IAM_PROJECT_NAME`/`IAM_PROJECT_ID`): if IAM refuses that one too,
//! the credentials are wrong and every call waits, as before.

use super::AuthError;
use crate::domain::{ProjectId, truncate};
use crate::settings::{IamSettings, ProjectScope};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After a failed IAM call, callers get that failure back for this long
/// instead of calling IAM again (the 401 probe schedule paces the retries).
/// It holds a refusal too: a role granted later is seen on the next probe.
const FAILURE_HOLD: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct IamTokens {
    settings: IamSettings,
    http: reqwest::Client,
    /// One token slot per project id, made on first use.
    projects: Mutex<HashMap<String, Arc<Slot>>>,
    /// The home project's slot, when one is configured.
    home: Option<Arc<Slot>>,
}

/// One project's token: its cache and its single-flight turn.
#[derive(Debug)]
struct Slot {
    scope: ProjectScope,
    state: Mutex<State>,
    renewing: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct State {
    token: Option<Cached>,
    generation: u64,
    failure: Option<(Instant, AuthError)>,
    /// IAM refused this project the last time: logged once, until it is covered.
    uncovered: bool,
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

/// What one token request came to.
enum Answer {
    Token(HeaderValue, DateTime<Utc>),
    /// IAM answered 401 or 403 for this scope.
    Refused(String),
    /// IAM could not be asked, or answered something else: transient.
    Failed(String),
}

impl Slot {
    fn new(scope: ProjectScope) -> Arc<Self> {
        Arc::new(Self {
            scope,
            state: Mutex::new(State::default()),
            renewing: Arc::new(tokio::sync::Mutex::new(())),
        })
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

    fn label(&self) -> &str {
        match &self.scope {
            ProjectScope::Id(id) | ProjectScope::Name(id) => id,
        }
    }
}

impl IamTokens {
    pub fn new(settings: IamSettings, http: reqwest::Client) -> Self {
        let home = settings.home.clone().map(Slot::new);
        let mut projects = HashMap::new();
        if let (Some(slot), Some(ProjectScope::Id(id))) = (&home, &settings.home) {
            // The home project by id is an ordinary project too: one token.
            projects.insert(id.clone(), Arc::clone(slot));
        }
        Self {
            settings,
            http,
            projects: Mutex::new(projects),
            home,
        }
    }

    fn slot(&self, project: &str) -> Arc<Slot> {
        let mut projects = self.projects.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up by `&str` first: the key is allocated only for a new
        // project, not on every call.
        if let Some(slot) = projects.get(project) {
            return Arc::clone(slot);
        }
        let slot = Slot::new(ProjectScope::Id(project.to_owned()));
        projects.insert(project.to_owned(), Arc::clone(&slot));
        slot
    }

    /// The cached token for `project`, if it is usable now (renewed in the
    /// background when due): what almost every call takes, with no wait.
    pub fn cached(self: &Arc<Self>, project: &str) -> Option<(HeaderValue, u64)> {
        self.usable(&self.slot(project))
    }

    fn usable(self: &Arc<Self>, slot: &Arc<Slot>) -> Option<(HeaderValue, u64)> {
        match slot.peek() {
            Peek::Fresh(v, g) => Some((v, g)),
            Peek::Due(v, g) => {
                self.renew_in_background(slot);
                Some((v, g))
            }
            Peek::Missing => None,
        }
    }

    /// A valid token for `project` and its generation: the cached one, or a
    /// new one. [`AuthError::NotCovered`] when IAM will not scope one to it.
    pub async fn current(self: &Arc<Self>, project: &str) -> Result<(HeaderValue, u64), AuthError> {
        let slot = self.slot(project);
        let result = self.token_of(&slot).await;
        match result {
            Err(AuthError::NotCovered { why, .. }) => Err(self.judge_refusal(&slot, why).await),
            other => other,
        }
    }

    /// Whether the credentials themselves work: a token for the home project
    /// (cached, or obtained now). `Ok` without a home project: only the
    /// projects' own answers can tell.
    pub async fn check_credentials(self: &Arc<Self>) -> Result<(), AuthError> {
        match &self.home {
            Some(home) => self.token_of(home).await.map(|_| ()),
            None => Ok(()),
        }
    }

    async fn token_of(self: &Arc<Self>, slot: &Arc<Slot>) -> Result<(HeaderValue, u64), AuthError> {
        if let Some(usable) = self.usable(slot) {
            return Ok(usable);
        }
        let _turn = slot.renewing.lock().await;
        // Whoever held the turn before us may have renewed already.
        if let Peek::Fresh(v, g) | Peek::Due(v, g) = slot.peek() {
            return Ok((v, g));
        }
        if let Some((at, err)) = &slot.lock().failure
            && at.elapsed() < FAILURE_HOLD
        {
            return Err(err.clone());
        }
        self.renew(slot).await
    }

    /// IAM refused a project's scope: either the user has no role there (the
    /// project is not covered), or the credentials are wrong, which the home
    /// project tells. Without a home project it is taken as the former: were
    /// the credentials wrong, every project is refused and all are held.
    async fn judge_refusal(self: &Arc<Self>, slot: &Arc<Slot>, why: String) -> AuthError {
        let refused_home = self.home.as_ref().is_some_and(|h| Arc::ptr_eq(h, slot));
        if refused_home {
            return credentials_refused(&why);
        }
        let project = slot.label().to_owned();
        match self.check_credentials().await {
            Ok(()) => {
                let first = !std::mem::replace(&mut slot.lock().uncovered, true);
                if first {
                    tracing::warn!(
                        project = %project,
                        user = %self.settings.user,
                        why = %why,
                        "IAM will not scope a token to this project (the user has no role \
                         there?): its requests are held until it does"
                    );
                }
                AuthError::NotCovered { project, why }
            }
            Err(AuthError::NotCovered { why, .. }) => credentials_refused(&why),
            // IAM down or answering 5xx: not a verdict on the credentials.
            Err(other) => other,
        }
    }

    fn renew_in_background(self: &Arc<Self>, slot: &Arc<Slot>) {
        let Ok(turn) = Arc::clone(&slot.renewing).try_lock_owned() else {
            return; // a renewal is already under way
        };
        let me = Arc::clone(self);
        let slot = Arc::clone(slot);
        tokio::spawn(async move {
            let _turn = turn;
            if matches!(slot.peek(), Peek::Due(..)) {
                // A failure is kept in the slot; the current token stays in
                // use until it expires, and the next caller tries again.
                let _ = me.renew(&slot).await;
            }
        });
    }

    /// After a 401 with `project`'s token of `generation`: mark it stale so
    /// that the next caller renews. Always worth one retry: it is renewed.
    pub fn rejected(&self, project: &ProjectId, generation: u64) -> bool {
        let slot = self.slot(project.as_str());
        let mut state = slot.lock();
        if state.generation == generation
            && let Some(t) = &mut state.token
        {
            t.stale = true;
        }
        true
    }

    async fn renew(&self, slot: &Slot) -> Result<(HeaderValue, u64), AuthError> {
        let answer = self.request_token(&slot.scope).await;
        let mut state = slot.lock();
        match answer {
            Answer::Token(value, expires_at) => {
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
                if std::mem::take(&mut state.uncovered) {
                    tracing::info!(project = %slot.label(), "IAM now scopes tokens to this project");
                }
                tracing::info!(
                    user = %self.settings.user,
                    project = %slot.label(),
                    expires_at = %expires_at.to_rfc3339(),
                    "obtained an IAM token"
                );
                Ok((value, state.generation))
            }
            Answer::Refused(why) => {
                let err = AuthError::NotCovered {
                    project: slot.label().to_owned(),
                    why,
                };
                state.failure = Some((Instant::now(), err.clone()));
                Err(err)
            }
            Answer::Failed(why) => {
                let err = AuthError::Iam(why);
                tracing::warn!(error = %err, user = %self.settings.user, "IAM token request failed");
                state.failure = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    async fn request_token(&self, scope: &ProjectScope) -> Answer {
        let s = &self.settings;
        let scope = match scope {
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
        let sent = self
            .http
            .post(self.iam_url("/v3/auth/tokens"))
            .header("Content-Type", "application/json;charset=utf8")
            .body(body.to_string())
            .send()
            .await;
        let (status, headers, text) = match read(sent).await {
            Ok(answer) => answer,
            Err(why) => return Answer::Failed(why),
        };
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Answer::Refused(format!(
                "IAM answered {status}: {}",
                iam_error_message(&text)
            ));
        }
        if !status.is_success() {
            return Answer::Failed(format!(
                "IAM answered {status}: {}",
                iam_error_message(&text)
            ));
        }
        let Some(mut token) = headers
            .get("x-subject-token")
            .filter(|t| !t.is_empty())
            .cloned()
        else {
            return Answer::Failed("IAM answered without X-Subject-Token".to_owned());
        };
        token.set_sensitive(true);
        let expires_at = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["token"]["expires_at"].as_str().map(str::to_owned))
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|d| d.with_timezone(&Utc));
        match expires_at {
            Some(at) => Answer::Token(token, at),
            None => Answer::Failed("IAM answered without token.expires_at".to_owned()),
        }
    }

    fn iam_url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.settings.endpoint.as_str().trim_end_matches('/')
        )
    }

    /// `GET /v3/projects/{project}` with the project's own token (Keystone
    /// lets a token read the project it is scoped to): the project's name,
    /// or why there is none.
    pub async fn project_name(self: &Arc<Self>, project: &ProjectId) -> Result<String, Lookup> {
        let (token, generation) = self.current(project.as_str()).await.map_err(Lookup::Auth)?;
        let sent = self
            .http
            .get(self.iam_url(&format!("/v3/projects/{}", project.as_str())))
            .header("X-Auth-Token", token)
            .send()
            .await;
        let (status, _, text) = read(sent)
            .await
            .map_err(|why| Lookup::Auth(AuthError::Iam(why)))?;
        let message = || format!("IAM answered {status}: {}", iam_error_message(&text));
        match status {
            StatusCode::OK => serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["project"]["name"].as_str().map(str::to_owned))
                .ok_or_else(|| {
                    Lookup::Auth(AuthError::Iam(
                        "IAM answered without project.name".to_owned(),
                    ))
                }),
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN => {
                Err(Lookup::Unknown(message()))
            }
            StatusCode::UNAUTHORIZED => {
                self.rejected(project, generation);
                Err(Lookup::Auth(AuthError::Iam(message())))
            }
            _ => Err(Lookup::Auth(AuthError::Iam(message()))),
        }
    }
}

/// Why a project's name could not be had.
#[derive(Debug)]
pub enum Lookup {
    /// IAM answered, and has no name to give (no such project, or not to
    /// this user): final for the request.
    Unknown(String),
    /// No token for it, or IAM could not be asked: try again later.
    Auth(AuthError),
}

type Read = (StatusCode, reqwest::header::HeaderMap, String);

async fn read(sent: Result<reqwest::Response, reqwest::Error>) -> Result<Read, String> {
    let chain = |e: reqwest::Error| crate::telemetry::cause_chain(&e.without_url());
    let resp = sent.map_err(chain)?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.map_err(chain)?;
    Ok((status, headers, text))
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

/// IAM refused the home project: the credentials are wrong.
fn credentials_refused(why: &str) -> AuthError {
    AuthError::Iam(format!("IAM refused the credentials: {why}"))
}
