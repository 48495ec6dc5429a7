//! The broker and its queues: shared by the daemon and the operator tools.

use super::{ConfigError, read_pem, secret};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use std::path::PathBuf;

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
    /// Queue for the requests of projects the credentials do not cover
    /// right now (a 401 for them alone), until they are covered again
    /// [default: TERMINATE_QUEUE + `.parked`].
    #[arg(long, env = "PARKING_QUEUE")]
    pub parking_queue: Option<String>,
    /// Deliveries of one message before the broker dead-letters it (x-delivery-limit).
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = 20)]
    pub delivery_limit: u32,
    /// PEM bundle of CAs trusted for `amqps://` (and an https management
    /// API), besides the system's roots: a private CA.
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,
    /// PEM client certificate, for a broker that requires mutual TLS.
    #[arg(long, env = "AMQP_CLIENT_CERT")]
    pub amqp_client_cert: Option<PathBuf>,
    /// PEM private key of AMQP_CLIENT_CERT.
    #[arg(long, env = "AMQP_CLIENT_KEY")]
    pub amqp_client_key: Option<PathBuf>,
}

/// TLS to the broker, read from the files the settings name.
#[derive(Clone, Default)]
pub struct AmqpTls {
    /// Extra trusted CAs (PEM), added to the system's roots.
    pub ca_pem: Option<String>,
    /// Client certificate (PEM) and its key (PEM), for mutual TLS.
    pub client: Option<(String, SecretString)>,
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
    pub parking_queue: String,
    pub delivery_limit: u32,
    pub tls: AmqpTls,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("vhost", &self.vhost)
            .field("queue", &self.queue)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("parking_queue", &self.parking_queue)
            .field("delivery_limit", &self.delivery_limit)
            .field("private_ca", &self.tls.ca_pem.is_some())
            .field("client_certificate", &self.tls.client.is_some())
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
        // Named after the request queue, so that daemons of different
        // request queues never move each other's parked requests.
        let parking_queue = self
            .parking_queue
            .clone()
            .unwrap_or_else(|| format!("{}.parked", self.terminate_queue));
        for (name, value) in [
            ("TERMINATE_QUEUE", &self.terminate_queue),
            ("DEAD_LETTER_QUEUE", &self.dead_letter_queue),
            ("PARKING_QUEUE", &parking_queue),
        ] {
            if value.is_empty() || value.len() > 255 {
                return err(format!("{name} must be 1..255 bytes"));
            }
        }
        let queues = [
            &self.terminate_queue,
            &self.dead_letter_queue,
            &parking_queue,
        ];
        if queues[0] == queues[1] || queues[0] == queues[2] || queues[1] == queues[2] {
            return err(
                "TERMINATE_QUEUE, DEAD_LETTER_QUEUE and PARKING_QUEUE must differ".to_owned(),
            );
        }
        if self.delivery_limit == 0 {
            return err("DELIVERY_LIMIT must be at least 1".to_owned());
        }
        let ca_pem = match &self.amqp_ca_file {
            Some(path) => Some(read_pem(path, "AMQP_CA_FILE", "CERTIFICATE")?),
            None => None,
        };
        let client = match (&self.amqp_client_cert, &self.amqp_client_key) {
            (Some(cert), Some(key)) => Some((
                read_pem(cert, "AMQP_CLIENT_CERT", "CERTIFICATE")?,
                SecretString::from(read_pem(key, "AMQP_CLIENT_KEY", "PRIVATE KEY")?),
            )),
            (None, None) => None,
            _ => return err("AMQP_CLIENT_CERT and AMQP_CLIENT_KEY go together".to_owned()),
        };
        Ok(AmqpSettings {
            url: self.amqp_url.clone(),
            host,
            port,
            vhost,
            queue: self.terminate_queue.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            parking_queue,
            delivery_limit: self.delivery_limit,
            tls: AmqpTls { ca_pem, client },
        })
    }
}

/// The management API's address, checked: credentials from `AMQP_URL` are
/// never sent over plain http to a host that is not this machine.
pub fn management_url(raw: &str) -> Result<url::Url, ConfigError> {
    let bad = |why: &str| ConfigError(format!("RABBITMQ_MANAGEMENT_URL {why}"));
    let url = url::Url::parse(raw.trim()).map_err(|_| bad("is not a valid URL"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(bad(
            "is plain http:// to a host that is not loopback: the broker's credentials would \
             cross the network in clear. Use https:// (a private CA goes in AMQP_CA_FILE)",
        )),
        _ => Err(bad("must be an http:// or https:// URL")),
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_over_plain_http_to_loopback_only() {
        for ok in [
            "http://127.0.0.1:15672",
            "http://localhost:15672/",
            "http://[::1]:15672",
            "https://mq.example.com",
        ] {
            assert!(management_url(ok).is_ok(), "{ok}");
        }
        let err = management_url("http://mq.example.com:15672").expect_err("refused");
        assert!(err.0.contains("https://"), "says how to fix it: {}", err.0);
        assert!(management_url("ftp://x").is_err());
    }
}
