//! Per-project holds, driven through the pipeline with the fakes of
//! `daemon::tests` on tokio's paused clock.

use super::tests::{Event, FakeApi, committed, lock, message_for, run_one, world};
use super::*;
use crate::domain::ProjectId;

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn refusing(projects: &[&str]) -> FakeApi {
    let api = FakeApi::default();
    lock(&api.refused).extend(projects.iter().map(|p| p.to_string()));
    api
}

fn project(p: &str) -> ProjectId {
    ProjectId::parse(p).expect("valid project id")
}

#[tokio::test(start_paused = true)]
async fn a_401_for_one_project_holds_it_alone_parks_its_requests_and_releases_it() {
    let mut w = world(refusing(&[B]), 3, |_, _| {});
    let holds = Arc::clone(&w.pipeline.dispatcher.holds);
    let (prober, others) = tokio::join!(
        // B's first request finds B refused: it probes, in memory.
        run_one(&w, message_for(&[("b1", B, "ex-b1")])),
        async {
            // Let the prober make its first call.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(holds.held(), vec![B.to_owned()]);
            let a1 = run_one(&w, message_for(&[("a1", A, "ex-a1")])).await;
            // B's later requests are parked without a call, A's go on.
            let b2 = run_one(&w, message_for(&[("b2", B, "ex-b2")])).await;
            let a2 = run_one(&w, message_for(&[("a2", A, "ex-a2")])).await;
            assert!(holds.is_open(), "A answers: the daemon is not paused");
            // The credentials come to cover B: the next probe goes through.
            lock(&w.pipeline.dispatcher.api().refused).clear();
            [a1, b2, a2]
        }
    );
    assert_eq!(prober, Handled::Settled);
    assert_eq!(others, [Handled::Settled; 3]);
    let events = w.log.events();
    for done in [committed("a1", "succeeded"), committed("a2", "succeeded")] {
        assert!(events.contains(&done), "{events:?}");
    }
    assert!(
        events.contains(&Event::Parked("b2".to_owned())),
        "{events:?}"
    );
    assert!(events.contains(&committed("b1", "succeeded")), "{events:?}");
    // A's requests finished while B was held: before b1's verdict.
    let at = |e: &Event| events.iter().position(|x| x == e).expect("present");
    assert!(at(&committed("a2", "succeeded")) < at(&committed("b1", "succeeded")));
    let calls = w.pipeline.dispatcher.api().executions();
    assert!(
        !calls.contains(&"ex-b2".to_owned()),
        "a parked request is not sent: {calls:?}"
    );
    assert!(holds.held().is_empty());
    assert_eq!(
        w.released.try_recv().ok(),
        Some(project(B)),
        "the mover is told"
    );
}

#[tokio::test(start_paused = true)]
async fn when_every_project_seen_is_refused_the_daemon_pauses_until_a_probe_passes() {
    let w = world(refusing(&[A]), 3, |_, _| {});
    let holds = Arc::clone(&w.pipeline.dispatcher.holds);
    let (handled, ()) = tokio::join!(run_one(&w, message_for(&[("a1", A, "ex-a1")])), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!holds.is_open(), "the only project is refused: paused");
        assert!(
            w.pipeline
                .metrics
                .encode()
                .contains("aom_terminator_paused 1")
        );
        lock(&w.pipeline.dispatcher.api().refused).clear();
    });
    assert_eq!(handled, Handled::Settled);
    assert!(holds.is_open(), "resumed");
    assert!(w.log.events().contains(&committed("a1", "succeeded")));
}

#[tokio::test(start_paused = true)]
async fn a_project_the_credentials_cannot_cover_is_held_without_a_call() {
    let api = FakeApi::default();
    lock(&api.not_covered).insert(B.to_owned());
    let w = world(api, 3, |_, _| {});
    let holds = Arc::clone(&w.pipeline.dispatcher.holds);
    assert_eq!(
        run_one(&w, message_for(&[("a1", A, "ex-a1")])).await,
        Handled::Settled
    );
    let (handled, ()) = tokio::join!(run_one(&w, message_for(&[("b1", B, "ex-b1")])), async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(holds.held(), vec![B.to_owned()]);
        let metrics = w.pipeline.metrics.encode();
        assert!(
            metrics.contains(&format!(
                "aom_terminator_projects_held{{project_id=\"{B}\"}} 1"
            )),
            "{metrics}"
        );
        let b2 = run_one(&w, message_for(&[("b2", B, "ex-b2")])).await;
        assert_eq!(b2, Handled::Settled);
        lock(&w.pipeline.dispatcher.api().not_covered).clear();
    });
    assert_eq!(handled, Handled::Settled);
    let calls = w.pipeline.dispatcher.api().executions();
    // a1, then b1 once it is covered; never b2 (parked).
    assert_eq!(calls, ["ex-a1", "ex-b1"]);
    let events = w.log.events();
    assert!(
        events.contains(&Event::Parked("b2".to_owned())),
        "{events:?}"
    );
    assert!(events.contains(&committed("b1", "succeeded")), "{events:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_region_cannot_be_found_is_rejected_without_a_call() {
    let mut api = FakeApi::default();
    api.unroutable.insert("ex-1".to_owned());
    let w = world(api, 3, |_, _| {});
    assert_eq!(
        run_one(&w, message_for(&[("r1", A, "ex-1")])).await,
        Handled::Settled
    );
    assert!(w.pipeline.dispatcher.api().calls().is_empty());
    assert_eq!(
        w.log.events(),
        vec![committed("r1", "rejected"), Event::Acked]
    );
}
