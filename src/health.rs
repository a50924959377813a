//! What each mailbox last reported, for `/healthz` and the service status line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SourceHealth {
    pub ok: bool,
    /// Unix time of the last successful pass or connection.
    pub last_ok: Option<i64>,
    /// The last error, if the source is failing.
    pub last_error: Option<String>,
    pub since: i64,
}

/// Messages handled since start, for the service status line.
#[derive(Debug, Default)]
pub struct Counters {
    pub processed: AtomicU64,
    pub requests: AtomicU64,
    pub quarantined: AtomicU64,
}

impl Counters {
    /// Counts one message by its action.
    pub fn count(&self, action: &str) {
        self.processed.fetch_add(1, Ordering::Relaxed);
        match action {
            "create_request" => self.requests.fetch_add(1, Ordering::Relaxed),
            "quarantine" => self.quarantined.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

/// Shared between the sources (writers) and the HTTP server (reader).
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<RwLock<BTreeMap<String, SourceHealth>>>);

impl Health {
    pub fn ok(&self, source: &str) {
        let now = crate::now();
        if let Ok(mut map) = self.0.write() {
            let entry = map.entry(source.to_string()).or_insert(SourceHealth {
                ok: true,
                last_ok: None,
                last_error: None,
                since: now,
            });
            if !entry.ok {
                entry.since = now;
            }
            entry.ok = true;
            entry.last_ok = Some(now);
            entry.last_error = None;
        }
    }

    /// Records a failure. `error` is shown on `/healthz`: pass the outermost message,
    /// not the whole chain, which belongs in the log.
    pub fn failed(&self, source: &str, error: &str) {
        let now = crate::now();
        if let Ok(mut map) = self.0.write() {
            let entry = map.entry(source.to_string()).or_insert(SourceHealth {
                ok: false,
                last_ok: None,
                last_error: None,
                since: now,
            });
            if entry.ok {
                entry.since = now;
            }
            entry.ok = false;
            entry.last_error = Some(error.to_string());
        }
    }

    /// A copy of every source's state.
    pub fn snapshot(&self) -> BTreeMap<String, SourceHealth> {
        self.0.read().map(|m| m.clone()).unwrap_or_default()
    }
}
