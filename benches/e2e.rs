//! End-to-end benchmark of aom-terminator.
//!
//! Drives the release binary (the daemon and the sandbox API, each as its own
//! process) against the real RabbitMQ and Postgres named by `AMQP_URL` and
//! `DATABASE_URL`:
//!
//! ```text
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo bench --bench e2e -- [--requests N] [--batch B] [--latency-ms L] ...
//! ```
//!
//! One run: a fresh database and fresh queues (declared with the daemon's own
//! arguments); optionally the broker's ceiling (a bare consumer that only
//! acks, with the daemon's prefetch); the request queue pre-filled with N
//! requests; the sandbox and then the daemon started; RSS, outcomes and CPU
//! sampled until all N outcomes are committed; the daemon stopped with
//! SIGTERM; the run checked for correctness (no rate is printed for an
//! incorrect run); then the rates, latencies, memory and CPU split.
//!
//! `--suite standard` runs the standard scenarios and prints a BENCHMARKS.md
//! table.

use anyhow::{Context, Result, anyhow, bail};
use aom_terminator::broker::{declare_topology, request_queue_arguments};
use aom_terminator::config::{Cli, Command as CliCommand, DaemonConfig, one_line};
use aom_terminator::sandbox::timer_aim;
use clap::{CommandFactory, Parser, ValueEnum};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, PublisherConfirm};
use sqlx::{Connection as _, PgConnection};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::process::Child;

const PROJECT_ID: &str = "0123456789abcdef0123456789abcdef";
const WORKFLOW_ID: &str = "wf-bench";
const AUTH_TOKEN: &str = "bench";
/// Publishes in flight (not yet confirmed) while pre-filling a queue.
const CONFIRM_WINDOW: usize = 4096;
/// How often RSS and the outcome count are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A run whose outcome count has not moved for this long has failed.
const STALL: Duration = Duration::from_secs(60);
/// Largest batch the daemon accepts in one message.
const MAX_BATCH: u64 = 10_000;

/// End-to-end benchmark: the release daemon against the real RabbitMQ and
/// Postgres (AMQP_URL, DATABASE_URL), with the sandbox as the AOM API.
#[derive(Debug, Clone, Parser)]
#[command(name = "e2e")]
struct Args {
    /// Termination requests to process.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// 0: one request per message; otherwise messages of B requests each.
    #[arg(long, default_value_t = 0)]
    batch: u64,
    /// Latency of every sandbox call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// The daemon's CONCURRENCY.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// The daemon's PREFETCH (default: the daemon's own, = CONCURRENCY).
    #[arg(long)]
    prefetch: Option<u16>,
    /// The daemon's RATE_LIMIT (API calls per second).
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Another environment variable for the daemon (repeatable).
    #[arg(long = "extra-env", value_name = "K=V", value_parser = parse_key_value)]
    extra_env: Vec<(String, String)>,
    /// Skip the ceiling measurement (bare consumer that only acks).
    #[arg(long)]
    no_ceiling: bool,
    /// Print one BENCHMARKS.md table row at the end.
    #[arg(long)]
    markdown_row: bool,
    /// Run a suite of scenarios one after another and print the table.
    #[arg(
        long,
        value_enum,
        conflicts_with_all = ["requests", "batch", "latency_ms", "concurrency", "prefetch", "rate_limit"]
    )]
    suite: Option<Suite>,
    /// Most seconds a phase (pre-fill, ceiling, the daemon's drain) may take.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// (a) 20k singles 0 ms C=64; (b) 20k in batches of 1,000; (c) 20k singles
    /// 50 ms C=256; (d) 20k singles 50 ms C=1024; (e) 5k singles RATE_LIMIT=500.
    Standard,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected K=V, got {s:?}")),
    }
}

/// One benchmark run's parameters.
#[derive(Debug, Clone)]
struct Scenario {
    label: String,
    requests: u64,
    batch: u64,
    latency_ms: u64,
    concurrency: u32,
    prefetch: Option<u16>,
    rate_limit: Option<u32>,
    ceiling: bool,
    extra_env: Vec<(String, String)>,
}

impl Scenario {
    fn from_args(a: &Args) -> Self {
        let mut label = if a.batch > 0 {
            format!(
                "{} in batches of {}",
                thousands(a.requests),
                thousands(a.batch)
            )
        } else {
            format!("{} singles", thousands(a.requests))
        };
        let _ = write!(label, ", {} ms, C={}", a.latency_ms, a.concurrency);
        if let Some(p) = a.prefetch {
            let _ = write!(label, ", PREFETCH={p}");
        }
        if let Some(r) = a.rate_limit {
            let _ = write!(label, ", RATE_LIMIT={r}");
        }
        for (k, v) in &a.extra_env {
            let _ = write!(label, ", {k}={v}");
        }
        Self {
            label,
            requests: a.requests,
            batch: a.batch,
            latency_ms: a.latency_ms,
            concurrency: a.concurrency,
            prefetch: a.prefetch,
            rate_limit: a.rate_limit,
            ceiling: !a.no_ceiling,
            extra_env: a.extra_env.clone(),
        }
    }

    fn standard(a: &Args) -> Vec<Self> {
        let base = |label: &str, requests, batch, latency_ms, concurrency| Scenario {
            label: label.to_owned(),
            requests,
            batch,
            latency_ms,
            concurrency,
            prefetch: None,
            rate_limit: None,
            ceiling: !a.no_ceiling,
            extra_env: a.extra_env.clone(),
        };
        // Each speed scenario with the default PREFETCH (= CONCURRENCY), and
        // the two single-message ones again with a prefetch that lets
        // messages wait in the daemon's lookup and audit stages while
        // CONCURRENCY calls stay in flight.
        let prefetched = |p: u16, s: Scenario| Scenario {
            prefetch: Some(p),
            label: format!("{}, PREFETCH={p}", s.label),
            ..s
        };
        vec![
            base("a: singles, 0 ms", 40_000, 0, 0, 64),
            prefetched(128, base("a2: singles, 0 ms", 60_000, 0, 0, 64)),
            prefetched(256, base("a3: singles, 0 ms", 60_000, 0, 0, 64)),
            base("b: batches, 0 ms", 40_000, 1_000, 0, 64),
            base("c: singles, 50 ms, C=256", 30_000, 0, 50, 256),
            prefetched(512, base("c2: singles, 50 ms, C=256", 30_000, 0, 50, 256)),
            base("d: singles, 50 ms, C=1024", 30_000, 0, 50, 1024),
            Scenario {
                rate_limit: Some(500),
                ceiling: false,
                ..base("e: singles, RATE_LIMIT=500", 5_000, 0, 0, 64)
            },
        ]
    }

    fn check(&self) -> Result<()> {
        if self.requests == 0 {
            bail!("--requests must be at least 1");
        }
        if self.batch > MAX_BATCH {
            bail!("--batch must be at most {MAX_BATCH} (the daemon's limit per message)");
        }
        Ok(())
    }
}

/// What every run shares.
struct Bench {
    amqp_url: String,
    database_url: String,
    binary: PathBuf,
    log_dir: PathBuf,
    cores: usize,
    clk_tck: f64,
    timeout: Duration,
    http: reqwest::Client,
}

fn main() -> ExitCode {
    // Read the two service URLs, then remove every variable the binary reads
    // as a setting, so that neither the in-process parse of the daemon's
    // settings nor the child processes see stray values from the shell: the
    // daemon gets exactly the environment this bench gives it.
    let amqp_url = std::env::var("AMQP_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let database_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    for name in setting_env_names() {
        // SAFETY: first thing in `main`, before any other thread exists.
        unsafe { std::env::remove_var(name) };
    }
    let args = Args::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench_main(args, amqp_url, database_url)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every environment variable a flag of the binary falls back to.
fn setting_env_names() -> Vec<String> {
    let command = Cli::command();
    let mut names = Vec::new();
    let mut pending = vec![&command];
    while let Some(cmd) = pending.pop() {
        names.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned())),
        );
        pending.extend(cmd.get_subcommands());
    }
    names
}

/// Ok(true) when every run was correct.
async fn bench_main(args: Args, amqp_url: String, database_url: String) -> Result<bool> {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_aom-terminator"));
    let target_dir = binary
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let log_dir = target_dir.join("bench-logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("create {}", log_dir.display()))?;
    let bench = Bench {
        amqp_url,
        database_url,
        binary,
        log_dir,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        clk_tck: clock_ticks(),
        timeout: Duration::from_secs(args.timeout_s.max(1)),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("build the HTTP client")?,
    };
    let header = preamble(&bench);
    println!("{header}");

    let scenarios = match args.suite {
        Some(Suite::Standard) => Scenario::standard(&args),
        None => vec![Scenario::from_args(&args)],
    };
    for s in &scenarios {
        s.check()?;
    }
    let mut rows = Vec::new();
    let mut all_correct = true;
    for (i, scenario) in scenarios.iter().enumerate() {
        println!(
            "\n=== run {}/{}: {} ===",
            i + 1,
            scenarios.len(),
            scenario.label
        );
        let outcome = match run_scenario(&bench, scenario).await {
            Ok(o) => o,
            Err(e) => RunOutcome::Incorrect(vec![format!("the run failed: {e:#}")]),
        };
        match &outcome {
            RunOutcome::Correct(report) => print_report(&bench, scenario, report),
            RunOutcome::Incorrect(failures) => {
                all_correct = false;
                for f in failures {
                    println!("FAILED: {f}");
                }
                println!("NOT CORRECT: no rate reported");
            }
        }
        rows.push(markdown_row(scenario, &outcome, bench.cores));
    }

    if args.suite.is_some() {
        println!("\n=== suite standard ===\n");
        println!("{header}\n");
        println!("{}", table_header());
        for row in &rows {
            println!("{row}");
        }
    } else if args.markdown_row {
        println!("\nBENCHMARKS.md row:\n");
        println!("{}", table_header());
        for row in &rows {
            println!("{row}");
        }
    }
    if !all_correct {
        println!("\nat least one run was NOT CORRECT");
    }
    Ok(all_correct)
}

// ---------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------

enum RunOutcome {
    Correct(Box<Report>),
    Incorrect(Vec<String>),
}

/// The numbers of a correct run.
struct Report {
    requests: u64,
    messages: u64,
    prefetch: u16,
    publish: Duration,
    ceiling: Option<Ceiling>,
    /// The bare consumer again, holding each message for the API latency.
    held: Option<Ceiling>,
    /// Daemon spawn → all N outcomes seen committed.
    wall: Duration,
    /// Daemon spawn → first request received (start-up, migrations, connect).
    startup_s: Option<f64>,
    /// min(received_at) → max(recorded_at).
    drain_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Publish → audit commit; mostly the wait in the pre-filled queue.
    published_p50_s: f64,
    published_p99_s: f64,
    rss_max_kib: u64,
    rss_by_tenth: [u64; 10],
    hwm_kib: Option<u64>,
    cpu: CpuSplit,
    max_in_flight: Option<u64>,
    /// The sandbox's mean answer time (arrival → answer), ms.
    sandbox_answer_ms: Option<f64>,
    log_lines: usize,
}

impl Report {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.drain_s
    }

    fn peak_rss_mib(&self) -> f64 {
        self.hwm_kib.unwrap_or(0).max(self.rss_max_kib) as f64 / 1024.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Ceiling {
    messages: u64,
    requests: u64,
    elapsed: Duration,
}

impl Ceiling {
    fn msgs_per_s(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
    fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// CPU seconds over the window.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSplit {
    daemon: f64,
    sandbox: f64,
    rabbitmq: f64,
    postgres: f64,
    machine: f64,
    bench: f64,
}

struct Names {
    database: String,
    queue: String,
    dead_letter_queue: String,
    ceiling_queue: String,
}

async fn run_scenario(bench: &Bench, scenario: &Scenario) -> Result<RunOutcome> {
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
    for queue in [&names.queue, &names.dead_letter_queue, &names.ceiling_queue] {
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

    // The daemon's environment, and its settings as the daemon itself parses
    // them (queue arguments, effective prefetch).
    let mut daemon_env: Vec<(String, String)> = vec![
        ("AMQP_URL".into(), bench.amqp_url.clone()),
        ("DATABASE_URL".into(), database_url.clone()),
        ("AOM_ENDPOINT".into(), sandbox_url.clone()),
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
    let cfg = daemon_config(&daemon_env)?;

    let connection =
        aom_terminator::broker::connect(&cfg.amqp, &format!("{}-bench", names.database))
            .await
            .context("connect to RabbitMQ (AMQP_URL)")?;
    let channel = connection
        .create_channel()
        .await
        .context("open a channel")?;
    declare_topology(&channel, &cfg.amqp)
        .await
        .context("declare the queues with the daemon's arguments")?;

    let bodies = message_bodies(scenario);
    let messages = bodies.len() as u64;

    // 2. The ceiling: a consumer that does nothing but ack.
    let ceiling_at = async |hold: Duration| {
        measure_ceiling(
            bench,
            &connection,
            &cfg,
            &names.ceiling_queue,
            &bodies,
            scenario.requests,
            hold,
        )
        .await
    };
    let ceiling = if scenario.ceiling {
        let c = ceiling_at(Duration::ZERO)
            .await
            .context("ceiling measurement")?;
        println!(
            "ceiling: {} msgs consumed and acked in {:.3} s by a bare consumer (prefetch {}): {} msgs/s{}",
            thousands(c.messages),
            c.elapsed.as_secs_f64(),
            cfg.prefetch,
            thousands_f(c.msgs_per_s()),
            if scenario.batch > 0 {
                format!(" = {} requests/s", thousands_f(c.requests_per_s()))
            } else {
                String::new()
            }
        );
        if c.messages < 1_000 {
            println!(
                "ceiling: note: only {} messages; a window this short says little",
                c.messages
            );
        }
        Some(c)
    } else {
        None
    };
    // 2b. With an API latency: the same bare consumer, holding each message
    // for the latency in one of CONCURRENCY slots before it acks. Little's
    // law with the broker's own cycle in it: what any consumer with this
    // prefetch and concurrency can reach.
    let held = if scenario.ceiling && scenario.latency_ms > 0 && scenario.batch == 0 {
        let c = ceiling_at(Duration::from_millis(scenario.latency_ms))
            .await
            .context("held ceiling measurement")?;
        println!(
            "held ceiling: a bare consumer that holds each message {} ms in one of {} slots, then acks it (prefetch {}): {} msgs/s",
            scenario.latency_ms,
            cfg.concurrency,
            cfg.prefetch,
            thousands_f(c.msgs_per_s()),
        );
        Some(c)
    } else {
        None
    };

    // 3. Pre-fill the request queue.
    let Published {
        took: publish,
        at_epoch: published_at,
    } = publish_all(bench, &connection, &names.queue, &bodies)
        .await
        .context("pre-fill the request queue")?;
    let ready = queue_depth(
        &connection,
        &names.queue,
        request_queue_arguments(&cfg.amqp),
    )
    .await?;
    println!(
        "pre-filled {}: {} msgs ({} requests) in {:.2} s ({} msgs/s, persistent, confirmed); {} ready",
        names.queue,
        thousands(messages),
        thousands(scenario.requests),
        publish.as_secs_f64(),
        thousands_f(messages as f64 / publish.as_secs_f64()),
        thousands(u64::from(ready)),
    );
    if u64::from(ready) != messages {
        bail!("the request queue holds {ready} messages, expected {messages}");
    }

    // 4. The sandbox, then the daemon.
    let sandbox_log = bench
        .log_dir
        .join(format!("{}-sandbox.log", names.database));
    let mut sandbox = spawn(
        &bench.binary,
        &[
            "sandbox".to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--latency".to_owned(),
            format!("{}ms", scenario.latency_ms),
        ],
        // One runtime thread: the sandbox stands in for a remote API, and
        // takes less of the machine the daemon is measured on this way.
        &[
            ("RUST_LOG".to_owned(), "warn".to_owned()),
            ("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned()),
        ],
        &sandbox_log,
    )?;
    let sandbox_pid = sandbox.id().context("the sandbox has no pid")?;
    wait_for_sandbox(bench, &mut sandbox, &sandbox_url).await?;
    println!(
        "sandbox {sandbox_url} (latency {} ms), log {}",
        scenario.latency_ms,
        sandbox_log.display()
    );

    let mut db = PgConnection::connect(&database_url)
        .await
        .context("connect to the bench database")?;

    let daemon_log = bench.log_dir.join(format!("{}-daemon.log", names.database));
    println!(
        "daemon log {}, metrics http://{}/metrics",
        daemon_log.display(),
        daemon_env
            .iter()
            .rev()
            .find(|(k, _)| k == "METRICS_ADDR")
            .map_or("", |(_, v)| v.as_str())
    );
    let start = CpuSnapshot::take(sandbox_pid, None)?;
    let t0 = Instant::now();
    let t0_epoch = epoch_now();
    let mut daemon = spawn(&bench.binary, &["run".to_owned()], &daemon_env, &daemon_log)?;
    let daemon_pid = daemon.id().context("the daemon has no pid")?;

    // 5. Sample until every outcome is committed.
    let target = i64::try_from(scenario.requests).context("--requests is too large")?;
    let deadline = t0 + bench.timeout;
    let mut rss_max_kib = 0;
    // The largest VmRSS seen in each tenth of the run (by outcomes
    // committed): flat across the tenths is flat however deep the queue.
    let mut rss_by_tenth = [0_u64; 10];
    let mut seen = 0_i64;
    let mut samples = 0_u64;
    let mut last_error: Option<String>;
    let mut exited_early = None;
    let mut timed_out = false;
    let mut stalled = false;
    let mut last_change = (0_i64, Instant::now());
    loop {
        if let Some(kib) = status_kib(daemon_pid, "VmRSS:") {
            rss_max_kib = rss_max_kib.max(kib);
            let tenth = usize::try_from(seen * 10 / target.max(1)).map_or(9, |t| t.min(9));
            rss_by_tenth[tenth] = rss_by_tenth[tenth].max(kib);
        }
        samples += 1;
        last_error = match progress(&mut db, target, samples.is_multiple_of(10)).await {
            // Outcomes only grow; the cheap estimate can read low.
            Ok(n) => {
                seen = seen.max(n);
                None
            }
            // The table appears when the daemon has migrated.
            Err(e) => Some(e.to_string()),
        };
        if seen >= target {
            break;
        }
        if let Some(status) = daemon.try_wait().context("poll the daemon")? {
            exited_early = Some(status);
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        // A run that stops short (requests rejected instead of sent, say)
        // fails soon instead of at the timeout.
        if seen != last_change.0 {
            last_change = (seen, Instant::now());
        } else if last_change.1.elapsed() >= STALL {
            stalled = true;
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let wall = t0.elapsed();
    // 6. CPU at the end of the window, before the daemon stops (its Postgres
    // backends still exist).
    let end = CpuSnapshot::take(sandbox_pid, Some(daemon_pid))?;
    let hwm_kib = status_kib(daemon_pid, "VmHWM:");
    if let Some(kib) = status_kib(daemon_pid, "VmRSS:") {
        rss_max_kib = rss_max_kib.max(kib);
    }
    if stalled {
        failures.push(format!(
            "no progress for {} s at {seen} of {target} outcomes; see {}",
            STALL.as_secs(),
            daemon_log.display()
        ));
    }
    if timed_out {
        failures.push(format!(
            "timed out after {} s with {seen} of {target} outcomes{}",
            bench.timeout.as_secs(),
            last_error
                .map(|e| format!(" (last query error: {e})"))
                .unwrap_or_default()
        ));
    }

    // 9 (first half). Stop the daemon; its exit code is part of correctness.
    match exited_early {
        Some(status) => failures.push(format!(
            "the daemon exited by itself ({status}) with {seen} of {target} outcomes; see {}",
            daemon_log.display()
        )),
        None => {
            let grace = cfg.shutdown_grace + Duration::from_secs(30);
            match terminate(&mut daemon, grace).await {
                Ok(status) if status.success() => {}
                Ok(status) => failures.push(format!(
                    "the daemon exited with {status} after SIGTERM; see {}",
                    daemon_log.display()
                )),
                Err(e) => failures.push(format!("stopping the daemon: {e:#}")),
            }
        }
    }
    let stats = sandbox_stats(bench, &sandbox_url).await;
    match terminate(&mut sandbox, Duration::from_secs(30)).await {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!(
            "warning: the sandbox exited with {status}; see {}",
            sandbox_log.display()
        ),
        Err(e) => eprintln!("warning: stopping the sandbox: {e:#}"),
    }

    // 7. Correctness.
    let audit = audit_numbers(&mut db, &published_at, scenario.batch.max(1)).await;
    let _ = db.close().await;
    match &audit {
        Ok(a) => {
            if a.outcomes != target {
                failures.push(format!(
                    "termination_outcomes has {} rows, expected {target}",
                    a.outcomes
                ));
            }
            if a.succeeded != target {
                failures.push(format!(
                    "{} outcomes are `succeeded`, expected all {target}",
                    a.succeeded
                ));
            }
            if a.attempts != target {
                failures.push(format!(
                    "termination_attempts has {} rows, expected {target}",
                    a.attempts
                ));
            }
        }
        Err(e) => failures.push(format!("reading the audit: {e:#}")),
    }
    let mut max_in_flight = None;
    let mut sandbox_answer_ms = None;
    match &stats {
        Ok(s) => {
            max_in_flight = s.get("max_in_flight").and_then(serde_json::Value::as_u64);
            let field = |name: &str| s.get(name).and_then(serde_json::Value::as_u64);
            if let (Some(n), Some(us)) = (field("answered"), field("answer_micros"))
                && n > 0
            {
                sandbox_answer_ms = Some(us as f64 / n as f64 / 1000.0);
            }
            match s.get("calls").and_then(serde_json::Value::as_u64) {
                Some(calls) if calls == scenario.requests => {}
                Some(calls) => failures.push(format!(
                    "the sandbox got {calls} calls, expected {}",
                    scenario.requests
                )),
                None => failures.push(format!("the sandbox stats have no `calls`: {s}")),
            }
        }
        Err(e) => failures.push(format!("reading the sandbox stats: {e:#}")),
    }
    for (what, queue, args) in [
        (
            "request queue",
            &names.queue,
            request_queue_arguments(&cfg.amqp),
        ),
        (
            "dead-letter queue",
            &names.dead_letter_queue,
            aom_terminator::broker::dead_letter_queue_arguments(),
        ),
    ] {
        match queue_depth(&connection, queue, args).await {
            Ok(0) => {}
            Ok(n) => failures.push(format!("the {what} {queue} holds {n} messages, expected 0")),
            Err(e) => failures.push(format!("checking the {what}: {e:#}")),
        }
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    let log_lines = std::fs::read_to_string(&daemon_log)
        .map(|s| s.lines().count())
        .unwrap_or(0);

    if !failures.is_empty() {
        if log_lines > 0 {
            failures.push(format!(
                "the daemon logged {log_lines} warning/error lines; see {}",
                daemon_log.display()
            ));
        }
        return Ok(RunOutcome::Incorrect(failures));
    }
    let audit = audit?;
    println!(
        "correct: {target} outcomes, all succeeded; {target} attempts; {target} sandbox calls; \
         request and dead-letter queues empty; daemon exit 0"
    );
    let Some(drain_s) = audit.drain_s.filter(|s| *s > 0.0) else {
        bail!("the audit has no drain window");
    };
    let ticks = |t: u64| t as f64 / bench.clk_tck;
    let cpu = CpuSplit {
        daemon: ticks(end.daemon),
        sandbox: ticks(end.sandbox.saturating_sub(start.sandbox)),
        rabbitmq: ticks(delta(&start.rabbitmq, &end.rabbitmq)),
        postgres: ticks(delta(&start.postgres, &end.postgres)),
        machine: ticks(end.machine.saturating_sub(start.machine)),
        bench: ticks(end.bench.saturating_sub(start.bench)),
    };
    Ok(RunOutcome::Correct(Box::new(Report {
        requests: scenario.requests,
        messages,
        prefetch: cfg.prefetch,
        publish,
        ceiling,
        held,
        wall,
        startup_s: audit.first_received_epoch.map(|e| e - t0_epoch),
        drain_s,
        p50_ms: audit.p50_ms.unwrap_or(f64::NAN),
        p99_ms: audit.p99_ms.unwrap_or(f64::NAN),
        max_ms: audit.max_ms.unwrap_or(f64::NAN),
        published_p50_s: audit.published_p50_s.unwrap_or(f64::NAN),
        published_p99_s: audit.published_p99_s.unwrap_or(f64::NAN),
        rss_max_kib,
        rss_by_tenth,
        hwm_kib,
        cpu,
        max_in_flight,
        sandbox_answer_ms,
        log_lines,
    })))
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
    let cli = <Cli as Parser>::try_parse_from(argv)
        .map_err(|e| anyhow!("the daemon's settings do not parse: {}", one_line(&e)))?;
    match cli.command {
        CliCommand::Run(args) => args
            .validate()
            .map_err(|e| anyhow!("the daemon's settings are invalid: {e}")),
        _ => bail!("not a run command"),
    }
}

fn request_json(i: u64) -> serde_json::Value {
    serde_json::json!({
        "project_id": PROJECT_ID,
        "workflow_id": WORKFLOW_ID,
        "execution_id": format!("ex-{i}"),
        "request_id": format!("r-{i}"),
    })
}

fn message_bodies(scenario: &Scenario) -> Vec<Vec<u8>> {
    if scenario.batch == 0 {
        (0..scenario.requests)
            .map(|i| request_json(i).to_string().into_bytes())
            .collect()
    } else {
        (0..scenario.requests)
            .step_by(usize::try_from(scenario.batch).unwrap_or(usize::MAX))
            .map(|first| {
                let last = (first + scenario.batch).min(scenario.requests);
                let requests: Vec<_> = (first..last).map(request_json).collect();
                serde_json::json!({ "requests": requests })
                    .to_string()
                    .into_bytes()
            })
            .collect()
    }
}

/// Now, in Unix seconds (the clock Postgres' timestamps use).
fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The pre-fill: how long it took, and when each message was published
/// (Unix seconds, in body order).
struct Published {
    took: Duration,
    at_epoch: Vec<f64>,
}

/// Publish every body (persistent, mandatory) with publisher confirms, up to
/// `CONFIRM_WINDOW` unconfirmed at a time.
async fn publish_all(
    bench: &Bench,
    connection: &Connection,
    queue: &str,
    bodies: &[Vec<u8>],
) -> Result<Published> {
    let channel = connection
        .create_channel()
        .await
        .context("open a publish channel")?;
    channel
        .confirm_select(ConfirmSelectOptions { nowait: false })
        .await
        .context("enable publisher confirms")?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + bench.timeout;
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(CONFIRM_WINDOW);
    let mut at_epoch = Vec::with_capacity(bodies.len());
    for body in bodies {
        at_epoch.push(epoch_now());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .context("publish")?;
        pending.push_back(confirm);
        if pending.len() >= CONFIRM_WINDOW
            && let Some(oldest) = pending.pop_front()
        {
            confirmed(oldest, deadline).await?;
        }
    }
    while let Some(oldest) = pending.pop_front() {
        confirmed(oldest, deadline).await?;
    }
    let took = started.elapsed();
    let _ = channel.close(200, "done".into()).await;
    Ok(Published { took, at_epoch })
}

async fn confirmed(confirm: PublisherConfirm, deadline: tokio::time::Instant) -> Result<()> {
    let confirmation = tokio::time::timeout_at(deadline, confirm)
        .await
        .map_err(|_| anyhow!("timed out waiting for publisher confirms"))?
        .context("await a publisher confirm")?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("a message was returned unroutable"),
        Confirmation::Nack(_) => bail!("the broker nacked a publish"),
        Confirmation::NotRequested => bail!("publisher confirms are not enabled"),
    }
}

/// Messages ready in a queue (passive declare; unacked ones not counted).
async fn queue_depth(connection: &Connection, queue: &str, args: FieldTable) -> Result<u32> {
    // A fresh channel: a failed passive declare closes the channel it ran on.
    let channel = connection
        .create_channel()
        .await
        .context("open a channel")?;
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .with_context(|| format!("passive declare of {queue}"))?;
    let _ = channel.close(200, "done".into()).await;
    Ok(q.message_count())
}

/// Publish the same messages to a separate queue with the request queue's
/// arguments, then consume them with a consumer that only acks, at the
/// daemon's prefetch: first delivery → last ack.
async fn measure_ceiling(
    bench: &Bench,
    connection: &Connection,
    cfg: &DaemonConfig,
    queue: &str,
    bodies: &[Vec<u8>],
    requests: u64,
    hold: Duration,
) -> Result<Ceiling> {
    let channel = connection
        .create_channel()
        .await
        .context("open a channel")?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            request_queue_arguments(&cfg.amqp),
        )
        .await
        .context("declare the ceiling queue")?;
    publish_all(bench, connection, queue, bodies).await?;
    channel
        .basic_qos(cfg.prefetch, BasicQosOptions { global: false })
        .await
        .context("set the prefetch")?;
    let tag = "aomt-bench-ceiling";
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consume the ceiling queue")?;
    let expected = bodies.len() as u64;
    let deadline = tokio::time::Instant::now() + bench.timeout;
    let mut first = None;
    let mut received = 0_u64;
    let mut acked = 0_u64;
    // Acks are pipelined, as a daemon with many messages in flight acks: a
    // lapin ack resolves once its frame is handed to the connection, and
    // awaiting each before taking the next delivery would measure that round
    // trip instead of the broker.
    let mut acks = FuturesUnordered::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency));
    while acked < expected {
        tokio::select! {
            delivery = consumer.next(), if received < expected => {
                let delivery = delivery
                    .context("the consumer ended")?
                    .context("receive a delivery")?;
                first.get_or_insert_with(Instant::now);
                received += 1;
                let acker = delivery.acker;
                // Held: each message takes one of `CONCURRENCY` slots (in
                // delivery order), keeps it `hold`, then is acked: a daemon
                // whose only cost is the API's latency. The hold is aimed as
                // the sandbox aims its latency (tokio's timer fires ~1 ms late).
                let slots = (hold > Duration::ZERO).then(|| Arc::clone(&slots));
                acks.push(async move {
                    if let Some(slots) = slots {
                        let _slot = slots.acquire_owned().await;
                        let at = tokio::time::Instant::now() + timer_aim(hold);
                        tokio::time::sleep_until(at).await;
                    }
                    acker.ack(BasicAckOptions { multiple: false }).await
                });
            }
            Some(ack) = acks.next() => {
                ack.context("ack")?;
                acked += 1;
            }
            () = tokio::time::sleep_until(deadline) => {
                bail!("timed out after {acked} of {expected} messages");
            }
        }
    }
    let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
    let _ = channel
        .basic_cancel(tag.into(), BasicCancelOptions { nowait: false })
        .await;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .context("delete the ceiling queue")?;
    let _ = channel.close(200, "done".into()).await;
    Ok(Ceiling {
        messages: expected,
        requests,
        elapsed,
    })
}

struct AuditNumbers {
    outcomes: i64,
    succeeded: i64,
    attempts: i64,
    drain_s: Option<f64>,
    first_received_epoch: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    published_p50_s: Option<f64>,
    published_p99_s: Option<f64>,
}

/// Outcomes committed so far, cheaply: the newest attempt id is one index
/// probe, where `count(*)` every 100 ms would scan the growing table and
/// load the Postgres being measured. Ids can run ahead of commits (and
/// attempts can outnumber outcomes), so the exact count is taken only once
/// the id says the run could be complete, and once a second regardless (a
/// run whose requests make no attempts, rejections, still ends).
async fn progress(db: &mut PgConnection, target: i64, exact: bool) -> Result<i64, sqlx::Error> {
    if !exact {
        let newest: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM termination_attempts")
            .fetch_one(&mut *db)
            .await?;
        if newest.unwrap_or(0) < target {
            return Ok(newest.unwrap_or(0).min(target - 1));
        }
    }
    sqlx::query_scalar("SELECT count(*) FROM termination_outcomes")
        .fetch_one(db)
        .await
}

/// `published_at[m]` is when message m was published; request `r-{i}` was
/// in message i / `batch`.
async fn audit_numbers(
    db: &mut PgConnection,
    published_at: &[f64],
    batch: u64,
) -> Result<AuditNumbers> {
    type Row = (
        i64,
        i64,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let row: Row = sqlx::query_as(
        "SELECT count(*), \
                count(*) FILTER (WHERE outcome = 'succeeded'), \
                EXTRACT(EPOCH FROM max(recorded_at) - min(received_at))::float8, \
                EXTRACT(EPOCH FROM min(received_at))::float8, \
                percentile_cont(0.5) WITHIN GROUP \
                    (ORDER BY EXTRACT(EPOCH FROM recorded_at - received_at)::float8) * 1000, \
                percentile_cont(0.99) WITHIN GROUP \
                    (ORDER BY EXTRACT(EPOCH FROM recorded_at - received_at)::float8) * 1000, \
                max(EXTRACT(EPOCH FROM recorded_at - received_at)::float8) * 1000 \
         FROM termination_outcomes",
    )
    .fetch_one(&mut *db)
    .await
    .context("query termination_outcomes")?;
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM termination_attempts")
        .fetch_one(&mut *db)
        .await
        .context("query termination_attempts")?;
    let published: (Option<f64>, Option<f64>, i64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s), \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY s), \
                count(*) FILTER (WHERE s IS NULL) \
         FROM (SELECT EXTRACT(EPOCH FROM recorded_at)::float8 \
                      - ($1::float8[])[substr(request_id, 3)::bigint / $2 + 1] AS s \
               FROM termination_outcomes WHERE request_id LIKE 'r-%') t",
    )
    .bind(published_at)
    .bind(i64::try_from(batch).context("batch size")?)
    .fetch_one(&mut *db)
    .await
    .context("query publish → commit times")?;
    if published.2 > 0 {
        bail!(
            "{} outcomes could not be matched to their message's publish time",
            published.2
        );
    }
    Ok(AuditNumbers {
        outcomes: row.0,
        succeeded: row.1,
        attempts,
        drain_s: row.2,
        first_received_epoch: row.3,
        p50_ms: row.4,
        p99_ms: row.5,
        max_ms: row.6,
        published_p50_s: published.0,
        published_p99_s: published.1,
    })
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

fn spawn(binary: &Path, args: &[String], env: &[(String, String)], log: &Path) -> Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let stderr = file
        .try_clone()
        .with_context(|| format!("reopen {}", log.display()))?;
    tokio::process::Command::new(binary)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(stderr))
        // An interrupted or failed run leaves no process behind.
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {} {}", binary.display(), args.join(" ")))
}

/// SIGTERM (via `kill -TERM`), then wait up to `grace` for the exit.
async fn terminate(child: &mut Child, grace: Duration) -> Result<std::process::ExitStatus> {
    if let Some(status) = child.try_wait().context("poll the process")? {
        return Ok(status);
    }
    let pid = child.id().context("the process has no pid")?;
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .context("run kill -TERM")?;
    if !kill.success() {
        bail!("kill -TERM {pid} failed: {kill}");
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.context("wait for the process"),
        Err(_) => {
            let _ = child.kill().await;
            bail!(
                "did not exit within {} s of SIGTERM (killed)",
                grace.as_secs()
            )
        }
    }
}

fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("find a free port for the sandbox")?;
    Ok(listener.local_addr().context("local address")?.port())
}

async fn sandbox_stats(bench: &Bench, url: &str) -> Result<serde_json::Value> {
    let response = bench
        .http
        .get(format!("{url}/_sandbox/stats"))
        .send()
        .await
        .context("GET /_sandbox/stats")?;
    let status = response.status();
    let body = response.text().await.context("read /_sandbox/stats")?;
    if !status.is_success() {
        bail!("GET /_sandbox/stats answered {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("/_sandbox/stats is not JSON: {body}"))
}

async fn wait_for_sandbox(bench: &Bench, sandbox: &mut Child, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sandbox_stats(bench, url).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                if let Some(status) = sandbox.try_wait().context("poll the sandbox")? {
                    bail!("the sandbox exited ({status}) before answering");
                }
                if Instant::now() >= deadline {
                    return Err(e.context("the sandbox did not answer within 30 s"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------

/// CPU ticks (utime + stime) at one instant.
struct CpuSnapshot {
    daemon: u64,
    sandbox: u64,
    rabbitmq: HashMap<u32, u64>,
    postgres: HashMap<u32, u64>,
    machine: u64,
    bench: u64,
}

impl CpuSnapshot {
    fn take(sandbox: u32, daemon: Option<u32>) -> Result<Self> {
        let mut rabbitmq = HashMap::new();
        let mut postgres = HashMap::new();
        for pid in pids()? {
            let Some(comm) = proc_comm(pid) else { continue };
            let group = if matches!(
                comm.as_str(),
                "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost"
            ) {
                &mut rabbitmq
            } else if comm.starts_with("postgres") {
                &mut postgres
            } else {
                continue;
            };
            if let Some(t) = proc_ticks(pid) {
                group.insert(pid, t);
            }
        }
        Ok(Self {
            daemon: daemon.and_then(proc_ticks).unwrap_or(0),
            sandbox: proc_ticks(sandbox).unwrap_or(0),
            rabbitmq,
            postgres,
            machine: machine_busy_ticks()?,
            bench: proc_ticks(std::process::id()).unwrap_or(0),
        })
    }
}

/// Sum of per-pid deltas; a pid absent at the start (a new backend) counts
/// from 0.
fn delta(start: &HashMap<u32, u64>, end: &HashMap<u32, u64>) -> u64 {
    end.iter()
        .map(|(pid, &e)| match start.get(pid) {
            Some(&s) if s <= e => e - s,
            _ => e,
        })
        .sum()
}

fn pids() -> Result<Vec<u32>> {
    Ok(std::fs::read_dir("/proc")
        .context("list /proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is the first, utime the 12th, stime the 13th.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy ticks of the whole machine: the `cpu` line of /proc/stat without
/// idle and iowait (and without guest/guest_nice, which the kernel already
/// counts in user/nice).
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Ok(fields
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4 | 8 | 9))
        .map(|(_, v)| v)
        .sum())
}

/// A `kB` line of /proc/<pid>/status, e.g. `VmRSS:`.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

fn preamble(bench: &Bench) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.1} GiB", kib / 1_048_576.0),
        );
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let revision = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".to_owned(), |s| s.trim().to_owned());
    format!(
        "machine: {} cores (nproc), {model}, {mem_gib} memory\n\
         command: AMQP_URL={} DATABASE_URL={} cargo bench --bench e2e -- {}\n\
         binary:  {} (bench profile), git {revision}",
        bench.cores,
        redact(&bench.amqp_url),
        redact(&bench.database_url),
        args.join(" "),
        bench.binary.display(),
    )
}

/// A URL with its password replaced.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

fn pct(part: f64, whole: f64) -> f64 {
    100.0 * part / whole
}

fn print_report(bench: &Bench, scenario: &Scenario, r: &Report) {
    let rate = r.rate();
    let core_s = r.wall.as_secs_f64() * bench.cores as f64;
    println!("results ({}):", scenario.label);
    println!(
        "  terminations/s end to end:   {} /s  ({} requests in {} msgs; drain window {:.3} s = max(recorded_at) - min(received_at))",
        thousands_f(rate),
        thousands(r.requests),
        thousands(r.messages),
        r.drain_s
    );
    println!(
        "  delivered→committed (time from delivery to the daemon to audit commit, recorded_at - received_at): \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r.p50_ms, r.p99_ms, r.max_ms
    );
    println!(
        "  published→committed (publish to audit commit; the queue was pre-filled, so this is mostly \
         the wait in the queue and the daemon's start-up, and grows with N): p50 {:.2} s, p99 {:.2} s",
        r.published_p50_s, r.published_p99_s
    );
    println!(
        "  daemon peak RSS:             {:.1} MiB (VmHWM{}; max sampled VmRSS {:.1} MiB)",
        r.peak_rss_mib(),
        if r.hwm_kib.is_some() {
            ""
        } else {
            " unavailable"
        },
        r.rss_max_kib as f64 / 1024.0
    );
    let tenths: Vec<String> = r
        .rss_by_tenth
        .iter()
        .map(|kib| format!("{:.1}", *kib as f64 / 1024.0))
        .collect();
    println!(
        "  daemon RSS by tenth of the run (max sampled VmRSS, MiB): {}",
        tenths.join(" / ")
    );
    println!("  daemon CPU:                  {:.2} s", r.cpu.daemon);
    match &r.ceiling {
        Some(c) if scenario.batch > 0 => println!(
            "  ceiling (bare ack consumer, prefetch {}): {} msgs/s = {} requests/s; daemon at {:.2} % of it",
            r.prefetch,
            thousands_f(c.msgs_per_s()),
            thousands_f(c.requests_per_s()),
            pct(rate, c.requests_per_s())
        ),
        Some(c) => println!(
            "  ceiling (bare ack consumer, prefetch {}): {} msgs/s; daemon at {:.1} % of it",
            r.prefetch,
            thousands_f(c.msgs_per_s()),
            pct(rate, c.msgs_per_s())
        ),
        None => println!("  ceiling:                     not measured"),
    }
    if let (Some(h), Some(bound)) = (&r.held, littles_law(scenario)) {
        println!(
            "  held ceiling (bare consumer, {} ms in one of {} slots, prefetch {}): {} msgs/s = {:.1} % of Little's law; daemon at {:.1} % of it",
            scenario.latency_ms,
            scenario.concurrency,
            r.prefetch,
            thousands_f(h.msgs_per_s()),
            pct(h.msgs_per_s(), bound),
            pct(rate, h.msgs_per_s())
        );
    }
    if let Some(bound) = littles_law(scenario) {
        println!(
            "  Little's law bound C/L:      {} /s ({} / {} ms); daemon at {:.1} % of it{}",
            thousands_f(bound),
            scenario.concurrency,
            scenario.latency_ms,
            pct(rate, bound),
            if scenario.batch == 0 && u32::from(r.prefetch) < scenario.concurrency {
                format!(
                    " (note: PREFETCH {} < C holds at most {} single requests in flight)",
                    r.prefetch, r.prefetch
                )
            } else {
                String::new()
            }
        );
    }
    if let Some(limit) = scenario.rate_limit {
        println!(
            "  RATE_LIMIT {limit}/s:  daemon at {:.1} % of it",
            pct(rate, f64::from(limit))
        );
    }
    if let Some(m) = r.max_in_flight {
        println!("  sandbox max in flight:       {m}");
    }
    if let Some(ms) = r.sandbox_answer_ms {
        println!(
            "  sandbox answer time:         mean {ms:.3} ms from a call's arrival to its answer (latency asked: {} ms)",
            scenario.latency_ms
        );
    }
    println!(
        "  start-up (spawn → first delivery): {}; publish (pre-fill) took {:.2} s; daemon log lines (warn+): {}",
        r.startup_s
            .map_or_else(|| "unknown".to_owned(), |s| format!("{s:.3} s")),
        r.publish.as_secs_f64(),
        r.log_lines
    );
    println!(
        "CPU over the window daemon start → all committed ({:.3} s wall × {} cores = {:.2} core-s):",
        r.wall.as_secs_f64(),
        bench.cores,
        core_s
    );
    for (name, s) in [
        ("daemon", r.cpu.daemon),
        ("sandbox", r.cpu.sandbox),
        ("rabbitmq", r.cpu.rabbitmq),
        ("postgres", r.cpu.postgres),
        ("machine (all)", r.cpu.machine),
        ("this bench", r.cpu.bench),
        (
            "other load",
            (r.cpu.machine
                - r.cpu.daemon
                - r.cpu.sandbox
                - r.cpu.rabbitmq
                - r.cpu.postgres
                - r.cpu.bench)
                .max(0.0),
        ),
    ] {
        println!("  {name:<14} {s:>8.2} CPU-s  {:>5.1} %", pct(s, core_s));
    }
}

fn littles_law(scenario: &Scenario) -> Option<f64> {
    (scenario.latency_ms > 0)
        .then(|| f64::from(scenario.concurrency) * 1000.0 / scenario.latency_ms as f64)
}

fn table_header() -> String {
    "| scenario | requests | batch | latency | concurrency | terminations/s | ceiling msgs/s | % of ceiling \
     | % of Little's law | p50 / p99 delivered→committed ms | p50 / p99 published→committed s \
     | peak RSS MiB | daemon CPU s \
     | CPU split daemon/sandbox/rabbitmq/postgres % |\n\
     |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        .to_owned()
}

fn markdown_row(scenario: &Scenario, outcome: &RunOutcome, cores: usize) -> String {
    let label = match scenario.rate_limit {
        Some(limit) => match outcome {
            RunOutcome::Correct(r) => format!(
                "{} ({:.1} % of the limit)",
                scenario.label,
                pct(r.rate(), f64::from(limit))
            ),
            RunOutcome::Incorrect(_) => scenario.label.clone(),
        },
        None => scenario.label.clone(),
    };
    let fixed = format!(
        "| {label} | {} | {} | {} ms | {} ",
        thousands(scenario.requests),
        if scenario.batch == 0 {
            "—".to_owned()
        } else {
            thousands(scenario.batch)
        },
        scenario.latency_ms,
        thousands(u64::from(scenario.concurrency)),
    );
    let r = match outcome {
        RunOutcome::Correct(r) => r,
        RunOutcome::Incorrect(_) => {
            return format!("{fixed}| NOT CORRECT | | | | | | | | |");
        }
    };
    let rate = r.rate();
    let (ceiling, of_ceiling) = match &r.ceiling {
        Some(c) if scenario.batch > 0 => (
            format!(
                "{} ({} req/s)",
                thousands_f(c.msgs_per_s()),
                thousands_f(c.requests_per_s())
            ),
            format!("{:.2} %", pct(rate, c.requests_per_s())),
        ),
        Some(c) => (
            thousands_f(c.msgs_per_s()),
            format!("{:.1} %", pct(rate, c.msgs_per_s())),
        ),
        None => ("—".to_owned(), "—".to_owned()),
    };
    let little = match (littles_law(scenario), &r.held) {
        (Some(b), Some(h)) => format!(
            "{:.1} % (held bare consumer: {:.1} %)",
            pct(rate, b),
            pct(h.msgs_per_s(), b)
        ),
        (Some(b), None) => format!("{:.1} %", pct(rate, b)),
        (None, _) => "—".to_owned(),
    };
    let core_s = r.wall.as_secs_f64() * cores as f64;
    format!(
        "{fixed}| {} | {ceiling} | {of_ceiling} | {little} | {:.1} / {:.1} | {:.2} / {:.2} | {:.1} | {:.2} | {:.0}/{:.0}/{:.0}/{:.0} |",
        thousands_f(rate),
        r.p50_ms,
        r.p99_ms,
        r.published_p50_s,
        r.published_p99_s,
        r.peak_rss_mib(),
        r.cpu.daemon,
        pct(r.cpu.daemon, core_s),
        pct(r.cpu.sandbox, core_s),
        pct(r.cpu.rabbitmq, core_s),
        pct(r.cpu.postgres, core_s),
    )
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn thousands_f(x: f64) -> String {
    if x.is_finite() && x >= 0.0 {
        thousands(x.round() as u64)
    } else {
        format!("{x}")
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
