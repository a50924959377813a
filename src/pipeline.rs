//! parse → route → (ledger claim, facts, decide, apply) in one transaction per batch.
//!
//! Sources hand in [`Envelope`]s and acknowledge them only after
//! [`Pipeline::process_batch`] returned, i.e. after the commit. Every message gets its own
//! savepoint, so one that fails for a reason other than the database being unavailable is
//! quarantined and the rest of the batch still commits. A transient database error fails
//! the whole batch: nothing is acknowledged and the source retries it later.

use std::sync::Arc;

use sqlx::Connection;
use tracing::Instrument;

use crate::config::Config;
use crate::keys::DeskKey;
use crate::message::{self, InboundMessage, ParseError};
use crate::outbox::Templates;
use crate::policy::{self, Decision, Reason};
use crate::store::{
    self, ApplyInput, ApplyResult, ClaimItem, Deferred, DirectoryIndex, Known, Lookups,
    QuarantineRecord, SourceRef, Store, StoreError,
};

/// One message as a source delivers it.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The message, or its first bytes when it is over the size limit.
    pub raw: Vec<u8>,
    /// The full size (may be larger than `raw` for oversized messages).
    pub size: u64,
    pub source: SourceRef,
    /// The desk of the mailbox it arrived in (`None`: route by address).
    pub desk: Option<DeskKey>,
    /// Where the source will put it if it is quarantined.
    pub quarantine_ref: String,
    /// SHA-256 of the whole message when the source knows it and `raw` holds only its
    /// head (an oversized message); otherwise computed from `raw`.
    pub content_hash: Option<String>,
    /// The source could not read the message (the server keeps refusing it): it is
    /// quarantined with this reason.
    pub fetch_error: Option<String>,
    /// `raw` is only the message's head: it was over the size limit the source read it
    /// under. Quarantined as oversized whatever the limit is by the time it is processed
    /// (a reload may have raised it): the rest of it is not here.
    pub truncated: bool,
}

impl Envelope {
    /// Over `max_size`, or only its head is here: quarantined as oversized.
    fn oversized(&self, max_size: u64) -> bool {
        self.truncated || self.size > max_size
    }
}

/// A message's headers parsed before the write transaction opens, so a slow or hostile
/// message never holds the database's write lock while it is being read.
struct Prepared {
    msg: Result<InboundMessage, ParseError>,
    content_hash: String,
    /// Where it goes (set once routed).
    desk: Option<DeskKey>,
    /// Its ledger claim when the batch claimed it up front: the row's id, or `None` for
    /// a message already processed. Not claimed yet: the outer `None`.
    claim: Option<Option<i64>>,
}

impl Prepared {
    fn new(env: &Envelope, max_size: u64) -> Prepared {
        Prepared {
            msg: message::parse_headers(&env.raw).map(|mut m| {
                // Not for oversized messages: only their head is here (and they are
                // quarantined). Any other message is whole even when the size the server
                // announced differs from what it sent (IMAP's RFC822.SIZE is not always
                // the fetched length): a delivery report must be read as one.
                if !env.oversized(max_size) {
                    message::check_bounce(&mut m, &env.raw);
                }
                m
            }),
            content_hash: env
                .content_hash
                .clone()
                .unwrap_or_else(|| message::content_hash(&env.raw)),
            desk: None,
            claim: None,
        }
    }

    /// The parsed message, when it will be decided (not quarantined on the way).
    fn decidable(&self, env: &Envelope, max_size: u64) -> Option<&InboundMessage> {
        if env.fetch_error.is_some() || env.oversized(max_size) {
            return None;
        }
        self.msg.as_ref().ok()
    }
}

/// [`Pipeline::route`] under `policy`.
fn route_in(
    policy: &crate::policy::Policy,
    msg: &InboundMessage,
    desk: Option<&DeskKey>,
) -> Option<DeskKey> {
    if let Some(d) = desk {
        return Some(d.clone());
    }
    msg.delivered_to
        .iter()
        .chain(msg.to.iter().map(|m| &m.address))
        .chain(msg.cc.iter().map(|m| &m.address))
        .find_map(|a| policy.desk_for_address(a).map(|d| d.key.clone()))
        .or_else(|| match policy.desks.as_slice() {
            [only] => Some(only.key.clone()),
            _ => None,
        })
}

/// A batch's headers read ahead ([`prepare`]): by a source on another thread while the
/// previous batch is being written.
pub struct PreparedHeads {
    prepared: Vec<Prepared>,
    /// The size limit they were read under (a reload may change it: then read again).
    max_size: u64,
}

/// Reads the headers of `batch` for [`Pipeline::process_prepared_batch`]: parse, delivery
/// report check, content hash. CPU work only.
pub fn prepare(batch: &[Envelope], max_size: u64) -> PreparedHeads {
    PreparedHeads {
        prepared: batch
            .iter()
            .map(|env| Prepared::new(env, max_size))
            .collect(),
        max_size,
    }
}

/// How a batch is run: first [`Pass::Held`]; after a [`StoreError::Conflict`],
/// [`Pass::Plain`]; after a message failed for a reason of its own, [`Pass::Careful`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Straight through; new accounts and requests held until something reads them.
    Held,
    /// Straight through, everything written at once.
    Plain,
    /// Each message in its own savepoint; one that fails is quarantined.
    Careful,
}

/// How far a source got, committed with the batch (IMAP: UIDVALIDITY and the last UID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub mailbox: String,
    pub uidvalidity: i64,
    pub last_uid: i64,
    /// IMAP: every message up to this UID is acknowledged (0: nothing new to record).
    pub acked_uid: i64,
}

/// What happened to one message.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Decided and applied.
    Decided {
        decision: Box<Decision>,
        applied: ApplyResult,
    },
    /// Already processed: nothing changed.
    Duplicate { decision: Box<Decision> },
    /// Kept aside with a ledger row saying why; the source moves it to quarantine.
    Quarantined {
        reason: Reason,
        detail: String,
        /// The ledger row, so a source can record where it put the message.
        ledger_id: i64,
    },
}

impl Outcome {
    pub fn summary(&self) -> (&'static str, &'static str) {
        match self {
            Outcome::Decided { decision, .. } | Outcome::Duplicate { decision } => {
                (decision.action.as_str(), decision.reason.code())
            }
            Outcome::Quarantined { reason, .. } => ("quarantine", reason.code()),
        }
    }

    pub fn is_quarantined(&self) -> bool {
        matches!(self, Outcome::Quarantined { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("mailbox {0}: another instance took over the mailbox's lease; nothing was committed")]
    LeaseLost(String),
    /// A bug of ours met by one message: the careful pass quarantines the message
    /// (`processing_failed`, with this text) instead of the panic ending the mailbox's
    /// task, and the restarted daemon meeting the same message again.
    #[error("processing panicked: {0}")]
    Panicked(String),
}

impl PipelineError {
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Store(e) => e.is_transient(),
            PipelineError::LeaseLost(_) => true,
            PipelineError::Panicked(_) => false,
        }
    }
}

/// Runs `work`, turning a panic in it into [`PipelineError::Panicked`]. What it held
/// is dropped while unwinding; the caller rolls its transaction or savepoint back.
async fn unwinding<T>(
    work: impl std::future::Future<Output = Result<T, PipelineError>>,
) -> Result<T, PipelineError> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(work).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => Err(PipelineError::Panicked(panic_message(payload))),
    }
}

/// The message a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "no message".to_string(), |s| s.to_string()),
    }
}

/// The lease a source works under: every batch renews it in its own transaction, and
/// fails without committing anything when it is gone (see `store::lease`).
#[derive(Debug, Clone)]
pub struct Fence {
    pub mailbox: String,
    pub holder: String,
    pub ttl_secs: i64,
}

/// What a reload replaces.
struct Live {
    config: Arc<Config>,
    templates: Arc<Templates>,
}

/// The message-processing core shared by every source.
#[derive(Clone)]
pub struct Pipeline {
    store: Store,
    /// The policy and templates in force; replaced whole on reload (SIGHUP).
    live: Arc<std::sync::RwLock<Live>>,
    /// Notified after a commit that queued mail, to wake the outbox worker.
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// What each source last reported.
    pub health: crate::health::Health,
    /// Messages handled since start.
    pub counters: Arc<crate::health::Counters>,
    /// The mailbox lease this pipeline's batches must hold, if any.
    fence: Option<Arc<Fence>>,
}

impl Pipeline {
    pub fn new(store: Store, config: Arc<Config>, templates: Templates) -> Self {
        Pipeline {
            store,
            live: Arc::new(std::sync::RwLock::new(Live {
                config,
                templates: Arc::new(templates),
            })),
            outbox_wake: Arc::new(tokio::sync::Notify::new()),
            health: crate::health::Health::default(),
            counters: Arc::default(),
            fence: None,
        }
    }

    /// This pipeline, committing only while `fence` holds.
    pub fn with_fence(&self, fence: Fence) -> Pipeline {
        Pipeline {
            fence: Some(Arc::new(fence)),
            ..self.clone()
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration in force. Hold on to the `Arc` for the length of a piece of
    /// work, so a reload cannot change the policy halfway through it.
    pub fn config(&self) -> Arc<Config> {
        match self.live.read() {
            Ok(live) => live.config.clone(),
            Err(poisoned) => poisoned.into_inner().config.clone(),
        }
    }

    /// Puts a new configuration and templates in force for the next message. Mailboxes,
    /// database, HTTP and SMTP settings are read once at start and need a restart.
    pub fn replace(&self, config: Arc<Config>, templates: Templates) {
        let live = Live {
            config,
            templates: Arc::new(templates),
        };
        match self.live.write() {
            Ok(mut current) => *current = live,
            Err(poisoned) => *poisoned.into_inner() = live,
        }
    }

    /// Picks the desk: the mailbox's, else the first desk address among Delivered-To /
    /// X-Original-To, To and Cc, else the only desk if there is just one.
    pub fn route(&self, msg: &InboundMessage, desk: Option<&DeskKey>) -> Option<DeskKey> {
        route_in(&self.config().policy, msg, desk)
    }

    /// Decides without side effects (the `explain` command).
    pub async fn explain(
        &self,
        raw: &[u8],
        desk: Option<&DeskKey>,
        now: i64,
    ) -> Result<Decision, PipelineError> {
        let mut msg = match message::parse_headers(raw) {
            Ok(m) => m,
            Err(e) => return Ok(Decision::ignored(Reason::Unparseable, e.to_string())),
        };
        if raw.len() as u64 > self.config().max_message_size {
            return Ok(oversized_decision(
                raw.len() as u64,
                self.config().max_message_size,
            ));
        }
        message::check_bounce(&mut msg, raw);
        let Some(desk) = self.route(&msg, desk) else {
            return Ok(no_desk_decision());
        };
        let mut conn = self.store.acquire().await?;
        let duplicate: Option<i64> =
            sqlx::query_scalar("SELECT id FROM ledger WHERE dedupe_key = $1")
                .bind(store::dedupe_key(
                    Some(&desk),
                    &msg,
                    &message::content_hash(raw),
                ))
                .fetch_optional(&mut *conn)
                .await
                .map_err(|source| StoreError::Query {
                    context: "look up the ledger",
                    source,
                })?;
        let orgs = DirectoryIndex::load(&mut conn).await?;
        let facts = store::gather_facts(
            &mut conn,
            &msg,
            &desk,
            &orgs,
            now,
            duplicate.is_some(),
            true,
            &mut store::Lookups::default(),
        )
        .await?;
        let mut decision = policy::decide(&facts.facts, &self.config().policy);
        self.limit_mail(&mut conn, &mut Deferred::default(), &mut decision, now)
            .await?;
        Ok(decision)
    }

    /// The mail templates (for other services that queue mail).
    pub fn templates(&self) -> Arc<Templates> {
        match self.live.read() {
            Ok(live) => live.templates.clone(),
            Err(poisoned) => poisoned.into_inner().templates.clone(),
        }
    }

    /// Applies the mail rate limits to a decision that sends mail (the pure second step
    /// of a decision: counting what was sent is only done when there is mail to send).
    pub async fn limit_mail(
        &self,
        conn: &mut sqlx::AnyConnection,
        deferred: &mut Deferred,
        decision: &mut Decision,
        now: i64,
    ) -> Result<(), PipelineError> {
        if decision.emails.is_empty() {
            return Ok(());
        }
        let mut recipients: Vec<crate::address::EmailAddress> =
            decision.emails.iter().map(|e| e.to.clone()).collect();
        recipients.sort();
        recipients.dedup();
        let refs: Vec<&crate::address::EmailAddress> = recipients.iter().collect();
        let counts = deferred.mail_counts(conn, &refs, now).await?;
        policy::limit_emails(decision, &counts, &self.config().policy.mail_limits);
        Ok(())
    }

    /// Processes a batch in one transaction. The returned outcomes are in the order of
    /// `batch`; nothing is committed when this returns an error.
    ///
    /// The batch first runs straight through. If one message fails for a reason of its
    /// own, the whole transaction is rolled back and the batch runs again with a savepoint
    /// per message, so that message is quarantined and the others commit. (Savepoints on
    /// every message would cost two extra round trips each, for a rare case.)
    pub async fn process_batch(
        &self,
        batch: &[Envelope],
        now: i64,
    ) -> Result<Vec<Outcome>, PipelineError> {
        self.process_batch_with_progress(batch, now, None).await
    }

    /// [`Pipeline::process_batch`], also committing the source's `progress` in the same
    /// transaction.
    pub async fn process_batch_with_progress(
        &self,
        batch: &[Envelope],
        now: i64,
        progress: Option<&Progress>,
    ) -> Result<Vec<Outcome>, PipelineError> {
        self.process_prepared_batch(batch, None, now, progress)
            .await
    }

    /// [`Pipeline::process_batch_with_progress`] with the headers read ahead by
    /// [`prepare`] (`None`: read them now).
    pub async fn process_prepared_batch(
        &self,
        batch: &[Envelope],
        heads: Option<PreparedHeads>,
        now: i64,
        progress: Option<&Progress>,
    ) -> Result<Vec<Outcome>, PipelineError> {
        let started = std::time::Instant::now();
        let mut first = self
            .run_batch(batch, heads, now, Pass::Held, progress)
            .await;
        if let Err(PipelineError::Store(e @ StoreError::Conflict(_))) = &first {
            // Another instance wrote what the batch held back: run it again writing
            // everything at once, which takes over what the other created.
            tracing::warn!(error = %e, "running the batch again");
            first = self
                .run_batch(batch, None, now, Pass::Plain, progress)
                .await;
        }
        let outcomes = match first {
            Err(e) if !e.is_transient() => {
                tracing::warn!(error = %crate::outbox::error_chain(&e), "a message failed; retrying the batch message by message");
                self.run_batch(batch, None, now, Pass::Careful, progress)
                    .await?
            }
            other => other?,
        };
        crate::metrics::PROCESSING.observe_many(started.elapsed(), outcomes.len() as u64);
        if outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Decided { applied, .. } if applied.emails_queued > 0))
        {
            self.outbox_wake.notify_one();
        }
        for (env, o) in batch.iter().zip(&outcomes) {
            let (action, reason) = o.summary();
            self.counters.count(action);
            tracing::info!(source = %env.source.source, reference = %env.source.reference, action, reason, "processed");
        }
        Ok(outcomes)
    }

    /// One pass over the batch (see [`Pass`]).
    async fn run_batch(
        &self,
        batch: &[Envelope],
        heads: Option<PreparedHeads>,
        now: i64,
        pass: Pass,
        progress: Option<&Progress>,
    ) -> Result<Vec<Outcome>, PipelineError> {
        let careful = pass == Pass::Careful;
        // One size limit and one desk list for the whole batch: a reload meanwhile must
        // not decide a message under another one than it was claimed under. (Mail limits
        // and templates are read when used: a reload may change them mid-batch, harmlessly.)
        let config = self.config();
        let max_size = config.max_message_size;
        let mut prepared: Vec<Prepared> = match heads {
            Some(h) if h.max_size == max_size && h.prepared.len() == batch.len() => h.prepared,
            _ => prepare(batch, max_size).prepared,
        };
        for (env, p) in batch.iter().zip(prepared.iter_mut()) {
            p.desk = p
                .msg
                .as_ref()
                .ok()
                .and_then(|m| route_in(&config.policy, m, env.desk.as_ref()));
        }
        let mut wtx = self.store.begin_write().await?;
        if let Some(f) = &self.fence
            && !store::fence(wtx.conn(), &f.mailbox, &f.holder, f.ttl_secs).await?
        {
            return Err(PipelineError::LeaseLost(f.mailbox.clone()));
        }
        let index = DirectoryIndex::load(wtx.conn()).await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut deferred = match pass {
            Pass::Held => Deferred::holding_rows(batch.len()),
            Pass::Plain | Pass::Careful => Deferred::default(),
        };
        let mut lookups = Lookups::default();
        // A panic here (a bug one message of the batch meets) fails the batch, not the
        // mailbox's task; the careful pass goes on without what it read ahead, looking
        // each message up on its own (and quarantining the one that panics again).
        match unwinding(self.look_ahead(
            wtx.conn(),
            &config,
            batch,
            &mut prepared,
            &index,
            now,
            !careful,
            &mut deferred,
            &mut lookups,
        ))
        .await
        {
            Err(PipelineError::Panicked(why)) if careful => {
                tracing::error!(panic = %why, "reading ahead for the batch panicked; going on message by message");
                lookups = Lookups::default();
                deferred = Deferred::default();
            }
            other => other?,
        }
        for (env, prepared) in batch.iter().zip(prepared) {
            let span = tracing::info_span!(
                "message",
                source = %env.source.source,
                reference = %env.source.reference,
                message_id = tracing::field::Empty
            );
            let outcome = async {
                if !careful {
                    return unwinding(self.process_one(
                        wtx.conn(),
                        &config,
                        env,
                        prepared,
                        &index,
                        now,
                        &mut deferred,
                        &mut lookups,
                    ))
                    .await;
                }
                let hash = prepared.content_hash.clone();
                let mut sp = wtx
                    .conn()
                    .begin()
                    .await
                    .map_err(|source| StoreError::Query {
                        context: "open a savepoint",
                        source,
                    })?;
                // In careful mode the deferred rows are written inside the savepoint, so a
                // message that fails leaves nothing behind.
                let result = unwinding(async {
                    let o = self
                        .process_one(
                            &mut sp,
                            &config,
                            env,
                            prepared,
                            &index,
                            now,
                            &mut deferred,
                            &mut lookups,
                        )
                        .await?;
                    deferred.flush(&mut sp).await?;
                    Ok(o)
                })
                .await;
                match result {
                    Ok(o) => {
                        sp.commit().await.map_err(|source| StoreError::Query {
                            context: "release a savepoint",
                            source,
                        })?;
                        Ok(o)
                    }
                    Err(e) if e.is_transient() => Err(e),
                    Err(e) => {
                        let _ = sp.rollback().await;
                        deferred = Deferred::default();
                        // What the message counted or cached went with it (a request
                        // counted toward its sender's hourly limit, say).
                        lookups = Lookups::default();
                        let detail = crate::outbox::error_chain(&e);
                        tracing::error!(error = %detail, "processing failed; quarantining");
                        self.quarantine(
                            wtx.conn(),
                            env,
                            None,
                            &hash,
                            Reason::ProcessingFailed,
                            &detail,
                            now,
                        )
                        .await
                    }
                }
            }
            .instrument(span)
            .await?;
            outcomes.push(outcome);
        }
        unwinding(async { Ok(deferred.flush(wtx.conn()).await?) }).await?;
        if let Some(p) = progress {
            store::save_mailbox_state(wtx.conn(), &p.mailbox, p.uidvalidity, p.last_uid, now)
                .await?;
            if p.acked_uid > 0 {
                store::save_mailbox_acked(wtx.conn(), &p.mailbox, p.uidvalidity, p.acked_uid)
                    .await?;
            }
        }
        wtx.commit().await?;
        Ok(outcomes)
    }

    /// Reads what the batch's messages will need in a few statements for all of them,
    /// instead of a few per message: with `claim`, their ledger claims; the people on
    /// them; requests per sender in the last hour (when rate limited); mail per address
    /// in the last day.
    #[allow(clippy::too_many_arguments)]
    async fn look_ahead(
        &self,
        conn: &mut sqlx::AnyConnection,
        config: &Config,
        batch: &[Envelope],
        prepared: &mut [Prepared],
        index: &DirectoryIndex,
        now: i64,
        claim: bool,
        deferred: &mut Deferred,
        lookups: &mut Lookups,
    ) -> Result<(), PipelineError> {
        let max = config.max_message_size;
        if claim {
            let mut at = Vec::new();
            let mut items = Vec::new();
            for (i, (env, p)) in batch.iter().zip(prepared.iter()).enumerate() {
                if let Some(msg) = p.decidable(env, max) {
                    at.push(i);
                    items.push(ClaimItem {
                        source: &env.source,
                        msg,
                        content_hash: &p.content_hash,
                        desk: p.desk.as_ref(),
                    });
                }
            }
            let claims = store::claim_ledger_batch(conn, &items, now).await?;
            drop(items);
            for (i, c) in at.into_iter().zip(claims) {
                prepared[i].claim = Some(c);
            }
        }
        let count_recent = config.policy.hygiene.max_requests_per_sender_per_hour > 0;
        // By desk: the people on the messages that will be decided.
        let mut people: Vec<(&DeskKey, Vec<&crate::address::EmailAddress>)> = Vec::new();
        let mut senders: Vec<(&DeskKey, Vec<&crate::address::EmailAddress>)> = Vec::new();
        let mut everyone: Vec<&crate::address::EmailAddress> = Vec::new();
        for (env, p) in batch.iter().zip(prepared.iter()) {
            let (Some(msg), Some(desk)) = (p.decidable(env, max), p.desk.as_ref()) else {
                continue;
            };
            #[cfg(test)]
            crate::testing::panic_if_asked(msg, "ahead");
            if matches!(p.claim, Some(None)) {
                continue;
            }
            let on = msg
                .from_mailbox()
                .into_iter()
                .chain(msg.recipients())
                .map(|m| &m.address);
            let slot = match people.iter().position(|(d, _)| *d == desk) {
                Some(i) => i,
                None => {
                    people.push((desk, Vec::new()));
                    people.len() - 1
                }
            };
            people[slot].1.extend(on.clone());
            everyone.extend(on);
            if count_recent && let Some(from) = msg.from_mailbox() {
                match senders.iter_mut().find(|(d, _)| *d == desk) {
                    Some((_, s)) => s.push(&from.address),
                    None => senders.push((desk, vec![&from.address])),
                }
            }
        }
        for (desk, mut addresses) in people {
            addresses.sort();
            addresses.dedup();
            lookups.prefetch(conn, desk, &addresses, index).await?;
        }
        for (desk, mut addresses) in senders {
            addresses.sort();
            addresses.dedup();
            lookups.prefetch_recent(conn, desk, &addresses, now).await?;
        }
        everyone.sort();
        everyone.dedup();
        deferred.prefetch_mail_counts(conn, &everyone, now).await?;
        Ok(())
    }

    /// One message, on the batch's transaction (or a savepoint of it).
    #[allow(clippy::too_many_arguments)]
    async fn process_one(
        &self,
        conn: &mut sqlx::AnyConnection,
        config: &Config,
        env: &Envelope,
        prepared: Prepared,
        index: &DirectoryIndex,
        now: i64,
        deferred: &mut Deferred,
        lookups: &mut Lookups,
    ) -> Result<Outcome, PipelineError> {
        let content_hash = prepared.content_hash;
        if let Some(error) = &env.fetch_error {
            return self
                .quarantine(
                    conn,
                    env,
                    None,
                    &content_hash,
                    Reason::ProcessingFailed,
                    error,
                    now,
                )
                .await;
        }
        if env.oversized(config.max_message_size) {
            let detail = if env.size > config.max_message_size {
                format!(
                    "{} bytes is over the limit of {} bytes",
                    env.size, config.max_message_size
                )
            } else {
                format!(
                    "{} bytes was over the size limit when it was read (only its head was); \
                     `intake quarantine release` processes it whole",
                    env.size
                )
            };
            let partial = prepared.msg.ok();
            return self
                .quarantine(
                    conn,
                    env,
                    partial.as_ref(),
                    &content_hash,
                    Reason::Oversized,
                    &detail,
                    now,
                )
                .await;
        }
        let mut msg = match prepared.msg {
            Ok(m) => m,
            Err(e @ (ParseError::Empty | ParseError::NoHeaders | ParseError::ParserFailed)) => {
                return self
                    .quarantine(
                        conn,
                        env,
                        None,
                        &content_hash,
                        Reason::Unparseable,
                        &e.to_string(),
                        now,
                    )
                    .await;
            }
        };
        if let Some(id) = &msg.message_id {
            tracing::Span::current().record("message_id", id.as_str());
        }
        let desk = prepared.desk;
        let count_recent = config.policy.hygiene.max_requests_per_sender_per_hour > 0;
        let claimed = match prepared.claim {
            Some(c) => c,
            None => {
                store::claim_ledger(conn, &env.source, &msg, &content_hash, desk.as_ref(), now)
                    .await?
            }
        };
        let Some(ledger_id) = claimed else {
            let decision = match &desk {
                Some(d) => {
                    let g = store::gather_facts(conn, &msg, d, index, now, true, false, lookups)
                        .await?;
                    policy::decide(&g.facts, &config.policy)
                }
                None => no_desk_decision(),
            };
            return Ok(Outcome::Duplicate {
                decision: Box::new(decision),
            });
        };
        if store::may_thread(&msg) || deferred.holds_account_for(&msg) {
            // Finding the request, or looking someone up again, reads what earlier
            // messages of the batch wrote.
            deferred.flush_threads(conn).await?;
        }
        let (mut decision, known, facts) = match &desk {
            Some(d) => {
                let g =
                    store::gather_facts(conn, &msg, d, index, now, false, count_recent, lookups)
                        .await?;
                (
                    policy::decide(&g.facts, &config.policy),
                    g.known,
                    Some(g.facts),
                )
            }
            None => (no_desk_decision(), Known::default(), None),
        };
        self.limit_mail(conn, deferred, &mut decision, now).await?;
        // Only messages that become (or join) a request need their body decoded.
        if !decision.is_passive() {
            msg.set_body(message::parse_body(&env.raw));
        }
        let applied = store::apply(
            conn,
            ApplyInput {
                msg: &msg,
                decision: &decision,
                known: &known,
                ledger_id: Some(ledger_id),
                hold_ttl_secs: config.hold_ttl.as_secs() as i64,
                now,
                orgs: index,
                renderer: self.templates().as_ref(),
            },
            facts.as_ref(),
            deferred,
        )
        .await?;
        #[cfg(test)]
        crate::testing::panic_if_asked(&msg, "apply");
        forget_touched(lookups, &msg, &decision, &applied);
        Ok(Outcome::Decided {
            decision: Box::new(decision),
            applied,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn quarantine(
        &self,
        conn: &mut sqlx::AnyConnection,
        env: &Envelope,
        msg: Option<&InboundMessage>,
        content_hash: &str,
        reason: Reason,
        detail: &str,
        now: i64,
    ) -> Result<Outcome, PipelineError> {
        let parsed;
        let msg = match msg {
            Some(m) => Some(m),
            None => {
                parsed = message::parse_headers(&env.raw).ok();
                parsed.as_ref()
            }
        };
        let rec = QuarantineRecord {
            source: env.source.clone(),
            reason,
            detail: detail.to_string(),
            content_hash: content_hash.to_string(),
            size: env.size,
            message_id: msg.and_then(|m| m.message_id.clone()),
            sender: msg.and_then(|m| m.from_mailbox().map(|f| f.address.to_string())),
            subject: msg.and_then(|m| m.subject.clone()),
            quarantine_ref: env.quarantine_ref.clone(),
        };
        let ledger_id = store::record_quarantine(conn, &rec, now).await?;
        Ok(Outcome::Quarantined {
            reason,
            detail: detail.to_string(),
            ledger_id,
        })
    }
}

/// After applying `decision`: what the batch looked up about the people it touched may
/// be stale (accounts created, names set, a bounce marking someone undeliverable), and
/// a new request counts towards its reporter's hourly limit.
fn forget_touched(
    lookups: &mut Lookups,
    msg: &InboundMessage,
    decision: &Decision,
    applied: &ApplyResult,
) {
    if msg.bounce.is_some() {
        lookups.clear();
    } else {
        // What `store::apply` writes accounts for: the requester, participants it keeps,
        // and whoever it mails (a dropped address, such as the desk's own, is left
        // alone, and stays looked up for the rest of the batch).
        let touched = decision
            .requester
            .address
            .iter()
            .chain(
                decision
                    .participants
                    .iter()
                    .filter(|p| p.outcome != policy::ParticipantOutcome::Drop)
                    .map(|p| &p.address),
            )
            .chain(decision.emails.iter().map(|e| &e.to));
        for a in touched {
            lookups.forget(a);
        }
    }
    if decision.request.is_none()
        && let (Some(desk), Some(reporter), Some(_)) = (
            &decision.desk,
            &decision.requester.address,
            &applied.request,
        )
    {
        lookups.created_request(desk, reporter);
    }
}

fn no_desk_decision() -> Decision {
    Decision::ignored(
        Reason::UnknownDesk,
        "no desk address among Delivered-To, X-Original-To, To and Cc, and more than one desk is configured",
    )
}

fn oversized_decision(size: u64, limit: u64) -> Decision {
    Decision::ignored(
        Reason::Oversized,
        format!("{size} bytes is over the limit of {limit} bytes"),
    )
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
