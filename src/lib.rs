//! aom-terminator: event-driven mass cancellation of AOM workflow
//! executions. Termination requests arrive on RabbitMQ, go to the AOM
//! terminate API with bounded parallelism and retries, and every outcome is
//! recorded in a Postgres audit before its message is acked.
//!
//! Layers, top to bottom; a module uses only what is below it:
//! - [`cli`]: the command tree; [`demo`]: the main job end to end in one
//!   command (it drives the daemon, a tool and the sandbox together);
//! - the commands: [`daemon`] (the consumer), [`tools`] (enqueue, report,
//!   dead-letters), [`sandbox`] (the fake API);
//! - the adapters, the only places that name their crates: [`broker`]
//!   (lapin), [`audit`] (sqlx), [`aom`] (reqwest);
//! - the plain core: [`domain`], [`retry`], [`limit`], [`settings`], [`metrics`],
//!   [`telemetry`].
//!
//! Where to look: a request is parsed in [`domain`], sent and classified in
//! [`aom`], retried in `daemon::dispatch` (by the policy in [`retry`]),
//! audited in [`audit`], dead-lettered through [`broker`]; `daemon::pipeline`
//! takes one message through all of that, and [`daemon`] acks it.

pub mod aom;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod daemon;
pub mod demo;
pub mod domain;
pub mod limit;
pub mod metrics;
pub mod retry;
pub mod sandbox;
pub mod settings;
pub mod telemetry;
pub mod tools;
