//! The broker and its queues: shared by the daemon and the operator tools.

use super::{ConfigError, secret};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};

/// The broker and the queues, as flags with environment fallbacks.
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

/// Broker settings, checked. `url` holds the password: `Debug` shows only
/// where it points. The broker adapter turns it into a connection.
#[derive(Clone)]
pub struct AmqpSettings {
    pub url: SecretString,
    /// Host, port and vhost, read from the URL for logs and errors.
    pub host: String,
    pub port: u16,
    pub vhost: String,
    pub queue: String,
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("vhost", &self.vhost)
            .field("queue", &self.queue)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("delivery_limit", &self.delivery_limit)
            .finish_non_exhaustive()
    }
}

impl BrokerArgs {
    pub fn settings(&self) -> Result<AmqpSettings, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        // The parser's own message repeats the URL, password included.
        let invalid = || ConfigError("AMQP_URL is not a valid amqp:// or amqps:// URL".to_owned());
        let url = url::Url::parse(self.amqp_url.expose_secret()).map_err(|_| invalid())?;
        let port = match url.scheme() {
            "amqp" => url.port().unwrap_or(5672),
            "amqps" => url.port().unwrap_or(5671),
            _ => return Err(invalid()),
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| invalid())
        };
        let host = decode(url.host_str().unwrap_or("localhost"))?;
        let vhost = decode(url.path().get(1..).unwrap_or("/"))?;
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
            url: self.amqp_url.clone(),
            host,
            port,
            vhost,
            queue: self.terminate_queue.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            delivery_limit: self.delivery_limit,
        })
    }
}
