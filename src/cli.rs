//! The command tree: which subcommands exist and which arguments each
//! takes. Nothing runs here; `main` hands each parsed command to its module.

use crate::sandbox::SandboxArgs;
use crate::settings::{DatabaseArgs, LogFormat, RunArgs, secret};
use crate::tools::{
    dead_letters::DeadLettersArgs, enqueue::EnqueueArgs, prune::AuditArgs, report::ReportArgs,
};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use secrecy::SecretString;
use std::ffi::OsString;

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
    #[command(after_help = "\
Examples:
  # against the sandbox (aom-terminator sandbox --expected-token dev-token)
  AOM_ENDPOINT=http://127.0.0.1:8080 AOM_AUTH_TOKEN=dev-token aom-terminator run
  # against the real API, the token from a file that is re-read when it changes
  AOM_ENDPOINT=https://aom.cn-north-4.myhuaweicloud.com \\
    AOM_AUTH_TOKEN_FILE=/var/run/secrets/aom/token CONCURRENCY=128 aom-terminator run")]
    Run(Box<RunArgs>),
    /// Apply the audit schema migrations and exit.
    #[command(after_help = "\
Examples:
  DATABASE_URL=postgres://postgres@127.0.0.1:5432/aom aom-terminator migrate")]
    Migrate(DatabaseArgs),
    /// Serve a fake AOM terminate API for trials, tests and benchmarks.
    #[command(after_help = "\
Examples:
  aom-terminator sandbox --listen 127.0.0.1:8080 --expected-token dev-token
  aom-terminator sandbox --latency 20ms --fail-ratios 500=0.01,404=0.02,flaky=0.03
  curl -s http://127.0.0.1:8080/_sandbox/stats")]
    Sandbox(Box<SandboxArgs>),
    /// Inspect the dead-letter queue, and replay requests from it.
    #[command(after_help = "\
Examples:
  aom-terminator dead-letters list | head
  aom-terminator dead-letters replay --reason failed-retries-exhausted --dry-run")]
    DeadLetters(Box<DeadLettersArgs>),
    /// Publish termination requests from a CSV or JSON Lines file.
    #[command(after_help = "\
Examples:
  aom-terminator enqueue cancel.csv --dry-run
  aom-terminator enqueue cancel.csv --requested-by alice
  aom-terminator enqueue cancel.csv --campaign failover-cleanup --note 'stuck after the failover'
  # what did not succeed, sent again as new requests
  aom-terminator report --failed | aom-terminator enqueue - --format csv")]
    Enqueue(Box<EnqueueArgs>),
    /// What happened, from the audit, and what is still pending.
    #[command(after_help = "\
Examples:
  aom-terminator report --since 1h
  aom-terminator report --workflow wf-nightly --format json
  aom-terminator report --failed > not-terminated.csv
  aom-terminator report --campaigns
  aom-terminator report --campaign failover-cleanup --watch")]
    Report(Box<ReportArgs>),
    /// The audit's upkeep: remove old rows, keeping the report's totals.
    #[command(after_help = "\
Examples:
  aom-terminator audit prune --older-than 180d --dry-run")]
    Audit(Box<AuditArgs>),
    /// The main job end to end in one command: a mass cancellation through
    /// RabbitMQ, the daemon and an embedded fake API, audited in Postgres.
    #[command(after_help = DEMO_EXAMPLE)]
    Demo(Box<DemoArgs>),
}

const DEMO_EXAMPLE: &str = "\
Examples:
  aom-terminator demo                      # 10,000 requests; RabbitMQ and Postgres on localhost
  aom-terminator demo --requests 500 --keep
  (the services: e.g. `docker compose up -d rabbitmq postgres`)

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

/// Parse `argv` as the command line alone: no flag falls back to its
/// environment variable. For tests and benchmarks, which must get exactly
/// the settings they pass, whatever the developer's shell holds.
pub fn parse_args_only<P, I, T>(argv: I) -> Result<P, clap::Error>
where
    P: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = without_env(P::command());
    let mut matches = command.try_get_matches_from_mut(argv)?;
    P::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut command))
}

/// `command` with no argument, in it or in any subcommand below it, reading
/// the environment.
fn without_env(command: clap::Command) -> clap::Command {
    command
        .mut_args(|a| a.env(None::<&str>))
        .mut_subcommands(without_env)
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
        let err =
            parse_args_only::<Cli, _, _>(["aom-terminator", "run"]).expect_err("missing settings");
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

    /// Every command and subcommand, by its path (`dead-letters list`).
    fn commands(command: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        for sub in command.get_subcommands() {
            let path = format!("{path} {}", sub.get_name()).trim().to_owned();
            commands(sub, path.clone(), out);
            out.push((path, sub.clone()));
        }
    }

    #[test]
    fn the_args_only_parse_reads_no_environment() {
        let mut all = Vec::new();
        commands(&without_env(Cli::command()), String::new(), &mut all);
        assert!(
            all.len() >= 8,
            "{:?}",
            all.iter().map(|c| &c.0).collect::<Vec<_>>()
        );
        for (path, command) in &all {
            let reading: Vec<String> = command
                .get_arguments()
                .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
                .collect();
            assert!(reading.is_empty(), "`{path}` still reads {reading:?}");
        }
        // The real command tree does read them: the walk above saw the same tree.
        assert!(env_names().len() > 20);
    }

    #[test]
    fn every_subcommand_shows_examples_in_its_help() {
        let mut all = Vec::new();
        commands(&Cli::command(), String::new(), &mut all);
        let names: Vec<&str> = all.iter().map(|c| c.0.as_str()).collect();
        for want in [
            "run",
            "migrate",
            "sandbox",
            "enqueue",
            "report",
            "dead-letters",
            "dead-letters list",
            "dead-letters replay",
            "audit prune",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for (path, command) in &all {
            let help = command
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let first = help.lines().next().unwrap_or("");
            assert_eq!(first, "Examples:", "`{path}` --help");
            assert!(
                help.lines().skip(1).any(|l| l.contains("aom-terminator")),
                "`{path}` has no example: {help}"
            );
        }
    }
}
