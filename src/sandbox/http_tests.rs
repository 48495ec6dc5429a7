//! The load limits and the projects over real HTTP against an in-process sandbox.

use std::time::Duration;

use super::testkit::{PROJECT, call, raw, start, terminate_path};
use super::{SandboxArgs, TokenProjects, parse_project_list, parse_project_regions};

const BODY_401: &str =
    r#"{"error_code":"AOM.31009004","error_msg":"auth failed.","http_code":401}"#;
const OTHER: &str = "fedcba9876543210fedcba9876543210";
const JSON: (&str, &str) = ("Content-Type", "application/json");

async fn call_for(
    addr: std::net::SocketAddr,
    project: &str,
    token: &str,
) -> super::testkit::RawResponse {
    raw(
        addr,
        "POST",
        &terminate_path(project, "wf-1", "exec-1"),
        &[JSON, ("X-Auth-Token", token)],
        "",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_answers_429_like_the_gateway() {
    let running = start(SandboxArgs {
        rate_limit: Some(1),
        ..SandboxArgs::default()
    })
    .await;
    let addr = running.local_addr();
    let sb = running.sandbox().clone();

    assert_eq!(call(addr, "t", "exec-1").await.status, 200);
    // The bucket (burst 1) is empty: the gateway refuses, before the script is reached.
    let r = call(addr, "t", "flaky-t").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.body,
        r#"{"error_code":"APIGW.0308","error_msg":"The throttling threshold has been reached: policy user over ratelimit,limit:1,time:1 second"}"#
    );
    let stats = sb.stats();
    assert_eq!(stats.calls, 2);
    assert_eq!(stats.by_status.get(&429), Some(&1));
    sb.set_rate_limit(None);
    assert_eq!(
        call(addr, "t", "flaky-t").await.status,
        500,
        "the throttled call did not consume the flaky failure"
    );
    assert_eq!(sb.calls_for(PROJECT, "wf-1", "flaky-t"), 2);

    // 20 calls/s: a burst of 2, then refusals.
    sb.set_rate_limit(Some(20));
    let statuses = [
        call(addr, "t", "a").await.status,
        call(addr, "t", "b").await.status,
        call(addr, "t", "c").await.status,
    ];
    assert_eq!(statuses[..2], [200, 200]);
    if statuses[2] == 429 {
        // 50 ms later a token is back.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(call(addr, "t", "d").await.status, 200);
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_queues_calls_then_answers_busy() {
    let latency = Duration::from_millis(300);
    let running = start(SandboxArgs {
        latency,
        capacity: Some(1),
        queue_limit: Some(1),
        ..SandboxArgs::default()
    })
    .await;
    let addr = running.local_addr();
    let sb = running.sandbox().clone();
    let ends = |execution: &'static str| {
        tokio::spawn(async move {
            let r = call(addr, "t", execution).await;
            (r.status, std::time::Instant::now())
        })
    };
    let sent = std::time::Instant::now();
    let first = ends("exec-1");
    while sb.stats().in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = ends("exec-2");
    while sb.stats().queued == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // One served, one waiting: the next is refused without waiting for a
    // turn (both are still there when it is answered).
    let r = call(addr, "t", "flaky-busy").await;
    assert_eq!(r.status, 503);
    assert!(!first.is_finished() && !second.is_finished());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        r.body,
        r#"{"error_code":"AOM.0503","error_msg":"service busy"}"#
    );

    let (status, _) = first.await.unwrap();
    assert_eq!(status, 200);
    let (status, second_end) = second.await.unwrap();
    assert_eq!(status, 200);
    // It waited for the first, then got the whole latency from its turn: two
    // latencies after the first was sent, at least (each aimed 1 ms early;
    // any delay only adds). Counted from its arrival it would end after one.
    let took = second_end.duration_since(sent);
    assert!(
        took >= 2 * latency - Duration::from_millis(10),
        "answered {took:?} after the first was sent"
    );

    let stats = sb.stats();
    assert_eq!((stats.queued, stats.max_queued), (0, 1), "{stats:?}");
    assert_eq!(stats.by_status.get(&200), Some(&2));
    assert_eq!(stats.by_status.get(&503), Some(&1));
    // The refused call never reached its script.
    assert_eq!(call(addr, "t", "flaky-busy").await.status, 500);
    sb.reset_stats();
    assert_eq!(sb.stats().max_queued, 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tokens_cover_their_projects() {
    let running = start(SandboxArgs {
        expected_token: Some("admin".into()),
        token_projects: Some(TokenProjects::new([
            ("tok-a", vec![PROJECT]),
            ("tok-b", vec![OTHER]),
        ])),
        ..SandboxArgs::default()
    })
    .await;
    let addr = running.local_addr();
    let sb = running.sandbox().clone();

    assert_eq!(call_for(addr, PROJECT, "tok-a").await.status, 200);
    let r = call_for(addr, OTHER, "tok-a").await;
    assert_eq!((r.status, r.body.as_str()), (401, BODY_401));
    assert_eq!(call_for(addr, OTHER, "tok-b").await.status, 200);
    assert_eq!(call_for(addr, PROJECT, "tok-b").await.status, 401);
    // The expected token is not listed: it covers every project.
    assert_eq!(call_for(addr, OTHER, "admin").await.status, 200);
    assert_eq!(call_for(addr, PROJECT, "nobody").await.status, 401);

    // Rotated coverage, from Rust…
    sb.set_token_projects(Some(TokenProjects::new([("tok-a", vec![OTHER])])));
    assert_eq!(call_for(addr, PROJECT, "tok-a").await.status, 401);
    assert_eq!(call_for(addr, OTHER, "tok-a").await.status, 200);
    assert_eq!(call_for(addr, OTHER, "tok-b").await.status, 401);
    // …and over HTTP.
    let body = format!("tok-a={PROJECT},{OTHER}");
    let r = raw(addr, "POST", "/_sandbox/token-projects", &[], &body).await;
    assert_eq!(r.status, 204);
    assert_eq!(call_for(addr, PROJECT, "tok-a").await.status, 200);
    let r = raw(addr, "POST", "/_sandbox/token-projects", &[], "tok-a").await;
    assert_eq!(r.status, 400);
    // Lifted: only the expected token is valid again, for every project.
    sb.set_token_projects(None);
    assert_eq!(call_for(addr, PROJECT, "tok-a").await.status, 401);
    assert_eq!(call_for(addr, OTHER, "admin").await.status, 200);
    running.shutdown().await;

    // Listed tokens alone make a token required.
    let running = start(SandboxArgs {
        token_projects: Some(TokenProjects::new([("tok-a", vec![PROJECT])])),
        ..SandboxArgs::default()
    })
    .await;
    let addr = running.local_addr();
    assert_eq!(call_for(addr, PROJECT, "tok-a").await.status, 200);
    assert_eq!(call_for(addr, PROJECT, "anything").await.status, 401);
    running.shutdown().await;
}

fn token_request(scope: serde_json::Value) -> String {
    serde_json::json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "ops", "password": "pw", "domain": {"name": "acme"}
        }}},
        "scope": {"project": scope},
    }})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_tokens_cover_the_project_they_are_scoped_to() {
    let running = start(SandboxArgs {
        iam_user: Some("ops".into()),
        iam_password: Some("pw".into()),
        iam_domain: Some("acme".into()),
        iam_user_projects: Some(parse_project_list(PROJECT).unwrap()),
        project_regions: parse_project_regions(&format!(
            "{PROJECT}=cn-north-4,{OTHER}=ap-southeast-1"
        ))
        .unwrap(),
        ..SandboxArgs::default()
    })
    .await;
    let addr = running.local_addr();
    let sb = running.sandbox().clone();
    let issue = |scope: serde_json::Value| async move {
        let r = raw(
            addr,
            "POST",
            "/v3/auth/tokens",
            &[JSON],
            &token_request(scope),
        )
        .await;
        let token = r.header("x-subject-token").map(str::to_owned);
        (r, token)
    };

    let (r, token) = issue(serde_json::json!({"id": PROJECT})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let token = token.expect("a token");
    assert_eq!(call_for(addr, PROJECT, &token).await.status, 200);
    let r = call_for(addr, OTHER, &token).await;
    assert_eq!((r.status, r.body.as_str()), (401, BODY_401));

    // The user has no role in OTHER: IAM refuses.
    let (r, token) = issue(serde_json::json!({"id": OTHER})).await;
    assert_eq!(r.status, 401);
    assert!(token.is_none());
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"]["code"], 401, "{}", r.body);

    // By name: the region's project.
    let (r, by_name) = issue(serde_json::json!({"name": "cn-north-4"})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let by_name = by_name.expect("a token");
    assert_eq!(call_for(addr, PROJECT, &by_name).await.status, 200);
    assert_eq!(call_for(addr, OTHER, &by_name).await.status, 401);
    let (r, _) = issue(serde_json::json!({"name": "ap-southeast-1"})).await;
    assert_eq!(r.status, 401);

    let stats = sb.stats();
    assert_eq!(stats.iam_calls, 4);
    let by_project: Vec<(&str, u64)> = stats
        .iam_calls_by_project
        .iter()
        .map(|(p, n)| (p.as_str(), *n))
        .collect();
    assert_eq!(
        by_project,
        [
            (PROJECT, 1),
            ("ap-southeast-1", 1),
            ("cn-north-4", 1),
            (OTHER, 1)
        ]
    );

    // GET /v3/projects/{id}.
    let show = |project: &'static str, token: Option<String>| async move {
        let headers: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| ("X-Auth-Token", t))
            .into_iter()
            .collect();
        raw(
            addr,
            "GET",
            &format!("/v3/projects/{project}"),
            &headers,
            "",
        )
        .await
    };
    let r = show(OTHER, Some(by_name.clone())).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["project"]["id"], OTHER);
    assert_eq!(body["project"]["name"], "ap-southeast-1");
    assert_eq!(body["project"]["enabled"], true);
    assert_eq!(
        body["project"]["domain_id"].as_str().map(str::len),
        Some(32)
    );
    let r = show("00000000000000000000000000000000", Some(by_name.clone())).await;
    assert_eq!(r.status, 404);
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"]["code"], 404, "{}", r.body);
    assert_eq!(show(PROJECT, None).await.status, 401);
    assert_eq!(show(PROJECT, Some("forged".into())).await.status, 401);

    sb.reset_stats();
    assert!(sb.stats().iam_calls_by_project.is_empty());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_region_host_name_is_served_and_counted() {
    let running = start(SandboxArgs::default()).await;
    let addr = running.local_addr();
    let r = raw(
        addr,
        "POST",
        &terminate_path(PROJECT, "wf-1", "exec-1"),
        &[
            ("Host", "aom.cn-north-4.myhuaweicloud.com"),
            JSON,
            ("X-Auth-Token", "t"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // As an HTTP proxy: the target in absolute form, routed by its path.
    let absolute = format!(
        "http://aom.ap-southeast-1.example.test{}",
        terminate_path(PROJECT, "wf-1", "exec-2")
    );
    let r = raw(
        addr,
        "POST",
        &absolute,
        &[
            ("Host", "aom.ap-southeast-1.example.test"),
            JSON,
            ("X-Auth-Token", "t"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let by_host: Vec<(String, u64)> = running
        .sandbox()
        .stats()
        .calls_by_host
        .into_iter()
        .collect();
    assert_eq!(
        by_host,
        [
            ("aom.ap-southeast-1.example.test".to_owned(), 1),
            ("aom.cn-north-4.myhuaweicloud.com".to_owned(), 1)
        ]
    );
    running.sandbox().reset_stats();
    assert!(running.sandbox().stats().calls_by_host.is_empty());
    running.shutdown().await;
}
