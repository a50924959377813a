//! intake: inbound email to service-desk requests, with an explicit, explainable
//! customer-access policy. See DESIGN.md for the pipeline and the decision contract.
#![forbid(unsafe_code)]

pub mod address;
pub mod cli;
pub mod config;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod keys;
pub mod mailbox;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod policy;
pub mod store;
pub mod systemd;
#[cfg(test)]
mod testing;
pub mod verify;

/// The current time as unix seconds: the one clock the daemon reads. The policy never
/// calls it; times reach the decision engine as values.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
