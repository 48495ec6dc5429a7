//! Losing the broker with full windows: the daemon reconnects within
//! seconds whatever it holds, says it is not ready meanwhile, and calls the
//! API again only for what was in flight at the cut.

use super::chaos::Daemon;
use super::{amqp_addr, outcome_counts, proxy};
use crate::helpers::*;
use aom_terminator::sandbox::SandboxArgs;
use std::time::{Duration, Instant};

/// `n` batches of 1,000 (the size `enqueue` uses); every `fail_every`-th
/// request always answers 500, so its retries run out and it is
/// dead-lettered. Returns the execution ids.
async fn publish_batches(env: &TestEnv, prefix: &str, n: usize, fail_every: usize) -> Vec<String> {
    let mut executions = Vec::new();
    for m in 0..n {
        let mut elements = Vec::new();
        for i in 0..1000 {
            let k = m * 1000 + i;
            let ex = if fail_every > 0 && k % fail_every == 0 {
                format!("e500-{prefix}{k}")
            } else {
                format!("ex-{prefix}{k}")
            };
            elements.push(request(&format!("{prefix}{k}"), &ex));
            executions.push(ex);
        }
        env.publish(&batch(&elements), None).await;
    }
    executions
}

async fn metric(url: &str, name: &str) -> Option<String> {
    let (_, body) = http_get(url).await;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .map(|l| l[name.len() + 1..].trim().to_owned())
}

#[tokio::test]
async fn a_daemon_holding_full_windows_with_dead_letters_pending_reconnects() {
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(100),
        ..SandboxArgs::default()
    })
    .await;
    let proxy = proxy::Proxy::start(amqp_addr(&env.amqp_url)).await;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    // 12 batches: more than the 10,000 requests the daemon holds at once.
    let executions = publish_batches(&env, "f", 12, 150).await;
    let exhausted = executions.iter().filter(|e| e.starts_with("e500")).count();
    let addr = free_addr();
    let readyz = format!("http://{addr}/readyz");
    let metrics = format!("http://{addr}/metrics");
    let daemon = env.start_daemon(&[
        "--amqp-url",
        &via_proxy,
        "--concurrency",
        "64",
        "--metrics-addr",
        &addr.to_string(),
    ]);
    eventually("ready", || async { http_get(&readyz).await.0 == 200 }).await;
    eventually("dead letters being published", || async {
        env.count(
            "SELECT count(*) FROM termination_outcomes WHERE outcome = 'failed_retries_exhausted'",
        )
        .await
            > 0
    })
    .await;
    assert!(
        env.outcomes().await < 6000,
        "the cut comes with the windows full"
    );

    proxy.cut();
    eventually("not ready once the connection is lost", || async {
        http_get(&readyz).await.0 == 503
    })
    .await;
    eventually("queue depth unknown while cut off", || async {
        metric(&metrics, "aom_terminator_queue_depth")
            .await
            .as_deref()
            == Some("NaN")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(http_get(&readyz).await.0, 503, "still not ready");
    proxy.restore();
    let back = Instant::now();
    eventually("ready again", || async { http_get(&readyz).await.0 == 200 }).await;
    // How fast is the benchmark's business, not a test's: said, not asserted.
    eprintln!(
        "ready again {:?} after the broker came back",
        back.elapsed()
    );
    let reconnects = metric(&metrics, "aom_terminator_reconnects_total").await;
    assert_eq!(reconnects.as_deref(), Some("1"), "one session lost");

    env.wait_outcomes(12_000).await;
    eventually("everything acked", || async {
        env.ready_requests().await == 0
    })
    .await;
    let counts = outcome_counts(&env).await;
    assert_eq!(
        counts.get("failed_retries_exhausted").copied(),
        Some(exhausted as i64),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("succeeded").copied(),
        Some((12_000 - exhausted) as i64)
    );
    let letters = env.drain_dead_letters().await;
    let mut dead: Vec<String> = letters
        .iter()
        .filter_map(|(headers, _)| header(headers, "x-aom-request-id"))
        .collect();
    dead.sort();
    dead.dedup();
    assert_eq!(
        dead.len(),
        exhausted,
        "every exhausted request dead-lettered"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn after_a_cut_only_the_calls_in_flight_are_repeated() {
    const CONCURRENCY: u64 = 64; // the chaos daemons' setting
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(50),
        ..SandboxArgs::default()
    })
    .await;
    let api = env.sandbox.base_url();
    // Ten batches: all held by the first daemon (PREFETCH_REQUESTS 2,000
    // there: two at a time).
    let executions = publish_batches(&env, "d", 10, 0).await;
    let mut cut = Daemon::new(&env).await;
    cut.start(&env, &api, 0, "cut");
    eventually("the first daemon under way", || async {
        env.outcomes().await >= 1000
    })
    .await;
    // The second one starts idle: whatever goes back to the queue is its
    // at once, while the first may still be working on it.
    let mut other = Daemon::new(&env).await;
    other.start(&env, &api, 0, "other");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cut.proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cut.proxy.restore();
    env.wait_outcomes(10_000).await;
    eventually("everything acked", || async {
        env.ready_requests().await == 0
    })
    .await;
    assert_eq!(outcome_counts(&env).await.get("succeeded"), Some(&10_000));
    let sandbox = env.sandbox.sandbox();
    let repeated: u64 = executions
        .iter()
        .map(|ex| sandbox.calls_for(PROJECT, "wf-test", ex).saturating_sub(1))
        .sum();
    eprintln!("calls repeated after one cut: {repeated}");
    assert!(
        repeated <= CONCURRENCY,
        "{repeated} repeated calls: more than the {CONCURRENCY} a cut may leave in flight"
    );
    let duplicates = env
        .count("SELECT count(*) FROM termination_outcome_history WHERE why = 'duplicate'")
        .await;
    assert!(
        duplicates as u64 <= CONCURRENCY,
        "{duplicates} duplicate verdicts"
    );
    for d in [&mut cut, &mut other] {
        d.signal("-TERM");
        assert_eq!(d.wait().await, Some(0), "stopped cleanly");
    }
}
