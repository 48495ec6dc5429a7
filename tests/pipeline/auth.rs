//! Authentication end to end: token file rotation, IAM password tokens
//! (renewal, 401 storms, IAM outages), AK/SK signing, and configuration.

use crate::helpers::*;
use aom_terminator::sandbox::SandboxArgs;
use std::time::Duration;

pub const IAM_USER: &str = "ops-bot";
pub const IAM_PASSWORD: &str = "iam-pa55-word-9c1e";
pub const IAM_DOMAIN: &str = "acme";
pub const AK: &str = "AKSANDBOXEXAMPLE0001";
pub const SK: &str = "sk-sandbox-secret-5b7d0e";

/// A sandbox whose fake IAM issues tokens of `lifetime` to the test user.
pub fn iam_sandbox(lifetime: Duration) -> SandboxArgs {
    SandboxArgs {
        iam_user: Some(IAM_USER.to_owned()),
        iam_password: Some(IAM_PASSWORD.to_owned()),
        iam_domain: Some(IAM_DOMAIN.to_owned()),
        iam_token_lifetime: lifetime,
        ..SandboxArgs::default()
    }
}

fn iam_flags(env: &TestEnv) -> Vec<String> {
    iam_flags_with_home(env, "--iam-project-name", "cn-north-4")
}

/// The daemon's flags for the test user, with the home project (`flag`:
/// `--iam-project-name` or `--iam-project-id`).
pub fn iam_flags_with_home(env: &TestEnv, flag: &str, home: &str) -> Vec<String> {
    [
        "--iam-endpoint",
        &env.sandbox.base_url(),
        "--iam-user",
        IAM_USER,
        "--iam-password",
        IAM_PASSWORD,
        "--iam-domain",
        IAM_DOMAIN,
        flag,
        home,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A sandbox that checks AK/SK signatures made with the test keys.
pub fn aksk_sandbox() -> SandboxArgs {
    SandboxArgs {
        ak: Some(AK.to_owned()),
        sk: Some(SK.to_owned()),
        ..SandboxArgs::default()
    }
}

pub fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn a_rotated_token_file_is_used_without_a_restart() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        expected_token: Some("token-one".to_owned()),
        ..SandboxArgs::default()
    })
    .await;
    let dir = std::env::temp_dir().join(format!("aomt-{:x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("token");
    std::fs::write(&file, "token-one\n").expect("write token");
    let file_flag = file.display().to_string();
    let daemon = env.start_daemon_with_auth(&["--aom-auth-token-file", &file_flag], &[]);
    publish_singles(&env, "first-", 5).await;
    env.wait_outcomes(5).await;

    // Rotate: the API now wants the new token, and the file holds it.
    env.sandbox
        .sandbox()
        .set_expected_token(Some("token-two".to_owned()));
    std::fs::write(&file, "token-two\n").expect("rotate token");
    publish_singles(&env, "second-", 5).await;
    env.wait_outcomes(10).await;
    assert_eq!(
        succeeded(&env).await,
        10,
        "nothing failed across the rotation"
    );
    daemon.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn iam_tokens_are_obtained_and_renewed_before_they_expire() {
    let env = TestEnv::with_sandbox(iam_sandbox(Duration::from_secs(4))).await;
    let flags = iam_flags(&env);
    let mut auth = refs(&flags);
    auth.extend(["--iam-renew-before", "2s"]);
    let daemon = env.start_daemon_with_auth(&auth, &[]);
    // Requests trickle in for longer than two token lifetimes.
    for i in 0..45 {
        env.publish(&request(&format!("t{i}"), &format!("ex-t{i}")), None)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_outcomes(45).await;
    assert_eq!(succeeded(&env).await, 45);
    let stats = env.sandbox.sandbox().stats();
    assert!(
        stats.iam_calls >= 3,
        "renewed, not reused: {} IAM calls",
        stats.iam_calls
    );
    assert_eq!(
        stats.by_status.get(&401),
        None,
        "renewal ahead of expiry: no call ever carried an expired token"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_401_storm_under_concurrency_64_costs_one_iam_call() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(300),
        ..iam_sandbox(Duration::from_secs(24 * 3600))
    })
    .await;
    let flags = iam_flags(&env);
    let daemon = env.start_daemon_with_auth(&refs(&flags), &["--concurrency", "64"]);
    let elements: Vec<String> = (0..400)
        .map(|i| request(&format!("s{i}"), &format!("ex-s{i}")))
        .collect();
    env.publish(&batch(&elements), None).await;
    eventually("64 calls in flight", || async {
        env.sandbox.sandbox().stats().in_flight == 64
    })
    .await;
    assert_eq!(env.sandbox.sandbox().stats().iam_calls, 1);
    // IAM invalidates the token: every call in flight comes back 401.
    env.sandbox.sandbox().revoke_iam_tokens();
    env.wait_outcomes(400).await;
    assert_eq!(succeeded(&env).await, 400);
    let stats = env.sandbox.sandbox().stats();
    assert!(
        stats.by_status.get(&401).copied().unwrap_or(0) >= 64,
        "the storm happened: {stats:?}"
    );
    assert_eq!(stats.iam_calls, 2, "one renewal for the whole storm");
    daemon.stop().await;
}

#[tokio::test]
async fn iam_down_pauses_and_resumes_by_itself() {
    let env = TestEnv::with_sandbox(iam_sandbox(Duration::from_secs(24 * 3600))).await;
    env.sandbox.sandbox().set_iam_available(false);
    publish_singles(&env, "d", 5).await;
    let flags = iam_flags(&env);
    let daemon = env.start_daemon_with_auth(&refs(&flags), &["--max-attempts", "1"]);
    eventually("IAM probed more than once", || async {
        env.sandbox.sandbox().stats().iam_calls >= 2
    })
    .await;
    assert_eq!(
        env.outcomes().await,
        0,
        "no request fails because IAM is down"
    );
    assert_eq!(
        env.sandbox.sandbox().stats().calls,
        0,
        "no call without a token"
    );
    env.sandbox.sandbox().set_iam_available(true);
    env.wait_outcomes(5).await;
    assert_eq!(succeeded(&env).await, 5);
    daemon.stop().await;
}

#[tokio::test]
async fn aksk_signed_calls_are_accepted() {
    let env = TestEnv::with_sandbox(aksk_sandbox()).await;
    let elements = vec![
        request("plain", "ex-plain"),
        // Ids that need percent-encoding in the path and the signature.
        request("encoded", "ex é+%*~ /x"),
    ];
    env.publish(&batch(&elements), None).await;
    let daemon = env.start_daemon_with_auth(
        &[
            "--cloud-sdk-ak",
            AK,
            "--cloud-sdk-sk",
            SK,
            "--cloud-sdk-security-token",
            "temp-tok",
        ],
        &[],
    );
    env.wait_outcomes(2).await;
    assert_eq!(succeeded(&env).await, 2);
    daemon.stop().await;
}

#[tokio::test]
async fn a_wrong_sk_gets_401_and_fails_nothing() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        ak: Some(AK.to_owned()),
        sk: Some(SK.to_owned()),
        ..SandboxArgs::default()
    })
    .await;
    publish_singles(&env, "w", 3).await;
    let daemon = env.start_daemon_with_auth(
        &["--cloud-sdk-ak", AK, "--cloud-sdk-sk", "not-the-secret"],
        &["--max-attempts", "1"],
    );
    eventually("401 answers", || async {
        env.sandbox
            .sandbox()
            .stats()
            .by_status
            .get(&401)
            .copied()
            .unwrap_or(0)
            >= 3
    })
    .await;
    assert_eq!(env.outcomes().await, 0, "bad credentials fail no request");
    assert_eq!(
        env.ready_requests().await,
        0,
        "and the messages are held or parked, not requeued"
    );
    daemon.stop().await;
    // The prober's message returns to the queue; the others were parked.
    eventually("returned to the queue or parked on shutdown", || async {
        env.ready_requests().await + env.parked_requests().await == 3
    })
    .await;
}

#[tokio::test]
async fn auth_settings_must_name_exactly_one_mode() {
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[], "no authentication configured"),
        (
            &[("AOM_AUTH_TOKEN", "t"), ("IAM_USER", "u")],
            "conflicting authentication settings",
        ),
        (
            &[
                ("AOM_AUTH_TOKEN", "t"),
                ("CLOUD_SDK_AK", "ak"),
                ("CLOUD_SDK_SK", "sk-secret-1"),
            ],
            "conflicting authentication settings",
        ),
        (
            &[("CLOUD_SDK_AK", "ak")],
            "needs both CLOUD_SDK_AK and CLOUD_SDK_SK",
        ),
        (
            &[
                ("IAM_ENDPOINT", "https://iam.example.com"),
                ("IAM_USER", "u"),
                ("IAM_DOMAIN", "d"),
                ("IAM_PROJECT_NAME", "p"),
            ],
            "IAM_PASSWORD",
        ),
        (
            &[("AOM_AUTH_TOKEN_FILE", "/nonexistent/token")],
            "/nonexistent/token",
        ),
    ];
    for (vars, want) in cases {
        let mut vars = vars.to_vec();
        vars.push(("AOM_ENDPOINT", "http://127.0.0.1:9"));
        assert_refused_in_one_line(&vars, want, "sk-secret-1").await;
    }
    // The SDKs' own variable names work too.
    let env = TestEnv::with_sandbox(SandboxArgs {
        ak: Some(AK.to_owned()),
        sk: Some(SK.to_owned()),
        ..SandboxArgs::default()
    })
    .await;
    env.publish(&request("sdk-names", "ex-sdk"), None).await;
    let mut child = binary()
        .arg("run")
        .envs(env.binary_env_without_auth())
        .env("HUAWEICLOUD_SDK_AK", AK)
        .env("HUAWEICLOUD_SDK_SK", SK)
        .spawn()
        .expect("spawn");
    env.wait_outcomes(1).await;
    assert_eq!(succeeded(&env).await, 1);
    let _ = child.start_kill();
}

/// Secrets appear in none of the daemon's output, across runs where each
/// kind of credential is refused.
#[tokio::test]
async fn no_secret_reaches_the_output() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        expected_token: Some("the-api-wants-this".to_owned()),
        ak: Some(AK.to_owned()),
        sk: Some("the-sandbox-sk".to_owned()),
        ..iam_sandbox(Duration::from_secs(3600))
    })
    .await;
    publish_singles(&env, "x", 2).await;
    let token = "tok-3e8a1f-never-print";
    let password = "pw-0b7c2d-never-print";
    let sk = "sk-9d4e6a-never-print";
    let base = env.binary_env_without_auth();
    let runs: [Vec<(&str, String)>; 3] = [
        vec![("AOM_AUTH_TOKEN", token.to_owned())],
        vec![
            ("IAM_ENDPOINT", env.sandbox.base_url()),
            ("IAM_USER", IAM_USER.to_owned()),
            ("IAM_PASSWORD", password.to_owned()),
            ("IAM_DOMAIN", IAM_DOMAIN.to_owned()),
            (
                "IAM_PROJECT_ID",
                "0123456789abcdef0123456789abcdef".to_owned(),
            ),
        ],
        vec![
            ("CLOUD_SDK_AK", AK.to_owned()),
            ("CLOUD_SDK_SK", sk.to_owned()),
        ],
    ];
    for auth in runs {
        let before = env.sandbox.sandbox().stats();
        let child = binary()
            .arg("run")
            .envs(base.clone())
            .envs(auth)
            .env("RUST_LOG", "debug")
            .env("SHUTDOWN_GRACE", "1")
            .spawn()
            .expect("spawn");
        // Wait until this run's credentials were refused at least twice.
        eventually("refusals", || async {
            let now = env.sandbox.sandbox().stats();
            let refused = |s: &aom_terminator::sandbox::SandboxStats| {
                s.by_status.get(&401).copied().unwrap_or(0) + s.iam_calls
            };
            refused(&now) >= refused(&before) + 2
        })
        .await;
        let pid = child.id().expect("pid").to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let (code, out) = output(child).await;
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("Pausing"), "the refusal is logged: {out}");
        for secret in [token, password, sk, "guest:guest"] {
            assert!(!out.contains(secret), "{secret} leaked:\n{out}");
        }
    }
    assert_eq!(
        env.outcomes().await,
        0,
        "refused credentials failed nothing"
    );
}
