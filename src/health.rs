//! What each mailbox last reported, for `/healthz` (and later the service status line).

use std::collections::BTreeMap;
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
