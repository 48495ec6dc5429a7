//! Unix manners of the real binary: data on stdout, everything else on
//! stderr; a reader that stops early (`| head -1`) ends the command quietly
//! with exit 0; every subcommand's `--help` shows examples.
//!
//! The early-closing reader reads one line and drops its end of the pipe.
//! Each command here writes far more than a pipe holds (64 KiB on Linux) so
//! that its later writes do meet the closed pipe: with a small output the
//! whole of it would fit in the pipe before the reader went away, and the
//! test would prove nothing.

use crate::helpers::*;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Run `cmd`, read the first line of its stdout and close the pipe: its
/// exit code, that line, and everything it wrote to stderr.
async fn first_line_then_close(mut cmd: tokio::process::Command) -> (Option<i32>, String, String) {
    let mut child = cmd.spawn().expect("spawn");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut stderr = child.stderr.take().expect("stderr piped");
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line)).await;
    drop(stdout); // the reader is gone: `| head -1`
    let mut err = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), stderr.read_to_string(&mut err)).await;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("exits within a minute after its reader left")
        .expect("wait");
    assert!(
        matches!(read, Ok(Ok(n)) if n > 0),
        "no first line: {read:?}; stderr: {err}"
    );
    (status.code(), line, err)
}

/// Run `cmd` to its end: exit code, stdout, stderr, apart.
async fn run_apart(mut cmd: tokio::process::Command) -> (Option<i32>, String, String) {
    let child = cmd.spawn().expect("spawn");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("exits within a minute")
        .expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// This test's audit, migrated by `aom-terminator migrate`, with `n` failed
/// requests spread over 25 workflows and 25 error codes; each error code is
/// 8,000 characters long, so that even the CSV summary (20 error rows at
/// most) outgrows a pipe.
async fn audit_with_failures(env: &TestEnv, n: i32) {
    let mut migrate = binary();
    migrate
        .arg("migrate")
        .env("DATABASE_URL", &env.database_url);
    let (code, out, err) = run_apart(migrate).await;
    assert_eq!(code, Some(0), "migrate: {err}");
    assert_eq!(out, "", "migrate prints no data; its log goes to stderr");
    sqlx::query(
        "INSERT INTO termination_outcomes (request_id, project_id, workflow_id, execution_id, \
           outcome, http_status, error_code, error_msg, attempts, reason, requested_by, \
           received_at, finished_at) \
         SELECT 'r-' || i, $1, 'wf-' || (i % 25), 'ex-' || i, 'failed_permanent', 404, \
           'AOM.' || (i % 25) || '.' || repeat('x', 8000), 'not found', 1, 'manners', 'tests', \
           now(), now() \
         FROM generate_series(1, $2) AS i",
    )
    .bind(PROJECT)
    .bind(n)
    .execute(&env.db)
    .await
    .expect("insert failed requests");
}

fn report(env: &TestEnv, args: &[&str]) -> tokio::process::Command {
    let mut cmd = binary();
    cmd.arg("report")
        .args(args)
        .envs(env.binary_env_without_auth());
    cmd
}

#[tokio::test]
async fn report_stops_quietly_when_its_reader_does() {
    let env = TestEnv::new().await;
    audit_with_failures(&env, 5000).await;

    // The whole list is far more than a pipe holds.
    let (code, all, err) = run_apart(report(&env, &["--failed"])).await;
    assert_eq!((code, err.as_str()), (Some(0), ""), "report --failed");
    assert_eq!(
        all.lines().count(),
        5001,
        "a header and every failed request"
    );
    assert!(all.len() > 256 * 1024, "{} bytes", all.len());

    // `report --failed | head -1`
    let (code, line, err) = first_line_then_close(report(&env, &["--failed"])).await;
    assert_eq!(
        line,
        "project_id,workflow_id,execution_id,reason,requested_by\n"
    );
    assert_eq!(err, "", "nothing on stderr");
    assert_eq!(code, Some(0), "a closed stdout is not an error");

    // `report --format csv | head -1`
    let (code, all, err) = run_apart(report(&env, &["--format", "csv"])).await;
    assert_eq!((code, err.as_str()), (Some(0), ""), "report --format csv");
    assert!(all.len() > 128 * 1024, "{} bytes", all.len());
    let (code, line, err) = first_line_then_close(report(&env, &["--format", "csv"])).await;
    assert_eq!(line, "section,key,detail,count\n");
    assert_eq!(err, "", "nothing on stderr");
    assert_eq!(code, Some(0), "a closed stdout is not an error");
}

/// Put `n` exhausted requests in the test's dead-letter queue, each with an
/// error message of 1,000 characters (a line of `list` is over 1 KiB).
async fn dead_letters(env: &TestEnv, n: usize) {
    let channel = env.channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let text = |s: String| AMQPValue::LongString(LongString::from(s));
    for i in 0..n {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-aom-outcome"),
            text("failed_retries_exhausted".to_owned()),
        );
        headers.insert(
            ShortString::from("x-aom-request-id"),
            text(format!("dl-{i}")),
        );
        headers.insert(
            ShortString::from("x-aom-error-msg"),
            text(format!("upstream {i} {}", "z".repeat(1000))),
        );
        let body = request(&format!("dl-{i}"), &format!("ex-dl-{i}"));
        let confirm = channel
            .basic_publish(
                "".into(),
                env.dead_letter_queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack() && confirm.take_message().is_none());
    }
}

fn list(env: &TestEnv, args: &[&str]) -> tokio::process::Command {
    let mut cmd = binary();
    cmd.args(["dead-letters", "list"])
        .args(args)
        .envs(env.binary_env_without_auth());
    cmd
}

#[tokio::test]
async fn dead_letters_list_stops_quietly_when_its_reader_does() {
    let env = TestEnv::new().await;
    dead_letters(&env, 300).await;

    // To a pipe read to its end: the table, and no footer on stderr (that
    // one is for a terminal).
    let (code, all, err) = run_apart(list(&env, &[])).await;
    assert_eq!((code, err.as_str()), (Some(0), ""), "dead-letters list");
    assert_eq!(all.lines().count(), 301, "a header and every letter");
    assert!(all.len() > 256 * 1024, "{} bytes", all.len());

    // `dead-letters list | head -1`
    let (code, line, err) = first_line_then_close(list(&env, &[])).await;
    assert!(line.starts_with("reason\trequest_id\t"), "{line}");
    assert_eq!(err, "", "nothing on stderr");
    assert_eq!(code, Some(0), "a closed stdout is not an error");

    // `dead-letters list --format json | head -1`
    let (code, line, err) = first_line_then_close(list(&env, &["--format", "json"])).await;
    let first: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(first["reason"], "failed_retries_exhausted");
    assert_eq!((code, err.as_str()), (Some(0), ""));

    // Listing takes nothing away, even when cut short.
    let letters = env.drain_dead_letters().await;
    assert_eq!(letters.len(), 300, "every letter is back in the queue");
}

/// Every subcommand the operator runs, by its path.
const SUBCOMMANDS: &[&[&str]] = &[
    &["run"],
    &["migrate"],
    &["sandbox"],
    &["enqueue"],
    &["report"],
    &["dead-letters"],
    &["dead-letters", "list"],
    &["dead-letters", "replay"],
];

#[tokio::test]
async fn every_subcommand_help_shows_examples_on_stdout() {
    for path in SUBCOMMANDS {
        for flag in ["--help", "-h"] {
            let mut cmd = binary();
            cmd.args(*path).arg(flag);
            let (code, out, err) = run_apart(cmd).await;
            assert_eq!(code, Some(0), "{path:?} {flag}: {err}");
            assert_eq!(err, "", "{path:?} {flag}: help goes to stdout");
            let examples = out
                .split_once("\nExamples:\n")
                .map(|(_, e)| e)
                .unwrap_or_else(|| panic!("{path:?} {flag} shows no examples:\n{out}"));
            let command = format!("aom-terminator {}", path.join(" "));
            assert!(
                examples.contains(&command),
                "{path:?} {flag}: no example runs `{command}`:\n{examples}"
            );
        }
        // `--help | head -1` is quiet too.
        let mut cmd = binary();
        cmd.args(*path).arg("--help");
        let (code, _, err) = first_line_then_close(cmd).await;
        assert_eq!(
            (code, err.as_str()),
            (Some(0), ""),
            "{path:?} --help | head -1"
        );
    }
}

#[tokio::test]
async fn errors_go_to_stderr_and_leave_stdout_empty() {
    let env = TestEnv::new().await;
    let nobody = free_addr();
    let dead_db = format!("postgres://postgres@{nobody}/postgres");
    let missing = std::env::temp_dir().join(format!("aomt-missing-{:x}.csv", fastrand::u64(..)));
    let missing = missing.display().to_string();
    /// What, the arguments, the environment, the exit code wanted.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, String)>, i32);
    let cases: Vec<Case> = vec![
        ("run without settings", vec!["run"], vec![], 2),
        (
            "migrate, database down",
            vec!["migrate"],
            vec![("DATABASE_URL", dead_db.clone())],
            1,
        ),
        (
            "sandbox, bad address",
            vec!["sandbox", "--listen", "nowhere"],
            vec![],
            2,
        ),
        (
            "enqueue, no such file",
            vec!["enqueue", &missing],
            env.binary_env_without_auth(),
            2,
        ),
        (
            "report, database down",
            vec!["report", "--failed"],
            vec![("DATABASE_URL", dead_db.clone())],
            1,
        ),
        (
            "replay without a choice",
            vec!["dead-letters", "replay"],
            env.binary_env_without_auth(),
            2,
        ),
        (
            "list, bad option",
            vec!["dead-letters", "list", "--format", "xml"],
            vec![],
            2,
        ),
    ];
    for (what, args, vars, want) in cases {
        let mut cmd = binary();
        cmd.args(&args).envs(vars).stdin(Stdio::null());
        let (code, out, err) = run_apart(cmd).await;
        assert_eq!(code, Some(want), "{what}: {err}");
        assert_eq!(out, "", "{what}: nothing on stdout");
        assert!(
            err.lines().any(|l| l.starts_with("error:")),
            "{what}: the error on stderr: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
}
