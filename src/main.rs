//! The `aom-terminator` binary: parse the command line, start logging, run
//! the chosen subcommand until a signal.

use aom_terminator::audit::Audit;
use aom_terminator::cli::{Cli, Command, env_names, one_line};
use aom_terminator::settings::ConfigError;
use aom_terminator::tools::{dead_letters, enqueue, report};
use aom_terminator::{daemon, demo, sandbox, telemetry};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // One crypto provider for every TLS user (the API and broker clients), chosen before
    // any connection; an error only means it is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    unset_empty_settings();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::Demo(_)) && std::env::var_os("RUST_LOG").is_none() {
        // The demo shows progress and a report, not the daemon's lines.
        // SAFETY: still before any other thread exists (see above).
        unsafe { std::env::set_var("RUST_LOG", demo::LOG_FILTER) };
    }
    telemetry::init(cli.log_format);

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
    runtime.block_on(async move {
        let result = match cli.command {
            Command::Run(args) => match args.validate() {
                Ok(cfg) => daemon::run(cfg, shutdown_signal()).await,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            },
            Command::Migrate(args) => match args.settings().and_then(|s| Audit::new(&s, 1)) {
                Ok(audit) => audit
                    .migrate()
                    .await
                    .map(|()| tracing::info!("audit schema is up to date"))
                    .map_err(anyhow::Error::from),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            },
            Command::Sandbox(args) => sandbox::run(*args, shutdown_signal()).await,
            Command::DeadLetters(args) => dead_letters::run(*args).await,
            Command::Report(args) => report::run(*args).await,
            Command::Enqueue(args) => match enqueue::run(*args).await {
                Ok(enqueue::Enqueued::Published) => Ok(()),
                Ok(enqueue::Enqueued::Refused) => return ExitCode::from(1),
                Err(e) => Err(e),
            },
            Command::Demo(args) => {
                let options = demo::Options {
                    requests: args.requests,
                    keep: args.keep,
                    amqp_url: args.amqp_url,
                    database_url: args.database.database_url,
                    queue: args.queue,
                    dead_letter_queue: args.dead_letter_queue,
                    concurrency: args.concurrency,
                };
                match demo::run(options, shutdown_signal()).await {
                    Ok(demo::Ended::Complete) => Ok(()),
                    Ok(demo::Ended::Incomplete) => return ExitCode::from(1),
                    Ok(demo::Ended::Unreachable) => return ExitCode::from(2),
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            // A bad setting or argument: one line, exit 2.
            Err(e) if e.is::<ConfigError>() => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                tracing::error!(error.cause_chain = ?e, "{e}");
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// An empty environment variable counts as unset (clap would read it as an
/// empty value): remove every empty one that a setting reads.
fn unset_empty_settings() {
    for name in env_names() {
        if std::env::var_os(&name).is_some_and(|v| v.is_empty()) {
            // SAFETY: called first thing in `main`, before any other thread
            // exists, so nothing can read the environment concurrently.
            unsafe { std::env::remove_var(&name) };
        }
    }
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
