//! A randomized fault run: two daemons (real binaries) work through 20,000
//! requests in singles and batches while a seeded schedule SIGKILLs and
//! SIGTERMs them, cuts their broker connections (each daemon has its own
//! proxy: only this test's connections), takes this test's database away
//! and hangs the API. Then: nothing lost, exactly one final outcome per
//! request, every exhausted request dead-lettered, the queue empty, and
//! calls repeated within the bound the README states.
//!
//! The seed is printed; `CHAOS_SEED=N cargo test --test faults chaos`
//! replays a schedule.

use super::{amqp_addr, outcome_counts, proxy};
use crate::helpers::*;
use aom_terminator::sandbox::SandboxArgs;
use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Child;

const REQUESTS: usize = 20_000;
const CONCURRENCY: u64 = 64;
const PREFETCH_REQUESTS: u64 = 2_000;
/// How long the schedule runs faults before letting the work finish.
const CHAOS_FOR: Duration = Duration::from_secs(30);

/// Request `i`'s execution: 1% always 500 (exhausted, dead-lettered), 1%
/// 404, 2% one 500 then 200, the rest 200.
fn execution(i: usize) -> String {
    match i % 100 {
        0 => format!("e500-{i}"),
        1 => format!("e404-{i}"),
        2 | 3 => format!("flaky-{i}"),
        _ => format!("ex-{i}"),
    }
}

/// The calls an execution needs when nothing goes wrong (`None`: any number).
fn calls_needed(execution: &str) -> Option<u64> {
    match execution.split('-').next() {
        Some("e500") => None,
        Some("flaky") => Some(2),
        _ => Some(1),
    }
}

/// A daemon as a real binary, its broker connection through a proxy of its
/// own, its logs in the temporary directory (kept if the test fails, for
/// the post-mortem; removed when it is dropped after a pass).
pub struct Daemon {
    pub child: Option<Child>,
    pub proxy: proxy::Proxy,
    pub starts: u32,
    logs: Vec<std::path::PathBuf>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            for log in &self.logs {
                let _ = std::fs::remove_file(log);
            }
        }
    }
}

impl Daemon {
    pub async fn new(env: &TestEnv) -> Daemon {
        Daemon {
            child: None,
            proxy: proxy::Proxy::start(amqp_addr(&env.amqp_url)).await,
            starts: 0,
            logs: Vec::new(),
        }
    }

    pub fn start(&mut self, env: &TestEnv, api: &str, seed: u64, name: &str) {
        self.starts += 1;
        let log =
            std::env::temp_dir().join(format!("aomt-chaos-{seed}-{name}-{}.log", self.starts));
        let stderr = std::fs::File::create(&log)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        self.logs.push(log);
        let child = binary()
            .arg("run")
            .envs(env.binary_env())
            .env(
                "AMQP_URL",
                format!("amqp://guest:guest@{}/%2f", self.proxy.addr),
            )
            .env("AOM_ENDPOINT", api)
            .env("CONCURRENCY", CONCURRENCY.to_string())
            .env("PREFETCH", "32")
            .env("PREFETCH_REQUESTS", PREFETCH_REQUESTS.to_string())
            .env("HTTP_TIMEOUT_MS", "1000")
            .env("SHUTDOWN_GRACE", "5")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn a daemon");
        self.child = Some(child);
    }

    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    pub async fn wait(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|s| s.code())
    }
}

/// What the schedule did, for the repeat bound.
#[derive(Debug, Default)]
struct Done {
    kills: u64,
    terms: u64,
    cuts: u64,
    db_outages: u64,
    hangs: u64,
}

async fn database_away(env: &TestEnv, away: bool) {
    let db = env.database_name();
    let admin = env.admin_pool().await;
    let allow = if away { "false" } else { "true" };
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS {allow}"))
        .execute(&admin)
        .await
        .expect("toggle connections");
    if away {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&db)
        .execute(&admin)
        .await
        .expect("end the database's connections");
    }
    admin.close().await;
}

#[tokio::test]
async fn chaos_loses_nothing_and_repeats_within_the_bound() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("chaos seed: {seed} (replay: CHAOS_SEED={seed} cargo test --test faults chaos)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(20),
        ..SandboxArgs::default()
    })
    .await;
    let api_proxy = proxy::Proxy::start(env.sandbox.local_addr()).await;
    let api = format!("http://{}", api_proxy.addr);

    // Half in batches of 1,000, half as single messages.
    let reqs: Vec<(String, String)> = (0..REQUESTS)
        .map(|i| (format!("c{i}"), execution(i)))
        .collect();
    let (batched, singles) = reqs.split_at(REQUESTS / 2);
    for chunk in batched.chunks(1000) {
        let elements: Vec<String> = chunk.iter().map(|(r, e)| request(r, e)).collect();
        env.publish(&batch(&elements), None).await;
    }
    for (r, e) in singles {
        env.publish(&request(r, e), None).await;
    }

    let mut daemons = Vec::new();
    for name in ["a", "b"] {
        let mut d = Daemon::new(&env).await;
        d.start(&env, &api, seed, name);
        daemons.push(d);
    }
    let names = ["a", "b"];

    let mut done = Done::default();
    let started = Instant::now();
    while started.elapsed() < CHAOS_FOR && env.outcomes().await < REQUESTS as i64 {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        let which = rng.usize(..2);
        let hold = Duration::from_millis(rng.u64(300..2000));
        match rng.u8(..5) {
            0 => {
                done.kills += 1;
                eprintln!("chaos: SIGKILL daemon {}", names[which]);
                daemons[which].signal("-KILL");
                let _ = daemons[which].wait().await;
                tokio::time::sleep(hold).await;
                daemons[which].start(&env, &api, seed, names[which]);
            }
            1 => {
                done.terms += 1;
                eprintln!("chaos: SIGTERM daemon {}", names[which]);
                daemons[which].signal("-TERM");
                let code = daemons[which].wait().await;
                assert!(
                    code == Some(0),
                    "seed {seed}: daemon {} exited {code:?} after SIGTERM",
                    names[which]
                );
                daemons[which].start(&env, &api, seed, names[which]);
            }
            2 => {
                done.cuts += 1;
                eprintln!("chaos: broker cut for daemon {} ({hold:?})", names[which]);
                daemons[which].proxy.cut();
                tokio::time::sleep(hold).await;
                daemons[which].proxy.restore();
            }
            3 => {
                done.db_outages += 1;
                eprintln!("chaos: database away ({hold:?})");
                database_away(&env, true).await;
                tokio::time::sleep(hold).await;
                database_away(&env, false).await;
            }
            _ => {
                done.hangs += 1;
                eprintln!("chaos: API hangs ({hold:?})");
                api_proxy.hang();
                tokio::time::sleep(hold).await;
                api_proxy.thaw();
            }
        }
    }
    eprintln!(
        "chaos: schedule over after {:?}: {done:?}",
        started.elapsed()
    );

    // Everything restored: the work finishes.
    eventually_for(
        &format!("seed {seed}: every request has an outcome"),
        Duration::from_secs(240),
        || async { env.outcomes().await == REQUESTS as i64 },
    )
    .await;
    eventually_for(
        &format!("seed {seed}: the queue is empty"),
        Duration::from_secs(60),
        || async { env.ready_requests().await == 0 },
    )
    .await;

    // Exactly one final outcome per request (the primary key), none lost.
    let ids: BTreeSet<String> =
        sqlx::query_scalar::<_, String>("SELECT request_id FROM termination_outcomes")
            .fetch_all(&env.db)
            .await
            .expect("outcomes")
            .into_iter()
            .collect();
    let want: BTreeSet<String> = reqs.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(ids, want, "seed {seed}: lost or unknown requests");
    let counts = outcome_counts(&env).await;
    eprintln!("chaos: outcomes {counts:?}");

    // Every exhausted request was dead-lettered (a crash between the dead
    // letter and the commit may have published one twice).
    let exhausted: BTreeSet<String> = sqlx::query_scalar::<_, String>(
        "SELECT request_id FROM termination_outcomes WHERE outcome = 'failed_retries_exhausted'",
    )
    .fetch_all(&env.db)
    .await
    .expect("exhausted")
    .into_iter()
    .collect();
    let dead: BTreeSet<String> = env
        .drain_dead_letters()
        .await
        .iter()
        .filter_map(|(headers, _)| header(headers, "x-aom-request-id"))
        .collect();
    assert_eq!(
        dead, exhausted,
        "seed {seed}: exhausted but not dead-lettered"
    );

    // Calls repeated beyond what each execution needs, against the bound.
    let sandbox = env.sandbox.sandbox();
    let mut repeated = 0u64;
    let mut worst: HashMap<String, u64> = HashMap::new();
    for (r, ex) in &reqs {
        if let Some(needed) = calls_needed(ex) {
            let extra = sandbox
                .calls_for(PROJECT, "wf-test", ex)
                .saturating_sub(needed);
            if extra > 0 {
                repeated += extra;
                worst.insert(r.clone(), extra);
            }
        }
    }
    // The README's bound: a cut repeats at most the calls in flight
    // (CONCURRENCY); a SIGKILL, or a SIGTERM whose grace ran out, at most
    // the requests the daemon held (PREFETCH_REQUESTS); a database outage
    // or a hung API none by itself.
    let bound = done.cuts * CONCURRENCY + (done.kills + done.terms) * PREFETCH_REQUESTS;
    eprintln!("chaos: {repeated} calls repeated; the bound for {done:?} is {bound}");
    assert!(
        repeated <= bound,
        "seed {seed}: {repeated} calls repeated, over the bound {bound} ({done:?})"
    );

    for d in &mut daemons {
        d.signal("-TERM");
        let code = d.wait().await;
        assert_eq!(code, Some(0), "seed {seed}: a daemon did not stop cleanly");
    }
}
