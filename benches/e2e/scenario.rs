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
    /// The daemon's PREFETCH (default: the daemon's own, 2 × CONCURRENCY).
    #[arg(long)]
    prefetch: Option<u16>,
    /// The daemon's RATE_LIMIT (API calls per second).
    #[arg(long)]
    rate_limit: Option<u32>,
    /// The sandbox's gateway rate limit (429 beyond R calls/s).
    #[arg(long, value_name = "R")]
    sandbox_rate_limit: Option<u32>,
    /// The sandbox's capacity (calls served at once).
    #[arg(long, value_name = "N")]
    sandbox_capacity: Option<u32>,
    /// The sandbox's queue beyond its capacity (503 beyond Q waiting).
    #[arg(long, value_name = "Q", requires = "sandbox_capacity")]
    sandbox_queue_limit: Option<u32>,
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
        conflicts_with_all = ["requests", "batch", "latency_ms", "concurrency", "prefetch", "rate_limit",
            "sandbox_rate_limit", "sandbox_capacity"]
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
    /// The API's limits, adaptive then fixed: (r) sandbox --rate-limit 2000,
    /// 5 ms, C=512, 20k singles; (k) sandbox --capacity 64 --queue-limit 64,
    /// 20 ms, C=1024, 20k singles.
    Limits,
    /// Singles at 50 ms at the default PREFETCH: C=64, 256 and 1024.
    Latency50,
}

/// The sandbox's load limits in a run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SandboxLimits {
    pub(crate) rate: Option<u32>,
    pub(crate) capacity: Option<u32>,
    pub(crate) queue_limit: Option<u32>,
}

impl SandboxLimits {
    /// The sandbox's flags for them.
    pub(crate) fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, value) in [
            ("--rate-limit", self.rate),
            ("--capacity", self.capacity),
            ("--queue-limit", self.queue_limit),
        ] {
            if let Some(v) = value {
                args.extend([flag.to_owned(), v.to_string()]);
            }
        }
        args
    }

    /// The most calls per second the sandbox lets succeed, if limited.
    pub(crate) fn goodput_bound(&self, latency_ms: u64) -> Option<f64> {
        let by_capacity = self
            .capacity
            .filter(|_| latency_ms > 0)
            .map(|c| f64::from(c) * 1000.0 / latency_ms as f64);
        match (self.rate.map(f64::from), by_capacity) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        }
    }
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
    pub(crate) sandbox: SandboxLimits,
}

impl Scenario {
    /// The scenarios `args` asks for: its suite's, or the one its flags name.
    pub(crate) fn all(args: &Args) -> Vec<Self> {
        match args.suite {
            Some(Suite::Standard) => Self::standard(args),
            Some(Suite::Limits) => Self::limits(args),
            Some(Suite::Latency50) => Self::latency_50(args),
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
        let sandbox = SandboxLimits {
            rate: a.sandbox_rate_limit,
            capacity: a.sandbox_capacity,
            queue_limit: a.sandbox_queue_limit,
        };
        if !sandbox.args().is_empty() {
            let _ = write!(label, ", sandbox {}", sandbox.args().join(" "));
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
            sandbox,
        }
    }

    fn limits(a: &Args) -> Vec<Self> {
        let run = |label: &str, latency_ms, concurrency, sandbox, fixed: bool| {
            let mut extra_env = a.extra_env.clone();
            if fixed {
                extra_env.push(("CONCURRENCY_CONTROL".to_owned(), "fixed".to_owned()));
            }
            Scenario {
                label: format!("{label}, {}", if fixed { "fixed" } else { "adaptive" }),
                requests: 20_000,
                batch: 0,
                latency_ms,
                concurrency,
                prefetch: None,
                rate_limit: None,
                // The broker is not what limits these runs.
                ceiling: false,
                extra_env,
                sandbox,
            }
        };
        let rate = SandboxLimits {
            rate: Some(2000),
            ..SandboxLimits::default()
        };
        let capacity = SandboxLimits {
            capacity: Some(64),
            queue_limit: Some(64),
            ..SandboxLimits::default()
        };
        let r = "r: rate-limited 2,000/s, 5 ms, C=512";
        let k = "k: capacity 64 + queue 64, 20 ms, C=1024";
        vec![
            run(r, 5, 512, rate, false),
            run(r, 5, 512, rate, true),
            run(k, 20, 1024, capacity, false),
            run(k, 20, 1024, capacity, true),
        ]
    }

    fn latency_50(a: &Args) -> Vec<Self> {
        [64, 256, 1024]
            .into_iter()
            .map(|c| Scenario {
                label: format!("singles, 50 ms, C={c}"),
                requests: if c == 64 { 10_000 } else { 30_000 },
                batch: 0,
                latency_ms: 50,
                concurrency: c,
                prefetch: None,
                rate_limit: None,
                ceiling: !a.no_ceiling,
                extra_env: a.extra_env.clone(),
                sandbox: SandboxLimits::default(),
            })
            .collect()
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
            sandbox: SandboxLimits::default(),
        };
        // Each speed scenario with the default PREFETCH (2 × CONCURRENCY), and
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
