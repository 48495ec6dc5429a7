//! A TLS kit for tests (issue #14, TLS to every peer).
//!
//! * [`TlsKit`]: a throwaway test CA, a server certificate for given names and a client
//!   certificate, both signed by it, and an unrelated "wrong" CA; all written as PEM files
//!   into a fresh temporary directory that is removed on drop.
//! * [`TlsProxy`]: a TLS-terminating TCP proxy on 127.0.0.1:0 that forwards the decrypted
//!   bytes to a plain TCP upstream (the local RabbitMQ), optionally requiring a client
//!   certificate signed by the test CA. A test can then speak `amqps://` to a plain broker.
//!
//! One TLS stack: rustls with the aws-lc-rs provider ([`install_crypto_provider`]).
//! Self-contained (no `crate::` paths), so any test crate can include it:
//! `#[path = "../pipeline/tls.rs"] mod tls;`.

#![allow(dead_code)] // not every test crate uses every part

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The names [`TlsKit::new`]'s server certificate is valid for.
pub const LOCAL_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// How long the proxy gives a client to finish its TLS handshake.
const PROXY_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes aws-lc-rs the process's rustls provider, as the binary does at start; a provider
/// already installed (by another test) is fine.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate and its private key, as PEM text and as files in the kit's directory.
#[derive(Debug, Clone)]
pub struct CertKey {
    /// The certificate, PEM (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl CertKey {
    /// The sandbox with `args`, serving https with this certificate on a
    /// free port of 127.0.0.1.
    pub async fn https_sandbox(
        &self,
        args: &aom_terminator::sandbox::SandboxArgs,
    ) -> aom_terminator::sandbox::RunningSandbox {
        aom_terminator::sandbox::Sandbox::new(args)
            .bind_tls(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                self.cert_pem.as_bytes(),
                self.key_pem.as_bytes(),
            )
            .await
            .expect("the sandbox over TLS")
    }

    pub fn cert_der(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("the kit's certificate PEM parses")
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("the kit's key PEM parses")
    }

    /// The certificate followed by its key, PEM (the form some tools want in one file).
    pub fn bundle_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

/// A test CA with a server and a client certificate it signed, and an unrelated CA, as PEM
/// files in a temporary directory (removed on drop).
pub struct TlsKit {
    /// The temporary directory holding every file below.
    pub dir: PathBuf,
    /// The test CA: `ca.pem`, `ca.key`.
    pub ca: CertKey,
    /// Signed by the test CA for [`TlsKit::server_names`]: `server.pem`, `server.key`.
    pub server: CertKey,
    /// Signed by the test CA for client authentication (CN `aom-terminator-test-client`):
    /// `client.pem`, `client.key`.
    pub client: CertKey,
    /// A CA that signed nothing here: trusting it alone must fail. `wrong-ca.pem`,
    /// `wrong-ca.key`.
    pub wrong_ca: CertKey,
    server_names: Vec<String>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TlsKit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsKit")
            .field("dir", &self.dir)
            .field("server_names", &self.server_names)
            .finish_non_exhaustive()
    }
}

impl TlsKit {
    /// A kit whose server certificate is valid for [`LOCAL_NAMES`]
    /// (`localhost`, `127.0.0.1`, `::1`).
    pub fn new() -> TlsKit {
        TlsKit::for_names(LOCAL_NAMES)
    }

    /// A kit whose server certificate is valid for `names`: DNS names, and IP addresses
    /// (which become IP SANs).
    pub fn for_names(names: &[&str]) -> TlsKit {
        install_crypto_provider();
        let dir = std::env::temp_dir().join(format!(
            "aomt-tls-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir(&dir).expect("create the kit's temporary directory");
        let (ca_params, ca_key) = new_ca("aom-terminator test CA");
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .expect("self-sign the test CA");
        let ca = write_pair(&dir, "ca", ca_cert.pem(), ca_key.serialize_pem());
        let issuer = Issuer::new(ca_params, ca_key);

        let (wrong_params, wrong_key) = new_ca("aom-terminator wrong CA");
        let wrong_cert = wrong_params
            .self_signed(&wrong_key)
            .expect("self-sign the wrong CA");
        let wrong_ca = write_pair(
            &dir,
            "wrong-ca",
            wrong_cert.pem(),
            wrong_key.serialize_pem(),
        );

        let mut kit = TlsKit {
            server: ca.clone(), // replaced just below
            client: ca.clone(),
            dir,
            ca,
            wrong_ca,
            server_names: names.iter().map(|n| (*n).to_owned()).collect(),
            issuer,
        };
        kit.server = kit.issue_server("server", names);
        kit.client = kit.issue_client("client", "aom-terminator-test-client");
        kit
    }

    /// The names the kit's server certificate is valid for.
    pub fn server_names(&self) -> &[String] {
        &self.server_names
    }

    /// Another server certificate signed by the test CA, valid for `names`, written as
    /// `<stem>.pem` and `<stem>.key`.
    pub fn issue_server(&self, stem: &str, names: &[&str]) -> CertKey {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("valid server names");
        params.distinguished_name.push(
            DnType::CommonName,
            self.server_names.first().map_or("server", |n| n),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(stem, params)
    }

    /// Another client certificate signed by the test CA, with this common name, written as
    /// `<stem>.pem` and `<stem>.key`.
    pub fn issue_client(&self, stem: &str, common_name: &str) -> CertKey {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(stem, params)
    }

    fn sign(&self, stem: &str, params: CertificateParams) -> CertKey {
        let key = KeyPair::generate().expect("generate a key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign with the test CA");
        write_pair(&self.dir, stem, cert.pem(), key.serialize_pem())
    }

    /// A rustls server configuration with the kit's server certificate; with
    /// [`ClientAuth::Required`], clients must present a certificate signed by the test CA.
    pub fn server_config(&self, client_auth: ClientAuth) -> Arc<rustls::ServerConfig> {
        let client_ca = (client_auth == ClientAuth::Required).then_some(&self.ca);
        server_config(&self.server, client_ca)
    }

    /// A rustls client configuration trusting the test CA only, with the kit's client
    /// certificate when `with_client_cert`.
    pub fn client_config(&self, with_client_cert: bool) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots(&self.ca));
        let config = if with_client_cert {
            builder
                .with_client_auth_cert(self.client.cert_der(), self.client.key_der())
                .expect("the client certificate and key go together")
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(config)
    }

    /// A reqwest client (rustls) that trusts only the certificates in `ca_pem`, e.g.
    /// `kit.ca.cert_pem` or `kit.wrong_ca.cert_pem`.
    pub fn reqwest_trusting(ca_pem: &str) -> reqwest::Client {
        install_crypto_provider();
        let certs = reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("CA PEM");
        reqwest::Client::builder()
            .tls_certs_only(certs)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("build a reqwest client")
    }

    /// lapin's TLS settings trusting the test CA, presenting the kit's client certificate
    /// when `with_client_cert`.
    pub fn lapin_tls(&self, with_client_cert: bool) -> lapin::tcp::OwnedTLSConfig {
        lapin::tcp::OwnedTLSConfig {
            identity: with_client_cert.then(|| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: self.client.cert_pem.clone().into_bytes(),
                key: self.client.key_pem.clone().into_bytes(),
            }),
            cert_chain: Some(self.ca.cert_pem.clone()),
        }
    }

    /// Starts a [`TlsProxy`] with the kit's server certificate in front of `upstream`.
    pub async fn proxy(&self, upstream: SocketAddr, client_auth: ClientAuth) -> TlsProxy {
        TlsProxy::start(self.server_config(client_auth), upstream)
            .await
            .expect("start the TLS proxy")
    }
}

impl Drop for TlsKit {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_ca(common_name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params, KeyPair::generate().expect("generate a CA key"))
}

fn write_pair(dir: &Path, stem: &str, cert_pem: String, key_pem: String) -> CertKey {
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, &cert_pem).expect("write a certificate");
    std::fs::write(&key_path, &key_pem).expect("write a key");
    CertKey {
        cert_pem,
        key_pem,
        cert_path,
        key_path,
    }
}

fn roots(ca: &CertKey) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca.cert_der() {
        roots.add(cert).expect("a usable CA certificate");
    }
    roots
}

/// Whether a TLS server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate asked for.
    None,
    /// Mutual TLS: a certificate signed by the test CA, or the handshake fails.
    Required,
}

/// A rustls server configuration for `server`; with `client_ca`, clients must present a
/// certificate it signed.
pub fn server_config(server: &CertKey, client_ca: Option<&CertKey>) -> Arc<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)),
                provider(),
            )
            .build()
            .expect("a client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(
        builder
            .with_single_cert(server.cert_der(), server.key_der())
            .expect("the server certificate and key go together"),
    )
}

/// What a [`TlsProxy`] has seen.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// TLS handshakes that succeeded (each then connected to the upstream).
    pub handshakes: AtomicU64,
    /// TLS handshakes that failed or timed out (no client certificate, wrong CA, …).
    pub handshake_failures: AtomicU64,
    /// Connections to the upstream that failed.
    pub upstream_failures: AtomicU64,
}

/// A TLS-terminating TCP proxy: accepts TLS on 127.0.0.1:`port`, forwards the plain bytes
/// to `upstream`. Dropping it closes the listener and every connection through it.
pub struct TlsProxy {
    addr: SocketAddr,
    counters: Arc<ProxyCounters>,
    task: JoinHandle<()>,
}

impl TlsProxy {
    /// Listens on 127.0.0.1:0 with `config` (see [`TlsKit::server_config`] and
    /// [`server_config`]) and forwards each connection whose handshake succeeds to
    /// `upstream`. Handshakes run concurrently, each for at most 10 s.
    pub async fn start(
        config: Arc<rustls::ServerConfig>,
        upstream: SocketAddr,
    ) -> io::Result<TlsProxy> {
        Self::start_on(0, config, upstream).await
    }

    /// Like [`TlsProxy::start`], on 127.0.0.1:`port` (0 picks a free one): a
    /// proxy restarted where another stood, with another certificate.
    pub async fn start_on(
        port: u16,
        config: Arc<rustls::ServerConfig>,
        upstream: SocketAddr,
    ) -> io::Result<TlsProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(ProxyCounters::default());
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let task = tokio::spawn({
            let counters = Arc::clone(&counters);
            async move {
                // Owned here: aborting this task drops every connection's task too.
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            let _ = client.set_nodelay(true);
                            connections.spawn(forward(
                                acceptor.clone(),
                                client,
                                upstream,
                                Arc::clone(&counters),
                            ));
                        }
                        Some(_) = connections.join_next() => {}
                    }
                }
            }
        });
        Ok(TlsProxy {
            addr,
            counters,
            task,
        })
    }

    /// Where the proxy listens (127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn counters(&self) -> &ProxyCounters {
        &self.counters
    }

    pub fn handshakes(&self) -> u64 {
        self.counters.handshakes.load(Ordering::SeqCst)
    }

    pub fn handshake_failures(&self) -> u64 {
        self.counters.handshake_failures.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    acceptor: tokio_rustls::TlsAcceptor,
    client: TcpStream,
    upstream: SocketAddr,
    counters: Arc<ProxyCounters>,
) {
    let mut tls = match tokio::time::timeout(PROXY_HANDSHAKE_TIMEOUT, acceptor.accept(client)).await
    {
        Ok(Ok(tls)) => tls,
        _ => {
            counters.handshake_failures.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    counters.handshakes.fetch_add(1, Ordering::SeqCst);
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        counters.upstream_failures.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
}

/// The broker address of an `amqp://` URL (host resolved, IPv4 preferred; port 5672 if
/// none): the proxy's upstream.
pub async fn amqp_upstream(amqp_url: &str) -> io::Result<SocketAddr> {
    let url = url::Url::parse(amqp_url).map_err(io::Error::other)?;
    let host = url
        .host_str()
        .ok_or_else(|| io::Error::other("no host in the AMQP URL"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port().unwrap_or(5672);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| io::Error::other("the AMQP host resolves to nothing"))
}

/// `amqp_url` turned into `amqps://` through a proxy: same credentials, vhost and query,
/// host `host` (a name the server certificate holds: `localhost`, `127.0.0.1`, `[::1]`) and
/// the proxy's port.
pub fn amqps_url(amqp_url: &str, host: &str, port: u16) -> String {
    let mut url = url::Url::parse(amqp_url).expect("a valid AMQP URL");
    url.set_scheme("amqps").expect("amqps scheme");
    url.set_host(Some(host)).expect("a valid host");
    url.set_port(Some(port)).expect("a port");
    url.to_string()
}
