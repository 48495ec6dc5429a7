//! The real binary: signals, exit codes, and what it prints.

use crate::helpers::*;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

pub fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aom-terminator"));
    // Only what each test sets: no stray settings from the developer's shell.
    for var in [
        "AMQP_URL",
        "DATABASE_URL",
        "AOM_ENDPOINT",
        "AOM_AUTH_TOKEN",
        "TERMINATE_QUEUE",
        "DEAD_LETTER_QUEUE",
        "CONCURRENCY",
        "PREFETCH",
        "MAX_ATTEMPTS",
        "SHUTDOWN_GRACE",
        "BACKOFF_INITIAL_MS",
        "BACKOFF_MAX_MS",
        "HTTP_TIMEOUT_MS",
        "LOG_FORMAT",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.kill_on_drop(true);
    cmd
}

pub async fn output(mut child: Child) -> (Option<i32>, String) {
    let mut stderr = child.stderr.take().expect("stderr piped");
    let mut stdout = child.stdout.take().expect("stdout piped");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("exits within a minute")
        .expect("wait");
    let (mut out, mut err) = (String::new(), String::new());
    let _ = stdout.read_to_string(&mut out).await;
    let _ = stderr.read_to_string(&mut err).await;
    (status.code(), out + &err)
}

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
