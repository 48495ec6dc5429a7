//! hyper's client as the terminate calls use it, against raw HTTP servers on
//! loopback: what it sends, how much of an answer it keeps, and how a call
//! without an answer is told apart (timeout, refused, TLS).

use super::direct::{Direct, Failure};
use crate::settings::HttpVersion;
use crate::telemetry::tls_failure;
use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves one connection: reads the request head, sends it back through
/// the returned channel and answers `answer` (or nothing, if `None`).
async fn one_shot(answer: Option<Vec<u8>>) -> (Url, tokio::sync::oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.expect("read");
            if n == 0 {
                return;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        match answer {
            Some(answer) => {
                let _ = socket.write_all(&answer).await;
            }
            // Hold the connection open, answering nothing.
            None => tokio::time::sleep(Duration::from_secs(30)).await,
        }
    });
    let url = Url::parse(&format!(
        "http://{addr}/v1/p/cms/workflow/w/executions/e/terminate"
    ))
    .expect("url");
    (url, rx)
}

fn token() -> Vec<(HeaderName, HeaderValue)> {
    vec![(
        HeaderName::from_static("x-auth-token"),
        HeaderValue::from_static("t-123"),
    )]
}

#[tokio::test]
async fn a_call_is_a_post_with_its_headers_and_the_answer_is_kept_up_to_the_limit() {
    let body = vec![b'x'; 100_000];
    let mut answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    let (url, head) = one_shot(Some(answer)).await;
    let direct = Direct::new(Duration::from_secs(5), 1, None, HttpVersion::Http1).expect("client");
    let (status, headers, kept) = direct.post(&url, token(), 65_536).await.expect("answer");
    assert_eq!(status.as_u16(), 429);
    assert_eq!(
        headers.get("retry-after").map(HeaderValue::as_bytes),
        Some(&b"3"[..])
    );
    assert_eq!(kept.len(), 65_536, "the body is cut at the limit");
    let head = head.await.expect("head").to_ascii_lowercase();
    assert!(
        head.starts_with("post /v1/p/cms/workflow/w/executions/e/terminate http/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\ncontent-type: application/json\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nx-auth-token: t-123\r\n"), "{head}");
    assert!(
        head.contains(&format!("\r\nhost: {}\r\n", url.authority())),
        "{head}"
    );
}

#[tokio::test]
async fn no_answer_within_the_timeout_is_a_timeout() {
    let (url, _head) = one_shot(None).await;
    let direct =
        Direct::new(Duration::from_millis(300), 1, None, HttpVersion::Http1).expect("client");
    let failure = direct
        .post(&url, token(), 1024)
        .await
        .expect_err("no answer");
    assert!(failure.is_timeout(), "{failure:?}");
    assert!(!failure.is_connect());
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let url = Url::parse(&format!("http://{addr}/x")).expect("url");
    let direct = Direct::new(Duration::from_secs(5), 1, None, HttpVersion::Http1).expect("client");
    let failure = direct.post(&url, token(), 1024).await.expect_err("refused");
    assert!(failure.is_connect(), "{failure:?}");
    assert!(tls_failure(&failure).is_none());
}

#[tokio::test]
async fn a_server_that_is_not_tls_fails_as_tls_on_https() {
    // A plain-HTTP server behind an https URL: it answers the ClientHello
    // with plain text, and the failure is found as a TLS one (the
    // dispatcher pauses on those instead of counting attempts).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let _ = socket
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await;
    });
    let url = Url::parse(&format!("https://{addr}/x")).expect("url");
    let direct = Direct::new(Duration::from_secs(5), 1, None, HttpVersion::Http1).expect("client");
    let failure = direct.post(&url, token(), 1024).await.expect_err("not TLS");
    assert!(matches!(failure, Failure::Send(_)), "{failure:?}");
    assert!(tls_failure(&failure).is_some(), "{failure:?}");
}

#[test]
fn a_connection_that_timed_out_is_a_timeout_however_deep_the_cause() {
    // hyper-util's connect timeout is an I/O `TimedOut` under its own
    // errors, and an I/O error may wrap another: `timed_out` looks inside
    // I/O errors too. reqwest counts it as a timeout, and so must the
    // direct path (the adaptive limit takes timeouts as overload).
    let inner = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout");
    let wrapped = std::io::Error::other(inner);
    assert!(super::direct::timed_out(&wrapped));
    assert!(!super::direct::timed_out(&std::io::Error::other("refused")));
}
