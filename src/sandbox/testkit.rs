//! Test helpers: raw HTTP/1.1 calls to an in-process sandbox.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{RunningSandbox, Sandbox, SandboxArgs};

pub(super) const PROJECT: &str = "0123456789abcdef0123456789abcdef";

pub(super) struct RawResponse {
    pub(super) status: u16,
    pub(super) head: String,
    pub(super) body: String,
}

impl RawResponse {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn read_to_end(stream: &TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub(super) async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> RawResponse {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        write_all(&stream, req.as_bytes()).await?;
        read_to_end(&stream).await
    };
    let bytes = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("request timed out")
        .expect("request failed");
    let text = String::from_utf8(bytes).expect("response is not UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("no end of head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("no status");
    RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

pub(super) fn terminate_path(project: &str, workflow: &str, execution: &str) -> String {
    format!("/v1/{project}/cms/workflow/{workflow}/executions/{execution}/terminate")
}

pub(super) async fn call(addr: SocketAddr, token: &str, execution: &str) -> RawResponse {
    raw(
        addr,
        "POST",
        &terminate_path(PROJECT, "wf-1", execution),
        &[
            ("Content-Type", "application/json"),
            ("X-Auth-Token", token),
        ],
        "",
    )
    .await
}

pub(super) async fn start(args: SandboxArgs) -> RunningSandbox {
    let sandbox = Sandbox::new(&args);
    sandbox
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind")
}
