//! The audit at scale: reports from the rollups equal raw counts for every
//! writer, and `audit prune` removes rows without changing a total.

use crate::helpers::*;
use aom_terminator::audit::rollups::{LATENCY_BOUNDS_MS, quantile};
use aom_terminator::sandbox::SandboxArgs;
use serde_json::Value;
use std::time::Duration;

/// `audit prune` with `args`, through the binary: exit code and output.
async fn prune(env: &TestEnv, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = binary();
    cmd.args(["audit", "prune"])
        .args(args)
        .envs(env.binary_env_without_auth());
    output(cmd.spawn().expect("spawn prune")).await
}

/// The count of outcome `o` in a report.
fn count(report: &Value, o: &str) -> i64 {
    report["outcomes"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["outcome"] == o))
        .map_or(0, |c| c["count"].as_i64().unwrap_or(-1))
}

/// What a report says, without the queue (which moves on its own).
fn totals(report: &Value) -> Value {
    let mut r = report.clone();
    if let Some(o) = r.as_object_mut() {
        for key in [
            "pending",
            "since",
            "window_start",
            "workflow",
            "requested_by",
        ] {
            o.remove(key);
        }
    }
    r
}

/// `n` old outcomes with two attempts each, written by hand: requested_by
/// 'backfill', finished `days_ago` days ago (spread over the hour after).
async fn backfill(env: &TestEnv, prefix: &str, n: i64, days_ago: i64) {
    env.migrate().await;
    sqlx::query(
        "INSERT INTO termination_outcomes (request_id, project_id, workflow_id, outcome, \
           http_status, error_code, attempts, requested_by, received_at, finished_at) \
         SELECT $1 || i, 'p-old', 'wf-old', \
           CASE WHEN i % 5 = 0 THEN 'failed_permanent' ELSE 'succeeded' END, \
           CASE WHEN i % 5 = 0 THEN 404 ELSE 200 END, \
           CASE WHEN i % 5 = 0 THEN 'AOM.0404' END, 2, 'backfill', \
           t, t FROM (SELECT i, now() - make_interval(days => $3::int) \
             + make_interval(secs => i * 3600.0 / $2) AS t \
             FROM generate_series(1, $2::bigint) i) s",
    )
    .bind(prefix)
    .bind(n)
    .bind(days_ago)
    .execute(&env.db)
    .await
    .expect("backfill outcomes");
    sqlx::query(
        "INSERT INTO termination_attempts (request_id, attempt, http_status, started_at, \
           latency_ms, project_id, workflow_id, requested_by) \
         SELECT o.request_id, a, CASE WHEN a = 1 THEN 503 ELSE o.http_status END, \
           o.finished_at, 5 * a + length(o.request_id), o.project_id, o.workflow_id, \
           o.requested_by \
         FROM termination_outcomes o CROSS JOIN generate_series(1, 2) a \
         WHERE o.request_id LIKE $1 || '%'",
    )
    .bind(prefix)
    .execute(&env.db)
    .await
    .expect("backfill attempts");
}

/// Fold the rollups' deltas, as the daemon and `audit prune` do.
async fn fold(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT termination_rollup_fold()")
        .fetch_one(&env.db)
        .await
        .expect("fold")
}

/// Requests for the daemon: `n` singles, every fifth one a 404.
async fn publish_mixed(env: &TestEnv, prefix: &str, n: usize) {
    for i in 0..n {
        let execution = if i % 5 == 0 {
            format!("e404-{prefix}{i}")
        } else {
            format!("ex-{prefix}{i}")
        };
        env.publish(&request(&format!("{prefix}{i}"), &execution), None)
            .await;
    }
}

#[tokio::test]
async fn report_totals_equal_raw_counts_for_the_daemon_and_a_hand_written_insert() {
    let env = TestEnv::new().await;
    publish_mixed(&env, "d", 30).await;
    let daemon = env.start_daemon(&[]);
    env.wait_outcomes(30).await;
    daemon.stop().await;
    // A repair by hand: old rows, rows 49.5 hours ago (within the first,
    // partial hour of a 50h window), and a rejection superseded by an update.
    backfill(&env, "old-", 40, 3).await;
    sqlx::query(
        "INSERT INTO termination_outcomes (request_id, workflow_id, outcome, requested_by, \
           received_at, finished_at) \
         SELECT 'edge-' || i, 'wf-edge', 'rejected', 'tests', t, t \
         FROM (SELECT i, now() - interval '49 hours 30 minutes' + i * interval '1 second' AS t \
               FROM generate_series(1, 7) i) s",
    )
    .execute(&env.db)
    .await
    .expect("edge rows");
    sqlx::query(
        "UPDATE termination_outcomes SET outcome = 'succeeded', http_status = 200, \
           workflow_id = 'wf-test' WHERE request_id IN ('edge-1', 'edge-2')",
    )
    .execute(&env.db)
    .await
    .expect("supersede");

    for (args, filter) in [
        (vec![], "true"),
        (
            vec!["--since", "50h"],
            "finished_at >= now() - interval '50 hours'",
        ),
        (
            vec!["--since", "1h"],
            "finished_at >= now() - interval '1 hour'",
        ),
        (vec!["--workflow", "wf-test"], "workflow_id = 'wf-test'"),
        (
            vec!["--requested-by", "backfill"],
            "requested_by = 'backfill'",
        ),
    ] {
        let r = report_json(&env, &args).await;
        let raw = |outcome: &str| {
            format!(
                "SELECT count(*) FROM termination_outcomes WHERE {filter} AND outcome = '{outcome}'"
            )
        };
        for outcome in ["succeeded", "failed_permanent", "rejected"] {
            assert_eq!(
                count(&r, outcome),
                env.count(&raw(outcome)).await,
                "{outcome} for {args:?}: {r}"
            );
        }
        let total = env
            .count(&format!(
                "SELECT count(*) FROM termination_outcomes WHERE {filter}"
            ))
            .await;
        assert_eq!(r["total"], total, "{args:?}");
        let calls = env
            .count(&format!(
                "SELECT count(*) FROM termination_attempts WHERE http_status IS NOT NULL AND {}",
                filter.replace("finished_at", "started_at")
            ))
            .await;
        assert_eq!(r["latency_ms"]["calls"], calls, "{args:?}");
    }
    let all = report_json(&env, &[]).await;
    assert_eq!(all["total"], 30 + 40 + 7);
    assert_eq!(count(&all, "rejected"), 5);
    assert_eq!(
        env.count("SELECT sum(requests)::bigint FROM termination_summary")
            .await,
        30 + 40 + 7
    );
}

#[tokio::test]
async fn two_writers_at_once_lose_no_increment() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let writers = (0..4).map(|w| {
        let db = env.db.clone();
        tokio::spawn(async move {
            for round in 0..25 {
                sqlx::query(
                    "INSERT INTO termination_outcomes (request_id, workflow_id, outcome, \
                       received_at, finished_at) \
                     SELECT format('w%s-%s-%s', $1::int, $2::int, i), 'wf-' || (i % 3), \
                       'succeeded', now(), now() FROM generate_series(1, 40) i",
                )
                .bind(w)
                .bind(round)
                .execute(&db)
                .await
                .expect("insert");
            }
        })
    });
    for w in writers.collect::<Vec<_>>() {
        w.await.expect("writer");
    }
    fold(&env).await;
    assert_eq!(
        env.count("SELECT sum(requests)::bigint FROM termination_rollup_outcomes")
            .await,
        4 * 25 * 40
    );
    assert_eq!(
        env.count(
            "SELECT sum(requests)::bigint FROM termination_rollup_outcomes \
             WHERE workflow_id = 'wf-0'"
        )
        .await,
        env.count("SELECT count(*) FROM termination_outcomes WHERE workflow_id = 'wf-0'")
            .await
    );
}

#[tokio::test]
async fn the_views_quantiles_are_the_reports() {
    let env = TestEnv::new().await;
    backfill(&env, "q-", 200, 2).await;
    fold(&env).await;
    let bounds: Vec<f64> = sqlx::query_scalar("SELECT termination_latency_bounds_ms()")
        .fetch_one(&env.db)
        .await
        .expect("bounds");
    assert_eq!(bounds, LATENCY_BOUNDS_MS);
    // One hour of the view against the Rust quantile over that hour's buckets.
    let columns: Vec<String> = LATENCY_BOUNDS_MS
        .iter()
        .map(|b| format!("le_{b}ms"))
        .collect();
    let (hour, calls, le, p95): (chrono::DateTime<chrono::Utc>, i64, Vec<i64>, f64) =
        sqlx::query_as(&format!(
            "SELECT hour, calls, ARRAY[{}], (SELECT latency_p95_ms FROM termination_summary s \
               WHERE s.hour = r.hour) \
             FROM termination_rollup_attempts r ORDER BY calls DESC LIMIT 1",
            columns.join(", ")
        ))
        .fetch_one(&env.db)
        .await
        .expect("an hour");
    assert!(calls > 0, "{hour}");
    let want = quantile(0.95, &LATENCY_BOUNDS_MS, &le, calls).expect("quantile");
    assert!((p95 - want).abs() < 1e-9, "view {p95}, report {want}");
}

#[tokio::test]
async fn prune_during_a_run_loses_nothing_and_changes_no_total() {
    // A slow API and two calls at a time, held to a call a second while the
    // prune runs: the run cannot end before the prune does, and goes on
    // writing (throttled attempts) meanwhile.
    let env = TestEnv::with_sandbox(SandboxArgs {
        latency: Duration::from_millis(100),
        ..SandboxArgs::default()
    })
    .await;
    backfill(&env, "old-", 3000, 200).await;
    let before = report_json(&env, &[]).await;
    // The pruned hours as the view shows them, counts and quantiles.
    let old_hours = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(concat_ws(' ', hour, requests, succeeded, failed_permanent, \
               attempts, api_calls, latency_p50_ms, latency_p99_ms), '; ' ORDER BY hour) \
             FROM termination_summary WHERE hour < now() - interval '190 days'",
        )
        .fetch_one(&env.db)
        .await
        .expect("the old hours")
    };
    let old_hours_before = old_hours().await;
    let run_outcomes = "SELECT count(*) FROM termination_outcomes WHERE request_id LIKE 'run%'";
    publish_mixed(&env, "run", 200).await;
    let daemon = env.start_daemon(&["--concurrency", "2"]);
    eventually("the run has started", || async {
        env.count(run_outcomes).await > 0
    })
    .await;
    env.sandbox.sandbox().set_rate_limit(Some(1));
    // The queue's messages carry no timestamp: their age is stated.
    let (code, out) = prune(
        &env,
        &[
            "--older-than",
            "180d",
            "--batch-size",
            "250",
            "--oldest-message-age",
            "0s",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("3000 outcomes, 6000 attempts, 0 history rows"),
        "{out}"
    );
    let still_running = env.count(run_outcomes).await < 200;
    env.sandbox.sandbox().set_rate_limit(None);
    env.wait_outcomes(200).await;
    daemon.stop().await;
    assert!(
        still_running,
        "the prune ended after the run: not a prune during a run"
    );
    assert_eq!(
        env.count(run_outcomes).await,
        200,
        "the run's rows are all there"
    );
    let after = report_json(&env, &[]).await;
    assert_eq!(after["total"], before["total"].as_i64().unwrap_or(0) + 200);
    assert_eq!(
        count(&after, "failed_permanent"),
        count(&before, "failed_permanent") + 40
    );
    // The pruned rows' report (their workflow alone) and hours are what they were.
    let old = report_json(&env, &["--workflow", "wf-old"]).await;
    assert_eq!(totals(&old), totals(&before));
    assert_eq!(old_hours().await, old_hours_before);
}

#[tokio::test]
async fn a_prune_of_an_empty_window_is_a_no_op() {
    let env = TestEnv::new().await;
    backfill(&env, "recent-", 50, 1).await;
    let before = report_json(&env, &["--since", "3d"]).await;
    let args = ["--older-than", "180d"];
    let (code, out) = prune(&env, &[&args[..], &["--dry-run"]].concat()).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("would remove"), "{out}");
    assert!(
        out.contains("0 outcomes, 0 attempts, 0 history rows"),
        "{out}"
    );
    let (code, out) = prune(&env, &args).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("removed"), "{out}");
    assert!(
        out.contains("0 outcomes, 0 attempts, 0 history rows"),
        "{out}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes").await,
        50
    );
    assert_eq!(
        env.count("SELECT count(*) FROM termination_attempts").await,
        100
    );
    assert_eq!(
        totals(&report_json(&env, &["--since", "3d"]).await),
        totals(&before)
    );
}

#[tokio::test]
async fn two_prunes_at_once_do_not_double_count() {
    let env = TestEnv::new().await;
    backfill(&env, "a-", 4000, 250).await;
    backfill(&env, "b-", 1000, 1).await;
    let before = report_json(&env, &[]).await;
    let args = [
        "--older-than",
        "200d",
        "--batch-size",
        "300",
        "--oldest-message-age",
        "0s",
    ];
    let (one, two) = tokio::join!(prune(&env, &args), prune(&env, &args));
    let removed = |(code, out): &(Option<i32>, String)| -> (i64, i64) {
        assert_eq!(*code, Some(0), "{out}");
        let n = |what: &str| {
            out.split(", ")
                .flat_map(|part| part.rsplit(": ").next())
                .find(|p| p.ends_with(what))
                .and_then(|p| p.split(' ').next())
                .and_then(|n| n.parse::<i64>().ok())
                .unwrap_or_else(|| panic!("no {what} in {out}"))
        };
        (n("outcomes"), n("attempts"))
    };
    let (o1, a1) = removed(&one);
    let (o2, a2) = removed(&two);
    assert_eq!((o1 + o2, a1 + a2), (4000, 8000), "{one:?} {two:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes").await,
        1000
    );
    assert_eq!(
        env.count("SELECT sum(outcomes_removed)::bigint FROM termination_prunes")
            .await,
        4000
    );
    assert_eq!(totals(&report_json(&env, &[]).await), totals(&before));
}

#[tokio::test]
async fn a_cut_within_the_safety_margin_is_refused_with_exit_2() {
    let env = TestEnv::new().await;
    backfill(&env, "x-", 10, 30).await;
    // An empty queue: the margin alone (7 days by default).
    let (code, out) = prune(&env, &["--older-than", "3d"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--safety-margin 7days"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    // A message without a timestamp: its age is unknown.
    env.publish(&request("q1", "ex-q1"), None).await;
    let (code, out) = prune(&env, &["--older-than", "20d"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no timestamp"), "{out}");
    // Stated: 15 days old + 7 > 20.
    let (code, out) = prune(
        &env,
        &["--older-than", "20d", "--oldest-message-age", "15d"],
    )
    .await;
    assert_eq!(code, Some(2), "{out}");
    // Nothing was removed by the refusals.
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes").await,
        10
    );
    let (code, out) = prune(&env, &["--older-than", "20d", "--oldest-message-age", "1d"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes").await,
        0
    );
}

#[tokio::test]
async fn prune_reads_the_oldest_messages_age_and_leaves_it_queued() {
    let env = TestEnv::new().await;
    env.migrate().await;
    // Published as enqueue and replay publish: with a timestamp.
    let admin = aom_terminator::broker::Admin::open(&env.daemon_config(&[]).amqp)
        .await
        .expect("admin connection");
    admin
        .publish(&env.queue, request("t1", "ex-t1").as_bytes())
        .await
        .expect("publish");
    admin.close().await;
    let (code, out) = prune(&env, &["--older-than", "6d"]).await;
    assert_eq!(code, Some(2), "{out}");
    // The age read from the message's timestamp: seconds, however slowly
    // the prune started.
    let age = out
        .split("oldest queued message's age (")
        .nth(1)
        .and_then(|rest| rest.split("s)").next())
        .and_then(|secs| secs.parse::<u64>().ok());
    assert!(age.is_some_and(|secs| secs < 60), "{out}");
    let (code, out) = prune(&env, &["--older-than", "8d"]).await;
    assert_eq!(code, Some(0), "{out}");
    eventually("the message is back in the queue", || async {
        env.ready_requests().await == 1
    })
    .await;
}

#[tokio::test]
async fn a_fold_racing_writers_and_another_fold_loses_and_doubles_nothing() {
    let env = TestEnv::new().await;
    env.migrate().await;
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let db = env.db.clone();
            tokio::spawn(async move {
                for round in 0..40 {
                    sqlx::query(
                        "WITH o AS (INSERT INTO termination_outcomes (request_id, workflow_id, \
                           outcome, received_at, finished_at) \
                         SELECT format('f%s-%s-%s', $1::int, $2::int, i), 'wf-' || (i % 3), \
                           'succeeded', now(), now() FROM generate_series(1, 20) i \
                         RETURNING request_id, workflow_id) \
                         INSERT INTO termination_attempts (request_id, attempt, http_status, \
                           started_at, latency_ms, workflow_id) \
                         SELECT request_id, 1, 200, now(), 12, workflow_id FROM o",
                    )
                    .bind(w)
                    .bind(round)
                    .execute(&db)
                    .await
                    .expect("insert");
                }
            })
        })
        .collect();
    // Two folds at once, over and over, while the writers write.
    let folders: Vec<_> = (0..2)
        .map(|_| {
            let db = env.db.clone();
            let writing = std::sync::Arc::clone(&writing);
            tokio::spawn(async move {
                let mut folded = 0i64;
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    let n: i64 = sqlx::query_scalar("SELECT termination_rollup_fold()")
                        .fetch_one(&db)
                        .await
                        .expect("fold");
                    folded += n;
                }
                folded
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut folded = 0;
    for f in folders {
        folded += f.await.expect("folder");
    }
    assert!(folded > 0, "the folds ran while the writers wrote");
    fold(&env).await;
    assert_eq!(
        env.count("SELECT count(*) FROM termination_rollup_outcomes_delta")
            .await
            + env
                .count("SELECT count(*) FROM termination_rollup_attempts_delta")
                .await,
        0
    );
    for wf in ["wf-0", "wf-1", "wf-2"] {
        let raw = env
            .count(&format!(
                "SELECT count(*) FROM termination_outcomes WHERE workflow_id = '{wf}'"
            ))
            .await;
        assert_eq!(
            env.count(&format!(
                "SELECT sum(requests)::bigint FROM termination_rollup_outcomes \
                 WHERE workflow_id = '{wf}'"
            ))
            .await,
            raw,
            "{wf}"
        );
        assert_eq!(
            env.count(&format!(
                "SELECT sum(attempts + calls + le_20ms - le_10ms)::bigint \
                 FROM termination_rollup_attempts WHERE workflow_id = '{wf}'"
            ))
            .await,
            3 * raw,
            "{wf}: attempts, calls and the 12 ms bucket"
        );
    }
    assert_eq!(
        env.count("SELECT count(*) FROM termination_outcomes").await,
        3 * 40 * 20
    );
}

#[tokio::test]
async fn a_report_right_after_a_hand_written_insert_counts_it() {
    let env = TestEnv::new().await;
    backfill(&env, "h-", 500, 1).await;
    // Nothing folded them: the counts wait as deltas.
    assert_eq!(
        env.count("SELECT count(*) FROM termination_rollup_outcomes")
            .await,
        0
    );
    assert!(
        env.count("SELECT count(*) FROM termination_rollup_outcomes_delta")
            .await
            > 0
    );
    // The view counts them before any fold.
    assert_eq!(
        env.count("SELECT sum(requests)::bigint FROM termination_summary")
            .await,
        500
    );
    let r = report_json(&env, &[]).await;
    assert_eq!(count(&r, "succeeded"), 400, "{r}");
    assert_eq!(count(&r, "failed_permanent"), 100, "{r}");
    assert_eq!(r["latency_ms"]["calls"].as_i64(), Some(1000), "{r}");
    assert_eq!(
        env.count("SELECT count(*) FROM termination_rollup_outcomes")
            .await,
        0,
        "a report reads the deltas as they are: it writes nothing"
    );
}

#[tokio::test]
async fn a_report_on_a_read_only_connection_counts_everything() {
    let env = TestEnv::new().await;
    backfill(&env, "ro-", 500, 1).await;
    // A campaign with three 404s, for `report --campaign`'s errors.
    sqlx::query(
        "INSERT INTO termination_campaigns (id, requested_by, source, request_count) \
         VALUES ('ro-camp', 'me', 'test', 3)",
    )
    .execute(&env.db)
    .await
    .expect("campaign");
    sqlx::query(
        "INSERT INTO termination_outcomes (request_id, project_id, workflow_id, outcome, \
           http_status, error_code, attempts, received_at, finished_at, campaign_id) \
         SELECT 'roc-' || i, 'p', 'wf', 'failed_permanent', 404, 'AOM.0404', 1, now(), now(), \
           'ro-camp' FROM generate_series(1, 3) i",
    )
    .execute(&env.db)
    .await
    .expect("campaign outcomes");
    let deltas = "SELECT count(*) FROM termination_rollup_outcomes_delta";
    let unfolded = env.count(deltas).await;
    assert!(unfolded > 0);
    // As on a hot standby, or for a role with SELECT only: no transaction
    // may write.
    let sep = if env.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let read_only = format!(
        "{}{sep}options=-c%20default_transaction_read_only%3Don",
        env.database_url
    );
    let on: String = sqlx::query_scalar("SHOW default_transaction_read_only")
        .fetch_one(&sqlx::PgPool::connect(&read_only).await.expect("connect"))
        .await
        .expect("show");
    assert_eq!(on, "on", "a connection through this URL is read-only");
    let vars = [("DATABASE_URL", read_only.as_str())];
    let all = report_json_with(&env, &[], &vars).await;
    assert_eq!(count(&all, "succeeded"), 400, "{all}");
    assert_eq!(count(&all, "failed_permanent"), 103, "{all}");
    assert_eq!(all["latency_ms"]["calls"].as_i64(), Some(1000), "{all}");
    let week = report_json_with(&env, &["--since", "7d"], &vars).await;
    assert_eq!(count(&week, "succeeded"), 400, "{week}");
    let campaign = report_json_with(&env, &["--campaign", "ro-camp"], &vars).await;
    assert_eq!(
        campaign["errors"][0]["error_code"], "AOM.0404",
        "{campaign}"
    );
    assert_eq!(campaign["errors"][0]["count"], 3, "{campaign}");
    assert_eq!(env.count(deltas).await, unfolded, "nothing was folded");
    // Folded, the same report to the last latency bucket.
    assert!(fold(&env).await > 0);
    assert_eq!(totals(&report_json(&env, &[]).await), totals(&all));
    assert_eq!(
        totals(&report_json(&env, &["--since", "7d"]).await),
        totals(&week)
    );
}

#[tokio::test]
async fn the_running_daemon_folds_its_own_deltas() {
    let env = TestEnv::new().await;
    publish_mixed(&env, "fd", 20).await;
    let daemon = env.start_daemon(&[]);
    env.wait_outcomes(20).await;
    // No report and no fold by hand: the daemon's fold task empties the
    // deltas into the rollups while it runs.
    eventually("the daemon to fold its deltas", || async {
        env.count(
            "SELECT (SELECT count(*) FROM termination_rollup_outcomes_delta) \
               + (SELECT count(*) FROM termination_rollup_attempts_delta)",
        )
        .await
            == 0
            && env
                .count("SELECT coalesce(sum(requests), 0)::bigint FROM termination_rollup_outcomes")
                .await
                == 20
    })
    .await;
    assert_eq!(
        env.count("SELECT sum(attempts)::bigint FROM termination_rollup_attempts")
            .await,
        env.count("SELECT count(*) FROM termination_attempts").await
    );
    daemon.stop().await;
}
