//! Termination requests and their parsing from a message body.
//!
//! "Parse, don't validate": once you hold a [`TerminationRequest`], its ids
//! follow the API's rules. Everything a message can get wrong is a
//! [`Rejection`] with a reason a person can read in the audit.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fmt;

/// The largest message body the daemon will parse.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The most requests one batch message may carry.
pub const MAX_BATCH: usize = 10_000;
/// Free-text fields (request_id, reason, requested_by) are capped so one
/// message cannot bloat the audit.
const MAX_TEXT: usize = 1024;
/// Raw values kept on a rejected request are cut to this many characters.
const MAX_RAW: usize = 256;

macro_rules! id_type {
    ($name:ident, $field:literal, $min:expr, $max:expr) => {
        #[derive(Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, String> {
                let n = s.chars().count();
                if !($min..=$max).contains(&n) {
                    return Err(if $min == $max {
                        format!("{} must be exactly {} characters, got {}", $field, $min, n)
                    } else {
                        format!(
                            "{} must be {}..{} characters, got {}",
                            $field, $min, $max, n
                        )
                    });
                }
                if s.chars().any(char::is_control) {
                    return Err(format!("{} must not contain control characters", $field));
                }
                // As a path segment these would climb the URL, encoded or not.
                if s == "." || s == ".." {
                    return Err(format!("{} must not be \".\" or \"..\"", $field));
                }
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(ProjectId, "project_id", 32, 32);
id_type!(WorkflowId, "workflow_id", 1, 64);
id_type!(ExecutionId, "execution_id", 1, 64);

/// A Huawei Cloud region id (`cn-north-4`): it goes into a host name, so
/// only lowercase letters, digits and `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Region(String);

impl Region {
    pub fn parse(s: &str) -> Result<Self, String> {
        let n = s.chars().count();
        if !(1..=64).contains(&n) {
            return Err(format!("region must be 1..64 characters, got {n}"));
        }
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if !s.chars().all(ok) || s.starts_with('-') || s.ends_with('-') {
            return Err(format!(
                "region must be lowercase letters, digits and inner '-' (like cn-north-4), got {:?}",
                truncate(s, 64)
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One valid termination request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminationRequest {
    pub request_id: String,
    pub project_id: ProjectId,
    pub workflow_id: WorkflowId,
    pub execution_id: ExecutionId,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
    /// Set on a replay from the dead-letter queue: the original request_id.
    pub replay_of: Option<String>,
    /// The region to call; found from the project when not given.
    pub region: Option<Region>,
    /// The campaign (one mass cancellation) the request belongs to.
    pub campaign_id: Option<String>,
}

/// The final outcome of a request, as stored in `termination_outcomes.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Succeeded,
    FailedPermanent,
    FailedRetriesExhausted,
    Rejected,
}

impl Outcome {
    /// Every outcome, in the order reports list them.
    pub const ALL: [Outcome; 4] = [
        Outcome::Succeeded,
        Outcome::FailedPermanent,
        Outcome::FailedRetriesExhausted,
        Outcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::FailedPermanent => "failed_permanent",
            Outcome::FailedRetriesExhausted => "failed_retries_exhausted",
            Outcome::Rejected => "rejected",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that cannot be sent, with whatever could be read of it so the
/// audit can still say which execution it was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub request_id: String,
    pub project_id: Option<String>,
    pub workflow_id: Option<String>,
    pub execution_id: Option<String>,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
    pub replay_of: Option<String>,
    pub campaign_id: Option<String>,
    pub error: String,
}

impl Rejection {
    /// A rejection of which nothing but its derived id is known.
    fn anonymous(request_id: String, error: String) -> Self {
        Rejection {
            request_id,
            project_id: None,
            workflow_id: None,
            execution_id: None,
            reason: None,
            requested_by: None,
            replay_of: None,
            campaign_id: None,
            error,
        }
    }
}

/// One element of a message, in message order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Valid(TerminationRequest),
    Invalid(Rejection),
}

/// What a message body turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedMessage {
    /// A single request or a batch; each element on its own.
    Requests(Vec<Item>),
    /// Nothing in it can be read as a request (not UTF-8, not JSON, too big,
    /// batch over the limit, ...). The rejection is keyed as element 0.
    Unreadable(Rejection),
}

impl ParsedMessage {
    /// How many requests (valid or not) the message holds; 1 if unreadable.
    pub fn request_count(&self) -> usize {
        match self {
            ParsedMessage::Requests(items) => items.len(),
            ParsedMessage::Unreadable(_) => 1,
        }
    }

    /// Parse a message body. `message_id` is the AMQP message-id, if any: it
    /// seeds derived request ids so that a redelivery maps to the same ids.
    pub fn parse(body: &[u8], message_id: Option<&str>) -> ParsedMessage {
        let seed = IdSeed::new(body, message_id);
        let unreadable =
            |error: String| ParsedMessage::Unreadable(Rejection::anonymous(seed.derive(0), error));
        if body.len() > MAX_BODY_BYTES {
            return unreadable(format!(
                "message body is {} bytes, over the limit of {MAX_BODY_BYTES}",
                body.len()
            ));
        }
        let text = match std::str::from_utf8(body) {
            Ok(t) => t,
            Err(e) => return unreadable(format!("message body is not UTF-8: {e}")),
        };
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return unreadable(format!("message body is not JSON: {e}")),
        };
        let Value::Object(mut obj) = value else {
            return unreadable(format!(
                "message body must be a JSON object, got {}",
                json_type(&value)
            ));
        };
        match obj.remove("requests") {
            None => ParsedMessage::Requests(vec![parse_element(Value::Object(obj), 0, &seed)]),
            Some(Value::Array(elements)) => {
                if let Some(extra) = obj.keys().next() {
                    return unreadable(format!(
                        "a batch has only the field \"requests\", found \"{}\"",
                        truncate(extra, 64)
                    ));
                }
                if elements.is_empty() {
                    return unreadable("batch \"requests\" is empty".to_owned());
                }
                if elements.len() > MAX_BATCH {
                    return unreadable(format!(
                        "batch has {} requests, over the limit of {MAX_BATCH}",
                        elements.len()
                    ));
                }
                ParsedMessage::Requests(
                    elements
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| parse_element(v, i, &seed))
                        .collect(),
                )
            }
            Some(other) => unreadable(format!(
                "\"requests\" must be an array, got {}",
                json_type(&other)
            )),
        }
    }
}

/// Derives request ids for elements that carry none: the message-id plus the
/// element's index, or else a hash of the body plus the index. The prefix is
/// made on first use: most messages carry their request ids, and hashing
/// every body for nothing was a measurable share of parsing.
struct IdSeed<'a> {
    body: &'a [u8],
    message_id: Option<&'a str>,
    prefix: std::cell::OnceCell<String>,
}

impl<'a> IdSeed<'a> {
    fn new(body: &'a [u8], message_id: Option<&'a str>) -> Self {
        Self {
            body,
            message_id,
            prefix: std::cell::OnceCell::new(),
        }
    }

    fn derive(&self, index: usize) -> String {
        let prefix = self
            .prefix
            .get_or_init(|| match self.message_id.filter(|m| !m.is_empty()) {
                Some(m) => format!("msg:{}", truncate(m, 200)),
                None => format!("sha256:{}", hex::encode(&Sha256::digest(self.body)[..16])),
            });
        format!("{prefix}:{index}")
    }
}

fn parse_element(value: Value, index: usize, seed: &IdSeed<'_>) -> Item {
    let Value::Object(obj) = value else {
        return Item::Invalid(Rejection::anonymous(
            seed.derive(index),
            format!("request must be a JSON object, got {}", json_type(&value)),
        ));
    };
    let mut errors = Vec::new();
    let request_id = match optional_text(&obj, "request_id", &mut errors) {
        Some(id) if id.is_empty() => {
            errors.push("request_id must not be empty".to_owned());
            None
        }
        other => other,
    };
    let request_id = request_id.unwrap_or_else(|| seed.derive(index));
    let reason = optional_text(&obj, "reason", &mut errors);
    let requested_by = optional_text(&obj, "requested_by", &mut errors);
    let replay_of = optional_text(&obj, "replay_of", &mut errors);
    let campaign_id = optional_text(&obj, "campaign_id", &mut errors);
    let region = optional_text(&obj, "region", &mut errors)
        .and_then(|r| Region::parse(&r).map_err(|e| errors.push(e)).ok());
    let project = required_id(&obj, "project_id", ProjectId::parse, &mut errors);
    let workflow = required_id(&obj, "workflow_id", WorkflowId::parse, &mut errors);
    let execution = required_id(&obj, "execution_id", ExecutionId::parse, &mut errors);
    match (project, workflow, execution) {
        (Ok(project_id), Ok(workflow_id), Ok(execution_id)) if errors.is_empty() => {
            Item::Valid(TerminationRequest {
                request_id,
                project_id,
                workflow_id,
                execution_id,
                reason,
                requested_by,
                replay_of,
                region,
                campaign_id,
            })
        }
        (project, workflow, execution) => Item::Invalid(Rejection {
            request_id,
            project_id: raw(project),
            workflow_id: raw(workflow),
            execution_id: raw(execution),
            reason,
            requested_by,
            replay_of,
            campaign_id,
            error: errors.join("; "),
        }),
    }
}

/// A required id field: `Ok` when valid; `Err(Some(raw))` when present as a
/// string but invalid (kept for the audit); `Err(None)` otherwise.
fn required_id<T>(
    obj: &Map<String, Value>,
    field: &str,
    parse: fn(&str) -> Result<T, String>,
    errors: &mut Vec<String>,
) -> Result<T, Option<String>> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            errors.push(format!("missing field {field}"));
            Err(None)
        }
        Some(Value::String(s)) => parse(s).map_err(|e| {
            errors.push(e);
            Some(truncate(s, MAX_RAW).to_owned())
        }),
        Some(other) => {
            errors.push(format!(
                "{field} must be a string, got {}",
                json_type(other)
            ));
            Err(None)
        }
    }
}

fn optional_text(
    obj: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<String>,
) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() > MAX_TEXT => {
            errors.push(format!("{field} is longer than {MAX_TEXT} characters"));
            Some(truncate(s, MAX_RAW).to_owned())
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            errors.push(format!(
                "{field} must be a string, got {}",
                json_type(other)
            ));
            None
        }
    }
}

fn raw<T>(field: Result<T, Option<String>>) -> Option<String>
where
    T: fmt::Display,
{
    match field {
        Ok(v) => Some(v.to_string()),
        Err(raw) => raw,
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first `max` characters of `s`, cut on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "0123456789abcdef0123456789abcdef";

    fn single(body: &str) -> Item {
        match ParsedMessage::parse(body.as_bytes(), None) {
            ParsedMessage::Requests(mut items) if items.len() == 1 => items.remove(0),
            other => panic!("expected one item, got {other:?}"),
        }
    }

    fn rejection(body: &str) -> Rejection {
        match single(body) {
            Item::Invalid(r) => r,
            Item::Valid(r) => panic!("expected a rejection, got {r:?}"),
        }
    }

    #[test]
    fn region_and_campaign_are_read_and_a_bad_region_is_rejected() {
        let body = format!(
            r#"{{"project_id":"{P}","workflow_id":"w","execution_id":"e",
                "region":"cn-north-4","campaign_id":"c-1"}}"#
        );
        let Item::Valid(r) = single(&body) else {
            panic!("expected valid")
        };
        assert_eq!(r.region.as_ref().map(Region::as_str), Some("cn-north-4"));
        assert_eq!(r.campaign_id.as_deref(), Some("c-1"));
        for bad in ["CN-NORTH", "a.evil.com", "", "-x", "x/y"] {
            let body = format!(
                r#"{{"project_id":"{P}","workflow_id":"w","execution_id":"e",
                    "region":"{bad}","campaign_id":"c-2"}}"#
            );
            let r = rejection(&body);
            assert!(r.error.contains("region"), "{bad}: {}", r.error);
            assert_eq!(r.campaign_id.as_deref(), Some("c-2"));
        }
    }

    #[test]
    fn a_single_request_parses_with_all_fields() {
        let body = format!(
            r#"{{"project_id":"{P}","workflow_id":"wf-1","execution_id":"ex-1",
                "request_id":"r1","reason":"cleanup","requested_by":"ops"}}"#
        );
        let Item::Valid(r) = single(&body) else {
            panic!("expected valid")
        };
        assert_eq!(r.request_id, "r1");
        assert_eq!(r.project_id.as_str(), P);
        assert_eq!(r.workflow_id.as_str(), "wf-1");
        assert_eq!(r.execution_id.as_str(), "ex-1");
        assert_eq!(r.reason.as_deref(), Some("cleanup"));
        assert_eq!(r.requested_by.as_deref(), Some("ops"));
    }

    #[test]
    fn derived_ids_come_from_the_message_id_or_the_body_and_are_stable() {
        let body = format!(
            r#"{{"requests":[{{"project_id":"{P}","workflow_id":"w","execution_id":"a"}},
                {{"project_id":"{P}","workflow_id":"w","execution_id":"b"}}]}}"#
        );
        let ids = |mid: Option<&str>| match ParsedMessage::parse(body.as_bytes(), mid) {
            ParsedMessage::Requests(items) => items
                .into_iter()
                .map(|i| match i {
                    Item::Valid(r) => r.request_id,
                    Item::Invalid(r) => panic!("{r:?}"),
                })
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ids(Some("m-7")), vec!["msg:m-7:0", "msg:m-7:1"]);
        let hashed = ids(None);
        assert_eq!(hashed, ids(None), "a redelivery must map to the same ids");
        assert!(hashed[0].starts_with("sha256:") && hashed[0].ends_with(":0"));
        assert!(hashed[1].ends_with(":1"));
        assert_ne!(hashed[0], hashed[1]);
    }

    #[test]
    fn id_lengths_follow_the_api() {
        let short = rejection(r#"{"project_id":"abc","workflow_id":"w","execution_id":"e"}"#);
        assert!(
            short.error.contains("project_id must be exactly 32"),
            "{}",
            short.error
        );
        assert_eq!(short.project_id.as_deref(), Some("abc"));
        assert_eq!(short.workflow_id.as_deref(), Some("w"));

        let long = "x".repeat(65);
        let e = rejection(&format!(
            r#"{{"project_id":"{P}","workflow_id":"{long}","execution_id":""}}"#
        ));
        assert!(e.error.contains("workflow_id must be 1..64"), "{}", e.error);
        assert!(
            e.error.contains("execution_id must be 1..64"),
            "{}",
            e.error
        );

        let max = "y".repeat(64);
        assert!(matches!(
            single(&format!(
                r#"{{"project_id":"{P}","workflow_id":"{max}","execution_id":"{max}"}}"#
            )),
            Item::Valid(_)
        ));
    }

    #[test]
    fn dot_segments_are_refused() {
        let e = rejection(&format!(
            r#"{{"project_id":"{P}","workflow_id":"..","execution_id":"."}}"#
        ));
        assert!(e.error.contains("workflow_id must not be"), "{}", e.error);
        assert!(e.error.contains("execution_id must not be"), "{}", e.error);
    }

    #[test]
    fn missing_fields_and_wrong_types_are_named() {
        let e = rejection(r#"{"workflow_id":7,"execution_id":"e","request_id":"r9"}"#);
        assert_eq!(
            e.request_id, "r9",
            "an explicit request_id identifies a rejection"
        );
        assert!(e.error.contains("missing field project_id"), "{}", e.error);
        assert!(
            e.error
                .contains("workflow_id must be a string, got a number"),
            "{}",
            e.error
        );
        // Unknown fields are ignored, so producers can add their own metadata.
        assert!(matches!(
            single(&format!(
                r#"{{"project_id":"{P}","workflow_id":"w","execution_id":"e","colour":1}}"#
            )),
            Item::Valid(_)
        ));
    }

    #[test]
    fn unreadable_bodies_are_rejected_whole() {
        let cases: [(&[u8], &str); 6] = [
            (b"\xff\xfe", "not UTF-8"),
            (b"{nope", "not JSON"),
            (b"[1,2]", "must be a JSON object"),
            (br#"{"requests":{}}"#, "must be an array"),
            (br#"{"requests":[]}"#, "empty"),
            (br#"{"requests":[],"x":1}"#, "only the field"),
        ];
        for (body, want) in cases {
            match ParsedMessage::parse(body, Some("m")) {
                ParsedMessage::Unreadable(r) => {
                    assert!(r.error.contains(want), "{want}: {}", r.error);
                    assert_eq!(r.request_id, "msg:m:0");
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn size_and_batch_limits() {
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(matches!(
            ParsedMessage::parse(&big, None),
            ParsedMessage::Unreadable(r) if r.error.contains("over the limit")
        ));
        let element = format!(r#"{{"project_id":"{P}","workflow_id":"w","execution_id":"e"}}"#);
        let batch = |n: usize| {
            format!(
                r#"{{"requests":[{}]}}"#,
                vec![element.as_str(); n].join(",")
            )
        };
        assert!(matches!(
            ParsedMessage::parse(batch(MAX_BATCH + 1).as_bytes(), None),
            ParsedMessage::Unreadable(r) if r.error.contains("over the limit of 10000")
        ));
        assert!(matches!(
            ParsedMessage::parse(batch(MAX_BATCH).as_bytes(), None),
            ParsedMessage::Requests(items) if items.len() == MAX_BATCH
        ));
    }

    #[test]
    fn a_bad_element_does_not_spoil_the_batch() {
        let body = format!(
            r#"{{"requests":[{{"project_id":"{P}","workflow_id":"w","execution_id":"e"}}, 5,
                {{"project_id":"short","workflow_id":"w","execution_id":"e"}}]}}"#
        );
        let ParsedMessage::Requests(items) = ParsedMessage::parse(body.as_bytes(), Some("b"))
        else {
            panic!("expected requests")
        };
        assert!(matches!(&items[0], Item::Valid(r) if r.request_id == "msg:b:0"));
        assert!(
            matches!(&items[1], Item::Invalid(r) if r.request_id == "msg:b:1"
            && r.error.contains("got a number"))
        );
        assert!(matches!(&items[2], Item::Invalid(r) if r.request_id == "msg:b:2"));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            ".{0,70}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("project_id".to_owned()),
                        Just("workflow_id".to_owned()),
                        Just("execution_id".to_owned()),
                        Just("request_id".to_owned()),
                        Just("requests".to_owned()),
                        ".{0,8}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_reject_without_panicking(body in prop::collection::vec(any::<u8>(), 0..512)) {
            check_total(&body);
        }

        #[test]
        fn any_json_parses_or_rejects_without_panicking(v in json_value()) {
            check_total(v.to_string().as_bytes());
        }
    }

    /// Every outcome of parsing is well-formed: rejections say why, and
    /// every element is identified.
    fn check_total(body: &[u8]) {
        match ParsedMessage::parse(body, None) {
            ParsedMessage::Unreadable(r) => assert!(!r.error.is_empty()),
            ParsedMessage::Requests(items) => {
                assert!(!items.is_empty());
                for item in items {
                    match item {
                        Item::Valid(r) => assert!(!r.request_id.is_empty()),
                        Item::Invalid(r) => {
                            assert!(!r.error.is_empty() && !r.request_id.is_empty())
                        }
                    }
                }
            }
        }
    }
}
