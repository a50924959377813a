//! Reading an mbox file as a stream of messages, for `intake import`.
//!
//! An mbox is messages one after the other, each introduced by a `From ` line (the
//! "From_" line: envelope sender and date), with a blank line before the next one. Body
//! lines that would look like a From_ line are escaped by writers with a `>`: mboxo
//! escapes `From `, mboxrd also `>From `, `>>From ` and so on. We read both as mboxrd —
//! one `>` is removed from every line matching `^>+From ` — which restores mboxrd exactly
//! and mboxo except for a body line that really began with `>From `.
//!
//! A line is a separator when it starts with `From ` and either follows a blank line or
//! looks like a From_ line (it carries a time, `hh:mm`): writers that do not escape
//! bodies still rarely produce that. The blank line before a separator belongs to the
//! separator and is not part of the message. LF and CRLF files both work (bytes are kept
//! as they are), and so does a last message without a final newline.
//!
//! Nothing is held in memory but the message being read, and of a message larger than the
//! size limit only its first 64 KiB: the rest is streamed to a file in the quarantine
//! directory as it is read (such a message is always quarantined). Lines are read in
//! pieces of at most 64 KiB, so a file without line breaks cannot exhaust memory either.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// How much of an oversized message is kept in memory: enough for its headers, so the
/// quarantine list can say who sent it.
pub const OVERSIZED_HEAD: usize = 64 * 1024;

/// Lines are read in pieces of at most this many bytes.
const PIECE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MboxError {
    #[error("no message starts at byte {0} (the file does not begin with a \"From \" line there)")]
    NoFromLine(u64),
    #[error("cannot read the mbox")]
    Io(#[from] std::io::Error),
}

/// One message of the mbox.
#[derive(Debug)]
pub struct MboxMessage {
    /// Where its From_ line starts in the file.
    pub offset: u64,
    /// Where the next message's From_ line starts (or the end of the file): the place to
    /// resume from once this message is committed.
    pub end: u64,
    pub message: ReadMessage,
}

/// A message as read: the bytes, or only the head of an oversized one.
#[derive(Debug)]
pub struct ReadMessage {
    /// The whole message, or its first [`OVERSIZED_HEAD`] bytes when it is larger than
    /// the limit.
    pub raw: Vec<u8>,
    /// Its full size.
    pub size: u64,
    /// SHA-256 of the whole message, hex (the ledger's content hash).
    pub sha256: String,
    /// Where the whole of an oversized message was written (`<sha256>.eml`), if a
    /// directory for that was given.
    pub spilled: Option<PathBuf>,
}

/// Collects one message's bytes: in memory up to `max_size`, beyond that the head in
/// memory and everything in a file under `spill_dir`.
pub struct MessageBuilder<'a> {
    raw: Vec<u8>,
    size: u64,
    hasher: Sha256,
    max_size: u64,
    oversized: bool,
    spill_dir: Option<&'a Path>,
    spill: Option<(std::fs::File, PathBuf)>,
}

impl<'a> MessageBuilder<'a> {
    pub fn new(max_size: u64, spill_dir: Option<&'a Path>) -> Self {
        MessageBuilder {
            raw: Vec::new(),
            size: 0,
            hasher: Sha256::new(),
            max_size,
            oversized: false,
            spill_dir,
            spill: None,
        }
    }

    pub fn push(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if let Some((file, _)) = &mut self.spill {
            return file.write_all(data);
        }
        if !self.oversized && self.size <= self.max_size {
            self.raw.extend_from_slice(data);
            return Ok(());
        }
        if !self.oversized {
            // Just went over the limit: `raw` holds everything before `data`.
            self.oversized = true;
            if let Some(dir) = self.spill_dir {
                std::fs::create_dir_all(dir)?;
                let tmp = dir.join(format!(
                    ".import-{}-{:016x}.tmp",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&self.raw)?;
                file.write_all(data)?;
                self.spill = Some((file, tmp));
            }
        }
        if self.raw.len() < OVERSIZED_HEAD {
            let take = (OVERSIZED_HEAD - self.raw.len()).min(data.len());
            self.raw.extend_from_slice(&data[..take]);
        }
        self.raw.truncate(OVERSIZED_HEAD);
        self.raw.shrink_to_fit();
        Ok(())
    }

    pub fn finish(self) -> std::io::Result<ReadMessage> {
        let sha256 = hex::encode(self.hasher.finalize());
        let spilled = match self.spill {
            Some((file, tmp)) => {
                file.sync_all()?;
                drop(file);
                let dir = tmp.parent().map(Path::to_path_buf).unwrap_or_default();
                let path = dir.join(format!("{sha256}.eml"));
                std::fs::rename(&tmp, &path)?;
                Some(path)
            }
            None => None,
        };
        Ok(ReadMessage {
            raw: self.raw,
            size: self.size,
            sha256,
            spilled,
        })
    }
}

/// Reads a message file (a Maildir entry) like an mbox message: whole when it is within
/// `max_size`, else its head, with the whole file copied to `spill_dir`. `None` when the
/// file vanished.
pub fn read_file(
    path: &Path,
    max_size: u64,
    spill_dir: Option<&Path>,
) -> std::io::Result<Option<ReadMessage>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut builder = MessageBuilder::new(max_size, spill_dir);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        builder.push(&chunk[..n])?;
    }
    builder.finish().map(Some)
}

/// The messages of an mbox, one at a time.
pub struct MboxReader<'a, R> {
    input: R,
    /// File offset of the next byte to read.
    pos: u64,
    /// Offset of the From_ line of the next message, already read; `None` at the end.
    next_start: Option<u64>,
    max_size: u64,
    spill_dir: Option<&'a Path>,
    line: Vec<u8>,
}

impl<'a, R: BufRead> MboxReader<'a, R> {
    /// A reader of `input`, which is positioned at byte `offset` of the file, where a
    /// message's From_ line must start (0 for a whole file). An empty input has no
    /// messages.
    pub fn new(
        input: R,
        offset: u64,
        max_size: u64,
        spill_dir: Option<&'a Path>,
    ) -> Result<Self, MboxError> {
        let mut reader = MboxReader {
            input,
            pos: offset,
            next_start: None,
            max_size,
            spill_dir,
            line: Vec::new(),
        };
        let n = reader.read_piece()?;
        if n == 0 {
            return Ok(reader);
        }
        if !reader.line.starts_with(b"From ") {
            return Err(MboxError::NoFromLine(offset));
        }
        reader.next_start = Some(offset);
        if !reader.line.ends_with(b"\n") {
            reader.skip_rest_of_line()?;
        }
        Ok(reader)
    }

    /// Reads the next piece of a line into `self.line`: up to and including a newline,
    /// at most [`PIECE`] bytes. Returns its length (0 at the end of the input).
    fn read_piece(&mut self) -> std::io::Result<usize> {
        self.line.clear();
        let n = (&mut self.input)
            .take(PIECE)
            .read_until(b'\n', &mut self.line)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn skip_rest_of_line(&mut self) -> std::io::Result<()> {
        loop {
            let n = self.read_piece()?;
            if n == 0 || self.line.ends_with(b"\n") {
                return Ok(());
            }
        }
    }

    /// The next message; `None` after the last.
    pub fn next_message(&mut self) -> Result<Option<MboxMessage>, MboxError> {
        let Some(offset) = self.next_start else {
            return Ok(None);
        };
        let mut message = MessageBuilder::new(self.max_size, self.spill_dir);
        // The blank line read last, held back: before a separator it is not part of the
        // message.
        let mut pending_blank: Option<&'static [u8]> = None;
        let mut line_start = true;
        loop {
            let piece_start = self.pos;
            let n = self.read_piece()?;
            if n == 0 {
                self.next_start = None;
                return Ok(Some(MboxMessage {
                    offset,
                    end: self.pos,
                    message: message.finish()?,
                }));
            }
            let ends_line = self.line.ends_with(b"\n");
            if !line_start {
                message.push(&self.line)?;
                line_start = ends_line;
                continue;
            }
            if self.line.starts_with(b"From ")
                && (pending_blank.is_some() || looks_like_from_line(&self.line))
            {
                self.next_start = Some(piece_start);
                if !ends_line {
                    self.skip_rest_of_line()?;
                }
                return Ok(Some(MboxMessage {
                    offset,
                    end: piece_start,
                    message: message.finish()?,
                }));
            }
            if let Some(blank) = pending_blank.take() {
                message.push(blank)?;
            }
            match self.line.as_slice() {
                b"\n" => pending_blank = Some(b"\n"),
                b"\r\n" => pending_blank = Some(b"\r\n"),
                line if is_escaped_from(line) => message.push(&line[1..])?,
                line => message.push(line)?,
            }
            line_start = ends_line;
        }
    }
}

impl<R: BufRead> Iterator for MboxReader<'_, R> {
    type Item = Result<MboxMessage, MboxError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_message().transpose()
    }
}

/// `>From `, `>>From `, ...: a body line an mboxrd writer escaped.
fn is_escaped_from(line: &[u8]) -> bool {
    let quotes = line.iter().take_while(|&&b| b == b'>').count();
    quotes > 0 && line[quotes..].starts_with(b"From ")
}

/// A From_ line carries the date as asctime (`Mon Nov 23 10:00:00 2026`): a body line
/// starting with `From ` rarely has a time in it.
fn looks_like_from_line(line: &[u8]) -> bool {
    line.windows(5).any(|w| {
        w[0].is_ascii_digit()
            && w[1].is_ascii_digit()
            && w[2] == b':'
            && w[3].is_ascii_digit()
            && w[4].is_ascii_digit()
    })
}

/// Whether `path` looks like an mbox: it starts with a `From ` line (or is empty).
pub fn is_mbox(path: &Path) -> std::io::Result<bool> {
    let mut head = [0u8; 5];
    let mut file = std::fs::File::open(path)?;
    let mut got = 0;
    while got < head.len() {
        let n = file.read(&mut head[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got == 0 || &head[..got] == b"From ")
}

#[cfg(test)]
#[path = "mbox_tests.rs"]
mod tests;
