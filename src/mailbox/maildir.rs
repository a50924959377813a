//! A Maildir mailbox as a source: messages arrive in `new/` (an MTA or `intake`'s own
//! tests drop them there, atomically via `tmp/`), are processed in batches, and after the
//! commit are acknowledged: moved to `cur/` flagged Seen, moved into a Maildir++ folder,
//! or deleted. Quarantined messages go to the `.Quarantine` folder, unflagged.

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

#[derive(Debug)]
pub struct MaildirSource {
    pub name: String,
    pub desk: DeskKey,
    pub cfg: MaildirConfig,
    /// Files that failed to be read or moved, and when: skipped for a while so one bad
    /// file never blocks the messages behind it nor spins the loop.
    skip: std::sync::Mutex<std::collections::HashMap<PathBuf, std::time::Instant>>,
}

impl MaildirSource {
    pub fn new(name: String, desk: DeskKey, cfg: MaildirConfig) -> Self {
        MaildirSource {
            name,
            desk,
            cfg,
            skip: Default::default(),
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
        let skip: HashSet<PathBuf> = match self.skip.lock() {
            Ok(mut skip) => {
                skip.retain(|_, at| at.elapsed() < SKIP_FOR);
                skip.keys().cloned().collect()
            }
            Err(_) => HashSet::new(),
        };
        let new = self.cfg.path.join("new");
        tokio::task::spawn_blocking(move || oldest_files(&new, limit, &skip))
            .await
            .map_err(std::io::Error::other)?
    }

    fn base_name(path: &Path) -> String {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        // Drop any info suffix (":2,...") so flags can be set afresh.
        match name.split_once(':') {
            Some((base, _)) => base.to_string(),
            None => name,
        }
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
            source: format!("maildir:{}", self.name),
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

    /// Acknowledges a processed message (after the commit).
    pub async fn ack(&self, path: &Path, outcome: &Outcome) -> std::io::Result<()> {
        let base = Self::base_name(path);
        if outcome.is_quarantined() {
            return tokio::fs::rename(path, self.quarantine_path(path)).await;
        }
        match &self.cfg.after {
            After::Seen => {
                let dest = self.cfg.path.join("cur").join(format!("{base}:2,S"));
                tokio::fs::rename(path, dest).await
            }
            After::Move(folder) => {
                let dest = self.folder(folder).join("cur").join(format!("{base}:2,S"));
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
        let mut total = 0;
        let max = pipeline.config().max_message_size;
        let mut listed: VecDeque<PathBuf> = VecDeque::new();
        while !shutdown.is_cancelled() {
            if listed.is_empty() {
                listed = self
                    .scan(LISTED)
                    .await
                    .map_err(|e| self.io_error("scan", e))?
                    .into();
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
                        // most likely to cur/, which intake does not read.
                        tracing::warn!(mailbox = %self.name, path = %path.display(), "the message file vanished before it was read: is another program moving mail out of new/?");
                    }
                    Err(e) => {
                        tracing::warn!(mailbox = %self.name, path = %path.display(), error = %e, "cannot read message; skipping it for now");
                        self.skip_for_a_while(&path);
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
            for (path, outcome) in paths.iter().zip(&outcomes) {
                if let Err(e) = self.ack(path, outcome).await {
                    // The commit is done; a message we fail to move would be read again and
                    // found in the ledger. Leave it alone for a while instead of looping.
                    tracing::warn!(mailbox = %self.name, path = %path.display(), error = %e, "cannot acknowledge message");
                    self.skip_for_a_while(path);
                }
            }
            total += outcomes.len();
        }
        Ok(total)
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
                Ok(_) => {
                    backoff.reset();
                    pipeline.health.ok(&self.name);
                    self.cfg.poll_interval
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
}

/// The `limit` smallest names of the regular files in `dir` (hidden ones and those in
/// `skip` left out), sorted; memory stays at `limit` names however large `dir` is.
pub(super) fn oldest_files(
    dir: &Path,
    limit: usize,
    skip: &HashSet<PathBuf>,
) -> std::io::Result<Vec<PathBuf>> {
    let mut oldest: BinaryHeap<std::ffi::OsString> = BinaryHeap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".")
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
