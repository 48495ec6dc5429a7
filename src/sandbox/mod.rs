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
//! 1. The base latency (`--latency`) is waited, counted from the call's arrival. Tokio's
//!    timer fires on the first millisecond tick after a deadline, about 1 ms late on
//!    average; the sandbox aims that much early (at most half the latency), so that the
//!    mean answer time is the latency asked for. `/_sandbox/stats` reports the answer
//!    times it achieved.
//! 2. Authentication: when an expected token is configured, `X-Auth-Token` must equal it,
//!    else 401.
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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

mod identity;

use anyhow::Context as _;
use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use identity::{IamAccount, Identity};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// Lowest and highest status the sandbox can be scripted to answer.
const MIN_STATUS: u16 = 200;
const MAX_STATUS: u16 = 599;
/// Highest K in `flakyK-`.
const MAX_FLAKY: u32 = 99;
/// Request bodies are read (and dropped) up to this size so connections stay reusable.
const MAX_DRAINED_BODY: usize = 64 * 1024;
/// How long [`RunningSandbox::shutdown`] waits for open connections before aborting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// Options of the `aom-terminator sandbox` subcommand.
#[derive(Clone, clap::Args)]
pub struct SandboxArgs {
    /// Address to listen on.
    #[arg(long, env = "SANDBOX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Base latency of every terminate call (e.g. `50ms`, `0`).
    #[arg(long, env = "SANDBOX_LATENCY", default_value = "0ms", value_parser = parse_latency)]
    pub latency: Duration,
    /// Token the sandbox expects in X-Auth-Token; unset accepts any.
    #[arg(long, env = "SANDBOX_EXPECTED_TOKEN", hide_env_values = true)]
    pub expected_token: Option<String>,
    /// Failure ratios for executions without a scripted prefix, e.g. `500=0.02,404=0.01,flaky=0.02`.
    #[arg(long, env = "SANDBOX_FAIL_RATIOS", value_parser = parse_ratios, default_value = "")]
    pub fail_ratios: FailRatios,
    /// User of the fake IAM (`POST /v3/auth/tokens`); with the password and domain,
    /// tokens it issues are accepted until they expire.
    #[arg(long, env = "SANDBOX_IAM_USER")]
    pub iam_user: Option<String>,
    /// Password of the fake IAM's user.
    #[arg(long, env = "SANDBOX_IAM_PASSWORD", hide_env_values = true)]
    pub iam_password: Option<String>,
    /// Domain (account) of the fake IAM's user.
    #[arg(long, env = "SANDBOX_IAM_DOMAIN")]
    pub iam_domain: Option<String>,
    /// Lifetime of the tokens the fake IAM issues.
    #[arg(long, env = "SANDBOX_IAM_TOKEN_LIFETIME", default_value = "24h", value_parser = parse_latency)]
    pub iam_token_lifetime: Duration,
    /// Access key whose AK/SK signatures are accepted.
    #[arg(long, env = "SANDBOX_AK")]
    pub ak: Option<String>,
    /// Secret key that goes with `--ak`.
    #[arg(long, env = "SANDBOX_SK", hide_env_values = true)]
    pub sk: Option<String>,
}

/// Hand-written so that the token never ends up in a log line.
impl fmt::Debug for SandboxArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxArgs")
            .field("listen", &self.listen)
            .field("latency", &self.latency)
            .field(
                "expected_token",
                &self.expected_token.as_ref().map(|_| "<redacted>"),
            )
            .field("fail_ratios", &format_args!("{}", self.fail_ratios))
            .field("iam_user", &self.iam_user)
            .field("iam_domain", &self.iam_domain)
            .field("iam_token_lifetime", &self.iam_token_lifetime)
            .field("ak", &self.ak)
            .finish_non_exhaustive()
    }
}

impl Default for SandboxArgs {
    fn default() -> Self {
        SandboxArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            latency: Duration::ZERO,
            expected_token: None,
            fail_ratios: FailRatios::default(),
            iam_user: None,
            iam_password: None,
            iam_domain: None,
            iam_token_lifetime: Duration::from_secs(24 * 3600),
            ak: None,
            sk: None,
        }
    }
}

/// Parses a latency such as `50ms`, `1s`, `0ms` or `0`.
pub fn parse_latency(s: &str) -> Result<Duration, humantime::DurationError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
}

/// An error in a `--fail-ratios` list.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RatioError {
    /// An item lacks its `=`.
    #[error("`{item}` is not of the form KIND=RATIO (e.g. `500=0.02`)")]
    MissingEquals {
        /// The item as written.
        item: String,
    },
    /// The part before `=` is neither a status nor `flaky`/`flakyK`.
    #[error(
        "unknown failure kind `{kind}`: expected an HTTP status {MIN_STATUS}..={MAX_STATUS}, `flaky` or `flakyK` (K in 1..={MAX_FLAKY})"
    )]
    BadKind {
        /// The kind as written.
        kind: String,
    },
    /// The part after `=` is not a number in 0..=1.
    #[error("ratio `{ratio}` of `{kind}` is not a number between 0 and 1")]
    BadRatio {
        /// The kind as written.
        kind: String,
        /// The ratio as written.
        ratio: String,
    },
    /// The same kind appears twice (`flaky` and `flaky1` are the same).
    #[error("failure kind `{kind}` is listed twice")]
    Duplicate {
        /// The second spelling of the kind.
        kind: String,
    },
    /// The ratios add up to more than 1.
    #[error("the failure ratios add up to {sum}, more than 1")]
    SumTooLarge {
        /// Their sum.
        sum: f64,
    },
}

/// What a failure-ratio bucket (or a scripted prefix) answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    /// Always this status.
    Status(u16),
    /// 500 for the first K accepted calls, then 200.
    Flaky(u32),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Outcome::Status(status) => write!(f, "{status}"),
            Outcome::Flaky(1) => f.write_str("flaky"),
            Outcome::Flaky(k) => write!(f, "flaky{k}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct RatioBucket {
    outcome: Outcome,
    ratio: f64,
    /// Sum of this bucket's ratio and all the ratios before it.
    upper: f64,
}

/// Failure ratios for executions without a scripted prefix, e.g.
/// `500=0.02,404=0.01,flaky=0.02,400=0.01` (kinds: a status 200..=599, `flaky`, `flakyK`).
///
/// The buckets are laid out on [0, 1) in the order given; an execution's stable hash picks
/// a point there. The empty string means "no failures".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FailRatios {
    buckets: Vec<RatioBucket>,
}

impl FailRatios {
    /// True when no failure is configured.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The share of executions that get a failure bucket (0..=1).
    pub fn total(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.upper)
    }

    /// The bucket an execution falls in, if any; depends only on the ids and the ratios.
    fn pick(&self, project_id: &str, workflow_id: &str, execution_id: &str) -> Option<Outcome> {
        if self.buckets.is_empty() {
            return None;
        }
        let point = unit_interval(execution_hash(project_id, workflow_id, execution_id));
        self.buckets
            .iter()
            .find(|b| point < b.upper)
            .map(|b| b.outcome)
    }
}

impl fmt::Display for FailRatios {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.buckets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={}", b.outcome, b.ratio)?;
        }
        Ok(())
    }
}

impl FromStr for FailRatios {
    type Err = RatioError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_ratios(s)
    }
}

/// Parses a failure-ratio list such as `500=0.02,404=0.01,flaky=0.02` (empty: none).
pub fn parse_ratios(s: &str) -> Result<FailRatios, RatioError> {
    let mut buckets: Vec<RatioBucket> = Vec::new();
    let mut sum = 0.0_f64;
    for item in s.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let Some((kind, ratio)) = item.split_once('=') else {
            return Err(RatioError::MissingEquals { item: item.into() });
        };
        let (kind, ratio) = (kind.trim(), ratio.trim());
        let outcome =
            parse_outcome(kind).ok_or_else(|| RatioError::BadKind { kind: kind.into() })?;
        let value = ratio
            .parse::<f64>()
            .ok()
            .filter(|v| (0.0..=1.0).contains(v))
            .ok_or_else(|| RatioError::BadRatio {
                kind: kind.into(),
                ratio: ratio.into(),
            })?;
        if buckets.iter().any(|b| b.outcome == outcome) {
            return Err(RatioError::Duplicate { kind: kind.into() });
        }
        sum += value;
        buckets.push(RatioBucket {
            outcome,
            ratio: value,
            upper: sum,
        });
    }
    // Tolerate float rounding such as 0.1+0.2+0.7.
    if sum > 1.0 + 1e-9 {
        return Err(RatioError::SumTooLarge { sum });
    }
    Ok(FailRatios { buckets })
}

/// `500` → Status(500); `flaky` → Flaky(1); `flaky3` → Flaky(3).
fn parse_outcome(kind: &str) -> Option<Outcome> {
    if let Some(k) = kind.strip_prefix("flaky") {
        if k.is_empty() {
            return Some(Outcome::Flaky(1));
        }
        return all_digits(k)
            .then(|| k.parse::<u32>().ok())
            .flatten()
            .filter(|k| (1..=MAX_FLAKY).contains(k))
            .map(Outcome::Flaky);
    }
    all_digits(kind)
        .then(|| kind.parse::<u16>().ok())
        .flatten()
        .filter(|s| (MIN_STATUS..=MAX_STATUS).contains(s))
        .map(Outcome::Status)
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

// ---------------------------------------------------------------------------------------
// Stable hashing
// ---------------------------------------------------------------------------------------

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// MurmurHash3's 64-bit finaliser: spreads FNV's low-bit differences over all bits.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Stable hash of an execution: FNV-1a over each id preceded by its length, then `fmix64`.
/// Never change it: tests and benchmarks rely on executions keeping their buckets.
fn execution_hash(project_id: &str, workflow_id: &str, execution_id: &str) -> u64 {
    let mut h = FNV_OFFSET;
    for part in [project_id, workflow_id, execution_id] {
        h = fnv1a(h, &(part.len() as u64).to_le_bytes());
        h = fnv1a(h, part.as_bytes());
    }
    fmix64(h)
}

/// Maps a hash to [0, 1) using its top 53 bits.
fn unit_interval(hash: u64) -> f64 {
    (hash >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

// ---------------------------------------------------------------------------------------
// Scripted prefixes
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// No scripted prefix: the failure ratios decide.
    None,
    Answer(Outcome),
    /// Wait this much more, then 200.
    Slow(Duration),
}

/// The digits at the start of `s`, when they are followed by `-` or nothing.
fn leading_number(s: &str) -> Option<&str> {
    let end = s.bytes().take_while(u8::is_ascii_digit).count();
    let (digits, rest) = s.split_at(end);
    (end > 0 && (rest.is_empty() || rest.starts_with('-'))).then_some(digits)
}

/// Reads the execution id's scripted prefix; `Err` for a prefix that is malformed.
fn parse_script(execution_id: &str) -> Result<Script, &'static str> {
    if let Some(rest) = execution_id.strip_prefix('e')
        && let Some(digits) = leading_number(rest).filter(|d| d.len() == 3)
    {
        return match digits.parse::<u16>() {
            Ok(s) if (MIN_STATUS..=MAX_STATUS).contains(&s) => {
                Ok(Script::Answer(Outcome::Status(s)))
            }
            _ => Err("the scripted status of an `eNNN-` execution_id must be 200..=599"),
        };
    }
    if let Some(rest) = execution_id.strip_prefix("flaky") {
        if rest.is_empty() || rest.starts_with('-') {
            return Ok(Script::Answer(Outcome::Flaky(1)));
        }
        if let Some(digits) = leading_number(rest) {
            return match digits.parse::<u32>() {
                Ok(k) if (1..=MAX_FLAKY).contains(&k) => Ok(Script::Answer(Outcome::Flaky(k))),
                _ => Err("the failure count of a `flakyK-` execution_id must be 1..=99"),
            };
        }
    }
    if let Some(rest) = execution_id.strip_prefix("slow-")
        && let Some(digits) = leading_number(rest)
    {
        return match digits.parse::<u64>() {
            Ok(ms) => Ok(Script::Slow(Duration::from_millis(ms))),
            Err(_) => Err("the delay of a `slow-MS-` execution_id is too large"),
        };
    }
    Ok(Script::None)
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

/// A snapshot of the sandbox's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStats {
    /// Terminate calls received (whatever their answer).
    pub calls: u64,
    /// Terminate calls answered, by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Terminate calls being handled now.
    pub in_flight: u64,
    /// Highest `in_flight` seen since start or the last reset.
    pub max_in_flight: u64,
    /// Token requests to the fake IAM.
    #[serde(default)]
    pub iam_calls: u64,
    /// Terminate calls answered (the sum of `by_status`), and the sum of their answer
    /// times (arrival of the request to its answer, in microseconds): their ratio is the
    /// latency the sandbox actually gave, which the benchmark prints beside the one it
    /// asked for.
    #[serde(default)]
    pub answered: u64,
    #[serde(default)]
    pub answer_micros: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct KeyCounts {
    /// All calls for the execution.
    calls: u64,
    /// Calls that passed authentication and validation (drives `flaky`).
    accepted: u64,
}

struct Stats {
    calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    answer_micros: AtomicU64,
    /// Index: status - 100.
    by_status: [AtomicU64; 500],
    /// Key: [`execution_key`].
    per_key: Mutex<HashMap<Box<[u8]>, KeyCounts>>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            answer_micros: AtomicU64::new(0),
            by_status: std::array::from_fn(|_| AtomicU64::new(0)),
            per_key: Mutex::new(HashMap::new()),
        }
    }

    fn count_status(&self, status: u16) {
        if let Some(counter) = usize::from(status)
            .checked_sub(100)
            .and_then(|i| self.by_status.get(i))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a call for an execution; returns its number of accepted calls so far.
    fn count_key(&self, key: Vec<u8>, accepted: bool) -> u64 {
        let mut map = self.per_key.lock().unwrap_or_else(PoisonError::into_inner);
        let counts = match map.get_mut(key.as_slice()) {
            Some(counts) => counts,
            None => map.entry(key.into_boxed_slice()).or_default(),
        };
        counts.calls += 1;
        if accepted {
            counts.accepted += 1;
        }
        counts.accepted
    }
}

/// Unambiguous map key of an execution: each of the first two ids preceded by its length.
fn execution_key(project_id: &str, workflow_id: &str, execution_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + project_id.len() + workflow_id.len() + execution_id.len());
    for part in [project_id, workflow_id] {
        key.extend_from_slice(&(part.len() as u32).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key.extend_from_slice(execution_id.as_bytes());
    key
}

/// Counts a terminate call as in flight for as long as it lives (also when the client
/// goes away and the handler is dropped).
struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn enter(stats: &'a Stats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// The sandbox
// ---------------------------------------------------------------------------------------

struct Inner {
    latency: Duration,
    ratios: FailRatios,
    identity: Identity,
    /// Non-zero: every terminate call answers this status (an outage).
    outage: std::sync::atomic::AtomicU16,
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
                ),
                outage: std::sync::atomic::AtomicU16::new(0),
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
        let shutdown = CancellationToken::new();
        let app = router(AppState {
            sandbox: self.clone(),
            shutdown: shutdown.clone(),
        });
        let server =
            axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let task = tokio::spawn(async move { server.await });
        Ok(RunningSandbox {
            local_addr,
            sandbox: self,
            shutdown,
            task: Some(task),
        })
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
            answer_micros: stats.answer_micros.load(Ordering::Relaxed),
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

    /// Zeroes the counters and forgets per-execution call counts (so `flaky` executions
    /// fail again). `in_flight` is live and kept; `max_in_flight` restarts from it.
    pub fn reset_stats(&self) {
        let stats = &self.inner.stats;
        stats
            .per_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        stats.calls.store(0, Ordering::Relaxed);
        stats.answer_micros.store(0, Ordering::Relaxed);
        for counter in &stats.by_status {
            counter.store(0, Ordering::Relaxed);
        }
        stats
            .max_in_flight
            .store(stats.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn token_required(&self) -> bool {
        self.inner.identity.required()
    }
}

fn normalise_token(token: Option<&str>) -> Option<Box<str>> {
    token.filter(|t| !t.is_empty()).map(Box::from)
}

/// A sandbox serving on a socket; dropping it stops the server (without waiting).
pub struct RunningSandbox {
    local_addr: SocketAddr,
    sandbox: Sandbox,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl fmt::Debug for RunningSandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningSandbox")
            .field("local_addr", &self.local_addr)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl RunningSandbox {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ADDR:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
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
    let mut running = sandbox
        .bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        addr = %running.local_addr(),
        latency = ?args.latency,
        fail_ratios = %args.fail_ratios,
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
        by_status = ?stats.by_status,
        "sandbox stopped"
    );
    result
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
struct AppState {
    sandbox: Sandbox,
    /// Cut short the sleeps of a server that is shutting down.
    shutdown: CancellationToken,
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

fn router(state: AppState) -> Router {
    Router::new()
        .route(TERMINATE_ROUTE, post(terminate))
        .route("/_sandbox/stats", get(get_stats))
        .route("/_sandbox/reset", post(reset))
        .route("/_sandbox/token", post(set_token))
        .route("/v3/auth/tokens", post(issue_token))
        .with_state(state)
}

/// What a terminate call answers.
enum Reply {
    Status(u16),
    Invalid(&'static str),
}

async fn terminate(
    State(app): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    request: Request,
) -> Response {
    let arrived = tokio::time::Instant::now();
    let stats = &app.sandbox.inner.stats;
    stats.calls.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(stats);
    let reply = decide(&app, arrived, path, request).await;
    let status = match reply {
        Reply::Status(status) => status,
        Reply::Invalid(_) => 400,
    };
    stats.count_status(status);
    let took = u64::try_from(arrived.elapsed().as_micros()).unwrap_or(u64::MAX);
    stats.answer_micros.fetch_add(took, Ordering::Relaxed);
    match reply {
        Reply::Status(status) => respond(status),
        Reply::Invalid(msg) => error_response(StatusCode::BAD_REQUEST, INVALID_ERROR_CODE, msg),
    }
}

async fn decide(
    app: &AppState,
    arrived: tokio::time::Instant,
    path: Result<Path<(String, String, String)>, PathRejection>,
    request: Request,
) -> Reply {
    let (parts, body) = request.into_parts();
    // Read the (normally empty) body: AK/SK signatures cover it, and the
    // connection stays reusable.
    let body = axum::body::to_bytes(body, MAX_DRAINED_BODY)
        .await
        .unwrap_or_default();
    if !app.wait_latency(arrived, app.sandbox.inner.latency).await {
        return Reply::Status(503);
    }
    let authenticated = app.sandbox.inner.identity.admits(&parts, &body);
    let Ok(Path((project_id, workflow_id, execution_id))) = path else {
        return if authenticated {
            Reply::Invalid("the path parameters are not valid percent-encoded UTF-8")
        } else {
            Reply::Status(401)
        };
    };
    let script = validate(&parts.headers, &project_id, &workflow_id, &execution_id);
    let accepted = app.sandbox.inner.stats.count_key(
        execution_key(&project_id, &workflow_id, &execution_id),
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
                .pick(&project_id, &workflow_id, &execution_id)
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

fn json_response(code: StatusCode, body: &'static str) -> Response {
    (
        code,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    const PROJECT: &str = "0123456789abcdef0123456789abcdef";

    // ----- ratios -----

    #[test]
    fn parses_ratios() {
        let r = parse_ratios("500=0.02,404=0.01,flaky=0.02,400=0.01").unwrap();
        assert_eq!(r.to_string(), "500=0.02,404=0.01,flaky=0.02,400=0.01");
        assert!((r.total() - 0.06).abs() < 1e-12);
        let r = parse_ratios(" 503 = 0.5 , flaky3=0.25,, ").unwrap();
        assert_eq!(r.to_string(), "503=0.5,flaky3=0.25");
        assert!(parse_ratios("").unwrap().is_empty());
        assert_eq!("".parse::<FailRatios>().unwrap(), FailRatios::default());
        // Rounding of a sum of exactly 1 is tolerated.
        parse_ratios("500=0.1,404=0.2,400=0.7").unwrap();
    }

    #[test]
    fn rejects_bad_ratios() {
        use RatioError::*;
        let err = |s: &str| parse_ratios(s).unwrap_err();
        assert!(matches!(err("500"), MissingEquals { .. }));
        assert!(matches!(err("abc=0.1"), BadKind { .. }));
        assert!(matches!(err("99=0.1"), BadKind { .. }));
        assert!(matches!(err("600=0.1"), BadKind { .. }));
        assert!(matches!(err("flaky0=0.1"), BadKind { .. }));
        assert!(matches!(err("flaky100=0.1"), BadKind { .. }));
        assert!(matches!(err("500=x"), BadRatio { .. }));
        assert!(matches!(err("500=-0.1"), BadRatio { .. }));
        assert!(matches!(err("500=1.5"), BadRatio { .. }));
        assert!(matches!(err("500=NaN"), BadRatio { .. }));
        assert!(matches!(err("500=0.1,500=0.2"), Duplicate { .. }));
        assert!(matches!(err("flaky=0.1,flaky1=0.2"), Duplicate { .. }));
        assert!(matches!(err("500=0.6,404=0.5"), SumTooLarge { .. }));
        assert!(err("500=0.6,404=0.5").to_string().contains("more than 1"));
    }

    #[test]
    fn parses_latency() {
        assert_eq!(parse_latency("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_latency("0ms").unwrap(), Duration::ZERO);
        assert_eq!(parse_latency("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_latency("1s").unwrap(), Duration::from_secs(1));
        assert!(parse_latency("fast").is_err());
    }

    #[test]
    fn args_parse_and_debug_hides_token() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            sandbox: SandboxArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:0",
            "--latency",
            "5ms",
            "--expected-token",
            "hunter2",
            "--fail-ratios",
            "500=0.5",
        ])
        .unwrap();
        assert_eq!(cli.sandbox.latency, Duration::from_millis(5));
        assert_eq!(cli.sandbox.fail_ratios.to_string(), "500=0.5");
        let debug = format!("{:?}", cli.sandbox);
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(Cli::try_parse_from(["x", "--fail-ratios", "500=2"]).is_err());
    }

    // ----- hashing and bucketing -----

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn execution_hash_is_pinned() {
        // Pinned so that a change of the algorithm (which would move executions between
        // buckets across versions) is noticed.
        let h = execution_hash(PROJECT, "wf", "exec-1");
        assert_eq!(h, PINNED_HASH, "{h:#x}");
        // Ids are length-delimited: moving a character between ids changes the hash.
        assert_ne!(
            execution_hash("ab", "c", "d"),
            execution_hash("a", "bc", "d")
        );
        assert_ne!(execution_key("ab", "c", "d"), execution_key("a", "bc", "d"));
        assert_ne!(execution_key("a", "b", "cd"), execution_key("a", "bc", "d"));
    }

    const PINNED_HASH: u64 = 0x9f35_0f41_4976_9705;

    #[test]
    fn bucketing_is_deterministic_and_proportional() {
        let ratios = parse_ratios("500=0.1,404=0.05,flaky=0.2").unwrap();
        let n = 100_000;
        let mut counts: HashMap<Option<Outcome>, u32> = HashMap::new();
        for i in 0..n {
            let exec = format!("exec-{i}");
            let first = ratios.pick(PROJECT, "wf", &exec);
            assert_eq!(first, ratios.pick(PROJECT, "wf", &exec));
            assert_eq!(first, ratios.clone().pick(PROJECT, "wf", &exec));
            *counts.entry(first).or_default() += 1;
        }
        let share = |o: Option<Outcome>| f64::from(counts.get(&o).copied().unwrap_or(0)) / n as f64;
        assert!(
            (share(Some(Outcome::Status(500))) - 0.1).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share(Some(Outcome::Status(404))) - 0.05).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share(Some(Outcome::Flaky(1))) - 0.2).abs() < 0.01,
            "{counts:?}"
        );
        assert!((share(None) - 0.65).abs() < 0.01, "{counts:?}");
        assert_eq!(parse_ratios("").unwrap().pick(PROJECT, "wf", "x"), None);
        let all = parse_ratios("404=1").unwrap();
        assert!(
            (0..1000).all(|i| all.pick(PROJECT, "w", &i.to_string()) == Some(Outcome::Status(404)))
        );
    }

    #[test]
    fn parses_scripts() {
        use Outcome::*;
        assert_eq!(parse_script("e404-x"), Ok(Script::Answer(Status(404))));
        assert_eq!(parse_script("e302"), Ok(Script::Answer(Status(302))));
        assert!(parse_script("e099-x").is_err());
        assert!(parse_script("e600-x").is_err());
        assert_eq!(parse_script("e4044-x"), Ok(Script::None));
        assert_eq!(parse_script("e40-x"), Ok(Script::None));
        assert_eq!(parse_script("exec-1"), Ok(Script::None));
        assert_eq!(parse_script("flaky-x"), Ok(Script::Answer(Flaky(1))));
        assert_eq!(parse_script("flaky3-x"), Ok(Script::Answer(Flaky(3))));
        assert_eq!(parse_script("flaky99"), Ok(Script::Answer(Flaky(99))));
        assert!(parse_script("flaky0-x").is_err());
        assert!(parse_script("flaky100-x").is_err());
        assert_eq!(parse_script("flakyness"), Ok(Script::None));
        assert_eq!(
            parse_script("slow-3000-x"),
            Ok(Script::Slow(Duration::from_secs(3)))
        );
        assert_eq!(parse_script("slow-x"), Ok(Script::None));
        assert!(parse_script("slow-99999999999999999999999-x").is_err());
        assert_eq!(parse_script("é404-x"), Ok(Script::None));
    }

    // ----- end to end over a raw socket -----

    struct RawResponse {
        status: u16,
        head: String,
        body: String,
    }

    impl RawResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().skip(1).find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }
    }

    async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            stream.writable().await?;
            match stream.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn read_to_end(stream: &TcpStream) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut chunk) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One HTTP/1.1 request on a fresh connection (`Connection: close`).
    async fn raw(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> RawResponse {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        let exchange = async {
            let stream = TcpStream::connect(addr).await?;
            write_all(&stream, req.as_bytes()).await?;
            read_to_end(&stream).await
        };
        let bytes = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("request timed out")
            .expect("request failed");
        let text = String::from_utf8(bytes).expect("response is not UTF-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("no end of head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("no status");
        RawResponse {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }

    fn terminate_path(project: &str, workflow: &str, execution: &str) -> String {
        format!("/v1/{project}/cms/workflow/{workflow}/executions/{execution}/terminate")
    }

    async fn call(addr: SocketAddr, token: &str, execution: &str) -> RawResponse {
        raw(
            addr,
            "POST",
            &terminate_path(PROJECT, "wf-1", execution),
            &[
                ("Content-Type", "application/json"),
                ("X-Auth-Token", token),
            ],
            "",
        )
        .await
    }

    async fn start(args: SandboxArgs) -> RunningSandbox {
        let sandbox = Sandbox::new(&args);
        sandbox
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind")
    }

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
        let t = std::time::Instant::now();
        running.shutdown().await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(slow.await.unwrap().status, 503);
    }

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
}
