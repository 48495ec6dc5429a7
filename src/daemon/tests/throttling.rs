//! Throttling (429, 503 with `Retry-After`) through the dispatcher: it
//! never uses up a request's attempts, `THROTTLE_GIVE_UP` ends it, and the
//! adaptive limit takes the place of the global hold.

use super::*;

/// A daemon whose API answers 429 to every call of `ex-1`: 5 attempts,
/// `THROTTLE_GIVE_UP` 30 s, the adaptive limit; `tune` sets up its store.
fn always_throttled(tune: impl FnOnce(&mut FakeStore)) -> World<FakeApi> {
    world_with(
        FakeApi::scripted(&[("ex-1", &[429; 10_000])]),
        5,
        Duration::from_secs(30),
        ConcurrencyControl::Adaptive,
        |store, _| tune(store),
    )
}

#[tokio::test(start_paused = true)]
async fn throttled_answers_do_not_count_toward_max_attempts() {
    // MAX_ATTEMPTS=2: one 500 may be retried; the 429s and the busy 503s
    // around it do not count.
    let script: &[u16] = &[429, BUSY, 429, 500, 429, 429, BUSY, 200];
    let w = world(FakeApi::scripted(&[("ex-1", script)]), 2, |_, _| {});
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1")])).await,
        Handled::Settled
    );
    assert_eq!(
        w.pipeline.dispatcher.api().calls_to("ex-1").len(),
        script.len(),
        "every one retried"
    );
    assert!(w.log.events().contains(&committed("r1", "succeeded")));

    // A 503 without Retry-After is a server error like any other: counted.
    let w = world(FakeApi::scripted(&[("ex-1", &[503, 503])]), 2, |_, _| {});
    run_one(&w, message(&[("r1", "ex-1")])).await;
    assert_eq!(w.pipeline.dispatcher.api().calls_to("ex-1").len(), 2);
    assert!(
        w.log
            .events()
            .contains(&committed("r1", "failed_retries_exhausted"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_throttled_for_throttle_give_up_ends_failed_retries_exhausted() {
    let w = always_throttled(|_| {});
    let started = Instant::now();
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1")])).await,
        Handled::Settled
    );
    assert!(
        w.log
            .events()
            .contains(&committed("r1", "failed_retries_exhausted"))
    );
    // Each 429 asks for 2 s: about 15 calls in 30 s, far more than the 5
    // attempts.
    let calls = w.pipeline.dispatcher.api().calls_to("ex-1");
    assert!(calls.len() >= 10, "{} calls", calls.len());
    let last = calls.last().map(|t| *t - started).unwrap_or_default();
    assert!(last >= Duration::from_secs(30), "gave up after {last:?}");
    assert!(last < Duration::from_secs(40), "gave up after {last:?}");
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_request_gives_up_counting_from_its_first_throttled_answer() {
    // Throttled for 25 s of its 30 s before the broker took its message
    // back (the audit says so): it ends about 5 s into its redelivery.
    let w = always_throttled(|store| {
        let since = chrono::Utc::now() - chrono::Duration::seconds(25);
        store.recorded.insert(
            "r1".to_owned(),
            Recorded {
                attempts: 7,
                throttled_since: Some(since),
            },
        );
    });
    let mut redelivered = message(&[("r1", "ex-1")]);
    redelivered.redelivered = true;
    let started = Instant::now();
    assert_eq!(run_one(&w, redelivered).await, Handled::Settled);
    assert!(
        w.log
            .events()
            .contains(&committed("r1", "failed_retries_exhausted"))
    );
    // Calls 2 s apart until the give-up, about 5 s in (30 s from 25 s ago):
    // not at once, and not 30 s from the redelivery.
    let calls = w.pipeline.dispatcher.api().calls_to("ex-1");
    let last = calls.last().map(|t| *t - started).expect("it called");
    assert!(calls.len() >= 2, "{} calls", calls.len());
    assert!(last < Duration::from_secs(15), "gave up after {last:?}");
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_cuts_on_429s_instead_of_holding_every_call() {
    // Eight calls at once (the world's CONCURRENCY), all throttled once.
    let ids: Vec<(String, String)> = (0..8)
        .map(|i| (format!("r{i}"), format!("ex-{i}")))
        .collect();
    let script: Vec<(&str, &[u16])> = ids
        .iter()
        .map(|(_, ex)| (ex.as_str(), &[429][..]))
        .collect();
    let w = Arc::new(world(FakeApi::scripted(&script), 3, |_, _| {}));
    let refs: Vec<(&str, &str)> = ids.iter().map(|(r, e)| (r.as_str(), e.as_str())).collect();
    let started = Instant::now();
    let first = {
        let (w, msg) = (Arc::clone(&w), message(&refs));
        tokio::spawn(async move { run_one(&w, msg).await })
    };
    while w.pipeline.dispatcher.api().calls().len() < 8 {
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // A window of eight 429s: the limit is cut to a quarter...
    assert_eq!(w.pipeline.dispatcher.calls.current(), 2);
    assert!(
        w.pipeline
            .metrics
            .encode()
            .contains("aom_terminator_concurrency_limit 2")
    );
    // ...and a request that comes now is called at once: no global hold.
    assert_eq!(
        run_one(&w, message(&[("b", "ex-b")])).await,
        Handled::Settled
    );
    assert_eq!(w.pipeline.dispatcher.api().calls_to("ex-b"), [started]);
    assert_eq!(first.await.expect("joined"), Handled::Settled);
    let events = w.log.events();
    for (id, _) in &ids {
        assert!(events.contains(&committed(id, "succeeded")), "{id}");
    }
}
