//! Who the sandbox lets in: an expected token, tokens issued by its fake
//! IAM (`POST /v3/auth/tokens`, password method), and AK/SK signatures
//! checked with the same signer the daemon uses. With none configured,
//! every call is let in.
//!
//! Projects: a static token listed in `--token-projects` covers its projects
//! only (an unlisted expected token covers every project); an IAM token covers
//! the project it was scoped to (by id, or by a name `--project-regions`
//! knows; a name it does not know covers every project, as before).

use super::projects::{ProjectList, ProjectRegions, TokenProjects, domain_id};
use crate::aom::auth::aksk;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// How far `X-Sdk-Date` may be from the sandbox's clock.
const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(15);

/// The account the fake IAM accepts.
#[derive(Clone)]
pub struct IamAccount {
    pub user: String,
    pub password: String,
    pub domain: String,
    pub token_lifetime: Duration,
}

/// The projects side of the identity: token coverage, the IAM user's projects, regions.
#[derive(Clone, Default)]
pub struct ProjectRules {
    pub token_projects: TokenProjects,
    /// `None`: the IAM user may get a token for any project.
    pub iam_user_projects: Option<ProjectList>,
    pub regions: ProjectRegions,
}

/// An IAM token: when it expires and the project it covers (`None`: every project).
struct Issued {
    expires: Instant,
    project: Option<Box<str>>,
}

pub struct Identity {
    /// `None`: no token is expected. Never logged.
    pub expected_token: RwLock<Option<Box<str>>>,
    /// Empty: no token is listed (a valid token covers every project). Never logged.
    pub token_projects: RwLock<TokenProjects>,
    iam_user_projects: Option<ProjectList>,
    regions: ProjectRegions,
    iam: Option<IamAccount>,
    iam_available: AtomicBool,
    issued: Mutex<HashMap<Box<str>, Issued>>,
    pub iam_calls: AtomicU64,
    pub iam_project_lookups: AtomicU64,
    pub iam_calls_by_project: Mutex<BTreeMap<String, u64>>,
    aksk: Option<(String, String)>,
}

impl Identity {
    pub fn new(
        expected_token: Option<Box<str>>,
        iam: Option<IamAccount>,
        aksk: Option<(String, String)>,
        projects: ProjectRules,
    ) -> Self {
        Self {
            expected_token: RwLock::new(expected_token),
            token_projects: RwLock::new(projects.token_projects),
            iam_user_projects: projects.iam_user_projects,
            regions: projects.regions,
            iam,
            iam_available: AtomicBool::new(true),
            issued: Mutex::new(HashMap::new()),
            iam_calls: AtomicU64::new(0),
            iam_project_lookups: AtomicU64::new(0),
            iam_calls_by_project: Mutex::new(BTreeMap::new()),
            aksk,
        }
    }

    fn expected(&self) -> std::sync::RwLockReadGuard<'_, Option<Box<str>>> {
        self.expected_token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn required(&self) -> bool {
        self.expected().is_some()
            || !self.listed().is_empty()
            || self.iam.is_some()
            || self.aksk.is_some()
    }

    fn listed(&self) -> std::sync::RwLockReadGuard<'_, TokenProjects> {
        self.token_projects
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a terminate call for `project_id` may pass (`None`: a path that could not
    /// be read, where only the credentials are checked).
    pub fn admits(&self, parts: &Parts, body: &[u8], project_id: Option<&str>) -> bool {
        if !self.required() {
            return true;
        }
        let headers = &parts.headers;
        if let Some(token) = headers.get("x-auth-token") {
            if self.static_token_covers(token.as_bytes(), project_id) {
                return true;
            }
            if self.iam.is_some() && self.iam_token_covers(token, project_id) {
                return true;
            }
        }
        match &self.aksk {
            Some((ak, sk)) => signature_ok(parts, body, ak, sk),
            None => false,
        }
    }

    /// A listed token covers its projects; the expected token, unless listed, all.
    fn static_token_covers(&self, token: &[u8], project_id: Option<&str>) -> bool {
        if let Some(projects) = self.listed().get(token) {
            return project_id.is_none_or(|p| projects.contains(p));
        }
        self.expected()
            .as_deref()
            .is_some_and(|expected| token == expected.as_bytes())
    }

    fn iam_token_covers(&self, token: &HeaderValue, project_id: Option<&str>) -> bool {
        let Ok(token) = token.to_str() else {
            return false;
        };
        let issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        issued.get(token).is_some_and(|t| {
            Instant::now() < t.expires
                && match (&t.project, project_id) {
                    (Some(covered), Some(asked)) => &**covered == asked,
                    _ => true,
                }
        })
    }

    /// The fake IAM's account, or the answer IAM gives when it is not
    /// configured or is down.
    fn iam_account(&self) -> Result<&IamAccount, (StatusCode, &'static str)> {
        let Some(account) = &self.iam else {
            return Err((
                StatusCode::NOT_FOUND,
                "IAM is not configured in this sandbox",
            ));
        };
        if !self.iam_available.load(Ordering::Relaxed) {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "IAM is unavailable (sandbox)",
            ));
        }
        Ok(account)
    }

    /// `GET /v3/projects/{project_id}`, as IAM answers it: the project and its region
    /// (its name), for a caller with a valid token.
    pub fn show_project(&self, headers: &HeaderMap, project_id: &str) -> Response {
        self.iam_project_lookups.fetch_add(1, Ordering::Relaxed);
        let account = match self.iam_account() {
            Ok(account) => account,
            Err((status, why)) => return keystone_error(status, why),
        };
        let valid = headers.get("x-auth-token").is_some_and(|token| {
            self.iam_token_covers(token, None) || self.static_token_covers(token.as_bytes(), None)
        });
        if !valid {
            return keystone_error(
                StatusCode::UNAUTHORIZED,
                "The request you have made requires authentication.",
            );
        }
        let Some(region) = self.regions.region(project_id) else {
            return keystone_error(
                StatusCode::NOT_FOUND,
                &format!("Could not find project: {project_id}."),
            );
        };
        let body = serde_json::json!({"project": {
            "id": project_id,
            "name": region,
            "domain_id": domain_id(&account.domain),
            "enabled": true,
        }});
        (StatusCode::OK, axum::Json(body)).into_response()
    }

    fn count_iam_call(&self, project: Option<&str>) {
        self.iam_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(project) = project {
            let mut by_project = self
                .iam_calls_by_project
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match by_project.get_mut(project) {
                Some(n) => *n += 1,
                None => {
                    by_project.insert(project.to_owned(), 1);
                }
            }
        }
    }

    /// Zeroes the IAM counters.
    pub fn reset_counts(&self) {
        self.iam_calls.store(0, Ordering::Relaxed);
        self.iam_project_lookups.store(0, Ordering::Relaxed);
        self.iam_calls_by_project
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Make IAM answer 503 (down) or work again.
    pub fn set_iam_available(&self, available: bool) {
        self.iam_available.store(available, Ordering::Relaxed);
    }

    /// Forget every issued IAM token: the next calls with them get 401.
    pub fn revoke_iam_tokens(&self) {
        self.issued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// `POST /v3/auth/tokens`, as IAM answers it.
    pub fn issue_token(&self, body: &[u8]) -> Response {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let scope = &v["auth"]["scope"]["project"];
        self.count_iam_call(scope["id"].as_str().or(scope["name"].as_str()));
        let account = match self.iam_account() {
            Ok(account) => account,
            Err((status, why)) => return keystone_error(status, why),
        };
        let identity = &v["auth"]["identity"];
        let user = &identity["password"]["user"];
        let password_method = identity["methods"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x == "password"));
        if !password_method || !(scope["name"].is_string() || scope["id"].is_string()) {
            return keystone_error(
                StatusCode::BAD_REQUEST,
                "password method and project scope required",
            );
        }
        if user["name"] != account.user.as_str()
            || user["password"] != account.password.as_str()
            || user["domain"]["name"] != account.domain.as_str()
        {
            return keystone_error(
                StatusCode::UNAUTHORIZED,
                "The username or password is wrong.",
            );
        }
        // The project the token is for: its id, or the project `--project-regions` puts
        // in the region named (unknown: every project, as before).
        let project = match (scope["id"].as_str(), scope["name"].as_str()) {
            (Some(id), _) => Some(id),
            (None, Some(name)) => self.regions.project_in(name),
            (None, None) => None,
        };
        if let Some(allowed) = &self.iam_user_projects
            && !project.is_some_and(|p| allowed.contains(p))
        {
            // What IAM answers when the user has no role in the project asked for.
            return keystone_error(
                StatusCode::UNAUTHORIZED,
                "The request you have made requires authentication.",
            );
        }
        let token = format!("MIIsandbox{:032x}", fastrand::u128(..));
        let now = chrono::Utc::now();
        let expires_at = now
            + chrono::TimeDelta::from_std(account.token_lifetime).unwrap_or(chrono::TimeDelta::MAX);
        {
            let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
            issued.retain(|_, t| Instant::now() < t.expires);
            issued.insert(
                token.as_str().into(),
                Issued {
                    expires: Instant::now() + account.token_lifetime,
                    project: project.map(Box::from),
                },
            );
        }
        let mut body = serde_json::json!({"token": {
            "methods": ["password"],
            "issued_at": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "expires_at": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "user": {"name": account.user, "domain": {"name": account.domain}},
        }});
        if let Some(id) = project {
            body["token"]["project"] = serde_json::json!({
                "id": id,
                "name": self.regions.region(id).or(scope["name"].as_str()),
                "domain": {"id": domain_id(&account.domain), "name": account.domain},
            });
        }
        let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(&token) {
            response.headers_mut().insert("x-subject-token", value);
        }
        response
    }
}

fn keystone_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({"error": {
        "code": status.as_u16(), "message": message, "title": status.canonical_reason()
    }});
    (status, axum::Json(body)).into_response()
}

/// Recompute the `SDK-HMAC-SHA256` signature of a call and compare.
fn signature_ok(parts: &Parts, body: &[u8], access_key: &str, secret_key: &str) -> bool {
    let headers = &parts.headers;
    let Some(auth) = header(headers, "authorization") else {
        return false;
    };
    let Some(fields) = auth.strip_prefix(aksk::ALGORITHM).map(str::trim) else {
        return false;
    };
    let mut access = None;
    let mut signed_headers = None;
    let mut signature = None;
    for field in fields.split(',').map(str::trim) {
        match field.split_once('=') {
            Some(("Access", v)) => access = Some(v),
            Some(("SignedHeaders", v)) => signed_headers = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => {}
        }
    }
    let (Some(access), Some(signed_headers), Some(signature)) = (access, signed_headers, signature)
    else {
        return false;
    };
    let Some(date) = header(headers, "x-sdk-date") else {
        return false;
    };
    let fresh = chrono::NaiveDateTime::parse_from_str(date, aksk::DATE_FORMAT)
        .is_ok_and(|d| (d.and_utc() - chrono::Utc::now()).abs() <= CLOCK_SKEW);
    if access != access_key || !fresh {
        return false;
    }
    let mut signed = Vec::new();
    for name in signed_headers.split(';') {
        // HTTP/2 carries the host in `:authority`, not in a header.
        let value = if name.eq_ignore_ascii_case("host") {
            super::server::addressed_host(parts)
        } else {
            header(headers, name)
        };
        match value {
            Some(value) => signed.push((name.to_owned(), value.to_owned())),
            None => return false,
        }
    }
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| {
            reqwest::Url::parse(&format!("http://sandbox/?{q}"))
                .map(|u| u.query_pairs().into_owned().collect())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let expected = aksk::sign(
        &aksk::SigningInput {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: &query,
            headers: &signed,
            body,
        },
        date,
        secret_key.as_bytes(),
    );
    expected.signature == signature
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
