//! `aom-terminator dead-letters list|replay`: what is in the dead-letter
//! queue and why, and sending chosen requests again, each with a fresh
//! request_id linked to the original (`replay_of`) so the audit keeps both.

use crate::broker::{Admin, Taken};
use crate::config::{BrokerArgs, ConfigError};
use clap::{Args, Subcommand, ValueEnum};
use std::collections::BTreeMap;

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
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Send dead-lettered requests back to the request queue with a fresh
    /// request_id and `replay_of` set to the original.
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

/// One dead letter, described from its headers (and body).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Letter {
    /// `failed_retries_exhausted`, `rejected`, or `broker:<reason>` for a
    /// message the broker dead-lettered itself (its delivery limit).
    pub reason: String,
    pub request_id: Option<String>,
    pub workflow_id: Option<String>,
    pub execution_id: Option<String>,
    pub http_status: Option<String>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub dead_lettered_at: Option<String>,
    pub source_message_id: Option<String>,
}

impl Letter {
    pub fn describe(headers: &BTreeMap<String, String>, body: &[u8]) -> Letter {
        let h = |k: &str| headers.get(k).cloned();
        let reason = match (h("x-aom-outcome"), h("x-first-death-reason")) {
            (Some(outcome), _) => outcome,
            (None, Some(broker)) => format!("broker:{broker}"),
            (None, None) => "unknown".to_owned(),
        };
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let field = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        Letter {
            reason,
            request_id: h("x-aom-request-id").or_else(|| field("request_id")),
            workflow_id: field("workflow_id"),
            execution_id: field("execution_id"),
            http_status: h("x-aom-http-status"),
            error_code: h("x-aom-error-code"),
            error: h("x-aom-error-msg")
                .or_else(|| h("x-aom-error"))
                .or_else(|| h("x-aom-rejections")),
            dead_lettered_at: h("x-aom-dead-lettered-at"),
            source_message_id: h("x-aom-source-message-id"),
        }
    }
}

pub async fn run(args: DeadLettersArgs) -> anyhow::Result<()> {
    let settings = args.broker.settings()?;
    let admin = Admin::open(&settings).await?;
    let result = match args.action {
        Action::List { limit, format } => {
            list(&admin, &settings.dead_letter_queue, limit, format).await
        }
        Action::Replay {
            all,
            reason,
            workflow,
            limit,
            dry_run,
        } => {
            if !all && reason.is_none() && workflow.is_none() {
                admin.close().await;
                return Err(ConfigError(
                    "choose what to replay: --all, --reason or --workflow".to_owned(),
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
            let filter = Filter { workflow };
            replay(&admin, &settings, &filter, limit, dry_run).await
        }
    };
    // Letters taken and not acked go back to the queue here.
    admin.close().await;
    result
}

async fn list(admin: &Admin, queue: &str, limit: usize, format: Format) -> anyhow::Result<()> {
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
                println!("{}", serde_json::to_string(l)?);
            }
        }
        Format::Text => {
            println!(
                "reason\trequest_id\tworkflow_id\texecution_id\thttp_status\terror_code\terror\tdead_lettered_at"
            );
            for l in &letters {
                let c = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    l.reason,
                    c(&l.request_id),
                    c(&l.workflow_id),
                    c(&l.execution_id),
                    c(&l.http_status),
                    c(&l.error_code),
                    c(&l.error).replace(['\t', '\n'], " "),
                    c(&l.dead_lettered_at),
                );
            }
            eprintln!(
                "{} dead letter(s) shown; they stay in {queue}",
                letters.len()
            );
        }
    }
    Ok(())
}

struct Filter {
    workflow: Option<String>,
}

async fn replay(
    admin: &Admin,
    settings: &crate::config::AmqpSettings,
    filter: &Filter,
    limit: usize,
    dry_run: bool,
) -> anyhow::Result<()> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%3fZ").to_string();
    let (mut replayed, mut kept) = (0usize, BTreeMap::<String, usize>::new());
    let mut keep = |why: &str| *kept.entry(why.to_owned()).or_default() += 1;
    while replayed < limit {
        let Some(taken) = admin.take(&settings.dead_letter_queue).await? else {
            break;
        };
        let letter = Letter::describe(&taken.headers, &taken.body);
        if letter.reason != "failed_retries_exhausted" {
            keep(&letter.reason);
            continue;
        }
        if filter.workflow.is_some() && letter.workflow_id != filter.workflow {
            keep("other workflow");
            continue;
        }
        let Some(body) = replay_body(&taken, &stamp) else {
            keep("unreadable body");
            continue;
        };
        if dry_run {
            println!(
                "would replay {}",
                letter.request_id.as_deref().unwrap_or("-")
            );
        } else {
            admin.publish(&settings.queue, body.as_bytes()).await?;
            taken.ack().await?;
            println!("replayed {}", letter.request_id.as_deref().unwrap_or("-"));
        }
        replayed += 1;
    }
    let verb = if dry_run { "would replay" } else { "replayed" };
    let kept: Vec<String> = kept.iter().map(|(why, n)| format!("{n} {why}")).collect();
    eprintln!(
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

/// The dead letter's request with a fresh request_id and `replay_of`.
fn replay_body(taken: &Taken, stamp: &str) -> Option<String> {
    let mut json: serde_json::Value = serde_json::from_slice(&taken.body).ok()?;
    let obj = json.as_object_mut()?;
    let original = obj.get("request_id")?.as_str()?.to_owned();
    obj.insert(
        "request_id".to_owned(),
        serde_json::Value::String(format!("{original}:replay:{stamp}")),
    );
    obj.insert("replay_of".to_owned(), serde_json::Value::String(original));
    Some(json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_say_why_they_are_there() {
        let mut h = BTreeMap::new();
        h.insert(
            "x-aom-outcome".to_owned(),
            "failed_retries_exhausted".to_owned(),
        );
        h.insert("x-aom-http-status".to_owned(), "500".to_owned());
        let body = br#"{"request_id":"r1","workflow_id":"w","execution_id":"e"}"#;
        let l = Letter::describe(&h, body);
        assert_eq!(l.reason, "failed_retries_exhausted");
        assert_eq!(l.request_id.as_deref(), Some("r1"));
        assert_eq!(l.workflow_id.as_deref(), Some("w"));
        assert_eq!(l.http_status.as_deref(), Some("500"));

        let mut h = BTreeMap::new();
        h.insert(
            "x-first-death-reason".to_owned(),
            "delivery_limit".to_owned(),
        );
        assert_eq!(
            Letter::describe(&h, b"junk").reason,
            "broker:delivery_limit"
        );
    }
}
