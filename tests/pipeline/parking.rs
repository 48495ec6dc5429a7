//! Per-project holds end to end (issue 15): a token that covers one
//! project never stalls another; the other project's requests park in the
//! parking queue, and go through once the credentials cover it, across a
//! restart too.

use crate::helpers::*;
use aom_terminator::sandbox::{SandboxArgs, TokenProjects};
use std::path::PathBuf;

const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn request_for(project: &str, request_id: &str) -> String {
    serde_json::json!({
        "request_id": request_id,
        "project_id": project,
        "workflow_id": "wf-test",
        "execution_id": format!("ex-{request_id}"),
    })
    .to_string()
}

/// The sandbox knows two tokens: `token-a` covers PROJECT, `token-ab` both.
fn two_tokens() -> SandboxArgs {
    SandboxArgs {
        token_projects: Some(TokenProjects::new([
            ("token-a", vec![PROJECT]),
            ("token-ab", vec![PROJECT, B]),
        ])),
        ..SandboxArgs::default()
    }
}

/// A token file holding `token`, in a directory of its own.
fn token_file(token: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aomt-{:x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("token");
    std::fs::write(&file, format!("{token}\n")).expect("write token");
    file
}

async fn count_of(env: &TestEnv, project: &str, outcome: &str) -> i64 {
    if env.outcomes().await == 0 {
        return 0; // (the daemon may not have made the tables yet)
    }
    env.count(&format!(
        "SELECT count(*) FROM termination_outcomes WHERE project_id = '{project}' \
         AND outcome = '{outcome}'"
    ))
    .await
}

/// Requests sent to the API more than once with a success: none may be.
async fn succeeded_twice(env: &TestEnv) -> i64 {
    env.count(
        "SELECT count(*) FROM (SELECT request_id FROM termination_attempts \
         WHERE http_status = 200 GROUP BY request_id HAVING count(*) > 1) t",
    )
    .await
}

#[tokio::test]
async fn a_401_for_one_project_never_stalls_another() {
    let env = TestEnv::with_sandbox(two_tokens()).await;
    let file = token_file("token-a");
    // 200 requests for A with 300 for B between them: far more than the
    // prefetch window.
    for i in 0..100 {
        env.publish(&request_for(PROJECT, &format!("a{i}")), None)
            .await;
    }
    for i in 0..300 {
        env.publish(&request_for(B, &format!("b{i}")), None).await;
    }
    for i in 100..200 {
        env.publish(&request_for(PROJECT, &format!("a{i}")), None)
            .await;
    }
    let metrics = free_addr();
    let file_flag = file.display().to_string();
    let metrics_flag = metrics.to_string();
    let daemon = env.start_daemon_with_auth(
        &["--aom-auth-token-file", &file_flag],
        &["--prefetch", "20", "--metrics-addr", &metrics_flag],
    );
    eventually("every request of A succeeded", || async {
        count_of(&env, PROJECT, "succeeded").await == 200
    })
    .await;
    // B is held: one request probes in memory, the rest are parked; none
    // has a verdict, and the daemon is ready (A goes on).
    eventually("B's other requests parked", || async {
        env.parked_requests().await == 299
    })
    .await;
    assert_eq!(env.outcomes().await, 200, "no verdict for any of B");
    assert_eq!(report_json(&env, &[]).await["pending"]["parked"], 299);
    let (status, body) = http_get(&format!("http://{metrics}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(B), "/readyz names the held project: {body}");
    let (_, text) = http_get(&format!("http://{metrics}/metrics")).await;
    assert!(
        text.contains(&format!(
            "aom_terminator_projects_held{{project_id=\"{B}\"}} 1"
        )),
        "{text}"
    );

    // The token file is rotated to one that covers both: B goes through by
    // itself (the probe passes, the parked requests move back).
    std::fs::write(&file, "token-ab\n").expect("rotate token");
    eventually("every request of B succeeded", || async {
        count_of(&env, B, "succeeded").await == 300
    })
    .await;
    assert_eq!(env.outcomes().await, 500);
    assert_eq!(succeeded_twice(&env).await, 0, "nothing sent twice");
    // The report groups by project.
    let projects = report_json(&env, &[]).await["projects"].clone();
    let of = |p: &str| {
        projects
            .as_array()
            .and_then(|a| a.iter().find(|x| x["project_id"] == p))
            .map(|x| (x["total"].clone(), x["succeeded"].clone()))
    };
    assert_eq!(of(PROJECT), Some((200.into(), 200.into())), "{projects}");
    assert_eq!(of(B), Some((300.into(), 300.into())), "{projects}");
    eventually("the parking queue is empty", || async {
        env.parked_requests().await == 0
    })
    .await;
    let (_, text) = http_get(&format!("http://{metrics}/metrics")).await;
    assert!(!text.contains("aom_terminator_projects_held{"), "{text}");
    daemon.stop().await;
    let _ = std::fs::remove_dir_all(file.parent().expect("dir"));
}

#[tokio::test]
async fn parked_requests_survive_a_restart() {
    let env = TestEnv::with_sandbox(two_tokens()).await;
    let file = token_file("token-a");
    let file_flag = file.display().to_string();
    let auth = ["--aom-auth-token-file", file_flag.as_str()];
    for i in 0..10 {
        env.publish(&request_for(PROJECT, &format!("a{i}")), None)
            .await;
    }
    for i in 0..50 {
        env.publish(&request_for(B, &format!("b{i}")), None).await;
    }
    let daemon = env.start_daemon_with_auth(&auth, &["--prefetch", "10"]);
    eventually("B parked", || async { env.parked_requests().await == 49 }).await;
    assert_eq!(count_of(&env, PROJECT, "succeeded").await, 10);
    daemon.stop().await;
    // The prober's message went back to the request queue; the parked
    // ones wait in theirs.
    assert_eq!(env.ready_requests().await, 1);
    assert_eq!(env.parked_requests().await, 49);

    // Covered now; a new daemon moves the parked requests back at start.
    std::fs::write(&file, "token-ab\n").expect("rotate token");
    let daemon = env.start_daemon_with_auth(&auth, &[]);
    eventually("every request of B succeeded", || async {
        count_of(&env, B, "succeeded").await == 50
    })
    .await;
    assert_eq!(env.outcomes().await, 60, "nothing lost, nothing extra");
    assert_eq!(succeeded_twice(&env).await, 0, "nothing sent twice");
    eventually("both queues empty", || async {
        env.parked_requests().await == 0 && env.ready_requests().await == 0
    })
    .await;
    daemon.stop().await;
    let _ = std::fs::remove_dir_all(file.parent().expect("dir"));
}
