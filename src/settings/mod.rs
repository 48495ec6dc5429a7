//! Settings: command-line flags with environment fallbacks, validated
//! before anything starts, and the plain, checked values the rest of the
//! program takes. No adapter type appears here: the broker, audit and AOM
//! adapters read these values and build their own clients from them.
//!
//! An empty environment variable counts as unset. Values that carry secrets
//! (the API token, and the broker and database URLs, which may hold
//! passwords) are read as [`SecretString`] and checked here, so that no parse
//! error, log line or `Debug` output can echo them.

pub mod auth;
pub mod broker;
pub mod daemon;
pub mod database;
pub mod endpoint;
pub mod open_files;

pub use auth::{AkSkSettings, AuthArgs, AuthSettings, IamSettings, ProjectScope, StaticToken};
pub use broker::{AmqpSettings, AmqpTls, BrokerArgs, management_url};
pub use daemon::{ConcurrencyControl, DaemonConfig, HttpVersion, RunArgs};
pub use database::{DatabaseArgs, DatabaseSettings};
pub use endpoint::AomEndpoint;

use secrecy::SecretString;
use std::path::Path;
use std::time::Duration;

/// Log format: `text` (human) or `json` (for log shippers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A setting that is present but wrong; the message names the setting and
/// never echoes a secret.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    At(std::net::SocketAddr),
}

pub(crate) fn metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    s.trim()
        .parse()
        .map(MetricsAddr::At)
        .map_err(|_| "expected host:port (e.g. 127.0.0.1:9464) or `off`".to_owned())
}

/// The PEM file `path` names (setting `name`), checked to hold at least one
/// `-----BEGIN …{label}-----` block.
pub(crate) fn read_pem(path: &Path, name: &str, label: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{name}: cannot read {}: {e}", path.display())))?;
    let has_block = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if !has_block {
        return Err(ConfigError(format!(
            "{name}: {} holds no PEM {label}",
            path.display()
        )));
    }
    Ok(text)
}

pub(crate) fn secret(s: &str) -> Result<SecretString, String> {
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
