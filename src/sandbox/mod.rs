//! A fast, in-process fake of the Huawei Cloud AOM "terminate workflow execution" API
//! (`POST /v1/{project_id}/cms/workflow/{workflow_id}/executions/{execution_id}/terminate`).
//!
//! Used by tests, benchmarks, and anyone trying the daemon without a cloud account.
//!
//! # What it answers
//!
//! The real API's bodies for 200, 400, 401, 404 and 500 (see
//! `shared/reference/aom-terminate-api.md`). For each terminate call, in this order:
//!
//! 0. Load limits (`limits.rs`): the gateway's rate limit (`--rate-limit`), checked on
//!    arrival, answers 429 `APIGW.0308` at once; then the backend's capacity
//!    (`--capacity`): a call waits its turn (FIFO) or, when `--queue-limit` calls already
//!    wait, answers 503 `AOM.0503`. Neither reaches the script below. A call that waited
//!    counts its latency from when its turn came.
//! 1. The base latency (`--latency`) is waited, counted from the call's arrival. Tokio's
//!    timer fires on the first millisecond tick after a deadline, about 1 ms late on
//!    average; the sandbox aims that much early (at most half the latency), so that the
//!    mean answer time is the latency asked for. `/_sandbox/stats` reports the answer
//!    times it achieved.
//! 2. Authentication: when an expected token is configured, `X-Auth-Token` must equal it,
//!    else 401. A token listed in `--token-projects`, or issued by the fake IAM for a
//!    project, is valid for its projects only (`projects.rs`, `identity.rs`).
//! 3. Validation as in the real API: `project_id` exactly 32 characters, `workflow_id` and
//!    `execution_id` 1..64 characters, `Content-Type` starting with `application/json`; a
//!    malformed scripted prefix (below) is also rejected. All answer 400 with
//!    `error_code` `AOM.SANDBOX.INVALID` and an `error_msg` saying what is wrong.
//! 4. Scripted answers chosen by the execution id's prefix (the prefix may also be the
//!    whole id, e.g. `e404`):
//!    * `eNNN-…` (NNN in 200..=599): always status NNN.
//!    * `flaky-…`: 500 on the first call for that (project, workflow, execution), 200 after;
//!      `flakyK-…` (K in 1..=99): 500 on the first K calls, 200 after.
//!    * `slow-MS-…`: wait MS more milliseconds, then 200.
//! 5. Otherwise the failure ratios (`--fail-ratios 500=0.02,404=0.01,flaky=0.02`) pick a
//!    bucket from a stable hash (FNV-1a) of (project, workflow, execution): the same
//!    execution always gets the same answer, across restarts and processes. Else 200.
//!
//! Statuses without a real body: other 4xx/5xx answer
//! `{"error_code":"AOM.SANDBOX.N","error_msg":"sandbox scripted N","http_code":N}`, 502 and
//! 504 an HTML gateway page, 429 and 503 also carry `Retry-After: 1`, 3xx carry
//! `Location: http://127.0.0.1:1/elsewhere` and an empty body, 204 an empty body and other
//! 2xx the success body.
//!
//! Flaky call counts are the calls for that execution that passed authentication and
//! validation; [`Sandbox::reset_stats`] forgets them too.
//!
//! # Control endpoints
//!
//! * `GET /_sandbox/stats`: [`SandboxStats`] as JSON.
//! * `POST /_sandbox/reset`: [`Sandbox::reset_stats`].
//! * `POST /_sandbox/token`: the raw body (surrounding whitespace trimmed) becomes the
//!   expected token; an empty body accepts any token.
//! * `POST /_sandbox/token-projects`: the body (as `--token-projects`) becomes the token
//!   coverage; an empty body lifts it.
//!
//! The fake IAM serves `POST /v3/auth/tokens` and `GET /v3/projects/{project_id}`.
//!
//! # HTTPS
//!
//! [`Sandbox::bind_tls`] (`--tls-cert`/`--tls-key`) serves the same routes over TLS
//! (rustls, aws-lc-rs); handshakes run concurrently, each within 10 s (`tls.rs`).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

mod args;
#[cfg(test)]
mod http_tests;
mod identity;
mod limits;
mod projects;
mod script;
mod server;
mod stats;
#[cfg(test)]
mod testkit;
mod tls;

use crate::settings::ConfigError;
use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use identity::{IamAccount, Identity, ProjectRules};
use limits::{Capacity, RateLimiter};
use server::{AppState, router};
use stats::{Stats, execution_key};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use args::{FailRatios, RatioError, SandboxArgs, parse_latency, parse_ratios};
pub use projects::{
    ProjectList, ProjectRegions, ProjectsError, TokenProjects, TokenProjectsParser,
    parse_project_list, parse_project_regions, parse_token_projects,
};
pub use server::timer_aim;
pub use stats::SandboxStats;

/// How long [`RunningSandbox::shutdown`] waits for open connections before aborting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

struct Inner {
    latency: Duration,
    ratios: FailRatios,
    identity: Identity,
    /// Non-zero: every terminate call answers this status (an outage).
    outage: std::sync::atomic::AtomicU16,
    /// The API gateway's throttling (`--rate-limit`).
    rate: RateLimiter,
    /// The backend's capacity (`--capacity`, `--queue-limit`).
    capacity: Capacity,
    stats: Stats,
}

/// The fake AOM service: configuration, expected token and counters, shared by every
/// clone (and by the servers [`Sandbox::bind`] starts).
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("latency", &self.inner.latency)
            .field("fail_ratios", &format_args!("{}", self.inner.ratios))
            .field("token_required", &self.token_required())
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Builds a sandbox from its options (`listen` is only used by [`run`]); does no I/O.
    pub fn new(args: &SandboxArgs) -> Sandbox {
        Sandbox {
            inner: Arc::new(Inner {
                latency: args.latency,
                ratios: args.fail_ratios.clone(),
                identity: Identity::new(
                    normalise_token(args.expected_token.as_deref()),
                    match (&args.iam_user, &args.iam_password, &args.iam_domain) {
                        (Some(user), Some(password), Some(domain)) => Some(IamAccount {
                            user: user.clone(),
                            password: password.clone(),
                            domain: domain.clone(),
                            token_lifetime: args.iam_token_lifetime,
                        }),
                        _ => None,
                    },
                    args.ak.clone().zip(args.sk.clone()),
                    ProjectRules {
                        token_projects: args.token_projects.clone().unwrap_or_default(),
                        iam_user_projects: args.iam_user_projects.clone(),
                        regions: args.project_regions.clone(),
                    },
                ),
                outage: std::sync::atomic::AtomicU16::new(0),
                rate: RateLimiter::new(args.rate_limit),
                capacity: Capacity::new(args.capacity, args.queue_limit),
                stats: Stats::new(),
            }),
        }
    }

    /// Binds `addr` (port 0 picks a free one) and serves on the current tokio runtime until
    /// [`RunningSandbox::shutdown`] or the drop of the returned handle.
    pub async fn bind(self, addr: SocketAddr) -> std::io::Result<RunningSandbox> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let listener = listener.tap_io(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::trace!(%err, "sandbox: cannot set TCP_NODELAY");
            }
        });
        Ok(self.serve(listener, local_addr, Scheme::Http))
    }

    /// As [`bind`](Self::bind), but serving https with this certificate chain (PEM, leaf
    /// first) and private key (PEM). Everything else is the same; [`RunningSandbox::base_url`]
    /// starts with `https://`. A certificate or key that cannot be used is an
    /// [`InvalidInput`](std::io::ErrorKind::InvalidInput) error saying which, before anything
    /// is bound.
    pub async fn bind_tls(
        self,
        addr: SocketAddr,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> std::io::Result<RunningSandbox> {
        let config = tls::server_config(cert_pem, key_pem)?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let listener = tls::TlsListener::new(listener, config);
        Ok(self.serve(listener, local_addr, Scheme::Https))
    }

    fn serve<L>(self, listener: L, local_addr: SocketAddr, scheme: Scheme) -> RunningSandbox
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let shutdown = CancellationToken::new();
        let app = router(AppState {
            sandbox: self.clone(),
            shutdown: shutdown.clone(),
        });
        let server =
            axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let task = tokio::spawn(async move { server.await });
        RunningSandbox {
            local_addr,
            scheme,
            sandbox: self,
            shutdown,
            task: Some(task),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SandboxStats {
        let stats = &self.inner.stats;
        let by_status: BTreeMap<u16, u64> = stats
            .by_status
            .iter()
            .zip(100u16..)
            .filter_map(|(counter, status)| {
                let n = counter.load(Ordering::Relaxed);
                (n > 0).then_some((status, n))
            })
            .collect();
        SandboxStats {
            calls: stats.calls.load(Ordering::Relaxed),
            answered: by_status.values().sum(),
            by_status,
            in_flight: stats.in_flight.load(Ordering::Relaxed),
            max_in_flight: stats.max_in_flight.load(Ordering::Relaxed),
            iam_calls: self.inner.identity.iam_calls.load(Ordering::Relaxed),
            iam_project_lookups: self
                .inner
                .identity
                .iam_project_lookups
                .load(Ordering::Relaxed),
            answer_micros: stats.answer_micros.load(Ordering::Relaxed),
            queued: stats.queued.load(Ordering::Relaxed),
            max_queued: stats.max_queued.load(Ordering::Relaxed),
            iam_calls_by_project: self
                .inner
                .identity
                .iam_calls_by_project
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            calls_by_host: stats
                .by_host
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            calls_by_version: stats.by_version(),
        }
    }

    /// Terminate calls received for this execution (whatever their answer) since start or
    /// the last reset. Ids are compared decoded (as after percent-decoding).
    pub fn calls_for(&self, project_id: &str, workflow_id: &str, execution_id: &str) -> u64 {
        let key = execution_key(project_id, workflow_id, execution_id);
        let map = self
            .inner
            .stats
            .per_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(key.as_slice()).map_or(0, |c| c.calls)
    }

    /// Changes the token expected in `X-Auth-Token`; `None` (or an empty token) accepts any.
    pub fn set_expected_token(&self, token: Option<String>) {
        let token = normalise_token(token.as_deref());
        *self
            .inner
            .identity
            .expected_token
            .write()
            .unwrap_or_else(PoisonError::into_inner) = token;
    }

    /// Which projects each static token covers (as `--token-projects`); `None` (or an
    /// empty list): a valid token covers every project. Takes effect on the next call.
    pub fn set_token_projects(&self, token_projects: Option<TokenProjects>) {
        *self
            .inner
            .identity
            .token_projects
            .write()
            .unwrap_or_else(PoisonError::into_inner) = token_projects.unwrap_or_default();
    }

    /// A new rate limit in calls per second (as `--rate-limit`, with a full bucket);
    /// `None` (or 0) throttles nothing.
    pub fn set_rate_limit(&self, calls_per_second: Option<u32>) {
        self.inner.rate.set(calls_per_second);
    }

    /// An outage: every terminate call answers `status` until `None`.
    pub fn set_outage(&self, status: Option<u16>) {
        self.inner
            .outage
            .store(status.unwrap_or(0), Ordering::Relaxed);
    }

    /// Make the fake IAM answer 503 (`false`) or issue tokens again (`true`).
    pub fn set_iam_available(&self, available: bool) {
        self.inner.identity.set_iam_available(available);
    }

    /// Forget every IAM token issued so far: calls with them get 401.
    pub fn revoke_iam_tokens(&self) {
        self.inner.identity.revoke_iam_tokens();
    }

    /// Zeroes the counters (the IAM ones too) and forgets per-execution call counts (so
    /// `flaky` executions fail again). `in_flight` and `queued` are live and kept;
    /// `max_in_flight` and `max_queued` restart from them.
    pub fn reset_stats(&self) {
        let stats = &self.inner.stats;
        stats
            .per_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        stats
            .by_host
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        stats.calls.store(0, Ordering::Relaxed);
        stats.answer_micros.store(0, Ordering::Relaxed);
        for counter in stats.by_status.iter().chain(&stats.by_version) {
            counter.store(0, Ordering::Relaxed);
        }
        stats
            .max_in_flight
            .store(stats.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        stats
            .max_queued
            .store(stats.queued.load(Ordering::Relaxed), Ordering::Relaxed);
        self.inner.identity.reset_counts();
    }

    fn token_required(&self) -> bool {
        self.inner.identity.required()
    }
}

fn normalise_token(token: Option<&str>) -> Option<Box<str>> {
    token.filter(|t| !t.is_empty()).map(Box::from)
}

/// Plain http, or https ([`Sandbox::bind_tls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A sandbox serving on a socket; dropping it stops the server (without waiting).
pub struct RunningSandbox {
    local_addr: SocketAddr,
    scheme: Scheme,
    sandbox: Sandbox,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl fmt::Debug for RunningSandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningSandbox")
            .field("local_addr", &self.local_addr)
            .field("scheme", &self.scheme)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl RunningSandbox {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ADDR:PORT`, or `https://ADDR:PORT` when serving TLS; no trailing slash.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme.as_str(), self.local_addr)
    }

    /// True when serving https ([`Sandbox::bind_tls`]).
    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::Https
    }

    /// The sandbox being served (its stats, token, …).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Stops accepting, answers calls still sleeping with 503, waits (up to 10 s) for open
    /// connections to finish, then returns. Errors are logged.
    pub async fn shutdown(mut self) {
        if let Err(err) = self.stop().await {
            tracing::warn!("sandbox server: {err:#}");
        }
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(joined) => server_result(joined),
            Err(_) => {
                task.abort();
                anyhow::bail!(
                    "connections still open {}s after shutdown; aborted",
                    SHUTDOWN_GRACE.as_secs()
                )
            }
        }
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn server_result(
    joined: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    joined
        .context("sandbox server task failed")?
        .context("sandbox server failed")
}

/// The `aom-terminator sandbox` subcommand: serves until `shutdown` resolves.
pub async fn run(
    args: SandboxArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sandbox = Sandbox::new(&args);
    let mut running = match args.tls_files() {
        Some((cert, key)) => {
            let (cert_pem, key_pem) = read_tls_files(cert, key)?;
            sandbox
                .bind_tls(args.listen, &cert_pem, &key_pem)
                .await
                .map_err(|err| tls_setting_error(err, cert, key, args.listen))?
        }
        None => sandbox
            .bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?,
    };
    tracing::info!(
        addr = %running.local_addr(),
        url = %running.base_url(),
        latency = ?args.latency,
        fail_ratios = %args.fail_ratios,
        rate_limit = ?args.rate_limit,
        capacity = ?args.capacity,
        queue_limit = ?args.queue_limit,
        token_required = running.sandbox().token_required(),
        "sandbox listening"
    );
    let early_exit = match running.task.as_mut() {
        Some(task) => tokio::select! {
            () = shutdown => None,
            joined = task => Some(joined),
        },
        None => None,
    };
    let result = match early_exit {
        Some(joined) => {
            running.task = None;
            server_result(joined).and_then(|()| anyhow::bail!("sandbox server stopped by itself"))
        }
        None => running.stop().await,
    };
    let stats = running.sandbox().stats();
    tracing::info!(
        calls = stats.calls,
        max_in_flight = stats.max_in_flight,
        max_queued = stats.max_queued,
        by_status = ?stats.by_status,
        "sandbox stopped"
    );
    result
}

/// The certificate and key files, read; an unreadable one is a bad setting (exit 2).
fn read_tls_files(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), ConfigError> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|err| ConfigError(format!("{flag}: cannot read {}: {err}", path.display())))
    };
    Ok((read("--tls-cert", cert)?, read("--tls-key", key)?))
}

/// A certificate or key that rustls refuses is a bad setting (exit 2), said with the files
/// it came from; failing to bind is not.
fn tls_setting_error(
    err: std::io::Error,
    cert: &Path,
    key: &Path,
    listen: SocketAddr,
) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::InvalidInput {
        ConfigError(format!(
            "{err} (--tls-cert {}, --tls-key {})",
            cert.display(),
            key.display()
        ))
        .into()
    } else {
        anyhow::Error::new(err).context(format!("cannot listen on {listen}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_serves_until_shutdown() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let args = SandboxArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..SandboxArgs::default()
        };
        let server = tokio::spawn(run(args, async {
            let _ = rx.await;
        }));
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn run_reports_bind_errors() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let args = SandboxArgs {
            listen: taken.local_addr().unwrap(),
            ..SandboxArgs::default()
        };
        let err = run(args, std::future::pending()).await.unwrap_err();
        assert!(format!("{err:#}").contains("cannot listen on"), "{err:#}");
    }

    #[tokio::test]
    async fn run_refuses_unreadable_tls_files_as_a_bad_setting() {
        let args = SandboxArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_cert: Some("/nonexistent/aomt/cert.pem".into()),
            tls_key: Some("/nonexistent/aomt/key.pem".into()),
            ..SandboxArgs::default()
        };
        let err = run(args, std::future::pending()).await.unwrap_err();
        assert!(err.is::<ConfigError>(), "{err:#}");
        assert!(
            err.to_string()
                .starts_with("--tls-cert: cannot read /nonexistent/aomt/cert.pem"),
            "{err}"
        );
    }
}
