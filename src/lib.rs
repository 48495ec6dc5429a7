//! aom-terminator: event-driven mass cancellation of AOM workflow
//! executions. Termination requests arrive on RabbitMQ, go to the AOM
//! terminate API with bounded parallelism and retries, and every outcome is
//! recorded in a Postgres audit before its message is acked.
//!
//! Where to look: a request is parsed in [`domain`], sent and classified in
//! [`api`], retried in [`dispatch`] (by the policy in [`retry`]), audited in
//! [`audit`], and acked or dead-lettered through [`broker`]; [`pipeline`]
//! takes one message through all of that, and [`daemon`] runs the loop.

pub mod api;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod config;
pub mod daemon;
pub mod deadletters;
pub mod dispatch;
pub mod domain;
pub mod enqueue;
pub mod observe;
pub mod pipeline;
pub mod report;
pub mod retry;
pub mod sandbox;
pub mod telemetry;
