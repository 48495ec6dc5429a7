//! RATE_LIMIT and 429 throttling: bounds on when calls may start, read
//! from the audit's own timestamps. These are lower bounds the feature
//! promises (never faster than allowed), not speed measurements.

use crate::helpers::*;
use chrono::{DateTime, Utc};

async fn call_starts(env: &TestEnv) -> Vec<(String, DateTime<Utc>, Option<i32>)> {
    sqlx::query_as(
        "SELECT request_id, started_at, http_status FROM termination_attempts ORDER BY started_at",
    )
    .fetch_all(&env.db)
    .await
    .expect("attempts")
}

#[tokio::test]
async fn rate_limit_spaces_out_call_starts() {
    let env = TestEnv::new().await;
    let elements: Vec<String> = (0..41)
        .map(|i| request(&format!("r{i}"), &format!("ex-{i}")))
        .collect();
    env.publish(&batch(&elements), None).await;
    let daemon = env.start_daemon(&["--rate-limit", "20", "--concurrency", "16"]);
    env.wait_outcomes(41).await;
    let starts = call_starts(&env).await;
    assert_eq!(starts.len(), 41);
    // 20 per second with a burst of 1: 41 starts span at least 2 seconds.
    let span = starts[40].1 - starts[0].1;
    assert!(
        span >= chrono::TimeDelta::milliseconds(1900),
        "41 calls in {span}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_429_holds_every_call_for_its_retry_after() {
    let env = TestEnv::new().await;
    // A fixed limit: an adaptive one cuts itself instead of holding (see
    // adaptive.rs). The 429s do not count; THROTTLE_GIVE_UP ends the request.
    let daemon = env.start_daemon(&[
        "--max-attempts",
        "2",
        "--concurrency-control",
        "fixed",
        "--throttle-give-up",
        "1500ms",
    ]);
    // The sandbox answers 429 with Retry-After: 1.
    env.publish(&request("throttled", "e429-x"), None).await;
    eventually("the 429", || async {
        env.sandbox.sandbox().stats().by_status.contains_key(&429)
    })
    .await;
    // Requests that arrive now must wait out the hold too.
    publish_singles(&env, "after", 5).await;
    env.wait_outcomes(6).await;
    let starts = call_starts(&env).await;
    let (first_id, first_at, first_status) = &starts[0];
    assert_eq!((first_id.as_str(), *first_status), ("throttled", Some(429)));
    for (id, at, _) in &starts[1..] {
        assert!(
            *at - *first_at >= chrono::TimeDelta::milliseconds(1000),
            "{id} started {} after the 429: the whole daemon must wait",
            *at - *first_at
        );
    }
    assert_eq!(
        env.outcome_of("throttled").await.outcome,
        "failed_retries_exhausted"
    );
    daemon.stop().await;
}
