//! The `aom-terminator` binary: parse the command line, start logging, run
//! the chosen subcommand until a signal.
//!
//! Data goes to standard output, everything else to standard error. A reader
//! that closes standard output early (`| head`) ends the command quietly
//! with exit 0, as it would a C tool killed by SIGPIPE, but without the 141.

use aom_terminator::audit::Audit;
use aom_terminator::cli::{Cli, Command, env_names, one_line};
use aom_terminator::settings::{ConfigError, open_files};
use aom_terminator::tools::output::{Stdout, stdout_closed};
use aom_terminator::tools::{dead_letters, enqueue, prune, report};
use aom_terminator::{daemon, demo, sandbox, telemetry};
use clap::Parser;
use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;

/// One line on standard error, even when it is closed (`eprintln!` would
/// panic then).
fn complain(line: impl Display) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn main() -> ExitCode {
    // One crypto provider for every TLS user (the API and broker clients), chosen before
    // any connection; an error only means it is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    unset_empty_settings();
    keep_loopback_off_proxies();
    // A call in flight holds a connection: the daemon at CONCURRENCY=1024,
    // and the sandbox serving it, need more than a default soft limit.
    let open_files = open_files::raise_to_hard_limit();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version: to stdout; a closed pipe is ignored.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            complain(one_line(&e));
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::Demo(_)) && std::env::var_os("RUST_LOG").is_none() {
        // The demo shows progress and a report, not the daemon's lines.
        // SAFETY: still before any other thread exists (see above).
        unsafe { std::env::set_var("RUST_LOG", demo::LOG_FILTER) };
    }
    telemetry::init(
        cli.log_format,
        &[
            aom_terminator::broker::QUIET_LOGS,
            aom_terminator::audit::QUIET_LOGS,
            aom_terminator::aom::QUIET_LOGS,
        ],
    );

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            complain(format_args!("error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let mut out = Stdout::new();
    runtime.block_on(async move {
        let result = match cli.command {
            Command::Run(args) => match args.validate().and_then(|cfg| {
                open_files::check(open_files, cfg.concurrency)?;
                Ok(cfg)
            }) {
                // On a worker thread, not this one: the consume loop then
                // spawns each message's task onto its own thread's queue,
                // instead of waking a worker from outside the runtime.
                Ok(cfg) => match tokio::spawn(daemon::run(cfg, shutdown_signal())).await {
                    Ok(result) => result,
                    Err(e) => Err(anyhow::anyhow!("the daemon's task ended abnormally: {e}")),
                },
                Err(e) => {
                    complain(format_args!("error: {e}"));
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
                    complain(format_args!("error: {e}"));
                    return ExitCode::from(2);
                }
            },
            Command::Sandbox(args) => sandbox::run(*args, shutdown_signal()).await,
            Command::DeadLetters(args) => dead_letters::run(*args, &mut out).await,
            Command::Report(args) => report::run(*args, &mut out).await,
            Command::Audit(args) => match args.action {
                prune::AuditAction::Prune(args) => match prune::run(*args, &mut out).await {
                    Ok(prune::PruneEnd::Done) => Ok(()),
                    Ok(prune::PruneEnd::Refused(why)) => {
                        complain(format_args!("error: {why}"));
                        return ExitCode::from(2);
                    }
                    Err(e) => Err(e),
                },
            },
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
        // What is still buffered goes out, also after an error; the
        // command's own error comes first.
        let flushed = out.flush();
        let result = result.and_then(|()| Ok(flushed?));
        match result {
            Ok(()) => ExitCode::SUCCESS,
            // Whoever read the output stopped reading: not an error.
            Err(e) if stdout_closed(&e) => ExitCode::SUCCESS,
            // A bad setting or argument: one line, exit 2.
            Err(e) if e.is::<ConfigError>() => {
                complain(format_args!("error: {e}"));
                ExitCode::from(2)
            }
            Err(e) => {
                tracing::error!(error.cause_chain = ?e, "{e}");
                complain(format_args!("error: {e:#}"));
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

/// A proxy in the environment is for the world outside: this host's own
/// services (the sandbox, a local IAM or API) are never reached through it,
/// as Go's HTTP client does, so a proxy in the shell does not break the demo
/// or the sandbox walkthroughs. Loopback is added to `NO_PROXY`.
fn keep_loopback_off_proxies() {
    if !aom_terminator::aom::proxy_configured() {
        return;
    }
    let current = std::env::var("NO_PROXY")
        .or_else(|_| std::env::var("no_proxy"))
        .unwrap_or_default();
    let mut hosts: Vec<&str> = current
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    for loopback in ["localhost", "127.0.0.0/8", "::1"] {
        if !hosts.contains(&loopback) {
            hosts.push(loopback);
        }
    }
    // SAFETY: called first thing in `main`, before any other thread exists.
    unsafe { std::env::set_var("NO_PROXY", hosts.join(",")) };
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
