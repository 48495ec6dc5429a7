//! `aom-terminator audit prune`: remove audit rows older than a cut, keeping
//! the totals (the rollups keep the pruned rows' counts).
//!
//! A pruned request_id can no longer be deduplicated: a message for it that
//! arrives later is sent to the API again. So a cut must leave a margin over
//! the oldest message still in the request queue: a message published at
//! time P may repeat a request finished shortly before P, whose outcome must
//! still be there when the message is consumed.

use crate::audit::prune::Pruned;
use crate::audit::report::Reports;
use crate::broker::Admin;
use crate::settings::{BrokerArgs, ConfigError, DatabaseArgs};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use clap::{Args, Subcommand};
use std::io::Write;
use std::time::Duration;

/// `aom-terminator audit`: the audit's upkeep.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub action: AuditAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditAction {
    /// Remove attempts and outcomes older than a cut, in batches; the
    /// report's totals and quantiles stay as they were.
    ///
    /// Refuses (exit 2) a cut closer than --safety-margin plus the age of the
    /// oldest message in the request queue: a pruned request_id can no longer
    /// be deduplicated.
    #[command(after_help = "\
Examples:
  aom-terminator audit prune --older-than 180d --dry-run
  aom-terminator audit prune --older-than 180d
  aom-terminator audit prune --older-than 30d --safety-margin 14d")]
    Prune(Box<PruneArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Remove attempts and outcomes older than this (`180d`); the cut is
    /// rounded down to the hour.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Duration,
    /// Count what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Refuse a cut closer than this margin plus the age of the oldest
    /// message in the request queue.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub safety_margin: Duration,
    /// The age of the oldest message in the request queue, when the queue
    /// cannot tell (its head message carries no timestamp).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub oldest_message_age: Option<Duration>,
    /// Rows per delete statement.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
}

/// How a prune ended.
pub enum PruneEnd {
    Done,
    /// The cut is too close to the queue's oldest message, or that age
    /// cannot be told: why, in one line.
    Refused(String),
}

pub async fn run(args: PruneArgs, out: &mut impl Write) -> anyhow::Result<PruneEnd> {
    let database = args.database.settings()?;
    let broker = args.broker.settings()?;
    let older_than = TimeDelta::from_std(args.older_than)
        .map_err(|_| ConfigError("--older-than is too long".to_owned()))?;
    let now = Utc::now();
    let cut = (now - older_than)
        .duration_trunc(TimeDelta::hours(1))
        .map_err(|e| ConfigError(format!("--older-than: {e}")))?;
    let oldest = match args.oldest_message_age {
        Some(age) => age,
        None => match oldest_message_age(&broker, now).await {
            Ok(age) => age,
            Err(why) => return Ok(PruneEnd::Refused(why)),
        },
    };
    if let Some(why) = too_close(args.older_than, oldest, args.safety_margin) {
        return Ok(PruneEnd::Refused(why));
    }
    let reports = Reports::connect(&database).await?;
    let cut_text = cut.format("%Y-%m-%d %H:%M UTC");
    if args.dry_run {
        let n = reports.count_older(cut).await?;
        writeln!(out, "would remove, older than {cut_text}: {}", counts(&n))?;
    } else {
        let n = reports.prune(cut, args.batch_size).await?;
        writeln!(out, "removed, older than {cut_text}: {}", counts(&n))?;
    }
    Ok(PruneEnd::Done)
}

fn counts(n: &Pruned) -> String {
    format!(
        "{} outcomes, {} attempts, {} history rows",
        n.outcomes, n.attempts, n.history
    )
}

/// Why a cut `older_than` ago is refused, if it is: it must be at least the
/// oldest message's age plus the margin.
fn too_close(older_than: Duration, oldest: Duration, margin: Duration) -> Option<String> {
    let needed = oldest.saturating_add(margin);
    (older_than < needed).then(|| {
        let round = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs()));
        format!(
            "refusing to prune: --older-than {} is shorter than the oldest queued message's \
             age ({}) plus --safety-margin {}: requests pruned now could no longer be \
             deduplicated",
            round(older_than),
            round(oldest),
            round(margin)
        )
    })
}

/// The age of the oldest ready message in the request queue (zero when it is
/// empty), from its `timestamp` property. Taking the head message and closing
/// the channel puts it back where it was; in a quorum queue that counts as a
/// delivery towards DELIVERY_LIMIT.
async fn oldest_message_age(
    broker: &crate::settings::AmqpSettings,
    now: DateTime<Utc>,
) -> Result<Duration, String> {
    let queue = &broker.queue;
    let admin = Admin::open(broker).await.map_err(|e| {
        format!(
            "refusing to prune: cannot reach the broker to tell the age of the oldest message \
             in {queue} ({}); pass --oldest-message-age if you know it",
            crate::telemetry::cause_chain(&e)
        )
    })?;
    let taken = admin.take(queue).await;
    admin.close().await;
    let head = taken.map_err(|e| {
        format!(
            "refusing to prune: cannot read the head of {queue} ({}); pass \
             --oldest-message-age if you know it",
            crate::telemetry::cause_chain(&e)
        )
    })?;
    let Some(head) = head else {
        return Ok(Duration::ZERO);
    };
    let Some(published) = head.timestamp else {
        return Err(format!(
            "refusing to prune: the oldest message in {queue} carries no timestamp, so its age \
             is unknown; pass --oldest-message-age if you know it"
        ));
    };
    let published =
        DateTime::<Utc>::from_timestamp(i64::try_from(published).unwrap_or(0), 0).unwrap_or(now);
    Ok((now - published).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_cut_needs_the_margin_over_the_oldest_message() {
        assert!(too_close(180 * DAY, Duration::ZERO, 7 * DAY).is_none());
        assert!(too_close(7 * DAY, Duration::ZERO, 7 * DAY).is_none());
        let why = too_close(6 * DAY, Duration::ZERO, 7 * DAY).expect("refused");
        assert!(why.contains("--safety-margin 7days"), "{why}");
        // A message queued 10 days ago needs 17 days.
        assert!(too_close(16 * DAY, 10 * DAY, 7 * DAY).is_some());
        assert!(too_close(17 * DAY, 10 * DAY, 7 * DAY).is_none());
    }
}
