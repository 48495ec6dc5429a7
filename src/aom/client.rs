//! The AOM terminate client: builds the request and sends it once; the
//! answer is classified in [`super::classify`]. Retrying is the
//! dispatcher's job.

use super::auth::{Auth, AuthError, CallInfo};
use super::classify::{classify_answer, classify_transport_error};
use super::direct::{self, Answer, Direct, proxy_configured};
use super::route::{Route, Router};
use crate::domain::{Attempt, ErrorKind, TerminationRequest};
use crate::settings::{AomEndpoint, AuthSettings, HttpVersion};
use crate::telemetry::tls_failure;
use chrono::Utc;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// RFC 3986 path segment: everything but the unreserved characters is
/// percent-encoded, so an id can never add or climb a path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How much of an answer's body is read at all.
const BODY_READ_LIMIT: usize = 64 * 1024;
pub(super) const JSON: &str = "application/json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("AOM_CA_FILE holds no usable certificate")]
    Ca(#[source] reqwest::Error),
    #[error("cannot set up TLS for the AOM API: {0}")]
    Tls(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// Why a call could not be made or could not be trusted. No HTTP call to
/// the API was made for any of these.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// A fault of the configuration (or IAM out of reach), not a verdict on
    /// the request: the dispatcher pauses on it as on a 401, probes, and
    /// resumes by itself.
    #[error("no credentials for the AOM API: {0}")]
    Auth(AuthError),
    #[error("TLS with the AOM API at {host} failed: {why}")]
    Tls { host: String, why: String },
    /// The credentials cannot cover this project (a static token declared
    /// for another, or IAM refusing to scope a token to it): the dispatcher
    /// holds this project only, and probes it by calling again.
    #[error("the credentials do not cover project {project}: {why}")]
    NotCovered { project: String, why: String },
    /// The endpoint has `{region}` and the request's region cannot be found:
    /// a verdict on the request (`rejected`, with this reason).
    #[error("{0}")]
    Unroutable(String),
}

impl From<AuthError> for CallError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NotCovered { project, why } => CallError::NotCovered { project, why },
            other => CallError::Auth(other),
        }
    }
}

#[derive(Clone)]
pub struct TerminateClient {
    /// One client for every host: it keeps a connection pool per host, so
    /// regions do not share (or starve) each other's connections.
    http: reqwest::Client,
    /// hyper's client, for the calls when no proxy is set (see
    /// [`super::direct`]); reqwest makes them otherwise.
    direct: Option<Direct>,
    /// The endpoint, parsed once; each call's URL is a copy of its region's
    /// base with the call's path.
    router: Arc<Router>,
    auth: Auth,
}

impl std::fmt::Debug for TerminateClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminateClient")
            .field("endpoint", &self.router.endpoint().as_str())
            .finish_non_exhaustive()
    }
}

/// How the terminate calls are made.
#[derive(Debug, Clone, Copy)]
pub struct HttpOptions<'a> {
    /// Timeout of one call.
    pub timeout: Duration,
    /// Keep-alive connections kept per host: the concurrency, so that a
    /// steady load never reconnects.
    pub pool: usize,
    /// CAs trusted besides the system's roots (AOM_CA_FILE), for the API
    /// and IAM alike.
    pub ca_pem: Option<&'a str>,
    /// Which HTTP the calls speak (AOM_HTTP_VERSION).
    pub version: HttpVersion,
}

#[cfg(test)]
impl HttpOptions<'_> {
    /// The system's roots only, HTTP/1.1.
    pub fn new(timeout: Duration, pool: usize) -> Self {
        Self {
            timeout,
            pool,
            ca_pem: None,
            version: HttpVersion::Http1,
        }
    }
}

impl TerminateClient {
    /// Proxies come from `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY`, as
    /// reqwest reads them; none by default. Without one, the calls go
    /// through hyper's client directly ([`super::direct`]).
    /// `endpoint`: an [`AomEndpoint`], or a plain URL (a fixed endpoint).
    pub fn new<E: Clone + Into<AomEndpoint>>(
        endpoint: &E,
        auth: &AuthSettings,
        options: HttpOptions<'_>,
    ) -> Result<Self, ApiError> {
        let HttpOptions {
            timeout,
            pool,
            ca_pem,
            version,
        } = options;
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(ApiError::Ca)?;
            builder = builder.tls_certs_merge(certs);
        }
        if version == HttpVersion::Http1 {
            builder = builder.http1_only();
        }
        let http = builder
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
        let direct = if proxy_configured() {
            None
        } else {
            Some(Direct::new(timeout, pool, ca_pem, version)?)
        };
        Ok(Self {
            http,
            direct,
            router: Arc::new(Router::new(endpoint.clone().into())),
            auth,
        })
    }

    /// Where `req` goes: its region's base URL (see [`super::route`]).
    pub async fn route(&self, req: &TerminationRequest) -> Result<Route, CallError> {
        self.router.route(req, &self.auth).await
    }

    /// The terminate route under `base` (and its path prefix, if any).
    /// Only the path is built per call: the host is not parsed again.
    pub fn url_for(base: &Url, req: &TerminationRequest) -> Url {
        let path = format!(
            "{}/v1/{}/cms/workflow/{}/executions/{}/terminate",
            base.path().trim_end_matches('/'),
            utf8_percent_encode(req.project_id.as_str(), PATH_SEGMENT),
            utf8_percent_encode(req.workflow_id.as_str(), PATH_SEGMENT),
            utf8_percent_encode(req.execution_id.as_str(), PATH_SEGMENT),
        );
        let mut url = base.clone();
        url.set_path(&path);
        url
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// One attempt. A network error is an attempt too; a credential that
    /// cannot be had (IAM refusing, say), a project the credentials do not
    /// cover and a region that cannot be found fail with no call made, and
    /// so does a TLS failure (an unknown CA, a name that does not match).
    pub async fn terminate(&self, req: &TerminationRequest) -> Result<Attempt, CallError> {
        let route = self.route(req).await?;
        let parsed = Self::url_for(&route.base, req);
        let host = parsed.host_str().unwrap_or_default().to_owned();
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
        let started_at = Utc::now();
        let clock = Instant::now();
        let answer = match &self.direct {
            Some(direct) => direct
                .post(&parsed, credential.headers, BODY_READ_LIMIT)
                .await
                .map_err(Transport::Direct),
            None => self
                .via_reqwest(parsed, credential.headers)
                .await
                .map_err(Transport::Reqwest),
        };
        let latency = clock.elapsed();
        let mut attempt = match answer {
            Ok((status, headers, body)) => {
                classify_answer(status, &headers, &body, started_at, latency)
            }
            Err(e) => match tls_failure(e.error()) {
                Some(why) => return Err(CallError::Tls { host, why }),
                None => classify_transport_error(e.kind(), e.error(), started_at, latency),
            },
        };
        attempt.auth_generation = credential.generation;
        attempt.region = route.region.map(|r| r.as_str().to_owned());
        attempt.endpoint_host = Some(host);
        Ok(attempt)
    }

    /// The call through reqwest (a proxy is set).
    async fn via_reqwest(
        &self,
        url: Url,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Result<Answer, reqwest::Error> {
        let mut call = self
            .http
            .post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static(JSON));
        for (name, value) in headers {
            call = call.header(name, value);
        }
        let mut resp = call.send().await?;
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        Ok((status, headers, read_body(resp).await?))
    }
}

/// Why a call got no answer, from either client.
enum Transport {
    Direct(direct::Failure),
    Reqwest(reqwest::Error),
}

impl Transport {
    fn error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Transport::Direct(e) => e,
            Transport::Reqwest(e) => e,
        }
    }

    fn kind(&self) -> ErrorKind {
        let (timeout, connect) = match self {
            Transport::Direct(e) => (e.is_timeout(), e.is_connect()),
            Transport::Reqwest(e) => (e.is_timeout(), e.is_connect()),
        };
        if timeout {
            ErrorKind::Timeout
        } else if connect {
            ErrorKind::Connect
        } else {
            ErrorKind::Network
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ExecutionId, ProjectId, WorkflowId};
    use crate::settings::AuthSettings;

    #[test]
    fn ids_are_percent_encoded_path_segments() {
        let client = TerminateClient::new(
            &Url::parse("https://aom.example.com/prefix/").expect("url"),
            &AuthSettings::Token("t".to_owned().into()),
            HttpOptions::new(Duration::from_secs(1), 1),
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
            region: None,
            campaign_id: None,
        };
        let base = Url::parse("https://aom.example.com/prefix/").expect("url");
        assert_eq!(
            TerminateClient::url_for(&base, &req).as_str(),
            "https://aom.example.com/prefix/v1/0123456789abcdef0123456789abcdef/cms/workflow/\
             wf%2F..%2Fx%20y/executions/ex%3Fa%3D1%23%C3%A9/terminate"
        );
        assert!(!format!("{client:?}").contains("\"t\""));
    }
}
