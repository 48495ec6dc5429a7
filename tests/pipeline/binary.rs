//! The real binary: signals, exit codes, and what it prints.

use crate::helpers::*;

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_leaves_the_rest_queued() {
    let env = TestEnv::new().await;
    for ex in ["slow-1500-a", "slow-1500-b", "slow-1500-c"] {
        env.publish(&request(ex, ex), None).await;
    }
    // These cannot finish within the grace period.
    for ex in ["slow-60000-x", "slow-60000-y"] {
        env.publish(&request(ex, ex), None).await;
    }
    let child = binary()
        .arg("run")
        .envs(env.binary_env())
        .env("SHUTDOWN_GRACE", "4s")
        .env("HTTP_TIMEOUT_MS", "120000")
        .env("RUST_LOG", "debug")
        .spawn()
        .expect("spawn the daemon");
    eventually("five calls in flight", || async {
        env.sandbox.sandbox().stats().in_flight == 5
    })
    .await;
    let pid = child.id().expect("pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let (code, logs) = output(child).await;
    assert_eq!(code, Some(0), "clean exit on SIGTERM; logs:\n{logs}");

    for id in ["slow-1500-a", "slow-1500-b", "slow-1500-c"] {
        assert_eq!(env.outcome_of(id).await.outcome, "succeeded", "{id}");
    }
    assert_eq!(
        env.outcomes().await,
        3,
        "unfinished requests have no outcome"
    );
    // The unfinished ones go back to the queue for the next daemon.
    eventually("two messages back in the queue", || async {
        env.ready_requests().await == 2
    })
    .await;
    assert!(!logs.contains(TOKEN), "the token leaked into the logs");
    assert!(
        !logs.contains("guest:guest"),
        "the broker password leaked into the logs"
    );
}

#[tokio::test]
async fn misconfiguration_exits_2_with_one_clear_line() {
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("AOM_AUTH_TOKEN", "t")], "--aom-endpoint"),
        (
            &[
                ("AOM_ENDPOINT", "http://x"),
                ("AOM_AUTH_TOKEN", "t"),
                ("CONCURRENCY", "abc"),
            ],
            "--concurrency",
        ),
        (
            &[
                ("AOM_ENDPOINT", "http://x"),
                ("AOM_AUTH_TOKEN", "t"),
                ("CONCURRENCY", "0"),
            ],
            "CONCURRENCY",
        ),
        (
            &[
                ("AOM_ENDPOINT", "http://x"),
                ("AOM_AUTH_TOKEN", "t"),
                ("SHUTDOWN_GRACE", "soon"),
            ],
            "--shutdown-grace",
        ),
        // An empty variable is unset: CONCURRENCY="" is not the error here.
        (
            &[
                ("AOM_ENDPOINT", "not a url"),
                ("AOM_AUTH_TOKEN", "s3cret-tok"),
                ("CONCURRENCY", ""),
            ],
            "AOM_ENDPOINT",
        ),
    ];
    for (vars, names) in cases {
        assert_refused_in_one_line(vars, names, "s3cret-tok").await;
    }
}

#[tokio::test]
async fn metrics_and_health_are_served_during_a_run() {
    let env = TestEnv::new().await;
    let addr = free_addr();
    let addr_flag = addr.to_string();
    let daemon = env.start_daemon(&["--metrics-addr", &addr_flag]);
    let elements: Vec<String> = (0..30)
        .map(|i| {
            let ex = if i < 3 {
                format!("e404-{i}")
            } else {
                format!("ex-{i}")
            };
            request(&format!("m{i}"), &ex)
        })
        .collect();
    env.publish(&batch(&elements), None).await;
    env.wait_outcomes(30).await;
    let base = format!("http://{addr}");
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200);
    eventually("ready", || async {
        http_get(&format!("{base}/readyz")).await.0 == 200
    })
    .await;
    eventually("counters caught up", || async {
        let (status, text) = http_get(&format!("{base}/metrics")).await;
        status == 200
            && metric(
                &text,
                r#"aom_terminator_requests_total{outcome="succeeded"}"#,
            ) == Some(27.0)
    })
    .await;
    let (_, text) = http_get(&format!("{base}/metrics")).await;
    assert_eq!(
        metric(
            &text,
            r#"aom_terminator_requests_total{outcome="failed_permanent"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, r#"aom_terminator_api_calls_total{status="200"}"#),
        Some(27.0)
    );
    assert_eq!(
        metric(&text, r#"aom_terminator_api_calls_total{status="404"}"#),
        Some(3.0)
    );
    assert_eq!(metric(&text, "aom_terminator_attempts_total"), Some(30.0));
    assert_eq!(
        metric(&text, "aom_terminator_api_latency_seconds_count"),
        Some(30.0)
    );
    assert_eq!(metric(&text, "aom_terminator_in_flight"), Some(0.0));
    assert!(metric(&text, "aom_terminator_audit_write_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(metric(&text, "aom_terminator_dedupe_lookup_seconds_count").unwrap_or(0.0) >= 1.0);
    daemon.stop().await;

    // A taken address is a start-up error.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let cfg = env.daemon_config(&["--metrics-addr", &taken_addr]);
    let result = aom_terminator::daemon::run(cfg, std::future::pending()).await;
    let err = result.expect_err("the port is taken");
    assert!(err.to_string().contains("METRICS_ADDR"), "{err}");
}

#[tokio::test]
async fn run_refuses_a_concurrency_its_open_files_cannot_hold() {
    // A hard limit of 256 open files (the binary raises its soft limit of
    // 64 to it, so the message names 256): 512 calls would fail to connect.
    let under_limit = |concurrency: &str| {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.args([
            "-c",
            "ulimit -Sn 64 && ulimit -Hn 256 && exec \"$0\" run",
            env!("CARGO_BIN_EXE_aom-terminator"),
        ])
        .env_clear()
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("AOM_ENDPOINT", "http://127.0.0.1:9")
        .env("AOM_AUTH_TOKEN", "t")
        .env("CONCURRENCY", concurrency)
        .env("METRICS_ADDR", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
        cmd.spawn().expect("spawn")
    };
    let (code, out) = output(under_limit("512")).await;
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(
        out.contains("CONCURRENCY=512") && out.contains("open only 256"),
        "{out}"
    );
}
