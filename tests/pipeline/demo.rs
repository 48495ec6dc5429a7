//! `aom-terminator demo`: the real binary, end to end, against the real
//! RabbitMQ and Postgres (a database of the test's own, queues of its own).

use crate::helpers::*;

/// Whether `queue` exists (a passive declare of a missing queue closes the
/// channel, so each look takes a channel of its own).
async fn queue_exists(env: &TestEnv, queue: &str) -> bool {
    env.channel()
        .await
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .is_ok()
}

/// `demo` with `args` on `queues`, and `vars` over the test's broker and
/// database.
async fn demo(
    env: &TestEnv,
    queues: (&str, &str),
    args: &[&str],
    vars: &[(&str, &str)],
) -> (Option<i32>, String) {
    let child = binary()
        .arg("demo")
        .args(["--queue", queues.0, "--dead-letter-queue", queues.1])
        .args(args)
        .env("AMQP_URL", &env.amqp_url)
        .env("DATABASE_URL", &env.database_url)
        .envs(vars.iter().copied())
        .spawn()
        .expect("spawn demo");
    output(child).await
}

#[tokio::test]
async fn demo_runs_a_mass_cancellation_end_to_end_and_cleans_up() {
    let env = TestEnv::new().await;
    // Queues of the test's own, named like the demo's, so parallel tests
    // and a developer's own `demo` do not meet.
    let queue = format!("{}.demo", env.queue);
    let dead = format!("{}.demo-dead", env.queue);
    let (code, out) = demo(&env, (&queue, &dead), &["--requests", "500"], &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("500 requests with a final outcome") && out.contains("requested by demo"),
        "the report table: {out}"
    );
    assert!(out.contains("outcome                   requests"), "{out}");
    assert!(out.contains("FROM termination_attempts"), "the SQL: {out}");
    assert!(out.contains("every one of the 500 requests has exactly one outcome"));
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes WHERE requested_by = 'demo'")
            .await,
        500
    );
    // The fake API's failure mix shows: 404s, and retried 500s.
    assert!(
        env.count("SELECT count(*) FROM termination_outcomes WHERE http_status = 404")
            .await
            > 0
    );
    assert!(
        env.count("SELECT count(*) FROM termination_attempts WHERE http_status = 500")
            .await
            > 0
    );
    assert!(!queue_exists(&env, &queue).await, "request queue deleted");
    assert!(
        !queue_exists(&env, &format!("{queue}.parked")).await,
        "parking queue deleted"
    );
    assert!(
        !queue_exists(&env, &dead).await,
        "dead-letter queue deleted"
    );

    // Again, keeping the queues: new request ids, no collision with the first run.
    let (code, out) = demo(&env, (&queue, &dead), &["--requests", "50", "--keep"], &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("50 requests with a final outcome"), "{out}");
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes WHERE requested_by = 'demo'")
            .await,
        550
    );
    assert_eq!(
        env.count(
            "SELECT count(DISTINCT substring(request_id FROM '^demo-([^-]+-[^-]+)-')) \
             FROM termination_outcomes"
        )
        .await,
        2,
        "one run stamp per run"
    );
    assert!(queue_exists(&env, &queue).await, "kept with --keep");
    assert!(queue_exists(&env, &dead).await, "kept with --keep");
    let channel = env.channel().await;
    let parked = format!("{queue}.parked");
    for q in [&queue, &dead, &parked] {
        channel
            .queue_delete(q.as_str().into(), Default::default())
            .await
            .expect("delete the kept queue");
    }
}

#[tokio::test]
async fn a_proxy_in_the_shell_does_not_catch_the_local_sandbox() {
    // A user's corporate proxy (here one that is not even there) is for the
    // world outside: the demo's calls to its own sandbox on loopback go
    // direct, and none fails to connect.
    let env = TestEnv::new().await;
    let queue = format!("{}.demo-proxy", env.queue);
    let dead = format!("{}.demo-proxy-dead", env.queue);
    let proxy = [
        ("HTTP_PROXY", "http://127.0.0.1:9"),
        ("https_proxy", "http://127.0.0.1:9"),
        ("NO_PROXY", "corp.example"),
    ];
    let (code, out) = demo(&env, (&queue, &dead), &["--requests", "50"], &proxy).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes WHERE requested_by = 'demo'")
            .await,
        50
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM termination_attempts \
             WHERE error_kind IN ('connect', 'network', 'timeout')"
        )
        .await,
        0,
        "no call went to the proxy"
    );
}

#[tokio::test]
async fn demo_names_the_unreachable_peer_in_one_line_and_exits_2() {
    let env = TestEnv::new().await;
    let cases = [
        (
            "amqp://guest:guest@127.0.0.1:1/%2f".to_owned(),
            env.database_url.clone(),
            "the broker (RabbitMQ) at 127.0.0.1:1",
            "systemctl start rabbitmq-server",
        ),
        (
            env.amqp_url.clone(),
            "postgres://postgres:pgsecret@127.0.0.1:1/postgres".to_owned(),
            "the audit database (Postgres) at 127.0.0.1:1",
            "systemctl start postgresql",
        ),
    ];
    for (amqp_url, database_url, names, hint) in cases {
        let queue = format!("{}.demo", env.queue);
        let child = binary()
            .args(["demo", "--queue", &queue])
            .args(["--dead-letter-queue", &format!("{queue}-dead")])
            .env("AMQP_URL", &amqp_url)
            .env("DATABASE_URL", &database_url)
            .spawn()
            .expect("spawn demo");
        let started = std::time::Instant::now();
        let (code, out) = output(child).await;
        assert_eq!(code, Some(2), "{out}");
        assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
        assert!(out.contains(names) && out.contains(hint), "{out}");
        assert!(
            out.contains("docker compose up -d rabbitmq postgres"),
            "{out}"
        );
        assert!(
            !out.contains("pgsecret") && !out.contains("guest:guest"),
            "{out}"
        );
        assert!(started.elapsed().as_secs() < 10, "no retry loop");
        // The queues the broker check declared are gone again.
        assert!(!queue_exists(&env, &queue).await);
    }
}
