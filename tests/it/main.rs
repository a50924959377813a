//! One integration-test binary: the real `intake` binary against real SQLite and
//! PostgreSQL databases, a real Maildir and the file transport.

mod admin;
mod audit_view;
mod batching;
mod bounces;
mod browser;
mod cli;
mod concurrency;
mod crash;
mod daemon;
mod dovecot;
mod harness;
mod imap;
mod import_simulate;
mod package;
mod policy_paths;
mod robustness;
mod scaleout;
mod service;
mod smtp;
mod verification;
