//! The child processes: the daemon and the sandbox, started from the release
//! binary, and stopped with SIGTERM.

use crate::Bench;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Child;

pub(crate) fn spawn(
    binary: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let stderr = file
        .try_clone()
        .with_context(|| format!("reopen {}", log.display()))?;
    tokio::process::Command::new(binary)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(stderr))
        // An interrupted or failed run leaves no process behind.
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {} {}", binary.display(), args.join(" ")))
}

/// SIGTERM (via `kill -TERM`), then wait up to `grace` for the exit.
pub(crate) async fn terminate(
    child: &mut Child,
    grace: Duration,
) -> Result<std::process::ExitStatus> {
    if let Some(status) = child.try_wait().context("poll the process")? {
        return Ok(status);
    }
    let pid = child.id().context("the process has no pid")?;
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .context("run kill -TERM")?;
    if !kill.success() {
        bail!("kill -TERM {pid} failed: {kill}");
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.context("wait for the process"),
        Err(_) => {
            let _ = child.kill().await;
            bail!(
                "did not exit within {} s of SIGTERM (killed)",
                grace.as_secs()
            )
        }
    }
}

pub(crate) fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("find a free port for the sandbox")?;
    Ok(listener.local_addr().context("local address")?.port())
}

pub(crate) async fn sandbox_stats(bench: &Bench, url: &str) -> Result<serde_json::Value> {
    let response = bench
        .http
        .get(format!("{url}/_sandbox/stats"))
        .send()
        .await
        .context("GET /_sandbox/stats")?;
    let status = response.status();
    let body = response.text().await.context("read /_sandbox/stats")?;
    if !status.is_success() {
        bail!("GET /_sandbox/stats answered {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("/_sandbox/stats is not JSON: {body}"))
}

pub(crate) async fn wait_for_sandbox(bench: &Bench, sandbox: &mut Child, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sandbox_stats(bench, url).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                if let Some(status) = sandbox.try_wait().context("poll the sandbox")? {
                    bail!("the sandbox exited ({status}) before answering");
                }
                if Instant::now() >= deadline {
                    return Err(e.context("the sandbox did not answer within 30 s"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
