//! What the pipeline hands the audit to commit.

use crate::domain::{Attempt, Outcome};
use chrono::{DateTime, Utc};

/// A request's final outcome with every attempt that led to it.
#[derive(Debug, Clone)]
pub struct FinalRecord {
    pub request_id: String,
    pub project_id: Option<String>,
    pub workflow_id: Option<String>,
    pub execution_id: Option<String>,
    pub outcome: Outcome,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub attempts: Vec<Attempt>,
    /// Attempts recorded by earlier deliveries; numbering continues after them.
    pub attempts_before: u32,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
    pub received_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub redelivered: bool,
    pub message_id: Option<String>,
    /// The request this one replays from the dead-letter queue.
    pub replay_of: Option<String>,
    /// The campaign the request belongs to.
    pub campaign_id: Option<String>,
}

/// The attempts of a request that has no final outcome yet, with the
/// request's dimensions (the attempts' rollup counts them by these).
#[derive(Debug, Clone)]
pub struct UnfinishedRecord {
    pub request_id: String,
    pub project_id: Option<String>,
    pub workflow_id: Option<String>,
    pub requested_by: Option<String>,
    pub campaign_id: Option<String>,
    pub attempts_before: u32,
    pub attempts: Vec<Attempt>,
}

/// One thing to commit.
#[derive(Debug, Clone)]
pub enum Record {
    Final(Box<FinalRecord>),
    /// Attempts of a request that did not reach a final outcome (shutdown):
    /// the calls were made, so the audit shows them.
    Unfinished(Box<UnfinishedRecord>),
    /// A delivery of a request that already had its final outcome.
    Skipped {
        request_id: String,
    },
}
