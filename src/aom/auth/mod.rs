//! Authentication of API calls, in the three ways real deployments use:
//! a static token (or a token file re-read when it changes), an IAM token
//! obtained with a password and renewed ahead of expiry, or AK/SK request
//! signing as the official SDKs do it.
//!
//! Every credential carries a generation. After a 401, [`Auth::rejected`]
//! is told which project's credential of which generation was refused; only
//! the first to report a generation causes a refresh, so a storm of 401s
//! costs one IAM call.
//!
//! Credentials cover projects: an IAM token the project it is scoped to, a
//! static token the one project `AOM_AUTH_TOKEN_PROJECT_ID` declares (or, if
//! none is declared, whatever the API lets it), an AK/SK pair any project it
//! names in `X-Project-Id`. A project the credentials cannot cover is
//! [`AuthError::NotCovered`], known without calling the API.

pub mod aksk;
pub mod iam;
pub mod token;

use crate::domain::ProjectId;
use crate::settings::{AkSkSettings, AuthSettings};
use chrono::Utc;
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::ExposeSecret;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

pub use iam::IamTokens;
pub use token::TokenSource;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}: {reason}")]
    TokenFile { path: String, reason: String },
    #[error("IAM token request failed: {0}")]
    Iam(String),
    /// The credentials cannot cover this project; no call is made for it.
    #[error("the credentials do not cover project {project}: {why}")]
    NotCovered { project: String, why: String },
}

/// What a call is, for the signer.
pub struct CallInfo<'a> {
    pub method: &'a str,
    pub url: &'a reqwest::Url,
    pub project_id: &'a str,
    pub content_type: &'a str,
    pub body: &'a [u8],
}

/// Headers to add to one call, and the generation of the credential used.
pub struct Credential {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub generation: u64,
}

#[derive(Debug, Clone)]
pub enum Auth {
    Token(Arc<DeclaredToken>),
    Iam(Arc<IamTokens>),
    AkSk(Arc<AkSkSettings>),
}

/// A static token (or token file) and the one project it is declared for.
#[derive(Debug)]
pub struct DeclaredToken {
    source: TokenSource,
    project: Option<ProjectId>,
    /// Projects already logged as not covered: one line each, not one per request.
    logged: Mutex<HashSet<String>>,
}

impl DeclaredToken {
    fn new(source: TokenSource, project: Option<ProjectId>) -> Self {
        Self {
            source,
            project,
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// `Err` when a project is declared and `project` is another.
    fn covers(&self, project: &str) -> Result<(), AuthError> {
        let Some(declared) = &self.project else {
            return Ok(());
        };
        if declared.as_str() == project {
            return Ok(());
        }
        let first = self
            .logged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(project.to_owned());
        if first {
            tracing::warn!(
                project = %project,
                declared = %declared,
                "AOM_AUTH_TOKEN_PROJECT_ID declares the token for another project: this \
                 project's requests are held, and the API never sees them"
            );
        }
        Err(AuthError::NotCovered {
            project: project.to_owned(),
            why: format!("AOM_AUTH_TOKEN_PROJECT_ID declares the token for project {declared}"),
        })
    }
}

static X_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-auth-token");

impl Auth {
    pub fn new(settings: &AuthSettings, http: reqwest::Client) -> Result<Self, AuthError> {
        Ok(match settings {
            AuthSettings::Token(t) => Auth::Token(Arc::new(DeclaredToken::new(
                TokenSource::fixed(&t.token)?,
                t.project.clone(),
            ))),
            AuthSettings::TokenFile(f) => Auth::Token(Arc::new(DeclaredToken::new(
                TokenSource::file(&f.token)?,
                f.project.clone(),
            ))),
            AuthSettings::Iam(s) => Auth::Iam(Arc::new(IamTokens::new(s.clone(), http))),
            AuthSettings::AkSk(s) => Auth::AkSk(Arc::new(s.clone())),
        })
    }

    pub async fn credential(&self, call: &CallInfo<'_>) -> Result<Credential, AuthError> {
        match self {
            Auth::Token(source) => {
                source.covers(call.project_id)?;
                let (token, generation) = source.source.current()?;
                Ok(Credential {
                    headers: vec![(X_AUTH_TOKEN.clone(), token)],
                    generation,
                })
            }
            Auth::Iam(iam) => {
                let (token, generation) = match iam.cached(call.project_id) {
                    Some(cached) => cached,
                    // Asking IAM is rare, and its future large: boxed, so
                    // that every call's future stays small.
                    None => Box::pin(IamTokens::current(iam, call.project_id)).await?,
                };
                Ok(Credential {
                    headers: vec![(X_AUTH_TOKEN.clone(), token)],
                    generation,
                })
            }
            Auth::AkSk(keys) => Ok(Credential {
                headers: sign_call(
                    keys,
                    call,
                    &Utc::now().format(aksk::DATE_FORMAT).to_string(),
                ),
                generation: 0,
            }),
        }
    }

    /// The API answered 401 to a call for `project` made with `generation`.
    /// Returns whether a new credential may now be available, so that one
    /// immediate retry is worth making before holding the project. An IAM
    /// token is per project: only `project`'s is renewed.
    pub fn rejected(&self, project: &ProjectId, generation: u64) -> bool {
        match self {
            Auth::Token(source) => source.source.rejected(generation),
            Auth::Iam(iam) => iam.rejected(project, generation),
            Auth::AkSk(_) => false,
        }
    }
}

/// The headers an AK/SK-signed call carries.
pub fn sign_call(
    keys: &AkSkSettings,
    call: &CallInfo<'_>,
    sdk_date: &str,
) -> Vec<(HeaderName, HeaderValue)> {
    let host = match call.url.port() {
        Some(port) => format!("{}:{port}", call.url.host_str().unwrap_or_default()),
        None => call.url.host_str().unwrap_or_default().to_owned(),
    };
    let mut signed = vec![
        ("Content-Type".to_owned(), call.content_type.to_owned()),
        ("Host".to_owned(), host),
        ("X-Project-Id".to_owned(), call.project_id.to_owned()),
        ("X-Sdk-Date".to_owned(), sdk_date.to_owned()),
    ];
    if let Some(token) = &keys.security_token {
        signed.push((
            "X-Security-Token".to_owned(),
            token.expose_secret().to_owned(),
        ));
    }
    let query: Vec<(String, String)> = call.url.query_pairs().into_owned().collect();
    let signature = aksk::sign(
        &aksk::SigningInput {
            method: call.method,
            path: call.url.path(),
            query: &query,
            headers: &signed,
            body: call.body,
        },
        sdk_date,
        keys.secret_key.expose_secret().as_bytes(),
    );
    let mut out = Vec::with_capacity(4);
    let mut add = |name: &'static str, value: &str, sensitive: bool| {
        if let Ok(mut v) = HeaderValue::from_str(value) {
            v.set_sensitive(sensitive);
            out.push((HeaderName::from_static(name), v));
        }
    };
    add("x-sdk-date", sdk_date, false);
    add("x-project-id", call.project_id, false);
    if let Some(token) = &keys.security_token {
        add("x-security-token", token.expose_secret(), true);
    }
    add(
        "authorization",
        &signature.authorization(&keys.access_key),
        true,
    );
    out
}
