//! The audit database's address.

use super::{ConfigError, secret};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};

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

/// The audit database, checked for shape. The URL may hold a password:
/// `Debug` shows host, port and database only. The audit adapter reads
/// every libpq parameter of it.
#[derive(Clone)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub host: String,
    pub port: u16,
    pub database: String,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl DatabaseArgs {
    pub fn settings(&self) -> Result<DatabaseSettings, ConfigError> {
        let raw = self.database_url.expose_secret();
        if !(raw.starts_with("postgres://") || raw.starts_with("postgresql://")) {
            return Err(ConfigError(
                "DATABASE_URL must be a postgres:// or postgresql:// URL".to_owned(),
            ));
        }
        let url = url::Url::parse(raw)
            .map_err(|e| ConfigError(format!("DATABASE_URL is not a valid postgres URL: {e}")))?;
        Ok(DatabaseSettings {
            url: self.database_url.clone(),
            host: url.host_str().unwrap_or("localhost").to_owned(),
            port: url.port().unwrap_or(5432),
            database: url.path().trim_start_matches('/').to_owned(),
        })
    }
}
