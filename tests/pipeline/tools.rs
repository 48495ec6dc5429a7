//! The operator tools: enqueue and report, through the real binary.

use crate::helpers::*;
use aom_terminator::sandbox::SandboxArgs;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// A file in a directory of its own, removed with it when dropped.
pub struct TempFile {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl std::ops::Deref for TempFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn write_file(name: &str, text: &str) -> TempFile {
    let dir = std::env::temp_dir().join(format!("aomt-tools-{:x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    TempFile { dir, path }
}

pub async fn enqueue(env: &TestEnv, args: &[&str], stdin: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = binary();
    cmd.arg("enqueue")
        .args(args)
        .envs(env.binary_env_without_auth());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn enqueue");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        // enqueue may refuse and exit before reading all of it (a broken
        // pipe here); its exit code and output say what it did.
        let _ = pipe.write_all(text.as_bytes()).await;
        drop(pipe); // end of input
    }
    output(child).await
}

#[tokio::test]
async fn enqueue_checks_every_line_before_publishing() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let csv = format!(
        "project_id,workflow_id,execution_id,reason\n\
         {PROJECT},wf-a,ex-1,cleanup\n\
         short,wf-a,ex-2,\n\
         {PROJECT},wf-a,ex-3,\n\
         {PROJECT},,ex-4,\n"
    );
    let file = write_file("batch.csv", &csv);
    let path = file.display().to_string();
    let (code, out) = enqueue(&env, &[&path], None).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("line 3:") && out.contains("project_id must be exactly 32"),
        "{out}"
    );
    assert!(
        out.contains("line 5:") && out.contains("workflow_id"),
        "{out}"
    );
    assert!(out.contains("nothing published"), "{out}");
    assert_eq!(
        env.ready_requests().await,
        0,
        "nothing is published while a line is bad"
    );

    let (code, out) = enqueue(&env, &[&path, "--dry-run", "--skip-invalid"], None).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(env.ready_requests().await, 0, "a dry run publishes nothing");

    let (code, out) = enqueue(
        &env,
        &[&path, "--skip-invalid", "--requested-by", "amy"],
        None,
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("published 2 request(s) in 1 message(s)"),
        "{out}"
    );
    let daemon = env.start_daemon(&[]);
    env.wait_outcomes(2).await;
    let by: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT execution_id, requested_by FROM termination_outcomes ORDER BY execution_id",
    )
    .fetch_all(&env.db)
    .await
    .expect("rows");
    assert_eq!(
        by,
        vec![
            ("ex-1".to_owned(), Some("amy".to_owned())),
            ("ex-3".to_owned(), Some("amy".to_owned()))
        ]
    );

    // JSON Lines from a file, and from standard input.
    let jsonl = format!("{}\n{}\n", request("j-1", "ex-j1"), request("j-2", "ex-j2"));
    let file = write_file("batch.jsonl", &jsonl);
    let (code, out) = enqueue(&env, &[&file.display().to_string()], None).await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = enqueue(
        &env,
        &["-", "--format", "jsonl"],
        Some(&request("s-1", "ex-s1")),
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    env.wait_outcomes(5).await;
    let (code, out) = enqueue(&env, &["-"], Some("x")).await;
    assert_eq!(code, Some(2), "standard input needs --format: {out}");
    daemon.stop().await;
}

#[tokio::test]
async fn enqueue_publishes_a_hundred_thousand_lines() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let mut csv = String::from("project_id,workflow_id,execution_id\n");
    for i in 0..100_000 {
        csv.push_str(&format!("{PROJECT},wf-big,ex-{i}\n"));
    }
    let file = write_file("big.csv", &csv);
    let (code, out) = enqueue(&env, &[&file.display().to_string()], None).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("published 100000 request(s) in 100 message(s)"),
        "{out}"
    );
    assert_eq!(
        env.ready_requests().await,
        100,
        "batches of 1,000, all confirmed"
    );
}

#[tokio::test]
async fn report_accounts_for_a_known_audit() {
    let env = TestEnv::new().await;
    let mut elements: Vec<String> = (0..6)
        .map(|i| request(&format!("ok{i}"), &format!("ex-ok{i}")))
        .collect();
    elements.push(request("gone-1", "e404-1"));
    elements.push(request("gone-2", "e404-2"));
    elements.push(request("down-1", "e500-1"));
    env.publish(&batch(&elements), None).await;
    let daemon = env.start_daemon(&[]);
    env.wait_outcomes(9).await;

    let report = |args: &[&str]| {
        let mut cmd = binary();
        cmd.arg("report")
            .args(args)
            .envs(env.binary_env_without_auth());
        cmd
    };
    let (code, out) = output(
        report(&["--format", "json", "--since", "1h"])
            .spawn()
            .expect("spawn"),
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("report JSON");
    assert_eq!(json["total"], 9);
    let count = |o: &str| {
        json["outcomes"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["outcome"] == o))
            .map(|c| c["count"].clone())
    };
    assert_eq!(count("succeeded"), Some(6.into()));
    assert_eq!(count("failed_permanent"), Some(2.into()));
    assert_eq!(count("failed_retries_exhausted"), Some(1.into()));
    let errors = json["errors"].as_array().expect("errors");
    assert!(
        errors
            .iter()
            .any(|e| e["error_code"] == "AOM.31001306" && e["count"] == 2),
        "{errors:?}"
    );
    assert_eq!(json["workflows"][0]["workflow_id"], "wf-test");
    assert_eq!(json["workflows"][0]["failed"], 3);
    assert!(json["latency_ms"]["p99"].as_f64().is_some());
    assert_eq!(json["pending"]["ready"], 0);

    let (_, table) = output(report(&["--format", "table"]).spawn().expect("spawn")).await;
    assert!(
        table.contains("succeeded") && table.contains("AOM.31001306"),
        "{table}"
    );

    let (code, csv) = output(report(&["--failed"]).spawn().expect("spawn")).await;
    assert_eq!(code, Some(0), "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "project_id,workflow_id,execution_id,reason,requested_by"
    );
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(!csv.contains("gone-1"), "no request_id in the failed list");

    // Fed back to enqueue, the failures become new requests, not skipped duplicates.
    let file = write_file("failed.csv", &csv);
    let (code, out) = enqueue(&env, &[&file.display().to_string()], None).await;
    assert_eq!(code, Some(0), "{out}");
    env.wait_outcomes(12).await;
    daemon.stop().await;
}

#[tokio::test]
async fn report_counts_delivered_but_unacked_messages_as_pending() {
    // A daemon paused on bad credentials holds its messages unacked.
    let env = TestEnv::with_sandbox(SandboxArgs {
        expected_token: Some("not-the-daemons".to_owned()),
        ..SandboxArgs::default()
    })
    .await;
    publish_singles(&env, "u", 4).await;
    let daemon = env.start_daemon(&[]);
    eventually("401s", || async {
        env.sandbox.sandbox().stats().by_status.contains_key(&401)
    })
    .await;
    let pending = || async {
        let (_, out) = output(
            binary()
                .args(["report", "--format", "json"])
                .envs(env.binary_env_without_auth())
                .spawn()
                .expect("spawn"),
        )
        .await;
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_default()["pending"].clone()
    };
    // The management plugin is off on a fresh RabbitMQ: the report then
    // says what AMQP can tell (nothing waiting) and that the unacked count
    // is unknown. With it on, its counts lag a few seconds behind.
    if pending().await["unacked"].is_null() {
        eprintln!("management API unreachable: checking that the report says `unknown`");
        eventually("the report sees nothing waiting", || async {
            pending().await["ready"] == 0
        })
        .await;
        let pending = pending().await;
        assert!(pending["unacked"].is_null(), "{pending}");
        assert!(pending["total"].is_null(), "{pending}");
    } else {
        eprintln!("management API reachable: checking the unacked count");
        eventually("the management API sees them unacked", || async {
            pending().await["unacked"] == 4
        })
        .await;
        let pending = pending().await;
        assert_eq!(pending["ready"], 0);
        assert_eq!(pending["total"], 4);
    }
    daemon.stop().await;
}
