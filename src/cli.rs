//! The command tree: which subcommands exist and which arguments each
//! takes. Nothing runs here; `main` hands each parsed command to its module.

use crate::sandbox::SandboxArgs;
use crate::settings::{DatabaseArgs, LogFormat, RunArgs};
use crate::tools::{dead_letters::DeadLettersArgs, enqueue::EnqueueArgs, report::ReportArgs};
use clap::{CommandFactory, Parser, Subcommand};

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
