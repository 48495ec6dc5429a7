//! The operator tools: `enqueue` starts a mass cancellation (a campaign),
//! `report` says what happened (`campaigns`: how one campaign is going),
//! `dead-letters` lists and replays what could not be done.
//! Data goes to standard output, everything else to standard error
//! (`output`).

pub mod campaigns;
pub mod dead_letters;
pub mod enqueue;
pub mod output;
pub mod prune;
pub mod report;
