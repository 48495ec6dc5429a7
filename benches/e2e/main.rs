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
//! table; `--suite limits` the API's limits (the sandbox's rate limit and
//! capacity; adaptive, then fixed), `--suite latency50` singles at 50 ms.
//!
//! Modules: `scenario` (what to run), `run` (one run, step by step),
//! `ceiling` (the broker's ceiling), `publish` (the requests and the
//! pre-fill), `audit` (what the daemon committed), `verify` (the correctness
//! checks), `process` (the child processes), `procfs` (CPU and RSS from
//! /proc), `output` (what is printed).

mod audit;
mod ceiling;
mod output;
mod process;
mod procfs;
mod publish;
mod run;
mod scenario;
mod verify;

use aom_terminator::cli::env_names;

use crate::output::{markdown_row, preamble, print_report, table_header};
use crate::procfs::clock_ticks;
use crate::run::{RunOutcome, run_scenario};
use crate::scenario::{Args, Scenario};
use anyhow::{Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// What every run shares.
pub(crate) struct Bench {
    pub(crate) amqp_url: String,
    pub(crate) database_url: String,
    pub(crate) binary: PathBuf,
    pub(crate) log_dir: PathBuf,
    pub(crate) cores: usize,
    pub(crate) clk_tck: f64,
    pub(crate) timeout: Duration,
    pub(crate) http: reqwest::Client,
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
    for name in env_names() {
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
        // The sandbox and the daemon's metrics are on loopback: never
        // through a proxy in the shell.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .context("build the HTTP client")?,
    };
    let header = preamble(&bench);
    println!("{header}");

    let scenarios = Scenario::all(&args);
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

    if let Some(suite) = args.suite {
        println!("\n=== suite {suite:?} ===\n");
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
