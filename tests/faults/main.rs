//! Faults: the promise is that every request that reached the queue ends
//! with exactly one final outcome in the audit, whatever fails in between,
//! and that a request is sent twice only where a crash left no way to know
//! it was sent — and then the audit says so.

mod broker_loss;
mod chaos;
#[path = "../pipeline/helpers.rs"]
mod helpers;
mod proxy;

use aom_terminator::sandbox::SandboxArgs;
use helpers::*;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::time::Duration;

/// Executions per request id, for checking the sandbox's per-execution counts.
fn executions(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("{prefix}{i}"), format!("ex-{prefix}{i}")))
        .collect()
}

/// Publish `reqs` as a mix of batches of 50 and single messages.
async fn publish_mixed(env: &TestEnv, reqs: &[(String, String)]) {
    let (batched, singles) = reqs.split_at(reqs.len() / 2);
    for chunk in batched.chunks(50) {
        let elements: Vec<String> = chunk.iter().map(|(r, e)| request(r, e)).collect();
        env.publish(&batch(&elements), None).await;
    }
    for (r, e) in singles {
        env.publish(&request(r, e), None).await;
    }
}

async fn outcome_counts(env: &TestEnv) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT outcome, count(*) FROM termination_outcomes GROUP BY 1",
    )
    .fetch_all(&env.db)
    .await
    .expect("counts")
    .into_iter()
    .collect()
}

/// Every request the API saw more often than the audit has attempts for
/// (calls a crashed daemon made and never recorded) must be flagged in the
/// audit as possibly sent twice. Returns how many there were.
async fn double_sends_are_flagged(env: &TestEnv, reqs: &[(String, String)]) -> u64 {
    let audit: HashMap<String, (bool, i32)> = sqlx::query_as::<_, (String, bool, i32)>(
        "SELECT request_id, redelivered, attempts FROM termination_outcomes",
    )
    .fetch_all(&env.db)
    .await
    .expect("audit")
    .into_iter()
    .map(|(r, flagged, attempts)| (r, (flagged, attempts)))
    .collect();
    let mut doubles = 0;
    for (r, e) in reqs {
        let calls = env.sandbox.sandbox().calls_for(PROJECT, "wf-test", e);
        let (flagged, attempts) = audit.get(r).copied().unwrap_or((false, 0));
        assert!(calls >= 1, "{r} never reached the API");
        assert!(
            calls >= attempts as u64,
            "{r}: more attempts recorded than calls made"
        );
        if calls > attempts as u64 {
            doubles += 1;
            assert!(
                flagged,
                "{r}: {calls} calls, {attempts} recorded, and not flagged"
            );
        }
    }
    doubles
}

#[tokio::test]
async fn broker_connection_lost_mid_run() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(5),
        ..SandboxArgs::default()
    })
    .await;
    let upstream = amqp_addr(&env.amqp_url);
    let proxy = proxy::Proxy::start(upstream).await;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let reqs = executions("b", 1500);
    publish_mixed(&env, &reqs).await;
    let daemon = env.start_daemon(&["--amqp-url", &via_proxy, "--concurrency", "32"]);
    eventually("some progress", || async { env.outcomes().await >= 300 }).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    env.wait_outcomes(1500).await;
    eventually("everything acked", || async {
        env.ready_requests().await == 0
    })
    .await;
    assert_eq!(outcome_counts(&env).await.get("succeeded"), Some(&1500));
    // Redelivered messages whose requests were done or in flight were not
    // sent again: the connection loss cost no duplicate call.
    assert_eq!(
        env.sandbox.sandbox().stats().calls,
        1500,
        "no request sent twice"
    );
    assert!(
        env.count(
            "SELECT coalesce(sum(skipped_redeliveries), 0)::bigint FROM termination_outcomes"
        )
        .await
            > 0,
        "the cut caused redeliveries, and they were absorbed"
    );
    daemon.stop().await;
}

/// (ready, consumers) of `queue`, asked on a channel of its own.
async fn queue_state(env: &TestEnv, queue: &str) -> (u32, u32) {
    let channel = env.channel().await;
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = channel.close(200, "probed".into()).await;
    (q.message_count(), q.consumer_count())
}

#[tokio::test]
async fn postgres_refusing_connections_mid_run() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(5),
        ..SandboxArgs::default()
    })
    .await;
    let reqs = executions("p", 1000);
    publish_mixed(&env, &reqs).await;
    let addr = free_addr();
    let addr_flag = addr.to_string();
    let readyz = format!("http://{addr}/readyz");
    // Neither the broker's prefetch nor the daemon's request credits hold
    // anything back here (both are above everything this test publishes):
    // whatever the daemon leaves alone during the outage, it leaves because
    // it pauses. (At a prefetch of 32, the 32 unacked messages stuck on the
    // database stop the broker's deliveries with or without the pause.)
    let daemon = env.start_daemon(&[
        "--concurrency",
        "32",
        "--prefetch",
        "2000",
        "--prefetch-requests",
        "5000",
        "--metrics-addr",
        &addr_flag,
    ]);
    eventually("some progress", || async { env.outcomes().await >= 200 }).await;
    let done_at_cut = env.outcomes().await;
    let db = env.database_name();
    let admin = env.admin_pool().await;
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
        .execute(&admin)
        .await
        .expect("refuse connections");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&db)
        .execute(&admin)
        .await
        .expect("kill the daemon's connections");
    eventually("not ready because of the database", || async {
        let (status, body) = http_get(&readyz).await;
        status == 503 && body.contains("database")
    })
    .await;
    assert!(done_at_cut < 1000, "the database went away mid-run");
    // The consume loop looks at the pause before it waits for the next
    // delivery, and wakes for its liveness check every 2 s: a delivery that
    // arrives within 2 s of the outage being noticed is still taken (seen in
    // this test: one of the 20 is dead-lettered without this wait).
    tokio::time::sleep(Duration::from_secs(4)).await;

    // While the audit cannot be written, nothing new is taken. Messages
    // arrive that the daemon could act on without the database: an
    // unreadable message is dead-lettered first and recorded second, so one
    // taken now would show in the dead-letter queue at once.
    let letters_before = queue_state(&env, &env.dead_letter_queue).await.0;
    const DURING: usize = 20;
    for i in 0..DURING {
        env.publish(&format!("not json {i}"), Some(&format!("during-{i}")))
            .await;
    }
    // They reach the daemon (nothing else consumes the queue), unless it
    // paused by cancelling its consumer.
    eventually("the messages reached the daemon", || async {
        let (ready, consumers) = queue_state(&env, &env.queue).await;
        ready == 0 || consumers == 0
    })
    .await;
    let mut letters = Vec::new();
    for _ in 0..6 {
        letters.push(queue_state(&env, &env.dead_letter_queue).await.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        letters.iter().all(|&n| n == letters_before),
        "messages were taken while the database was away: dead letters {letters_before} then {letters:?}"
    );
    assert_eq!(http_get(&readyz).await.0, 503, "still not ready");
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .expect("allow connections");

    // Once it is back, everything completes, the outage's messages too.
    env.wait_outcomes(1000 + DURING as i64).await;
    eventually("everything acked", || async {
        env.ready_requests().await == 0
    })
    .await;
    let counts = outcome_counts(&env).await;
    assert_eq!(counts.get("succeeded"), Some(&1000), "{counts:?}");
    assert_eq!(counts.get("rejected"), Some(&(DURING as i64)), "{counts:?}");
    assert_eq!(env.drain_dead_letters().await.len(), DURING);
    // Outcomes known during the outage were kept and written later, not
    // re-sent.
    assert_eq!(
        env.sandbox.sandbox().stats().calls,
        1000,
        "no request sent twice"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn sigkill_mid_run_then_restart() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(10),
        ..SandboxArgs::default()
    })
    .await;
    let reqs = executions("k", 3000);
    publish_mixed(&env, &reqs).await;
    let first = binary()
        .arg("run")
        .envs(env.binary_env())
        .env("CONCURRENCY", "64")
        .spawn()
        .expect("spawn");
    eventually("a third done", || async { env.outcomes().await >= 1000 }).await;
    let pid = first.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let _ = output(first).await;
    let done_at_kill = env.outcomes().await;
    assert!(done_at_kill < 3000, "killed mid-run");

    let daemon = env.start_daemon(&["--concurrency", "64"]);
    env.wait_outcomes(3000).await;
    eventually("everything acked", || async {
        env.ready_requests().await == 0
    })
    .await;
    assert_eq!(outcome_counts(&env).await.get("succeeded"), Some(&3000));
    let doubles = double_sends_are_flagged(&env, &reqs).await;
    // Only what the killed daemon held could be repeated.
    assert!(
        doubles < 3000 - done_at_kill as u64,
        "{doubles} requests sent twice"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn two_daemons_one_killed_and_restarted() {
    let env = TestEnv::new().await;
    // 2% answer 500 then 200, 1% answer 404, the rest 200.
    let reqs: Vec<(String, String)> = (0..20_000)
        .map(|i| {
            let ex = match i % 100 {
                0 | 1 => format!("flaky-{i}"),
                2 => format!("e404-{i}"),
                _ => format!("ex-{i}"),
            };
            (format!("t{i}"), ex)
        })
        .collect();
    for chunk in reqs.chunks(200) {
        let elements: Vec<String> = chunk.iter().map(|(r, e)| request(r, e)).collect();
        env.publish(&batch(&elements), None).await;
    }
    let spawn = || {
        binary()
            .arg("run")
            .envs(env.binary_env())
            .env("CONCURRENCY", "64")
            .env("PREFETCH", "4")
            .spawn()
            .expect("spawn")
    };
    let a = spawn();
    let b = spawn();
    eventually("a quarter done", || async { env.outcomes().await >= 5000 }).await;
    let pid = a.id().expect("pid").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    let _ = output(a).await;
    let a2 = spawn();
    env.wait_outcomes(20_000).await;
    eventually("everything acked", || async {
        env.ready_requests().await == 0
    })
    .await;
    let counts = outcome_counts(&env).await;
    assert_eq!(counts.get("succeeded"), Some(&19_800), "{counts:?}");
    assert_eq!(counts.get("failed_permanent"), Some(&200), "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    double_sends_are_flagged(&env, &reqs).await;
    for child in [a2, b] {
        let (code, out) = terminate(child).await;
        assert_eq!(code, Some(0), "{out}");
    }
}

#[tokio::test]
async fn a_hung_api_is_a_timeout_and_never_exceeds_the_concurrency() {
    let env = TestEnv::new().await;
    let elements: Vec<String> = (0..40)
        .map(|i| request(&format!("h{i}"), &format!("slow-60000-{i}")))
        .collect();
    env.publish(&batch(&elements), None).await;
    let daemon = env.start_daemon(&[
        "--concurrency",
        "8",
        "--http-timeout-ms",
        "300",
        "--max-attempts",
        "2",
    ]);
    env.wait_outcomes(40).await;
    assert_eq!(
        outcome_counts(&env).await.get("failed_retries_exhausted"),
        Some(&40)
    );
    assert_eq!(
        env.count("SELECT count(*) FROM termination_attempts WHERE error_kind = 'timeout'")
            .await,
        80
    );
    assert!(env.sandbox.sandbox().stats().max_in_flight <= 8);
    daemon.stop().await;
}

#[tokio::test]
async fn a_message_redelivered_too_often_is_dead_lettered_by_the_broker() {
    let env = TestEnv::new().await;
    env.set_delivery_limit(3).await;
    env.publish(&request("poison", "ex-poison"), Some("poison-1"))
        .await;
    // A consumer that keeps crashing: every delivery comes back.
    let channel = env.channel().await;
    let mut consumer = channel
        .basic_consume(
            env.queue.as_str().into(),
            "crasher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = 0;
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(
        Duration::from_secs(3),
        futures_util::StreamExt::next(&mut consumer),
    )
    .await
    {
        deliveries += 1;
        delivery
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .expect("nack");
    }
    assert!(
        deliveries <= 4,
        "delivered {deliveries} times: the limit did not hold"
    );
    let letters = env.drain_dead_letters().await;
    assert_eq!(letters.len(), 1, "the broker dead-lettered it");
}

fn amqp_addr(url: &str) -> std::net::SocketAddr {
    let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP_URL");
    let host = if uri.authority.host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        uri.authority.host
    };
    format!("{host}:{}", uri.authority.port)
        .parse()
        .expect("broker address")
}

#[tokio::test]
async fn a_long_api_outage_ends_in_dead_letters_that_can_be_replayed() {
    let env = TestEnv::new().await;
    env.sandbox.sandbox().set_outage(Some(500));
    let reqs = executions("o", 20);
    publish_mixed(&env, &reqs).await;
    let daemon = env.start_daemon(&["--max-attempts", "3"]);
    env.wait_outcomes(20).await;
    assert_eq!(
        outcome_counts(&env).await.get("failed_retries_exhausted"),
        Some(&20)
    );
    eventually("acked", || async { env.ready_requests().await == 0 }).await;

    // The operator looks, then replays once the API is back.
    let list = binary()
        .args(["dead-letters", "list", "--format", "json"])
        .envs(env.binary_env_without_auth())
        .spawn()
        .expect("spawn list");
    let (code, out) = output(list).await;
    assert_eq!(code, Some(0), "{out}");
    let listed: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(listed.len(), 20, "{out}");
    assert!(
        listed
            .iter()
            .all(|l| l["reason"] == "failed_retries_exhausted" && l["http_status"] == "500")
    );

    env.sandbox.sandbox().set_outage(None);
    let replay = binary()
        .args([
            "dead-letters",
            "replay",
            "--reason",
            "failed-retries-exhausted",
        ])
        .envs(env.binary_env_without_auth())
        .spawn()
        .expect("spawn replay");
    let (code, out) = output(replay).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replayed 20 request(s)"), "{out}");

    env.wait_outcomes(40).await;
    let links: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT r.request_id, r.outcome, o.outcome FROM termination_outcomes r \
         JOIN termination_outcomes o ON o.request_id = r.replay_of ORDER BY r.request_id",
    )
    .fetch_all(&env.db)
    .await
    .expect("replay links");
    assert_eq!(links.len(), 20, "every replay is linked to its original");
    assert!(links.iter().all(
        |(_, replay, original)| replay == "succeeded" && original == "failed_retries_exhausted"
    ));
    assert!(
        env.drain_dead_letters().await.is_empty(),
        "the replayed letters left the queue"
    );

    // Asking for nothing in particular is a usage error.
    let vague = binary()
        .args(["dead-letters", "replay"])
        .envs(env.binary_env_without_auth())
        .spawn()
        .expect("spawn");
    let (code, out) = output(vague).await;
    assert_eq!(code, Some(2), "{out}");
    daemon.stop().await;
}
