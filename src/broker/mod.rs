//! The broker adapter: the only place that names `lapin` (and the
//! management API's HTTP client). Topology, the consuming session and its
//! coalesced acks, the confirmed dead-letter publisher, and the short-lived
//! connection the operator tools use.

mod acks;
mod admin;
mod dead_letters;
pub mod management;
mod parking;
mod session;
mod topology;

pub use acks::AckHandle;
pub use admin::{Admin, Taken};
pub use dead_letters::DeadLetters;
pub use parking::{Moved, Parking};
pub use session::{Incoming, Session};
pub use topology::{dead_letter_queue_arguments, declare_topology, request_queue_arguments};

use crate::settings::{AmqpSettings, ConfigError};
use crate::telemetry::tls_failure;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Confirmation, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to the broker at {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: lapin::Error,
    },
    #[error("broker call failed: {what}")]
    Call {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker did not confirm the publish ({0})")]
    NotConfirmed(&'static str),
    #[error("no broker session to publish on")]
    NoSession,
    #[error(transparent)]
    Settings(#[from] ConfigError),
}

fn call(what: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |source| BrokerError::Call { what, source }
}

/// Log directives that quiet lapin's own lines: it logs every lost
/// connection and failed connect at ERROR from several places, and the
/// daemon logs each such event once itself.
pub const QUIET_LOGS: &str = "lapin=off";

/// Heartbeat used when AMQP_URL does not set one: a dead connection is
/// noticed within a few seconds instead of the broker's default minute.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// The connection URI of `s`, with the default heartbeat where it sets none.
pub fn uri(s: &AmqpSettings) -> Result<AMQPUri, ConfigError> {
    let mut uri = AMQPUri::from_str(s.url.expose_secret()).map_err(|_| {
        // The parser's message repeats the URL, password included.
        ConfigError("AMQP_URL is not a valid amqp:// or amqps:// URL".to_owned())
    })?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    Ok(uri)
}

pub async fn connect(s: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    // No `enable_auto_recover()`: after a connection loss the daemon builds a
    // new connection, channels and consumer itself (see `daemon`), so the
    // delivery tags of a dead channel are never confused with a new one's.
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let connect_error = |source| BrokerError::Connect {
        host: s.host.clone(),
        port: s.port,
        source,
    };
    // amqps: the system's roots plus AMQP_CA_FILE, and the client
    // certificate where the broker wants one (lapin and rustls do the rest).
    let tls = OwnedTLSConfig {
        identity: s
            .tls
            .client
            .as_ref()
            .map(|(cert, key)| OwnedIdentity::PKCS8 {
                pem: cert.as_bytes().to_vec(),
                key: key.expose_secret().as_bytes().to_vec(),
            }),
        cert_chain: s.tls.ca_pem.clone(),
    };
    let runtime = lapin::runtime::default_runtime().map_err(connect_error)?;
    Connection::connect_uri_with_config(uri(s)?, props, tls, runtime)
        .await
        .map_err(connect_error)
}

impl BrokerError {
    /// Why retrying cannot help, when that is so: the broker refused the
    /// credentials or the vhost, or TLS failed (an unknown CA, a name that
    /// does not match, TLS on one side only). `None` for what may pass
    /// (refused, timed out, name not resolved).
    pub fn needs_a_person(&self) -> Option<String> {
        let BrokerError::Connect { source, .. } = self else {
            return match self {
                BrokerError::Settings(e) => Some(e.to_string()),
                _ => None,
            };
        };
        match source.kind() {
            lapin::ErrorKind::ProtocolError(e) => match e.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Some(format!(
                    "the broker refused the credentials ({})",
                    e.get_message()
                )),
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Some(format!(
                    "the broker refused the vhost ({})",
                    e.get_message()
                )),
                _ => None,
            },
            lapin::ErrorKind::IOError(io) => {
                tls_failure(io.as_ref()).map(|why| format!("TLS failed: {why}"))
            }
            lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::InvalidProtocolVersion(_) => {
                Some(
                    "the peer does not speak plain AMQP (a TLS port? then use amqps://)".to_owned(),
                )
            }
            lapin::ErrorKind::AuthProviderError(why) => {
                Some(format!("authentication failed: {why}"))
            }
            _ => None,
        }
    }
}

/// A confirmed, routed publish is the only success.
fn confirmed(confirm: Confirmation) -> Result<(), BrokerError> {
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(BrokerError::NotConfirmed("unroutable")),
        Confirmation::Nack(_) => Err(BrokerError::NotConfirmed("nacked by the broker")),
        Confirmation::NotRequested => Err(BrokerError::NotConfirmed("confirms not enabled")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::BrokerArgs;

    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        broker: BrokerArgs,
    }

    fn settings(url: &str) -> AmqpSettings {
        crate::cli::parse_args_only::<Args, _, _>(["x", "--amqp-url", url])
            .expect("parses")
            .broker
            .settings()
            .expect("valid")
    }

    #[test]
    fn the_settings_read_the_url_as_lapin_does() {
        for url in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://u:p@broker.example.com/prod",
            "amqps://u:p%40ss@mq.example.com:5681/a%2Fb?heartbeat=30",
            "amqp://localhost",
        ] {
            let s = settings(url);
            let uri = uri(&s).expect("lapin parses it");
            assert_eq!(
                (s.host.as_str(), s.port, s.vhost.as_str()),
                (
                    uri.authority.host.as_str(),
                    uri.authority.port,
                    uri.vhost.as_str()
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn the_heartbeat_defaults_to_ten_seconds() {
        let s = settings("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(uri(&s).expect("uri").query.heartbeat, Some(10));
        let s = settings("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=3");
        assert_eq!(uri(&s).expect("uri").query.heartbeat, Some(3));
    }
}
