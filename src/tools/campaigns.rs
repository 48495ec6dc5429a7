//! `report --campaign ID`, `--campaigns` and `--watch`: one mass cancellation
//! followed from the audit. Progress comes from the
//! `termination_campaign_progress` view, errors from the campaign's outcomes.

use super::output::csv_error;
use super::report::{ReportArgs, ReportFormat, error_csv_row, errors_table, table};
use crate::audit::campaigns::Progress;
use crate::audit::report::{Count, ErrorCount, Reports};
use crate::domain::Outcome;
use crate::settings::{ConfigError, DatabaseSettings};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// How often `--watch` redraws.
const REDRAW: Duration = Duration::from_secs(2);

/// How many campaigns `--campaigns` lists.
const RECENT: i64 = 20;

/// A campaign's progress: what `--campaigns` lists per campaign and
/// `--campaign` shows first.
#[derive(Debug, Serialize)]
pub struct Overview {
    pub campaign_id: String,
    pub requested_by: Option<String>,
    pub source: Option<String>,
    pub note: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    /// The campaign's request_count; null when no enqueue recorded it.
    pub total: Option<i64>,
    /// Its requests with a final outcome (replays not counted).
    pub done: i64,
    pub pending: Option<i64>,
    /// Replays from the dead-letter queue, with their own outcomes.
    pub replays: i64,
    /// Requests done per second over the last minute.
    pub rate_per_s: f64,
    pub eta_seconds: Option<u64>,
    pub eta_at: Option<DateTime<Utc>>,
    pub first_outcome_at: Option<DateTime<Utc>>,
    pub last_outcome_at: Option<DateTime<Utc>>,
}

impl Overview {
    pub fn new(p: &Progress) -> Self {
        let rate = rate_per_s(p.done_last_minute, p.first_outcome_at, p.now);
        let eta = eta(p.pending, rate);
        Overview {
            campaign_id: p.campaign_id.clone(),
            requested_by: p.requested_by.clone(),
            source: p.source.clone(),
            note: p.note.clone(),
            created_at: p.created_at,
            total: p.request_count,
            done: p.done,
            pending: p.pending,
            replays: p.replays,
            rate_per_s: rate,
            eta_seconds: eta.map(|d| d.as_secs()),
            eta_at: eta
                .and_then(|d| chrono::TimeDelta::from_std(d).ok())
                .and_then(|d| p.now.checked_add_signed(d)),
            first_outcome_at: p.first_outcome_at,
            last_outcome_at: p.last_outcome_at,
        }
    }

    /// Every request the campaign was enqueued with has a final outcome.
    pub fn is_done(&self) -> bool {
        self.pending == Some(0)
    }
}

/// `report --campaign ID`.
#[derive(Debug, Serialize)]
pub struct CampaignReport {
    #[serde(flatten)]
    pub overview: Overview,
    /// Every outcome row of the campaign, replays included.
    pub outcomes: Vec<Count>,
    pub errors: Vec<ErrorCount>,
}

/// Requests done per second over the last minute, measured over the part of
/// that minute the campaign has had outcomes in: a campaign 10 s old with 100
/// done runs at 10/s, not 100/60.
pub fn rate_per_s(
    done_last_minute: i64,
    first_outcome_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> f64 {
    let Some(first) = first_outcome_at else {
        return 0.0;
    };
    let running = (now - first).num_milliseconds() as f64 / 1000.0;
    done_last_minute.max(0) as f64 / running.clamp(1.0, 60.0)
}

/// How long the pending requests take at `rate_per_s`, rounded up to a
/// second: zero when nothing is pending; unknown without a total, or
/// without progress in the last minute.
pub fn eta(pending: Option<i64>, rate_per_s: f64) -> Option<Duration> {
    match pending? {
        p if p <= 0 => Some(Duration::ZERO),
        p if rate_per_s > 0.0 => Duration::try_from_secs_f64((p as f64 / rate_per_s).ceil()).ok(),
        _ => None,
    }
}

/// `report --campaign ID [--watch]` or `report --campaigns`.
pub async fn run(
    args: &ReportArgs,
    database: &DatabaseSettings,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if args.watch && !std::io::stdout().is_terminal() {
        return Err(ConfigError(
            "--watch needs a terminal and standard output is not one: drop --watch for a single report"
                .to_owned(),
        )
        .into());
    }
    let reports = Reports::connect(database).await?;
    let format = args.format();
    let Some(id) = &args.campaign else {
        let list: Vec<Overview> = reports
            .campaigns(RECENT)
            .await?
            .iter()
            .map(Overview::new)
            .collect();
        let text = match format {
            ReportFormat::Json => serde_json::to_string_pretty(&list)? + "\n",
            ReportFormat::Csv => list_csv(&list)?,
            ReportFormat::Table => list_table(&list),
        };
        out.write_all(text.as_bytes())?;
        return Ok(());
    };
    if args.watch {
        return watch(&reports, id, out).await;
    }
    let report = campaign_report(&reports, id).await?;
    let text = match format {
        ReportFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
        ReportFormat::Csv => to_csv(&report)?,
        ReportFormat::Table => to_table(&report),
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}

async fn campaign_report(reports: &Reports, id: &str) -> anyhow::Result<CampaignReport> {
    // Two connections, two queries at once: each reads the campaign's
    // entries alone, and a watch repeats them every 2 s.
    let (progress, errors) = tokio::try_join!(reports.campaign(id), reports.campaign_errors(id))?;
    let Some(progress) = progress else {
        return Err(ConfigError(format!(
            "no campaign {id:?}: no enqueue recorded it and no outcome carries it"
        ))
        .into());
    };
    let by = [
        (Outcome::Succeeded, progress.succeeded),
        (Outcome::FailedPermanent, progress.failed_permanent),
        (
            Outcome::FailedRetriesExhausted,
            progress.failed_retries_exhausted,
        ),
        (Outcome::Rejected, progress.rejected),
    ];
    Ok(CampaignReport {
        overview: Overview::new(&progress),
        outcomes: by
            .iter()
            .map(|(o, n)| Count {
                outcome: o.as_str().to_owned(),
                count: *n,
            })
            .collect(),
        errors,
    })
}

/// Redraw the report until the campaign is done or Ctrl-C.
async fn watch(reports: &Reports, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    loop {
        let report = campaign_report(reports, id).await?;
        // Home the cursor and clear the screen, then draw.
        write!(out, "\x1b[H\x1b[2J{}", to_table(&report))?;
        if report.overview.is_done() {
            writeln!(out, "\nthe campaign is done")?;
            out.flush()?;
            return Ok(());
        }
        writeln!(
            out,
            "\n{} UTC; redrawn every {}s until the campaign is done (Ctrl-C stops)",
            Utc::now().format("%H:%M:%S"),
            REDRAW.as_secs()
        )?;
        out.flush()?;
        tokio::select! {
            () = tokio::time::sleep(REDRAW) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

fn count(n: Option<i64>) -> String {
    n.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
}

fn eta_text(o: &Overview) -> String {
    match (o.eta_seconds, o.eta_at) {
        (Some(0), _) => "done".to_owned(),
        (Some(s), Some(at)) => format!(
            "{} (at {})",
            humantime::format_duration(Duration::from_secs(s)),
            at.format("%H:%M:%S UTC")
        ),
        _ if o.total.is_none() => "unknown (no recorded total)".to_owned(),
        _ => "unknown (nothing done in the last minute)".to_owned(),
    }
}

/// The campaign as `report --campaign ID --format table` prints it.
pub fn to_table(r: &CampaignReport) -> String {
    let o = &r.overview;
    let mut out = format!("campaign {}", o.campaign_id);
    if let Some(source) = &o.source {
        out.push_str(&format!(", from {source}"));
    }
    if let Some(by) = &o.requested_by {
        out.push_str(&format!(", requested by {by}"));
    }
    if o.created_at.is_some() {
        out.push_str(&format!(", created {}", time(o.created_at)));
    }
    out.push('\n');
    if let Some(note) = &o.note {
        out.push_str(&format!("note: {note}\n"));
    }
    let percent = match o.total {
        Some(t) if t > 0 => format!(" ({:.1}%)", 100.0 * o.done as f64 / t as f64),
        _ => String::new(),
    };
    out.push_str(&format!(
        "\ndone {} of {}{percent}, {} pending, {} replays\n",
        o.done,
        count(o.total),
        count(o.pending),
        o.replays
    ));
    out.push_str(&format!(
        "rate {:.1}/s over the last minute, ETA {}\n",
        o.rate_per_s,
        eta_text(o)
    ));
    out.push_str(&format!(
        "outcomes from {} to {}\n\n",
        time(o.first_outcome_at),
        time(o.last_outcome_at)
    ));
    let rows: Vec<Vec<String>> = r
        .outcomes
        .iter()
        .map(|c| vec![c.outcome.clone(), c.count.to_string()])
        .collect();
    out.push_str(&table(&["outcome", "requests"], &rows));
    if !r.errors.is_empty() {
        out.push('\n');
        out.push_str(&errors_table(&r.errors));
    }
    out
}

fn to_csv(r: &CampaignReport) -> anyhow::Result<String> {
    let o = &r.overview;
    let opt = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    let mut rows: Vec<[String; 4]> = vec![
        [
            "campaign".into(),
            "total".into(),
            o.campaign_id.clone(),
            opt(o.total),
        ],
        [
            "campaign".into(),
            "done".into(),
            String::new(),
            o.done.to_string(),
        ],
        [
            "campaign".into(),
            "pending".into(),
            String::new(),
            opt(o.pending),
        ],
        [
            "campaign".into(),
            "replays".into(),
            String::new(),
            o.replays.to_string(),
        ],
    ];
    for c in &r.outcomes {
        rows.push([
            "outcome".into(),
            c.outcome.clone(),
            String::new(),
            c.count.to_string(),
        ]);
    }
    rows.extend(r.errors.iter().map(error_csv_row));
    let at = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
    rows.push([
        "rate".into(),
        "per_s".into(),
        String::new(),
        format!("{:.3}", o.rate_per_s),
    ]);
    rows.push([
        "eta".into(),
        "seconds".into(),
        at(o.eta_at),
        o.eta_seconds.map(|s| s.to_string()).unwrap_or_default(),
    ]);
    rows.push([
        "time".into(),
        "first_outcome_at".into(),
        at(o.first_outcome_at),
        String::new(),
    ]);
    rows.push([
        "time".into(),
        "last_outcome_at".into(),
        at(o.last_outcome_at),
        String::new(),
    ]);
    write_csv(["section", "key", "detail", "count"], rows)
}

const LIST_COLUMNS: [&str; 11] = [
    "campaign_id",
    "created_at",
    "requested_by",
    "source",
    "total",
    "done",
    "pending",
    "replays",
    "rate_per_s",
    "eta_seconds",
    "last_outcome_at",
];

fn list_row(o: &Overview) -> [String; 11] {
    let opt = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    let at = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
    [
        o.campaign_id.clone(),
        at(o.created_at),
        o.requested_by.clone().unwrap_or_default(),
        o.source.clone().unwrap_or_default(),
        opt(o.total),
        o.done.to_string(),
        opt(o.pending),
        o.replays.to_string(),
        format!("{:.3}", o.rate_per_s),
        o.eta_seconds.map(|s| s.to_string()).unwrap_or_default(),
        at(o.last_outcome_at),
    ]
}

fn list_csv(list: &[Overview]) -> anyhow::Result<String> {
    write_csv(LIST_COLUMNS, list.iter().map(list_row))
}

fn write_csv<const N: usize>(
    header: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> anyhow::Result<String> {
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record(header).map_err(csv_error)?;
    for row in rows {
        csv.write_record(&row).map_err(csv_error)?;
    }
    let bytes = csv
        .into_inner()
        .map_err(|e| anyhow::anyhow!("cannot write CSV: {e}"))?;
    Ok(String::from_utf8(bytes)?)
}

fn list_table(list: &[Overview]) -> String {
    if list.is_empty() {
        return "no campaigns recorded yet (enqueue records one)\n".to_owned();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|o| {
            vec![
                o.campaign_id.clone(),
                o.created_at
                    .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
                o.requested_by.clone().unwrap_or_else(|| "-".into()),
                format!("{}/{}", o.done, count(o.total)),
                count(o.pending),
                format!("{:.1}", o.rate_per_s),
                time(o.last_outcome_at),
            ]
        })
        .collect();
    table(
        &[
            "campaign",
            "created",
            "requested_by",
            "done",
            "pending",
            "rate/s",
            "last outcome",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("a valid time")
    }

    #[test]
    fn the_rate_is_measured_over_the_part_of_the_minute_the_campaign_ran() {
        // 10 s in, 100 done: 10/s, not 100/60.
        assert_eq!(rate_per_s(100, Some(at(0)), at(10)), 10.0);
        // Running for an hour: the last minute's count over 60 s.
        assert_eq!(rate_per_s(600, Some(at(0)), at(3600)), 10.0);
        // Under a second in: counted over one second, not divided by ~0.
        assert_eq!(rate_per_s(5, Some(at(0)), at(0)), 5.0);
        // A first outcome "after" now (clock skew) is the same.
        assert_eq!(rate_per_s(5, Some(at(3)), at(0)), 5.0);
        // No outcome yet, or none in the last minute: no rate.
        assert_eq!(rate_per_s(0, None, at(0)), 0.0);
        assert_eq!(rate_per_s(0, Some(at(0)), at(3600)), 0.0);
    }

    #[test]
    fn the_eta_is_pending_over_the_rate_rounded_up() {
        assert_eq!(eta(Some(200), 25.0), Some(Duration::from_secs(8)));
        assert_eq!(
            eta(Some(10), 3.0),
            Some(Duration::from_secs(4)),
            "3.33 s → 4 s"
        );
        assert_eq!(
            eta(Some(0), 0.0),
            Some(Duration::ZERO),
            "done needs no rate"
        );
        assert_eq!(eta(Some(5), 0.0), None, "no progress: unknown, not forever");
        assert_eq!(eta(None, 10.0), None, "no recorded total: unknown");
    }

    #[test]
    fn the_overview_says_done_only_when_nothing_is_pending() {
        let progress = Progress {
            campaign_id: "c".into(),
            requested_by: None,
            source: None,
            note: None,
            created_at: Some(at(0)),
            request_count: Some(1000),
            done: 800,
            pending: Some(200),
            succeeded: 790,
            failed_permanent: 10,
            failed_retries_exhausted: 0,
            rejected: 0,
            replays: 0,
            done_last_minute: 1500,
            first_outcome_at: Some(at(0)),
            last_outcome_at: Some(at(100)),
            now: at(100),
        };
        let o = Overview::new(&progress);
        assert_eq!(o.rate_per_s, 25.0);
        assert_eq!(o.eta_seconds, Some(8));
        assert_eq!(o.eta_at, Some(at(108)));
        assert!(!o.is_done());
        let finished = Overview::new(&Progress {
            done: 1000,
            pending: Some(0),
            ..progress.clone()
        });
        assert!(finished.is_done());
        assert_eq!(finished.eta_seconds, Some(0));
        let unrecorded = Overview::new(&Progress {
            request_count: None,
            pending: None,
            ..progress
        });
        assert!(!unrecorded.is_done(), "without a total it is never done");
    }
}
