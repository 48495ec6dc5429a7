//! End to end: RabbitMQ → daemon → sandbox API → Postgres audit.

mod adaptive;
mod auth;
mod binary;
mod campaigns;
mod demo;
mod helpers;
mod manners;
mod pacing;
mod parking;
mod projects;
mod rollups;
mod tls;
mod tls_peers;
mod tls_tests;
mod tools;

use aom_terminator::sandbox::SandboxArgs;
use helpers::*;
use std::time::Duration;

#[tokio::test]
async fn every_answer_is_classified_retried_and_audited() {
    let env = TestEnv::new().await;
    let cases = [
        ("ok", "ex-ok"),
        ("bad-request", "e400-a"),
        ("not-found", "e404-a"),
        ("forbidden", "e403-a"),
        ("conflict", "e409-a"),
        ("redirect", "e302-a"),
        ("flaky", "flaky-a"),
        ("always-500", "e500-a"),
        ("bad-gateway", "e502-a"),
        ("unavailable", "e503-a"),
        ("gateway-timeout", "e504-a"),
        ("throttled", "e429-a"),
        ("timeout", "slow-5000-a"),
    ];
    let elements: Vec<String> = cases.iter().map(|(id, ex)| request(id, ex)).collect();
    env.publish(&batch(&elements), Some("m-classify")).await;
    // A 429 does not count toward MAX_ATTEMPTS: the throttled request ends
    // when THROTTLE_GIVE_UP has passed (its Retry-After is 1 s: the third
    // 429 comes 2 s after the first).
    let daemon = env.start_daemon(&["--http-timeout-ms", "300", "--throttle-give-up", "1500ms"]);
    env.wait_outcomes(cases.len() as i64).await;

    let expect =
        |outcome: &str, status: Option<i32>, attempts: i32| (outcome.to_owned(), status, attempts);
    let want = [
        ("ok", expect("succeeded", Some(200), 1)),
        ("bad-request", expect("failed_permanent", Some(400), 1)),
        ("not-found", expect("failed_permanent", Some(404), 1)),
        ("forbidden", expect("failed_permanent", Some(403), 1)),
        ("conflict", expect("failed_permanent", Some(409), 1)),
        ("redirect", expect("failed_permanent", Some(302), 1)),
        ("flaky", expect("succeeded", Some(200), 2)),
        (
            "always-500",
            expect("failed_retries_exhausted", Some(500), 3),
        ),
        (
            "bad-gateway",
            expect("failed_retries_exhausted", Some(502), 3),
        ),
        (
            "unavailable",
            expect("failed_retries_exhausted", Some(503), 3),
        ),
        (
            "gateway-timeout",
            expect("failed_retries_exhausted", Some(504), 3),
        ),
        (
            "throttled",
            expect("failed_retries_exhausted", Some(429), 3),
        ),
        ("timeout", expect("failed_retries_exhausted", None, 3)),
    ];
    for (id, (outcome, status, attempts)) in want {
        let row = env.outcome_of(id).await;
        assert_eq!(
            (row.outcome, row.http_status, row.attempts),
            (outcome, status, attempts),
            "request {id}"
        );
    }

    // The API's error JSON is parsed; a gateway's HTML is kept as an excerpt.
    let nf = env.outcome_of("not-found").await;
    assert_eq!(nf.error_code.as_deref(), Some("AOM.31001306"));
    assert_eq!(
        nf.error_msg.as_deref(),
        Some("Execution not exist. recordInfo is not exist.")
    );
    let html: Option<String> = sqlx::query_scalar(
        "SELECT body_excerpt FROM termination_attempts WHERE request_id = 'bad-gateway' LIMIT 1",
    )
    .fetch_one(&env.db)
    .await
    .expect("attempt row");
    assert!(html.unwrap_or_default().contains("502 Bad Gateway"));

    // Every attempt is a row, numbered from 1, with its kind of error.
    // 8 requests answered at the first or second call, 6 × 3 exhausted.
    assert_eq!(
        env.count("SELECT count(*) FROM termination_attempts").await,
        26
    );
    let kinds: Vec<(i32, Option<String>)> = sqlx::query_as(
        "SELECT attempt, error_kind FROM termination_attempts WHERE request_id = 'timeout' ORDER BY attempt",
    )
    .fetch_all(&env.db)
    .await
    .expect("attempts");
    assert_eq!(
        kinds,
        (1..=3)
            .map(|n| (n, Some("timeout".to_owned())))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        env.count("SELECT count(*) FROM termination_attempts WHERE request_id = 'throttled' AND error_kind = 'throttled'").await,
        3
    );

    // Exactly the exhausted requests are dead-lettered, each saying why.
    let letters = env.drain_dead_letters().await;
    let mut dead: Vec<String> = letters
        .iter()
        .map(|(h, _)| header(h, "x-aom-request-id").unwrap_or_default())
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        [
            "always-500",
            "bad-gateway",
            "gateway-timeout",
            "throttled",
            "timeout",
            "unavailable"
        ]
    );
    for (headers, body) in &letters {
        assert_eq!(
            header(headers, "x-aom-outcome").as_deref(),
            Some("failed_retries_exhausted")
        );
        assert_eq!(header(headers, "x-aom-attempts").as_deref(), Some("3"));
        assert_eq!(
            header(headers, "x-aom-source-queue").as_deref(),
            Some(env.queue.as_str())
        );
        let body: serde_json::Value = serde_json::from_slice(body).expect("dead letter is JSON");
        assert_eq!(body["project_id"], PROJECT);
    }
    let (h, _) = letters
        .iter()
        .find(|(h, _)| header(h, "x-aom-request-id").as_deref() == Some("always-500"))
        .expect("always-500 dead letter");
    assert_eq!(header(h, "x-aom-http-status").as_deref(), Some("500"));
    assert_eq!(
        header(h, "x-aom-error-code").as_deref(),
        Some("AOM.31001405")
    );

    // The message was acked once everything was committed.
    eventually("the message is acked", || async {
        env.ready_requests().await == 0
    })
    .await;
    daemon.stop().await;
    assert_eq!(
        env.ready_requests().await,
        0,
        "nothing returns to the queue"
    );
}

#[tokio::test]
async fn a_connect_error_is_retried_then_exhausted() {
    let env = TestEnv::new().await;
    env.publish(&request("r-conn", "ex-1"), None).await;
    let daemon = env.start_daemon(&["--aom-endpoint", "http://127.0.0.1:9"]);
    env.wait_outcomes(1).await;
    let row = env.outcome_of("r-conn").await;
    assert_eq!(
        (row.outcome.as_str(), row.http_status, row.attempts),
        ("failed_retries_exhausted", None, 3)
    );
    assert_eq!(
        env.count("SELECT count(*) FROM termination_attempts WHERE error_kind = 'connect'")
            .await,
        3
    );
    assert_eq!(env.drain_dead_letters().await.len(), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn unauthorized_pauses_without_failing_anything_and_resumes() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        expected_token: Some("the-right-token".to_owned()),
        ..SandboxArgs::default()
    })
    .await;
    for i in 0..20 {
        env.publish(&request(&format!("r{i}"), &format!("ex-{i}")), None)
            .await;
    }
    let daemon = env.start_daemon(&["--max-attempts", "1"]);
    let unauthorized = || {
        env.sandbox
            .sandbox()
            .stats()
            .by_status
            .get(&401)
            .copied()
            .unwrap_or(0)
    };
    // It hits 401, pauses, and keeps probing ...
    eventually("a 401", || async { unauthorized() > 0 }).await;
    let first = unauthorized();
    eventually("two more probes", || async { unauthorized() >= first + 2 }).await;
    // ... without failing a single request, even with MAX_ATTEMPTS=1, and
    // with every message still held unacked.
    assert_eq!(
        env.outcomes().await,
        0,
        "nothing is final while credentials are wrong"
    );
    assert_eq!(
        env.ready_requests().await,
        0,
        "nothing was nacked back to the queue"
    );
    let probes_before = env.sandbox.sandbox().stats().calls;
    assert!(
        probes_before < 40,
        "paused: no call storm ({probes_before} calls)"
    );

    // The operator fixes the credentials (here: the API starts accepting ours).
    env.sandbox
        .sandbox()
        .set_expected_token(Some(TOKEN.to_owned()));
    env.wait_outcomes(20).await;
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes WHERE outcome = 'succeeded'")
            .await,
        20
    );
    // The 401s are in the audit, and never counted as attempts toward failure.
    assert!(
        env.count("SELECT count(*) FROM termination_attempts WHERE http_status = 401 AND error_kind = 'unauthorized'").await >= 3
    );
    eventually("all acked", || async { env.ready_requests().await == 0 }).await;
    daemon.stop().await;
}

#[tokio::test]
async fn invalid_input_is_rejected_recorded_and_dead_lettered() {
    let env = TestEnv::new().await;
    let oversized = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1024 * 1024));
    let small = format!(r#"{{"project_id":"{PROJECT}","workflow_id":"w","execution_id":"e"}}"#);
    let over_limit = batch(&vec![small; 10_001]);
    env.publish("this is not json", Some("m-notjson")).await;
    env.publish_bytes(b"\xff\xfe\x00", Some("m-notutf8")).await;
    env.publish(&oversized, Some("m-big")).await;
    env.publish(&over_limit, Some("m-overlimit")).await;
    env.publish(
        r#"{"workflow_id":"w","execution_id":"e","request_id":"missing"}"#,
        None,
    )
    .await;
    env.publish(
        &format!(r#"{{"project_id":"{PROJECT}","workflow_id":7,"execution_id":"e","request_id":"types"}}"#),
        None,
    )
    .await;
    env.publish(
        &format!(
            r#"{{"project_id":"short","workflow_id":"{}","execution_id":"e","request_id":"ranges"}}"#,
            "w".repeat(65)
        ),
        None,
    )
    .await;
    env.publish(
        &batch(&[
            request("good-1", "ex-good-1"),
            r#"{"request_id":"bad-1","project_id":"nope"}"#.to_owned(),
            request("good-2", "ex-good-2"),
        ]),
        Some("m-mixed"),
    )
    .await;
    let daemon = env.start_daemon(&[]);
    env.wait_outcomes(10).await;

    let rejected: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT request_id, error_code, error_msg FROM termination_outcomes \
         WHERE outcome = 'rejected' ORDER BY request_id",
    )
    .fetch_all(&env.db)
    .await
    .expect("rejections");
    let by_id = |id: &str| {
        rejected
            .iter()
            .find(|(r, _, _)| r == id)
            .unwrap_or_else(|| panic!("no rejection for {id}: {rejected:?}"))
            .2
            .clone()
    };
    assert_eq!(rejected.len(), 8, "{rejected:?}");
    assert!(
        rejected
            .iter()
            .all(|(_, code, _)| code.as_deref() == Some("invalid_request"))
    );
    assert!(by_id("msg:m-notjson:0").contains("not JSON"));
    assert!(by_id("msg:m-notutf8:0").contains("not UTF-8"));
    assert!(by_id("msg:m-big:0").contains("over the limit"));
    assert!(by_id("msg:m-overlimit:0").contains("over the limit of 10000"));
    assert!(by_id("missing").contains("missing field project_id"));
    assert!(by_id("types").contains("workflow_id must be a string"));
    let ranges = by_id("ranges");
    assert!(
        ranges.contains("project_id must be exactly 32")
            && ranges.contains("workflow_id must be 1..64")
    );
    assert!(by_id("bad-1").contains("project_id must be exactly 32"));

    // The valid elements of the mixed batch went through; nothing invalid
    // reached the API.
    assert_eq!(env.outcome_of("good-1").await.outcome, "succeeded");
    assert_eq!(env.outcome_of("good-2").await.outcome, "succeeded");
    assert_eq!(env.sandbox.sandbox().stats().calls, 2);

    // Each message with anything invalid is dead-lettered raw, with reasons.
    let letters = env.drain_dead_letters().await;
    assert_eq!(letters.len(), 8);
    assert!(
        letters
            .iter()
            .all(|(h, _)| header(h, "x-aom-outcome").as_deref() == Some("rejected"))
    );
    let (h, body) = letters
        .iter()
        .find(|(h, _)| header(h, "x-aom-source-message-id").as_deref() == Some("m-notutf8"))
        .expect("raw non-UTF-8 message dead-lettered");
    assert_eq!(body.as_slice(), b"\xff\xfe\x00");
    assert!(
        header(h, "x-aom-error")
            .unwrap_or_default()
            .contains("not UTF-8")
    );
    let (h, _) = letters
        .iter()
        .find(|(h, _)| header(h, "x-aom-source-message-id").as_deref() == Some("m-mixed"))
        .expect("mixed batch dead-lettered");
    assert_eq!(header(h, "x-aom-rejected-count").as_deref(), Some("1"));
    assert!(
        header(h, "x-aom-rejections")
            .unwrap_or_default()
            .contains("bad-1")
    );

    eventually("all acked", || async { env.ready_requests().await == 0 }).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_batch_of_a_thousand_is_each_handled_and_audited() {
    let env = TestEnv::new().await;
    let elements: Vec<String> = (0..1000)
        .map(|i| {
            let ex = match i % 100 {
                0 => format!("e404-{i}"),
                1 => format!("flaky-{i}"),
                _ => format!("ex-{i}"),
            };
            // No request_id: derived from the message-id and the index.
            serde_json::json!({"project_id": PROJECT, "workflow_id": "wf-big", "execution_id": ex})
                .to_string()
        })
        .collect();
    env.publish(&batch(&elements), Some("big-batch")).await;
    let daemon = env.start_daemon(&["--concurrency", "32"]);
    env.wait_outcomes(1000).await;
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT outcome, count(*) FROM termination_outcomes GROUP BY outcome ORDER BY outcome",
    )
    .fetch_all(&env.db)
    .await
    .expect("counts");
    assert_eq!(
        counts,
        vec![
            ("failed_permanent".to_owned(), 10),
            ("succeeded".to_owned(), 990)
        ]
    );
    assert_eq!(
        env.outcome_of("msg:big-batch:999").await.outcome,
        "succeeded"
    );
    assert_eq!(
        env.outcome_of("msg:big-batch:100").await.http_status,
        Some(404)
    );
    // 1,000 first calls plus one retry for each of the 10 flaky executions.
    assert_eq!(env.sandbox.sandbox().stats().calls, 1010);
    assert!(env.sandbox.sandbox().stats().max_in_flight <= 32);
    eventually("acked", || async { env.ready_requests().await == 0 }).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_request_already_final_is_not_sent_again() {
    let env = TestEnv::new().await;
    let daemon = env.start_daemon(&[]);
    env.publish(&request("once", "ex-once"), None).await;
    env.wait_outcomes(1).await;

    // The same request again, alone and twice inside a batch with a new one.
    env.publish(&request("once", "ex-once"), Some("again-1"))
        .await;
    env.publish(
        &batch(&[
            request("once", "ex-once"),
            request("fresh", "ex-fresh"),
            request("once", "ex-once"),
        ]),
        Some("again-2"),
    )
    .await;
    env.wait_outcomes(2).await;
    eventually("redeliveries counted", || async {
        env.outcome_of("once").await.skipped_redeliveries == 3
    })
    .await;
    let s = env.sandbox.sandbox();
    assert_eq!(
        s.calls_for(PROJECT, "wf-test", "ex-once"),
        1,
        "sent exactly once"
    );
    assert_eq!(s.calls_for(PROJECT, "wf-test", "ex-fresh"), 1);
    eventually("acked", || async { env.ready_requests().await == 0 }).await;
    daemon.stop().await;
}

#[tokio::test]
async fn the_same_request_in_flight_twice_is_sent_once() {
    let env = TestEnv::new().await;
    // Two messages carry the same request_id while its call is still running.
    env.publish(&request("dup", "slow-500-dup"), Some("d1"))
        .await;
    env.publish(&request("dup", "slow-500-dup"), Some("d2"))
        .await;
    let daemon = env.start_daemon(&[]);
    eventually("one outcome and one skip", || async {
        env.outcomes().await == 1 && env.outcome_of("dup").await.skipped_redeliveries == 1
    })
    .await;
    assert_eq!(
        env.sandbox
            .sandbox()
            .calls_for(PROJECT, "wf-test", "slow-500-dup"),
        1
    );
    eventually("both acked", || async { env.ready_requests().await == 0 }).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_rejection_does_not_block_a_later_valid_request_with_its_id() {
    let env = TestEnv::new().await;
    let daemon = env.start_daemon(&[]);
    env.publish(
        r#"{"request_id":"reused","project_id":"short","workflow_id":"w","execution_id":"e"}"#,
        None,
    )
    .await;
    env.wait_outcomes(1).await;
    assert_eq!(env.outcome_of("reused").await.outcome, "rejected");
    env.publish(&request("reused", "ex-reused"), None).await;
    eventually(
        "the valid request's outcome replaces the rejection",
        || async { env.outcome_of("reused").await.outcome == "succeeded" },
    )
    .await;
    let history: Vec<(String, String)> = sqlx::query_as(
        "SELECT why, outcome FROM termination_outcome_history WHERE request_id = 'reused'",
    )
    .fetch_all(&env.db)
    .await
    .expect("history");
    assert_eq!(
        history,
        vec![("superseded".to_owned(), "rejected".to_owned())]
    );
    daemon.stop().await;
}

#[tokio::test]
async fn in_flight_calls_never_exceed_the_concurrency() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(20),
        ..SandboxArgs::default()
    })
    .await;
    // Singles and batches, so the limit holds across messages and elements.
    for m in 0..20 {
        let elements: Vec<String> = (0..10)
            .map(|i| request(&format!("c{m}-{i}"), &format!("ex-{m}-{i}")))
            .collect();
        env.publish(&batch(&elements), None).await;
    }
    for i in 0..50 {
        env.publish(&request(&format!("s{i}"), &format!("ex-s{i}")), None)
            .await;
    }
    let daemon = env.start_daemon(&["--concurrency", "6", "--prefetch", "50"]);
    env.wait_outcomes(250).await;
    let stats = env.sandbox.sandbox().stats();
    assert_eq!(stats.calls, 250);
    assert!(
        stats.max_in_flight <= 6,
        "max in flight {}",
        stats.max_in_flight
    );
    assert!(
        stats.max_in_flight >= 2,
        "parallelism is used: {}",
        stats.max_in_flight
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_slow_message_does_not_hold_back_the_acks_of_later_ones() {
    // Acks are coalesced into runs of consecutive delivery tags. With a
    // prefetch of 2, a finished message held unacked behind a slow one
    // would fill the window, and nothing after it could be delivered until
    // the slow one finished.
    let env = TestEnv::new().await;
    env.publish(&request("slow", "slow-60000-x"), None).await;
    publish_singles(&env, "fast", 10).await;
    let daemon = env.start_daemon(&["--prefetch", "2", "--shutdown-grace", "1s"]);
    // Only the ten fast ones can have outcomes while the slow call runs.
    env.wait_outcomes(10).await;
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes WHERE request_id LIKE 'fast%'")
            .await,
        10,
        "the slow call is still running"
    );
    eventually("the later messages acked", || async {
        env.ready_requests().await == 0
    })
    .await;
    daemon.stop().await;
    // The slow one was cut short by the shutdown: unacked, so back in the queue.
    eventually("the slow message returned to the queue", || async {
        env.ready_requests().await == 1
    })
    .await;
}
