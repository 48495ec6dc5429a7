//! The adapter against the in-process sandbox: routes to regions, tokens per
//! project (cached, single-flight), and projects the credentials do not cover.

use super::{CallError, HttpOptions, TerminateClient};
use crate::domain::{ExecutionId, ProjectId, Region, TerminationRequest, WorkflowId};
use crate::sandbox::{
    RunningSandbox, Sandbox, SandboxArgs, parse_project_list, parse_project_regions,
};
use crate::settings::{AomEndpoint, AuthSettings, IamSettings, ProjectScope, StaticToken};
use std::time::Duration;

const P1: &str = "11111111111111111111111111111111";
const P2: &str = "22222222222222222222222222222222";
const P3: &str = "33333333333333333333333333333333";
const PASSWORD: &str = "pw-7f3a";

fn request(project: &str, execution: &str, region: Option<&str>) -> TerminationRequest {
    TerminationRequest {
        request_id: execution.to_owned(),
        project_id: ProjectId::parse(project).expect("project"),
        workflow_id: WorkflowId::parse("wf-1").expect("workflow"),
        execution_id: ExecutionId::parse(execution).expect("execution"),
        reason: None,
        requested_by: None,
        replay_of: None,
        region: region.map(|r| Region::parse(r).expect("region")),
        campaign_id: None,
    }
}

async fn sandbox(args: SandboxArgs) -> RunningSandbox {
    Sandbox::new(&args)
        .bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("sandbox")
}

/// A sandbox whose IAM user may scope tokens to `covered` (every project if `None`).
async fn iam_sandbox(covered: Option<&str>, regions: &str) -> RunningSandbox {
    sandbox(SandboxArgs {
        iam_user: Some("ops".into()),
        iam_password: Some(PASSWORD.into()),
        iam_domain: Some("acme".into()),
        iam_user_projects: covered.map(|c| parse_project_list(c).expect("projects")),
        project_regions: parse_project_regions(regions).expect("regions"),
        ..SandboxArgs::default()
    })
    .await
}

fn iam(iam: &RunningSandbox, password: &str, home: Option<ProjectScope>) -> AuthSettings {
    AuthSettings::Iam(IamSettings {
        endpoint: url::Url::parse(&iam.base_url()).expect("url"),
        user: "ops".into(),
        password: password.to_owned().into(),
        domain: "acme".into(),
        home,
        renew_before: Duration::from_secs(600),
    })
}

fn client(endpoint: AomEndpoint, auth: &AuthSettings) -> TerminateClient {
    TerminateClient::new(&endpoint, auth, HttpOptions::new(Duration::from_secs(5), 4))
        .expect("client")
}

fn fixed(sb: &RunningSandbox) -> AomEndpoint {
    AomEndpoint::parse(&sb.base_url(), "").expect("endpoint")
}

fn iam_calls(sb: &RunningSandbox, project: &str) -> u64 {
    let stats = sb.sandbox().stats();
    stats
        .iam_calls_by_project
        .get(project)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_route_takes_the_request_region_then_the_settings_else_is_unroutable() {
    let endpoint = AomEndpoint::parse(
        "https://aom.{region}.myhuaweicloud.com/",
        &format!("{P1}=cn-north-4"),
    )
    .expect("endpoint");
    let c = client(endpoint, &AuthSettings::Token("t".to_owned().into()));
    let host = |r: &super::route::Route| r.base.host_str().map(str::to_owned);

    let by_field = c
        .route(&request(P1, "e1", Some("ap-southeast-1")))
        .await
        .expect("routed");
    assert_eq!(
        host(&by_field).as_deref(),
        Some("aom.ap-southeast-1.myhuaweicloud.com")
    );
    assert_eq!(
        by_field.region.as_ref().map(Region::as_str),
        Some("ap-southeast-1")
    );
    let by_settings = c.route(&request(P1, "e2", None)).await.expect("routed");
    assert_eq!(
        host(&by_settings).as_deref(),
        Some("aom.cn-north-4.myhuaweicloud.com")
    );
    match c.route(&request(P2, "e3", None)).await {
        Err(CallError::Unroutable(why)) => {
            assert!(
                why.contains(P2) && why.contains("AOM_PROJECT_REGIONS"),
                "{why}"
            );
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    // The same through terminate: no call is made (the host does not resolve).
    assert!(matches!(
        c.terminate(&request(P2, "e3", None)).await,
        Err(CallError::Unroutable(_))
    ));

    let plain = client(
        AomEndpoint::parse("https://aom.example.com", "").expect("endpoint"),
        &AuthSettings::Token("t".to_owned().into()),
    );
    let route = plain
        .route(&request(P2, "e4", Some("eu-west-0")))
        .await
        .expect("routed");
    assert_eq!(
        (host(&route).as_deref(), route.region),
        (Some("aom.example.com"), None),
        "without {{region}} the request's region changes nothing"
    );
}

#[tokio::test]
async fn a_static_token_declared_for_a_project_is_never_sent_for_another() {
    let sb = sandbox(SandboxArgs::default()).await;
    let auth = AuthSettings::Token(StaticToken {
        token: "t".to_owned().into(),
        project: Some(ProjectId::parse(P1).expect("project")),
    });
    let c = client(fixed(&sb), &auth);
    for i in 0..3 {
        match c.terminate(&request(P2, &format!("e{i}"), None)).await {
            Err(CallError::NotCovered { project, why }) => {
                assert_eq!(project, P2);
                assert!(why.contains("AOM_AUTH_TOKEN_PROJECT_ID"), "{why}");
            }
            other => panic!("expected NotCovered, got {other:?}"),
        }
    }
    assert_eq!(sb.sandbox().stats().calls, 0, "the API never saw P2");
    let attempt = c
        .terminate(&request(P1, "e-ok", None))
        .await
        .expect("a call");
    assert_eq!(attempt.http_status, Some(200));
    let expected_host = url::Url::parse(&sb.base_url()).expect("url");
    assert_eq!(
        attempt.endpoint_host.as_deref(),
        expected_host.host_str(),
        "the host actually called"
    );
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_tokens_are_per_project_cached_and_single_flight() {
    let sb = iam_sandbox(Some(&format!("{P1},{P2}")), "").await;
    let c = client(fixed(&sb), &iam(&sb, PASSWORD, None));
    let calls = (0..40).map(|i| {
        let c = c.clone();
        let project = if i % 2 == 0 { P1 } else { P2 };
        async move { c.terminate(&request(project, &format!("e{i}"), None)).await }
    });
    for result in futures_util::future::join_all(calls).await {
        assert_eq!(result.expect("a call").http_status, Some(200));
    }
    assert_eq!((iam_calls(&sb, P1), iam_calls(&sb, P2)), (1, 1));

    // The API refuses P1's token: P1's only is renewed, once.
    let p1 = ProjectId::parse(P1).expect("project");
    let generation = c
        .terminate(&request(P1, "again", None))
        .await
        .expect("a call")
        .auth_generation;
    assert!(c.auth().rejected(&p1, generation));
    assert!(
        c.auth().rejected(&p1, generation),
        "a second report is free"
    );
    for i in 0..5 {
        let attempt = c
            .terminate(&request(P1, &format!("r{i}"), None))
            .await
            .expect("a call");
        assert_eq!(attempt.auth_generation, generation + 1);
    }
    c.terminate(&request(P2, "p2", None)).await.expect("a call");
    assert_eq!((iam_calls(&sb, P1), iam_calls(&sb, P2)), (2, 1));
    sb.shutdown().await;
}

#[tokio::test]
async fn a_project_iam_will_not_scope_is_not_covered_and_asked_again_later() {
    let sb = iam_sandbox(Some(P1), "").await;
    let home = Some(ProjectScope::Id(P1.to_owned()));
    let c = client(fixed(&sb), &iam(&sb, PASSWORD, home.clone()));
    let not_covered = |r: Result<crate::domain::Attempt, CallError>| match r {
        Err(CallError::NotCovered { project, .. }) => project == P3,
        _ => false,
    };
    assert!(not_covered(c.terminate(&request(P3, "e1", None)).await));
    assert_eq!(
        (iam_calls(&sb, P3), iam_calls(&sb, P1)),
        (1, 1),
        "P3 refused, and the home project checked the credentials"
    );
    // A flood right after the refusal costs no IAM call...
    for i in 0..10 {
        assert!(not_covered(
            c.terminate(&request(P3, &format!("f{i}"), None)).await
        ));
    }
    assert_eq!(iam_calls(&sb, P3), 1);
    // ...but the refusal is not kept for good: a role can be granted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while iam_calls(&sb, P3) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "P3 never asked again"
        );
        assert!(not_covered(c.terminate(&request(P3, "g", None)).await));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(iam_calls(&sb, P1), 1, "the home token stayed cached");
    assert_eq!(sb.sandbox().stats().calls, 0, "the API never saw P3");
    let ok = c.terminate(&request(P1, "ok", None)).await.expect("a call");
    assert_eq!(ok.http_status, Some(200));

    // A wrong password: the home project is refused too, so it is the
    // credentials, for every project (the dispatcher pauses).
    let wrong = client(fixed(&sb), &iam(&sb, "not-the-password", home));
    for project in [P3, P1] {
        match wrong.terminate(&request(project, "w", None)).await {
            Err(CallError::Auth(e)) => {
                let e = e.to_string();
                assert!(e.contains("refused the credentials"), "{e}");
                assert!(!e.contains("not-the-password"), "{e}");
            }
            other => panic!("expected a credential error, got {other:?}"),
        }
    }
    // Without a home project, a refusal is the project's own.
    let homeless = client(fixed(&sb), &iam(&sb, PASSWORD, None));
    assert!(not_covered(
        homeless.terminate(&request(P3, "h", None)).await
    ));
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_names_each_project_region_once() {
    let sb = iam_sandbox(
        None,
        &format!("{P1}=cn-north-4,{P2}=ap-southeast-1_payments"),
    )
    .await;
    let endpoint = AomEndpoint::parse("http://aom.{region}.example.test", "").expect("endpoint");
    let c = client(endpoint, &iam(&sb, PASSWORD, None));
    let routes = (0..20).map(|i| {
        let c = c.clone();
        let project = if i % 2 == 0 { P1 } else { P2 };
        async move { c.route(&request(project, &format!("e{i}"), None)).await }
    });
    let mut hosts: Vec<String> = futures_util::future::join_all(routes)
        .await
        .into_iter()
        .map(|r| r.expect("routed").base.host_str().unwrap_or("").to_owned())
        .collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(
        hosts,
        [
            "aom.ap-southeast-1.example.test",
            "aom.cn-north-4.example.test"
        ]
    );
    let stats = sb.sandbox().stats();
    assert_eq!(stats.iam_project_lookups, 2, "one lookup per project");
    assert_eq!((iam_calls(&sb, P1), iam_calls(&sb, P2)), (1, 1));

    // A project IAM does not know: the request cannot be routed, and IAM is
    // not asked again for each request.
    for i in 0..5 {
        match c.route(&request(P3, &format!("u{i}"), None)).await {
            Err(CallError::Unroutable(why)) => assert!(why.contains("404"), "{why}"),
            other => panic!("expected Unroutable, got {other:?}"),
        }
    }
    assert_eq!(sb.sandbox().stats().iam_project_lookups, 3);

    // IAM out of reach is not a verdict on the request.
    let p4 = "44444444444444444444444444444444";
    sb.sandbox().set_iam_available(false);
    assert!(matches!(
        c.route(&request(p4, "down", None)).await,
        Err(CallError::Auth(_))
    ));
    sb.shutdown().await;
}
