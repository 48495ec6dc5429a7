//! `aom-terminator enqueue [FILE]`: start a mass cancellation from a CSV or
//! JSON Lines file (or standard input). Every line is checked with the
//! daemon's own parser first; nothing is published while any line is bad
//! (unless `--skip-invalid`); then batch messages go out with publisher
//! confirms and the mandatory flag, so nothing is silently dropped.
//!
//! Each enqueue is part of a campaign (`--campaign NAME`, or one named after
//! the input's hash): every request carries its `campaign_id`, and the
//! campaign is recorded in the audit database before the first publish.

use super::output::{Progress, note};
use crate::audit::campaigns::{self, CampaignError, NewCampaign};
use crate::broker::{Admin, BrokerError};
use crate::domain::{Item, MAX_BATCH, ParsedMessage, TerminationRequest, WireRequest, batch_body};
use crate::settings::{BrokerArgs, ConfigError, DatabaseArgs};
use crate::telemetry::cause_chain;
use clap::{Args, ValueEnum};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Where the campaign is recorded (`termination_campaigns`).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// CSV or JSON Lines file; `-` (the default) reads standard input.
    #[arg(default_value = "-")]
    pub file: PathBuf,
    /// Input format; by default from the file's extension (.csv, .jsonl, .ndjson).
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// Publish the valid lines even if some are bad (the bad ones are reported).
    #[arg(long)]
    pub skip_invalid: bool,
    /// Check every line and publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// `requested_by` for lines that do not set it (default: the login name).
    #[arg(long, env = "AOM_REQUESTED_BY")]
    pub requested_by: Option<String>,
    /// Requests per message.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..=MAX_BATCH as i64))]
    pub batch_size: u32,
    /// The campaign these requests belong to (default: `enq-<hash of the
    /// input>`, so the same file is the same campaign).
    #[arg(long, value_parser = campaign_name)]
    pub campaign: Option<String>,
    /// A free-text note recorded with the campaign.
    #[arg(long)]
    pub note: Option<String>,
}

/// How long recording the campaign may take before the publish goes ahead
/// without it.
const RECORD_LIMIT: Duration = Duration::from_secs(10);

/// Longest `--campaign` name.
const MAX_CAMPAIGN: usize = 128;

/// `--campaign`: 1..128 characters, no control characters, no blanks at
/// either end (it is typed again in `report --campaign`).
fn campaign_name(s: &str) -> Result<String, String> {
    let n = s.chars().count();
    if !(1..=MAX_CAMPAIGN).contains(&n) {
        return Err(format!(
            "a campaign name is 1..{MAX_CAMPAIGN} characters, got {n}"
        ));
    }
    if s.chars().any(char::is_control) || s.trim() != s {
        return Err(
            "a campaign name has no control characters and no blanks at either end".to_owned(),
        );
    }
    Ok(s.to_owned())
}

/// Requests per message unless `--batch-size` says otherwise.
pub const DEFAULT_BATCH_SIZE: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormat {
    Csv,
    Jsonl,
}

/// What `enqueue` ended with, for the exit code.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Everything valid was published (or would be, with --dry-run).
    Published,
    /// Bad lines, nothing published.
    Refused,
}

/// A line that cannot be a request, by its line number in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub error: String,
}

const CSV_COLUMNS: [&str; 6] = [
    "project_id",
    "workflow_id",
    "execution_id",
    "reason",
    "request_id",
    "requested_by",
];

/// The SHA-256 of an input, in hex. The campaign records each input by it.
pub fn input_sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `enq-<first 16 hex digits of the input's SHA-256>`: the prefix of the
/// input's derived request ids, and the campaign of an enqueue without
/// `--campaign`. Re-enqueueing the same file is the same campaign.
pub fn derived_campaign_id(text: &str) -> String {
    format!("enq-{}", &input_sha256(text)[..16])
}

/// Parse the whole input. Lines without a request_id get
/// `enq-<hash of the input>-<line>`: enqueueing the same file twice makes
/// the same ids, which the daemon skips rather than sends twice.
pub fn parse_input(
    text: &str,
    format: InputFormat,
    default_requested_by: &str,
) -> Result<(Vec<TerminationRequest>, Vec<BadLine>), ConfigError> {
    let source = derived_campaign_id(text);
    let lines = match format {
        InputFormat::Jsonl => jsonl_objects(text),
        InputFormat::Csv => csv_objects(text)?,
    };
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (line, object) in lines {
        let mut object = match object {
            Ok(o) => o,
            Err(error) => {
                bad.push(BadLine { line, error });
                continue;
            }
        };
        object
            .entry("request_id")
            .or_insert_with(|| format!("{source}-{line}").into());
        object
            .entry("requested_by")
            .or_insert_with(|| default_requested_by.into());
        let body = serde_json::Value::Object(object).to_string();
        match ParsedMessage::parse(body.as_bytes(), None) {
            ParsedMessage::Requests(mut items) if items.len() == 1 => match items.remove(0) {
                Item::Valid(r) => good.push(r),
                Item::Invalid(r) => bad.push(BadLine {
                    line,
                    error: r.error,
                }),
            },
            ParsedMessage::Requests(_) => bad.push(BadLine {
                line,
                error: "a line holds one request, not a batch".to_owned(),
            }),
            ParsedMessage::Unreadable(r) => bad.push(BadLine {
                line,
                error: r.error,
            }),
        }
    }
    Ok((good, bad))
}

type Object = serde_json::Map<String, serde_json::Value>;
/// Each input line's number and its fields (or why it has none).
type Lines = Vec<(usize, Result<Object, String>)>;

fn jsonl_objects(text: &str) -> Lines {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let parsed = match serde_json::from_str::<serde_json::Value>(l) {
                Ok(serde_json::Value::Object(o)) => Ok(o),
                Ok(_) => Err("a line must be a JSON object".to_owned()),
                Err(e) => Err(format!("not JSON: {e}")),
            };
            (i + 1, parsed)
        })
        .collect()
}

fn csv_objects(text: &str) -> Result<Lines, ConfigError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| ConfigError(format!("line 1: cannot read the CSV header: {e}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    for (i, name) in header.iter().enumerate() {
        if !CSV_COLUMNS.contains(&name.as_str()) {
            return Err(ConfigError(format!(
                "line 1: unknown column \"{name}\" (expected {})",
                CSV_COLUMNS.join(",")
            )));
        }
        if header[..i].contains(name) {
            return Err(ConfigError(format!(
                "line 1: column \"{name}\" appears twice"
            )));
        }
    }
    for required in &CSV_COLUMNS[..3] {
        if !header.iter().any(|h| h == required) {
            return Err(ConfigError(format!(
                "line 1: the header has no \"{required}\" column"
            )));
        }
    }
    let mut out = Vec::new();
    for record in reader.records() {
        match record {
            Ok(r) => {
                let line = r.position().map_or(0, |p| p.line() as usize);
                if r.iter().all(str::is_empty) {
                    continue;
                }
                if r.len() != header.len() {
                    out.push((
                        line,
                        Err(format!(
                            "{} fields, the header has {}",
                            r.len(),
                            header.len()
                        )),
                    ));
                    continue;
                }
                let object: Object = header
                    .iter()
                    .zip(r.iter())
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.to_owned())))
                    .collect();
                out.push((line, Ok(object)));
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                out.push((line, Err(format!("not valid CSV: {e}"))));
            }
        }
    }
    Ok(out)
}

fn login_name() -> String {
    ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

pub async fn run(args: EnqueueArgs) -> anyhow::Result<Enqueued> {
    let stdin = args.file.as_os_str() == "-";
    let format = match (args.format, args.file.extension().and_then(|e| e.to_str())) {
        (Some(f), _) => f,
        (None, Some("csv")) => InputFormat::Csv,
        (None, Some("jsonl" | "ndjson")) => InputFormat::Jsonl,
        _ if stdin => {
            return Err(
                ConfigError("reading standard input needs --format csv|jsonl".to_owned()).into(),
            );
        }
        _ => {
            return Err(ConfigError(format!(
                "cannot tell the format of {} from its extension: pass --format csv|jsonl",
                args.file.display()
            ))
            .into());
        }
    };
    let settings = args.broker.settings()?;
    let database = args.database.settings()?;
    let mut text = String::new();
    if stdin {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(&args.file)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", args.file.display())))?;
    }
    let requested_by = args.requested_by.clone().unwrap_or_else(login_name);
    let (mut requests, bad) = parse_input(&text, format, &requested_by)?;
    let campaign = args
        .campaign
        .clone()
        .unwrap_or_else(|| derived_campaign_id(&text));
    // The enqueue's campaign is every request's, whatever a line said.
    for r in &mut requests {
        r.campaign_id = Some(campaign.clone());
    }
    for b in bad.iter().take(100) {
        note!("line {}: {}", b.line, b.error);
    }
    if bad.len() > 100 {
        note!("... and {} more bad lines", bad.len() - 100);
    }
    if !bad.is_empty() && !args.skip_invalid {
        note!(
            "{} bad line(s), {} good: nothing published (fix them, or pass --skip-invalid)",
            bad.len(),
            requests.len()
        );
        return Ok(Enqueued::Refused);
    }
    if args.dry_run {
        note!(
            "dry run: {} request(s) valid, {} bad line(s) skipped, campaign {campaign}; nothing published",
            requests.len(),
            bad.len()
        );
        return Ok(Enqueued::Published);
    }
    let started = Instant::now();
    // The broker first: a campaign is recorded only when its requests can go out.
    let admin = Admin::open(&settings).await?;
    if !requests.is_empty() {
        let source = if stdin {
            "stdin".to_owned()
        } else {
            args.file.display().to_string()
        };
        let new = NewCampaign {
            id: &campaign,
            requested_by: &requested_by,
            source: &source,
            input_sha256: &input_sha256(&text),
            request_count: requests.len() as i64,
            note: args.note.as_deref(),
        };
        if let Err(e) = record_campaign(&database, &new).await {
            admin.close().await;
            return Err(e.into());
        }
    }
    let mut progress = Progress::new(requests.len(), "published");
    let result = publish_batches(
        &admin,
        &settings.queue,
        &requests,
        args.batch_size as usize,
        |published| progress.update(published),
    )
    .await;
    admin.close().await;
    progress.finish();
    let messages = result?;
    let published = requests.len();
    let secs = started.elapsed().as_secs_f64();
    note!(
        "published {published} request(s) in {messages} message(s) to {} in {secs:.1}s ({:.0}/s), campaign {campaign}{}",
        settings.queue,
        published as f64 / secs.max(1e-3),
        if bad.is_empty() {
            String::new()
        } else {
            format!("; {} bad line(s) skipped", bad.len())
        }
    );
    Ok(Enqueued::Published)
}

/// Record the campaign before anything is published, so `report --campaign`
/// knows its total from the first outcome on. A database that has no campaign
/// table is the wrong database (or not migrated): a setting to fix, refused
/// before anything goes out. A database that does not answer is an outage,
/// which must not hold up a cancellation: one warning line, and the publish
/// goes ahead (the requests still carry campaign_id; enqueueing the same input
/// again later records the campaign, and the daemon skips the repeats).
async fn record_campaign(
    database: &crate::settings::DatabaseSettings,
    new: &NewCampaign<'_>,
) -> Result<(), ConfigError> {
    match campaigns::record(database, new, RECORD_LIMIT).await {
        Ok(r) if r.input_seen_before => note!(
            "campaign {}: this input was enqueued into it before and is not counted again; {} request(s) in all",
            new.id,
            r.request_count
        ),
        Ok(r) => note!("campaign {}: {} request(s) in all", new.id, r.request_count),
        Err(e @ (CampaignError::NotMigrated(_) | CampaignError::Settings(_))) => {
            return Err(ConfigError(e.to_string()));
        }
        Err(e) => note!(
            "warning: campaign {} not recorded ({}); publishing anyway: enqueue the same input again to record it",
            new.id,
            cause_chain(&e)
        ),
    }
    Ok(())
}

/// Publish `requests` to `queue` as batch messages of `batch_size`
/// requests, each persistent, confirmed by the broker and mandatory (an
/// unroutable message is an error). `published` gets the running count after
/// each message. Returns the number of messages. The one publishing path of
/// `enqueue` and `demo`.
pub async fn publish_batches(
    admin: &Admin,
    queue: &str,
    requests: &[TerminationRequest],
    batch_size: usize,
    mut published: impl FnMut(usize),
) -> Result<usize, BrokerError> {
    let mut messages = 0usize;
    let mut done = 0usize;
    for chunk in requests.chunks(batch_size.max(1)) {
        let body = batch_body(chunk.iter().map(WireRequest::from));
        admin.publish(queue, &body).await?;
        messages += 1;
        done += chunk.len();
        published(done);
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn csv_lines_are_checked_and_numbered_from_the_header() {
        let text = format!(
            "project_id,workflow_id,execution_id,reason\n{P},wf,ex-1,cleanup\nshort,wf,ex-2,\n{P},wf,ex-3\n"
        );
        let (good, bad) = parse_input(&text, InputFormat::Csv, "ops").expect("header ok");
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].reason.as_deref(), Some("cleanup"));
        assert_eq!(good[0].requested_by.as_deref(), Some("ops"));
        assert!(good[0].request_id.starts_with("enq-") && good[0].request_id.ends_with("-2"));
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].line, 3);
        assert!(bad[0].error.contains("project_id must be exactly 32"));
        assert_eq!(bad[1].line, 4);
        let again = parse_input(&text, InputFormat::Csv, "ops").expect("same");
        assert_eq!(again.0[0].request_id, good[0].request_id, "stable ids");
    }

    #[test]
    fn a_bad_header_is_refused() {
        let err = parse_input("project_id,workflow,execution_id\n", InputFormat::Csv, "x")
            .expect_err("unknown column");
        assert!(err.0.contains("unknown column \"workflow\""), "{}", err.0);
        let err =
            parse_input("project_id,workflow_id\n", InputFormat::Csv, "x").expect_err("missing");
        assert!(err.0.contains("execution_id"), "{}", err.0);
    }

    #[test]
    fn jsonl_lines_keep_their_own_fields() {
        let text = format!(
            "{{\"project_id\":\"{P}\",\"workflow_id\":\"w\",\"execution_id\":\"e\",\"request_id\":\"mine\",\"requested_by\":\"amy\"}}\n\n[1]\nnope\n"
        );
        let (good, bad) = parse_input(&text, InputFormat::Jsonl, "ops").expect("parsed");
        assert_eq!(good[0].request_id, "mine");
        assert_eq!(good[0].requested_by.as_deref(), Some("amy"));
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [3, 4]);
    }
}
