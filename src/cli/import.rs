//! `intake import PATH...`: a backlog — an mbox file or a Maildir — through the pipeline in
//! batches, like `intake process`, but made for large archives and resumable.
//!
//! - Reading runs on its own thread, a batch ahead of the database, and never holds more
//!   than a few batches (each at most 250 messages and 64 MB) in memory; see
//!   [`super::mbox`] for how an mbox is streamed.
//! - An mbox is to an import what a folder is to IMAP: the byte offset of the end of the
//!   last committed message is its "last UID", a fingerprint of the file up to there its
//!   "UIDVALIDITY". Both are committed in the batch's own transaction (the pipeline's
//!   source progress, `mailbox_state` under `import:<path>`), so a run killed at any point
//!   resumes exactly after its last commit, reading nothing before it. A file rewritten in
//!   between (the fingerprint of the part read differs) is read from the start again, and
//!   the ledger turns what was done into no-ops; a file that only grew continues. The
//!   message count is kept for the report (`import_progress`, once per run).
//! - A Maildir import skips files the ledger already has under this source, found by
//!   their unique name (which survives a move from `new/` to `cur/`).
//! - SIGINT/SIGTERM: the batch in flight commits, then the command stops and exits 0 with
//!   "interrupted, run again to continue". A second signal stops at once, as a crash
//!   would: the uncommitted batch is rolled back and done again next time.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::keys::DeskKey;
use crate::mailbox::maildir::BATCH;
use crate::pipeline::{Envelope, Outcome, Pipeline};
use crate::store::{ImportProgress, SourceRef};

use super::mbox::{self, MboxReader, ReadMessage};
use super::table::Table;
use super::{EX_DATAERR, EX_OK};

/// At most this many bytes of messages are read for one batch.
const BATCH_BYTES: u64 = 64 * 1024 * 1024;
/// Without a terminal, a progress line this often.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// The fingerprints of an mbox's imported part: its first bytes, and the bytes before
/// the offset reached.
const HEAD_BYTES: u64 = 64 * 1024;
const TAIL_BYTES: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Mbox,
    Maildir,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Mbox => "mbox",
            Kind::Maildir => "maildir",
        }
    }
}

/// What happened to one PATH.
#[derive(Debug, Serialize)]
struct SourceReport {
    path: String,
    kind: Kind,
    /// Messages read and committed by this run.
    imported: u64,
    /// Messages not read again: imported by an earlier run.
    skipped: u64,
    quarantined: u64,
    /// mbox: the byte offset this run started at.
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed_at: Option<u64>,
    /// Why an mbox was read from the start again although an earlier run had progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    restarted: Option<String>,
}

/// One message read, ready for an envelope.
struct Item {
    reference: String,
    message: ReadMessage,
}

/// Messages read together, committed together.
struct Batch {
    items: Vec<Item>,
    /// mbox: where the last message of the batch ends, and the fingerprint of the file up
    /// to there; committed with the batch.
    end: u64,
    fingerprint: Option<i64>,
}

impl Batch {
    fn new(end: u64) -> Batch {
        Batch {
            items: Vec::with_capacity(BATCH),
            end,
            fingerprint: None,
        }
    }
}

type Sender = tokio::sync::mpsc::Sender<Result<Batch, String>>;

/// Everything the per-source loops share.
struct Run {
    pipeline: Pipeline,
    desk: Option<DeskKey>,
    max_size: u64,
    quarantine_dir: PathBuf,
    shutdown: CancellationToken,
    counts: BTreeMap<(&'static str, &'static str), u64>,
    show_bar: bool,
}

pub async fn import(
    config: Arc<Config>,
    paths: &[PathBuf],
    desk: Option<&str>,
    no_send: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let desk = super::desk_arg(&config, desk)?;
    let mut sources = Vec::with_capacity(paths.len());
    for path in paths {
        match classify(path)? {
            Some(kind) => sources.push((path.clone(), kind)),
            None => {
                eprintln!(
                    "intake: {} is neither an mbox file (it does not start with a \"From \" line) \
                     nor a Maildir (it has no cur/ or new/)",
                    path.display()
                );
                return Ok(EX_DATAERR);
            }
        }
    }
    let shutdown = CancellationToken::new();
    spawn_interrupt_handler(shutdown.clone())?;
    let mut run = Run {
        desk,
        max_size: config.max_message_size,
        quarantine_dir: config.quarantine_dir.clone(),
        pipeline: super::pipeline(config).await?,
        shutdown,
        counts: BTreeMap::new(),
        show_bar: std::io::stderr().is_terminal(),
    };
    let started = Instant::now();
    let mut reports = Vec::with_capacity(sources.len());
    for (path, kind) in sources {
        if run.shutdown.is_cancelled() {
            break;
        }
        let canonical = std::fs::canonicalize(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut report = SourceReport {
            path: canonical.display().to_string(),
            kind,
            imported: 0,
            skipped: 0,
            quarantined: 0,
            resumed_at: None,
            restarted: None,
        };
        let result = match kind {
            Kind::Mbox => run.mbox(&canonical, &mut report).await,
            Kind::Maildir => run.maildir(&canonical, &mut report).await,
        };
        reports.push(report);
        result?;
    }
    let elapsed = started.elapsed();
    let interrupted = run.shutdown.is_cancelled();
    let mut sent = 0;
    if !no_send && !interrupted {
        let worker = crate::daemon::outbox_worker(&run.pipeline)?;
        sent = worker.drain_once(crate::now()).await?.sent;
    }
    let imported: u64 = reports.iter().map(|r| r.imported).sum();
    let skipped: u64 = reports.iter().map(|r| r.skipped).sum();
    let quarantined: u64 = reports.iter().map(|r| r.quarantined).sum();
    if json {
        let outcomes: Vec<_> = run
            .counts
            .iter()
            .map(|((a, r), n)| serde_json::json!({"action": a, "reason": r, "count": n}))
            .collect();
        out!(
            "{}",
            serde_json::json!({
                "imported": imported,
                "skipped": skipped,
                "quarantined": quarantined,
                "seconds": elapsed.as_secs_f64(),
                "interrupted": interrupted,
                "mail_sent": sent,
                "outcomes": outcomes,
                "sources": reports,
            })
        );
    } else {
        if !run.counts.is_empty() {
            let mut t = Table::new(&["ACTION", "REASON", "COUNT"]);
            for ((a, r), n) in &run.counts {
                t.row(vec![a.to_string(), r.to_string(), n.to_string()]);
            }
            out_text!("{t}");
        }
        for r in &reports {
            let mut line = format!("{} ({}): ", r.path, r.kind.as_str());
            if r.imported == 0 && !interrupted {
                line.push_str("nothing new");
            } else {
                line.push_str(&format!("{} imported", r.imported));
            }
            if r.skipped > 0 {
                line.push_str(&format!(
                    ", {} skipped (imported before{})",
                    r.skipped,
                    match r.resumed_at {
                        Some(at) => format!("; resumed at byte {at}"),
                        None => String::new(),
                    }
                ));
            }
            if r.quarantined > 0 {
                line.push_str(&format!(", {} quarantined", r.quarantined));
            }
            out!("{line}");
            if let Some(why) = &r.restarted {
                out!("  read from the start again: {why}");
            }
        }
        let mut last = if imported == 0 {
            "nothing new to import".to_string()
        } else {
            format!(
                "{imported} message{} imported in {:.2}s ({:.0}/s)",
                if imported == 1 { "" } else { "s" },
                elapsed.as_secs_f64(),
                imported as f64 / elapsed.as_secs_f64().max(1e-9)
            )
        };
        if quarantined > 0 {
            last.push_str(&format!(
                "; {quarantined} quarantined in {}",
                run.quarantine_dir.display()
            ));
        }
        if interrupted {
            last.push_str("; queued mail is sent by `intake run` or `intake outbox send`");
        } else if !no_send {
            last.push_str(&format!("; {sent} mail written"));
        }
        out!("{last}");
    }
    if interrupted {
        eprintln!("intake: interrupted, run again to continue");
    }
    Ok(EX_OK)
}

/// mbox, Maildir, or neither (`None`).
fn classify(path: &Path) -> anyhow::Result<Option<Kind>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        let maildir = path.join("cur").is_dir() || path.join("new").is_dir();
        return Ok(maildir.then_some(Kind::Maildir));
    }
    let mbox = mbox::is_mbox(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(mbox.then_some(Kind::Mbox))
}

/// The first signal asks to stop after the batch in flight; a second one stops at once.
fn spawn_interrupt_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // Like a crash: the open transaction is rolled back, the progress recorded so far
        // is where the next run starts.
        eprintln!("\nintake: stopped at once; run again to continue");
        std::process::exit(130);
    });
    Ok(())
}

impl Run {
    async fn mbox(&mut self, path: &Path, report: &mut SourceReport) -> anyhow::Result<()> {
        let source = format!("import:{}", path.display());
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        let (start, before, count_recorded) = self.resume_point(path, &source, report).await?;
        let mut reached = start;
        if start < size {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let reader_path = path.to_path_buf();
            let (max, dir) = (self.max_size, self.quarantine_dir.clone());
            std::thread::spawn(move || read_mbox(&reader_path, start, max, &dir, tx));
            let mut progress = Progress::new(self.show_bar, path, Some((start, size)));
            if let Some(end) = self.consume(&source, rx, report, &mut progress).await? {
                reached = end;
            }
            progress.finish();
        }
        if report.imported == 0 && report.restarted.is_none() && count_recorded {
            return Ok(());
        }
        // For the next run's report: how many messages lie before `reached`.
        let file = path.to_path_buf();
        let (head, tail) = tokio::task::spawn_blocking(move || fingerprints(&file, reached))
            .await?
            .with_context(|| format!("cannot read {}", path.display()))?;
        self.pipeline
            .store()
            .save_import_progress(&ImportProgress {
                source,
                head_sha256: head,
                offset: reached,
                tail_sha256: tail,
                messages: before + report.imported,
                file_size: size,
                updated_at: crate::now(),
            })
            .await?;
        Ok(())
    }

    /// Where to start reading an mbox, how many messages lie before that, and whether
    /// that count is recorded as it is: after the last committed batch when the file still
    /// matches its fingerprint, else 0.
    async fn resume_point(
        &self,
        path: &Path,
        source: &str,
        report: &mut SourceReport,
    ) -> anyhow::Result<(u64, u64, bool)> {
        let store = self.pipeline.store();
        let Some((fingerprint, offset)) = store.mailbox_state(source).await? else {
            return Ok((0, 0, false));
        };
        let offset = u64::try_from(offset).unwrap_or(0);
        let checked = path.to_path_buf();
        if let Err(why) =
            tokio::task::spawn_blocking(move || still_valid(&checked, fingerprint, offset)).await?
        {
            report.restarted = Some(why);
            return Ok((0, 0, false));
        }
        // The count recorded at the end of the last run, plus what a run killed since
        // committed after it (read again only to be counted).
        let counted = path.to_path_buf();
        let recorded = store.import_progress(source).await?;
        let (before, exact) =
            tokio::task::spawn_blocking(move || -> std::io::Result<(u64, bool)> {
                let (from, base) = match recorded {
                    Some(p) if p.offset <= offset && matches_progress(&counted, &p)? => {
                        (p.offset, p.messages)
                    }
                    _ => (0, 0),
                };
                Ok((
                    base + count_messages(&counted, from, offset)?,
                    from == offset,
                ))
            })
            .await?
            .with_context(|| format!("cannot read {}", path.display()))?;
        report.skipped = before;
        report.resumed_at = Some(offset);
        Ok((offset, before, exact))
    }

    async fn maildir(&mut self, path: &Path, report: &mut SourceReport) -> anyhow::Result<()> {
        let source = format!("import:{}", path.display());
        let listed = path.to_path_buf();
        let files = tokio::task::spawn_blocking(move || maildir_files(&listed))
            .await?
            .with_context(|| format!("cannot list {}", path.display()))?;
        let references: Vec<String> = files.iter().map(|(_, r)| r.clone()).collect();
        let done = self
            .pipeline
            .store()
            .recorded_refs(&source, &references)
            .await?;
        let todo: Vec<(PathBuf, String)> = files
            .into_iter()
            .filter(|(_, r)| !done.contains(r))
            .collect();
        report.skipped = (references.len() - todo.len()) as u64;
        if todo.is_empty() {
            return Ok(());
        }
        let total = todo.len() as u64;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (max, dir) = (self.max_size, self.quarantine_dir.clone());
        std::thread::spawn(move || read_maildir(todo, max, &dir, tx));
        let mut progress = Progress::new(self.show_bar, path, None);
        progress.set_messages_total(total);
        self.consume(&source, rx, report, &mut progress).await?;
        progress.finish();
        Ok(())
    }

    /// Commits batches as the reader thread hands them over, until it is done or we are
    /// asked to stop. Returns the end of the last mbox batch committed.
    async fn consume(
        &mut self,
        source: &str,
        mut rx: tokio::sync::mpsc::Receiver<Result<Batch, String>>,
        report: &mut SourceReport,
        progress: &mut Progress,
    ) -> anyhow::Result<Option<u64>> {
        let mut reached = None;
        loop {
            let next = tokio::select! {
                // A batch in flight is never abandoned: this only stops the wait for the
                // next one.
                _ = self.shutdown.cancelled() => return Ok(reached),
                next = rx.recv() => next,
            };
            let Some(batch) = next else {
                return Ok(reached);
            };
            let batch = batch.map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = batch.items.len() as u64;
            let mbox = batch.fingerprint.is_some().then_some(batch.end);
            self.commit(source, batch, report).await?;
            report.imported += n;
            reached = mbox.or(reached);
            progress.update(mbox.unwrap_or(report.imported), report.imported);
            if self.shutdown.is_cancelled() {
                return Ok(reached);
            }
        }
    }

    /// One batch through the pipeline; quarantined messages are kept in the quarantine
    /// directory (oversized ones were written there while they were read).
    async fn commit(
        &mut self,
        source: &str,
        batch: Batch,
        report: &mut SourceReport,
    ) -> anyhow::Result<()> {
        let (batch_end, batch_progress) = (batch.end, batch.fingerprint);
        let mut spilled = Vec::with_capacity(batch.items.len());
        let envelopes: Vec<Envelope> = batch
            .items
            .into_iter()
            .map(|item| {
                let m = item.message;
                spilled.push(m.spilled.is_some());
                Envelope {
                    quarantine_ref: self
                        .quarantine_dir
                        .join(format!("{}.eml", m.sha256))
                        .display()
                        .to_string(),
                    truncated: m.spilled.is_some(),
                    raw: m.raw,
                    size: m.size,
                    content_hash: Some(m.sha256),
                    fetch_error: None,
                    source: SourceRef {
                        source: source.to_string(),
                        reference: item.reference,
                    },
                    desk: self.desk.clone(),
                }
            })
            .collect();
        // An mbox batch commits how far the file was read with it.
        let progress = batch_progress.map(|fingerprint| crate::pipeline::Progress {
            mailbox: source.to_string(),
            uidvalidity: fingerprint,
            last_uid: i64::try_from(batch_end).unwrap_or(i64::MAX),
            acked_uid: 0,
        });
        let outcomes = self
            .pipeline
            .process_batch_with_progress(&envelopes, crate::now(), progress.as_ref())
            .await?;
        for ((env, o), spilled) in envelopes.iter().zip(&outcomes).zip(spilled) {
            if let Outcome::Quarantined { .. } = o {
                report.quarantined += 1;
                if !spilled {
                    crate::mailbox::keep_quarantined(&self.quarantine_dir, &env.raw)
                        .await
                        .with_context(|| {
                            format!(
                                "cannot keep a quarantined message in {}",
                                self.quarantine_dir.display()
                            )
                        })?;
                }
            }
            *self.counts.entry(o.summary()).or_default() += 1;
        }
        Ok(())
    }
}

/// Whether the progress committed for `path` still describes it: the part read before is
/// unchanged (its fingerprint) and a message starts at `offset`. `Err` says why not.
fn still_valid(path: &Path, fingerprint: i64, offset: u64) -> Result<(), String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read it: {e}"))?
        .len();
    if size < offset {
        return Err(format!(
            "it is smaller ({size} bytes) than where the last import stopped ({offset} bytes)"
        ));
    }
    let (head, tail) = fingerprints(path, offset).map_err(|e| format!("cannot read it: {e}"))?;
    if combined(&head, &tail) != fingerprint {
        return Err("the part imported before has changed".into());
    }
    if offset < size {
        let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .map_err(|e| format!("cannot read it: {e}"))?;
        let mut from = [0u8; 5];
        file.read_exact(&mut from)
            .map_err(|e| format!("cannot read it: {e}"))?;
        if &from != b"From " {
            return Err(format!("no message starts at byte {offset} any more"));
        }
    }
    Ok(())
}

/// Whether the count recorded at the end of a run still applies to `path`.
fn matches_progress(path: &Path, p: &ImportProgress) -> std::io::Result<bool> {
    let (head, tail) = fingerprints(path, p.offset)?;
    Ok(head == p.head_sha256 && tail == p.tail_sha256)
}

/// Messages starting in `[from, to)`; `from` must be where one starts.
fn count_messages(path: &Path, from: u64, to: u64) -> std::io::Result<u64> {
    if from >= to {
        return Ok(0);
    }
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(from))?;
    let input = std::io::BufReader::with_capacity(256 * 1024, file);
    // A limit of 0 keeps only the head of each message in memory.
    let reader = MboxReader::new(input, from, 0, None).map_err(std::io::Error::other)?;
    let mut n = 0;
    for message in reader {
        if message.map_err(std::io::Error::other)?.offset >= to {
            break;
        }
        n += 1;
    }
    Ok(n)
}

/// The two fingerprints as the one number committed with each batch.
fn combined(head: &str, tail: &str) -> i64 {
    let digest = Sha256::digest(format!("{head}:{tail}"));
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 63 bits: a positive BIGINT on both databases.
    (u64::from_be_bytes(first) >> 1) as i64
}

/// SHA-256 of the first `min(64 KiB, offset)` bytes and of the 4 KiB before `offset`.
fn fingerprints(path: &Path, offset: u64) -> std::io::Result<(String, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hash_range = |from: u64, len: u64| -> std::io::Result<String> {
        file.seek(std::io::SeekFrom::Start(from))?;
        let mut buf = Vec::with_capacity(len as usize);
        (&mut file).take(len).read_to_end(&mut buf)?;
        if (buf.len() as u64) < len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file is shorter than recorded",
            ));
        }
        Ok(hex::encode(Sha256::digest(&buf)))
    };
    let head = hash_range(0, offset.min(HEAD_BYTES))?;
    let tail_start = offset.saturating_sub(TAIL_BYTES);
    let tail = hash_range(tail_start, offset - tail_start)?;
    Ok((head, tail))
}

/// The reader thread of an mbox: batches from `start` to the end, sent to `tx`.
fn read_mbox(path: &Path, start: u64, max_size: u64, quarantine_dir: &Path, tx: Sender) {
    let result = (|| -> Result<(), String> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        file.seek(std::io::SeekFrom::Start(start))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let input = std::io::BufReader::with_capacity(256 * 1024, file);
        let reader = MboxReader::new(input, start, max_size, Some(quarantine_dir))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut batch = Batch::new(start);
        let mut bytes = 0u64;
        let seal = |batch: &mut Batch| -> Result<(), String> {
            let (head, tail) = fingerprints(path, batch.end)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            batch.fingerprint = Some(combined(&head, &tail));
            Ok(())
        };
        for message in reader {
            let message = message
                .map_err(|e| format!("{}: {}", path.display(), crate::outbox::error_chain(&e)))?;
            bytes += message.message.raw.len() as u64;
            batch.end = message.end;
            batch.items.push(Item {
                reference: message.offset.to_string(),
                message: message.message,
            });
            if batch.items.len() >= BATCH || bytes >= BATCH_BYTES {
                seal(&mut batch)?;
                let next = Batch::new(batch.end);
                let full = std::mem::replace(&mut batch, next);
                bytes = 0;
                if tx.blocking_send(Ok(full)).is_err() {
                    return Ok(()); // the importer stopped
                }
            }
        }
        if !batch.items.is_empty() {
            seal(&mut batch)?;
            let _ = tx.blocking_send(Ok(batch));
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = tx.blocking_send(Err(e));
    }
}

/// The files of a Maildir's `cur/` and `new/`, with their unique names (the file name
/// without the `:2,...` flags), oldest name first.
fn maildir_files(path: &Path) -> std::io::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    for sub in ["cur", "new"] {
        let dir = path.join(sub);
        if !dir.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.file_type()?.is_file() {
                continue;
            }
            let unique = match name.split_once(':') {
                Some((base, _)) => base.to_string(),
                None => name,
            };
            out.push((entry.path(), unique));
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// The reader thread of a Maildir import.
fn read_maildir(files: Vec<(PathBuf, String)>, max_size: u64, quarantine_dir: &Path, tx: Sender) {
    let mut batch = Batch::new(0);
    let mut bytes = 0u64;
    for (path, reference) in files {
        let message = match mbox::read_file(&path, max_size, Some(quarantine_dir)) {
            Ok(Some(m)) => m,
            Ok(None) => continue, // gone meanwhile
            Err(e) => {
                let _ = tx.blocking_send(Err(format!("cannot read {}: {e}", path.display())));
                return;
            }
        };
        bytes += message.raw.len() as u64;
        batch.items.push(Item { reference, message });
        if batch.items.len() >= BATCH || bytes >= BATCH_BYTES {
            let full = std::mem::replace(&mut batch, Batch::new(0));
            bytes = 0;
            if tx.blocking_send(Ok(full)).is_err() {
                return;
            }
        }
    }
    if !batch.items.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

/// A progress bar on a terminal, a line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    /// mbox: bytes (start, total); Maildir: messages (0, total).
    range: (u64, u64),
    bytes: bool,
    started: Instant,
    last_line: Instant,
    messages: u64,
}

impl Progress {
    /// `bytes`: the byte range of an mbox still to read; `None`: count messages.
    fn new(show_bar: bool, path: &Path, bytes: Option<(u64, u64)>) -> Progress {
        let label = path.display().to_string();
        let range = bytes.unwrap_or((0, 0));
        let bar = show_bar.then(|| {
            // `wide_bar` takes what the terminal has left: one line, never wrapped.
            let template = if bytes.is_some() {
                "{prefix} [{wide_bar}] {percent:>3}% {msg} {eta:>4}"
            } else {
                "{prefix} [{wide_bar}] {pos}/{len} {msg} {eta:>4}"
            };
            let style = indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> ");
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(range.1),
                indicatif::ProgressDrawTarget::stderr(),
            )
            .with_style(style)
            .with_prefix(short_label(&label))
            .with_message("starting")
            .with_position(range.0);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            label,
            range,
            bytes: bytes.is_some(),
            started: Instant::now(),
            last_line: Instant::now(),
            messages: 0,
        }
    }

    fn set_messages_total(&mut self, total: u64) {
        self.range = (0, total);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    fn rate(&self) -> f64 {
        self.messages as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn update(&mut self, position: u64, messages: u64) {
        self.messages = messages;
        let rate = self.rate();
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            bar.set_message(format!("{messages} messages, {rate:.0}/s"));
            return;
        }
        if self.last_line.elapsed() >= PLAIN_PROGRESS_EVERY {
            self.last_line = Instant::now();
            let done = position.saturating_sub(self.range.0);
            let todo = self.range.1.saturating_sub(self.range.0).max(1);
            let unit = if self.bytes { "" } else { " of the messages" };
            eprintln!(
                "intake: importing {}: {messages} messages, {:.0}%{unit} ({rate:.0}/s)",
                self.label,
                done as f64 * 100.0 / todo as f64
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    /// Also when an error ends the import: the message must not land in a half bar.
    fn drop(&mut self) {
        self.finish();
    }
}

/// The file or directory name, short enough for a bar.
fn short_label(path: &str) -> String {
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string());
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= 24 {
        return name;
    }
    let tail: String = chars[chars.len() - 23..].iter().collect();
    format!("…{tail}")
}
