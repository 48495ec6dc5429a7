//! Authentication of API calls, in the three ways real deployments use:
//! a static token (or a token file re-read when it changes), an IAM token
//! obtained with a password and renewed ahead of expiry, or AK/SK request
//! signing as the official SDKs do it.
//!
//! Every credential carries a generation. After a 401, [`Auth::rejected`]
//! is told which generation was refused; only the first to report a
//! generation causes a refresh, so a storm of 401s costs one IAM call.

pub mod aksk;
pub mod iam;
pub mod token;

use crate::settings::{AkSkSettings, AuthSettings};
use chrono::Utc;
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::ExposeSecret;
use std::sync::Arc;

pub use iam::IamTokens;
pub use token::TokenSource;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}: {reason}")]
    TokenFile { path: String, reason: String },
    #[error("IAM token request failed: {0}")]
    Iam(String),
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
    Token(Arc<TokenSource>),
    Iam(Arc<IamTokens>),
    AkSk(Arc<AkSkSettings>),
}

static X_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-auth-token");

impl Auth {
    pub fn new(settings: &AuthSettings, http: reqwest::Client) -> Result<Self, AuthError> {
        Ok(match settings {
            AuthSettings::Token(t) => Auth::Token(Arc::new(TokenSource::fixed(t)?)),
            AuthSettings::TokenFile(p) => Auth::Token(Arc::new(TokenSource::file(p)?)),
            AuthSettings::Iam(s) => Auth::Iam(Arc::new(IamTokens::new(s.clone(), http))),
            AuthSettings::AkSk(s) => Auth::AkSk(Arc::new(s.clone())),
        })
    }

    pub async fn credential(&self, call: &CallInfo<'_>) -> Result<Credential, AuthError> {
        match self {
            Auth::Token(source) => {
                let (token, generation) = source.current()?;
                Ok(Credential {
                    headers: vec![(X_AUTH_TOKEN.clone(), token)],
                    generation,
                })
            }
            Auth::Iam(iam) => {
                let (token, generation) = IamTokens::current(iam).await?;
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

    /// The API answered 401 to a call made with `generation`. Returns
    /// whether a new credential may now be available, so that one immediate
    /// retry is worth making before pausing.
    pub fn rejected(&self, _project: &crate::domain::ProjectId, generation: u64) -> bool {
        match self {
            Auth::Token(source) => source.rejected(generation),
            Auth::Iam(iam) => iam.rejected(generation),
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
