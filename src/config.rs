//! Command line and environment, validated before anything starts.
//!
//! Every setting is a flag with an environment fallback; an empty
//! environment variable counts as unset. Values that carry secrets (the API
//! token, and the broker and database URLs, which may hold passwords) are
//! read as [`SecretString`] and checked here, so that no parse error, log
//! line or `Debug` output can echo them.

use crate::auth::{AkSkSettings, AuthSettings, IamSettings, ProjectScope};
use crate::sandbox::SandboxArgs;
use clap::{Args, Parser, Subcommand};
use lapin::uri::AMQPUri;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "aom-terminator", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `text` (human) or `json` (for log shippers).
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume termination requests and audit every outcome.
    Run(Box<RunArgs>),
    /// Apply the audit schema migrations and exit.
    Migrate(DatabaseArgs),
    /// Serve a fake AOM terminate API for trials, tests and benchmarks.
    Sandbox(Box<SandboxArgs>),
    /// Inspect the dead-letter queue, and replay requests from it.
    DeadLetters(Box<crate::deadletters::DeadLettersArgs>),
    /// Publish termination requests from a CSV or JSON Lines file.
    Enqueue(Box<crate::enqueue::EnqueueArgs>),
    /// What happened, from the audit, and what is still pending.
    Report(Box<crate::report::ReportArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Postgres URL of the audit database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = secret
    )]
    pub database_url: SecretString,
}

impl DatabaseArgs {
    pub fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let url = self.database_url.expose_secret();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError(
                "DATABASE_URL must be a postgres:// or postgresql:// URL".to_owned(),
            ));
        }
        PgConnectOptions::from_str(url)
            .map_err(|e| ConfigError(format!("DATABASE_URL is not a valid postgres URL: {e}")))
    }
}

/// The broker and the queues, shared by the daemon and the operator tools.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// AMQP URL of the broker (add `?heartbeat=N` to change the 10 s heartbeat).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = secret
    )]
    pub amqp_url: SecretString,
    /// Queue the termination requests arrive on.
    #[arg(
        long,
        env = "TERMINATE_QUEUE",
        default_value = "aom.terminate.requests"
    )]
    pub terminate_queue: String,
    /// Queue for requests whose retries ran out and for rejected messages.
    #[arg(long, env = "DEAD_LETTER_QUEUE", default_value = "aom.terminate.dead")]
    pub dead_letter_queue: String,
    /// Deliveries of one message before the broker dead-letters it (x-delivery-limit).
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = 20)]
    pub delivery_limit: u32,
}

impl BrokerArgs {
    pub fn settings(&self) -> Result<AmqpSettings, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        let mut uri = AMQPUri::from_str(self.amqp_url.expose_secret()).map_err(|_| {
            // The parser's message repeats the URL, password included.
            ConfigError("AMQP_URL is not a valid amqp:// or amqps:// URL".to_owned())
        })?;
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
        for (name, value) in [
            ("TERMINATE_QUEUE", &self.terminate_queue),
            ("DEAD_LETTER_QUEUE", &self.dead_letter_queue),
        ] {
            if value.is_empty() || value.len() > 255 {
                return err(format!("{name} must be 1..255 bytes"));
            }
        }
        if self.terminate_queue == self.dead_letter_queue {
            return err("TERMINATE_QUEUE and DEAD_LETTER_QUEUE must differ".to_owned());
        }
        if self.delivery_limit == 0 {
            return err("DELIVERY_LIMIT must be at least 1".to_owned());
        }
        Ok(AmqpSettings {
            uri,
            queue: self.terminate_queue.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            delivery_limit: self.delivery_limit,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Base URL of the AOM API, e.g. https://aom.cn-north-4.myhuaweicloud.com
    #[arg(long, env = "AOM_ENDPOINT")]
    pub aom_endpoint: String,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Most API calls in flight at once, across all messages.
    #[arg(long, env = "CONCURRENCY", default_value_t = 64)]
    pub concurrency: u32,
    /// Most unacked messages held at once (default: CONCURRENCY).
    #[arg(long, env = "PREFETCH")]
    pub prefetch: Option<u16>,
    /// Most requests parsed and held at once, across messages (default:
    /// the larger of 10,000 and 16 × CONCURRENCY). Bounds memory when the
    /// queue holds big batches.
    #[arg(long, env = "PREFETCH_REQUESTS")]
    pub prefetch_requests: Option<u32>,
    /// Most API calls started per second, across the daemon (default: no limit).
    #[arg(long, env = "RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// Attempts per request, counting the first (401 answers do not count).
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// First retry delay cap; a number is milliseconds (`200`, `1s`).
    #[arg(long, env = "BACKOFF_INITIAL_MS", default_value = "200", value_parser = millis)]
    pub backoff_initial_ms: Duration,
    /// Largest retry delay cap; a number is milliseconds.
    #[arg(long, env = "BACKOFF_MAX_MS", default_value = "10000", value_parser = millis)]
    pub backoff_max_ms: Duration,
    /// Timeout of one API call; a number is milliseconds.
    #[arg(long, env = "HTTP_TIMEOUT_MS", default_value = "10000", value_parser = millis)]
    pub http_timeout_ms: Duration,
    /// Address of /metrics, /healthz and /readyz; `off` disables the listener.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// Time in-flight requests get to finish after SIGTERM; a number is seconds (`30`, `2m`).
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "30", value_parser = seconds)]
    pub shutdown_grace: Duration,
}

/// Authentication: exactly one of a token (or token file), the IAM
/// password settings, or an AK/SK pair.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// Token sent as X-Auth-Token.
    #[arg(long, env = "AOM_AUTH_TOKEN", hide_env_values = true, value_parser = secret)]
    pub aom_auth_token: Option<SecretString>,
    /// File holding the token; re-read when it changes (a mounted secret).
    #[arg(long, env = "AOM_AUTH_TOKEN_FILE")]
    pub aom_auth_token_file: Option<PathBuf>,
    /// IAM endpoint, e.g. https://iam.cn-north-4.myhuaweicloud.com
    #[arg(long, env = "IAM_ENDPOINT")]
    pub iam_endpoint: Option<String>,
    /// IAM user name.
    #[arg(long, env = "IAM_USER")]
    pub iam_user: Option<String>,
    /// IAM user password.
    #[arg(long, env = "IAM_PASSWORD", hide_env_values = true, value_parser = secret)]
    pub iam_password: Option<SecretString>,
    /// IAM domain (account) name.
    #[arg(long, env = "IAM_DOMAIN")]
    pub iam_domain: Option<String>,
    /// Project scope by name (e.g. cn-north-4).
    #[arg(long, env = "IAM_PROJECT_NAME")]
    pub iam_project_name: Option<String>,
    /// Project scope by id.
    #[arg(long, env = "IAM_PROJECT_ID")]
    pub iam_project_id: Option<String>,
    /// Renew the IAM token when less than this is left (`1h`, `600`).
    #[arg(long, env = "IAM_RENEW_BEFORE", default_value = "1h", value_parser = seconds)]
    pub iam_renew_before: Duration,
    /// Access key for AK/SK signing.
    #[arg(long, env = "CLOUD_SDK_AK", hide_env_values = true, value_parser = secret)]
    pub cloud_sdk_ak: Option<SecretString>,
    /// Secret key for AK/SK signing.
    #[arg(long, env = "CLOUD_SDK_SK", hide_env_values = true, value_parser = secret)]
    pub cloud_sdk_sk: Option<SecretString>,
    /// Security token of temporary AK/SK credentials (sent as X-Security-Token).
    #[arg(long, env = "CLOUD_SDK_SECURITY_TOKEN", hide_env_values = true, value_parser = secret)]
    pub cloud_sdk_security_token: Option<SecretString>,
    #[arg(long, env = "HUAWEICLOUD_SDK_AK", hide = true, value_parser = secret)]
    pub huaweicloud_sdk_ak: Option<SecretString>,
    #[arg(long, env = "HUAWEICLOUD_SDK_SK", hide = true, value_parser = secret)]
    pub huaweicloud_sdk_sk: Option<SecretString>,
    #[arg(long, env = "HUAWEICLOUD_SDK_SECURITY_TOKEN", hide = true, value_parser = secret)]
    pub huaweicloud_sdk_security_token: Option<SecretString>,
}

impl AuthArgs {
    pub fn validate(&self) -> Result<AuthSettings, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        let ak = self
            .cloud_sdk_ak
            .as_ref()
            .or(self.huaweicloud_sdk_ak.as_ref());
        let sk = self
            .cloud_sdk_sk
            .as_ref()
            .or(self.huaweicloud_sdk_sk.as_ref());
        let security_token = self
            .cloud_sdk_security_token
            .as_ref()
            .or(self.huaweicloud_sdk_security_token.as_ref());
        let iam_set = self.iam_endpoint.is_some()
            || self.iam_user.is_some()
            || self.iam_password.is_some()
            || self.iam_domain.is_some()
            || self.iam_project_name.is_some()
            || self.iam_project_id.is_some();
        let modes: Vec<&str> = [
            (self.aom_auth_token.is_some(), "AOM_AUTH_TOKEN"),
            (self.aom_auth_token_file.is_some(), "AOM_AUTH_TOKEN_FILE"),
            (iam_set, "IAM_*"),
            (
                ak.is_some() || sk.is_some() || security_token.is_some(),
                "CLOUD_SDK_AK/SK",
            ),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        match modes.as_slice() {
            [] => err(
                "no authentication configured: set AOM_AUTH_TOKEN, AOM_AUTH_TOKEN_FILE, \
                 the IAM_* settings, or CLOUD_SDK_AK and CLOUD_SDK_SK"
                    .to_owned(),
            ),
            [_] => self.settings(ak, sk, security_token),
            several => err(format!(
                "conflicting authentication settings: {} are all set; configure exactly one way",
                several.join(", ")
            )),
        }
    }

    fn settings(
        &self,
        ak: Option<&SecretString>,
        sk: Option<&SecretString>,
        security_token: Option<&SecretString>,
    ) -> Result<AuthSettings, ConfigError> {
        let err = |s: &str| Err(ConfigError(s.to_owned()));
        if let Some(token) = &self.aom_auth_token {
            let t = token.expose_secret();
            if t.is_empty() || t.len() > 40960 {
                return err("AOM_AUTH_TOKEN must be 1..40960 characters");
            }
            if reqwest::header::HeaderValue::from_str(t).is_err() {
                return err("AOM_AUTH_TOKEN contains characters not allowed in a header");
            }
            return Ok(AuthSettings::Token(token.clone()));
        }
        if let Some(path) = &self.aom_auth_token_file {
            // Read once now, so that a wrong path is a start-up error.
            crate::auth::TokenSource::file(path)
                .map_err(|e| ConfigError(format!("AOM_AUTH_TOKEN_FILE: {e}")))?;
            return Ok(AuthSettings::TokenFile(path.clone()));
        }
        if let (Some(ak), Some(sk)) = (ak, sk) {
            let access_key = ak.expose_secret().trim().to_owned();
            if access_key.is_empty() || sk.expose_secret().is_empty() {
                return err("CLOUD_SDK_AK and CLOUD_SDK_SK must not be empty");
            }
            return Ok(AuthSettings::AkSk(AkSkSettings {
                access_key,
                secret_key: sk.clone(),
                security_token: security_token.cloned(),
            }));
        }
        if ak.is_some() || sk.is_some() || security_token.is_some() {
            return err("AK/SK signing needs both CLOUD_SDK_AK and CLOUD_SDK_SK");
        }
        let required = |v: &Option<String>, name: &str| match v.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => Ok(s.to_owned()),
            _ => Err(ConfigError(format!("IAM authentication needs {name}"))),
        };
        let endpoint = required(&self.iam_endpoint, "IAM_ENDPOINT")?;
        let endpoint = match reqwest::Url::parse(&endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u,
            _ => return err("IAM_ENDPOINT must be an http:// or https:// URL"),
        };
        let password = match &self.iam_password {
            Some(p) if !p.expose_secret().is_empty() => p.clone(),
            _ => return err("IAM authentication needs IAM_PASSWORD"),
        };
        let project = match (&self.iam_project_name, &self.iam_project_id) {
            (Some(_), Some(_)) => {
                return err("set IAM_PROJECT_NAME or IAM_PROJECT_ID, not both");
            }
            (Some(name), None) => {
                ProjectScope::Name(required(&Some(name.clone()), "IAM_PROJECT_NAME")?)
            }
            (None, Some(id)) => ProjectScope::Id(required(&Some(id.clone()), "IAM_PROJECT_ID")?),
            (None, None) => {
                return err("IAM authentication needs IAM_PROJECT_NAME or IAM_PROJECT_ID");
            }
        };
        if self.iam_renew_before.is_zero() {
            return err("IAM_RENEW_BEFORE must be above 0");
        }
        Ok(AuthSettings::Iam(IamSettings {
            endpoint,
            user: required(&self.iam_user, "IAM_USER")?,
            password,
            domain: required(&self.iam_domain, "IAM_DOMAIN")?,
            project,
            renew_before: self.iam_renew_before,
        }))
    }
}

/// Everything the daemon needs, checked.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub amqp: AmqpSettings,
    pub database: DatabaseSettings,
    pub endpoint: reqwest::Url,
    pub auth: AuthSettings,
    pub concurrency: usize,
    pub prefetch: u16,
    pub prefetch_requests: usize,
    pub rate_limit: Option<std::num::NonZeroU32>,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub http_timeout: Duration,
    pub shutdown_grace: Duration,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Broker settings. `uri` holds the password; its `Debug` is redacted.
#[derive(Clone)]
pub struct AmqpSettings {
    pub uri: AMQPUri,
    pub queue: String,
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("host", &self.uri.authority.host)
            .field("port", &self.uri.authority.port)
            .field("vhost", &self.uri.vhost)
            .field("queue", &self.queue)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("delivery_limit", &self.delivery_limit)
            .finish_non_exhaustive()
    }
}

/// Audit database connection. `PgConnectOptions`'s own `Debug` shows the
/// password; this one does not.
#[derive(Clone)]
pub struct DatabaseSettings(pub PgConnectOptions);

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("host", &self.0.get_host())
            .field("port", &self.0.get_port())
            .field("database", &self.0.get_database())
            .finish_non_exhaustive()
    }
}

/// A setting that is present but wrong; the message names the setting and
/// never echoes a secret.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Heartbeat used when AMQP_URL does not set one: a dead connection is
/// noticed within a few seconds instead of the broker's default minute.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

impl RunArgs {
    pub fn validate(&self) -> Result<DaemonConfig, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        let amqp = self.broker.settings()?;
        let endpoint = match reqwest::Url::parse(self.aom_endpoint.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u,
            Ok(_) => return err("AOM_ENDPOINT must be an http:// or https:// URL".to_owned()),
            Err(e) => return err(format!("AOM_ENDPOINT is not a valid URL: {e}")),
        };
        if !endpoint.username().is_empty() || endpoint.password().is_some() {
            return err("AOM_ENDPOINT must not carry credentials".to_owned());
        }
        if endpoint.query().is_some() {
            return err("AOM_ENDPOINT must not have a query string".to_owned());
        }
        let auth = self.auth.validate()?;
        if !(1..=10_000).contains(&self.concurrency) {
            return err("CONCURRENCY must be 1..10000".to_owned());
        }
        let prefetch = match self.prefetch {
            Some(0) => return err("PREFETCH must be at least 1".to_owned()),
            Some(p) => p,
            None => u16::try_from(self.concurrency).unwrap_or(u16::MAX),
        };
        let prefetch_requests = match self.prefetch_requests {
            Some(0) => return err("PREFETCH_REQUESTS must be at least 1".to_owned()),
            Some(n) => n as usize,
            None => (16 * self.concurrency as usize).max(10_000),
        };
        let rate_limit = match self.rate_limit {
            Some(0) => {
                return err("RATE_LIMIT must be at least 1 (unset it for no limit)".to_owned());
            }
            Some(n) => std::num::NonZeroU32::new(n),
            None => None,
        };
        if self.max_attempts == 0 {
            return err("MAX_ATTEMPTS must be at least 1".to_owned());
        }
        if self.backoff_initial_ms.is_zero() || self.backoff_initial_ms > self.backoff_max_ms {
            return err("BACKOFF_INITIAL_MS must be above 0 and at most BACKOFF_MAX_MS".to_owned());
        }
        if self.http_timeout_ms.is_zero() {
            return err("HTTP_TIMEOUT_MS must be above 0".to_owned());
        }
        Ok(DaemonConfig {
            amqp,
            database: DatabaseSettings(self.database.connect_options()?),
            endpoint,
            auth,
            concurrency: self.concurrency as usize,
            prefetch,
            prefetch_requests,
            rate_limit,
            max_attempts: self.max_attempts,
            backoff_initial: self.backoff_initial_ms,
            backoff_max: self.backoff_max_ms,
            http_timeout: self.http_timeout_ms,
            shutdown_grace: self.shutdown_grace,
            metrics_addr: match self.metrics_addr {
                MetricsAddr::Off => None,
                MetricsAddr::At(addr) => Some(addr),
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    At(std::net::SocketAddr),
}

fn metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    s.trim()
        .parse()
        .map(MetricsAddr::At)
        .map_err(|_| "expected host:port (e.g. 127.0.0.1:9464) or `off`".to_owned())
}

fn secret(s: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(s))
}

/// A duration where a plain number means `unit`; anything else is humantime.
fn duration_with_unit(s: &str, unit: Duration) -> Result<Duration, String> {
    let s = s.trim();
    match s.parse::<u64>() {
        Ok(n) => unit
            .checked_mul(u32::try_from(n).map_err(|_| format!("{n} is too large"))?)
            .ok_or_else(|| format!("{n} is too large")),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string()),
    }
}

pub fn millis(s: &str) -> Result<Duration, String> {
    duration_with_unit(s, Duration::from_millis(1))
}

pub fn seconds(s: &str) -> Result<Duration, String> {
    duration_with_unit(s, Duration::from_secs(1))
}

/// A clap error as the one line the operator needs: the error itself and
/// what it is about, without usage text.
pub fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let mut line = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if line.is_empty() {
        line = "error: invalid command line".to_owned();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec![
            "aom-terminator",
            "run",
            "--aom-endpoint",
            "https://aom.example.com",
            "--aom-auth-token",
            "tok",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv)?;
        match cli.command {
            Command::Run(args) => Ok(*args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_validate() {
        let cfg = run_args(&[]).expect("parses").validate().expect("valid");
        assert_eq!(cfg.concurrency, 64);
        assert_eq!(cfg.prefetch, 64, "PREFETCH defaults to CONCURRENCY");
        assert_eq!(cfg.max_attempts, 5);
        assert_eq!(cfg.backoff_initial, Duration::from_millis(200));
        assert_eq!(cfg.backoff_max, Duration::from_secs(10));
        assert_eq!(cfg.http_timeout, Duration::from_secs(10));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(30));
        assert_eq!(cfg.amqp.queue, "aom.terminate.requests");
        assert_eq!(cfg.amqp.dead_letter_queue, "aom.terminate.dead");
        assert_eq!(cfg.amqp.uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
    }

    #[test]
    fn durations_take_numbers_or_humantime() {
        assert_eq!(seconds("30"), Ok(Duration::from_secs(30)));
        assert_eq!(seconds("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(millis("250"), Ok(Duration::from_millis(250)));
        assert_eq!(millis("1s"), Ok(Duration::from_secs(1)));
        assert!(seconds("soon").is_err());
    }

    #[test]
    fn bad_values_are_named_and_secrets_are_not_echoed() {
        let error = |extra: &[&str]| {
            run_args(extra)
                .expect("parses")
                .validate()
                .expect_err("must be refused")
                .0
        };
        let msg = error(&["--amqp-url", "nonsense://user:hunter2@h"]);
        assert!(msg.contains("AMQP_URL"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(error(&["--concurrency", "0"]).contains("CONCURRENCY"));
        assert!(error(&["--backoff-initial-ms", "20000"]).contains("BACKOFF_INITIAL_MS"));
        assert!(error(&["--aom-endpoint", "ftp://x"]).contains("AOM_ENDPOINT"));
        assert!(error(&["--database-url", "mysql://x"]).contains("DATABASE_URL"));

        let cfg = run_args(&[
            "--aom-auth-token",
            "s3cr3t-token",
            "--database-url",
            "postgres://u:pgpass@db/x",
        ])
        .expect("parses")
        .validate()
        .expect("valid");
        let debug = format!("{cfg:?}");
        assert!(debug.contains("aom.example.com"), "{debug}");
        assert!(
            !debug.contains("s3cr3t-token") && !debug.contains("guest:guest"),
            "{debug}"
        );
        assert!(!debug.contains("pgpass"), "{debug}");
    }

    #[test]
    fn clap_errors_fold_to_one_line() {
        let err = Cli::try_parse_from(["aom-terminator", "run"]).expect_err("missing settings");
        let line = one_line(&err);
        assert!(line.starts_with("error:"), "{line}");
        assert!(line.contains("--aom-endpoint"), "{line}");
        assert!(!line.contains('\n'));
    }
}
