//! The operator tools: `enqueue` starts a mass cancellation, `report` says
//! what happened, `dead-letters` lists and replays what could not be done.
//! Data goes to standard output, everything else to standard error
//! (`output`).

pub mod dead_letters;
pub mod enqueue;
pub mod output;
pub mod report;
