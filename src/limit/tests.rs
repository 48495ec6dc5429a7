//! The controller on synthetic signals: single answers with explicit
//! timestamps, then whole runs against simulated APIs (a token bucket, a
//! backend with a queue), event by event on a virtual clock.

use super::*;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

fn answer(t0: Instant, started_ms: u64, answered_ms: u64, overloaded: bool) -> Answer {
    Answer {
        started: at(t0, started_ms),
        answered: at(t0, answered_ms),
        overloaded,
        in_flight: usize::MAX,
    }
}

/// A limit that has grown to its cap of `cap` on good answers.
fn at_the_cap(t0: Instant, cap: usize) -> AdaptiveLimit {
    let mut limit = AdaptiveLimit::new(cap, t0);
    for _ in 0..cap {
        limit.on_answer(answer(t0, 0, 5, false));
    }
    assert_eq!(limit.limit(), cap);
    limit
}

#[test]
fn it_starts_at_128_at_most_and_doubles_each_round_trip_up_to_the_cap() {
    let t0 = Instant::now();
    assert_eq!(AdaptiveLimit::new(64, t0).limit(), 64);
    let mut limit = AdaptiveLimit::new(1000, t0);
    assert_eq!(limit.limit(), 128);
    // A round trip answers every call in flight: each good one adds one.
    let mut rounds = Vec::new();
    for round in 0..5 {
        let in_flight = limit.limit();
        for _ in 0..in_flight {
            limit.on_answer(Answer {
                in_flight,
                ..answer(t0, round * 10, round * 10 + 5, false)
            });
        }
        rounds.push(limit.limit());
    }
    assert_eq!(rounds, [256, 512, 1000, 1000, 1000]);
    for i in 0..10_000 {
        assert_eq!(limit.on_answer(answer(t0, 100 + i, 105 + i, false)), None);
    }
    assert_eq!(limit.limit(), 1000, "an API without limits keeps the cap");
}

#[test]
fn a_window_of_429s_is_one_cut_and_calls_from_before_it_are_ignored() {
    let t0 = Instant::now();
    let mut limit = at_the_cap(t0, 100);
    // One round of 100 calls, 10 of them throttled: one cut, to 70 (at
    // most 0.7 is kept).
    let mut changes = Vec::new();
    for i in 0..100 {
        changes.extend(limit.on_answer(answer(t0, 0, 5 + i / 10, i % 10 == 0)));
    }
    assert_eq!(changes, [70]);
    // Calls started before the cut answer 429 too: they report on the old
    // limit and change nothing.
    for _ in 0..200 {
        assert_eq!(limit.on_answer(answer(t0, 10, 20, true)), None);
    }
    assert_eq!(limit.limit(), 70);
}

#[test]
fn a_window_of_mostly_429s_cuts_deeper_but_at_most_to_a_quarter() {
    let t0 = Instant::now();
    let mut limit = at_the_cap(t0, 200);
    // 60% refused: 40% kept.
    for i in 0..200 {
        limit.on_answer(answer(t0, 1, 5, i % 5 < 3));
    }
    assert_eq!(limit.limit(), 80);
    // Every call of the next window refused: a quarter kept, not nothing.
    for _ in 0..80 {
        limit.on_answer(answer(t0, 6, 10, true));
    }
    assert_eq!(limit.limit(), 20);
    for ms in 11..1000 {
        limit.on_answer(answer(t0, ms, ms + 1, true));
    }
    assert_eq!(limit.limit(), 1, "never below one call");
}

#[test]
fn it_grows_back_slowly_near_the_old_limit_then_faster_up_to_the_cap() {
    let t0 = Instant::now();
    let mut limit = at_the_cap(t0, 1000);
    for _ in 0..1000 {
        limit.on_answer(answer(t0, 1, 10, true));
    }
    assert_eq!(limit.limit(), 250);
    // Well used and answered fine from then on: it grows back along the
    // cubic, which passes its old limit of 1000 about 12 s after the cut
    // ((750 / 0.4)^(1/3)), and stops at the cap.
    let mut seen = Vec::new();
    let mut ms = 20;
    while ms < 30_000 {
        limit.on_answer(Answer {
            in_flight: limit.limit(),
            ..answer(t0, ms, ms + 10, false)
        });
        if ms % 2_000 == 0 {
            seen.push(limit.limit());
        }
        ms += 1;
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen[2] > 700 && seen[2] < 950,
        "concave near the plateau: {seen:?}"
    );
    assert_eq!(limit.limit(), 1000, "{seen:?}");
}

#[test]
fn a_limit_nobody_uses_does_not_grow() {
    let t0 = Instant::now();
    let mut limit = at_the_cap(t0, 100);
    for _ in 0..100 {
        limit.on_answer(answer(t0, 1, 5, true));
    }
    assert_eq!(limit.limit(), 25);
    for ms in 10..60_000 {
        limit.on_answer(Answer {
            in_flight: 3,
            ..answer(t0, ms, ms + 5, false)
        });
    }
    assert_eq!(limit.limit(), 25);
}

#[test]
fn latency_well_above_its_minimum_cuts_small_jitter_does_not() {
    let t0 = Instant::now();
    let mut limit = AdaptiveLimit::new(100, t0);
    // 1 ms to 5 ms: five times the minimum, but within the 5 ms of noise.
    for i in 0..1000 {
        limit.on_answer(answer(t0, i, i + 1 + i % 5, false));
    }
    assert_eq!(limit.limit(), 100);
    // Late answers among fast ones (a busy host): the fastest is still fast.
    for i in 0..1000 {
        let late = if i % 2 == 0 { 60 } else { 1 };
        limit.on_answer(answer(t0, 1000 + i, 1000 + i + late, false));
    }
    assert_eq!(limit.limit(), 100);
    // 6 ms: not more than 5 ms above the minimum. Then 20 ms: the API
    // queues.
    for i in 0..100 {
        limit.on_answer(answer(t0, 2000 + i, 2006 + i, false));
    }
    assert_eq!(limit.limit(), 100);
    for i in 0..100 {
        limit.on_answer(answer(t0, 2200 + i, 2220 + i, false));
    }
    assert_eq!(limit.limit(), 70);
}

#[test]
fn a_small_limit_is_not_judged_on_latency() {
    let t0 = Instant::now();
    let mut limit = AdaptiveLimit::new(8, t0);
    for i in 0..100 {
        limit.on_answer(answer(t0, i, i + 1, false));
    }
    // Windows of eight answers, each 50 times the minimum: too few to
    // tell a queue from a busy host; only 429s, 503s and timeouts count.
    for i in 0..1000 {
        limit.on_answer(answer(t0, 200 + i, 250 + i, false));
    }
    assert_eq!(limit.limit(), 8);
}

// Whole runs against simulated APIs.

/// What the simulated API does with a call that arrives at `now`: its
/// latency and whether it is refused (429/503, answered at once).
trait SimApi {
    fn call(&mut self, now: Duration) -> (Duration, bool);
}

/// The sandbox's `--rate-limit`: a token bucket, a tenth of a second's
/// burst; the calls it lets through take `latency`.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Duration,
    latency: Duration,
}

impl Bucket {
    fn new(rate: f64, latency_ms: u64) -> Self {
        Bucket {
            rate,
            tokens: rate / 10.0,
            last: Duration::ZERO,
            latency: Duration::from_millis(latency_ms),
        }
    }
}

impl SimApi for Bucket {
    fn call(&mut self, now: Duration) -> (Duration, bool) {
        let burst = self.rate / 10.0;
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * self.rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            (self.latency, false)
        } else {
            (Duration::from_micros(200), true)
        }
    }
}

/// The sandbox's `--capacity N --queue-limit Q`: N served at once, FIFO,
/// at most Q waiting; beyond, 503 at once.
struct Backend {
    /// When each of the N places is free next.
    free_at: BinaryHeap<Reverse<Duration>>,
    /// When each call that waits is served.
    waiting: VecDeque<Duration>,
    queue_limit: usize,
    latency: Duration,
}

impl Backend {
    fn new(capacity: usize, queue_limit: usize, latency_ms: u64) -> Self {
        Backend {
            free_at: (0..capacity).map(|_| Reverse(Duration::ZERO)).collect(),
            waiting: VecDeque::new(),
            queue_limit,
            latency: Duration::from_millis(latency_ms),
        }
    }
}

impl SimApi for Backend {
    fn call(&mut self, now: Duration) -> (Duration, bool) {
        while self.waiting.front().is_some_and(|&s| s <= now) {
            self.waiting.pop_front();
        }
        let Some(&Reverse(free)) = self.free_at.peek() else {
            return (Duration::ZERO, true);
        };
        if free > now && self.waiting.len() >= self.queue_limit {
            return (Duration::from_micros(200), true);
        }
        self.free_at.pop();
        let start = free.max(now);
        if start > now {
            self.waiting.push_back(start);
        }
        self.free_at.push(Reverse(start + self.latency));
        (start + self.latency - now, false)
    }
}

/// What one client did in a run.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: u64,
    refused: u64,
    lowest_limit: usize,
}

/// `clients` daemons, each with its own controller and an endless backlog,
/// against one API for `seconds`; each answer takes the daemon `overhead`
/// on top of the API's latency.
fn simulate(api: &mut dyn SimApi, caps: &[usize], seconds: u64) -> Vec<Tally> {
    let t0 = Instant::now();
    let overhead = Duration::from_micros(300);
    let end = Duration::from_secs(seconds);
    let mut limits: Vec<AdaptiveLimit> = caps.iter().map(|&c| AdaptiveLimit::new(c, t0)).collect();
    let mut tallies = vec![
        Tally {
            lowest_limit: usize::MAX,
            ..Tally::default()
        };
        caps.len()
    ];
    let mut in_flight = vec![0usize; caps.len()];
    // (answered, client, started, refused), earliest first.
    let mut pending = BinaryHeap::new();
    let mut now = Duration::ZERO;
    // The clients take turns starting calls, so neither is always first.
    let mut turn = 0;
    while now < end {
        for k in 0..caps.len() {
            let c = (turn + k) % caps.len();
            while in_flight[c] < limits[c].limit() {
                let (latency, refused) = api.call(now);
                in_flight[c] += 1;
                pending.push(Reverse((now + latency + overhead, c, now, refused)));
            }
        }
        turn += 1;
        let Some(Reverse((answered, c, started, refused))) = pending.pop() else {
            break;
        };
        now = answered;
        limits[c].on_answer(Answer {
            started: t0 + started,
            answered: t0 + answered,
            overloaded: refused,
            in_flight: in_flight[c],
        });
        in_flight[c] -= 1;
        let t = &mut tallies[c];
        if refused {
            t.refused += 1;
        } else {
            t.ok += 1;
        }
        t.lowest_limit = t.lowest_limit.min(limits[c].limit());
    }
    tallies
}

#[test]
fn against_a_rate_limit_it_finds_the_rate_with_few_429s() {
    // The benchmark's case: 2,000 calls/s, 5 ms, CONCURRENCY=512.
    let t = simulate(&mut Bucket::new(2000.0, 5), &[512], 20)[0];
    let goodput = t.ok as f64 / 20.0;
    let refused = t.refused as f64 / (t.ok + t.refused) as f64;
    assert!(goodput >= 0.9 * 2000.0, "{goodput}/s: {t:?}");
    assert!(refused <= 0.05, "{:.1}% refused: {t:?}", refused * 100.0);
    assert!(t.lowest_limit < 64, "{t:?}");
}

#[test]
fn against_a_backend_s_capacity_it_keeps_it_busy_with_few_503s() {
    // The benchmark's case: 64 served at once, 64 waiting, 20 ms:
    // 3,200 calls/s at most; CONCURRENCY=1024.
    let t = simulate(&mut Backend::new(64, 64, 20), &[1024], 20)[0];
    let goodput = t.ok as f64 / 20.0;
    let refused = t.refused as f64 / (t.ok + t.refused) as f64;
    assert!(goodput >= 0.85 * 3200.0, "{goodput}/s: {t:?}");
    assert!(refused <= 0.05, "{:.1}% refused: {t:?}", refused * 100.0);
    assert!(t.lowest_limit <= 128, "{t:?}");
}

#[test]
fn two_replicas_share_one_rate_limit_fairly() {
    // One starts at twice the other's cap; they converge all the same.
    let tallies = simulate(&mut Bucket::new(2000.0, 5), &[512, 256], 60);
    let total: u64 = tallies.iter().map(|t| t.ok).sum();
    for t in &tallies {
        let share = t.ok as f64 / total as f64;
        assert!(share >= 0.3, "share {share:.2}: {tallies:?}");
    }
    let goodput = total as f64 / 60.0;
    assert!(goodput >= 0.85 * 2000.0, "{goodput}/s: {tallies:?}");
}
