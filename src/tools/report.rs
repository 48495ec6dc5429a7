//! `aom-terminator report`: what happened, from the audit, and what is
//! still pending in the queue.

use super::output::csv_error;
use crate::audit::report::{ErrorCount, Filter, Reports, Summary};
use crate::broker::management::{QueueCounts, queue_counts};
use crate::domain::Outcome;
use crate::settings::{BrokerArgs, DatabaseArgs, management_url};
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::io::{IsTerminal, Write};
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
    /// One campaign: total, done, pending, by outcome and error code, the
    /// rate over the last minute and an ETA. With `--failed`, its failures.
    #[arg(long, conflicts_with_all = ["since", "workflow", "requested_by"])]
    pub campaign: Option<String>,
    /// The recent campaigns and their progress.
    #[arg(long, conflicts_with_all = ["campaign", "failed", "since", "workflow", "requested_by"])]
    pub campaigns: bool,
    /// Redraw the `--campaign` report every 2 s until the campaign is done
    /// (or Ctrl-C). Needs a terminal.
    #[arg(long, requires = "campaign", conflicts_with_all = ["format", "failed"])]
    pub watch: bool,
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
    #[serde(flatten)]
    pub summary: Summary,
    pub pending: Pending,
}

#[derive(Debug, Serialize)]
pub struct Pending {
    /// Messages waiting in the request queue.
    pub ready: Option<u64>,
    /// Messages delivered to a daemon and not yet acked (needs the
    /// management API).
    pub unacked: Option<u64>,
    pub total: Option<u64>,
    /// Requests in the parking queue: their project's calls are refused
    /// (401) while others' go through. Not in `total`.
    pub parked: Option<u64>,
}

impl From<QueueCounts> for Pending {
    fn from(c: QueueCounts) -> Self {
        Pending {
            ready: c.ready,
            unacked: c.unacked,
            total: c.ready.zip(c.unacked).map(|(r, u)| r + u),
            parked: c.parked,
        }
    }
}

impl ReportArgs {
    fn filter(&self) -> Filter {
        Filter {
            since: self
                .since
                .and_then(|d| chrono::TimeDelta::from_std(d).ok())
                .map(|d| Utc::now() - d),
            workflow: self.workflow.clone(),
            requested_by: self.requested_by.clone(),
            campaign: self.campaign.clone(),
        }
    }

    /// `--format`, else a table on a terminal and JSON otherwise.
    pub(super) fn format(&self) -> ReportFormat {
        self.format.unwrap_or(if std::io::stdout().is_terminal() {
            ReportFormat::Table
        } else {
            ReportFormat::Json
        })
    }
}

/// Write the report (or, with `--failed`, the failed requests) to `out`.
pub async fn run(args: ReportArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let database = args.database.settings()?;
    if args.campaigns || (args.campaign.is_some() && !args.failed) {
        return super::campaigns::run(&args, &database, out).await;
    }
    // The broker's settings are checked before anything connects, but only
    // where the queue is counted.
    let broker = if args.failed {
        None
    } else {
        Some((
            args.broker.settings()?,
            management_url(&args.management_url)?,
        ))
    };
    let reports = Reports::connect(&database).await?;
    let filter = args.filter();
    let Some((broker, management)) = broker else {
        return failed_csv(&reports, &filter, out).await;
    };
    let summary = reports.summary(&filter).await?;
    let pending = queue_counts(&broker, &management).await.into();
    let report = Report {
        since: filter.since,
        workflow: filter.workflow,
        requested_by: filter.requested_by,
        summary,
        pending,
    };
    let text = match args.format() {
        ReportFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
        ReportFormat::Csv => to_csv(&report),
        ReportFormat::Table => to_table(&report),
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}

async fn failed_csv(
    reports: &Reports,
    filter: &Filter,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let rows = reports.failed(filter).await?;
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record([
        "project_id",
        "workflow_id",
        "execution_id",
        "reason",
        "requested_by",
    ])
    .map_err(csv_error)?;
    for r in rows {
        csv.write_record([
            r.project_id,
            r.workflow_id,
            r.execution_id,
            r.reason.unwrap_or_default(),
            r.requested_by.unwrap_or_default(),
        ])
        .map_err(csv_error)?;
    }
    csv.flush()?;
    Ok(())
}

fn to_csv(r: &Report) -> String {
    let mut out = csv::Writer::from_writer(Vec::new());
    let mut row = |fields: [&str; 4]| {
        let _ = out.write_record(fields);
    };
    row(["section", "key", "detail", "count"]);
    for c in &r.summary.outcomes {
        row(["outcome", &c.outcome, "", &c.count.to_string()]);
    }
    for e in &r.summary.errors {
        let [section, key, detail, count] = error_csv_row(e);
        row([&section, &key, &detail, &count]);
    }
    for p in &r.summary.projects {
        row([
            "project",
            p.project_id.as_deref().unwrap_or(""),
            &format!("succeeded={} failed={}", p.succeeded, p.failed),
            &p.total.to_string(),
        ]);
    }
    for w in &r.summary.workflows {
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
    row(["pending", "parked", "", &opt(r.pending.parked)]);
    let ms = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_default();
    row(["latency_ms", "p50", "", &ms(r.summary.latency_ms.p50)]);
    row(["latency_ms", "p95", "", &ms(r.summary.latency_ms.p95)]);
    row(["latency_ms", "p99", "", &ms(r.summary.latency_ms.p99)]);
    String::from_utf8(out.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// Columns padded to their widest cell.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
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

/// One failed-requests row of the CSV of `report` and `report --campaign`:
/// section, key, detail, count.
pub(super) fn error_csv_row(e: &ErrorCount) -> [String; 4] {
    let status = e.http_status.map(|s| s.to_string()).unwrap_or_default();
    [
        "error".into(),
        e.error_code.clone().unwrap_or_default(),
        format!("{} {status}", e.outcome),
        e.count.to_string(),
    ]
}

/// The failed requests by outcome, status and error code, as `report` and
/// `report --campaign` print them.
pub(super) fn errors_table(errors: &[ErrorCount]) -> String {
    let rows: Vec<Vec<String>> = errors
        .iter()
        .map(|e| {
            vec![
                e.outcome.clone(),
                e.http_status.map_or_else(|| "-".into(), |s| s.to_string()),
                e.error_code.clone().unwrap_or_else(|| "-".into()),
                e.count.to_string(),
            ]
        })
        .collect();
    table(&["outcome", "status", "error_code", "requests"], &rows)
}

/// The report as `report --format table` prints it (also `demo`'s summary).
pub fn to_table(r: &Report) -> String {
    let mut out = String::new();
    // The window counted: `since`, or the start of its hour where a prune
    // removed the rows of that hour.
    let window = match r.summary.window_start {
        Some(t) => format!("since {}", t.format("%Y-%m-%d %H:%M:%S UTC")),
        None => "all time".to_owned(),
    };
    out.push_str(&format!(
        "{} requests with a final outcome, {window}",
        r.summary.total
    ));
    if let Some(w) = &r.workflow {
        out.push_str(&format!(", workflow {w}"));
    }
    if let Some(b) = &r.requested_by {
        out.push_str(&format!(", requested by {b}"));
    }
    out.push_str("\n\n");
    let outcomes: Vec<Vec<String>> = Outcome::ALL
        .iter()
        .map(|o| {
            let n = r
                .summary
                .outcomes
                .iter()
                .find(|c| c.outcome == o.as_str())
                .map_or(0, |c| c.count);
            vec![o.as_str().to_owned(), n.to_string()]
        })
        .collect();
    out.push_str(&table(&["outcome", "requests"], &outcomes));
    if !r.summary.errors.is_empty() {
        out.push('\n');
        out.push_str(&errors_table(&r.summary.errors));
    }
    if r.summary.projects.len() > 1 {
        out.push('\n');
        let rows: Vec<Vec<String>> = r
            .summary
            .projects
            .iter()
            .map(|p| {
                vec![
                    p.project_id.clone().unwrap_or_else(|| "-".into()),
                    p.total.to_string(),
                    p.succeeded.to_string(),
                    p.failed.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["project", "requests", "succeeded", "not succeeded"],
            &rows,
        ));
    }
    if !r.summary.workflows.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = r
            .summary
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
    if let Some(parked) = r.pending.parked.filter(|n| *n > 0) {
        out.push_str(&format!(
            "parked: {parked} requests of projects the API refuses the credentials for \
             (see /readyz); they go back to the queue when it accepts them\n"
        ));
    }
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1} ms"));
    out.push_str(&format!(
        "API latency over {} calls: p50 {}, p95 {}, p99 {}\n",
        r.summary.latency_ms.calls,
        ms(r.summary.latency_ms.p50),
        ms(r.summary.latency_ms.p95),
        ms(r.summary.latency_ms.p99)
    ));
    out
}
