//! What to run: the command line, the suites, one run's parameters.

use crate::output::thousands;
use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};
use std::fmt::Write as _;

/// Largest batch the daemon accepts in one message.
const MAX_BATCH: u64 = 10_000;

/// End-to-end benchmark: the release daemon against the real RabbitMQ and
/// Postgres (AMQP_URL, DATABASE_URL), with the sandbox as the AOM API.
#[derive(Debug, Clone, Parser)]
#[command(name = "e2e")]
pub(crate) struct Args {
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
    pub(crate) markdown_row: bool,
    /// Run a suite of scenarios one after another and print the table.
    #[arg(
        long,
        value_enum,
        conflicts_with_all = ["requests", "batch", "latency_ms", "concurrency", "prefetch", "rate_limit"]
    )]
    pub(crate) suite: Option<Suite>,
    /// Most seconds a phase (pre-fill, ceiling, the daemon's drain) may take.
    #[arg(long, default_value_t = 600)]
    pub(crate) timeout_s: u64,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Suite {
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
pub(crate) struct Scenario {
    pub(crate) label: String,
    pub(crate) requests: u64,
    pub(crate) batch: u64,
    pub(crate) latency_ms: u64,
    pub(crate) concurrency: u32,
    pub(crate) prefetch: Option<u16>,
    pub(crate) rate_limit: Option<u32>,
    pub(crate) ceiling: bool,
    pub(crate) extra_env: Vec<(String, String)>,
}

impl Scenario {
    /// The scenarios `args` asks for: its suite's, or the one its flags name.
    pub(crate) fn all(args: &Args) -> Vec<Self> {
        match args.suite {
            Some(Suite::Standard) => Self::standard(args),
            None => vec![Self::from_args(args)],
        }
    }

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

    pub(crate) fn check(&self) -> Result<()> {
        if self.requests == 0 {
            bail!("--requests must be at least 1");
        }
        if self.batch > MAX_BATCH {
            bail!("--batch must be at most {MAX_BATCH} (the daemon's limit per message)");
        }
        Ok(())
    }
}
