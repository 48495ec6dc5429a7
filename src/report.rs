//! `aom-terminator report`: what happened, from the audit, and what is
//! still pending in the queue.

use crate::broker::Admin;
use crate::config::{BrokerArgs, DatabaseArgs};
use crate::domain::Outcome;
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use serde::Serialize;
use sqlx::PgPool;
use std::io::IsTerminal;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Only requests finished within this long (`1h`, `30m`, `2d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Only this workflow.
    #[arg(long)]
    pub workflow: Option<String>,
    /// Only requests with this requested_by.
    #[arg(long)]
    pub requested_by: Option<String>,
    /// Output format (default: a table on a terminal, JSON otherwise).
    #[arg(long, value_enum)]
    pub format: Option<ReportFormat>,
    /// List the requests that did not succeed, as CSV without request_id,
    /// ready to feed back to `enqueue` as new requests.
    #[arg(long)]
    pub failed: bool,
    /// RabbitMQ management API, for the unacked count (credentials from AMQP_URL).
    #[arg(
        long,
        env = "RABBITMQ_MANAGEMENT_URL",
        default_value = "http://127.0.0.1:15672"
    )]
    pub management_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub since: Option<DateTime<Utc>>,
    pub workflow: Option<String>,
    pub requested_by: Option<String>,
    pub total: i64,
    pub outcomes: Vec<Count>,
    pub errors: Vec<ErrorCount>,
    pub workflows: Vec<WorkflowCount>,
    pub pending: Pending,
    pub latency_ms: Latency,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Count {
    pub outcome: String,
    pub count: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ErrorCount {
    pub outcome: String,
    pub http_status: Option<i32>,
    pub error_code: Option<String>,
    pub count: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct WorkflowCount {
    pub project_id: Option<String>,
    pub workflow_id: Option<String>,
    pub total: i64,
    pub succeeded: i64,
    pub failed: i64,
}

#[derive(Debug, Serialize)]
pub struct Pending {
    /// Messages waiting in the request queue.
    pub ready: Option<u64>,
    /// Messages delivered to a daemon and not yet acked (needs the
    /// management API).
    pub unacked: Option<u64>,
    pub total: Option<u64>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Latency {
    pub calls: i64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// The filter every query shares: `$1` since, `$2` workflow, `$3` requested_by.
const FILTER: &str = "($1::timestamptz IS NULL OR o.finished_at >= $1) \
     AND ($2::text IS NULL OR o.workflow_id = $2) \
     AND ($3::text IS NULL OR o.requested_by = $3)";

pub async fn build(pool: &PgPool, args: &ReportArgs) -> Result<Report, sqlx::Error> {
    let since = args
        .since
        .and_then(|d| chrono::TimeDelta::from_std(d).ok())
        .map(|d| Utc::now() - d);
    let outcomes: Vec<Count> = sqlx::query_as(&format!(
        "SELECT o.outcome, count(*) AS count FROM termination_outcomes o WHERE {FILTER} \
         GROUP BY o.outcome ORDER BY count DESC"
    ))
    .bind(since)
    .bind(&args.workflow)
    .bind(&args.requested_by)
    .fetch_all(pool)
    .await?;
    let errors: Vec<ErrorCount> = sqlx::query_as(&format!(
        "SELECT o.outcome, o.http_status, o.error_code, count(*) AS count \
         FROM termination_outcomes o WHERE {FILTER} AND o.outcome <> 'succeeded' \
         GROUP BY 1, 2, 3 ORDER BY count DESC LIMIT 20"
    ))
    .bind(since)
    .bind(&args.workflow)
    .bind(&args.requested_by)
    .fetch_all(pool)
    .await?;
    let workflows: Vec<WorkflowCount> = sqlx::query_as(&format!(
        "SELECT o.project_id, o.workflow_id, count(*) AS total, \
           count(*) FILTER (WHERE o.outcome = 'succeeded') AS succeeded, \
           count(*) FILTER (WHERE o.outcome <> 'succeeded') AS failed \
         FROM termination_outcomes o WHERE {FILTER} \
         GROUP BY 1, 2 ORDER BY total DESC LIMIT 20"
    ))
    .bind(since)
    .bind(&args.workflow)
    .bind(&args.requested_by)
    .fetch_all(pool)
    .await?;
    let latency: Latency = sqlx::query_as(&format!(
        "SELECT count(*) AS calls, \
           percentile_cont(0.5) WITHIN GROUP (ORDER BY a.latency_ms) AS p50, \
           percentile_cont(0.95) WITHIN GROUP (ORDER BY a.latency_ms) AS p95, \
           percentile_cont(0.99) WITHIN GROUP (ORDER BY a.latency_ms) AS p99 \
         FROM termination_attempts a JOIN termination_outcomes o USING (request_id) \
         WHERE {FILTER} AND a.http_status IS NOT NULL"
    ))
    .bind(since)
    .bind(&args.workflow)
    .bind(&args.requested_by)
    .fetch_one(pool)
    .await?;
    Ok(Report {
        since,
        workflow: args.workflow.clone(),
        requested_by: args.requested_by.clone(),
        total: outcomes.iter().map(|c| c.count).sum(),
        outcomes,
        errors,
        workflows,
        pending: Pending {
            ready: None,
            unacked: None,
            total: None,
        },
        latency_ms: latency,
    })
}

/// Messages ready and unacked in the request queue.
async fn pending(args: &ReportArgs) -> Pending {
    let Ok(settings) = args.broker.settings() else {
        return Pending {
            ready: None,
            unacked: None,
            total: None,
        };
    };
    // The management API knows both numbers.
    let vhost = percent_encoding::utf8_percent_encode(
        &settings.uri.vhost,
        percent_encoding::NON_ALPHANUMERIC,
    );
    let queue =
        percent_encoding::utf8_percent_encode(&settings.queue, percent_encoding::NON_ALPHANUMERIC);
    let url = format!(
        "{}/api/queues/{vhost}/{queue}",
        args.management_url.trim_end_matches('/')
    );
    let auth = &settings.uri.authority.userinfo;
    let answer = async {
        let resp = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?
            .get(url)
            .basic_auth(&auth.username, Some(&auth.password))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&resp.text().await.ok()?).ok()?;
        Some((
            v["messages_ready"].as_u64()?,
            v["messages_unacknowledged"].as_u64()?,
        ))
    }
    .await;
    if let Some((ready, unacked)) = answer {
        return Pending {
            ready: Some(ready),
            unacked: Some(unacked),
            total: Some(ready + unacked),
        };
    }
    // Without it, AMQP tells only what is waiting.
    let ready = match Admin::open(&settings).await {
        Ok(admin) => {
            let depth = admin.depth(&settings.queue).await;
            admin.close().await;
            depth
        }
        Err(_) => None,
    };
    Pending {
        ready: ready.map(u64::from),
        unacked: None,
        total: None,
    }
}

pub async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let options = args.database.connect_options()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the audit database: {e}"))?;
    if args.failed {
        return failed_csv(&pool, &args).await;
    }
    let mut report = build(&pool, &args).await?;
    report.pending = pending(&args).await;
    let format = args.format.unwrap_or(if std::io::stdout().is_terminal() {
        ReportFormat::Table
    } else {
        ReportFormat::Json
    });
    match format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        ReportFormat::Csv => print!("{}", to_csv(&report)),
        ReportFormat::Table => print!("{}", to_table(&report)),
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct FailedRow {
    project_id: String,
    workflow_id: String,
    execution_id: String,
    reason: Option<String>,
    requested_by: Option<String>,
}

async fn failed_csv(pool: &PgPool, args: &ReportArgs) -> anyhow::Result<()> {
    let since = args
        .since
        .and_then(|d| chrono::TimeDelta::from_std(d).ok())
        .map(|d| Utc::now() - d);
    let rows: Vec<FailedRow> = sqlx::query_as(&format!(
        "SELECT o.project_id, o.workflow_id, o.execution_id, o.reason, o.requested_by \
             FROM termination_outcomes o WHERE {FILTER} AND o.outcome <> 'succeeded' \
               AND o.project_id IS NOT NULL AND o.workflow_id IS NOT NULL \
               AND o.execution_id IS NOT NULL \
             ORDER BY o.project_id, o.workflow_id, o.execution_id"
    ))
    .bind(since)
    .bind(&args.workflow)
    .bind(&args.requested_by)
    .fetch_all(pool)
    .await?;
    let mut out = csv::Writer::from_writer(std::io::stdout());
    out.write_record([
        "project_id",
        "workflow_id",
        "execution_id",
        "reason",
        "requested_by",
    ])?;
    for r in rows {
        out.write_record([
            r.project_id,
            r.workflow_id,
            r.execution_id,
            r.reason.unwrap_or_default(),
            r.requested_by.unwrap_or_default(),
        ])?;
    }
    out.flush()?;
    Ok(())
}

fn to_csv(r: &Report) -> String {
    let mut out = csv::Writer::from_writer(Vec::new());
    let mut row = |fields: [&str; 4]| {
        let _ = out.write_record(fields);
    };
    row(["section", "key", "detail", "count"]);
    for c in &r.outcomes {
        row(["outcome", &c.outcome, "", &c.count.to_string()]);
    }
    for e in &r.errors {
        let status = e.http_status.map(|s| s.to_string()).unwrap_or_default();
        row([
            "error",
            e.error_code.as_deref().unwrap_or(""),
            &format!("{} {status}", e.outcome),
            &e.count.to_string(),
        ]);
    }
    for w in &r.workflows {
        row([
            "workflow",
            w.workflow_id.as_deref().unwrap_or(""),
            &format!("succeeded={} failed={}", w.succeeded, w.failed),
            &w.total.to_string(),
        ]);
    }
    let opt = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
    row(["pending", "ready", "", &opt(r.pending.ready)]);
    row(["pending", "unacked", "", &opt(r.pending.unacked)]);
    let ms = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_default();
    row(["latency_ms", "p50", "", &ms(r.latency_ms.p50)]);
    row(["latency_ms", "p95", "", &ms(r.latency_ms.p95)]);
    row(["latency_ms", "p99", "", &ms(r.latency_ms.p99)]);
    String::from_utf8(out.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
            + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn to_table(r: &Report) -> String {
    let mut out = String::new();
    let window = match r.since {
        Some(t) => format!("since {}", t.format("%Y-%m-%d %H:%M:%S UTC")),
        None => "all time".to_owned(),
    };
    out.push_str(&format!(
        "{} requests with a final outcome, {window}",
        r.total
    ));
    if let Some(w) = &r.workflow {
        out.push_str(&format!(", workflow {w}"));
    }
    if let Some(b) = &r.requested_by {
        out.push_str(&format!(", requested by {b}"));
    }
    out.push_str("\n\n");
    let outcomes: Vec<Vec<String>> = [
        Outcome::Succeeded,
        Outcome::FailedPermanent,
        Outcome::FailedRetriesExhausted,
        Outcome::Rejected,
    ]
    .iter()
    .map(|o| {
        let n = r
            .outcomes
            .iter()
            .find(|c| c.outcome == o.as_str())
            .map_or(0, |c| c.count);
        vec![o.as_str().to_owned(), n.to_string()]
    })
    .collect();
    out.push_str(&table(&["outcome", "requests"], &outcomes));
    if !r.errors.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = r
            .errors
            .iter()
            .map(|e| {
                vec![
                    e.outcome.clone(),
                    e.http_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    e.error_code.clone().unwrap_or_else(|| "-".into()),
                    e.count.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["outcome", "status", "error_code", "requests"],
            &rows,
        ));
    }
    if !r.workflows.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = r
            .workflows
            .iter()
            .map(|w| {
                vec![
                    w.workflow_id.clone().unwrap_or_else(|| "-".into()),
                    w.total.to_string(),
                    w.succeeded.to_string(),
                    w.failed.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["workflow", "requests", "succeeded", "not succeeded"],
            &rows,
        ));
    }
    let opt = |v: Option<u64>| v.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    out.push_str(&format!(
        "\npending in the queue: {} waiting, {} delivered and not yet acked\n",
        opt(r.pending.ready),
        opt(r.pending.unacked)
    ));
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1} ms"));
    out.push_str(&format!(
        "API latency over {} calls: p50 {}, p95 {}, p99 {}\n",
        r.latency_ms.calls,
        ms(r.latency_ms.p50),
        ms(r.latency_ms.p95),
        ms(r.latency_ms.p99)
    ));
    out
}
