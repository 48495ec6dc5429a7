//! `aom-terminator dead-letters list|replay`: what is in the dead-letter
//! queue and why, and sending chosen requests again, each with a fresh
//! request_id linked to the original (`replay_of`) so the audit keeps both.

use super::output::note;
use crate::broker::Admin;
use crate::domain::{Item, Letter, ParsedMessage, WireRequest};
use crate::settings::{AmqpSettings, BrokerArgs, ConfigError};
use clap::{Args, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};

#[derive(Debug, Clone, Args)]
pub struct DeadLettersArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Action {
    /// Show the dead letters and why each is there (they stay in the queue).
    ///
    /// Tab-separated columns under a header line (`--format text`), or one
    /// JSON object a line. On a terminal a last line on stderr counts them.
    #[command(after_help = "\
Examples:
  aom-terminator dead-letters list | head -5
  aom-terminator dead-letters list --format json | jq -r .request_id
  aom-terminator dead-letters list | cut -f1 | sort | uniq -c")]
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Send dead-lettered requests back to the request queue with a fresh
    /// request_id and `replay_of` set to the original.
    ///
    /// Prints one line per request replayed (stdout) and a summary (stderr).
    #[command(after_help = "\
Examples:
  aom-terminator dead-letters replay --reason failed-retries-exhausted --dry-run
  aom-terminator dead-letters replay --workflow wf-nightly --limit 100
  aom-terminator dead-letters replay --campaign enq-1a650e7ba8eb65e1
  aom-terminator dead-letters replay --all > replayed.txt")]
    Replay {
        /// Every request whose retries ran out.
        #[arg(long, group = "choice")]
        all: bool,
        /// Only letters with this reason.
        #[arg(long, group = "choice")]
        reason: Option<Reason>,
        /// Only requests of this workflow.
        #[arg(long, group = "choice")]
        workflow: Option<String>,
        /// Only requests of this campaign (they keep its campaign_id).
        #[arg(long, group = "choice")]
        campaign: Option<String>,
        /// Replay at most this many.
        #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
        limit: usize,
        /// Show what would be replayed; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reason {
    FailedRetriesExhausted,
    Rejected,
}

/// Run the chosen action, writing its data to `out`.
pub async fn run(args: DeadLettersArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let settings = args.broker.settings()?;
    let admin = Admin::open(&settings).await?;
    let result = match args.action {
        Action::List { limit, format } => {
            list(&admin, &settings.dead_letter_queue, limit, format, out).await
        }
        Action::Replay {
            all,
            reason,
            workflow,
            campaign,
            limit,
            dry_run,
        } => {
            if !all && reason.is_none() && workflow.is_none() && campaign.is_none() {
                admin.close().await;
                return Err(ConfigError(
                    "choose what to replay: --all, --reason, --workflow or --campaign".to_owned(),
                )
                .into());
            }
            if reason == Some(Reason::Rejected) {
                admin.close().await;
                return Err(ConfigError(
                    "rejected messages cannot be replayed as they are: fix them and publish them again".to_owned(),
                )
                .into());
            }
            let filter = Filter { workflow, campaign };
            replay(&admin, &settings, &filter, limit, dry_run, out).await
        }
    };
    // Letters taken and not acked go back to the queue here.
    admin.close().await;
    result
}

async fn list(
    admin: &Admin,
    queue: &str,
    limit: usize,
    format: Format,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(taken) = admin.take(queue).await? else {
            break;
        };
        letters.push(Letter::describe(&taken.headers, &taken.body));
    }
    match format {
        Format::Json => {
            for l in &letters {
                writeln!(out, "{}", serde_json::to_string(l)?)?;
            }
        }
        Format::Text => {
            writeln!(
                out,
                "reason\trequest_id\tworkflow_id\texecution_id\thttp_status\terror_code\terror\tdead_lettered_at"
            )?;
            for l in &letters {
                let c = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    l.reason,
                    c(&l.request_id),
                    c(&l.workflow_id),
                    c(&l.execution_id),
                    c(&l.http_status),
                    c(&l.error_code),
                    c(&l.error).replace(['\t', '\n'], " "),
                    c(&l.dead_lettered_at),
                )?;
            }
            // A footer for the person reading the table. When the table goes
            // to a pipe or a file, stderr stays quiet: `list | head -1` prints
            // one line and nothing else.
            out.flush()?;
            if std::io::stdout().is_terminal() {
                note!(
                    "{} dead letter(s) shown; they stay in {queue}",
                    letters.len()
                );
            }
        }
    }
    Ok(())
}

struct Filter {
    workflow: Option<String>,
    campaign: Option<String>,
}

async fn replay(
    admin: &Admin,
    settings: &AmqpSettings,
    filter: &Filter,
    limit: usize,
    dry_run: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let started = chrono::Utc::now();
    let stamp = started.format("%Y%m%dT%H%M%S%3fZ").to_string();
    let (mut replayed, mut kept) = (0usize, BTreeMap::<String, usize>::new());
    let mut keep = |why: &str| *kept.entry(why.to_owned()).or_default() += 1;
    while replayed < limit {
        let Some(taken) = admin.take(&settings.dead_letter_queue).await? else {
            break;
        };
        let letter = Letter::describe(&taken.headers, &taken.body);
        if !letter.is_exhausted() {
            keep(&letter.reason);
            continue;
        }
        // A replay that fails again comes back to this queue while the loop
        // still reads it; taken again, it would be replayed again and again.
        if dead_lettered_since(&letter, started) {
            keep("dead-lettered during this replay");
            continue;
        }
        if filter.workflow.is_some() && letter.workflow_id != filter.workflow {
            keep("other workflow");
            continue;
        }
        if filter.campaign.is_some() && letter.campaign_id != filter.campaign {
            keep("other campaign");
            continue;
        }
        let Some(body) = replay_body(&taken.body, &stamp) else {
            keep("unreadable body");
            continue;
        };
        if dry_run {
            writeln!(
                out,
                "would replay {}",
                letter.request_id.as_deref().unwrap_or("-")
            )?;
        } else {
            admin.publish(&settings.queue, &body).await?;
            taken.ack().await?;
            writeln!(
                out,
                "replayed {}",
                letter.request_id.as_deref().unwrap_or("-")
            )?;
        }
        // Each line as it happens (a replay waits for the broker's confirm
        // anyway); a reader that went away stops the replay here.
        out.flush()?;
        replayed += 1;
    }
    let verb = if dry_run { "would replay" } else { "replayed" };
    let kept: Vec<String> = kept.iter().map(|(why, n)| format!("{n} {why}")).collect();
    note!(
        "{verb} {replayed} request(s) to {}; kept in {}: {}",
        settings.queue,
        settings.dead_letter_queue,
        if kept.is_empty() {
            "none".to_owned()
        } else {
            kept.join(", ")
        }
    );
    Ok(())
}

/// Whether `letter` went to the dead-letter queue at or after `started`.
fn dead_lettered_since(letter: &Letter, started: chrono::DateTime<chrono::Utc>) -> bool {
    letter
        .dead_lettered_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| t >= started)
}

/// The dead letter's request with a fresh request_id and `replay_of` set
/// to the original's; `None` if the body is not one valid request.
fn replay_body(body: &[u8], stamp: &str) -> Option<Vec<u8>> {
    let ParsedMessage::Requests(mut items) = ParsedMessage::parse(body, None) else {
        return None;
    };
    let (1, Item::Valid(mut request)) = (items.len(), items.pop()?) else {
        return None;
    };
    let original = std::mem::take(&mut request.request_id);
    request.request_id = format!("{original}:replay:{stamp}");
    request.replay_of = Some(original);
    Some(WireRequest::from(&request).to_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_dead_lettered_during_the_replay_are_not_taken_again() {
        let started = chrono::Utc::now();
        let letter = |at: Option<String>| Letter {
            reason: "failed_retries_exhausted".to_owned(),
            request_id: None,
            workflow_id: None,
            execution_id: None,
            campaign_id: None,
            http_status: None,
            error_code: None,
            error: None,
            dead_lettered_at: at,
            source_message_id: None,
        };
        let before = started - chrono::TimeDelta::seconds(5);
        let after = started + chrono::TimeDelta::milliseconds(5);
        assert!(!dead_lettered_since(
            &letter(Some(before.to_rfc3339())),
            started
        ));
        assert!(dead_lettered_since(
            &letter(Some(after.to_rfc3339())),
            started
        ));
        assert!(
            !dead_lettered_since(&letter(None), started),
            "unknown: replayable"
        );
        assert!(!dead_lettered_since(&letter(Some("junk".into())), started));
    }

    #[test]
    fn a_replay_is_a_new_request_linked_to_the_original_in_its_campaign() {
        let body = br#"{"request_id":"r1","project_id":"0123456789abcdef0123456789abcdef","workflow_id":"w","execution_id":"e","reason":"x","campaign_id":"c-1"}"#;
        let replayed = replay_body(body, "20261201T000000000Z").expect("replayable");
        let ParsedMessage::Requests(items) = ParsedMessage::parse(&replayed, None) else {
            panic!("unreadable replay")
        };
        let [Item::Valid(r)] = items.as_slice() else {
            panic!("{items:?}")
        };
        assert_eq!(r.request_id, "r1:replay:20261201T000000000Z");
        assert_eq!(r.replay_of.as_deref(), Some("r1"));
        assert_eq!(r.reason.as_deref(), Some("x"));
        assert_eq!(
            r.campaign_id.as_deref(),
            Some("c-1"),
            "a replay stays in its campaign"
        );
        assert_eq!(replay_body(b"junk", "t"), None);
    }
}
