//! A Maildir mailbox as a source: messages arrive in `new/` (an MTA or `intake`'s own
//! tests drop them there, atomically via `tmp/`), are processed in batches, and after the
//! commit are acknowledged: moved to `cur/` flagged Seen, moved into a Maildir++ folder,
//! or deleted. Quarantined messages go to the `.Quarantine` folder, unflagged.
//!
//! Another program serving the same Maildir (an IMAP server such as Dovecot, a mail
//! client) moves mail from `new/` to `cur/` as soon as a session looks at the folder,
//! before intake may have read it, and a person may read it there. So `cur/` is swept
//! too, for messages delivered since intake first watched the mailbox (older mail
//! there was never meant for it; but a message listed in `new/` that vanished before
//! we read it is taken from `cur/` whatever its age): with `after = "seen"` for
//! those the ledger does not know (mail staff marked unread again stays unread),
//! otherwise for all (processed mail leaves `cur/`). A sweep looks at the files changed
//! since the one before (ctime: a rename sets it), and runs when `cur/` changed by
//! another hand than ours, or a minute passed; a pass kept busy by a steady inflow into
//! `new/` ends after a minute so the next one sweeps.
//!
//! A second copy of a message (a duplicate) has no ledger row of its own: with
//! `after = "seen"` the first sweep after a restart processes it again, as the
//! duplicate it is, which changes nothing.

use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{After, MaildirConfig};
use crate::keys::DeskKey;
use crate::pipeline::{Envelope, Outcome, Pipeline};
use crate::store::SourceRef;

use super::{Backoff, read_envelope};

/// How many messages are committed together.
pub const BATCH: usize = 250;

/// How many of the oldest names in `new/` one scan lists: worked through batch by batch
/// before `new/` is read again, so a backlog of n files costs n/LISTED directory reads
/// rather than n/BATCH.
const LISTED: usize = 10_000;

/// At most this many bytes of messages are read for one batch.
const BATCH_BYTES: u64 = 64 * 1024 * 1024;
/// A file that could not be read or acknowledged is left alone this long.
const SKIP_FOR: Duration = Duration::from_secs(300);

/// `cur/` is swept when it changed since the last sweep, and at least this often.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What a sweep of `cur/` leaves for the next one.
#[derive(Debug, Clone, Copy)]
struct Swept {
    /// `cur/`'s modification time then (or after our own changes since).
    dir_changed: std::time::SystemTime,
    at: std::time::Instant,
    /// The wall clock when it began: the next one looks at files changed since.
    started: std::time::SystemTime,
}

#[derive(Debug)]
pub struct MaildirSource {
    pub name: String,
    pub desk: DeskKey,
    pub cfg: MaildirConfig,
    /// Files that failed to be read or moved, and when: skipped for a while so one bad
    /// file never blocks the messages behind it nor spins the loop.
    skip: std::sync::Mutex<std::collections::HashMap<PathBuf, std::time::Instant>>,
    /// The last sweep of `cur/`.
    swept: std::sync::Mutex<Option<Swept>>,
    /// Where the window starts once the last sweep's findings are committed.
    sweep_next: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// Base names of the messages acknowledged into `cur/` since the last sweep.
    acked_since_sweep: std::sync::Mutex<HashSet<String>>,
    /// When intake first watched this mailbox (Unix seconds), once read.
    watched_since: std::sync::Mutex<Option<i64>>,
    /// Base names of messages listed in `new/` that another program moved before we
    /// read them: the next sweep takes them from `cur/` however old they are.
    vanished: std::sync::Mutex<HashSet<String>>,
    /// Of those, the ones the last sweep found: forgotten once the pass commits them.
    vanished_taken: std::sync::Mutex<HashSet<String>>,
    /// [`SWEEP_EVERY`] (shorter in tests).
    sweep_every: Duration,
}

impl MaildirSource {
    pub fn new(name: String, desk: DeskKey, cfg: MaildirConfig) -> Self {
        MaildirSource {
            name,
            desk,
            cfg,
            skip: Default::default(),
            swept: Default::default(),
            sweep_next: Default::default(),
            acked_since_sweep: Default::default(),
            watched_since: Default::default(),
            vanished: Default::default(),
            vanished_taken: Default::default(),
            sweep_every: SWEEP_EVERY,
        }
    }

    /// The vanished messages still looked for.
    #[cfg(test)]
    pub(super) fn looked_for(&self) -> HashSet<String> {
        self.vanished.lock().map(|v| v.clone()).unwrap_or_default()
    }

    #[cfg(test)]
    pub(super) fn sweeping_every(mut self, every: Duration) -> Self {
        self.sweep_every = every;
        self
    }

    /// A message listed in `new/` was gone when we came to read it: another program
    /// serving this Maildir moved it, most likely to `cur/`. The next sweep takes it
    /// from there even when it was delivered before intake first watched the mailbox
    /// (mail waiting at the first start) or outside the sweep's window.
    pub(super) fn note_vanished(&self, path: &Path) {
        if let Ok(mut v) = self.vanished.lock() {
            v.insert(Self::base_name(path));
        }
    }

    fn skip_for_a_while(&self, path: &Path) {
        if let Ok(mut skip) = self.skip.lock() {
            skip.insert(path.to_path_buf(), std::time::Instant::now());
        }
    }

    fn folder(&self, name: &str) -> PathBuf {
        self.cfg.path.join(format!(".{name}"))
    }

    /// Creates `new/`, `cur/`, `tmp/` and the folders we move mail into.
    pub async fn ensure_dirs(&self) -> std::io::Result<()> {
        let mut roots = vec![
            self.cfg.path.clone(),
            self.folder(&self.cfg.quarantine_folder),
        ];
        if let After::Move(folder) = &self.cfg.after {
            roots.push(self.folder(folder));
        }
        for root in roots {
            for sub in ["new", "cur", "tmp"] {
                tokio::fs::create_dir_all(root.join(sub)).await?;
            }
        }
        Ok(())
    }

    /// Up to `limit` files in `new/`, oldest name first (Maildir names start with the
    /// delivery time), leaving out those being skipped. The directory is read on a
    /// blocking thread, keeping only the `limit` oldest names however many there are.
    pub async fn scan(&self, limit: usize) -> std::io::Result<Vec<PathBuf>> {
        let skip = self.skipped();
        let new = self.cfg.path.join("new");
        tokio::task::spawn_blocking(move || oldest_files(&new, limit, &skip, |_| true))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The files being skipped now.
    fn skipped(&self) -> HashSet<PathBuf> {
        match self.skip.lock() {
            Ok(mut skip) => {
                skip.retain(|_, at| at.elapsed() < SKIP_FOR);
                skip.keys().cloned().collect()
            }
            Err(_) => HashSet::new(),
        }
    }

    /// Up to `limit` messages in `cur/` that were never processed (see the module's
    /// notes), oldest name first. Only files changed since the last sweep are looked at
    /// (all of them at the first sweep of the process); nothing when `cur/` did not
    /// change since then but by our own hand, less than [`SWEEP_EVERY`] ago.
    pub async fn sweep_cur(
        &self,
        pipeline: &Pipeline,
        limit: usize,
    ) -> Result<Vec<PathBuf>, SourceError> {
        let cur = self.cfg.path.join("cur");
        let changed = tokio::fs::metadata(&cur)
            .await
            .and_then(|m| m.modified())
            .map_err(|e| self.io_error("read", e))?;
        let last = self.swept.lock().ok().and_then(|s| *s);
        let vanished: HashSet<String> = self.vanished.lock().map(|v| v.clone()).unwrap_or_default();
        if vanished.is_empty()
            && last.is_some_and(|l| l.dir_changed == changed && l.at.elapsed() < self.sweep_every)
        {
            return Ok(Vec::new());
        }
        let started = std::time::SystemTime::now();
        let own: HashSet<String> = self
            .acked_since_sweep
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default();
        let since = self.watched_since(pipeline).await?;
        // Files changed (moved here, flagged) since shortly before the last sweep began.
        let window = last.map(|l| {
            l.started
                .checked_sub(Duration::from_secs(5))
                .unwrap_or(std::time::UNIX_EPOCH)
        });
        let skip = self.skipped();
        // A file here being skipped (it could not be read a moment ago) is not looked
        // at now: the window must not move past it.
        let held_back = skip.iter().any(|p| p.parent() == Some(cur.as_path()));
        let dir = cur.clone();
        let looked_for = vanished.clone();
        // Which of the names looked for are in cur/ at all (skipped ones too).
        let (mut found, present) = tokio::task::spawn_blocking(move || {
            let present = std::cell::RefCell::new(HashSet::new());
            let found = oldest_files(&dir, usize::MAX, &skip, |name| {
                let name = name.to_string_lossy();
                let base = base_of(&name);
                if own.contains(&base) {
                    // Ours, acknowledged since the last sweep: present, and processed.
                    if looked_for.contains(&base) {
                        present.borrow_mut().insert(base);
                    }
                    return false;
                }
                if looked_for.contains(&base) {
                    present.borrow_mut().insert(base);
                    return true;
                }
                let path = dir.join(name.as_ref());
                delivered_at(&path, &name).is_some_and(|t| t >= since)
                    && window.is_none_or(|w| changed_since(&path, w))
            });
            found.map(|f| (f, present.into_inner()))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| self.io_error("scan", e))?;
        let mut known = HashSet::new();
        if matches!(self.cfg.after, After::Seen) && !found.is_empty() {
            // Processed mail stays in cur/ in this mode: what the ledger knows was ours
            // (staff may have marked it unread again, which stays so).
            let names: Vec<String> = found.iter().map(|p| Self::base_name(p)).collect();
            known = pipeline
                .store()
                .recorded_refs(&self.source_name(), &names)
                .await
                .map_err(|source| self.store_error(source))?
                .into_iter()
                .collect();
            found.retain(|p| !known.contains(&Self::base_name(p)));
        }
        let complete = found.len() <= limit && !held_back;
        found.truncate(limit);
        if !vanished.is_empty() {
            // Whatever the mode: one committed whose acknowledgement failed is known.
            let there: Vec<String> = vanished
                .iter()
                .filter(|n| present.contains(*n) && !known.contains(*n))
                .cloned()
                .collect();
            if !there.is_empty() {
                let recorded = pipeline
                    .store()
                    .recorded_refs(&self.source_name(), &there)
                    .await
                    .map_err(|source| self.store_error(source))?;
                known.extend(recorded);
                if matches!(self.cfg.after, After::Seen) {
                    found.retain(|p| !known.contains(&Self::base_name(p)));
                }
                // Otherwise it is processed again, as the duplicate it is, and leaves
                // cur/ as processed mail does in that mode.
            }
            // What was looked for and is not in cur/ (deleted, or moved to another
            // folder: not ours to chase), or is there but known to the ledger, is
            // forgotten now; what this sweep hands to the pass, once it is committed.
            let waiting: HashSet<String> = found.iter().map(|p| Self::base_name(p)).collect();
            let missing = vanished.iter().filter(|n| !present.contains(*n)).count();
            if missing > 0 {
                tracing::info!(mailbox = %self.name, count = missing, "messages moved out of new/ before they were read are not in cur/ either (deleted, or moved to another folder)");
            }
            if let Ok(mut v) = self.vanished.lock() {
                v.retain(|n| !vanished.contains(n) || present.contains(n) && !known.contains(n));
            }
            if let Ok(mut t) = self.vanished_taken.lock() {
                *t = vanished.intersection(&waiting).cloned().collect();
            }
        }
        // The window moves on only once what this sweep found is committed (the end of
        // `run_once`); a sweep cut short keeps it, so the next one sees the rest.
        let kept = last.map_or(std::time::UNIX_EPOCH, |l| l.started);
        if let Ok(mut swept) = self.swept.lock() {
            *swept = Some(Swept {
                dir_changed: changed,
                at: std::time::Instant::now(),
                started: kept,
            });
        }
        if let Ok(mut next) = self.sweep_next.lock() {
            *next = Some(if complete { started } else { kept });
        }
        if !found.is_empty() {
            tracing::info!(mailbox = %self.name, count = found.len(), "messages in cur/ that were never processed (another program moved them out of new/)");
        }
        Ok(found)
    }

    /// When intake first watched this Maildir (Unix seconds): recorded at the first
    /// sweep ever. Cached for the life of the process. (Not the oldest mail waiting in
    /// `new/` then: one stale message there would have made years of read mail in
    /// `cur/` requests. What waits in `new/` is read from there.)
    async fn watched_since(&self, pipeline: &Pipeline) -> Result<i64, SourceError> {
        if let Some(s) = self.watched_since.lock().ok().and_then(|s| *s) {
            return Ok(s);
        }
        let s = pipeline
            .store()
            .maildir_watched_since(&self.name, crate::now())
            .await
            .map_err(|source| self.store_error(source))?;
        if let Ok(mut w) = self.watched_since.lock() {
            *w = Some(s);
        }
        Ok(s)
    }

    /// After acknowledging: what we renamed into `cur/` is no news for the next sweep.
    fn note_own(&self, names: impl IntoIterator<Item = String>) {
        if let Ok(mut a) = self.acked_since_sweep.lock() {
            a.extend(names);
        }
        let changed = std::fs::metadata(self.cfg.path.join("cur")).and_then(|m| m.modified());
        if let (Ok(changed), Ok(mut swept)) = (changed, self.swept.lock())
            && let Some(s) = swept.as_mut()
        {
            s.dir_changed = changed;
        }
    }

    fn source_name(&self) -> String {
        format!("maildir:{}", self.name)
    }

    fn store_error(&self, source: crate::store::StoreError) -> SourceError {
        SourceError::Store {
            mailbox: self.name.clone(),
            source,
        }
    }

    fn base_name(path: &Path) -> String {
        base_of(
            &path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        )
    }

    fn quarantine_path(&self, path: &Path) -> PathBuf {
        self.folder(&self.cfg.quarantine_folder)
            .join("cur")
            .join(format!("{}:2,", Self::base_name(path)))
    }

    /// Reads one file into an envelope; `None` when it vanished meanwhile (another
    /// instance took it).
    pub async fn envelope(&self, path: &Path, max_size: u64) -> std::io::Result<Option<Envelope>> {
        let source = SourceRef {
            source: self.source_name(),
            reference: Self::base_name(path),
        };
        read_envelope(
            path,
            max_size,
            source,
            Some(self.desk.clone()),
            self.quarantine_path(path).display().to_string(),
        )
        .await
    }

    /// Acknowledges a processed message (after the commit). When it is no longer where
    /// it was read — another program serving this Maildir (an IMAP server with a client
    /// on the folder) moved it to `cur/` meanwhile — it is acknowledged there: left
    /// behind, a quarantined message could never be released from where the ledger says
    /// it went, and in seen mode a processed one would stay unread.
    pub async fn ack(&self, path: &Path, outcome: &Outcome) -> std::io::Result<()> {
        match self.ack_at(path, outcome).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let cur = self.cfg.path.join("cur");
                let base = Self::base_name(path);
                let moved = tokio::task::spawn_blocking(move || {
                    oldest_files(&cur, 1, &HashSet::new(), |name| {
                        base_of(&name.to_string_lossy()) == base
                    })
                })
                .await
                .map_err(std::io::Error::other)??;
                match moved.into_iter().next() {
                    Some(m) if m != path => self.ack_at(&m, outcome).await,
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    async fn ack_at(&self, path: &Path, outcome: &Outcome) -> std::io::Result<()> {
        let base = Self::base_name(path);
        if outcome.is_quarantined() {
            return tokio::fs::rename(path, self.quarantine_path(path)).await;
        }
        // Flags someone set meanwhile (a message found in cur/) are kept.
        let name = format!("{base}:2,{}", flags_with(path, 'S'));
        match &self.cfg.after {
            After::Seen => {
                let dest = self.cfg.path.join("cur").join(name);
                tokio::fs::rename(path, dest).await
            }
            After::Move(folder) => {
                let dest = self.folder(folder).join("cur").join(name);
                tokio::fs::rename(path, dest).await
            }
            After::Delete => tokio::fs::remove_file(path).await,
        }
    }

    /// Processes whatever is in `new/` now, batch by batch, until it is empty (or holds
    /// only files being skipped) or `shutdown`. Returns how many messages were committed.
    pub async fn run_once(
        &self,
        pipeline: &Pipeline,
        shutdown: &CancellationToken,
    ) -> Result<usize, SourceError> {
        let result = self.work_through(pipeline, shutdown).await;
        // What the sweep found of the vanished messages is forgotten once all it
        // found is committed; otherwise the next sweep looks for them again.
        let taken = self
            .vanished_taken
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        if matches!(result, Ok((_, true)))
            && let Ok(mut v) = self.vanished.lock()
        {
            v.retain(|n| !taken.contains(n));
        }
        let next = self.sweep_next.lock().ok().and_then(|mut n| n.take());
        if let Ok(mut swept) = self.swept.lock()
            && let Some(s) = swept.as_mut()
        {
            match (&result, next) {
                // Everything the sweep found is committed: the window moves on.
                (Ok((_, true)), Some(next)) => s.started = next,
                (Ok((_, true)), None) => {}
                // Not all of it (a database outage, a file that could not be read, the
                // lease given up halfway): the next pass sweeps again, over the same
                // window.
                (Ok((_, false)) | Err(_), _) => s.dir_changed = std::time::UNIX_EPOCH,
            }
        }
        result.map(|(n, _)| n)
    }

    /// [`MaildirSource::run_once`]'s work: what the sweep of `cur/` found, then `new/`.
    /// Returns how many were committed, and whether everything the sweep found was.
    async fn work_through(
        &self,
        pipeline: &Pipeline,
        shutdown: &CancellationToken,
    ) -> Result<(usize, bool), SourceError> {
        let mut total = 0;
        let max = pipeline.config().max_message_size;
        let cur = self.cfg.path.join("cur");
        let from_sweep = |p: &Path| p.parent() == Some(cur.as_path());
        let mut listed: VecDeque<PathBuf> = self.sweep_cur(pipeline, LISTED).await?.into();
        let mut swept_all = true;
        let started = std::time::Instant::now();
        let mut scanned_new = false;
        while !shutdown.is_cancelled() {
            if listed.is_empty() {
                // Not before new/ was read at least once: a sweep handing over a large
                // backlog in cur/ pass after pass would keep fresh mail waiting.
                if scanned_new && started.elapsed() >= self.sweep_every {
                    // Mail keeps coming: end the pass here, so `cur/` is swept again
                    // (the next pass starts at once) rather than only once `new/` is
                    // found empty, which a steady inflow may never let happen.
                    break;
                }
                listed = self
                    .scan(LISTED)
                    .await
                    .map_err(|e| self.io_error("scan", e))?
                    .into();
                scanned_new = true;
                if listed.is_empty() {
                    break;
                }
            }
            let mut paths = Vec::with_capacity(BATCH);
            let mut envelopes = Vec::with_capacity(BATCH);
            let mut bytes = 0u64;
            while paths.len() < BATCH && bytes < BATCH_BYTES {
                let Some(path) = listed.pop_front() else {
                    break;
                };
                match self.envelope(&path, max).await {
                    Ok(Some(env)) => {
                        bytes += env.raw.len() as u64;
                        paths.push(path);
                        envelopes.push(env);
                    }
                    Ok(None) => {
                        // The lease keeps other intake instances away: another program
                        // serving this Maildir (an IMAP server, a mail client) moved it,
                        // most likely to cur/, where the next sweep finds it.
                        tracing::info!(mailbox = %self.name, path = %path.display(), "the message file was moved before it was read; it is looked for in cur/");
                        if !from_sweep(&path) {
                            self.note_vanished(&path);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(mailbox = %self.name, path = %path.display(), error = %e, "cannot read message; skipping it for now");
                        self.skip_for_a_while(&path);
                        swept_all &= !from_sweep(&path);
                    }
                }
            }
            if envelopes.is_empty() {
                continue;
            }
            let outcomes = pipeline
                .process_batch(&envelopes, crate::now())
                .await
                .map_err(|e| SourceError::Pipeline {
                    mailbox: self.name.clone(),
                    source: e,
                })?;
            let mut acked = Vec::with_capacity(paths.len());
            for (path, outcome) in paths.iter().zip(&outcomes) {
                match self.ack(path, outcome).await {
                    Ok(()) => acked.push(Self::base_name(path)),
                    Err(e) => {
                        // The commit is done; a message we fail to move would be read
                        // again and found in the ledger. Leave it alone for a while
                        // instead of looping.
                        tracing::warn!(mailbox = %self.name, path = %path.display(), error = %e, "cannot acknowledge message");
                        self.skip_for_a_while(path);
                    }
                }
            }
            self.note_own(acked);
            total += outcomes.len();
        }
        swept_all &= !listed.iter().any(|p| from_sweep(p));
        Ok((total, swept_all))
    }

    fn io_error(&self, what: &'static str, source: std::io::Error) -> SourceError {
        SourceError::Io {
            mailbox: self.name.clone(),
            what,
            path: self.cfg.path.display().to_string(),
            source,
        }
    }

    /// Runs until `shutdown`, polling `new/`. A batch in flight is finished first.
    pub async fn run(&self, pipeline: Pipeline, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let pause = match async {
                self.ensure_dirs()
                    .await
                    .map_err(|e| self.io_error("create", e))?;
                self.run_once(&pipeline, &shutdown).await
            }
            .await
            {
                Ok(n) => {
                    backoff.reset();
                    pipeline.health.ok(&self.name);
                    // After work, look again at once: the pass may have been ended to
                    // sweep `cur/`, with mail still waiting in `new/`.
                    if n > 0 {
                        Duration::ZERO
                    } else {
                        self.cfg.poll_interval
                    }
                }
                Err(e) => {
                    let pause = backoff.next_pause();
                    pipeline.health.failed(&self.name, &e.to_string());
                    tracing::warn!(mailbox = %self.name, error = %crate::outbox::error_chain(&e), retry_in = ?pause, "mailbox pass failed");
                    pause
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("mailbox {mailbox}: cannot {what} {path}")]
    Io {
        mailbox: String,
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mailbox {mailbox}: processing failed")]
    Pipeline {
        mailbox: String,
        #[source]
        source: crate::pipeline::PipelineError,
    },
    #[error("mailbox {mailbox}: cannot read or record what was processed")]
    Store {
        mailbox: String,
        #[source]
        source: crate::store::StoreError,
    },
}

/// A Maildir file name without its info suffix (`:2,FLAGS`).
fn base_of(name: &str) -> String {
    match name.split_once(':') {
        Some((base, _)) => base.to_string(),
        None => name.to_string(),
    }
}

/// Whether the file's inode changed (it was renamed here, or flagged) at or after `when`.
fn changed_since(path: &Path, when: std::time::SystemTime) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let changed = std::time::UNIX_EPOCH
        + Duration::new(
            u64::try_from(meta.ctime()).unwrap_or(0),
            u32::try_from(meta.ctime_nsec()).unwrap_or(0),
        );
    changed >= when
}

/// The flags of a Maildir file name (`NAME:2,FLAGS`), empty when it has none.
fn flags(name: &str) -> &str {
    name.split_once(":2,").map_or("", |(_, f)| f)
}

/// When a Maildir file was delivered (Unix seconds): the time its name starts with
/// (`1733100000.M1P2.host`), else its modification time (a move keeps it).
fn delivered_at(path: &Path, name: &str) -> Option<i64> {
    let stamp = name.split('.').next().unwrap_or("");
    if stamp.len() >= 9 && stamp.bytes().all(|b| b.is_ascii_digit()) {
        return stamp.parse().ok();
    }
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    let secs = modified
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    i64::try_from(secs).ok()
}

/// The flags of `path`'s name with `flag` added, in ASCII order as Maildir wants them.
fn flags_with(path: &Path, flag: char) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut all: Vec<char> = flags(&name).chars().chain([flag]).collect();
    all.sort_unstable();
    all.dedup();
    all.into_iter().collect()
}

/// The `limit` smallest names of the regular files in `dir` that `keep` accepts (hidden
/// ones and those in `skip` left out), sorted; memory stays at `limit` names however
/// large `dir` is.
pub(super) fn oldest_files(
    dir: &Path,
    limit: usize,
    skip: &HashSet<PathBuf>,
    keep: impl Fn(&std::ffi::OsStr) -> bool,
) -> std::io::Result<Vec<PathBuf>> {
    let mut oldest: BinaryHeap<std::ffi::OsString> = BinaryHeap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".")
            || !keep(&name)
            || !entry.file_type().is_ok_and(|t| t.is_file())
            || oldest.len() >= limit && oldest.peek().is_some_and(|top| &name >= top)
        {
            continue;
        }
        if skip.contains(&entry.path()) {
            continue;
        }
        oldest.push(name);
        if oldest.len() > limit {
            oldest.pop();
        }
    }
    Ok(oldest
        .into_sorted_vec()
        .into_iter()
        .map(|n| dir.join(n))
        .collect())
}
