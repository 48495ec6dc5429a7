//! TLS (issue #14): the sandbox serving https, and `amqps://` through the kit's
//! TLS-terminating proxy in front of the plain local broker, with and without mutual TLS.
//! The kit itself is in `tls.rs`, kept free of tests so other test crates can include it.

use crate::helpers::*;
use crate::tls::*;
use aom_terminator::sandbox::SandboxArgs;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

const TLS_TOKEN: &str = "tls-test-token";

fn terminate_url(base: &str, execution: &str) -> String {
    format!("{base}/v1/{PROJECT}/cms/workflow/wf-tls/executions/{execution}/terminate")
}

async fn terminate(
    client: &reqwest::Client,
    base: &str,
    execution: &str,
) -> reqwest::Result<(u16, String)> {
    let answer = client
        .post(terminate_url(base, execution))
        .header("content-type", "application/json")
        .header("x-auth-token", TLS_TOKEN)
        .body("{}")
        .send()
        .await?;
    let status = answer.status().as_u16();
    Ok((status, answer.text().await?))
}

async fn tls_sandbox(kit: &TlsKit) -> aom_terminator::sandbox::RunningSandbox {
    kit.server
        .https_sandbox(&SandboxArgs {
            expected_token: Some(TLS_TOKEN.to_owned()),
            ..SandboxArgs::default()
        })
        .await
}

#[tokio::test]
async fn tls_sandbox_answers_over_https_a_client_trusting_the_test_ca() {
    let kit = TlsKit::new();
    let running = tls_sandbox(&kit).await;
    let base = running.base_url();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    assert!(running.is_tls());
    let client = TlsKit::reqwest_trusting(&kit.ca.cert_pem);

    // By IP (an IP SAN) and by name.
    let (status, body) = terminate(&client, &base, "ex-1").await.expect("https call");
    assert_eq!(status, 200, "{body}");
    let by_name = format!("https://localhost:{}", running.local_addr().port());
    let localhost = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(kit.ca.cert_pem.as_bytes()).unwrap())
        .resolve("localhost", running.local_addr())
        .build()
        .unwrap();
    assert_eq!(
        terminate(&localhost, &by_name, "ex-2").await.unwrap().0,
        200
    );

    // Everything else as over http: scripts, the token, the control endpoints.
    assert_eq!(terminate(&client, &base, "e404-x").await.unwrap().0, 404);
    let wrong_token = client
        .post(terminate_url(&base, "ex-3"))
        .header("content-type", "application/json")
        .header("x-auth-token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_token.status().as_u16(), 401);
    let stats = client
        .get(format!("{base}/_sandbox/stats"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["calls"], 4, "{stats}");
    assert_eq!(running.sandbox().calls_for(PROJECT, "wf-tls", "ex-1"), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn tls_sandbox_refuses_a_client_trusting_only_the_wrong_ca() {
    let kit = TlsKit::new();
    let running = tls_sandbox(&kit).await;
    let base = running.base_url();

    let stranger = TlsKit::reqwest_trusting(&kit.wrong_ca.cert_pem);
    let err = terminate(&stranger, &base, "ex-1")
        .await
        .expect_err("a certificate the client cannot verify");
    assert!(
        err.is_connect(),
        "a handshake error, not an answer: {err:?}"
    );
    let chain = format!("{err:?}");
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("certificate"),
        "{chain}"
    );
    // A plain-http client gets no answer either.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/_sandbox/stats", running.local_addr()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(running.sandbox().stats().calls, 0);

    // The refusals did not stop the server.
    let client = TlsKit::reqwest_trusting(&kit.ca.cert_pem);
    assert_eq!(terminate(&client, &base, "ex-1").await.unwrap().0, 200);
    running.shutdown().await;
}

/// Connect through `proxy` with `tls`; on success, declare and delete a queue of its own.
async fn amqps_round_trip(
    amqp_url: &str,
    proxy: &TlsProxy,
    host: &str,
    tls: lapin::tcp::OwnedTLSConfig,
) -> Result<(), lapin::Error> {
    let uri = amqps_url(amqp_url, host, proxy.port());
    assert!(uri.starts_with("amqps://"), "{uri}");
    let connection = tokio::time::timeout(
        Duration::from_secs(20),
        Connection::connect_with_config(
            &uri,
            ConnectionProperties::default(),
            tls,
            lapin::runtime::default_runtime()?,
        ),
    )
    .await
    .expect("connect (or fail) within 20 s")?;
    let channel = connection.create_channel().await?;
    let queue = format!("aomt_tls_{:016x}", fastrand::u64(..));
    let declared = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    assert_eq!(declared.name().as_str(), queue);
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "bye".into()).await?;
    Ok(())
}

#[tokio::test]
async fn amqps_through_the_tls_proxy_trusting_the_test_ca() {
    let env = TestEnv::new().await;
    let upstream = amqp_upstream(&env.amqp_url).await.expect("broker address");
    let kit = TlsKit::new();
    let proxy = kit.proxy(upstream, ClientAuth::None).await;

    amqps_round_trip(&env.amqp_url, &proxy, "127.0.0.1", kit.lapin_tls(false))
        .await
        .expect("amqps by IP");
    amqps_round_trip(&env.amqp_url, &proxy, "localhost", kit.lapin_tls(false))
        .await
        .expect("amqps by name");
    assert_eq!(proxy.handshakes(), 2);

    // Trusting only the wrong CA: refused at the handshake.
    let wrong = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(kit.wrong_ca.cert_pem.clone()),
    };
    let refused = amqps_round_trip(&env.amqp_url, &proxy, "127.0.0.1", wrong).await;
    assert!(refused.is_err(), "the wrong CA must not verify the proxy");
    assert_eq!(proxy.handshakes(), 2);
}

#[tokio::test]
async fn amqps_with_mutual_tls_wants_a_client_certificate_from_the_test_ca() {
    let env = TestEnv::new().await;
    let upstream = amqp_upstream(&env.amqp_url).await.expect("broker address");
    let kit = TlsKit::new();
    let proxy = kit.proxy(upstream, ClientAuth::Required).await;

    amqps_round_trip(&env.amqp_url, &proxy, "127.0.0.1", kit.lapin_tls(true))
        .await
        .expect("amqps with the test client certificate");
    assert_eq!((proxy.handshakes(), proxy.handshake_failures()), (1, 0));

    let refused = amqps_round_trip(&env.amqp_url, &proxy, "127.0.0.1", kit.lapin_tls(false)).await;
    assert!(refused.is_err(), "no client certificate, no connection");
    eventually("the proxy counted the failed handshake", || async {
        proxy.handshake_failures() == 1
    })
    .await;

    // A client certificate from another CA is refused too.
    let other = TlsKit::new();
    let foreign = lapin::tcp::OwnedTLSConfig {
        identity: Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: other.client.cert_pem.clone().into_bytes(),
            key: other.client.key_pem.clone().into_bytes(),
        }),
        cert_chain: Some(kit.ca.cert_pem.clone()),
    };
    let refused = amqps_round_trip(&env.amqp_url, &proxy, "127.0.0.1", foreign).await;
    assert!(refused.is_err(), "a client certificate from another CA");
    assert_eq!(proxy.handshakes(), 1);
}

#[tokio::test]
async fn the_kit_writes_its_pem_files_and_removes_them() {
    let kit = TlsKit::for_names(&["localhost", "127.0.0.1", "sandbox.test"]);
    let dir = kit.dir.clone();
    for pair in [&kit.ca, &kit.server, &kit.client, &kit.wrong_ca] {
        let cert = std::fs::read_to_string(&pair.cert_path).expect("certificate file");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        assert_eq!(cert, pair.cert_pem);
        let key = std::fs::read_to_string(&pair.key_path).expect("key file");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    }
    assert_ne!(kit.ca.cert_pem, kit.wrong_ca.cert_pem);
    // The server certificate holds the names asked for, the IP as an IP SAN.
    let config = kit.client_config(false);
    let running = kit.server.https_sandbox(&SandboxArgs::default()).await;
    for name in ["sandbox.test", "127.0.0.1"] {
        let tcp = tokio::net::TcpStream::connect(running.local_addr())
            .await
            .unwrap();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(server_name, tcp)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let tcp = tokio::net::TcpStream::connect(running.local_addr())
        .await
        .unwrap();
    let other = rustls::pki_types::ServerName::try_from("elsewhere.test").unwrap();
    assert!(
        tokio_rustls::TlsConnector::from(config)
            .connect(other, tcp)
            .await
            .is_err(),
        "a name the certificate does not hold"
    );
    running.shutdown().await;
    drop(kit);
    assert!(!dir.exists(), "the kit's directory is removed on drop");
}

/// `aom-terminator sandbox` with these arguments and variables must exit 2 with one line
/// on stderr that says `want`, without binding anything.
async fn sandbox_refused(args: &[&str], vars: &[(&str, &str)], want: &str) {
    let child = binary()
        .arg("sandbox")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(vars.iter().copied())
        .spawn()
        .expect("spawn the sandbox");
    let (code, output) = output(child).await;
    assert_eq!(code, Some(2), "{args:?} {vars:?}: {output}");
    assert_eq!(output.trim_end().lines().count(), 1, "one line: {output}");
    assert!(output.starts_with("error:"), "{output}");
    assert!(output.contains(want), "{want} in: {output}");
    assert!(!output.contains("PRIVATE KEY"), "{output}");
}

#[tokio::test]
async fn the_sandbox_binary_wants_both_tls_files_or_neither() {
    let kit = TlsKit::new();
    let cert = kit.server.cert_path.to_str().expect("UTF-8 path");
    let key = kit.server.key_path.to_str().expect("UTF-8 path");
    sandbox_refused(&["--tls-cert", cert], &[], "--tls-key").await;
    sandbox_refused(&["--tls-key", key], &[], "--tls-cert").await;
    sandbox_refused(&[], &[("SANDBOX_TLS_CERT", cert)], "--tls-key").await;
    sandbox_refused(&[], &[("SANDBOX_TLS_KEY", key)], "--tls-cert").await;
    // Both, but unusable: still a bad setting, said in one line, the key never shown.
    let missing = kit.dir.join("missing.pem");
    let missing = missing.to_str().expect("UTF-8 path");
    sandbox_refused(
        &["--tls-cert", missing, "--tls-key", key],
        &[],
        "--tls-cert: cannot read",
    )
    .await;
    let client_key = kit.client.key_path.to_str().expect("UTF-8 path");
    sandbox_refused(
        &["--tls-cert", cert, "--tls-key", client_key],
        &[],
        "TLS certificate and key",
    )
    .await;
    sandbox_refused(
        &["--tls-cert", key, "--tls-key", key],
        &[],
        "TLS certificate",
    )
    .await;
}
