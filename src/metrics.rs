//! Prometheus metrics for `GET /metrics`, in the text exposition format 0.0.4, written by
//! hand (a few dozen lines do not need the prometheus crate and its global registry).
//!
//! Counters are derived from the database at scrape time: ledger and audit rows are never
//! deleted, so their counts only grow, survive restarts and are the same whichever
//! instance answers (with several instances on one PostgreSQL database every instance
//! reports the same database-wide values: aggregate them with `max`, not `sum`). What
//! only this process knows — the processing latency histogram and the mailboxes'
//! health — is kept in memory.
//!
//! The SQL of [`gather`] is here rather than in `store/` because this module was added
//! beside the store without changing it; it only reads, and belongs in
//! `store/queries.rs` when that file is next touched.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::Row;

use crate::health::SourceHealth;
use crate::store::{Context, Store, StoreError};

/// Upper bounds of the processing latency buckets, in microseconds (exact integers, so an
/// observation lands in the same bucket on every platform). Rendered as seconds.
pub const LATENCY_BUCKETS_MICROS: [u64; 13] = [
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 30_000_000, 60_000_000,
];

const BUCKETS: usize = LATENCY_BUCKETS_MICROS.len();

/// A lock-free histogram with fixed buckets. Each bucket counts only its own
/// observations (plus one overflow counter); [`Histogram::snapshot`] makes them
/// cumulative and derives the total from them, so a snapshot is always consistent
/// (`+Inf` equals `_count`) even while other threads observe.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    overflow: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            overflow: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records `times` observations of `value` (a batch of messages that took `value`).
    pub fn observe_many(&self, value: Duration, times: u64) {
        if times == 0 {
            return;
        }
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        let slot = LATENCY_BUCKETS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .and_then(|i| self.buckets.get(i))
            .unwrap_or(&self.overflow);
        // Relaxed: the counters are independent totals; nothing is published through them.
        slot.fetch_add(times, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(micros.saturating_mul(times), Ordering::Relaxed);
    }

    pub fn observe(&self, value: Duration) {
        self.observe_many(value, 1);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(BUCKETS);
        let mut running = 0u64;
        for (bound, count) in LATENCY_BUCKETS_MICROS.iter().zip(&self.buckets) {
            running = running.saturating_add(count.load(Ordering::Relaxed));
            cumulative.push((*bound as f64 / 1e6, running));
        }
        let count = running.saturating_add(self.overflow.load(Ordering::Relaxed));
        HistogramSnapshot {
            buckets: cumulative,
            count,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Seconds from the start of a batch until its commit, once per message of the batch
/// (every message of a batch waits for the same commit). A process-wide static because
/// the pipeline records it at one spot without carrying a registry around; each process
/// (daemon, `intake process`) has its own.
pub static PROCESSING: Histogram = Histogram::new();

/// A histogram as it is exposed: cumulative buckets `(upper bound in seconds, count)`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// What the database says, read at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatabaseCounts {
    /// (action, reason) → messages in the ledger.
    pub messages: BTreeMap<(String, String), u64>,
    /// Account kind (`internal`, `portal_only`) → accounts created by decisions.
    pub accounts_created: BTreeMap<String, u64>,
    /// Reason → To/Cc addresses dropped.
    pub participants_dropped: BTreeMap<String, u64>,
    /// Status → outgoing mail not yet sent (`pending`, `sending`, `dead`, ...).
    pub outbox: BTreeMap<String, u64>,
    /// Failed send attempts recorded on outbox rows.
    pub send_failures: u64,
}

/// A mailbox's health as a gauge.
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxLag {
    pub mailbox: String,
    pub up: bool,
    /// 0 while the mailbox works; otherwise seconds since it stopped working (since it
    /// first failed, when it never worked).
    pub lag_seconds: i64,
}

impl MailboxLag {
    /// `now - since` of a failing source. Not `now - last_ok`: an IMAP source reports
    /// success when it connects, then sits in IDLE for hours while perfectly healthy.
    pub fn from_health(mailbox: &str, h: &SourceHealth, now: i64) -> MailboxLag {
        MailboxLag {
            mailbox: mailbox.to_string(),
            up: h.ok,
            lag_seconds: if h.ok { 0 } else { (now - h.since).max(0) },
        }
    }
}

/// Everything one scrape reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `None` when the database could not be read (the scrape still reports the rest).
    pub database: Option<DatabaseCounts>,
    pub mailboxes: Vec<MailboxLag>,
    pub processing: HistogramSnapshot,
}

/// Reads the database-derived counters: three GROUP BY queries returning a handful of
/// rows each. The ledger and audit_addresses ones read covering indexes (migration 0004);
/// the outbox one reads the outbox, which holds only the mail intake sent.
pub async fn gather(store: &Store) -> Result<DatabaseCounts, StoreError> {
    let mut conn = store.acquire().await?;
    let mut counts = DatabaseCounts::default();
    for row in sqlx::query("SELECT action, reason, COUNT(*) FROM ledger GROUP BY action, reason")
        .fetch_all(&mut *conn)
        .await
        .ctx("count processed messages")?
    {
        let action: String = row.try_get(0).ctx("read message counts")?;
        let reason: String = row.try_get(1).ctx("read message counts")?;
        let n: i64 = row.try_get(2).ctx("read message counts")?;
        counts.messages.insert((action, reason), n.max(0) as u64);
    }
    counts.accounts_created.insert("internal".into(), 0);
    counts.accounts_created.insert("portal_only".into(), 0);
    // Participants of a held request are recorded as `drop`/`request_held` and decided
    // again at release (which is recorded too): they are not counted as dropped. The
    // filtering is done here so the query is a range on the `audit_addresses_outcome`
    // covering index.
    for row in sqlx::query(
        "SELECT outcome, reason, role, COUNT(*) FROM audit_addresses \
         WHERE outcome IN ('create_internal', 'create_portal_only', 'drop') \
         GROUP BY outcome, reason, role",
    )
    .fetch_all(&mut *conn)
    .await
    .ctx("count account and participant decisions")?
    {
        let outcome: String = row.try_get(0).ctx("read decision counts")?;
        let reason: String = row.try_get(1).ctx("read decision counts")?;
        let role: String = row.try_get(2).ctx("read decision counts")?;
        let n = row.try_get::<i64, _>(3).ctx("read decision counts")?.max(0) as u64;
        let created = &mut counts.accounts_created;
        match (outcome.as_str(), role.as_str()) {
            ("create_internal", _) => *created.entry("internal".into()).or_default() += n,
            ("create_portal_only", _) => *created.entry("portal_only".into()).or_default() += n,
            ("drop", "participant") if reason != "request_held" => {
                *counts.participants_dropped.entry(reason).or_default() += n;
            }
            _ => {}
        }
    }
    for status in ["pending", "sending", "dead"] {
        counts.outbox.insert(status.into(), 0);
    }
    // SUM is NUMERIC on PostgreSQL: cast it back to BIGINT for the Any driver.
    for row in sqlx::query(
        "SELECT status, COUNT(*), CAST(COALESCE(SUM(attempts), 0) AS BIGINT) FROM outbox GROUP BY status",
    )
    .fetch_all(&mut *conn)
    .await
    .ctx("count the outbox")?
    {
        let status: String = row.try_get(0).ctx("read outbox counts")?;
        let rows = row.try_get::<i64, _>(1).ctx("read outbox counts")?.max(0) as u64;
        let attempts = row.try_get::<i64, _>(2).ctx("read outbox counts")?.max(0) as u64;
        // A sent row's last attempt succeeded; a sending row's last attempt is in flight.
        let failures = match status.as_str() {
            "sent" | "sending" => attempts.saturating_sub(rows),
            _ => attempts,
        };
        counts.send_failures += failures;
        if status != "sent" {
            counts.outbox.insert(status, rows);
        }
    }
    Ok(counts)
}

/// The metric families, in the order they are written.
pub mod names {
    pub const DATABASE_UP: &str = "intake_database_up";
    pub const MESSAGES: &str = "intake_messages_total";
    pub const ACCOUNTS_CREATED: &str = "intake_accounts_created_total";
    pub const PARTICIPANTS_DROPPED: &str = "intake_participants_dropped_total";
    pub const OUTBOX: &str = "intake_outbox_messages";
    pub const SEND_FAILURES: &str = "intake_outbox_send_failures_total";
    pub const MAILBOX_UP: &str = "intake_mailbox_up";
    pub const MAILBOX_LAG: &str = "intake_mailbox_lag_seconds";
    pub const PROCESSING: &str = "intake_message_processing_seconds";
}

/// Writes a snapshot in the text exposition format 0.0.4.
pub fn render(s: &Snapshot) -> String {
    let mut e = Exposition::default();
    e.family(
        names::DATABASE_UP,
        Kind::Gauge,
        "1 when this scrape could read the database; the database-derived series are missing otherwise.",
    );
    e.sample(
        names::DATABASE_UP,
        &[],
        if s.database.is_some() { 1.0 } else { 0.0 },
    );
    if let Some(db) = &s.database {
        e.family(
            names::MESSAGES,
            Kind::Counter,
            "Messages processed (ledger rows), by action and reason code. Database-wide.",
        );
        for ((action, reason), n) in &db.messages {
            e.sample(
                names::MESSAGES,
                &[("action", action), ("reason", reason)],
                *n as f64,
            );
        }
        e.family(
            names::ACCOUNTS_CREATED,
            Kind::Counter,
            "Customer accounts created by decisions on mail, by kind. Database-wide.",
        );
        for (kind, n) in &db.accounts_created {
            e.sample(names::ACCOUNTS_CREATED, &[("kind", kind)], *n as f64);
        }
        e.family(
            names::PARTICIPANTS_DROPPED,
            Kind::Counter,
            "To/Cc addresses not made participants, by reason code. Database-wide.",
        );
        for (reason, n) in &db.participants_dropped {
            e.sample(
                names::PARTICIPANTS_DROPPED,
                &[("reason", reason)],
                *n as f64,
            );
        }
        e.family(
            names::OUTBOX,
            Kind::Gauge,
            "Outgoing mail not yet sent, by status. Database-wide.",
        );
        for (status, n) in &db.outbox {
            e.sample(names::OUTBOX, &[("status", status)], *n as f64);
        }
        e.family(
            names::SEND_FAILURES,
            Kind::Counter,
            "Failed attempts to send outgoing mail. Database-wide; `intake outbox retry` resets it for the mail it retries, and deleting sent mail past outbox.keep_sent for that mail.",
        );
        e.sample(names::SEND_FAILURES, &[], db.send_failures as f64);
    }
    e.family(
        names::MAILBOX_UP,
        Kind::Gauge,
        "1 while the mailbox works (connected or polling), 0 while it fails. This instance's mailboxes.",
    );
    for m in &s.mailboxes {
        e.sample(
            names::MAILBOX_UP,
            &[("mailbox", &m.mailbox)],
            if m.up { 1.0 } else { 0.0 },
        );
    }
    e.family(
        names::MAILBOX_LAG,
        Kind::Gauge,
        "Seconds since the mailbox last worked: 0 while it works. This instance's mailboxes.",
    );
    for m in &s.mailboxes {
        e.sample(
            names::MAILBOX_LAG,
            &[("mailbox", &m.mailbox)],
            m.lag_seconds as f64,
        );
    }
    e.histogram(
        names::PROCESSING,
        "Seconds from the start of a message's batch until its commit, per message. This process only.",
        &s.processing,
    );
    e.finish()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A text exposition being written. Metric and label names are the caller's constants;
/// label values and help texts are escaped here.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// `# HELP` and `# TYPE` of a family; write its samples next.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(is_valid_name(name), "bad metric name {name:?}");
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                debug_assert!(is_valid_name(label), "bad label name {label:?}");
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label_value(value));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
    }

    /// A whole histogram family: cumulative `_bucket`s ending with `+Inf`, `_sum`, `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in &h.buckets {
            self.sample(&bucket, &[("le", &format_value(*bound))], *count as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Label values: backslash, double quote and line feed are escaped.
pub fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            _ => out.push(c),
        }
    }
    out
}

/// HELP texts: backslash and line feed are escaped (quotes are not, in 0.0.4).
pub fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Sample values: Go's float syntax as Prometheus parses it, integers without a fraction.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        // Rust's Display is the shortest representation that reads back exactly, never
        // with an exponent: "2", "0.005", "1.5".
        format!("{v}")
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
