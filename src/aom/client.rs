//! The AOM terminate client: builds the request and sends it once; the
//! answer is classified in [`super::classify`]. Retrying is the
//! dispatcher's job.

use super::auth::{Auth, AuthError, CallInfo};
use super::classify::{classify_answer, classify_transport_error};
use crate::domain::{Attempt, TerminationRequest};
use crate::settings::AuthSettings;
use crate::telemetry::tls_failure;
use chrono::Utc;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
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
const JSON: &str = "application/json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("AOM_CA_FILE holds no usable certificate")]
    Ca(#[source] reqwest::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// Why a call could not be made or could not be trusted: a fault of the
/// configuration, not a verdict on the request. The dispatcher pauses on it
/// as on a 401, probes, and resumes by itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("no credentials for the AOM API: {0}")]
    Auth(#[from] AuthError),
    #[error("TLS with the AOM API at {host} failed: {why}")]
    Tls { host: String, why: String },
    /// The credentials cannot cover this project (no call made).
    #[error("the credentials do not cover project {project}: {why}")]
    NotCovered { project: String, why: String },
    /// The request's region cannot be found (no call made).
    #[error("{0}")]
    Unroutable(String),
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
    /// `ca_pem`: CAs trusted besides the system's roots (AOM_CA_FILE), for
    /// the API and IAM alike. Proxies come from `HTTPS_PROXY`, `HTTP_PROXY`
    /// and `NO_PROXY`, as reqwest reads them; none by default.
    pub fn new(
        endpoint: &Url,
        auth: &AuthSettings,
        timeout: Duration,
        pool: usize,
        ca_pem: Option<&str>,
    ) -> Result<Self, ApiError> {
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(ApiError::Ca)?;
            builder = builder.tls_certs_merge(certs);
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

    /// One attempt. A network error is an attempt too; a credential that
    /// cannot be had (IAM refusing, say) fails with no call made, and so
    /// does a TLS failure (an unknown CA, a name that does not match).
    pub async fn terminate(&self, req: &TerminationRequest) -> Result<Attempt, CallError> {
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
            Err(e) => match tls_failure(&e) {
                Some(why) => {
                    return Err(CallError::Tls {
                        host: self.base.host_str().unwrap_or_default().to_owned(),
                        why,
                    });
                }
                None => classify_transport_error(&e, started_at, latency),
            },
        };
        attempt.auth_generation = credential.generation;
        attempt.endpoint_host = self.base.host_str().map(str::to_owned);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ExecutionId, ProjectId, WorkflowId};
    use crate::settings::AuthSettings;

    #[test]
    fn ids_are_percent_encoded_path_segments() {
        let client = TerminateClient::new(
            &Url::parse("https://aom.example.com/prefix/").expect("url"),
            &AuthSettings::Token(secrecy::SecretString::from("t")),
            Duration::from_secs(1),
            1,
            None,
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
        assert_eq!(
            client.url_for(&req).as_str(),
            "https://aom.example.com/prefix/v1/0123456789abcdef0123456789abcdef/cms/workflow/\
             wf%2F..%2Fx%20y/executions/ex%3Fa%3D1%23%C3%A9/terminate"
        );
        assert!(!format!("{client:?}").contains("\"t\""));
    }
}
