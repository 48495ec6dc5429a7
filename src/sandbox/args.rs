//! The `aom-terminator sandbox` command line: [`SandboxArgs`], and the parsing of its
//! latencies and failure ratios.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use super::projects::{
    ProjectList, ProjectRegions, TokenProjects, TokenProjectsParser, parse_project_list,
    parse_project_regions,
};
use super::script::{execution_hash, unit_interval};

/// Lowest and highest status the sandbox can be scripted to answer.
pub(super) const MIN_STATUS: u16 = 200;
pub(super) const MAX_STATUS: u16 = 599;
/// Highest K in `flakyK-`.
pub(super) const MAX_FLAKY: u32 = 99;

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
    /// Serve https with this certificate chain (PEM, leaf first); needs `--tls-key`.
    #[arg(
        long,
        env = "SANDBOX_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`; needs `--tls-cert`.
    #[arg(
        long,
        env = "SANDBOX_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Throttle terminate calls as the API gateway does: a token bucket of R calls per
    /// second, with a burst of R/10 (at least 1); a call beyond it gets 429 `APIGW.0308`
    /// with `Retry-After`. Unset: no limit.
    #[arg(long, env = "SANDBOX_RATE_LIMIT", value_name = "R",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit: Option<u32>,
    /// Serve at most N terminate calls at once (each holds its place for its latency and
    /// answer); the others wait their turn. Unset: no limit.
    #[arg(long, env = "SANDBOX_CAPACITY", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: Option<u32>,
    /// With `--capacity`: at most Q calls wait; the next gets 503 `AOM.0503` with
    /// `Retry-After: 1`. Unset: the queue is unbounded.
    #[arg(long, env = "SANDBOX_QUEUE_LIMIT", value_name = "Q", requires = "capacity",
          value_parser = clap::value_parser!(u32))]
    pub queue_limit: Option<u32>,
    /// Projects each static token covers, `TOKEN=PID[,PID...][;TOKEN=...]`: a listed token
    /// is valid for its projects only (401 elsewhere); the expected token, unless listed,
    /// covers every project. Unset: a valid token covers every project.
    #[arg(long, env = "SANDBOX_TOKEN_PROJECTS", hide_env_values = true,
          value_name = "TOKEN=PID,...;...", value_parser = TokenProjectsParser)]
    pub token_projects: Option<TokenProjects>,
    /// Projects the fake IAM's user may get a token for, `PID[,PID...]`; a token request
    /// scoped to another project gets 401. Unset: any project.
    #[arg(long, env = "SANDBOX_IAM_USER_PROJECTS", value_name = "PID,...",
          value_parser = parse_project_list)]
    pub iam_user_projects: Option<ProjectList>,
    /// Region (IAM's project name) of each project, `PID=REGION,...`: what
    /// `GET /v3/projects/{project_id}` answers, and how a token scoped by name finds its
    /// project.
    #[arg(long, env = "SANDBOX_PROJECT_REGIONS", value_name = "PID=REGION,...",
          default_value = "", value_parser = parse_project_regions)]
    pub project_regions: ProjectRegions,
}

impl SandboxArgs {
    /// The certificate and key files when both are set (https); clap refuses one alone.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        self.tls_cert.as_deref().zip(self.tls_key.as_deref())
    }
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
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("rate_limit", &self.rate_limit)
            .field("capacity", &self.capacity)
            .field("queue_limit", &self.queue_limit)
            .field("token_projects", &self.token_projects)
            .field("iam_user_projects", &self.iam_user_projects)
            .field("project_regions", &self.project_regions)
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
            tls_cert: None,
            tls_key: None,
            rate_limit: None,
            capacity: None,
            queue_limit: None,
            token_projects: None,
            iam_user_projects: None,
            project_regions: ProjectRegions::default(),
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
pub(super) enum Outcome {
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
    pub(super) fn pick(
        &self,
        project_id: &str,
        workflow_id: &str,
        execution_id: &str,
    ) -> Option<Outcome> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sandbox: SandboxArgs,
    }

    /// The sandbox's arguments, parsed from the command line alone.
    fn parse(argv: &[&str]) -> Result<Cli, clap::Error> {
        crate::cli::parse_args_only::<Cli, _, _>(argv.iter().copied())
    }
    use std::collections::HashMap;

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
        let cli = parse(&[
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
        assert!(parse(&["x", "--fail-ratios", "500=2"]).is_err());
    }

    #[test]
    fn tls_files_are_both_or_neither() {
        assert_eq!(parse(&["x"]).unwrap().sandbox.tls_files(), None);
        let both = parse(&["x", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert_eq!(
            both.sandbox.tls_files(),
            Some((Path::new("c.pem"), Path::new("k.pem")))
        );
        for (alone, missing) in [("--tls-cert", "--tls-key"), ("--tls-key", "--tls-cert")] {
            let err = parse(&["x", alone, "f.pem"]).err().expect("refused");
            let line = crate::cli::one_line(&err);
            assert!(
                line.starts_with("error:") && line.contains(missing),
                "{line}"
            );
        }
    }

    #[test]
    fn load_and_project_options_parse_and_refuse_bad_values() {
        let cli = parse(&[
            "x",
            "--rate-limit",
            "100",
            "--capacity",
            "4",
            "--queue-limit",
            "0",
            "--token-projects",
            "tok-zz9=p1,p2;other=p3",
            "--iam-user-projects",
            "p1,p2",
            "--project-regions",
            "p1=cn-north-4,p2=ap-southeast-1",
        ])
        .unwrap()
        .sandbox;
        assert_eq!(
            (cli.rate_limit, cli.capacity, cli.queue_limit),
            (Some(100), Some(4), Some(0))
        );
        assert_eq!(
            cli.token_projects,
            Some(TokenProjects::new([
                ("tok-zz9", vec!["p1", "p2"]),
                ("other", vec!["p3"])
            ]))
        );
        assert!(cli.iam_user_projects.as_ref().unwrap().contains("p2"));
        assert_eq!(cli.project_regions.region("p1"), Some("cn-north-4"));
        let debug = format!("{cli:?}");
        assert!(!debug.contains("tok-zz9"), "{debug}");
        let defaults = parse(&["x"]).unwrap().sandbox;
        assert_eq!(
            (defaults.rate_limit, defaults.capacity, defaults.queue_limit),
            (None, None, None)
        );
        assert!(defaults.token_projects.is_none() && defaults.iam_user_projects.is_none());
        for bad in [
            &["x", "--rate-limit", "0"][..],
            &["x", "--rate-limit", "fast"],
            &["x", "--capacity", "0"],
            &["x", "--queue-limit", "3"],
            &["x", "--capacity", "1", "--queue-limit", "-1"],
            &["x", "--token-projects", "tok-zz9"],
            &["x", "--iam-user-projects", "p1,,p2"],
            &["x", "--project-regions", "p1"],
        ] {
            let err = parse(bad).err().expect("refused");
            let line = crate::cli::one_line(&err);
            assert!(line.starts_with("error:"), "{bad:?}: {line}");
            assert!(!line.contains('\n') && !line.contains("tok-zz9"), "{line}");
        }
    }

    // ----- bucketing -----

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
}
