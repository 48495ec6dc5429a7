//! Campaigns: `enqueue` starts one, the daemon stores its id on every
//! outcome and attempt, `report --campaign/--campaigns/--watch` follows it,
//! `dead-letters replay --campaign` replays it, and the views answer for it.

use crate::helpers::*;
use crate::tools::{enqueue, write_file};
use aom_terminator::tools::enqueue::derived_campaign_id;
use serde_json::Value;

/// A CSV of one execution a line, in workflow `wf-camp`.
fn csv(executions: &[&str]) -> String {
    let mut text = String::from("project_id,workflow_id,execution_id\n");
    for e in executions {
        text.push_str(&format!("{PROJECT},wf-camp,{e}\n"));
    }
    text
}

/// `aom-terminator report ARGS` against this test's world: (exit code, stdout + stderr).
async fn report(env: &TestEnv, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = binary();
    cmd.arg("report")
        .args(args)
        .envs(env.binary_env_without_auth());
    output(cmd.spawn().expect("spawn report")).await
}

/// `report --campaign ID --format json`, parsed.
async fn campaign_json(env: &TestEnv, id: &str) -> Value {
    let (code, out) = report(env, &["--campaign", id, "--format", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn outcome_count(report: &Value, outcome: &str) -> Option<i64> {
    report["outcomes"]
        .as_array()?
        .iter()
        .find(|c| c["outcome"] == outcome)?["count"]
        .as_i64()
}

async fn request_count(env: &TestEnv, id: &str) -> i64 {
    sqlx::query_scalar("SELECT request_count FROM termination_campaigns WHERE id = $1")
        .bind(id)
        .fetch_one(&env.db)
        .await
        .unwrap_or_else(|e| panic!("campaign {id}: {e}"))
}

#[tokio::test]
async fn a_campaign_is_followed_from_enqueue_to_report() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let first = write_file(
        "spring.csv",
        &csv(&["ex-1", "ex-2", "ex-3", "ex-4", "e404-a", "e500-a"]),
    );
    let path = first.display().to_string();
    let named = [path.as_str(), "--campaign", "spring-clean"];
    let mut with_note = named.to_vec();
    with_note.extend(["--note", "after the failover", "--requested-by", "amy"]);
    let (code, out) = enqueue(&env, &with_note, None).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("campaign spring-clean: 6 request(s) in all"),
        "{out}"
    );
    let row: (Option<String>, Option<String>, i64, Option<String>) = sqlx::query_as(
        "SELECT requested_by, source, request_count, note FROM termination_campaigns \
         WHERE id = 'spring-clean'",
    )
    .fetch_one(&env.db)
    .await
    .expect("the campaign is recorded");
    assert_eq!(
        row,
        (
            Some("amy".to_owned()),
            Some(path.clone()),
            6,
            Some("after the failover".to_owned())
        )
    );

    // The same file again: the same campaign, not counted twice, its note kept.
    let (code, out) = enqueue(&env, &named, None).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("not counted again"), "{out}");
    assert_eq!(request_count(&env, "spring-clean").await, 6);

    let daemon = env.start_daemon(&[]);
    env.wait_outcomes(6).await;
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes WHERE campaign_id = 'spring-clean'")
            .await,
        6,
        "every request carried the campaign"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM termination_attempts WHERE campaign_id IS DISTINCT FROM 'spring-clean'")
            .await,
        0,
        "every attempt too"
    );

    let json = campaign_json(&env, "spring-clean").await;
    assert_eq!(json["campaign_id"], "spring-clean");
    assert_eq!(json["note"], "after the failover");
    assert_eq!(
        (&json["total"], &json["done"], &json["pending"]),
        (&6.into(), &6.into(), &0.into()),
        "{json}"
    );
    assert_eq!(outcome_count(&json, "succeeded"), Some(4), "{json}");
    assert_eq!(outcome_count(&json, "failed_permanent"), Some(1), "{json}");
    assert_eq!(
        outcome_count(&json, "failed_retries_exhausted"),
        Some(1),
        "{json}"
    );
    assert_eq!(outcome_count(&json, "rejected"), Some(0), "{json}");
    let errors = json["errors"].as_array().expect("errors");
    for code in ["AOM.31001306", "AOM.31001405"] {
        assert!(
            errors
                .iter()
                .any(|e| e["error_code"] == code && e["count"] == 1),
            "{code}: {errors:?}"
        );
    }
    assert_eq!(json["eta_seconds"], 0, "done: nothing left to wait for");
    assert!(json["first_outcome_at"].is_string() && json["last_outcome_at"].is_string());
    // Its failures, ready to enqueue again.
    let (code, failed) = report(&env, &["--campaign", "spring-clean", "--failed"]).await;
    assert_eq!(code, Some(0), "{failed}");
    let executions: Vec<&str> = failed
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(2))
        .collect();
    assert_eq!(executions, ["e404-a", "e500-a"], "{failed}");

    // A different file under the same name adds to it.
    let more = write_file("more.csv", &csv(&["ex-5", "ex-6"]));
    let more = more.display().to_string();
    let (code, out) = enqueue(&env, &[&more, "--campaign", "spring-clean"], None).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("campaign spring-clean: 8 request(s) in all"),
        "{out}"
    );
    env.wait_outcomes(8).await;
    let json = campaign_json(&env, "spring-clean").await;
    assert_eq!((&json["total"], &json["done"]), (&8.into(), &8.into()));
    let (code, table) = report(&env, &["--campaign", "spring-clean", "--format", "table"]).await;
    assert_eq!(code, Some(0), "{table}");
    assert!(table.contains("done 8 of 8 (100.0%), 0 pending"), "{table}");
    assert!(table.contains("AOM.31001405"), "{table}");
    let (code, csv_out) = report(&env, &["--campaign", "spring-clean", "--format", "csv"]).await;
    assert_eq!(code, Some(0), "{csv_out}");
    assert!(
        csv_out.starts_with("section,key,detail,count\ncampaign,total,spring-clean,8\n"),
        "{csv_out}"
    );

    // Without --campaign, the id comes from the file: the same file twice is
    // one campaign, counted once.
    let text = csv(&["ex-7"]);
    let derived = write_file("derived.csv", &text);
    let derived = derived.display().to_string();
    let id = derived_campaign_id(&text);
    let (code, out) = enqueue(&env, &[&derived], None).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("campaign {id}: 1 request(s) in all")),
        "{out}"
    );
    let (code, out) = enqueue(&env, &[&derived], None).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("not counted again"), "{out}");
    assert_eq!(request_count(&env, &id).await, 1);
    env.wait_outcomes(9).await;

    // The list: most recent first, each with its progress.
    let (code, out) = report(&env, &["--campaigns", "--format", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let list: Value = serde_json::from_str(&out).expect("JSON");
    let ids: Vec<&str> = list
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["campaign_id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str(), "spring-clean"]);
    assert_eq!(
        (&list[1]["done"], &list[1]["total"]),
        (&8.into(), &8.into())
    );
    assert_eq!(
        (&list[0]["done"], &list[0]["total"]),
        (&1.into(), &1.into())
    );
    let (_, out) = report(&env, &["--campaigns", "--format", "csv"]).await;
    assert!(
        out.starts_with("campaign_id,created_at,requested_by"),
        "{out}"
    );

    // On a terminal, --watch draws the report and ends once the campaign is done.
    watch_ends_when_done(&env, "spring-clean").await;

    let (code, out) = report(&env, &["--campaign", "no-such-campaign"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no campaign \"no-such-campaign\""), "{out}");
    daemon.stop().await;
}

/// `report --campaign ID --watch` under `script`, which gives it a
/// terminal: it exits 0 on its own, the campaign being done.
async fn watch_ends_when_done(env: &TestEnv, id: &str) {
    let command = format!(
        "{} report --campaign {id} --watch",
        env!("CARGO_BIN_EXE_aom-terminator")
    );
    let mut cmd = tokio::process::Command::new("script");
    for var in aom_terminator::cli::env_names() {
        cmd.env_remove(var);
    }
    cmd.args(["-qec", &command, "/dev/null"])
        .envs(env.binary_env_without_auth())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let (code, out) = output(cmd.spawn().expect("spawn script")).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\x1b[2J"), "the screen is redrawn: {out}");
    assert!(out.contains("the campaign is done"), "{out}");
}

#[tokio::test]
async fn watch_needs_a_terminal() {
    let env = TestEnv::new().await;
    let (code, out) = report(&env, &["--campaign", "any", "--watch"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(
        out.contains("--watch needs a terminal") && out.contains("standard output is not one"),
        "{out}"
    );
}

#[tokio::test]
async fn enqueue_refuses_an_unmigrated_database_and_publishes_past_a_dead_one() {
    let env = TestEnv::new().await;
    let file = write_file("one.csv", &csv(&["ex-1"]));
    let path = file.display().to_string();
    // Reachable, but not the daemon's: nothing goes out.
    let (code, out) = enqueue(&env, &[&path], None).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("no termination_campaigns table") && out.contains("migrate"),
        "{out}"
    );
    assert_eq!(env.ready_requests().await, 0, "nothing published");

    // Down: one warning, and the requests go out all the same.
    let mut cmd = binary();
    cmd.args(["enqueue", &path])
        .envs(env.binary_env_without_auth())
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@{}/postgres", free_addr()),
        );
    let (code, out) = output(cmd.spawn().expect("spawn")).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning: campaign") && out.contains("not recorded"),
        "{out}"
    );
    assert!(out.contains("published 1 request(s)"), "{out}");
    assert_eq!(env.ready_requests().await, 1);
}

#[tokio::test]
async fn replay_of_a_campaign_replays_only_its_dead_letters() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let a = write_file("a.csv", &csv(&["e500-a1", "ex-a2"]));
    let b = write_file("b.csv", &csv(&["e500-b1"]));
    for (file, id) in [(&a, "camp-a"), (&b, "camp-b")] {
        let (code, out) =
            enqueue(&env, &[&file.display().to_string(), "--campaign", id], None).await;
        assert_eq!(code, Some(0), "{out}");
    }
    let daemon = env.start_daemon(&[]);
    env.wait_outcomes(3).await;
    let original: String = sqlx::query_scalar(
        "SELECT request_id FROM termination_outcomes WHERE execution_id = 'e500-a1'",
    )
    .fetch_one(&env.db)
    .await
    .expect("the exhausted request of camp-a");

    let mut cmd = binary();
    cmd.args(["dead-letters", "replay", "--campaign", "camp-a"])
        .envs(env.binary_env_without_auth());
    let (code, out) = output(cmd.spawn().expect("spawn replay")).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out.matches("replayed ").count(),
        2,
        "one line and the summary: {out}"
    );
    assert!(out.contains(&format!("replayed {original}")), "{out}");
    assert!(
        out.contains("1 other campaign"),
        "camp-b's letter stays: {out}"
    );

    env.wait_outcomes(4).await;
    let replay: (String, Option<String>, String) = sqlx::query_as(
        "SELECT campaign_id, replay_of, outcome FROM termination_outcomes WHERE replay_of IS NOT NULL",
    )
    .fetch_one(&env.db)
    .await
    .expect("the replay's outcome");
    assert_eq!(
        replay,
        (
            "camp-a".to_owned(),
            Some(original.clone()),
            "failed_retries_exhausted".to_owned()
        ),
        "the replay keeps its campaign"
    );
    let json = campaign_json(&env, "camp-a").await;
    assert_eq!(
        (&json["total"], &json["done"], &json["replays"]),
        (&2.into(), &2.into(), &1.into()),
        "a replay is not a request of its own: {json}"
    );
    assert_eq!(outcome_count(&json, "failed_retries_exhausted"), Some(2));
    let json = campaign_json(&env, "camp-b").await;
    assert_eq!(json["replays"], 0);

    // Left in the queue: camp-b's letter, and the replay's own.
    let mut left: Vec<Option<String>> = env
        .drain_dead_letters()
        .await
        .iter()
        .map(|(h, _)| header(h, "x-aom-request-id"))
        .collect();
    left.sort();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter()
            .flatten()
            .any(|id| id.starts_with(&format!("{original}:replay:"))),
        "{left:?}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn the_views_answer_for_rows_any_writer_adds() {
    let env = TestEnv::new().await;
    env.migrate().await;
    // By hand, as a repair or a backfill would write them.
    sqlx::query(
        "INSERT INTO termination_campaigns (id, requested_by, source, request_count, created_at) \
         VALUES ('c1', 'amy', 'c1.csv', 5, now() - interval '1 hour')",
    )
    .execute(&env.db)
    .await
    .expect("campaign");
    sqlx::query(
        "INSERT INTO termination_outcomes (request_id, project_id, workflow_id, execution_id, \
           outcome, http_status, error_code, attempts, received_at, finished_at, campaign_id, \
           replay_of) \
         SELECT r, $1, 'wf', 'ex-' || r, o, s, c, 1, now() - age, now() - age, camp, rep \
         FROM (VALUES \
           ('r1', 'succeeded', 200, NULL, interval '10 minutes', 'c1', NULL), \
           ('r2', 'succeeded', 200, NULL, interval '10 seconds', 'c1', NULL), \
           ('r3', 'failed_retries_exhausted', 500, 'AOM.31001405', interval '5 seconds', 'c1', NULL), \
           ('r3:replay:x', 'succeeded', 200, NULL, interval '2 seconds', 'c1', 'r3'), \
           ('o1', 'succeeded', 200, NULL, interval '1 hour', 'other-publisher', NULL), \
           ('o2', 'rejected', NULL, 'invalid_request', interval '1 hour', 'other-publisher', NULL), \
           ('n1', 'succeeded', 200, NULL, interval '1 hour', NULL, NULL) \
         ) AS v (r, o, s, c, age, camp, rep)",
    )
    .bind(PROJECT)
    .execute(&env.db)
    .await
    .expect("outcomes");

    type Row = (Option<i64>, i64, Option<i64>, i64, i64, i64, i64, i64);
    let progress = |id: &'static str| {
        let db = env.db.clone();
        async move {
            sqlx::query_as::<_, Row>(
                "SELECT request_count, done, pending, succeeded, failed_retries_exhausted, \
                   rejected, replays, done_last_minute \
                 FROM termination_campaign_progress WHERE campaign_id = $1",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"))
        }
    };
    // r1..r3 are its requests (r3's replay is counted apart); r1 is older than a minute.
    assert_eq!(progress("c1").await, (Some(5), 3, Some(2), 3, 1, 0, 1, 2));
    assert_eq!(
        progress("other-publisher").await,
        (None, 2, None, 1, 0, 1, 0, 0)
    );
    assert_eq!(
        env.count("SELECT count(*) FROM termination_campaign_progress")
            .await,
        2,
        "no row for requests without a campaign"
    );
    let span: bool = sqlx::query_scalar(
        "SELECT first_outcome_at = (SELECT finished_at FROM termination_outcomes WHERE request_id = 'r1') \
            AND last_outcome_at = (SELECT finished_at FROM termination_outcomes WHERE request_id = 'r3:replay:x') \
         FROM termination_campaign_progress WHERE campaign_id = 'c1'",
    )
    .fetch_one(&env.db)
    .await
    .expect("span");
    assert!(span, "first and last outcome times");

    sqlx::query(
        "INSERT INTO termination_attempts (request_id, attempt, http_status, error_kind, \
           error_code, error_msg, started_at, latency_ms, campaign_id) VALUES \
         ('r1', 1, 500, 'server_error', 'AOM.31001405', 'boom', now(), 20, 'c1'), \
         ('r1', 2, 200, NULL, NULL, NULL, now(), 21, 'c1'), \
         ('r3', 1, NULL, 'timeout', NULL, 'timed out', now(), 10000, 'c1')",
    )
    .execute(&env.db)
    .await
    .expect("attempts");
    /// request_id, attempt, http_status, error_kind, error_msg
    type Latest = (String, i32, Option<i32>, Option<String>, Option<String>);
    let latest: Vec<Latest> = sqlx::query_as(
        "SELECT request_id, attempt, http_status, error_kind, error_msg \
         FROM termination_latest_attempt ORDER BY request_id",
    )
    .fetch_all(&env.db)
    .await
    .expect("latest attempts");
    assert_eq!(
        latest,
        [
            ("r1".to_owned(), 2, Some(200), None, None),
            (
                "r3".to_owned(),
                1,
                None,
                Some("timeout".to_owned()),
                Some("timed out".to_owned())
            ),
        ]
    );

    // The tool reads the same view: a campaign no enqueue recorded has no total.
    let json = campaign_json(&env, "other-publisher").await;
    assert_eq!(
        (&json["total"], &json["done"], &json["pending"]),
        (&Value::Null, &2.into(), &Value::Null),
        "{json}"
    );
    let (code, out) = report(&env, &["--campaigns", "--format", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let list: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "recorded ones: {list}"
    );
    assert_eq!(list[0]["campaign_id"], "c1");
    assert_eq!(list[0]["pending"], 2);
}
