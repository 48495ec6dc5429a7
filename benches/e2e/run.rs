//! One run: a fresh database and queues, the ceilings, the pre-fill, the
//! sandbox and then the daemon, sampling until every outcome is committed,
//! the daemon stopped, the correctness checks, and the numbers of a correct
//! run.

use aom_terminator::broker::{self, declare_topology, request_queue_arguments};
use aom_terminator::cli::{Cli, Command as CliCommand, one_line, parse_args_only};
use aom_terminator::settings::DaemonConfig;

use crate::Bench;
use crate::audit::{audit_numbers, progress};
use crate::ceiling::{Ceiling, Ceilings, measure_ceilings};
use crate::output::{thousands, thousands_f};
use crate::process::{free_port, sandbox_stats, spawn, terminate, wait_for_sandbox};
use crate::procfs::{CpuSnapshot, CpuSplit, status_kib};
use crate::publish::{Published, epoch_now, message_bodies, publish_all, queue_depth};
use crate::scenario::Scenario;
use crate::verify::{SandboxSeen, check_audit, check_queues_empty, check_sandbox_stats};
use anyhow::{Context, Result, anyhow, bail};
use clap::CommandFactory;
use lapin::options::QueueDeleteOptions;
use lapin::{Channel, Connection};
use sqlx::{Connection as _, PgConnection};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::process::Child;

const AUTH_TOKEN: &str = "bench";
/// How often RSS and the outcome count are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A run whose outcome count has not moved for this long has failed.
const STALL: Duration = Duration::from_secs(60);

pub(crate) enum RunOutcome {
    Correct(Box<Report>),
    Incorrect(Vec<String>),
}

/// The numbers of a correct run.
pub(crate) struct Report {
    pub(crate) requests: u64,
    pub(crate) messages: u64,
    pub(crate) prefetch: u16,
    pub(crate) publish: Duration,
    pub(crate) ceiling: Option<Ceiling>,
    /// The bare consumer again, holding each message for the API latency.
    pub(crate) held: Option<Ceiling>,
    /// Daemon spawn → all N outcomes seen committed.
    pub(crate) wall: Duration,
    /// Daemon spawn → first request received (start-up, migrations, connect).
    pub(crate) startup_s: Option<f64>,
    /// min(received_at) → max(recorded_at).
    pub(crate) drain_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// Publish → audit commit; mostly the wait in the pre-filled queue.
    pub(crate) published_p50_s: f64,
    pub(crate) published_p99_s: f64,
    pub(crate) rss_max_kib: u64,
    pub(crate) rss_by_tenth: [u64; 10],
    pub(crate) hwm_kib: Option<u64>,
    pub(crate) cpu: CpuSplit,
    pub(crate) max_in_flight: Option<u64>,
    /// The sandbox's mean answer time (arrival → answer), ms.
    pub(crate) sandbox_answer_ms: Option<f64>,
    /// The sandbox's calls, and how many it refused with 429 and 503.
    pub(crate) calls: u64,
    pub(crate) throttled: u64,
    pub(crate) busy: u64,
    pub(crate) log_lines: usize,
}

impl Report {
    pub(crate) fn rate(&self) -> f64 {
        self.requests as f64 / self.drain_s
    }

    /// The daemon's own CPU per termination, in µs.
    pub(crate) fn cpu_us_per_termination(&self) -> f64 {
        self.cpu.daemon * 1e6 / self.requests as f64
    }

    pub(crate) fn peak_rss_mib(&self) -> f64 {
        self.hwm_kib.unwrap_or(0).max(self.rss_max_kib) as f64 / 1024.0
    }
}

/// The run's database and queues, all named after one random base.
pub(crate) struct Names {
    pub(crate) database: String,
    pub(crate) queue: String,
    pub(crate) dead_letter_queue: String,
    pub(crate) ceiling_queue: String,
}

pub(crate) async fn run_scenario(bench: &Bench, scenario: &Scenario) -> Result<RunOutcome> {
    let base = format!("aomt_bench_{:016x}", fastrand::u64(..));
    let names = Names {
        database: base.clone(),
        queue: format!("{base}.requests"),
        dead_letter_queue: format!("{base}.dead"),
        ceiling_queue: format!("{base}.ceiling"),
    };
    let mut admin = PgConnection::connect(&bench.database_url)
        .await
        .context("connect to Postgres (DATABASE_URL)")?;
    sqlx::query(&format!("CREATE DATABASE \"{}\"", names.database))
        .execute(&mut admin)
        .await
        .with_context(|| format!("create the database {}", names.database))?;
    println!(
        "database {}, queues {} / {}",
        names.database, names.queue, names.dead_letter_queue
    );
    let result = tokio::select! {
        r = run_in(bench, scenario, &names) => r,
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => Err(anyhow!("interrupted (Ctrl-C); cleaning up")),
            Err(e) => Err(anyhow!("cannot listen for Ctrl-C: {e}")),
        },
    };
    // The children of an interrupted or failed run were killed on drop.
    cleanup(bench, &names, &mut admin).await;
    let _ = admin.close().await;
    result
}

/// Drop the database and delete the queues, whatever happened; failures are
/// reported, not fatal.
async fn cleanup(bench: &Bench, names: &Names, admin: &mut PgConnection) {
    if let Err(e) = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        names.database
    ))
    .execute(&mut *admin)
    .await
    {
        eprintln!(
            "warning: could not drop the database {}: {e}",
            names.database
        );
    }
    let connection =
        match Connection::connect(&bench.amqp_url, lapin::ConnectionProperties::default()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("warning: could not connect to delete the queues: {e}");
                return;
            }
        };
    // The daemon's parking queue is named after the request queue.
    let parking_queue = format!("{}.parked", names.queue);
    for queue in [
        &names.queue,
        &names.dead_letter_queue,
        &parking_queue,
        &names.ceiling_queue,
    ] {
        let deleted = async {
            let channel = connection.create_channel().await?;
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
            channel.close(200, "done".into()).await
        };
        if let Err(e) = deleted.await {
            eprintln!("warning: could not delete the queue {queue}: {e}");
        }
    }
    let _ = connection.close(200, "done".into()).await;
}

async fn run_in(bench: &Bench, scenario: &Scenario, names: &Names) -> Result<RunOutcome> {
    let mut failures = Vec::new();
    let database_url = with_database(&bench.database_url, &names.database);
    let port = free_port()?;
    let sandbox_url = format!("http://127.0.0.1:{port}");

    // 1. The daemon's environment, and its settings as the daemon itself
    // parses them (queue arguments, effective prefetch); the queues, declared
    // with the daemon's arguments.
    let daemon_env = daemon_env(bench, scenario, names, &database_url, &sandbox_url)?;
    let cfg = daemon_config(&daemon_env)?;
    let (connection, channel) = declare_queues(&cfg, names).await?;
    let bodies = message_bodies(scenario);
    let messages = bodies.len() as u64;

    // 2. The ceiling: a consumer that does nothing but ack; with an API
    // latency, the held ceiling too.
    let Ceilings { bare, held } = measure_ceilings(
        bench,
        &connection,
        &cfg,
        &names.ceiling_queue,
        &bodies,
        scenario,
    )
    .await?;

    // 3. Pre-fill the request queue.
    let published = prefill(bench, &connection, &cfg, &names.queue, &bodies, scenario).await?;

    // 4. The sandbox, then the daemon.
    let mut sandbox = start_sandbox(bench, scenario, names, port, &sandbox_url).await?;
    let mut db = PgConnection::connect(&database_url)
        .await
        .context("connect to the bench database")?;
    let mut daemon = start_daemon(bench, names, &daemon_env, sandbox.pid)?;

    // 5. Sample until every outcome is committed.
    let target = i64::try_from(scenario.requests).context("--requests is too large")?;
    let mut sampled = sample_until_committed(bench, &mut daemon, &mut db, target).await?;
    // 6. CPU at the end of the window, before the daemon stops (its Postgres
    // backends still exist).
    let end = CpuSnapshot::take(sandbox.pid, Some(daemon.pid))?;
    let hwm_kib = status_kib(daemon.pid, "VmHWM:");
    if let Some(kib) = status_kib(daemon.pid, "VmRSS:") {
        sampled.rss_max_kib = sampled.rss_max_kib.max(kib);
    }

    // 7. Stop the daemon; how the sampling ended and the daemon's exit code
    // are part of correctness.
    stop_daemon(bench, &mut daemon, &sampled, target, &cfg, &mut failures).await;
    let stats = sandbox_stats(bench, &sandbox_url).await;
    stop_sandbox(&mut sandbox).await;

    // 8. Correctness.
    let audit = audit_numbers(&mut db, &published.at_epoch, scenario.batch.max(1)).await;
    let _ = db.close().await;
    let SandboxSeen {
        max_in_flight,
        answer_ms: sandbox_answer_ms,
        calls,
        throttled,
        busy,
    } = check_sandbox_stats(&stats, scenario.requests, &mut failures);
    check_audit(&audit, target, calls, &mut failures);
    check_queues_empty(&connection, &cfg, names, &mut failures).await;
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    let log_lines = std::fs::read_to_string(&daemon.log)
        .map(|s| s.lines().count())
        .unwrap_or(0);

    if !failures.is_empty() {
        if log_lines > 0 {
            failures.push(format!(
                "the daemon logged {log_lines} warning/error lines; see {}",
                daemon.log.display()
            ));
        }
        return Ok(RunOutcome::Incorrect(failures));
    }
    let audit = audit?;
    println!(
        "correct: {target} outcomes, all succeeded; {calls} attempts; {calls} sandbox calls \
         ({throttled} 429, {busy} 503); request and dead-letter queues empty; daemon exit 0"
    );
    let Some(drain_s) = audit.drain_s.filter(|s| *s > 0.0) else {
        bail!("the audit has no drain window");
    };
    Ok(RunOutcome::Correct(Box::new(Report {
        requests: scenario.requests,
        messages,
        prefetch: cfg.prefetch,
        publish: published.took,
        ceiling: bare,
        held,
        wall: sampled.wall,
        startup_s: audit.first_received_epoch.map(|e| e - daemon.t0_epoch),
        drain_s,
        p50_ms: audit.p50_ms.unwrap_or(f64::NAN),
        p99_ms: audit.p99_ms.unwrap_or(f64::NAN),
        max_ms: audit.max_ms.unwrap_or(f64::NAN),
        published_p50_s: audit.published_p50_s.unwrap_or(f64::NAN),
        published_p99_s: audit.published_p99_s.unwrap_or(f64::NAN),
        rss_max_kib: sampled.rss_max_kib,
        rss_by_tenth: sampled.rss_by_tenth,
        hwm_kib,
        cpu: CpuSplit::between(&daemon.cpu_start, &end, bench.clk_tck),
        max_in_flight,
        sandbox_answer_ms,
        calls,
        throttled,
        busy,
        log_lines,
    })))
}

/// Connect to RabbitMQ and declare the run's queues with the daemon's
/// arguments.
async fn declare_queues(cfg: &DaemonConfig, names: &Names) -> Result<(Connection, Channel)> {
    let connection = broker::connect(&cfg.amqp, &format!("{}-bench", names.database))
        .await
        .context("connect to RabbitMQ (AMQP_URL)")?;
    let channel = connection
        .create_channel()
        .await
        .context("open a channel")?;
    declare_topology(&channel, &cfg.amqp)
        .await
        .context("declare the queues with the daemon's arguments")?;
    Ok((connection, channel))
}

/// The daemon's environment: the services, the run's queues, the scenario's
/// settings.
fn daemon_env(
    bench: &Bench,
    scenario: &Scenario,
    names: &Names,
    database_url: &str,
    sandbox_url: &str,
) -> Result<Vec<(String, String)>> {
    let mut daemon_env: Vec<(String, String)> = vec![
        ("AMQP_URL".into(), bench.amqp_url.clone()),
        ("DATABASE_URL".into(), database_url.to_owned()),
        ("AOM_ENDPOINT".into(), sandbox_url.to_owned()),
        ("AOM_AUTH_TOKEN".into(), AUTH_TOKEN.into()),
        ("TERMINATE_QUEUE".into(), names.queue.clone()),
        ("DEAD_LETTER_QUEUE".into(), names.dead_letter_queue.clone()),
        ("CONCURRENCY".into(), scenario.concurrency.to_string()),
        ("RUST_LOG".into(), "warn".into()),
        // A port of its own: a daemon left running elsewhere on the default
        // one would make this one refuse to start.
        ("METRICS_ADDR".into(), format!("127.0.0.1:{}", free_port()?)),
    ];
    if let Some(p) = scenario.prefetch {
        daemon_env.push(("PREFETCH".into(), p.to_string()));
    }
    if let Some(r) = scenario.rate_limit {
        daemon_env.push(("RATE_LIMIT".into(), r.to_string()));
    }
    daemon_env.extend(scenario.extra_env.iter().cloned());
    Ok(daemon_env)
}

/// The daemon's settings exactly as `aom-terminator run` parses and checks
/// them from `env`: each variable that is a setting becomes its flag.
fn daemon_config(env: &[(String, String)]) -> Result<DaemonConfig> {
    let root = Cli::command();
    let run = root
        .find_subcommand("run")
        .context("the binary has no `run` subcommand")?;
    let mut argv = vec!["aom-terminator".to_owned(), "run".to_owned()];
    for (key, value) in env {
        let arg = run
            .get_arguments()
            .chain(root.get_arguments())
            .find(|a| a.get_env() == Some(OsStr::new(key)));
        if let Some(long) = arg.and_then(|a| a.get_long()) {
            argv.push(format!("--{long}={value}"));
        }
    }
    let cli = parse_args_only::<Cli, _, _>(argv)
        .map_err(|e| anyhow!("the daemon's settings do not parse: {}", one_line(&e)))?;
    match cli.command {
        CliCommand::Run(args) => args
            .validate()
            .map_err(|e| anyhow!("the daemon's settings are invalid: {e}")),
        _ => bail!("not a run command"),
    }
}

/// Pre-fill the request queue, and check that it holds every message.
async fn prefill(
    bench: &Bench,
    connection: &Connection,
    cfg: &DaemonConfig,
    queue: &str,
    bodies: &[Vec<u8>],
    scenario: &Scenario,
) -> Result<Published> {
    let messages = bodies.len() as u64;
    let published = publish_all(bench, connection, queue, bodies)
        .await
        .context("pre-fill the request queue")?;
    let publish = published.took;
    let ready = queue_depth(connection, queue, request_queue_arguments(&cfg.amqp)).await?;
    println!(
        "pre-filled {}: {} msgs ({} requests) in {:.2} s ({} msgs/s, persistent, confirmed); {} ready",
        queue,
        thousands(messages),
        thousands(scenario.requests),
        publish.as_secs_f64(),
        thousands_f(messages as f64 / publish.as_secs_f64()),
        thousands(u64::from(ready)),
    );
    if u64::from(ready) != messages {
        bail!("the request queue holds {ready} messages, expected {messages}");
    }
    Ok(published)
}

/// The sandbox (the AOM API), as it runs.
struct Sandbox {
    child: Child,
    pid: u32,
    log: PathBuf,
}

/// Start the sandbox on `port` and wait until it answers.
async fn start_sandbox(
    bench: &Bench,
    scenario: &Scenario,
    names: &Names,
    port: u16,
    sandbox_url: &str,
) -> Result<Sandbox> {
    let log = bench
        .log_dir
        .join(format!("{}-sandbox.log", names.database));
    let mut child = spawn(
        &bench.binary,
        &[
            "sandbox".to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--latency".to_owned(),
            format!("{}ms", scenario.latency_ms),
        ]
        .into_iter()
        .chain(scenario.sandbox.args())
        .collect::<Vec<_>>(),
        // One runtime thread: the sandbox stands in for a remote API, and
        // takes less of the machine the daemon is measured on this way.
        &[
            ("RUST_LOG".to_owned(), "warn".to_owned()),
            ("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned()),
        ],
        &log,
    )?;
    let pid = child.id().context("the sandbox has no pid")?;
    wait_for_sandbox(bench, &mut child, sandbox_url).await?;
    println!(
        "sandbox {sandbox_url} (latency {} ms), log {}",
        scenario.latency_ms,
        log.display()
    );
    Ok(Sandbox { child, pid, log })
}

async fn stop_sandbox(sandbox: &mut Sandbox) {
    match terminate(&mut sandbox.child, Duration::from_secs(30)).await {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!(
            "warning: the sandbox exited with {status}; see {}",
            sandbox.log.display()
        ),
        Err(e) => eprintln!("warning: stopping the sandbox: {e:#}"),
    }
}

/// The daemon, as it runs, and where its window starts.
struct Daemon {
    child: Child,
    pid: u32,
    log: PathBuf,
    /// CPU just before the spawn.
    cpu_start: CpuSnapshot,
    /// The spawn.
    t0: Instant,
    t0_epoch: f64,
}

/// Start the daemon, the window's start taken just before.
fn start_daemon(
    bench: &Bench,
    names: &Names,
    daemon_env: &[(String, String)],
    sandbox_pid: u32,
) -> Result<Daemon> {
    let log = bench.log_dir.join(format!("{}-daemon.log", names.database));
    println!(
        "daemon log {}, metrics http://{}/metrics",
        log.display(),
        daemon_env
            .iter()
            .rev()
            .find(|(k, _)| k == "METRICS_ADDR")
            .map_or("", |(_, v)| v.as_str())
    );
    let cpu_start = CpuSnapshot::take(sandbox_pid, None)?;
    let t0 = Instant::now();
    let t0_epoch = epoch_now();
    let child = spawn(&bench.binary, &["run".to_owned()], daemon_env, &log)?;
    let pid = child.id().context("the daemon has no pid")?;
    Ok(Daemon {
        child,
        pid,
        log,
        cpu_start,
        t0,
        t0_epoch,
    })
}

/// How the sampling ended.
enum Ended {
    AllCommitted,
    ExitedEarly(ExitStatus),
    TimedOut,
    Stalled,
}

/// What the sampling saw.
struct Sampled {
    /// Daemon spawn → all N outcomes seen committed (or the sampling ended).
    wall: Duration,
    seen: i64,
    rss_max_kib: u64,
    rss_by_tenth: [u64; 10],
    last_error: Option<String>,
    ended: Ended,
}

/// Sample the daemon's RSS and the outcomes committed until all `target`
/// are, the daemon exits, the run times out or stalls.
async fn sample_until_committed(
    bench: &Bench,
    daemon: &mut Daemon,
    db: &mut PgConnection,
    target: i64,
) -> Result<Sampled> {
    let deadline = daemon.t0 + bench.timeout;
    let mut rss_max_kib = 0;
    // The largest VmRSS seen in each tenth of the run (by outcomes
    // committed): flat across the tenths is flat however deep the queue.
    let mut rss_by_tenth = [0_u64; 10];
    let mut seen = 0_i64;
    let mut samples = 0_u64;
    let mut last_error: Option<String>;
    let mut last_change = (0_i64, Instant::now());
    let ended = loop {
        if let Some(kib) = status_kib(daemon.pid, "VmRSS:") {
            rss_max_kib = rss_max_kib.max(kib);
            let tenth = usize::try_from(seen * 10 / target.max(1)).map_or(9, |t| t.min(9));
            rss_by_tenth[tenth] = rss_by_tenth[tenth].max(kib);
        }
        samples += 1;
        last_error = match progress(db, target, samples.is_multiple_of(10)).await {
            // Outcomes only grow; the cheap estimate can read low.
            Ok(n) => {
                seen = seen.max(n);
                None
            }
            // The table appears when the daemon has migrated.
            Err(e) => Some(e.to_string()),
        };
        if seen >= target {
            break Ended::AllCommitted;
        }
        if let Some(status) = daemon.child.try_wait().context("poll the daemon")? {
            break Ended::ExitedEarly(status);
        }
        if Instant::now() >= deadline {
            break Ended::TimedOut;
        }
        // A run that stops short (requests rejected instead of sent, say)
        // fails soon instead of at the timeout.
        if seen != last_change.0 {
            last_change = (seen, Instant::now());
        } else if last_change.1.elapsed() >= STALL {
            break Ended::Stalled;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    };
    Ok(Sampled {
        wall: daemon.t0.elapsed(),
        seen,
        rss_max_kib,
        rss_by_tenth,
        last_error,
        ended,
    })
}

/// Record a sampling that ended short, and stop the daemon with SIGTERM
/// unless it already exited; its exit code is part of correctness.
async fn stop_daemon(
    bench: &Bench,
    daemon: &mut Daemon,
    sampled: &Sampled,
    target: i64,
    cfg: &DaemonConfig,
    failures: &mut Vec<String>,
) {
    let seen = sampled.seen;
    let log = daemon.log.display();
    match &sampled.ended {
        Ended::AllCommitted => {}
        Ended::Stalled => failures.push(format!(
            "no progress for {} s at {seen} of {target} outcomes; see {log}",
            STALL.as_secs(),
        )),
        Ended::TimedOut => failures.push(format!(
            "timed out after {} s with {seen} of {target} outcomes{}",
            bench.timeout.as_secs(),
            sampled
                .last_error
                .as_ref()
                .map(|e| format!(" (last query error: {e})"))
                .unwrap_or_default()
        )),
        Ended::ExitedEarly(status) => {
            failures.push(format!(
                "the daemon exited by itself ({status}) with {seen} of {target} outcomes; see {log}"
            ));
            return;
        }
    }
    let grace = cfg.shutdown_grace + Duration::from_secs(30);
    match terminate(&mut daemon.child, grace).await {
        Ok(status) if status.success() => {}
        Ok(status) => failures.push(format!(
            "the daemon exited with {status} after SIGTERM; see {log}"
        )),
        Err(e) => failures.push(format!("stopping the daemon: {e:#}")),
    }
}

/// `url` with its database path replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}
