//! Outgoing mail. Rows are written to the outbox table in the same transaction as the
//! decision that causes them; this worker drains the table. The only module that knows
//! lettre.
//!
//! Delivery is at least once: a mail is marked sent after the transport accepted it, so a
//! crash in between sends it again. The file transport names files by outbox id, which
//! makes a resend overwrite the same file (exactly once on disk). SMTP has no such
//! guarantee; the window is one send.

mod smtp;
pub mod templates;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, Message, MultiPart};
use tokio_util::sync::CancellationToken;

use crate::store::{OutboxClaim, OutboxRow, Store, StoreError};

pub use smtp::{MAX_PER_CONNECTION, SmtpTransport, Step};
pub use templates::Templates;

/// Headers every mail we send carries, so replies thread and loops are caught.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub from_name: String,
    /// Value of our `X-Intake-Loop` header.
    pub loop_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot build message {id}: {message}")]
    Build { id: i64, message: String },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up SMTP for {address}: {message}")]
    SmtpSetup { address: String, message: String },
    /// The relay refused (or failed) the exchange at `step`.
    #[error("cannot send through {address} {step}")]
    Smtp {
        address: String,
        step: Step,
        #[source]
        source: lettre::transport::smtp::Error,
    },
    /// The mail needs an extension the relay does not offer (SMTPUTF8, 8BITMIME).
    #[error("cannot send through {address}: {what}")]
    SmtpUnsupported { address: String, what: &'static str },
    #[error("cannot send through {address}: {what}")]
    SmtpIo {
        address: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl SendError {
    /// Build errors and refused recipients fail the same way every time; others may not.
    pub fn is_permanent(&self) -> bool {
        match self {
            SendError::Build { .. } => true,
            SendError::Smtp { .. } => self.is_recipient_refused(),
            SendError::Write { .. }
            | SendError::SmtpSetup { .. }
            | SendError::SmtpIo { .. }
            | SendError::SmtpUnsupported { .. } => false,
        }
    }

    /// Whether the relay refused the recipient for good (see [`recipient_refused`]):
    /// the address is as undeliverable as after a permanent bounce.
    pub fn is_recipient_refused(&self) -> bool {
        matches!(self, SendError::Smtp { step, source, .. } if recipient_refused(*step, source))
    }

    /// Whether the relay could not be reached or would not open a session (name lookup,
    /// TCP, TLS, greeting, EHLO, STARTTLS, AUTH): nothing about the mail being sent.
    pub fn is_relay_unavailable(&self) -> bool {
        match self {
            SendError::Smtp { step, .. } => *step == smtp::Step::Connect,
            SendError::SmtpIo { what, .. } => smtp::CONNECTING.contains(what),
            _ => false,
        }
    }

    /// Whether the relay refused our sender address for good (see [`sender_refused`]:
    /// Postfix's `553 5.7.1 Sender address rejected: not owned by user`, Exchange
    /// Online's `550 5.7.60 SendAsDenied`): the relay's configuration or ours, the same
    /// for every mail, to be fixed by an admin. Such mail is retried.
    pub fn is_sender_refused(&self) -> bool {
        matches!(self, SendError::Smtp { step, source, .. } if sender_refused(*step, source))
    }
}

/// RFC 3834's `Auto-Submitted` for a mail: `auto-replied` when it answers a message (an
/// acknowledgement, a notice, a link or invitation sent because that message came in),
/// `auto-generated` otherwise. Either way responders and desks do not answer it.
fn auto_submitted(row: &OutboxRow) -> &'static str {
    match row.in_reply_to {
        Some(_) => "auto-replied",
        None => "auto-generated",
    }
}

/// Builds the RFC 5322 message for an outbox row.
pub fn build_message(row: &OutboxRow, stamp: &Stamp) -> Result<Message, SendError> {
    let bad = |message: String| SendError::Build {
        id: row.id,
        message,
    };
    let from: Mailbox = format!("{} <{}>", quote_name(&stamp.from_name), row.from)
        .parse()
        .map_err(|e| bad(format!("from {}: {e}", row.from)))?;
    let to: Mailbox = row
        .to
        .parse()
        .map_err(|e| bad(format!("to {}: {e}", row.to)))?;
    let mut builder = Message::builder()
        .from(from)
        .to(to)
        .subject(row.subject.clone())
        .message_id(Some(format!("<{}>", row.message_id)))
        .date(std::time::UNIX_EPOCH + Duration::from_secs(row.created_at.max(0) as u64))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            auto_submitted(row).into(),
        ))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("X-Auto-Response-Suppress"),
            "All".into(),
        ))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("X-Intake-Loop"),
            stamp.loop_id.clone(),
        ));
    if let Some(parent) = &row.in_reply_to {
        builder = builder
            .in_reply_to(format!("<{parent}>"))
            .references(format!("<{parent}>"));
    }
    match &row.body_html {
        Some(html) => builder
            .multipart(MultiPart::alternative_plain_html(
                row.body_text.clone(),
                html.clone(),
            ))
            .map_err(|e| bad(e.to_string())),
        None => builder
            .header(ContentType::TEXT_PLAIN)
            .body(row.body_text.clone())
            .map_err(|e| bad(e.to_string())),
    }
}

/// Whether the relay refused the recipient itself, so retrying cannot help (and the
/// address is marked undeliverable): a 550 (mailbox unavailable), 551 (not local) or
/// 553 (name not allowed) reply to RCPT TO whose enhanced status is 5.1.x (addressing:
/// `5.1.1 User unknown`), or such a status after the message (some relays check
/// recipients only then) — but not 5.1.7/5.1.8 (the *sender's* address) nor "Sender
/// address rejected", which Postfix gives at RCPT TO by default ([`sender_refused`]).
///
/// Anything else is retried until `max_attempts` like a transient failure, so one
/// misconfiguration does not kill every queued mail nor mark every recipient: a 5xx
/// reply to MAIL FROM, 5.7.x (`Unable to relay`, policy), a refusal without an enhanced
/// status (`550 relay not permitted` reads like `550 no such user`), 530 or 535 for a
/// login the relay wants or refuses, 554 for a policy the admin may fix.
fn recipient_refused(step: Step, e: &lettre::transport::smtp::Error) -> bool {
    if !e.is_permanent() || sender_refused(step, e) {
        return false;
    }
    let addressing = enhanced_status(e).is_some_and(|s| s.starts_with("5.1."));
    match step {
        Step::Recipient => {
            addressing
                && e.status()
                    .is_some_and(|code| matches!(code.to_string().as_str(), "550" | "551" | "553"))
        }
        Step::Message => addressing,
        Step::Connect | Step::Sender | Step::Data => false,
    }
}

/// Whether a permanent refusal is about our sender address: any reply to MAIL FROM, or
/// one whose enhanced status is 5.1.7/5.1.8 (bad sender mailbox or domain, RFC 3463) or
/// whose text says "Sender address rejected" (Postfix answers RCPT TO so by default).
fn sender_refused(step: Step, e: &lettre::transport::smtp::Error) -> bool {
    use std::error::Error as _;
    if !e.is_permanent() {
        return false;
    }
    step == Step::Sender
        || enhanced_status(e).is_some_and(|s| s == "5.1.7" || s == "5.1.8")
        || e.source().is_some_and(|t| {
            t.to_string()
                .to_ascii_lowercase()
                .contains("sender address rejected")
        })
}

/// The enhanced status code (RFC 3463, `5.1.1`) a reply's text starts with, if any.
/// lettre keeps the reply's text as the error's source.
fn enhanced_status(e: &lettre::transport::smtp::Error) -> Option<String> {
    use std::error::Error as _;
    let text = e.source()?.to_string();
    let word = text.split_whitespace().next()?;
    let mut parts = word.split('.');
    let well_formed = matches!(parts.next(), Some("2" | "4" | "5"))
        && parts.clone().count() == 2
        && parts.all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    well_formed.then(|| word.to_string())
}

/// Where mail goes.
#[derive(Clone)]
pub enum Transport {
    File(FileTransport),
    Smtp(SmtpTransport),
}

impl Transport {
    pub async fn send(&self, row: &OutboxRow, message: &Message) -> Result<(), SendError> {
        match self {
            Transport::File(f) => f.send(row, message).await,
            Transport::Smtp(s) => s.send(message).await,
        }
    }

    /// The longest one send takes: bounded by the relay's timeouts; a file is written
    /// at once.
    pub fn longest_send(&self) -> Duration {
        match self {
            Transport::File(_) => Duration::from_secs(5),
            Transport::Smtp(s) => s.longest_send(),
        }
    }

    /// The end of a pass: an open SMTP connection is closed.
    pub async fn finish(&self) {
        if let Transport::Smtp(s) = self {
            s.finish().await;
        }
    }
}

/// Display names go inside quotes; quotes and backslashes inside them are escaped.
fn quote_name(name: &str) -> String {
    let cleaned = crate::message::one_line(name, 100);
    format!("\"{}\"", cleaned.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Writes each mail as `<dir>/<outbox id>-<kind>.eml` (atomically, via a temp file).
#[derive(Debug, Clone)]
pub struct FileTransport {
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileTransport { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub async fn send(&self, row: &OutboxRow, message: &Message) -> Result<(), SendError> {
        let write_err = |path: &Path, source| SendError::Write {
            path: path.display().to_string(),
            source,
        };
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| write_err(&self.dir, e))?;
        let name = format!("{:08}-{}.eml", row.id, row.kind);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let path = self.dir.join(&name);
        let dir = self.dir.clone();
        let bytes = message.formatted();
        // On disk before the row says sent: the file (written whole, then renamed into
        // place) and the directory entry that names it.
        let written = tokio::task::spawn_blocking(move || -> Result<(), SendError> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp).map_err(|e| write_err(&tmp, e))?;
            file.write_all(&bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| write_err(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| write_err(&path, e))?;
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| write_err(&dir, e))
        })
        .await;
        written.unwrap_or_else(|e| {
            Err(SendError::Write {
                path: self.dir.display().to_string(),
                source: std::io::Error::other(e),
            })
        })
    }
}

/// Retry schedule: `first`, then doubling (30 s, 1 min, 2 min, ... by default), capped at
/// one hour, with up to 20% jitter so many failures do not retry in lockstep.
pub fn backoff_secs(attempts: i64, first: i64) -> i64 {
    let exp = attempts.clamp(1, 20) - 1;
    let base = (first.max(1) << exp.min(12)).min(3600);
    let jitter = (rand::random::<u32>() % 1000) as i64 * base / 5000;
    base + jitter
}

/// Counts from one pass over the queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    pub sent: usize,
    pub failed: usize,
    pub dead: usize,
    /// Claimed but given back untried: too little of the claim was left for a send.
    pub given_back: usize,
}

/// Drains the outbox.
pub struct Worker {
    pub store: Store,
    pub transport: Transport,
    pub stamp: Stamp,
    pub max_attempts: u32,
    pub poll_interval: Duration,
    /// The first retry's delay; later ones double.
    pub retry_first_secs: i64,
    /// How long a claimed mail is this worker's before another may send it: longer
    /// than one send can take. If the worker dies, its claimed mail waits this long.
    pub claim_lease_secs: i64,
    /// Held for a whole pass: the last pass at shutdown waits for the running worker's
    /// pass (its mail in flight, and recording it) before it starts.
    pub pass: tokio::sync::Mutex<()>,
    /// The relay's recent unavailability: while it lasts, passes send nothing.
    pub relay: std::sync::Mutex<RelayState>,
}

/// How the relay has been doing: failures in a row to open a session, and until when
/// the worker leaves it alone; the recipients it refused since it last took a mail.
#[derive(Debug, Default)]
pub struct RelayState {
    failures: u32,
    paused_until: Option<std::time::Instant>,
    /// Address → the refusals of it believed (outbox id, when its account was marked).
    refused: std::collections::BTreeMap<String, Vec<(i64, i64)>>,
}

/// What a recipient refusal (5.1.x) is taken for.
enum Refusal {
    /// The address: the mail is dead, the account undeliverable.
    Believed,
    /// The relay: retried like a failure. `undo` holds the refusals believed earlier in
    /// the same run (address, outbox id, when marked), to be taken back: the run
    /// reached [`REFUSED_IN_A_ROW`] with this one.
    Suspect { undo: Vec<(String, i64, i64)> },
}

/// Different recipients refused (5.1.x) in a row, with no mail taken in between, from
/// which the relay is suspected rather than the addresses: a relay whose recipient
/// lookup is broken refuses everyone, and each address would be marked undeliverable.
/// Then the marks of the run so far are taken back (their mail is retried), and from
/// this one on a refusal is an ordinary failure (retried with backoff, dead after
/// `max_attempts`), until the relay takes a mail again.
const REFUSED_IN_A_ROW: usize = 5;

/// The longest pause between tries of an unavailable relay.
const RELAY_PAUSE_MAX_SECS: i64 = 300;

/// Logs an outcome that was not recorded because the claim had passed to another worker
/// (this one was slower than its lease): that worker's outcome stands.
fn lost_claim(id: i64, held: bool) {
    if !held {
        tracing::warn!(
            outbox_id = id,
            "another worker claimed this mail while it was being sent (the claim ran out): its outcome stands, and the mail may have gone out twice"
        );
    }
}

/// Mails claimed at once: small, so a worker that dies strands few, and its lease
/// (`claim_lease_secs`) need only cover a few sends.
const CLAIM: i64 = 2;

/// The claim lease for a transport: long enough for every claimed mail's longest send
/// ([`smtp::longest_send`]), so no other worker claims a mail still being sent.
pub fn claim_lease_secs(smtp_timeout: Option<Duration>) -> i64 {
    match smtp_timeout {
        Some(t) => CLAIM * smtp::longest_send(t.max(Duration::from_secs(1))).as_secs() as i64 + 5,
        None => 30,
    }
}

impl Worker {
    /// Sends everything due now, in batches, until nothing is due. `now` is when the
    /// pass starts; every claim, sent time and retry time reads the clock afresh (never
    /// earlier than `now`), as a pass over a long backlog takes a while.
    pub async fn drain_once(&self, now: i64) -> Result<DrainReport, StoreError> {
        self.drain_while(now, || true).await
    }

    /// A pass that starts no new mail after `deadline`: the last pass at shutdown. It
    /// waits for a pass in progress. A mail whose sending has begun is never cut short
    /// (the relay may have taken it, and cut before it is marked sent it would go out
    /// again); its time is bounded by the relay's timeouts ([`Worker::longest_mail`]).
    /// Claimed mail not begun is given back, due at once.
    pub async fn drain_before(
        &self,
        now: i64,
        deadline: std::time::Instant,
    ) -> Result<DrainReport, StoreError> {
        self.drain_while(now, || std::time::Instant::now() < deadline)
            .await
    }

    /// A pass that starts each mail only while `go_on()`.
    async fn drain_while(
        &self,
        now: i64,
        go_on: impl Fn() -> bool,
    ) -> Result<DrainReport, StoreError> {
        let _pass = self.pass.lock().await;
        let result = self.drain(now, go_on).await;
        self.transport.finish().await;
        result
    }

    async fn drain(&self, now: i64, go_on: impl Fn() -> bool) -> Result<DrainReport, StoreError> {
        let mut report = DrainReport::default();
        let clock = || now.max(crate::now());
        if !self.relay_paused() {
            self.store.outbox_drop_undeliverable(clock()).await?;
        }
        loop {
            if !go_on() || self.relay_paused() {
                return Ok(report);
            }
            // When the claim was made, by the wall clock, not the monotonic one: it runs
            // on while the machine sleeps (and a paused VM's is set right on resume).
            let claimed = std::time::SystemTime::now();
            // Small claims, each with the clock read afresh: a slow relay must not let a
            // lease run out while its rows are still waiting in this worker.
            let rows = self
                .store
                .claim_outbox(CLAIM, clock(), self.claim_lease_secs)
                .await?;
            if rows.is_empty() {
                return Ok(report);
            }
            let mut rows = rows.into_iter();
            while let Some(row) = rows.next() {
                if !go_on() {
                    for unsent in std::iter::once(row).chain(rows) {
                        let held = self
                            .store
                            .outbox_release(unsent.claim(), clock(), None)
                            .await?;
                        lost_claim(unsent.id, held);
                    }
                    return Ok(report);
                }
                // A worker frozen past its lease (a paused VM, a suspended machine, a
                // stalled database) must not send what another worker has claimed
                // since. Within the first half of the lease by the wall clock nobody
                // can have (clocks would have to be that far apart), and the check, a
                // query per mail (a fifth of the CPU per message on PostgreSQL), is
                // skipped. Not by the monotonic clock: it stands still while a machine
                // sleeps, so it cannot tell that the lease ran out.
                // Past that, the claim must hold for a whole send more: a send started
                // near its end could still be running when another worker claims the
                // mail (after a record_sent that waited out a database failover, say).
                let fresh = claimed
                    .elapsed()
                    .is_ok_and(|e| e.as_secs_f64() < self.claim_lease_secs as f64 / 2.0);
                let until = clock() + self.transport.longest_send().as_secs() as i64;
                if !fresh && !self.store.outbox_claim_holds(row.claim(), until).await? {
                    // Given back uncounted if still ours; else another worker has it.
                    let held = self
                        .store
                        .outbox_release(row.claim(), clock(), None)
                        .await?;
                    tracing::warn!(
                        outbox_id = row.id,
                        held,
                        "too little of the claim on this mail was left for a send; it is left to the next claim"
                    );
                    report.given_back += 1;
                    continue;
                }
                let result = match build_message(&row, &self.stamp) {
                    Ok(message) => self.transport.send(&row, &message).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        self.relay_works();
                        self.record_sent(row.claim(), clock()).await?;
                        report.sent += 1;
                        tracing::info!(outbox_id = row.id, kind = %row.kind, to = %row.to, "mail sent");
                    }
                    Err(e) => {
                        let text = error_chain(&e);
                        if e.is_relay_unavailable() {
                            // Nothing about this mail: it was tried (the attempt counts,
                            // so the failures metric shows the outage) but never dies of
                            // it; the rest of the claim goes back untried, and the queue
                            // waits for the relay (a long outage used to make every
                            // queued mail dead, verification links too).
                            let pause = self.relay_failed();
                            let held = self
                                .store
                                .outbox_failed(row.claim(), &text, Some(clock()))
                                .await?;
                            lost_claim(row.id, held);
                            for r in rows.by_ref() {
                                let held = self
                                    .store
                                    .outbox_release(r.claim(), clock(), Some(&text))
                                    .await?;
                                lost_claim(r.id, held);
                            }
                            report.failed += 1;
                            if matches!(&e, SendError::Smtp { source, .. } if source.is_permanent())
                            {
                                // 530/535 at AUTH, 5xx to EHLO: our settings, not an outage.
                                tracing::error!(error = %text, retry_in = ?pause, "the SMTP relay refuses our session: check [smtp] (username, password, TLS); no mail is sent until it accepts, and none dies of it");
                            } else {
                                tracing::warn!(error = %text, retry_in = ?pause, "the SMTP relay is unavailable; no mail is sent until it is, and none dies of it");
                            }
                            return Ok(report);
                        }
                        // The time a believed refusal marks the account with: taking the
                        // mark back matches it.
                        let at = clock();
                        let refusal = e
                            .is_recipient_refused()
                            .then(|| self.judge_refusal(&row.to, row.id, at));
                        if let Some(Refusal::Suspect { undo }) = &refusal
                            && !undo.is_empty()
                        {
                            let revived = self
                                .store
                                .outbox_unrefuse(
                                    undo,
                                    clock() + backoff_secs(1, self.retry_first_secs),
                                    clock(),
                                )
                                .await?;
                            let addresses: Vec<&str> =
                                undo.iter().map(|(a, _, _)| a.as_str()).collect();
                            tracing::error!(
                                ?addresses,
                                revived,
                                "the SMTP relay refused {REFUSED_IN_A_ROW} different recipients in a row and took no mail: these addresses are not marked undeliverable after all, and their mail is retried"
                            );
                        }
                        if let Some(Refusal::Believed) = refusal {
                            // Dead, and the address undeliverable as after a permanent
                            // bounce: no more invitations or links are queued for it.
                            let held = self
                                .store
                                .outbox_refused(row.claim(), &row.to, &text, at)
                                .await?;
                            lost_claim(row.id, held);
                            report.dead += 1;
                            tracing::error!(outbox_id = row.id, to = %row.to, error = %text, "the relay refused the recipient; the mail is dead and the address undeliverable");
                            continue;
                        }
                        let suspect = matches!(refusal, Some(Refusal::Suspect { .. }));
                        let dead = (e.is_permanent() && !suspect)
                            || row.attempts >= i64::from(self.max_attempts);
                        // From the time of the failure, not the start of the pass: a
                        // retry time in the pass's past is due again at once, and a
                        // transient failure used up every attempt within one pass.
                        let retry_at = (!dead)
                            .then(|| clock() + backoff_secs(row.attempts, self.retry_first_secs));
                        let held = self
                            .store
                            .outbox_failed(row.claim(), &text, retry_at)
                            .await?;
                        lost_claim(row.id, held);
                        if dead {
                            report.dead += 1;
                            tracing::error!(outbox_id = row.id, error = %text, "mail is dead after {} attempts", row.attempts);
                        } else if suspect {
                            report.failed += 1;
                            tracing::error!(outbox_id = row.id, to = %row.to, error = %text, "the SMTP relay refused {REFUSED_IN_A_ROW} or more different recipients in a row and took no mail: suspecting the relay (its recipient lookup), not the addresses, none more is marked undeliverable until it takes a mail; will retry");
                        } else if e.is_sender_refused() {
                            report.failed += 1;
                            tracing::error!(outbox_id = row.id, from = %row.from, error = %text, "the SMTP relay refuses our sender address: a configuration problem (smtp login, or the desk addresses it may send as); will retry");
                        } else {
                            report.failed += 1;
                            tracing::warn!(outbox_id = row.id, error = %text, "sending failed; will retry");
                        }
                    }
                }
            }
        }
    }

    fn relay_paused(&self) -> bool {
        self.relay.lock().is_ok_and(|r| {
            r.paused_until
                .is_some_and(|until| std::time::Instant::now() < until)
        })
    }

    /// The relay took a mail: no pause.
    fn relay_works(&self) {
        if let Ok(mut r) = self.relay.lock() {
            *r = RelayState::default();
        }
    }

    /// The relay refused `to` (5.1.x) for mail `outbox_id`: believed while fewer than
    /// [`REFUSED_IN_A_ROW`] different recipients were refused since it last took a mail
    /// (the account is then marked at `now`).
    fn judge_refusal(&self, to: &str, outbox_id: i64, now: i64) -> Refusal {
        let Ok(mut r) = self.relay.lock() else {
            return Refusal::Believed;
        };
        let tripped = r.refused.len() >= REFUSED_IN_A_ROW;
        let entry = r.refused.entry(to.to_ascii_lowercase()).or_default();
        if tripped {
            return Refusal::Suspect { undo: Vec::new() };
        }
        entry.push((outbox_id, now));
        if r.refused.len() < REFUSED_IN_A_ROW {
            return Refusal::Believed;
        }
        let undo = r
            .refused
            .iter_mut()
            .flat_map(|(a, marks)| {
                std::mem::take(marks)
                    .into_iter()
                    .map(|(id, at)| (a.clone(), id, at))
                    .collect::<Vec<_>>()
            })
            .filter(|(_, id, _)| *id != outbox_id)
            .collect();
        Refusal::Suspect { undo }
    }

    /// The relay was unavailable again: the pause before the next try (`retry_first`,
    /// doubling, at most [`RELAY_PAUSE_MAX_SECS`]).
    fn relay_failed(&self) -> Duration {
        let Ok(mut r) = self.relay.lock() else {
            return Duration::ZERO;
        };
        r.failures = r.failures.saturating_add(1);
        let secs =
            backoff_secs(i64::from(r.failures), self.retry_first_secs).min(RELAY_PAUSE_MAX_SECS);
        let pause = Duration::from_secs(secs.max(1) as u64);
        r.paused_until = Some(std::time::Instant::now() + pause);
        pause
    }

    /// How long to allow one mail at shutdown, from its claim check to its outcome
    /// recorded: the transport's longest send, and 10 s to record it (a database away
    /// for longer at shutdown cannot be waited for; that mail goes out again).
    pub fn longest_mail(&self) -> Duration {
        self.transport.longest_send() + Duration::from_secs(10)
    }

    /// Marks a mail the transport accepted as sent. While the database is away for a
    /// moment (a restart, a failover) it keeps trying, for up to the claim lease:
    /// giving up at once left the row claimed, and the mail went out a second time when
    /// the claim ran out (crash::postgres_crash_and_restart_under_a_running_backlog_loses_nothing).
    async fn record_sent(&self, claim: OutboxClaim, now: i64) -> Result<(), StoreError> {
        let deadline =
            std::time::Instant::now() + Duration::from_secs(self.claim_lease_secs.max(1) as u64);
        let mut pause = Duration::from_millis(200);
        loop {
            match self.store.outbox_sent(claim, now).await {
                Err(e) if e.is_transient() && std::time::Instant::now() + pause < deadline => {
                    tracing::warn!(outbox_id = claim.id, error = %error_chain(&e), "cannot record a sent mail yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
                Ok(held) => {
                    lost_claim(claim.id, held);
                    return Ok(());
                }
            }
        }
    }

    /// Runs until `shutdown`; `wake` is notified when new mail was queued.
    pub async fn run(
        &self,
        shutdown: CancellationToken,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) {
        let mut failures = 0u32;
        loop {
            // Shutdown lets the mail being sent finish and starts no more: the daemon's
            // last pass (`drain_before`) takes what is left.
            match self
                .drain_while(crate::now(), || !shutdown.is_cancelled())
                .await
            {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %error_chain(&e), "outbox pass failed");
                }
            }
            let pause = if failures == 0 {
                self.poll_interval
            } else {
                Duration::from_secs(1 << failures.min(6))
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// `error: cause: cause` on one line, for logs and the outbox's last_error.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
