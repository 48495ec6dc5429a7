//! The pipeline's rules and the dispatcher, driven without RabbitMQ or
//! Postgres: in-memory fakes for the audit, the dead-letter queue, the ack
//! and the API (on tokio's paused clock, so schedules are exact), and once
//! the real client against the in-process sandbox.

use super::in_flight::InFlight;
use super::*;
use crate::aom::CallError;
use crate::audit::{Record, Recorded};
use crate::domain::{
    Attempt, DeadLetter, ErrorKind, Header, ProjectId, TerminationRequest, Verdict,
};
use crate::sandbox::{Sandbox, SandboxArgs};
use crate::settings::{AuthSettings, ConcurrencyControl};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

const PROJECT: &str = "0123456789abcdef0123456789abcdef";

/// What happened, in order, across every fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Event {
    /// A dead letter confirmed, by the request it is about (or `rejected`).
    DeadLettered(String),
    /// A request parked (confirmed), by its request id.
    Parked(String),
    /// An outcome committed: request id and outcome (`skipped` for a skip).
    Committed(String, String),
    Acked,
}

#[derive(Default)]
pub(super) struct Log(Mutex<Vec<Event>>);

impl Log {
    fn push(&self, e: Event) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    pub(super) fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub(super) struct FakeStore {
    log: Arc<Log>,
    commits_fail: bool,
    finals: HashSet<String>,
    /// What the audit has of earlier deliveries, by request id.
    pub(super) recorded: HashMap<String, Recorded>,
}

impl Store for FakeStore {
    async fn commit(&self, record: Record) -> bool {
        if self.commits_fail {
            return false;
        }
        let (id, what) = match record {
            Record::Final(f) => (f.request_id, f.outcome.as_str().to_owned()),
            Record::Skipped { request_id } => (request_id, "skipped".to_owned()),
            Record::Unfinished(u) => (u.request_id, "unfinished".to_owned()),
        };
        self.log.push(Event::Committed(id, what));
        true
    }

    async fn already_final(&self, ids: Vec<String>) -> Option<HashSet<String>> {
        Some(
            ids.into_iter()
                .filter(|id| self.finals.contains(id))
                .collect(),
        )
    }

    async fn attempts_recorded(&self, ids: &[String]) -> Option<HashMap<String, Recorded>> {
        Some(
            ids.iter()
                .filter_map(|id| Some((id.clone(), *self.recorded.get(id)?)))
                .collect(),
        )
    }
}

pub(super) struct FakeLetters {
    log: Arc<Log>,
    confirmed: bool,
}

impl Letters for FakeLetters {
    async fn publish(&self, letter: &DeadLetter, _held: &CancellationToken) -> bool {
        if !self.confirmed {
            return false;
        }
        self.log.push(Event::DeadLettered(about(letter)));
        true
    }

    async fn park(&self, letter: &DeadLetter, _held: &CancellationToken) -> bool {
        if !self.confirmed {
            return false;
        }
        self.log.push(Event::Parked(about(letter)));
        true
    }
}

/// The request a letter is about (or `rejected`).
fn about(letter: &DeadLetter) -> String {
    letter
        .headers
        .iter()
        .find_map(|(name, value)| match (name, value) {
            (&"x-aom-request-id", Header::Text(id)) => Some(id.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "rejected".to_owned())
}

struct FakeAck(Arc<Log>);

impl Acknowledge for FakeAck {
    fn ack(self) {
        self.0.push(Event::Acked);
    }
}

/// Answers by execution id from a script (then 200), 401 for the projects
/// it is told to refuse, records each call's time, and can hold calls
/// until released.
#[derive(Default)]
pub(super) struct FakeApi {
    script: Mutex<HashMap<String, VecDeque<u16>>>,
    /// Projects answered 401 whatever the script says.
    pub(super) refused: Mutex<HashSet<String>>,
    /// Projects the credentials are known not to cover: no call is made.
    pub(super) not_covered: Mutex<HashSet<String>>,
    /// Execution ids whose region cannot be found: no call is made.
    pub(super) unroutable: HashSet<String>,
    calls: Mutex<Vec<(String, Instant)>>,
    /// Set: every call waits for a `notify_one` before answering.
    hold: Option<Arc<Notify>>,
    /// What `rejected` answers: whether a new credential is to be had.
    renews: bool,
    called: Notify,
}

impl FakeApi {
    pub(super) fn scripted(script: &[(&str, &[u16])]) -> Self {
        FakeApi {
            script: Mutex::new(
                script
                    .iter()
                    .map(|(ex, codes)| (ex.to_string(), codes.iter().copied().collect()))
                    .collect(),
            ),
            ..FakeApi::default()
        }
    }

    /// The execution ids called, in order.
    pub(super) fn executions(&self) -> Vec<String> {
        self.calls().into_iter().map(|(ex, _)| ex).collect()
    }

    pub(super) fn calls(&self) -> Vec<(String, Instant)> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When each call for execution `ex` was made.
    pub(super) fn calls_to(&self, ex: &str) -> Vec<Instant> {
        self.calls()
            .into_iter()
            .filter(|(e, _)| e == ex)
            .map(|(_, t)| t)
            .collect()
    }
}

/// In a script: a 503 with `Retry-After: 1` (the backend's queue is full).
const BUSY: u16 = 1503;

/// An attempt as the AOM adapter classifies `status` (429 asks for 2 s).
pub(super) fn answer(status: u16) -> Attempt {
    let (verdict, error_kind) = match status {
        BUSY => (
            Verdict::Retryable {
                retry_after: Some(Duration::from_secs(1)),
            },
            Some(ErrorKind::ServerError),
        ),
        200..=299 => (Verdict::Succeeded, None),
        401 => (Verdict::Unauthorized, Some(ErrorKind::Unauthorized)),
        429 => (
            Verdict::Retryable {
                retry_after: Some(Duration::from_secs(2)),
            },
            Some(ErrorKind::Throttled),
        ),
        400..=499 => (Verdict::Permanent, Some(ErrorKind::ClientError)),
        _ => (
            Verdict::Retryable { retry_after: None },
            Some(ErrorKind::ServerError),
        ),
    };
    Attempt {
        started_at: chrono::Utc::now(),
        latency: Duration::ZERO,
        http_status: Some(if status == BUSY { 503 } else { status }),
        error_kind,
        error_code: None,
        error_msg: None,
        body_excerpt: None,
        verdict,
        auth_generation: 0,
        region: None,
        endpoint_host: None,
    }
}

impl Api for FakeApi {
    async fn terminate(&self, req: &TerminationRequest) -> Result<Attempt, CallError> {
        let ex = req.execution_id.as_str().to_owned();
        if self.unroutable.contains(&ex) {
            return Err(CallError::Unroutable(format!("no region for {ex}")));
        }
        let project = req.project_id.as_str();
        if lock(&self.not_covered).contains(project) {
            return Err(CallError::NotCovered {
                project: project.to_owned(),
                why: "not in the token's scope".to_owned(),
            });
        }
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((ex.clone(), Instant::now()));
        self.called.notify_waiters();
        if let Some(hold) = &self.hold {
            hold.notified().await;
        }
        if lock(&self.refused).contains(project) {
            return Ok(answer(401));
        }
        let status = self
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&ex)
            .and_then(VecDeque::pop_front)
            .unwrap_or(200);
        Ok(answer(status))
    }

    fn rejected(&self, _project: &ProjectId, _generation: u64) -> bool {
        self.renews
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) struct World<A> {
    pub(super) pipeline: Pipeline<FakeStore, FakeLetters, A>,
    pub(super) log: Arc<Log>,
    /// The projects released, as the mover would receive them.
    pub(super) released: tokio::sync::mpsc::UnboundedReceiver<ProjectId>,
}

pub(super) fn world<A: Api>(
    api: A,
    max_attempts: u32,
    tune: impl FnOnce(&mut FakeStore, &mut FakeLetters),
) -> World<A> {
    let hour = Duration::from_secs(3600);
    world_with(api, max_attempts, hour, ConcurrencyControl::Adaptive, tune)
}

fn world_with<A: Api>(
    api: A,
    max_attempts: u32,
    throttle_give_up: Duration,
    control: ConcurrencyControl,
    tune: impl FnOnce(&mut FakeStore, &mut FakeLetters),
) -> World<A> {
    let log = Arc::new(Log::default());
    let mut store = FakeStore {
        log: Arc::clone(&log),
        commits_fail: false,
        finals: HashSet::new(),
        recorded: HashMap::new(),
    };
    let mut letters = FakeLetters {
        log: Arc::clone(&log),
        confirmed: true,
    };
    tune(&mut store, &mut letters);
    let metrics = Arc::new(Metrics::new());
    let policy = RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
        max_attempts,
        throttle_give_up,
    };
    let (holds, released) = Holds::new(Arc::clone(&metrics));
    let dispatcher = Dispatcher::new(
        api,
        policy,
        Limits {
            concurrency: 8,
            control,
            rate_limit: None,
        },
        Arc::clone(&metrics),
        Arc::new(holds),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    World {
        pipeline: Pipeline {
            dispatcher,
            store,
            letters,
            in_flight: InFlight::default(),
            concurrency: 8,
            source_queue: "q".to_owned(),
            metrics,
        },
        log,
        released,
    }
}

fn message(requests: &[(&str, &str)]) -> Message {
    let requests: Vec<_> = requests
        .iter()
        .map(|(id, ex)| (*id, PROJECT, *ex))
        .collect();
    message_for(&requests)
}

/// A message of `(request_id, project_id, execution_id)` requests.
pub(super) fn message_for(requests: &[(&str, &str, &str)]) -> Message {
    let elements: Vec<serde_json::Value> = requests
        .iter()
        .map(|(id, project, ex)| {
            serde_json::json!({
                "request_id": id, "project_id": project, "workflow_id": "wf", "execution_id": ex
            })
        })
        .collect();
    let body = match elements.as_slice() {
        [one] => one.to_string(),
        _ => serde_json::json!({ "requests": elements }).to_string(),
    };
    Message {
        body: body.into_bytes(),
        message_id: None,
        redelivered: false,
    }
}

pub(super) async fn run_one<A: Api>(w: &World<A>, msg: Message) -> Handled {
    run_held(w, msg, &CancellationToken::new()).await
}

/// Like `run_one`, for a message that the broker takes back when `held` fires.
async fn run_held<A: Api>(w: &World<A>, msg: Message, held: &CancellationToken) -> Handled {
    let parsed = ParsedMessage::parse(&msg.body, None);
    work(&w.pipeline, msg, parsed, FakeAck(Arc::clone(&w.log)), held).await
}

pub(super) fn committed(id: &str, outcome: &str) -> Event {
    Event::Committed(id.to_owned(), outcome.to_owned())
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_is_confirmed_before_its_outcome_is_committed_and_then_acked() {
    let w = world(FakeApi::scripted(&[("ex-1", &[500, 500])]), 2, |_, _| {});
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1")])).await,
        Handled::Settled
    );
    assert_eq!(
        w.log.events(),
        vec![
            Event::DeadLettered("r1".to_owned()),
            committed("r1", "failed_retries_exhausted"),
            Event::Acked
        ]
    );

    // A batch with a bad element: its dead letter, then its rejection, then
    // the good one's outcome; the ack comes last.
    let w = world(FakeApi::default(), 2, |_, _| {});
    // An empty execution_id is invalid.
    let msg = message(&[("ok", "ex-ok"), ("bad", "")]);
    assert_eq!(run_one(&w, msg).await, Handled::Settled);
    let events = w.log.events();
    let at = |e: &Event| events.iter().position(|x| x == e).expect("happened");
    assert!(at(&Event::DeadLettered("rejected".to_owned())) < at(&committed("bad", "rejected")));
    assert_eq!(events.last(), Some(&Event::Acked));
    assert!(events.contains(&committed("ok", "succeeded")));
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_not_confirmed_commits_nothing_and_acks_nothing() {
    let w = world(
        FakeApi::scripted(&[("ex-1", &[500, 500])]),
        2,
        |_, letters| {
            letters.confirmed = false;
        },
    );
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1")])).await,
        Handled::Unsettled
    );
    assert_eq!(
        w.log.events(),
        vec![committed("r1", "unfinished")],
        "its calls recorded, no outcome committed, no ack"
    );
}

#[tokio::test(start_paused = true)]
async fn a_commit_that_fails_leaves_the_message_unacked() {
    let w = world(FakeApi::default(), 2, |store, _| store.commits_fail = true);
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1"), ("r2", "ex-2")])).await,
        Handled::Unsettled
    );
    assert!(!w.log.events().contains(&Event::Acked));
}

#[tokio::test(start_paused = true)]
async fn a_request_already_final_is_skipped_without_a_call() {
    let w = world(FakeApi::default(), 2, |store, _| {
        store.finals.insert("done".to_owned());
    });
    let handled = run_one(&w, message(&[("done", "ex-done"), ("new", "ex-new")])).await;
    assert_eq!(handled, Handled::Settled);
    let calls = w.pipeline.dispatcher.api().executions();
    assert_eq!(calls, ["ex-new"]);
    assert!(w.log.events().contains(&committed("done", "skipped")));
}

#[tokio::test(start_paused = true)]
async fn the_401_probe_backs_off_from_one_second_and_resumes_by_itself() {
    let w = world(
        FakeApi::scripted(&[("ex-1", &[401, 401, 401])]),
        5,
        |_, _| {},
    );
    let started = Instant::now();
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1")])).await,
        Handled::Settled
    );
    let at: Vec<Duration> = w
        .pipeline
        .dispatcher
        .api()
        .calls()
        .iter()
        .map(|(_, t)| *t - started)
        .collect();
    // The first call, then probes 1 s, 2 s and 4 s apart; the fourth call
    // is accepted and the request succeeds. No 401 counted as an attempt.
    let secs: Vec<u64> = at.iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [0, 1, 3, 7]);
    assert!(w.pipeline.dispatcher.holds.is_open(), "resumed");
    assert!(w.pipeline.dispatcher.holds.held().is_empty(), "released");
    assert!(w.log.events().contains(&committed("r1", "succeeded")));
}

#[tokio::test(start_paused = true)]
async fn a_401_is_retried_at_once_when_a_new_credential_is_to_be_had() {
    let api = FakeApi {
        renews: true,
        ..FakeApi::scripted(&[("ex-1", &[401, 500, 500])])
    };
    // Three counted attempts allowed: 500, 500, then 200. Had the 401
    // counted, the attempts would have run out on the second 500.
    let w = world(api, 3, |_, _| {});
    let started = Instant::now();
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1")])).await,
        Handled::Settled
    );
    let calls = w.pipeline.dispatcher.api().calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(
        calls[1].1 - started,
        Duration::ZERO,
        "no probe wait after a renewal"
    );
    assert!(w.log.events().contains(&committed("r1", "succeeded")));
}

#[tokio::test(start_paused = true)]
async fn retryable_answers_count_until_the_attempts_run_out() {
    let w = world(
        FakeApi::scripted(&[("ex-1", &[500, 503, 500, 500])]),
        3,
        |_, _| {},
    );
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1")])).await,
        Handled::Settled
    );
    assert_eq!(w.pipeline.dispatcher.api().calls().len(), 3);
    assert!(
        w.log
            .events()
            .contains(&committed("r1", "failed_retries_exhausted"))
    );

    let w = world(FakeApi::scripted(&[("ex-1", &[500, 500])]), 3, |_, _| {});
    assert_eq!(
        run_one(&w, message(&[("r1", "ex-1")])).await,
        Handled::Settled
    );
    assert_eq!(w.pipeline.dispatcher.api().calls().len(), 3);
    assert!(w.log.events().contains(&committed("r1", "succeeded")));
}

#[tokio::test(start_paused = true)]
async fn with_a_fixed_limit_a_429_holds_every_call_for_its_retry_after() {
    let w = Arc::new(world_with(
        FakeApi::scripted(&[("ex-a", &[429])]),
        3,
        Duration::from_secs(3600),
        ConcurrencyControl::Fixed,
        |_, _| {},
    ));
    let started = Instant::now();
    let first = {
        let w = Arc::clone(&w);
        tokio::spawn(async move { run_one(&w, message(&[("a", "ex-a")])).await })
    };
    // Once A has been throttled, B starts: its call waits out A's hold.
    while w.pipeline.dispatcher.api().calls().is_empty() {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        run_one(&w, message(&[("b", "ex-b")])).await,
        Handled::Settled
    );
    assert_eq!(first.await.expect("joined"), Handled::Settled);
    let calls = w.pipeline.dispatcher.api().calls();
    let b = calls
        .iter()
        .find(|(ex, _)| ex == "ex-b")
        .expect("B was called");
    assert!(
        b.1 - started >= Duration::from_secs(2),
        "B called {:?} in",
        b.1 - started
    );
    let a: Vec<_> = calls.iter().filter(|(ex, _)| ex == "ex-a").collect();
    assert_eq!(a.len(), 2, "A retried once");
    assert!(a[1].1 - started >= Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn the_same_request_id_in_flight_twice_is_sent_once() {
    let hold = Arc::new(Notify::new());
    let api = FakeApi {
        hold: Some(Arc::clone(&hold)),
        ..FakeApi::default()
    };
    let w = Arc::new(world(api, 3, |_, _| {}));
    let spawn = |w: &Arc<World<FakeApi>>| {
        let w = Arc::clone(w);
        tokio::spawn(async move { run_one(&w, message(&[("same", "ex-same")])).await })
    };
    let first = spawn(&w);
    let called = w.pipeline.dispatcher.api().called.notified();
    called.await;
    let second = spawn(&w);
    // Let the second reach its claim before the first's call returns.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    hold.notify_one();
    assert_eq!(first.await.expect("joined"), Handled::Settled);
    assert_eq!(second.await.expect("joined"), Handled::Settled);
    assert_eq!(w.pipeline.dispatcher.api().calls().len(), 1, "sent once");
    let events = w.log.events();
    assert!(events.contains(&committed("same", "succeeded")));
    assert!(events.contains(&committed("same", "skipped")));
    assert_eq!(events.iter().filter(|e| **e == Event::Acked).count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_message_taken_back_starts_no_more_requests_and_its_calls_finish() {
    let hold = Arc::new(Notify::new());
    let api = FakeApi {
        hold: Some(Arc::clone(&hold)),
        ..FakeApi::default()
    };
    let w = Arc::new(world(api, 3, |_, _| {}));
    let held = CancellationToken::new();
    let ids: Vec<(String, String)> = (0..20)
        .map(|i| (format!("r{i}"), format!("ex-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = ids.iter().map(|(r, e)| (r.as_str(), e.as_str())).collect();
    let task = {
        let (w, held, msg) = (Arc::clone(&w), held.clone(), message(&refs));
        tokio::spawn(async move { run_held(&w, msg, &held).await })
    };
    // The world's per-message concurrency is 8: eight calls are in flight.
    while w.pipeline.dispatcher.api().calls().len() < 8 {
        tokio::task::yield_now().await;
    }
    held.cancel();
    for _ in 0..8 {
        hold.notify_one();
        tokio::task::yield_now().await;
    }
    assert_eq!(task.await.expect("joined"), Handled::Unsettled);
    assert_eq!(
        w.pipeline.dispatcher.api().calls().len(),
        8,
        "no request started after"
    );
    let events = w.log.events();
    let succeeded = events
        .iter()
        .filter(|e| matches!(e, Event::Committed(_, o) if o == "succeeded"))
        .count();
    assert_eq!(
        succeeded, 8,
        "the calls in flight finished and were committed"
    );
    assert!(!events.contains(&Event::Acked));
}

#[tokio::test(start_paused = true)]
async fn a_retry_does_not_start_once_the_message_is_taken_back() {
    let w = Arc::new(world(FakeApi::scripted(&[("ex-1", &[500])]), 5, |_, _| {}));
    let held = CancellationToken::new();
    let task = {
        let (w, held) = (Arc::clone(&w), held.clone());
        tokio::spawn(async move { run_held(&w, message(&[("r1", "ex-1")]), &held).await })
    };
    while w.pipeline.dispatcher.api().calls().is_empty() {
        tokio::task::yield_now().await;
    }
    held.cancel();
    assert_eq!(task.await.expect("joined"), Handled::Unsettled);
    assert_eq!(w.pipeline.dispatcher.api().calls().len(), 1);
    assert_eq!(w.log.events(), vec![committed("r1", "unfinished")]);
}

#[tokio::test]
async fn the_broker_dead_letter_port_fails_fast_once_the_message_is_taken_back() {
    use crate::settings::BrokerArgs;
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        broker: BrokerArgs,
    }
    let settings = Args::parse_from(["x"]).broker.settings().expect("defaults");
    // No session attached: a publish would retry until one is.
    let letters = ports::BrokerLetters {
        dead_letters: DeadLetters::new(settings.clone()),
        parking: crate::broker::Parking::new(settings),
        abort: CancellationToken::new(),
    };
    let letter = DeadLetter {
        body: b"{}".to_vec(),
        content_type: "application/json",
        headers: Vec::new(),
    };
    let held = CancellationToken::new();
    let publish = letters.publish(&letter, &held);
    tokio::pin!(publish);
    tokio::select! {
        _ = &mut publish => panic!("published without a session"),
        () = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    held.cancel();
    let gave_up = tokio::time::timeout(Duration::from_secs(1), publish).await;
    assert_eq!(gave_up.ok(), Some(false), "gave up at once");
}

#[tokio::test]
async fn the_real_client_against_the_sandbox_classifies_and_retries() {
    let sandbox = Sandbox::new(&SandboxArgs {
        expected_token: Some("t".to_owned()),
        ..SandboxArgs::default()
    })
    .bind("127.0.0.1:0".parse().expect("addr"))
    .await
    .expect("sandbox");
    let endpoint = url::Url::parse(&sandbox.base_url()).expect("url");
    let client = TerminateClient::new(
        &endpoint,
        &AuthSettings::Token("t".to_owned().into()),
        HttpOptions::new(Duration::from_secs(5), 4),
    )
    .expect("client");
    let w = world(client, 3, |_, _| {});
    let msg = message(&[("flaky", "flaky-a"), ("gone", "e404-a"), ("down", "e500-a")]);
    assert_eq!(run_one(&w, msg).await, Handled::Settled);
    let events = w.log.events();
    assert!(
        events.contains(&committed("flaky", "succeeded")),
        "{events:?}"
    );
    assert!(
        events.contains(&committed("gone", "failed_permanent")),
        "{events:?}"
    );
    assert!(
        events.contains(&committed("down", "failed_retries_exhausted")),
        "{events:?}"
    );
    assert_eq!(sandbox.sandbox().calls_for(PROJECT, "wf", "e500-a"), 3);
    assert_eq!(events.last(), Some(&Event::Acked));
}

mod throttling;
