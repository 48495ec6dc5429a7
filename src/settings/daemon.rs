//! The daemon's settings (`aom-terminator run`), checked before anything
//! starts.

use super::auth::{AuthArgs, AuthSettings};
use super::broker::{AmqpSettings, BrokerArgs};
use super::database::{DatabaseArgs, DatabaseSettings};
use super::endpoint::AomEndpoint;
use super::{ConfigError, MetricsAddr, metrics_addr, millis, read_pem, seconds};
use clap::Args;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

/// `CONCURRENCY_CONTROL`: how the calls in flight are limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConcurrencyControl {
    /// At most CONCURRENCY; fewer while the API signals overload.
    Adaptive,
    /// Always CONCURRENCY.
    Fixed,
}

/// `AOM_HTTP_VERSION`: which HTTP the terminate calls speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpVersion {
    /// HTTP/1.1 only: one connection per call in flight, so that
    /// CONCURRENCY calls are in flight whatever the server allows per
    /// connection.
    Http1,
    /// HTTP/2 when an https API offers it (ALPN), else HTTP/1.1. HTTP/2
    /// uses one connection per host, and the client opens no second one
    /// when the server's stream limit (`SETTINGS_MAX_CONCURRENT_STREAMS`,
    /// often 100 to 250) is reached: past it, calls wait for a stream.
    Auto,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Base URL of the AOM API, e.g. https://aom.cn-north-4.myhuaweicloud.com;
    /// `{region}` in the host routes each call to its project's region
    /// (https://aom.{region}.myhuaweicloud.com).
    #[arg(long, env = "AOM_ENDPOINT")]
    pub aom_endpoint: String,
    /// The region of each project, for requests that name none:
    /// `<project_id>=<region>,…` (with `{region}` in AOM_ENDPOINT).
    #[arg(long, env = "AOM_PROJECT_REGIONS", default_value = "")]
    pub aom_project_regions: String,
    /// PEM bundle of CAs trusted for the AOM API and IAM, besides the
    /// system's roots (a private CA, or a TLS-inspecting proxy).
    #[arg(long, env = "AOM_CA_FILE")]
    pub aom_ca_file: Option<PathBuf>,
    /// Which HTTP the terminate calls speak: `http1` (one connection per
    /// call in flight) or `auto` (HTTP/2 when an https API offers it: one
    /// connection per host, whose stream limit can cap the calls in flight
    /// below CONCURRENCY).
    #[arg(long, env = "AOM_HTTP_VERSION", value_enum, default_value_t = HttpVersion::Http1)]
    pub aom_http_version: HttpVersion,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Most API calls in flight at once, across all messages.
    #[arg(long, env = "CONCURRENCY", default_value_t = 64)]
    pub concurrency: u32,
    /// How the number of calls in flight is chosen: `adaptive` (at most
    /// CONCURRENCY, fewer while the API signals overload) or `fixed`
    /// (always CONCURRENCY).
    #[arg(long, env = "CONCURRENCY_CONTROL", value_enum, default_value_t = ConcurrencyControl::Adaptive)]
    pub concurrency_control: ConcurrencyControl,
    /// Most unacked messages held at once (default: 2 × CONCURRENCY).
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
    /// How long a request may be throttled (429, or 503 with Retry-After)
    /// with no other answer before it ends `failed_retries_exhausted`; a
    /// number is seconds (`3600`, `1h`).
    #[arg(long, env = "THROTTLE_GIVE_UP", default_value = "1h", value_parser = seconds)]
    pub throttle_give_up: Duration,
    /// Attempts per request, counting the first (401 and throttled answers do not count).
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

/// Everything the daemon needs, checked.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub amqp: AmqpSettings,
    pub database: DatabaseSettings,
    pub endpoint: AomEndpoint,
    /// Extra CAs (PEM) trusted for the AOM API and IAM.
    pub aom_ca_pem: Option<String>,
    pub http_version: HttpVersion,
    pub auth: AuthSettings,
    pub concurrency: usize,
    pub concurrency_control: ConcurrencyControl,
    pub prefetch: u16,
    pub prefetch_requests: usize,
    pub rate_limit: Option<NonZeroU32>,
    pub max_attempts: u32,
    pub throttle_give_up: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub http_timeout: Duration,
    pub shutdown_grace: Duration,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl RunArgs {
    pub fn validate(&self) -> Result<DaemonConfig, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        let amqp = self.broker.settings()?;
        let endpoint = AomEndpoint::parse(&self.aom_endpoint, &self.aom_project_regions)?;
        let auth = self.auth.validate()?;
        if !(1..=10_000).contains(&self.concurrency) {
            return err("CONCURRENCY must be 1..10000".to_owned());
        }
        let prefetch = match self.prefetch {
            Some(0) => return err("PREFETCH must be at least 1".to_owned()),
            Some(p) => p,
            // Twice the calls: while one message's call is in flight, the
            // next waits in the dedupe lookup and the audit, so that
            // CONCURRENCY calls stay in flight (BENCHMARKS.md).
            None => u16::try_from(2 * self.concurrency).unwrap_or(u16::MAX),
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
            Some(n) => NonZeroU32::new(n),
            None => None,
        };
        if self.max_attempts == 0 {
            return err("MAX_ATTEMPTS must be at least 1".to_owned());
        }
        if self.backoff_initial_ms.is_zero() || self.backoff_initial_ms > self.backoff_max_ms {
            return err("BACKOFF_INITIAL_MS must be above 0 and at most BACKOFF_MAX_MS".to_owned());
        }
        if self.throttle_give_up.is_zero() {
            return err("THROTTLE_GIVE_UP must be above 0".to_owned());
        }
        if self.http_timeout_ms.is_zero() {
            return err("HTTP_TIMEOUT_MS must be above 0".to_owned());
        }
        let aom_ca_pem = match &self.aom_ca_file {
            Some(path) => Some(read_pem(path, "AOM_CA_FILE", "CERTIFICATE")?),
            None => None,
        };
        Ok(DaemonConfig {
            amqp,
            database: self.database.settings()?,
            endpoint,
            aom_ca_pem,
            http_version: self.aom_http_version,
            auth,
            concurrency: self.concurrency as usize,
            concurrency_control: self.concurrency_control,
            prefetch,
            prefetch_requests,
            rate_limit,
            max_attempts: self.max_attempts,
            throttle_give_up: self.throttle_give_up,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `run`'s arguments alone, parsed as the command line would be.
    #[derive(clap::Parser)]
    #[command(args_override_self = true)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec![
            "run",
            "--aom-endpoint",
            "https://aom.example.com",
            "--aom-auth-token",
            "tok",
        ];
        argv.extend_from_slice(extra);
        crate::cli::parse_args_only::<Run, _, _>(argv).map(|r| r.args)
    }

    #[test]
    fn defaults_validate() {
        let cfg = run_args(&[]).expect("parses").validate().expect("valid");
        assert_eq!(cfg.concurrency, 64);
        assert_eq!(cfg.prefetch, 128, "PREFETCH defaults to 2 × CONCURRENCY");
        assert_eq!(cfg.concurrency_control, ConcurrencyControl::Adaptive);
        assert_eq!(cfg.http_version, HttpVersion::Http1);
        assert_eq!(cfg.throttle_give_up, Duration::from_secs(3600));
        assert_eq!(cfg.max_attempts, 5);
        assert_eq!(cfg.backoff_initial, Duration::from_millis(200));
        assert_eq!(cfg.backoff_max, Duration::from_secs(10));
        assert_eq!(cfg.http_timeout, Duration::from_secs(10));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(30));
        assert_eq!(cfg.amqp.queue, "aom.terminate.requests");
        assert_eq!(cfg.amqp.dead_letter_queue, "aom.terminate.dead");
        assert_eq!((cfg.amqp.host.as_str(), cfg.amqp.port), ("127.0.0.1", 5672));
        assert_eq!(cfg.amqp.vhost, "/");
    }

    #[test]
    fn http_version_is_http1_or_auto() {
        let version = |v: &str| {
            run_args(&["--aom-http-version", v]).map(|a| a.validate().expect("valid").http_version)
        };
        assert_eq!(version("http1").expect("parses"), HttpVersion::Http1);
        assert_eq!(version("auto").expect("parses"), HttpVersion::Auto);
        let refused = version("h3").expect_err("refused").to_string();
        assert!(
            refused.contains("http1") && refused.contains("auto"),
            "{refused}"
        );
    }

    #[test]
    fn durations_take_numbers_or_humantime() {
        use crate::settings::{millis, seconds};
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
        assert!(error(&["--throttle-give-up", "0"]).contains("THROTTLE_GIVE_UP"));
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
}
