//! The terminate calls' HTTP client when no proxy is configured: hyper's
//! pooled client directly, over rustls with the same verifier as reqwest's
//! (the platform's roots, plus `AOM_CA_FILE`), HTTP/1.1, or HTTP/2 when
//! `AOM_HTTP_VERSION=auto` and the server offers it (ALPN).
//!
//! reqwest does more per call than a terminate call needs: it clones its
//! client and connector, runs its redirect, retry and timeout layers, and
//! turns the answer's URI back into a `Url`. Without them the daemon used
//! 7–17 % less CPU per termination in interleaved runs (BENCHMARKS.md).
//! reqwest still makes the calls when a proxy is set (it implements
//! `HTTP(S)_PROXY`/`NO_PROXY`), and IAM's.

use super::client::ApiError;
use crate::settings::HttpVersion;
use crate::telemetry::causes;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::sync::Arc;
use std::time::Duration;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The proxy variables reqwest reads. With any of them set, the calls go
/// through reqwest, which implements them.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Whether a proxy is configured in the environment.
pub fn proxy_configured() -> bool {
    PROXY_VARIABLES
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// A call that got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the URL is not a valid request target")]
    Uri(#[source] hyper::http::uri::InvalidUri),
    #[error("error sending the request")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("error reading the answer's body")]
    Body(#[source] hyper::Error),
}

impl Failure {
    /// No connection could be made (refused, unreachable, DNS, TLS).
    pub(super) fn is_connect(&self) -> bool {
        matches!(self, Failure::Send(e) if e.is_connect())
    }

    /// No answer in time: the call's timeout, or a connect or read that
    /// timed out (as reqwest's `is_timeout` counts them).
    pub(super) fn is_timeout(&self) -> bool {
        match self {
            Failure::Timeout(_) => true,
            Failure::Send(e) => timed_out(e),
            Failure::Body(e) => timed_out(e),
            Failure::Uri(_) => false,
        }
    }
}

/// Whether something in `err`'s causes timed out (an I/O error or hyper's).
pub(super) fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    causes(err).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
    })
}

/// An answer: its status, headers and up to `limit` bytes of its body.
pub(super) type Answer = (StatusCode, HeaderMap, Vec<u8>);

#[derive(Clone)]
pub(super) struct Direct {
    client: Client<Https, Empty<Bytes>>,
    timeout: Duration,
}

impl Direct {
    /// Settings as reqwest's in [`super::TerminateClient::new`]: `pool`
    /// keep-alive connections per host, a connect timeout of at most 5 s,
    /// and reqwest's TCP keepalive and user timeout, so that a pooled
    /// connection a NAT or load balancer dropped is found before a call
    /// waits on it for its whole timeout.
    /// `version`: HTTP/1.1 only, or HTTP/2 too when an https server offers
    /// it by ALPN (plain http is always HTTP/1.1).
    pub(super) fn new(
        timeout: Duration,
        pool: usize,
        ca_pem: Option<&str>,
        version: HttpVersion,
    ) -> Result<Self, ApiError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout.min(Duration::from_secs(5))));
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        http.set_tcp_user_timeout(Some(Duration::from_secs(30)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(ca_pem)?)
            .https_or_http()
            .enable_http1();
        let https = match version {
            HttpVersion::Http1 => https.wrap_connector(http),
            HttpVersion::Auto => https.enable_http2().wrap_connector(http),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Self { client, timeout })
    }

    /// POST with an empty JSON body; the answer's body is read up to `limit`.
    pub(super) async fn post(
        &self,
        url: &Url,
        headers: Vec<(HeaderName, HeaderValue)>,
        limit: usize,
    ) -> Result<Answer, Failure> {
        let mut request = hyper::Request::new(Empty::new());
        *request.method_mut() = hyper::Method::POST;
        *request.uri_mut() = url.as_str().parse().map_err(Failure::Uri)?;
        let map = request.headers_mut();
        map.insert(CONTENT_TYPE, HeaderValue::from_static(super::client::JSON));
        for (name, value) in headers {
            map.append(name, value);
        }
        let call = async {
            let answer = self.client.request(request).await.map_err(Failure::Send)?;
            let (parts, mut body) = answer.into_parts();
            let mut kept = Vec::new();
            while kept.len() < limit {
                let Some(frame) = body.frame().await else {
                    break;
                };
                if let Ok(data) = frame.map_err(Failure::Body)?.into_data() {
                    let room = limit - kept.len();
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Ok((parts.status, parts.headers, kept))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(Failure::Timeout(self.timeout)))
    }
}

/// reqwest's TLS setup for its `rustls` feature: the platform's verifier,
/// with `AOM_CA_FILE`'s certificates as extra roots, over aws-lc-rs.
fn tls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig, ApiError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let extra: Vec<CertificateDer<'static>> = match ca_pem {
        Some(pem) => CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| ApiError::Tls(e.to_string()))?,
        None => Vec::new(),
    };
    let verifier = if extra.is_empty() {
        rustls_platform_verifier::Verifier::new(Arc::clone(&provider))
    } else {
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, Arc::clone(&provider))
    }
    .map_err(|e| ApiError::Tls(e.to_string()))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}
