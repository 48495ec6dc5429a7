//! TLS from the daemon's side (issue #14), for real: the broker through the
//! kit's TLS-terminating proxy (`amqps://`), the AOM API on the sandbox's
//! TLS mode, Postgres on its own TLS where the server has it on, and the
//! management API. Each peer: success with the private CA, failure without
//! it or with the wrong one (exit 2, one line, no secret), and for Postgres
//! `verify-full` against the wrong host name.

use crate::auth::{AK, SK, aksk_sandbox};
use crate::helpers::*;
use crate::tls::*;
use aom_terminator::sandbox::SandboxArgs;
use std::time::Duration;

/// The password the broker URLs below carry: it must never be printed.
const BROKER_PASSWORD: &str = "guest";

/// Run `aom-terminator run` with the test's settings and `vars` over them:
/// it must exit 2 with one line that says `want` and shows no password.
async fn refused_at_start(env: &TestEnv, vars: &[(&str, String)], want: &str) {
    let mut all: Vec<(&str, String)> = env.binary_env();
    all.extend(vars.iter().cloned());
    assert_run_refused(&all, want, &format!(":{BROKER_PASSWORD}@")).await;
}

/// One request through the in-process daemon with `extra` settings.
async fn one_request_succeeds(env: &TestEnv, prefix: &str, extra: &[&str]) {
    let daemon = env.start_daemon(extra);
    let id = format!("{prefix}-1");
    env.publish(&request(&id, &format!("ex-{prefix}-1")), None)
        .await;
    env.wait_outcome_of(&id).await;
    assert_eq!(env.outcome_of(&id).await.outcome, "succeeded");
    daemon.stop().await;
}

#[tokio::test]
async fn amqps_with_a_private_ca_and_mutual_tls() {
    install_crypto_provider();
    let env = TestEnv::new().await;
    let kit = TlsKit::new();
    let upstream = amqp_upstream(&env.amqp_url).await.expect("broker address");
    let proxy = kit.proxy(upstream, ClientAuth::None).await;
    let amqps = amqps_url(&env.amqp_url, "localhost", proxy.port());
    let ca = kit.ca.cert_path.display().to_string();

    // The private CA: the daemon consumes over TLS.
    one_request_succeeds(&env, "tls", &["--amqp-url", &amqps, "--amqp-ca-file", &ca]).await;
    assert!(
        proxy.handshakes() > 0,
        "the daemon came through the TLS proxy"
    );

    // Without it, or with the wrong one: one line at start, exit 2.
    let url = ("AMQP_URL", amqps.clone());
    refused_at_start(&env, std::slice::from_ref(&url), "TLS failed").await;
    let wrong = ("AMQP_CA_FILE", kit.wrong_ca.cert_path.display().to_string());
    refused_at_start(&env, &[url.clone(), wrong], "TLS failed").await;
    // TLS on one side only: plain AMQP to the TLS port.
    let plain = amqps.replacen("amqps://", "amqp://", 1);
    refused_at_start(&env, &[("AMQP_URL", plain)], "the broker at localhost").await;

    // The operator tools read the same settings.
    let file = std::env::temp_dir().join(format!("aomt-tls-{:x}.jsonl", fastrand::u64(..)));
    std::fs::write(&file, format!("{}\n", request("tls-enq", "ex-tls-enq"))).expect("write");
    let enqueue = binary()
        .args(["enqueue", &file.display().to_string()])
        .envs(env.binary_env())
        .env("AMQP_URL", &amqps)
        .env("AMQP_CA_FILE", &ca)
        .spawn()
        .expect("spawn");
    let (code, out) = output(enqueue).await;
    assert_eq!(code, Some(0), "enqueue over amqps: {out}");
    assert_eq!(env.ready_requests().await, 1);

    // Mutual TLS: the broker wants a client certificate from the CA.
    let mtls = kit.proxy(upstream, ClientAuth::Required).await;
    let amqps = amqps_url(&env.amqp_url, "localhost", mtls.port());
    let cert = kit.client.cert_path.display().to_string();
    let key = kit.client.key_path.display().to_string();
    one_request_succeeds(
        &env,
        "mtls",
        &[
            "--amqp-url",
            &amqps,
            "--amqp-ca-file",
            &ca,
            "--amqp-client-cert",
            &cert,
            "--amqp-client-key",
            &key,
        ],
    )
    .await;
    refused_at_start(
        &env,
        &[("AMQP_URL", amqps), ("AMQP_CA_FILE", ca.clone())],
        "TLS failed",
    )
    .await;
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn the_aom_api_over_https_with_a_private_ca() {
    install_crypto_provider();
    let kit = TlsKit::new();
    let env = TestEnv::new().await;
    let sandbox = kit
        .server
        .https_sandbox(&SandboxArgs {
            expected_token: Some(TOKEN.to_owned()),
            ..SandboxArgs::default()
        })
        .await;
    let endpoint = sandbox.base_url();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let ca = kit.ca.cert_path.display().to_string();
    let settings = ["--aom-endpoint", &endpoint, "--aom-ca-file", &ca];
    one_request_succeeds(&env, "https", &settings).await;
    let stats = sandbox.sandbox().stats();
    assert_eq!(stats.calls, 1);
    // The sandbox offers HTTP/2, but the calls keep to HTTP/1.1 unless told.
    let versions = |pairs: &[(&str, u64)]| {
        pairs
            .iter()
            .map(|&(v, n)| (v.to_owned(), n))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(stats.calls_by_version, versions(&[("HTTP/1.1", 1)]));

    let auto = [&settings[..], &["--aom-http-version", "auto"]].concat();
    one_request_succeeds(&env, "https-auto", &auto).await;
    let stats = sandbox.sandbox().stats();
    assert_eq!(
        stats.calls_by_version,
        versions(&[("HTTP/1.1", 1), ("HTTP/2.0", 1)])
    );
}

#[tokio::test]
async fn aksk_signed_calls_over_http2_when_asked() {
    install_crypto_provider();
    let kit = TlsKit::new();
    let env = TestEnv::new().await;
    let sandbox = kit.server.https_sandbox(&aksk_sandbox()).await;
    let endpoint = sandbox.base_url();
    let ca = kit.ca.cert_path.display().to_string();
    let daemon = env.start_daemon_with_auth(
        &["--cloud-sdk-ak", AK, "--cloud-sdk-sk", SK],
        &[
            "--aom-endpoint",
            &endpoint,
            "--aom-ca-file",
            &ca,
            "--aom-http-version",
            "auto",
        ],
    );
    env.publish(&request("h2-1", "ex-h2-1"), None).await;
    env.wait_outcome_of("h2-1").await;
    daemon.stop().await;
    // HTTP/2 has no Host header: the signed host is the call's authority.
    assert_eq!(env.outcome_of("h2-1").await.outcome, "succeeded");
    let stats = sandbox.sandbox().stats();
    assert_eq!(
        stats.calls_by_version.get("HTTP/2.0"),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!(stats.by_status.get(&200), Some(&1), "{stats:?}");
}

#[tokio::test]
async fn a_certificate_the_api_presents_that_fails_pauses_and_resumes_by_itself() {
    install_crypto_provider();
    let kit = TlsKit::new();
    let env = TestEnv::new().await;
    // The API behind the kit's TLS proxy, first with a certificate for
    // another name: verification fails.
    let plain = env.sandbox.local_addr();
    let wrong_name = kit.issue_server("elsewhere", &["elsewhere.example"]);
    let proxy = TlsProxy::start(server_config(&wrong_name, None), plain)
        .await
        .expect("proxy");
    let port = proxy.port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let ca = kit.ca.cert_path.display().to_string();
    let addr = free_addr();
    let readyz = format!("http://{addr}/readyz");
    let metrics = format!("http://{addr}/metrics");
    publish_singles(&env, "cert", 5).await;
    let daemon = env.start_daemon(&[
        "--aom-endpoint",
        &endpoint,
        "--aom-ca-file",
        &ca,
        "--metrics-addr",
        &addr.to_string(),
    ]);
    eventually("paused on the certificate", || async {
        http_get(&readyz).await.0 == 503
            && http_get(&metrics)
                .await
                .1
                .lines()
                .any(|l| l == "aom_terminator_paused 1")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.outcomes().await, 0, "nothing failed, nothing finished");
    assert_eq!(
        env.sandbox.sandbox().stats().calls,
        0,
        "no call got through"
    );

    // The right certificate on the same address: the probe gets through.
    drop(proxy);
    let _proxy = loop {
        match TlsProxy::start_on(port, server_config(&kit.server, None), plain).await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    env.wait_outcomes(5).await;
    let failed = env
        .count("SELECT count(*) FROM termination_outcomes WHERE outcome <> 'succeeded'")
        .await;
    assert_eq!(failed, 0, "the certificate failure failed no request");
    eventually("ready again", || async { http_get(&readyz).await.0 == 200 }).await;
    daemon.stop().await;
}

#[tokio::test]
async fn api_calls_go_through_https_proxy_settings() {
    // HTTP_PROXY routes the API calls: the endpoint's name is never
    // resolved here, the proxy (the sandbox itself, which serves the
    // absolute-form request by its path) answers.
    let env = TestEnv::new().await;
    publish_singles(&env, "via", 3).await;
    let child = binary()
        .arg("run")
        .envs(env.binary_env())
        .env("AOM_ENDPOINT", "http://aom.proxied.invalid")
        .env("HTTP_PROXY", env.sandbox.base_url())
        .env("SHUTDOWN_GRACE", "1")
        .spawn()
        .expect("spawn");
    env.wait_outcomes(3).await;
    let succeeded = env
        .count("SELECT count(*) FROM termination_outcomes WHERE outcome = 'succeeded'")
        .await;
    assert_eq!(succeeded, 3);
    assert_eq!(env.sandbox.sandbox().stats().calls, 3);
    let (code, out) = terminate(child).await;
    assert_eq!(code, Some(0), "{out}");
}

/// A forward proxy that answers `CONNECT` by tunnelling to `upstream`,
/// whatever host the client asked for; it counts the tunnels it opened.
struct ConnectProxy {
    addr: std::net::SocketAddr,
    tunnels: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    async fn start(upstream: std::net::SocketAddr) -> ConnectProxy {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let tunnels = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = std::sync::Arc::clone(&tunnels);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counted = std::sync::Arc::clone(&counted);
                tokio::spawn(async move {
                    let mut client = BufReader::new(client);
                    let mut line = String::new();
                    if client.read_line(&mut line).await.is_err() || !line.starts_with("CONNECT ") {
                        return;
                    }
                    // The rest of the request head.
                    loop {
                        let mut header = String::new();
                        match client.read_line(&mut header).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if header == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client.into_inner();
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        ConnectProxy {
            addr,
            tunnels,
            task,
        }
    }

    fn tunnels(&self) -> u64 {
        self.tunnels.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn https_api_calls_go_through_https_proxy_unless_no_proxy_says_otherwise() {
    install_crypto_provider();
    let kit = TlsKit::new();
    let env = TestEnv::new().await;
    // The API under a name that resolves nowhere: only the proxy can reach it.
    const HOST: &str = "aom.tunnelled.invalid";
    let named = kit.issue_server("tunnelled", &[HOST]);
    let sandbox = named
        .https_sandbox(&SandboxArgs {
            expected_token: Some(TOKEN.to_owned()),
            ..SandboxArgs::default()
        })
        .await;
    let proxy = ConnectProxy::start(sandbox.local_addr()).await;
    let endpoint = format!("https://{HOST}:{}", sandbox.local_addr().port());
    let env = &env;
    let run = |prefix: &'static str, vars: &[(&str, &str)]| {
        let mut cmd = binary();
        cmd.arg("run")
            .envs(env.binary_env())
            .env("AOM_ENDPOINT", &endpoint)
            .env("AOM_CA_FILE", kit.ca.cert_path.display().to_string())
            .env("HTTPS_PROXY", format!("http://{}", proxy.addr))
            .env("SHUTDOWN_GRACE", "1")
            .envs(vars.iter().copied());
        async move {
            let child = cmd.spawn().expect("spawn");
            let id = format!("{prefix}-1");
            env.publish(&request(&id, &format!("ex-{prefix}-1")), None)
                .await;
            env.wait_outcome_of(&id).await;
            let (code, out) = terminate(child).await;
            assert_eq!(code, Some(0), "{out}");
            env.outcome_of(&id).await.outcome
        }
    };
    // Through the proxy: the TLS is end to end, the proxy only tunnels.
    assert_eq!(run("via", &[]).await, "succeeded");
    assert_eq!(proxy.tunnels(), 1);
    let stats = sandbox.sandbox().stats();
    assert_eq!(stats.calls, 1);
    // Through a proxy too, HTTP/1.1 unless AOM_HTTP_VERSION says otherwise.
    assert_eq!(stats.calls_by_version.get("HTTP/1.1"), Some(&1));
    assert_eq!(
        run("via-h2", &[("AOM_HTTP_VERSION", "auto")]).await,
        "succeeded"
    );
    assert_eq!(proxy.tunnels(), 2);
    let stats = sandbox.sandbox().stats();
    assert_eq!(
        stats.calls_by_version.get("HTTP/2.0"),
        Some(&1),
        "{stats:?}"
    );
    // NO_PROXY names the host: no tunnel; the name resolves nowhere, so the
    // calls fail to connect and the attempts run out.
    assert_eq!(
        run("direct", &[("NO_PROXY", HOST)]).await,
        "failed_retries_exhausted"
    );
    assert_eq!(proxy.tunnels(), 2, "NO_PROXY kept the calls off the proxy");
    assert_eq!(sandbox.sandbox().stats().calls, 2);
}

#[tokio::test]
async fn postgres_over_its_own_tls() {
    let env = TestEnv::new().await;
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&env.db)
        .await
        .expect("SHOW ssl");
    // Debian's snakeoil certificate (CN localhost), where Debian's Postgres
    // serves it; testcontainers' image has TLS off.
    let root = std::path::Path::new("/etc/ssl/certs/ssl-cert-snakeoil.pem");
    if ssl != "on" || !root.exists() {
        eprintln!(
            "skipped: the test Postgres has TLS off (SHOW ssl = {ssl}) or no snakeoil certificate"
        );
        return;
    }
    let root = root.display();
    let with = |host: &str, params: &str| {
        let url = url::Url::parse(&env.database_url).expect("database url");
        let mut url = url.clone();
        url.set_host(Some(host)).expect("host");
        format!("{url}?application_name=aomt-tls&{params}")
    };
    // verify-full with the server's own certificate as the CA, by its name.
    let full = with(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    one_request_succeeds(&env, "pg", &["--database-url", &full]).await;
    // The audit's connections are encrypted, seen from the server.
    let daemon = env.start_daemon(&["--database-url", &full]);
    env.publish(&request("pg-2", "ex-pg-2"), None).await;
    env.wait_outcomes(2).await;
    let admin = env.admin_pool().await;
    let (ssl, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'aomt-tls'",
    )
    .fetch_one(&admin)
    .await
    .expect("pg_stat_ssl");
    assert!(
        ssl > 0 && plain == 0,
        "the audit's connections: {ssl} with TLS, {plain} without"
    );
    daemon.stop().await;

    // verify-full against the wrong name; verify-ca without the CA.
    let wrong_host = with(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    refused_at_start(&env, &[("DATABASE_URL", wrong_host)], "TLS failed").await;
    let unknown = with("localhost", "sslmode=verify-ca");
    refused_at_start(&env, &[("DATABASE_URL", unknown)], "TLS failed").await;
    // `require`, and a client certificate (this server does not ask for one,
    // so this shows only that sslcert and sslkey are read and accepted).
    install_crypto_provider();
    let kit = TlsKit::new();
    let client = with(
        "localhost",
        &format!(
            "sslmode=require&sslcert={}&sslkey={}",
            kit.client.cert_path.display(),
            kit.client.key_path.display()
        ),
    );
    let migrate = binary()
        .arg("migrate")
        .env("DATABASE_URL", &client)
        .spawn()
        .expect("spawn");
    let (code, out) = output(migrate).await;
    assert_eq!(
        code,
        Some(0),
        "migrate over TLS with a client certificate: {out}"
    );
}

#[tokio::test]
async fn the_management_api_is_not_sent_credentials_in_clear() {
    let env = TestEnv::new().await;
    let report = binary()
        .args(["report", "--format", "json"])
        .envs(env.binary_env_without_auth())
        .env("RABBITMQ_MANAGEMENT_URL", "http://mq.example.invalid:15672")
        .spawn()
        .expect("spawn");
    let (code, out) = output(report).await;
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(out.contains("https://"), "says how to fix it: {out}");
    assert!(!out.contains(BROKER_PASSWORD), "{out}");
}

#[tokio::test]
async fn the_management_api_over_https_with_the_broker_ca() {
    install_crypto_provider();
    let env = TestEnv::new().await;
    let kit = TlsKit::new();
    let management: std::net::SocketAddr = "127.0.0.1:15672".parse().expect("addr");
    let proxy = kit.proxy(management, ClientAuth::None).await;
    let url = format!("https://localhost:{}", proxy.port());
    let report = |ca: Option<String>| {
        let mut cmd = binary();
        cmd.args(["report", "--format", "json"])
            .envs(env.binary_env_without_auth())
            .env("RABBITMQ_MANAGEMENT_URL", &url);
        if let Some(ca) = ca {
            cmd.env("AMQP_CA_FILE", ca);
        }
        async move {
            let out = cmd.output().await.expect("run report");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{stderr}");
            let json: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("report's JSON: {e}; stderr: {stderr}"));
            json["pending"].clone()
        }
    };
    let migrate = binary()
        .arg("migrate")
        .env("DATABASE_URL", &env.database_url)
        .spawn()
        .expect("spawn");
    assert_eq!(output(migrate).await.0, Some(0), "the audit schema");
    let plugin_on = tokio::net::TcpStream::connect(management).await.is_ok();
    let ca = kit.ca.cert_path.display().to_string();
    let untrusted = report(None).await;
    // Without the CA the certificate is not trusted: the unacked count is
    // unknown. With it, it is known where the plugin is on.
    assert!(untrusted["unacked"].is_null(), "{untrusted}");
    if plugin_on {
        eprintln!("management plugin on: checking the count over https");
        // The management API's numbers for a new queue lag a few seconds.
        eventually("the unacked count over https", || async {
            report(Some(ca.clone())).await["unacked"].is_u64()
        })
        .await;
        assert!(proxy.handshakes() > 0);
    } else {
        eprintln!("management plugin off: checking that the count is unknown over https too");
        let trusted = report(Some(ca)).await;
        assert!(trusted["unacked"].is_null(), "{trusted}");
    }
}

#[tokio::test]
async fn a_start_fails_fast_on_what_only_a_person_can_fix_and_retries_the_rest() {
    let env = TestEnv::new().await;
    let amqp = url::Url::parse(&env.amqp_url).expect("amqp url");
    let with = |f: &dyn Fn(&mut url::Url)| {
        let mut u = amqp.clone();
        f(&mut u);
        u.to_string()
    };
    let wrong_password = with(&|u| {
        let _ = u.set_password(Some("not-the-password"));
    });
    refused_at_start(
        &env,
        &[("AMQP_URL", wrong_password)],
        "the broker refused the credentials",
    )
    .await;
    let no_vhost = with(&|u| u.set_path("/aomt-no-such-vhost"));
    refused_at_start(
        &env,
        &[("AMQP_URL", no_vhost)],
        "the broker refused the vhost",
    )
    .await;
    let database = url::Url::parse(&env.database_url).expect("database url");
    let mut no_db = database.clone();
    no_db.set_path("/aomt_no_such_database");
    refused_at_start(
        &env,
        &[("DATABASE_URL", no_db.to_string())],
        "no such database",
    )
    .await;
    let mut no_role = database.clone();
    let _ = no_role.set_username("aomt_no_such_role");
    refused_at_start(&env, &[("DATABASE_URL", no_role.to_string())], "refused").await;

    // A broker that is not there (yet) is waited for, not given up on.
    let child = binary()
        .arg("run")
        .envs(env.binary_env())
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, out) = terminate(child).await;
    assert_eq!(code, Some(0), "still retrying when stopped: {out}");
    let warnings = out
        .lines()
        .filter(|l| l.contains("broker unavailable"))
        .count();
    assert_eq!(warnings, 1, "the first failure logged once: {out}");
}
