//! The command tree: which subcommands exist and which arguments each
//! takes. Nothing runs here; `main` hands each parsed command to its module.

use crate::sandbox::SandboxArgs;
use crate::settings::{DatabaseArgs, LogFormat, RunArgs, secret};
use crate::tools::{dead_letters::DeadLettersArgs, enqueue::EnqueueArgs, report::ReportArgs};
use clap::{Args, CommandFactory, Parser, Subcommand};
use secrecy::SecretString;

#[derive(Debug, Parser)]
#[command(name = "aom-terminator", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `text` (human) or `json` (for log shippers).
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume termination requests and audit every outcome.
    Run(Box<RunArgs>),
    /// Apply the audit schema migrations and exit.
    Migrate(DatabaseArgs),
    /// Serve a fake AOM terminate API for trials, tests and benchmarks.
    Sandbox(Box<SandboxArgs>),
    /// Inspect the dead-letter queue, and replay requests from it.
    DeadLetters(Box<DeadLettersArgs>),
    /// Publish termination requests from a CSV or JSON Lines file.
    Enqueue(Box<EnqueueArgs>),
    /// What happened, from the audit, and what is still pending.
    Report(Box<ReportArgs>),
    /// The main job end to end in one command: a mass cancellation through
    /// RabbitMQ, the daemon and an embedded fake API, audited in Postgres.
    #[command(after_help = DEMO_EXAMPLE)]
    Demo(Box<DemoArgs>),
}

const DEMO_EXAMPLE: &str = "\
Example (RabbitMQ and Postgres on localhost, e.g. `docker compose up -d rabbitmq postgres`):
  aom-terminator demo --requests 10000

It starts the fake API in-process (20 ms latency; 1% always 500, 2% 404, 3% 500-then-200),
applies the audit migrations, publishes the requests as one mass cancellation (batches of
1,000, requested_by 'demo'), runs the daemon until every request has its outcome, prints the
report and SQL to run next, and deletes its queues (unless --keep). Exit 0 when every request
has exactly one outcome, 1 otherwise, 2 when the broker or the database cannot be reached.";

/// `aom-terminator demo`: the settings it takes. `main` hands them to
/// `demo::run`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How many termination requests to make.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub requests: u32,
    /// Keep the demo's queues (and what is left in them) at the end.
    #[arg(long)]
    pub keep: bool,
    /// AMQP URL of the broker.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = secret
    )]
    pub amqp_url: SecretString,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The demo's request queue (its own: not TERMINATE_QUEUE).
    #[arg(long, default_value = "aom.demo.requests")]
    pub queue: String,
    /// The demo's dead-letter queue (its own: not DEAD_LETTER_QUEUE).
    #[arg(long, default_value = "aom.demo.dead")]
    pub dead_letter_queue: String,
    /// The daemon's CONCURRENCY: most API calls in flight.
    #[arg(long, default_value_t = 128)]
    pub concurrency: u32,
}

/// Every environment variable a flag of any subcommand falls back to: the
/// one list of the program's settings, read off the command tree itself.
/// `main` unsets the empty ones; tests and the benchmark clear them all.
pub fn env_names() -> Vec<String> {
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
    names.sort();
    names.dedup();
    names
}

/// A clap error as the one line the operator needs: the error itself and
/// what it is about, without usage text.
pub fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let mut line = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if line.is_empty() {
        line = "error: invalid command line".to_owned();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_fold_to_one_line() {
        let err = Cli::try_parse_from(["aom-terminator", "run"]).expect_err("missing settings");
        let line = one_line(&err);
        assert!(line.starts_with("error:"), "{line}");
        assert!(line.contains("--aom-endpoint"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn the_settings_list_covers_every_subcommand() {
        let names = env_names();
        for name in [
            "AMQP_URL",
            "DATABASE_URL",
            "AOM_ENDPOINT",
            "CLOUD_SDK_AK",
            "IAM_PASSWORD",
            "RATE_LIMIT",
            "METRICS_ADDR",
            "LOG_FORMAT",
            "RABBITMQ_MANAGEMENT_URL",
            "AOM_REQUESTED_BY",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
        }
    }
}
