//! The wire format of a request: the one place a request is serialized,
//! for `enqueue`, the dead letters, `dead-letters replay` and the benchmark.
//! `ParsedMessage::parse` reads what this writes.

use super::TerminationRequest;
use serde::Serialize;

/// One request as a JSON object. Unset optional fields are left out
/// (the parser reads a missing field and `null` alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WireRequest<'a> {
    pub request_id: &'a str,
    pub project_id: &'a str,
    pub workflow_id: &'a str,
    pub execution_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<&'a str>,
}

impl<'a> From<&'a TerminationRequest> for WireRequest<'a> {
    fn from(r: &'a TerminationRequest) -> Self {
        WireRequest {
            request_id: &r.request_id,
            project_id: r.project_id.as_str(),
            workflow_id: r.workflow_id.as_str(),
            execution_id: r.execution_id.as_str(),
            reason: r.reason.as_deref(),
            requested_by: r.requested_by.as_deref(),
            replay_of: r.replay_of.as_deref(),
            region: r.region.as_ref().map(super::Region::as_str),
            campaign_id: r.campaign_id.as_deref(),
        }
    }
}

impl WireRequest<'_> {
    /// A message body holding this one request.
    pub fn to_body(&self) -> Vec<u8> {
        // Serializing borrowed strings into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A message body holding a batch: `{"requests": [...]}`.
pub fn batch_body<'a>(requests: impl IntoIterator<Item = WireRequest<'a>>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Batch<'a> {
        requests: Vec<WireRequest<'a>>,
    }
    let batch = Batch {
        requests: requests.into_iter().collect(),
    };
    serde_json::to_vec(&batch).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Item, ParsedMessage};

    fn request(replay_of: Option<&str>) -> TerminationRequest {
        let body = serde_json::json!({
            "request_id": "r-1",
            "project_id": "0123456789abcdef0123456789abcdef",
            "workflow_id": "wf \"quoted\"",
            "execution_id": "ex/é",
            "reason": "cleanup",
            "replay_of": replay_of,
        });
        match ParsedMessage::parse(body.to_string().as_bytes(), None) {
            ParsedMessage::Requests(mut items) => match items.remove(0) {
                Item::Valid(r) => r,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_is_written_parses_back_to_the_same_request() {
        for replay_of in [None, Some("r-0")] {
            let original = request(replay_of);
            let body = WireRequest::from(&original).to_body();
            let ParsedMessage::Requests(items) = ParsedMessage::parse(&body, None) else {
                panic!("unreadable: {}", String::from_utf8_lossy(&body));
            };
            assert_eq!(items, vec![Item::Valid(original.clone())]);
        }
        let text = String::from_utf8(WireRequest::from(&request(None)).to_body()).expect("utf8");
        assert!(
            !text.contains("requested_by") && !text.contains("replay_of"),
            "{text}"
        );
    }

    #[test]
    fn a_batch_parses_back_in_order() {
        let (a, b) = (request(None), request(Some("r-0")));
        let body = batch_body([WireRequest::from(&a), WireRequest::from(&b)]);
        let ParsedMessage::Requests(items) = ParsedMessage::parse(&body, None) else {
            panic!("unreadable");
        };
        assert_eq!(items, vec![Item::Valid(a), Item::Valid(b)]);
    }
}
