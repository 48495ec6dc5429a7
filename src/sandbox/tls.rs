//! HTTPS for the sandbox: a [`TlsListener`] that hands axum connections whose TLS handshake
//! has already succeeded.
//!
//! One TLS stack, rustls with the aws-lc-rs provider (chosen here explicitly, so the
//! sandbox does not depend on which provider a process installed). Handshakes run in tasks
//! of their own, each bounded by [`HANDSHAKE_TIMEOUT`]: a client that connects and never
//! speaks does not hold up the next one. Failed handshakes are logged at debug and
//! otherwise ignored.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to finish its TLS handshake once connected.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; beyond that, new connections wait in the backlog.
const MAX_HANDSHAKES: usize = 1024;
/// Pause after an accept error that is not about one connection (e.g. out of file
/// descriptors), as axum's own TCP listener does.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// A server configuration from a PEM certificate chain (leaf first) and a PEM private key
/// (PKCS#8, PKCS#1 or SEC1). Errors say which of the two is wrong, never what it holds.
pub(super) fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> io::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(format!("TLS certificate: {err}")))?;
    if certs.is_empty() {
        return Err(invalid(
            "TLS certificate: no CERTIFICATE block in the PEM".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|err| {
        invalid(format!(
            "TLS key: {err} (expected a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)"
        ))
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| invalid(format!("TLS: {err}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| invalid(format!("TLS certificate and key: {err}")))?;
    // HTTP/2 or HTTP/1.1, as the client offers (its stats count which).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// A TCP listener whose [`accept`](axum::serve::Listener::accept) yields TLS streams:
/// it keeps accepting while handshakes run, and returns the first to succeed.
pub(super) struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    /// Handshakes in progress; dropping the listener aborts them.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
    /// Set after an accept error: no accepting until then.
    paused_until: Option<Instant>,
    handshake_timeout: Duration,
}

impl TlsListener {
    pub(super) fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
            paused_until: None,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }

    #[cfg(test)]
    fn with_handshake_timeout(mut self, timeout: Duration) -> TlsListener {
        self.handshake_timeout = timeout;
        self
    }

    fn start_handshake(&mut self, stream: TcpStream, peer: SocketAddr) {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::trace!(%err, "sandbox: cannot set TCP_NODELAY");
        }
        let acceptor = self.acceptor.clone();
        let timeout = self.handshake_timeout;
        self.handshakes.spawn(async move {
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Some((tls, peer)),
                Ok(Err(err)) => {
                    tracing::debug!(%peer, %err, "sandbox: TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, ?timeout, "sandbox: TLS handshake timed out");
                    None
                }
            }
        });
    }

    fn accept_failed(&mut self, err: io::Error) {
        if matches!(
            err.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
        ) {
            return;
        }
        tracing::error!(%err, "sandbox: accept error");
        self.paused_until = Some(Instant::now() + ACCEPT_ERROR_PAUSE);
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    /// Cancel-safe: a connection accepted or a handshake finished while the future is
    /// dropped stays in the listener for the next call.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let paused_until = self.paused_until;
            let may_accept = paused_until.is_none() && self.handshakes.len() < MAX_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.accept(), if may_accept => match accepted {
                    Ok((stream, peer)) => self.start_handshake(stream, peer),
                    Err(err) => self.accept_failed(err),
                },
                Some(joined) = self.handshakes.join_next() => match joined {
                    Ok(Some(connection)) => return connection,
                    Ok(None) => {}
                    Err(err) => tracing::debug!(%err, "sandbox: TLS handshake task ended"),
                },
                () = sleep_until(paused_until), if paused_until.is_some() => {
                    self.paused_until = None;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{Sandbox, SandboxArgs};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PROJECT: &str = "0123456789abcdef0123456789abcdef";

    struct Pems {
        cert: String,
        key: String,
    }

    fn self_signed() -> Pems {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .unwrap();
        Pems {
            cert: cert.pem(),
            key: signing_key.serialize_pem(),
        }
    }

    fn client_config(trusted_pem: &str) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(trusted_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// One terminate call over TLS with a hand-written HTTP/1.1 request: the status line.
    async fn terminate_over_tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<String> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let request = format!(
            "POST /v1/{PROJECT}/cms/workflow/wf-1/executions/ex-1/terminate HTTP/1.1\r\n\
             Host: localhost\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await?;
        let mut answer = String::new();
        tls.read_to_string(&mut answer).await?;
        Ok(answer.lines().next().unwrap_or_default().to_owned())
    }

    #[test]
    fn bad_pem_is_refused_saying_which_part() {
        let pems = self_signed();
        let err = server_config(b"not a pem", pems.key.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("TLS certificate"), "{err}");
        let err = server_config(pems.cert.as_bytes(), b"").unwrap_err();
        assert!(err.to_string().starts_with("TLS key"), "{err}");
        // A key that does not go with the certificate.
        let other = self_signed();
        let err = server_config(pems.cert.as_bytes(), other.key.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("certificate and key"), "{err}");
        assert!(!err.to_string().contains("PRIVATE KEY-----"), "{err}");
        server_config(pems.cert.as_bytes(), pems.key.as_bytes()).unwrap();
    }

    #[tokio::test]
    async fn bind_tls_serves_https_and_keeps_serving_after_bad_handshakes() {
        let pems = self_signed();
        let running = Sandbox::new(&SandboxArgs::default())
            .bind_tls(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                pems.cert.as_bytes(),
                pems.key.as_bytes(),
            )
            .await
            .unwrap();
        let addr = running.local_addr();
        assert_eq!(running.base_url(), format!("https://{addr}"));

        // Plain HTTP gets no answer but a closed connection.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /_sandbox/stats HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf).await;
        assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

        // A client that trusts another certificate fails its handshake.
        let stranger = self_signed();
        assert!(
            terminate_over_tls(addr, client_config(&stranger.cert))
                .await
                .is_err()
        );

        let status = terminate_over_tls(addr, client_config(&pems.cert))
            .await
            .unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(running.sandbox().stats().calls, 1);
        running.shutdown().await;
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_the_next_one() {
        let pems = self_signed();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let config = server_config(pems.cert.as_bytes(), pems.key.as_bytes()).unwrap();
        let mut listener =
            TlsListener::new(tcp, config).with_handshake_timeout(Duration::from_secs(3));
        // Connected, and never a byte: its handshake waits for its timeout.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let client = tokio::spawn(terminate_over_tls_raw(addr, client_config(&pems.cert)));
        let accepted = tokio::time::timeout(
            Duration::from_secs(2),
            axum::serve::Listener::accept(&mut listener),
        )
        .await
        .expect("the second client is accepted before the first one's timeout");
        assert!(
            accepted.0.get_ref().0.nodelay().unwrap(),
            "TCP_NODELAY kept"
        );
        drop(accepted);
        drop(listener);
        let _ = client.await;
    }

    /// A TLS handshake then nothing: for the listener test, which answers nothing.
    async fn terminate_over_tls_raw(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<()> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        tls.shutdown().await
    }
}
