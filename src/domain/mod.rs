//! The plain core: requests, their parsing and wire format, attempts,
//! outcomes and dead letters. No I/O and no adapter types: everything here
//! is data and pure rules, testable on its own.

mod attempt;
mod dead_letter;
mod message;
mod request;
mod wire;

pub use attempt::{Attempt, ErrorKind, Verdict};
pub use dead_letter::{DeadLetter, Header, Letter, PARKED_AT, PARKED_PROJECT, Source};
pub use message::Message;
pub use request::{
    ExecutionId, Item, MAX_BATCH, MAX_BODY_BYTES, Outcome, ParsedMessage, ProjectId, Region,
    Rejection, TerminationRequest, WorkflowId, truncate,
};
pub use wire::{WireRequest, batch_body};
