//! `aom-terminator demo`: the main job end to end, in one command, on the
//! embedded fake API. It starts the sandbox in-process, applies the audit
//! migrations, publishes a mass cancellation through `enqueue`'s publishing
//! path, runs the daemon in-process until every request has its outcome,
//! prints `report`'s table for the run and the SQL to run next, and deletes
//! its queues.
//!
//! It drives a daemon, a tool and the sandbox together, so it sits at the
//! top of the layering beside `cli` (`tests/layout.rs`); `main` runs it.

use crate::audit::Audit;
use crate::audit::report::{Filter, ReportError, Reports, reachable};
use crate::broker::{Admin, BrokerError};
use crate::daemon;
use crate::domain::{ExecutionId, ProjectId, TerminationRequest, WorkflowId};
use crate::sandbox::{RunningSandbox, Sandbox, SandboxArgs, parse_ratios};
use crate::settings::{ConfigError, DaemonConfig, RunArgs};
use crate::telemetry::cause_chain;
use crate::tools::enqueue::{DEFAULT_BATCH_SIZE, publish_batches};
use crate::tools::output::{Progress, note};
use crate::tools::report::{Pending, Report, to_table};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{CommandFactory, FromArgMatches};
use secrecy::SecretString;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// `requested_by` of every demo request.
pub const REQUESTED_BY: &str = "demo";
/// The log filter when `RUST_LOG` is unset: the daemon's per-request lines
/// (failures are logged at INFO) would drown the progress and the report;
/// the broker and pool clients' own lines are the daemon's business.
pub const LOG_FILTER: &str = "warn,lapin=off,sqlx=error";

const PROJECT: &str = "0123456789abcdef0123456789abcdef";
const WORKFLOWS: [&str; 3] = ["wf-nightly", "wf-hourly", "wf-backfill"];
/// The failure mix of the README's walk-through: 1% always 500, 2% 404,
/// 3% 500 once then 200. Chosen by a stable hash of the execution, so every
/// run with the same `--requests` meets the same failures.
const FAIL_RATIOS: &str = "500=0.01,404=0.02,flaky=0.03";
const LATENCY: Duration = Duration::from_millis(20);
/// How long each peer gets to answer the first connect.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// No new outcome for this long ends the run as incomplete.
const STALL: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);
const START_BOTH: &str = "`docker compose up -d rabbitmq postgres`";

/// What `demo` needs, from its command line (`cli::DemoArgs`).
pub struct Options {
    pub requests: u32,
    pub keep: bool,
    pub amqp_url: SecretString,
    pub database_url: SecretString,
    pub queue: String,
    pub dead_letter_queue: String,
    pub concurrency: u32,
}

/// How the demo ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every request has exactly one outcome (exit 0).
    Complete,
    /// Some request has none (exit 1).
    Incomplete,
    /// The broker or the database cannot be reached; said in one line (exit 2).
    Unreachable,
}

pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<Ended> {
    let token = format!("demo-{:016x}", fastrand::u64(..));
    let sandbox = Sandbox::new(&SandboxArgs {
        latency: LATENCY,
        expected_token: Some(token.clone()),
        fail_ratios: parse_ratios(FAIL_RATIOS)?,
        ..SandboxArgs::default()
    })
    .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
    .await
    .context("cannot start the fake API on a loopback port")?;
    let cfg = daemon_config(&opts, &sandbox.base_url(), &token)?;

    // Both peers first, at once and briefly: the daemon would retry forever.
    let (broker, database) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, Admin::open(&cfg.amqp)),
        tokio::time::timeout(CHECK_TIMEOUT, reachable(&cfg.database)),
    );
    let seconds = || format!("no answer within {}s", CHECK_TIMEOUT.as_secs());
    let broker_down = match &broker {
        Ok(Err(e @ BrokerError::Connect { .. })) => Some(cause_of(e)),
        Ok(_) => None,
        Err(_) => Some(seconds()),
    };
    let database_down = match &database {
        Ok(Err(ReportError::Connect(e))) => Some(cause_of(e)),
        Ok(_) => None,
        Err(_) => Some(seconds()),
    };
    let broker_at = format!(
        "the broker (RabbitMQ) at {}:{}",
        cfg.amqp.host, cfg.amqp.port
    );
    let database_at = format!(
        "the audit database (Postgres) at {}:{}",
        cfg.database.host, cfg.database.port
    );
    let line = match (broker_down, database_down) {
        (Some(b), Some(d)) => Some(format!(
            "cannot reach {broker_at} ({b}) nor {database_at} ({d}): start them with {START_BOTH}, \
             or the distribution's packages: `sudo systemctl start rabbitmq-server postgresql`"
        )),
        (Some(b), None) => Some(format!(
            "cannot reach {broker_at} ({b}): start it with {START_BOTH}, \
             or the distribution's package: `sudo systemctl start rabbitmq-server`"
        )),
        (None, Some(d)) => Some(format!(
            "cannot reach {database_at} ({d}): start it with {START_BOTH}, \
             or the distribution's package: `sudo systemctl start postgresql`"
        )),
        (None, None) => None,
    };
    if let Some(line) = line {
        if let Ok(Ok(admin)) = broker {
            // Opening it declared the demo's queues: nothing is in them yet.
            if !opts.keep {
                clean_up(&admin, &opts).await;
            }
            admin.close().await;
        }
        // One line, and nothing else: exit 2.
        note!("error: {}", line.replace('\n', " "));
        return Ok(Ended::Unreachable);
    }
    let admin = match broker {
        Ok(Ok(admin)) => admin,
        Ok(Err(BrokerError::Settings(e))) => return Err(e.into()),
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(e.into()),
    };
    let database_error: Option<anyhow::Error> = match database {
        Ok(Ok(())) => None,
        Ok(Err(ReportError::Settings(e))) => Some(e.into()),
        Ok(Err(e)) => Some(e.into()),
        Err(e) => Some(e.into()),
    };
    if let Some(e) = database_error {
        if !opts.keep {
            clean_up(&admin, &opts).await;
        }
        admin.close().await;
        return Err(e);
    }

    let result = drive(&opts, &cfg, &admin, &sandbox, shutdown).await;
    clean_up(&admin, &opts).await;
    admin.close().await;
    sandbox.shutdown().await;
    result
}

/// Delete the demo's queues, or say where they are with `--keep`.
async fn clean_up(admin: &Admin, opts: &Options) {
    let (queue, dead) = (&opts.queue, &opts.dead_letter_queue);
    if opts.keep {
        note!(
            "kept the queues {queue} and {dead} (see the dead letters with \
             `TERMINATE_QUEUE={queue} DEAD_LETTER_QUEUE={dead} aom-terminator dead-letters list`)"
        );
        return;
    }
    // The daemon's parking queue is named after the request queue (empty
    // here: the demo's token covers its project).
    let parked = format!("{queue}.parked");
    for q in [queue, dead, &parked] {
        if let Err(e) = admin.delete_queue(q).await {
            note!("warning: cannot delete the queue {q}: {}", cause_of(&e));
        }
    }
}

/// The causes below an error's own message, on one line.
fn cause_of(e: &(dyn std::error::Error + 'static)) -> String {
    let text = match e.source() {
        Some(source) => cause_chain(source),
        None => e.to_string(),
    };
    text.replace('\n', " ")
}

/// The daemon's settings as `run` would take them, from flags only (the
/// environment's `TERMINATE_QUEUE`, `AOM_*`, ... are for the real daemon,
/// not the demo), with the demo's broker, database, queues and fake API.
fn daemon_config(opts: &Options, endpoint: &str, token: &str) -> Result<DaemonConfig, ConfigError> {
    #[derive(clap::Parser)]
    #[command(no_binary_name = true)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }
    let concurrency = opts.concurrency.to_string();
    let argv = [
        "--aom-endpoint",
        endpoint,
        "--aom-auth-token",
        token,
        "--terminate-queue",
        &opts.queue,
        "--dead-letter-queue",
        &opts.dead_letter_queue,
        "--concurrency",
        &concurrency,
        "--max-attempts",
        "3",
        "--backoff-initial-ms",
        "100",
        "--backoff-max-ms",
        "1000",
        "--metrics-addr",
        "off",
        "--shutdown-grace",
        "5s",
    ];
    let clap_error = |e: clap::Error| {
        ConfigError(
            e.to_string()
                .lines()
                .next()
                .unwrap_or("invalid demo settings")
                .to_owned(),
        )
    };
    let matches = Run::command()
        .mut_args(|a| a.env(None))
        .try_get_matches_from(argv)
        .map_err(clap_error)?;
    let mut args = Run::from_arg_matches(&matches).map_err(clap_error)?.args;
    args.broker.amqp_url = opts.amqp_url.clone();
    args.database.database_url = opts.database_url.clone();
    args.validate()
}

/// Everything between the checks and the clean-up.
async fn drive(
    opts: &Options,
    cfg: &DaemonConfig,
    admin: &Admin,
    sandbox: &RunningSandbox,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Ended> {
    Audit::new(&cfg.database, 1)?
        .migrate()
        .await
        .context("cannot apply the audit migrations")?;
    let reports = Reports::connect(&cfg.database).await?;
    let stamp = format!(
        "{}-{:04x}",
        Utc::now().format("%Y%m%dT%H%M%S"),
        fastrand::u16(..)
    );
    let requests = make_requests(&stamp, opts.requests)?;
    let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
    let total = requests.len();
    note!(
        "demo run {stamp}: {total} requests to the fake API at {} (20 ms latency; \
         1% always 500, 2% 404, 3% 500 then 200)",
        sandbox.base_url()
    );

    let started_at: DateTime<Utc> = Utc::now();
    let started = Instant::now();
    let messages = publish_batches(
        admin,
        &cfg.amqp.queue,
        &requests,
        DEFAULT_BATCH_SIZE as usize,
        |_| {},
    )
    .await?;
    drop(requests);
    note!(
        "published {total} requests in {messages} message{} to {} in {:.1}s",
        if messages == 1 { "" } else { "s" },
        cfg.amqp.queue,
        started.elapsed().as_secs_f64()
    );

    let (stop, stopped) = oneshot::channel::<()>();
    let mut daemon = tokio::spawn(daemon::run(cfg.clone(), async move {
        let _ = stopped.await;
    }));
    let mut progress = Progress::new(total, "have their outcome");
    let mut tick = tokio::time::interval(POLL);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut done = 0i64;
    let mut last_change = Instant::now();
    let mut joined = None;
    let stopped_early = loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => break Some("interrupted".to_owned()),
            result = &mut daemon => {
                joined = Some(result);
                break Some("the daemon stopped".to_owned());
            }
        }
        match reports.outcomes_of(&ids).await {
            Ok(n) if n != done => {
                done = n;
                last_change = Instant::now();
                progress.update(n as usize);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error.cause_chain = %cause_chain(&e), "cannot count the outcomes")
            }
        }
        if done >= total as i64 {
            break None;
        }
        if last_change.elapsed() >= STALL {
            break Some(format!("no new outcome for {}s", STALL.as_secs()));
        }
    };
    progress.finish();
    let elapsed = started.elapsed();
    let _ = stop.send(());
    let joined = match joined {
        Some(j) => j,
        None => match tokio::time::timeout(Duration::from_secs(30), &mut daemon).await {
            Ok(j) => j,
            Err(_) => {
                daemon.abort();
                Ok(Err(anyhow::anyhow!("the daemon did not stop within 30s")))
            }
        },
    };
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => note!("error: the daemon failed: {e:#}"),
        Err(e) => note!("error: the daemon task failed: {e}"),
    }

    let done = reports.outcomes_of(&ids).await?;
    let summary = reports
        .summary(&Filter {
            since: Some(started_at),
            workflow: None,
            requested_by: Some(REQUESTED_BY.to_owned()),
            campaign: None,
        })
        .await?;
    // The demo's daemon has stopped: nothing is delivered and unacked, and
    // whatever is left in its queue is waiting.
    let ready = admin.depth(&cfg.amqp.queue).await.map(u64::from);
    let report = Report {
        since: Some(started_at),
        workflow: None,
        requested_by: Some(REQUESTED_BY.to_owned()),
        summary,
        pending: Pending {
            ready,
            unacked: Some(0),
            total: ready,
            parked: None,
        },
    };
    // Written whole, and a closed pipe (`demo | head`) is not a panic.
    let text = format!("\n{}\n{}", to_table(&report), next_queries(&stamp, cfg));
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    drop(stdout);

    let secs = elapsed.as_secs_f64();
    if done == total as i64 {
        note!(
            "every one of the {total} requests has exactly one outcome: done in {secs:.1}s \
             ({:.0} requests/s)",
            total as f64 / secs.max(1e-3)
        );
        Ok(Ended::Complete)
    } else {
        note!(
            "only {done} of the {total} requests have an outcome after {secs:.1}s ({})",
            stopped_early.as_deref().unwrap_or("stopped")
        );
        Ok(Ended::Incomplete)
    }
}

/// `n` requests of one project over a few workflows, with request ids
/// unique to this run (`demo-<stamp>-<i>`) and the same executions every
/// run (so the fake API's failure mix is the same every run).
fn make_requests(stamp: &str, n: u32) -> Result<Vec<TerminationRequest>, ConfigError> {
    let project = ProjectId::parse(PROJECT).map_err(ConfigError)?;
    let workflows = WORKFLOWS
        .iter()
        .map(|w| WorkflowId::parse(w).map_err(ConfigError))
        .collect::<Result<Vec<_>, _>>()?;
    (1..=n)
        .map(|i| {
            Ok(TerminationRequest {
                request_id: format!("demo-{stamp}-{i:05}"),
                project_id: project.clone(),
                workflow_id: workflows[i as usize % workflows.len()].clone(),
                execution_id: ExecutionId::parse(&format!("ex-{i:05}")).map_err(ConfigError)?,
                reason: Some("aom-terminator demo".to_owned()),
                requested_by: Some(REQUESTED_BY.to_owned()),
                replay_of: None,
                region: None,
                campaign_id: None,
            })
        })
        .collect()
}

/// A few ready-to-paste queries on this run's rows.
fn next_queries(stamp: &str, cfg: &DaemonConfig) -> String {
    let run = format!("demo-{stamp}-%");
    let db = &cfg.database;
    format!(
        "Next, in psql on the audit database ({host}:{port}/{name}):

-- This run's requests by outcome
SELECT outcome, count(*) FROM termination_outcomes
WHERE request_id LIKE '{run}' GROUP BY outcome ORDER BY count(*) DESC;

-- The ones that did not succeed, with the API's last answer
SELECT execution_id, workflow_id, outcome, http_status, error_code, attempts
FROM termination_outcomes
WHERE request_id LIKE '{run}' AND outcome <> 'succeeded' ORDER BY execution_id;

-- Every attempt of a few requests that needed more than one
SELECT request_id, attempt, http_status, error_kind, error_code, latency_ms
FROM termination_attempts WHERE request_id IN (
  SELECT request_id FROM termination_outcomes
  WHERE request_id LIKE '{run}' AND attempts > 1 LIMIT 5)
ORDER BY request_id, attempt;

-- API latency of this run's calls: p50, p95, p99 (ms)
SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY latency_ms)
FROM termination_attempts
WHERE request_id LIKE '{run}' AND http_status IS NOT NULL;

-- Every demo run so far
SELECT min(received_at) AS started, count(*) AS requests,
       count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded
FROM termination_outcomes WHERE requested_by = '{REQUESTED_BY}'
GROUP BY substring(request_id FROM '^demo-([^-]+-[^-]+)-') ORDER BY started;
",
        host = db.host,
        port = db.port,
        name = db.database,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            requests: 10,
            keep: false,
            amqp_url: SecretString::from("amqp://u:brokerpw@mq.example.com:5673/v"),
            database_url: SecretString::from("postgres://u:dbpw@db.example.com/audit"),
            queue: "aom.demo.requests".to_owned(),
            dead_letter_queue: "aom.demo.dead".to_owned(),
            concurrency: 128,
        }
    }

    #[test]
    fn the_daemon_takes_the_demo_settings() {
        // `TERMINATE_QUEUE` etc. may be set for the real daemon; the demo's
        // flags are parsed with every environment fallback removed.
        let cfg = daemon_config(&options(), "http://127.0.0.1:4321", "tok").expect("valid");
        assert_eq!(cfg.amqp.queue, "aom.demo.requests");
        assert_eq!(cfg.amqp.dead_letter_queue, "aom.demo.dead");
        assert_eq!(
            (cfg.amqp.host.as_str(), cfg.amqp.port),
            ("mq.example.com", 5673)
        );
        assert_eq!(cfg.database.host, "db.example.com");
        assert_eq!(cfg.endpoint.as_str(), "http://127.0.0.1:4321/");
        assert_eq!(cfg.concurrency, 128);
        assert_eq!(cfg.max_attempts, 3);
        assert_eq!(cfg.metrics_addr, None);
        assert_eq!(cfg.auth.mode(), "token");
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("brokerpw") && !debug.contains("dbpw") && !debug.contains("tok\""));
    }

    #[test]
    fn requests_are_unique_per_run_and_the_executions_stable() {
        let a = make_requests("20261127T000000-0001", 3).expect("valid");
        let b = make_requests("20261127T000001-0002", 3).expect("valid");
        assert_eq!(a[0].request_id, "demo-20261127T000000-0001-00001");
        assert_ne!(a[0].request_id, b[0].request_id);
        assert_eq!(a[2].execution_id, b[2].execution_id);
        assert!(a.iter().all(|r| r.requested_by.as_deref() == Some("demo")));
        let ids: std::collections::BTreeSet<_> = a.iter().map(|r| &r.request_id).collect();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn a_bad_concurrency_is_a_setting_error() {
        let mut opts = options();
        opts.concurrency = 0;
        let err = daemon_config(&opts, "http://127.0.0.1:1", "t").expect_err("refused");
        assert!(err.0.contains("CONCURRENCY"), "{}", err.0);
    }
}
