//! The operator tools: `enqueue` starts a mass cancellation, `report` says
//! what happened, `dead-letters` lists and replays what could not be done.

pub mod dead_letters;
pub mod enqueue;
pub mod report;
