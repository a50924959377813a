//! Message sources: a Maildir watched by the daemon, files and folders for backfill
//! (`intake process`), and standard input for MTA pipe delivery (`intake deliver`).

pub mod imap;
pub mod lease;
pub mod maildir;
pub mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::keys::DeskKey;
use crate::pipeline::Envelope;
use crate::store::SourceRef;

/// How much of an oversized message is read: enough for its headers, so the quarantine
/// list can show who sent it.
const OVERSIZED_HEAD: u64 = 64 * 1024;

/// Reads a message file into an envelope, without reading more than the head of a file
/// over `max_size`. `None` when the file vanished. One blocking-pool round trip per file.
pub async fn read_envelope(
    path: &Path,
    max_size: u64,
    source: SourceRef,
    desk: Option<DeskKey>,
    quarantine_ref: String,
) -> std::io::Result<Option<Envelope>> {
    let path = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || read_message_file(&path, max_size))
        .await
        .map_err(std::io::Error::other)??;
    Ok(read.map(|(raw, size)| Envelope {
        truncated: size > max_size,
        content_hash: None,
        fetch_error: None,
        raw,
        size,
        source,
        desk,
        quarantine_ref,
    }))
}

/// The bytes of a message file (only its head when it is over `max_size`) and its size.
fn read_message_file(path: &Path, max_size: u64) -> std::io::Result<Option<(Vec<u8>, u64)>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    let mut raw = Vec::with_capacity(if size > max_size {
        OVERSIZED_HEAD as usize
    } else {
        size as usize
    });
    if size > max_size {
        file.take(OVERSIZED_HEAD).read_to_end(&mut raw)?;
    } else {
        let mut file = file;
        file.read_to_end(&mut raw)?;
    }
    let size = size.max(raw.len() as u64);
    Ok(Some((raw, size)))
}

/// Capped exponential backoff with jitter, for reconnects and retries.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next pause: base·2^n, capped, minus up to a quarter of jitter.
    pub fn next_pause(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let capped = exp.min(self.cap);
        let jitter = capped.mul_f64(rand::random::<f64>() * 0.25);
        capped.saturating_sub(jitter)
    }
}

/// Every message file under `paths`: files as given, folders walked (Maildir `tmp/` and
/// hidden files skipped), in a stable order.
pub fn collect_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "tmp" {
            continue;
        }
        let path = e.path();
        if e.file_type()?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// [`crate::message::content_hash`] of a file, read in pieces (for files too large to
/// hold).
pub fn file_content_hash(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Keeps a copy of a quarantined message from `deliver` or `process` under `dir`, named
/// by its content hash. Returns the path.
pub async fn keep_quarantined(dir: &Path, raw: &[u8]) -> std::io::Result<PathBuf> {
    tokio::fs::create_dir_all(dir).await?;
    let path = dir.join(format!("{}.eml", crate::message::content_hash(raw)));
    let tmp = dir.join(format!(".{}.tmp", crate::message::content_hash(raw)));
    tokio::fs::write(&tmp, raw).await?;
    tokio::fs::rename(&tmp, &path).await?;
    Ok(path)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
