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
        let child = binary()
            .arg("run")
            .envs(vars.iter().copied())
            .spawn()
            .expect("spawn");
        let (code, out) = output(child).await;
        assert_eq!(code, Some(2), "{vars:?}: {out}");
        assert_eq!(
            out.trim().lines().count(),
            1,
            "one line for {vars:?}: {out}"
        );
        assert!(out.contains(names), "{vars:?} should name {names}: {out}");
        assert!(
            !out.contains("panicked") && !out.contains("s3cret-tok"),
            "{out}"
        );
    }
}
