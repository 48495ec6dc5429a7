//! The dead-letter format: what a dead letter carries, written by the
//! daemon and read by `dead-letters list|replay`. Header names are part of
//! the public contract and are spelled here only.

use super::{Attempt, Outcome, Rejection, TerminationRequest, WireRequest, truncate};
use chrono::Utc;
use std::collections::BTreeMap;

/// A rejection header longer than this is cut (AMQP headers must fit in a frame).
const MAX_REJECTION_HEADER: usize = 16 * 1024;

const OUTCOME: &str = "x-aom-outcome";
const ERROR: &str = "x-aom-error";
const REJECTIONS: &str = "x-aom-rejections";
const REJECTED_COUNT: &str = "x-aom-rejected-count";
const REQUEST_ID: &str = "x-aom-request-id";
const ATTEMPTS: &str = "x-aom-attempts";
const HTTP_STATUS: &str = "x-aom-http-status";
const ERROR_KIND: &str = "x-aom-error-kind";
const ERROR_CODE: &str = "x-aom-error-code";
const ERROR_MSG: &str = "x-aom-error-msg";
const SOURCE_QUEUE: &str = "x-aom-source-queue";
const DEAD_LETTERED_AT: &str = "x-aom-dead-lettered-at";
const REDELIVERED: &str = "x-aom-redelivered";
const SOURCE_MESSAGE_ID: &str = "x-aom-source-message-id";
/// On a parked request: its project, which the mover reads to decide
/// whether the request may go back to the request queue.
pub const PARKED_PROJECT: &str = "x-aom-parked-project";
/// On a parked request (kept when it is moved back): when it was parked.
/// A message with it may have had calls made before (401s).
pub const PARKED_AT: &str = "x-aom-parked-at";
const PARKED_WHY: &str = "x-aom-parked-why";
/// Set by the broker on a message it dead-lettered itself.
const BROKER_DEATH_REASON: &str = "x-first-death-reason";

/// A header value of a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    Text(String),
    Int(i64),
}

/// A message for the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, Header)>,
}

/// The message a dead letter comes from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub body: &'a [u8],
    pub message_id: Option<&'a str>,
    pub redelivered: bool,
}

fn text(s: impl Into<String>) -> Header {
    Header::Text(s.into())
}

fn common_headers(src: &Source<'_>, source_queue: &str) -> Vec<(&'static str, Header)> {
    let mut h = vec![
        (SOURCE_QUEUE, text(source_queue)),
        (DEAD_LETTERED_AT, text(Utc::now().to_rfc3339())),
        (REDELIVERED, text(src.redelivered.to_string())),
    ];
    if let Some(id) = src.message_id {
        h.push((SOURCE_MESSAGE_ID, text(id)));
    }
    h
}

impl DeadLetter {
    /// The raw message, with why it (or some of its elements) was rejected.
    pub fn rejected(
        src: &Source<'_>,
        rejected: &[(usize, &Rejection)],
        whole_message_error: Option<&str>,
    ) -> DeadLetter {
        let mut headers = vec![(OUTCOME, text(Outcome::Rejected.as_str()))];
        if let Some(error) = whole_message_error {
            headers.push((ERROR, text(truncate(error, 1024))));
        }
        let detail: Vec<_> = rejected
            .iter()
            .map(|(index, r)| {
                serde_json::json!({"index": index, "request_id": r.request_id, "error": r.error})
            })
            .collect();
        let mut detail = serde_json::Value::Array(detail).to_string();
        if detail.len() > MAX_REJECTION_HEADER {
            detail = format!(
                "{}… ({} rejections in all; the audit has each)",
                truncate(&detail, MAX_REJECTION_HEADER),
                rejected.len()
            );
        }
        headers.push((REJECTIONS, Header::Text(detail)));
        headers.push((REJECTED_COUNT, Header::Int(rejected.len() as i64)));
        headers.extend(common_headers(src, ""));
        DeadLetter {
            body: src.body.to_vec(),
            content_type: "application/json",
            headers,
        }
    }

    /// A request whose attempts ran out, as a single-request message that
    /// can be sent again as it is.
    pub fn exhausted(
        src: &Source<'_>,
        req: &TerminationRequest,
        attempts: &[Attempt],
        source_queue: &str,
    ) -> DeadLetter {
        let last = attempts.last();
        let mut headers = vec![
            (OUTCOME, text(Outcome::FailedRetriesExhausted.as_str())),
            (REQUEST_ID, text(req.request_id.as_str())),
            (ATTEMPTS, Header::Int(attempts.len() as i64)),
        ];
        if let Some(status) = last.and_then(|a| a.http_status) {
            headers.push((HTTP_STATUS, Header::Int(i64::from(status))));
        }
        if let Some(kind) = last.and_then(|a| a.error_kind) {
            headers.push((ERROR_KIND, text(kind.as_str())));
        }
        if let Some(code) = last.and_then(|a| a.error_code.as_deref()) {
            headers.push((ERROR_CODE, text(code)));
        }
        if let Some(msg) = last.and_then(|a| a.error_msg.as_deref()) {
            headers.push((ERROR_MSG, text(truncate(msg, 1024))));
        }
        headers.extend(common_headers(src, source_queue));
        DeadLetter {
            body: WireRequest::from(req).to_body(),
            content_type: "application/json",
            headers,
        }
    }
}

impl DeadLetter {
    /// A request of a held project, for the parking queue: a
    /// single-request message that can go back to the request queue as it
    /// is (its request_id kept, so the audit's dedupe still applies).
    pub fn parked(src: &Source<'_>, req: &TerminationRequest, why: &str) -> DeadLetter {
        let mut headers = vec![
            (PARKED_PROJECT, text(req.project_id.as_str())),
            (REQUEST_ID, text(req.request_id.as_str())),
            (PARKED_AT, text(Utc::now().to_rfc3339())),
            (PARKED_WHY, text(truncate(why, 1024))),
        ];
        if let Some(id) = src.message_id {
            headers.push((SOURCE_MESSAGE_ID, text(id)));
        }
        DeadLetter {
            body: WireRequest::from(req).to_body(),
            content_type: "application/json",
            headers,
        }
    }
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
    /// The campaign of the request (from its body).
    pub campaign_id: Option<String>,
    pub http_status: Option<String>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub dead_lettered_at: Option<String>,
    pub source_message_id: Option<String>,
}

impl Letter {
    pub fn describe(headers: &BTreeMap<String, String>, body: &[u8]) -> Letter {
        let h = |k: &str| headers.get(k).cloned();
        let reason = match (h(OUTCOME), h(BROKER_DEATH_REASON)) {
            (Some(outcome), _) => outcome,
            (None, Some(broker)) => format!("broker:{broker}"),
            (None, None) => "unknown".to_owned(),
        };
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let field = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        Letter {
            reason,
            request_id: h(REQUEST_ID).or_else(|| field("request_id")),
            workflow_id: field("workflow_id"),
            execution_id: field("execution_id"),
            campaign_id: field("campaign_id"),
            http_status: h(HTTP_STATUS),
            error_code: h(ERROR_CODE),
            error: h(ERROR_MSG).or_else(|| h(ERROR)).or_else(|| h(REJECTIONS)),
            dead_lettered_at: h(DEAD_LETTERED_AT),
            source_message_id: h(SOURCE_MESSAGE_ID),
        }
    }

    /// Whether `dead-letters replay` may send it again as it is.
    pub fn is_exhausted(&self) -> bool {
        self.reason == Outcome::FailedRetriesExhausted.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ErrorKind, Item, ParsedMessage, Verdict};

    fn headers_as_text(letter: &DeadLetter) -> BTreeMap<String, String> {
        letter
            .headers
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Header::Text(s) => s.clone(),
                    Header::Int(n) => n.to_string(),
                };
                (k.to_string(), v)
            })
            .collect()
    }

    #[test]
    fn an_exhausted_letter_reads_back_and_can_be_sent_again() {
        let body = br#"{"request_id":"r1","project_id":"0123456789abcdef0123456789abcdef","workflow_id":"w","execution_id":"e"}"#;
        let ParsedMessage::Requests(mut items) = ParsedMessage::parse(body, None) else {
            panic!("parses")
        };
        let Item::Valid(req) = items.remove(0) else {
            panic!("valid")
        };
        let attempt = Attempt {
            started_at: Utc::now(),
            latency: std::time::Duration::ZERO,
            http_status: Some(500),
            error_kind: Some(ErrorKind::ServerError),
            error_code: Some("AOM.0500".to_owned()),
            error_msg: Some("boom".to_owned()),
            body_excerpt: None,
            verdict: Verdict::Retryable { retry_after: None },
            auth_generation: 0,
            region: None,
            endpoint_host: None,
        };
        let src = Source {
            body,
            message_id: Some("m-1"),
            redelivered: false,
        };
        let letter = DeadLetter::exhausted(&src, &req, &[attempt], "q");
        let read = Letter::describe(&headers_as_text(&letter), &letter.body);
        assert!(read.is_exhausted());
        assert_eq!(read.request_id.as_deref(), Some("r1"));
        assert_eq!(read.workflow_id.as_deref(), Some("w"));
        assert_eq!(read.http_status.as_deref(), Some("500"));
        assert_eq!(read.error_code.as_deref(), Some("AOM.0500"));
        assert_eq!(read.error.as_deref(), Some("boom"));
        assert_eq!(read.source_message_id.as_deref(), Some("m-1"));
        assert_eq!(
            ParsedMessage::parse(&letter.body, None),
            ParsedMessage::Requests(vec![Item::Valid(req)])
        );
    }

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
