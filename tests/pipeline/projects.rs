//! Many projects and regions from one daemon: IAM tokens per project, a
//! project the credentials do not cover held alone, and calls routed to each
//! project's region through `{region}` in AOM_ENDPOINT.
//!
//! Regional host names (`aom.cn-north-4.example.test`) resolve nowhere: the
//! daemon (the real binary) sends its calls through the sandbox as its HTTP
//! proxy, which serves them by path and counts the Host each was meant for.

use crate::auth::{
    AK, IAM_DOMAIN, IAM_PASSWORD, IAM_USER, SK, aksk_sandbox, iam_flags_with_home,
    iam_sandbox as iam_account, refs,
};
use crate::helpers::*;
use aom_terminator::sandbox::{SandboxArgs, parse_project_list, parse_project_regions};
use std::collections::BTreeMap;
use std::time::Duration;

const A: &str = PROJECT;
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const C: &str = "cccccccccccccccccccccccccccccccc";
const TEMPLATE: &str = "http://aom.{region}.example.test";

fn request_in(project: &str, request_id: &str, region: Option<&str>) -> String {
    let mut r = serde_json::json!({
        "request_id": request_id,
        "project_id": project,
        "workflow_id": "wf-test",
        "execution_id": format!("ex-{request_id}"),
    });
    if let Some(region) = region {
        r["region"] = region.into();
    }
    r.to_string()
}

/// A sandbox whose IAM user may scope tokens to `covered` (all if `None`),
/// and whose IAM knows A in cn-north-4 and B in ap-southeast-1.
fn iam_sandbox(covered: Option<&str>) -> SandboxArgs {
    SandboxArgs {
        iam_user_projects: covered.map(|c| parse_project_list(c).expect("projects")),
        project_regions: parse_project_regions(&format!("{A}=cn-north-4,{B}=ap-southeast-1"))
            .expect("regions"),
        ..iam_account(Duration::from_secs(24 * 3600))
    }
}

fn iam_env(env: &TestEnv) -> Vec<(&'static str, String)> {
    let mut vars = env.binary_env_without_auth();
    vars.extend([
        ("IAM_ENDPOINT", env.sandbox.base_url()),
        ("IAM_USER", IAM_USER.to_owned()),
        ("IAM_PASSWORD", IAM_PASSWORD.to_owned()),
        ("IAM_DOMAIN", IAM_DOMAIN.to_owned()),
    ]);
    vars
}

/// The daemon binary with `vars`, its API calls through the sandbox as proxy.
fn start_proxied(env: &TestEnv, vars: Vec<(&'static str, String)>) -> tokio::process::Child {
    binary()
        .arg("run")
        .envs(vars)
        .env("AOM_ENDPOINT", TEMPLATE)
        .env("HTTP_PROXY", env.sandbox.base_url())
        .env("SHUTDOWN_GRACE", "1")
        .spawn()
        .expect("spawn")
}

/// Where each request's attempts went: request_id → (region, endpoint_host).
async fn routes(env: &TestEnv) -> BTreeMap<String, (Option<String>, Option<String>)> {
    let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT DISTINCT request_id, region, endpoint_host FROM termination_attempts",
    )
    .fetch_all(&env.db)
    .await
    .expect("attempts");
    rows.into_iter()
        .map(|(id, region, host)| (id, (region, host)))
        .collect()
}

fn route(region: &str) -> (Option<String>, Option<String>) {
    (
        Some(region.to_owned()),
        Some(format!("aom.{region}.example.test")),
    )
}

#[tokio::test]
async fn two_regions_through_the_template_by_request_field_and_by_iam_lookup() {
    let env = TestEnv::with_sandbox(iam_sandbox(None)).await;
    // A by its field (another region than IAM gives it: the field wins),
    // A and B by IAM's name for them.
    env.publish(&request_in(A, "a-field", Some("eu-west-0")), None)
        .await;
    for i in 0..3 {
        env.publish(&request_in(A, &format!("a-iam-{i}"), None), None)
            .await;
        env.publish(&request_in(B, &format!("b-iam-{i}"), None), None)
            .await;
    }
    let child = start_proxied(&env, iam_env(&env));
    env.wait_outcomes(7).await;
    assert_eq!(succeeded(&env).await, 7);

    let routes = routes(&env).await;
    assert_eq!(routes["a-field"], route("eu-west-0"));
    for i in 0..3 {
        assert_eq!(routes[&format!("a-iam-{i}")], route("cn-north-4"));
        assert_eq!(routes[&format!("b-iam-{i}")], route("ap-southeast-1"));
    }
    let stats = env.sandbox.sandbox().stats();
    let by_host: Vec<(&str, u64)> = stats
        .calls_by_host
        .iter()
        .map(|(h, n)| (h.as_str(), *n))
        .collect();
    assert_eq!(
        by_host,
        [
            ("aom.ap-southeast-1.example.test", 3),
            ("aom.cn-north-4.example.test", 3),
            ("aom.eu-west-0.example.test", 1),
        ],
        "the sandbox saw each call addressed where the audit says it went"
    );
    assert_eq!(stats.iam_project_lookups, 2, "one lookup per project");
    assert_eq!(stats.iam_calls_by_project.get(A), Some(&1));
    assert_eq!(stats.iam_calls_by_project.get(B), Some(&1));
    let (code, out) = terminate(child).await;
    assert_eq!(code, Some(0), "{out}");
}

#[tokio::test]
async fn aksk_signs_each_project_and_regional_host() {
    let env = TestEnv::with_sandbox(aksk_sandbox()).await;
    for i in 0..3 {
        env.publish(&request_in(A, &format!("a{i}"), None), None)
            .await;
        env.publish(
            &request_in(B, &format!("b{i}"), Some("ap-southeast-1")),
            None,
        )
        .await;
    }
    let mut vars = env.binary_env_without_auth();
    vars.extend([
        ("CLOUD_SDK_AK", AK.to_owned()),
        ("CLOUD_SDK_SK", SK.to_owned()),
        ("AOM_PROJECT_REGIONS", format!("{A}=cn-north-4")),
    ]);
    let child = start_proxied(&env, vars);
    env.wait_outcomes(6).await;
    assert_eq!(succeeded(&env).await, 6, "every signature checked out");
    let stats = env.sandbox.sandbox().stats();
    assert_eq!(stats.by_status.get(&401), None);
    assert_eq!(
        stats.calls_by_host.get("aom.cn-north-4.example.test"),
        Some(&3)
    );
    assert_eq!(
        stats.calls_by_host.get("aom.ap-southeast-1.example.test"),
        Some(&3)
    );
    let (code, out) = terminate(child).await;
    assert_eq!(code, Some(0), "{out}");
}

/// Needs the dispatcher to record `Unroutable` as `rejected` (issue 15's
/// dispatcher half).
#[tokio::test]
async fn a_request_whose_region_cannot_be_found_is_rejected_with_the_reason() {
    let env = TestEnv::new().await;
    env.publish(&request_in(C, "lost", None), None).await;
    env.publish(&request_in(A, "known", None), None).await;
    let mut vars = env.binary_env();
    vars.push(("AOM_PROJECT_REGIONS", format!("{A}=cn-north-4")));
    let child = start_proxied(&env, vars);
    env.wait_outcomes(2).await;
    let lost = env.outcome_of("lost").await;
    assert_eq!(lost.outcome, "rejected");
    let why = lost.error_msg.unwrap_or_default();
    assert!(why.contains("no region") && why.contains(C), "{why}");
    assert_eq!(env.outcome_of("known").await.outcome, "succeeded");
    assert_eq!(env.sandbox.sandbox().stats().calls, 1, "no call for C");
    let (code, out) = terminate(child).await;
    assert_eq!(code, Some(0), "{out}");
}

/// Needs the dispatcher's per-project holds (issue 15's dispatcher half).
#[tokio::test]
async fn iam_user_covering_a_and_b_but_not_c_gets_a_and_b_done_and_c_held() {
    let env = TestEnv::with_sandbox(iam_sandbox(Some(&format!("{A},{B}")))).await;
    // C first, so that A and B come after a refusal.
    for i in 0..5 {
        env.publish(&request_in(C, &format!("c{i}"), None), None)
            .await;
    }
    for i in 0..20 {
        env.publish(&request_in(A, &format!("a{i}"), None), None)
            .await;
        env.publish(&request_in(B, &format!("b{i}"), None), None)
            .await;
    }
    let flags = iam_flags_with_home(&env, "--iam-project-id", A);
    let daemon = env.start_daemon_with_auth(&refs(&flags), &[]);
    env.wait_outcomes(40).await;
    assert_eq!(succeeded(&env).await, 40, "A and B all done");
    // C is probed on its schedule (IAM asked again), and still has no verdict.
    eventually_for("C probed again", Duration::from_secs(20), || async {
        env.sandbox
            .sandbox()
            .stats()
            .iam_calls_by_project
            .get(C)
            .is_some_and(|n| *n >= 2)
    })
    .await;
    assert_eq!(env.outcomes().await, 40, "no verdict for C");
    let stats = env.sandbox.sandbox().stats();
    assert_eq!(stats.iam_calls_by_project.get(A), Some(&1), "{stats:?}");
    assert_eq!(stats.iam_calls_by_project.get(B), Some(&1), "{stats:?}");
    assert!(
        (0..5).all(|i| env
            .sandbox
            .sandbox()
            .calls_for(C, "wf-test", &format!("ex-c{i}"))
            == 0),
        "the API never saw C"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_misplaced_region_template_or_a_bad_project_region_exits_2_in_one_line() {
    let cases = [
        (
            "https://aom.example.com/{region}/",
            "",
            "AOM_ENDPOINT: {region} may stand once, in the host name only",
        ),
        (
            "https://aom.{zone}.example.com",
            "",
            "the only placeholder is {region}",
        ),
        (
            TEMPLATE,
            "0123456789abcdef0123456789abcdef=North_4",
            "AOM_PROJECT_REGIONS: region must be lowercase",
        ),
        (TEMPLATE, "p1=cn-north-4", "AOM_PROJECT_REGIONS: project_id"),
        (
            "https://aom.example.com",
            "0123456789abcdef0123456789abcdef=cn-north-4",
            "AOM_ENDPOINT has no {region}",
        ),
    ];
    for (endpoint, regions, want) in cases {
        assert_refused_in_one_line(
            &[
                ("AOM_ENDPOINT", endpoint),
                ("AOM_PROJECT_REGIONS", regions),
                ("AOM_AUTH_TOKEN", "tok-never-shown"),
            ],
            want,
            "tok-never-shown",
        )
        .await;
    }
}
