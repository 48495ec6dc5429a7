//! The AOM adapter: the only place (with the sandbox and the broker's
//! management client) that names `reqwest`, and the only one that names
//! hyper's crates (in `direct.rs`). It sends one terminate call, classifies
//! the answer, and authenticates calls in the three ways real deployments
//! use.

pub mod auth;
pub mod classify;
mod client;
mod direct;
pub mod route;

pub use client::{ApiError, CallError, HttpOptions, TerminateClient};
pub use direct::proxy_configured;

/// Log directives that quiet the certificate verifier: it logs every failed
/// verification at ERROR, and the daemon logs a TLS failure with the API once
/// itself (as the cause of its pause).
pub const QUIET_LOGS: &str = "rustls_platform_verifier=off";

#[cfg(test)]
mod direct_tests;
#[cfg(test)]
mod tests;
