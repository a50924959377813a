//! An IMAP folder as a source. The only module that knows async-imap.
//!
//! - **UID progress.** UIDVALIDITY and the last committed UID are stored per mailbox and
//!   committed in the same transaction as the batch they cover. A UIDVALIDITY change
//!   rescans the folder; the ledger (Message-ID, content hash) makes what was already
//!   processed a no-op.
//! - **Acknowledge after commit.** `after = seen | move:FOLDER | delete` is applied only
//!   once the batch committed. If that fails (connection lost), the next connection finds
//!   the messages at or below the stored UID still in the folder and acknowledges them
//!   then — quarantined ones back into quarantine, never deleted.
//! - **Size first.** `RFC822.SIZE` is fetched before any body; a message over
//!   `max_message_size` is quarantined from its headers alone and moved to the quarantine
//!   folder without being downloaded.
//! - **Push.** IDLE when the server offers it, re-issued every `idle_timeout` (25 min,
//!   inside RFC 2177's 29); polling otherwise. Errors reconnect with capped exponential
//!   backoff and jitter; one mailbox's trouble never touches another's task. A server
//!   that sends nothing for `reply_timeout` while a reply is due is such an error (in
//!   IDLE, TCP keep-alive watches the connection instead).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_imap::extensions::idle::IdleResponse;
use async_imap::imap_proto::rfc4315::UidSetMember;
use async_imap::imap_proto::{Response, ResponseCode, Status};
use async_imap::types::UnsolicitedResponse;
use async_imap::{Client, Session};
use futures_util::TryStreamExt;
use secrecy::ExposeSecret;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::{After, ImapAuth, ImapConfig, ImapTls, StartAt, TokenSource};
use crate::keys::DeskKey;
use crate::pipeline::{Envelope, Outcome, Pipeline, Progress};
use crate::store::SourceRef;

use super::Backoff;
use super::tls::{self, ImapStream, ReplyTimeout};

type ImapSession = Session<ImapStream>;

/// At most this many bytes of message bodies are held for one batch.
const BATCH_BYTES: u64 = 64 * 1024 * 1024;
/// The next batch is fetched while one is processed only when it is at most this big.
const PREFETCH_BYTES: u64 = 4 * 1024 * 1024;

/// A batch fetched, not yet processed: envelopes and their UIDs, in UID order, and
/// their headers when already read.
struct Fetched {
    /// The size limit it was fetched under: larger messages hold only their head.
    max: u64,
    envelopes: Arc<Vec<Envelope>>,
    heads: Option<crate::pipeline::PreparedHeads>,
    uids: Vec<u32>,
    /// Stopped at a message whose body did not come (counted as a failed try).
    cut_short: bool,
}
/// Messages larger than this are fetched in pieces of this size.
const FETCH_PIECE: u64 = 1024 * 1024;
/// A message whose body the server keeps failing to return is quarantined after this many
/// tries, and not before it has been failing for the mailbox's `unfetchable_after`.
const FETCH_ATTEMPTS: u32 = 3;
/// How soon a message whose body did not come is tried again.
const FETCH_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("mailbox {mailbox}: cannot connect to {address}")]
    Connect {
        mailbox: String,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mailbox {mailbox}: TLS with {address} failed")]
    Tls {
        mailbox: String,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mailbox {mailbox}: TLS configuration")]
    TlsConfig {
        mailbox: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("mailbox {mailbox}: {address} refused the login for {username}: {message}")]
    LoginRefused {
        mailbox: String,
        address: String,
        username: String,
        message: String,
    },
    #[error("mailbox {mailbox}: cannot get an OAuth2 access token: {message}")]
    Token { mailbox: String, message: String },
    #[error("mailbox {mailbox}: IMAP error with {address} while trying to {action}")]
    Protocol {
        mailbox: String,
        address: String,
        action: &'static str,
        #[source]
        source: async_imap::error::Error,
    },
    #[error("mailbox {mailbox}: processing failed")]
    Pipeline {
        mailbox: String,
        #[source]
        source: crate::pipeline::PipelineError,
    },
    #[error(
        "mailbox {mailbox}: folder {folder:?} was recreated since the message was quarantined \
         (UIDVALIDITY {recorded}, now {found}), so UID {uid} no longer names it; find it in \
         the folder by hand"
    )]
    QuarantineRecreated {
        mailbox: String,
        folder: String,
        recorded: u32,
        found: u32,
        uid: u32,
    },
    #[error("mailbox {mailbox}: cannot read or record mailbox progress")]
    Store {
        mailbox: String,
        #[source]
        source: crate::store::StoreError,
    },
}

/// One IMAP mailbox.
pub struct ImapSource {
    pub name: String,
    pub desk: DeskKey,
    pub cfg: ImapConfig,
    token_cache: Mutex<Option<(String, Instant)>>,
    /// Failed body fetches per (UIDVALIDITY, UID): how many, since when.
    fetch_failures: Mutex<HashMap<(i64, u32), (u32, Instant)>>,
    /// The server's silence allowed when a reply is due (`reply_timeout`); lifted in IDLE.
    reply_timeout: ReplyTimeout,
    /// Every message up to this UID is acknowledged; recorded with the next commit.
    acked: std::sync::atomic::AtomicI64,
    /// Processed messages the server refused to acknowledge this session.
    refused: std::sync::Mutex<Refused>,
}

/// Processed messages the server refused to acknowledge (see
/// [`ImapSource::acknowledge`]): tried again on their own after a later batch went
/// through (at most every [`REFUSED_RETRY`]), and, until they are acknowledged,
/// `acked` stays below them, so the leftover pass of the next connection finds them
/// if this one ends first.
#[derive(Debug, Default)]
struct Refused {
    uids: Vec<u32>,
    /// The lowest UID of a refused batch.
    from: Option<u32>,
    /// More were refused than [`MAX_REFUSED`]: the ones left out of `uids` are only
    /// found by the next connection, so the hold on `acked` stays until then.
    overflow: bool,
    /// When `uids` were last tried again.
    tried: Option<Instant>,
}

/// How often refused messages are tried again within a session.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// At most this many refused messages are tried again within a session.
const MAX_REFUSED: usize = 5_000;

/// A compact UID set (`1:3,5,7:9`) of `uids`, in any order, duplicates allowed.
pub fn uid_set(uids: &[u32]) -> String {
    let mut sorted: Vec<u32> = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    runs(&sorted)
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}:{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The runs of consecutive UIDs in `sorted` (ascending, no duplicates), as (first, last).
fn runs(sorted: &[u32]) -> impl Iterator<Item = (u32, u32)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = *sorted.get(i)?;
        let mut end = start;
        while end
            .checked_add(1)
            .is_some_and(|next| sorted.get(i + 1) == Some(&next))
        {
            i += 1;
            end = sorted[i];
        }
        i += 1;
        Some((start, end))
    })
}

/// The longest UID set one command names: scattered UIDs (leftovers, a mailbox others
/// share) make a long set, and servers limit a command line (Dovecot to 64 KB; RFC 7162
/// asks clients to stay within 8,192 octets).
const MAX_SET_BYTES: usize = 4000;

/// `uids`, sorted, cut so that each part's [`uid_set`] is at most [`MAX_SET_BYTES`]: what
/// one command names. One part for the usual run of consecutive UIDs, none for none.
pub fn uid_chunks(uids: &[u32]) -> Vec<Vec<u32>> {
    let mut sorted: Vec<u32> = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let digits = |n: u32| n.checked_ilog10().unwrap_or(0) as usize + 1;
    let mut chunks = Vec::new();
    let (mut chunk, mut len) = (Vec::new(), 0);
    for (a, b) in runs(&sorted) {
        let item = if a == b {
            digits(a)
        } else {
            digits(a) + 1 + digits(b)
        };
        if !chunk.is_empty() && len + 1 + item > MAX_SET_BYTES {
            chunks.push(std::mem::take(&mut chunk));
            len = 0;
        }
        len += if chunk.is_empty() { item } else { 1 + item };
        chunk.extend(a..=b);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// [`uid_chunks`] as UID sets.
pub fn uid_sets(uids: &[u32]) -> Vec<String> {
    uid_chunks(uids).iter().map(|c| uid_set(c)).collect()
}

/// The SASL XOAUTH2 exchange (Gmail, Microsoft 365): the token in answer to the first
/// continuation. A refused token is answered with a second continuation carrying the
/// server's reason (base64 JSON: status, scope), which the client must answer with an
/// empty line; the tagged NO follows. The reason is kept in `refusal` for the error.
struct XOAuth2 {
    user: String,
    token: String,
    sent: bool,
    refusal: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl async_imap::Authenticator for XOAuth2 {
    type Response = String;
    fn process(&mut self, challenge: &[u8]) -> String {
        if !self.sent {
            self.sent = true;
            return format!("user={}\x01auth=Bearer {}\x01\x01", self.user, self.token);
        }
        let reason = crate::message::one_line(&String::from_utf8_lossy(challenge), 300);
        if let Ok(mut r) = self.refusal.lock() {
            *r = Some(reason);
        }
        String::new()
    }
}

/// How long `token_command` may run.
const TOKEN_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn quote(folder: &str) -> String {
    format!("\"{}\"", folder.replace('\\', "\\\\").replace('"', "\\\""))
}

impl ImapSource {
    pub fn new(name: String, desk: DeskKey, cfg: ImapConfig) -> Self {
        ImapSource {
            name,
            desk,
            reply_timeout: ReplyTimeout::new(cfg.reply_timeout),
            cfg,
            token_cache: Mutex::new(None),
            fetch_failures: Mutex::new(HashMap::new()),
            acked: Default::default(),
            refused: std::sync::Mutex::new(Refused::default()),
        }
    }

    fn address(&self) -> String {
        self.cfg.address()
    }

    fn protocol(
        &self,
        action: &'static str,
    ) -> impl FnOnce(async_imap::error::Error) -> ImapError + '_ {
        move |source| ImapError::Protocol {
            mailbox: self.name.clone(),
            address: self.address(),
            action,
            source,
        }
    }

    fn source_name(&self) -> String {
        format!("imap:{}", self.name)
    }

    async fn token(&self) -> Result<String, ImapError> {
        let err = |message: String| ImapError::Token {
            mailbox: self.name.clone(),
            message,
        };
        match &self.cfg.auth {
            ImapAuth::Password(_) => Err(err("not an OAuth2 mailbox".into())),
            ImapAuth::XOAuth2(TokenSource::File(path)) => tokio::fs::read_to_string(path)
                .await
                .map(|t| t.trim().to_string())
                .map_err(|e| err(format!("cannot read {}: {e}", path.display()))),
            ImapAuth::XOAuth2(TokenSource::Command { command, lifetime }) => {
                let mut cache = self.token_cache.lock().await;
                if let Some((token, at)) = cache.as_ref()
                    && at.elapsed() < *lifetime
                {
                    return Ok(token.clone());
                }
                // A helper that hangs (a network call without a timeout, a prompt) must
                // not stall the mailbox without a word.
                let run = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(command)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output();
                let out = tokio::time::timeout(TOKEN_COMMAND_TIMEOUT, run)
                    .await
                    .map_err(|_| {
                        err(format!(
                            "token_command did not finish within {TOKEN_COMMAND_TIMEOUT:?}"
                        ))
                    })?
                    .map_err(|e| err(format!("cannot run token_command: {e}")))?;
                if !out.status.success() {
                    return Err(err(format!(
                        "token_command exited with {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if token.is_empty() {
                    return Err(err("token_command printed nothing".into()));
                }
                *cache = Some((token.clone(), Instant::now()));
                Ok(token)
            }
        }
    }

    /// Connects, negotiates TLS and logs in.
    pub async fn connect(&self) -> Result<ImapSession, ImapError> {
        let address = self.address();
        let connect_err = |source: std::io::Error| ImapError::Connect {
            mailbox: self.name.clone(),
            address: address.clone(),
            source,
        };
        let tcp = tokio::time::timeout(
            self.cfg.connect_timeout,
            TcpStream::connect((self.cfg.host.as_str(), self.cfg.port)),
        )
        .await
        .map_err(|_| {
            connect_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ))
        })?
        .map_err(connect_err)?;
        let _ = tcp.set_nodelay(true);
        // Keep-alive probes find a peer that vanished (a NAT or firewall that dropped the
        // connection) even while we sit in IDLE, where silence is normal.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(15))
            .with_retries(4);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        // Every session starts with the limit in force (an IDLE cut short may have left
        // it lifted).
        self.reply_timeout.restore();
        let timeout = self.reply_timeout.clone();
        let tls_config = || {
            tls::client_config(self.cfg.ca_file.as_deref()).map_err(|source| ImapError::TlsConfig {
                mailbox: self.name.clone(),
                source,
            })
        };
        let tls_err = |source: std::io::Error| ImapError::Tls {
            mailbox: self.name.clone(),
            address: address.clone(),
            source,
        };
        let client = match self.cfg.tls {
            ImapTls::Implicit => {
                let stream = self
                    .handshake(tls::connect(tls_config()?, &self.cfg.host, tcp))
                    .await
                    .map_err(tls_err)?;
                let mut client = Client::new(ImapStream::tls(stream, timeout));
                self.greeting(&mut client).await?;
                client
            }
            ImapTls::StartTls => {
                let mut client = Client::new(ImapStream::plain(tcp, timeout.clone()));
                self.greeting(&mut client).await?;
                client
                    .run_command_and_check_ok("STARTTLS", None)
                    .await
                    .map_err(self.protocol("start TLS"))?;
                let Some(tcp) = client.into_inner().into_plain() else {
                    // We built it plain two lines up.
                    return Err(tls_err(std::io::Error::other("STARTTLS on a TLS stream")));
                };
                let stream = self
                    .handshake(tls::connect(tls_config()?, &self.cfg.host, tcp))
                    .await
                    .map_err(tls_err)?;
                Client::new(ImapStream::tls(stream, timeout))
            }
            ImapTls::None => {
                let mut client = Client::new(ImapStream::plain(tcp, timeout));
                self.greeting(&mut client).await?;
                client
            }
        };
        let refused = |e: async_imap::error::Error| match e {
            async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m) => {
                ImapError::LoginRefused {
                    mailbox: self.name.clone(),
                    address: address.clone(),
                    username: self.cfg.username.clone(),
                    message: m,
                }
            }
            other => (self.protocol("log in"))(other),
        };
        match &self.cfg.auth {
            ImapAuth::Password(p) => client
                .login(&self.cfg.username, p.expose_secret())
                .await
                .map_err(|(e, _)| refused(e)),
            ImapAuth::XOAuth2(_) => {
                let token = self.token().await?;
                let refusal = std::sync::Arc::default();
                let result = client
                    .authenticate(
                        "XOAUTH2",
                        XOAuth2 {
                            user: self.cfg.username.clone(),
                            token,
                            sent: false,
                            refusal: std::sync::Arc::clone(&refusal),
                        },
                    )
                    .await
                    .map_err(|(e, _)| {
                        let mut error = refused(e);
                        let reason = refusal.lock().ok().and_then(|mut r| r.take());
                        if let (ImapError::LoginRefused { message, .. }, Some(r)) =
                            (&mut error, reason)
                        {
                            message.push_str(&format!(" ({r})"));
                        }
                        error
                    });
                if result.is_err() {
                    // A refused token may be stale: ask the command again next time.
                    *self.token_cache.lock().await = None;
                }
                result
            }
        }
    }

    /// A TLS handshake, given `connect_timeout` (the stream's own limit comes after it).
    async fn handshake<T>(
        &self,
        handshake: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> std::io::Result<T> {
        tokio::time::timeout(self.cfg.connect_timeout, handshake)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })?
    }

    async fn greeting(&self, client: &mut Client<ImapStream>) -> Result<(), ImapError> {
        match client.read_response().await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ImapError::Connect {
                mailbox: self.name.clone(),
                address: self.address(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before the greeting",
                ),
            }),
            Err(source) => Err(ImapError::Connect {
                mailbox: self.name.clone(),
                address: self.address(),
                source,
            }),
        }
    }

    /// Creates the quarantine folder and the processed folder when they are missing.
    async fn ensure_folders(&self, session: &mut ImapSession) -> Result<(), ImapError> {
        let mut wanted = vec![self.cfg.quarantine_folder.clone()];
        if let After::Move(f) = &self.cfg.after {
            wanted.push(f.clone());
        }
        for folder in wanted {
            let names: Vec<_> = session
                .list(Some(""), Some(&folder))
                .await
                .map_err(self.protocol("list folders"))?
                .try_collect()
                .await
                .map_err(self.protocol("list folders"))?;
            if names.is_empty() {
                match session
                    .create(&folder)
                    .await
                    .map_err(self.protocol("create a folder"))
                {
                    Ok(()) => {
                        tracing::info!(mailbox = %self.name, folder = %folder, "created folder")
                    }
                    // Created meanwhile by another hand (another instance's mailbox on
                    // this account, a mail client): there it is (RFC 5530).
                    Err(e) if refusal(&e).is_some_and(|why| why.contains("[ALREADYEXISTS]")) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Runs until `shutdown`: connect, drain, wait (IDLE or poll), reconnect on errors.
    pub async fn run(&self, pipeline: Pipeline, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match self.session(&pipeline, &shutdown, &mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    let pause = backoff.next_pause();
                    pipeline.health.failed(&self.name, &e.to_string());
                    tracing::warn!(
                        mailbox = %self.name,
                        address = %self.address(),
                        error = %crate::outbox::error_chain(&e),
                        retry_in = ?pause,
                        "mailbox connection failed"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// One connection's life. Returns Ok only on shutdown.
    async fn session(
        &self,
        pipeline: &Pipeline,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), ImapError> {
        let mut session = self.connect().await?;
        let caps = session
            .capabilities()
            .await
            .map_err(self.protocol("read capabilities"))?;
        let idle = self.cfg.idle && caps.has_str("IDLE");
        let can_move = caps.has_str("MOVE");
        let uidplus = caps.has_str("UIDPLUS");
        let expunges = match &self.cfg.after {
            After::Delete => true,
            After::Move(_) => !can_move,
            After::Seen => false,
        };
        if expunges && !uidplus {
            tracing::warn!(mailbox = %self.name, address = %self.address(), "the server has no UIDPLUS: acknowledging needs a plain EXPUNGE, which also removes any other message someone flagged \\Deleted in the folder meanwhile");
        }
        self.ensure_folders(&mut session).await?;
        let mailbox = session
            .select(&self.cfg.folder)
            .await
            .map_err(self.protocol("select the folder"))?;
        let uidvalidity = i64::from(mailbox.uid_validity.unwrap_or(0));
        let (mut last_uid, fresh) = self
            .starting_uid(&mut session, pipeline, uidvalidity, &mailbox)
            .await?;
        // A new start (or a new UIDVALIDITY): nothing is acknowledged yet. Otherwise
        // what the database says, not what this process last held: another instance
        // may have worked the mailbox since (under another UIDVALIDITY, even), and a
        // stale value written back would hide leftovers below it for good.
        let acked = if fresh {
            0
        } else {
            pipeline
                .store()
                .mailbox_acked_uid(&self.name)
                .await
                .map_err(|source| ImapError::Store {
                    mailbox: self.name.clone(),
                    source,
                })?
                .unwrap_or(0)
        };
        self.acked
            .store(acked, std::sync::atomic::Ordering::Relaxed);
        // What was refused last session is tried again by the leftover pass below.
        if let Ok(mut r) = self.refused.lock() {
            *r = Refused::default();
        }
        pipeline.health.ok(&self.name);
        tracing::info!(
            mailbox = %self.name,
            address = %self.address(),
            folder = %self.cfg.folder,
            idle, uidvalidity, last_uid,
            "connected"
        );
        let ops = Ops { can_move, uidplus };
        // The message count last announced (EXISTS): only a change is news.
        let mut known_exists = Some(mailbox.exists);
        // Only a mailbox we already worked on can have leftovers; on first contact (and
        // with `start = "new"`) nothing below the starting point was ours.
        if !fresh {
            self.reprocess_leftovers(&mut session, pipeline, uidvalidity, last_uid, ops)
                .await?;
        }
        loop {
            // Drain everything that is there, batch by batch.
            loop {
                if shutdown.is_cancelled() {
                    let _ = session.logout().await;
                    return Ok(());
                }
                let n = self
                    .process_new(
                        &mut session,
                        pipeline,
                        uidvalidity,
                        &mut last_uid,
                        ops,
                        shutdown,
                    )
                    .await?;
                if n == 0 {
                    break;
                }
                // Progress: the next failure starts the backoff over.
                backoff.reset();
            }
            // Caught up. Not at connect: a failure that repeats after every login (a
            // message the server will not move, a folder over quota) would reconnect
            // about once a second for good. Nor while a message's body is failing: a
            // server that drops the session when it cannot read one (Dovecot does) would
            // be logged into every second until the message is quarantined.
            if self.fetch_failures.lock().await.is_empty() {
                backoff.reset();
            }
            if idle {
                // Whatever the server announced while we were busy would not be announced
                // again during IDLE: look first.
                let responses =
                    std::iter::from_fn(|| session.unsolicited_responses.try_recv().ok());
                if announces_change(responses, &mut known_exists) {
                    continue;
                }
                let idle_for = self.wait_for(self.cfg.idle_timeout).await;
                let mut handle = session.idle();
                handle.init().await.map_err(self.protocol("start IDLE"))?;
                tracing::debug!(mailbox = %self.name, for_secs = idle_for.as_secs(), "waiting in IDLE");
                // Silence is what IDLE is; keep-alive probes watch the connection meanwhile.
                self.reply_timeout.lift();
                let stopped = {
                    // async-imap restarts its timeout on every keep-alive the server
                    // sends; our own deadline makes sure IDLE is re-issued in time.
                    let (wait, stop) = handle.wait_with_timeout(idle_for);
                    tokio::pin!(wait);
                    tokio::select! {
                        r = &mut wait => {
                            self.reply_timeout.restore();
                            match r.map_err(self.protocol("wait in IDLE"))? {
                                IdleResponse::NewData(_) | IdleResponse::Timeout
                                | IdleResponse::ManualInterrupt => false,
                            }
                        }
                        _ = tokio::time::sleep(idle_for) => {
                            self.reply_timeout.restore();
                            drop(stop);
                            let _ = wait.await;
                            false
                        }
                        _ = shutdown.cancelled() => {
                            self.reply_timeout.restore();
                            drop(stop);
                            let _ = wait.await;
                            true
                        }
                    }
                };
                session = handle.done().await.map_err(self.protocol("end IDLE"))?;
                // What IDLE announced was not counted: the next EXISTS is news.
                known_exists = None;
                if stopped {
                    let _ = session.logout().await;
                    return Ok(());
                }
            } else {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = session.logout().await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(self.wait_for(self.cfg.poll_interval).await) => {}
                }
            }
        }
    }

    /// How long to wait for news: `usual`, or at most [`FETCH_RETRY`] while a message's
    /// body is failing to come, so it is tried again (and, failing on, quarantined after
    /// `unfetchable_after`) rather than holding up the mail behind it until the next
    /// IDLE wake-up, which may be half an hour away.
    async fn wait_for(&self, usual: Duration) -> Duration {
        if self.fetch_failures.lock().await.is_empty() {
            usual
        } else {
            usual.min(FETCH_RETRY)
        }
    }

    /// The last UID already handled: from the database, or — on first contact or after a
    /// UIDVALIDITY change — where processing starts. The flag says whether the state was
    /// just (re)initialized.
    ///
    /// First contact: 0 (everything), or with `start = "new"` `uidnext - 1`, recording the
    /// newest INTERNALDATE then in the folder (`new_after`). A UIDVALIDITY change: the
    /// folder is rescanned (the ledger skips what was processed) from UID 1, or, when
    /// `new_after` was recorded, from the first message newer than it — mail that was
    /// there before the first start (renumbered, say, by a migration to another server)
    /// stays as untouched as `start = "new"` left it.
    async fn starting_uid(
        &self,
        session: &mut ImapSession,
        pipeline: &Pipeline,
        uidvalidity: i64,
        mailbox: &async_imap::types::Mailbox,
    ) -> Result<(i64, bool), ImapError> {
        let store_err = |source| ImapError::Store {
            mailbox: self.name.clone(),
            source,
        };
        let store = pipeline.store();
        let previous = store.mailbox_state(&self.name).await.map_err(store_err)?;
        let (start, new_after) = match previous {
            Some((v, last)) if v == uidvalidity => return Ok((last, false)),
            None => match self.cfg.start {
                StartAt::All => (0, None),
                StartAt::New => {
                    let dates = self.list_dates(session, mailbox.exists).await?;
                    // UIDNEXT is optional in SELECT's answer; without it the highest UID
                    // in the folder marks where "new" begins (not 0: all the history).
                    let highest = dates.iter().map(|(uid, _)| *uid).max().unwrap_or(0);
                    let start = match mailbox.uid_next {
                        Some(next) => i64::from(next).saturating_sub(1),
                        None => i64::from(highest),
                    };
                    (start, newest_date(&dates, crate::now()))
                }
            },
            Some((old, _)) => {
                let new_after = store
                    .mailbox_new_after(&self.name)
                    .await
                    .map_err(store_err)?;
                let start = match new_after {
                    None => 0,
                    Some(t) => first_newer(&self.list_dates(session, mailbox.exists).await?, t),
                };
                tracing::warn!(
                    mailbox = %self.name,
                    old_uidvalidity = old,
                    uidvalidity,
                    from_uid = start + 1,
                    "UIDVALIDITY changed: rescanning the folder (the ledger skips what was \
                     processed{})",
                    if new_after.is_some() {
                        "; mail from before the first start is left alone"
                    } else {
                        ""
                    }
                );
                (start, None)
            }
        };
        store
            .set_mailbox_state(&self.name, uidvalidity, start, new_after, crate::now())
            .await
            .map_err(store_err)?;
        Ok((start, true))
    }

    /// UID and INTERNALDATE (Unix seconds) of every message in the folder (`exists`
    /// messages, as SELECT reported).
    async fn list_dates(
        &self,
        session: &mut ImapSession,
        exists: u32,
    ) -> Result<Vec<(u32, i64)>, ImapError> {
        if exists == 0 {
            return Ok(Vec::new());
        }
        let action = "list arrival dates";
        session
            .uid_fetch("1:*", "(UID INTERNALDATE)")
            .await
            .map_err(self.protocol(action))?
            .try_filter_map(|f| {
                let listed = f.uid.zip(f.internal_date().map(|d| d.timestamp()));
                std::future::ready(Ok(listed))
            })
            .try_collect()
            .await
            .map_err(self.protocol(action))
    }

    /// UID and size of every message above `last_uid`.
    async fn list_new(
        &self,
        session: &mut ImapSession,
        last_uid: i64,
    ) -> Result<Vec<(u32, u64)>, ImapError> {
        let from = u32::try_from(last_uid + 1).unwrap_or(u32::MAX);
        // "N:*" always includes the highest UID, even when it is below N.
        self.list_sizes(session, format!("{from}:*"), "list new messages", |uid| {
            i64::from(uid) > last_uid
        })
        .await
    }

    /// UID and size of the messages in `set` that `keep` accepts, in UID order. Each
    /// response is read as it arrives and dropped: a parsed response keeps the block of
    /// the read buffer it came in (kilobytes), so collecting them first made a
    /// 10,000-message backlog cost ~80 MB for a list of (UID, size) pairs.
    async fn list_sizes(
        &self,
        session: &mut ImapSession,
        set: String,
        action: &'static str,
        keep: impl Fn(u32) -> bool,
    ) -> Result<Vec<(u32, u64)>, ImapError> {
        let mut out: Vec<(u32, u64)> = session
            .uid_fetch(set, "(UID RFC822.SIZE)")
            .await
            .map_err(self.protocol(action))?
            .try_filter_map(|f| {
                let listed = f.uid.map(|uid| (uid, u64::from(f.size.unwrap_or(0))));
                std::future::ready(Ok(listed.filter(|(uid, _)| keep(*uid))))
            })
            .try_collect()
            .await
            .map_err(self.protocol(action))?;
        largest_per_uid(&mut out);
        Ok(out)
    }

    /// Processes the new messages, batch by batch, until they are done or `shutdown`.
    /// Returns how many were handled.
    ///
    /// The next batch is fetched while the current one is processed (the server works
    /// while we do), when it is small ([`PREFETCH_BYTES`]): two large batches are not
    /// held at once. Each batch is still acknowledged only after its commit.
    async fn process_new(
        &self,
        session: &mut ImapSession,
        pipeline: &Pipeline,
        uidvalidity: i64,
        last_uid: &mut i64,
        ops: Ops,
        shutdown: &CancellationToken,
    ) -> Result<usize, ImapError> {
        // Listed once, then worked through batch by batch: listing again after every
        // batch made a backlog of n messages cost n²/batch listed UIDs.
        let new = self.list_new(session, *last_uid).await?;
        {
            // A failing message no longer listed was handled or is gone (expunged
            // elsewhere): its count goes.
            let mut failures = self.fetch_failures.lock().await;
            if !failures.is_empty() {
                let listed: HashSet<u32> = new.iter().map(|(uid, _)| *uid).collect();
                failures.retain(|(v, uid), _| *v == uidvalidity && listed.contains(uid));
            }
        }
        let mut rest = &new[..];
        let mut done = 0;
        let mut next: Option<Fetched> = None;
        while !rest.is_empty() && !shutdown.is_cancelled() {
            // The size limit decides what was fetched whole: a batch read ahead under
            // another limit (a reload meanwhile) is fetched again.
            let max = pipeline.config().max_message_size;
            let mut current = match next.take() {
                Some(f) if f.max == max => f,
                _ => {
                    let listed = self.next_batch(rest, max);
                    self.fetch_batch(session, uidvalidity, &listed, max).await?
                }
            };
            let n = current.uids.len();
            if n == 0 {
                break;
            }
            rest = &rest[n..];
            let following = self.next_batch(rest, max);
            // Not past a message whose body just failed: it would be asked for (and
            // its failure counted) again at once.
            let prefetch = !following.is_empty()
                && !current.cut_short
                && !shutdown.is_cancelled()
                && following.iter().map(|(_, s)| *s).sum::<u64>() <= PREFETCH_BYTES;
            let (outcomes, fetched) = tokio::join!(
                self.commit_batch(pipeline, uidvalidity, &mut current, last_uid),
                async {
                    if prefetch {
                        Some(
                            self.fetch_batch(session, uidvalidity, &following, max)
                                .await,
                        )
                    } else {
                        None
                    }
                }
            );
            let outcomes = outcomes?;
            // Acknowledged even when reading ahead failed: a refusal (NO) leaves the
            // connection usable, and on a broken one this fails too, and the batch is
            // acknowledged after the reconnect, as a leftover (`reprocess_leftovers`).
            let acknowledged = self
                .acknowledge_batch(session, pipeline, uidvalidity, &current, &outcomes, ops)
                .await;
            next = fetched.transpose()?;
            acknowledged?;
            done += n;
        }
        Ok(done)
    }

    /// The front of `listed` that makes one batch: [`ImapConfig::batch_size`] messages,
    /// at most [`BATCH_BYTES`] of them (and at least one).
    fn next_batch(&self, listed: &[(u32, u64)], max: u64) -> Vec<(u32, u64)> {
        let mut batch: Vec<(u32, u64)> = Vec::new();
        let mut bytes = 0u64;
        for &(uid, size) in listed {
            let counted = size.min(max);
            if !batch.is_empty()
                && (batch.len() >= self.cfg.batch_size || bytes + counted > BATCH_BYTES)
            {
                break;
            }
            bytes += counted;
            batch.push((uid, size));
        }
        batch
    }

    /// Processes one batch from the front of `listed` (UID, size; in UID order) and
    /// acknowledges it; `last_uid` moves to the highest UID handled if that is higher.
    /// Returns how many of `listed` were handled (0: the first one must be retried later).
    async fn process_listed(
        &self,
        session: &mut ImapSession,
        pipeline: &Pipeline,
        uidvalidity: i64,
        listed: &[(u32, u64)],
        last_uid: &mut i64,
        ops: Ops,
    ) -> Result<usize, ImapError> {
        let max = pipeline.config().max_message_size;
        let batch = self.next_batch(listed, max);
        let mut fetched = self.fetch_batch(session, uidvalidity, &batch, max).await?;
        if fetched.uids.is_empty() {
            return Ok(0);
        }
        let outcomes = self
            .commit_batch(pipeline, uidvalidity, &mut fetched, last_uid)
            .await?;
        self.acknowledge_batch(session, pipeline, uidvalidity, &fetched, &outcomes, ops)
            .await?;
        Ok(fetched.uids.len())
    }

    /// Whether a message whose body failed to come `attempts` times, the first at
    /// `first`, is given up on (quarantined without its body).
    fn unfetchable(&self, attempts: u32, first: Instant) -> bool {
        attempts >= FETCH_ATTEMPTS && first.elapsed() >= self.cfg.unfetchable_after
    }

    /// Fetches `batch` (UID, size; in UID order) as envelopes, in UID order; stops at a
    /// message whose body did not come (see [`FETCH_ATTEMPTS`]).
    async fn fetch_batch(
        &self,
        session: &mut ImapSession,
        uidvalidity: i64,
        batch: &[(u32, u64)],
        max: u64,
    ) -> Result<Fetched, ImapError> {
        let failures = self.fetch_failures.lock().await;
        // A message whose body failed before is asked for alone, so that a failure is
        // its own and not one of a batch cut off by a dropped connection.
        let alone;
        let batch = if batch.len() > 1 && failures.contains_key(&(uidvalidity, batch[0].0)) {
            alone = [batch[0]];
            &alone[..]
        } else {
            batch
        };
        // A message given up on is not asked for again: a server that ends the session
        // when it cannot read one (Dovecot) would take the acknowledgement down with it.
        let given_up: HashSet<u32> = batch
            .iter()
            .filter(|(uid, _)| {
                failures
                    .get(&(uidvalidity, *uid))
                    .is_some_and(|(n, first)| self.unfetchable(*n, *first))
            })
            .map(|(uid, _)| *uid)
            .collect();
        drop(failures);
        let wanted = batch.iter().filter(|(uid, _)| !given_up.contains(uid));
        let small: Vec<u32> = wanted
            .clone()
            .filter(|(_, s)| *s <= max.min(FETCH_PIECE))
            .map(|(u, _)| *u)
            .collect();
        let large: Vec<(u32, u64)> = wanted
            .clone()
            .filter(|(_, s)| *s > FETCH_PIECE && *s <= max)
            .copied()
            .collect();
        let big: Vec<u32> = wanted.filter(|(_, s)| *s > max).map(|(u, _)| *u).collect();
        let mut raw: HashMap<u32, Vec<u8>> = HashMap::new();
        let fetched = self
            .fetch_bodies(session, &small, &large, &big, max, &mut raw)
            .await;
        if let Err(e) = fetched {
            // A server that ends the session when it cannot read a message (Dovecot)
            // fails the next command, not the FETCH. The first message without its body,
            // in the order they were asked for, is suspect: asked for alone next time,
            // where a failure counts as a failed try, or it would never be given up on.
            // (A connection dropped for another reason blames no one: the first try
            // alone brings the body and clears the suspicion.)
            let asked = small.len() + large.len() + big.len();
            let mut in_order = small
                .iter()
                .chain(large.iter().map(|(uid, _)| uid))
                .chain(&big);
            if let Some(uid) = in_order.find(|uid| !raw.contains_key(uid)) {
                let mut failures = self.fetch_failures.lock().await;
                let (n, _) = failures
                    .entry((uidvalidity, *uid))
                    .or_insert((0, Instant::now()));
                if asked == 1 {
                    *n += 1;
                    tracing::warn!(mailbox = %self.name, uid, attempt = *n, "server returned no body; will retry");
                } else {
                    tracing::info!(mailbox = %self.name, uid, "the session ended while fetching; this message is fetched alone next");
                }
            }
            return Err(e);
        }
        self.envelopes_of(uidvalidity, batch, max, raw, &given_up)
            .await
    }

    /// The bodies of `small` (at most [`FETCH_PIECE`] each), `large` (in pieces) and the
    /// headers of `big` (over the limit) into `raw`, by UID; what the server did not
    /// return is left out.
    async fn fetch_bodies(
        &self,
        session: &mut ImapSession,
        small: &[u32],
        large: &[(u32, u64)],
        big: &[u32],
        max: u64,
        raw: &mut HashMap<u32, Vec<u8>>,
    ) -> Result<(), ImapError> {
        for set in uid_sets(small) {
            // Copied out as each response arrives, and the response dropped: a large
            // message is held once, not twice.
            let mut fetched = session
                .uid_fetch(set, "(UID BODY.PEEK[])")
                .await
                .map_err(self.protocol("fetch messages"))?;
            while let Some(f) = fetched
                .try_next()
                .await
                .map_err(self.protocol("fetch messages"))?
            {
                if let (Some(uid), Some(body)) = (f.uid, f.body()) {
                    raw.insert(uid, body.to_vec());
                }
            }
        }
        for &(uid, size) in large {
            if let Some(body) = self.fetch_in_pieces(session, uid, size, max).await? {
                raw.insert(uid, body);
            }
        }
        for set in uid_sets(big) {
            // Headers only: enough to say who sent it in the quarantine list.
            let fetched: Vec<_> = session
                .uid_fetch(set, "(UID BODY.PEEK[HEADER])")
                .await
                .map_err(self.protocol("fetch headers"))?
                .try_collect()
                .await
                .map_err(self.protocol("fetch headers"))?;
            for f in &fetched {
                if let (Some(uid), Some(h)) = (f.uid, f.header()) {
                    raw.insert(uid, h.to_vec());
                }
            }
        }
        Ok(())
    }

    /// Envelopes in UID order of what [`ImapSource::fetch_bodies`] brought; stops at a
    /// message whose body did not come (the progress can only move past UIDs that were
    /// handled), unless it failed too often or was `given_up` on (not asked for).
    async fn envelopes_of(
        &self,
        uidvalidity: i64,
        batch: &[(u32, u64)],
        max: u64,
        mut raw: HashMap<u32, Vec<u8>>,
        given_up: &HashSet<u32>,
    ) -> Result<Fetched, ImapError> {
        let mut envelopes = Vec::with_capacity(batch.len());
        let mut uids = Vec::with_capacity(batch.len());
        let mut cut_short = false;
        let mut failures = self.fetch_failures.lock().await;
        for (uid, size) in batch {
            let reference = format!("{uidvalidity}:{uid}");
            let (body, fetch_error) = match raw.remove(uid) {
                Some(b) => {
                    failures.remove(&(uidvalidity, *uid));
                    (b, None)
                }
                None => {
                    // A server may refuse a fetch for a while (throttling): only a message
                    // that keeps failing over several passes and minutes is quarantined.
                    let (n, first) = failures
                        .entry((uidvalidity, *uid))
                        .or_insert((0, Instant::now()));
                    // Given up on: not asked for this time, so no try to count.
                    if !given_up.contains(uid) {
                        *n += 1;
                    }
                    if !self.unfetchable(*n, *first) {
                        tracing::warn!(mailbox = %self.name, uid, attempt = *n, "server returned no body; will retry");
                        cut_short = true;
                        break;
                    }
                    tracing::error!(mailbox = %self.name, uid, "server keeps returning no body; quarantining");
                    (
                        Vec::new(),
                        Some(format!(
                            "the server returned no body for UID {uid} in {n} attempts over {:?}",
                            first.elapsed()
                        )),
                    )
                }
            };
            envelopes.push(Envelope {
                // A message we could not fetch is identified by where it is, not by its
                // (unknown) content.
                content_hash: fetch_error.is_some().then(|| {
                    crate::message::content_hash(
                        format!("{}:{reference}", self.source_name()).as_bytes(),
                    )
                }),
                fetch_error,
                // Only the headers of a message over the limit were fetched.
                truncated: *size > max,
                size: (*size).max(body.len() as u64),
                raw: body,
                source: SourceRef {
                    source: self.source_name(),
                    reference,
                },
                desk: Some(self.desk.clone()),
                quarantine_ref: self.placeholder_ref(),
            });
            uids.push(*uid);
        }
        drop(failures);
        // Headers are read on a blocking thread, beside the batch being written.
        let envelopes = Arc::new(envelopes);
        let shared = Arc::clone(&envelopes);
        let heads = tokio::task::spawn_blocking(move || crate::pipeline::prepare(&shared, max))
            .await
            .ok();
        Ok(Fetched {
            max,
            envelopes,
            heads,
            uids,
            cut_short,
        })
    }

    /// Processes a fetched batch and commits it with the mailbox's progress; `last_uid`
    /// moves to the highest UID in it if that is higher.
    async fn commit_batch(
        &self,
        pipeline: &Pipeline,
        uidvalidity: i64,
        fetched: &mut Fetched,
        last_uid: &mut i64,
    ) -> Result<Vec<Outcome>, ImapError> {
        let Some(&highest) = fetched.uids.last() else {
            return Ok(Vec::new());
        };
        let progress = Progress {
            mailbox: self.name.clone(),
            uidvalidity,
            last_uid: i64::from(highest).max(*last_uid),
            acked_uid: self.acked.load(std::sync::atomic::Ordering::Relaxed),
        };
        let outcomes = pipeline
            .process_prepared_batch(
                &fetched.envelopes,
                fetched.heads.take(),
                crate::now(),
                Some(&progress),
            )
            .await
            .map_err(|source| ImapError::Pipeline {
                mailbox: self.name.clone(),
                source,
            })?;
        *last_uid = progress.last_uid;
        Ok(outcomes)
    }

    /// Acknowledges a committed batch (`after`), and moves its quarantined messages away.
    async fn acknowledge_batch(
        &self,
        session: &mut ImapSession,
        pipeline: &Pipeline,
        uidvalidity: i64,
        fetched: &Fetched,
        outcomes: &[Outcome],
        ops: Ops,
    ) -> Result<(), ImapError> {
        let mut done = Vec::new();
        let mut quarantined = Vec::new();
        for (uid, outcome) in fetched.uids.iter().zip(outcomes) {
            match outcome {
                Outcome::Quarantined { ledger_id, .. } => quarantined.push((*uid, *ledger_id)),
                _ => done.push(*uid),
            }
        }
        let acknowledged = self
            .acknowledge(session, pipeline, uidvalidity, &done, &quarantined, ops)
            .await?;
        let retry = match self.refused.lock() {
            Ok(mut r) if !acknowledged => {
                if let Some(&first) = fetched.uids.first() {
                    r.from = Some(r.from.map_or(first, |f| f.min(first)));
                }
                let room = MAX_REFUSED.saturating_sub(r.uids.len());
                r.overflow |= done.len() > room;
                r.uids.extend(done.iter().take(room));
                Vec::new()
            }
            // This batch went through: what the server refused before is tried again,
            // on its own (one message it will never take must not hold back the
            // batches after it), at most once a minute.
            Ok(mut r)
                if !r.uids.is_empty() && r.tried.is_none_or(|t| t.elapsed() >= REFUSED_RETRY) =>
            {
                r.tried = Some(Instant::now());
                r.uids.clone()
            }
            _ => Vec::new(),
        };
        if !retry.is_empty() {
            let mut still = Vec::new();
            // A set at a time (line length limits), as the leftover pass lists them.
            for part in uid_chunks(&retry) {
                if !self
                    .acknowledge(session, pipeline, uidvalidity, &part, &[], ops)
                    .await?
                {
                    still.extend_from_slice(&part);
                }
            }
            if still.len() < retry.len() {
                tracing::info!(mailbox = %self.name, count = retry.len() - still.len(), "messages the server refused before are acknowledged now");
            }
            // Nothing else changes the list meanwhile: this task alone acknowledges.
            if let Ok(mut r) = self.refused.lock() {
                if !r.overflow {
                    r.from = still.iter().min().copied();
                }
                r.uids = still;
            }
        }
        let hold = self.refused.lock().ok().and_then(|r| r.from);
        // Batches are committed and acknowledged in UID order, each after the one
        // before: everything up to this batch's last UID is acknowledged now, unless
        // the server refused some that are not yet.
        if let Some(&last) = fetched.uids.last() {
            let cap = hold.map_or(i64::MAX, |f| i64::from(f) - 1);
            self.acked.fetch_max(
                i64::from(last).min(cap),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        Ok(())
    }

    /// Fetches a large message [`FETCH_PIECE`] bytes at a time (`BODY.PEEK[]<offset.n>`),
    /// so the connection's read buffer holds one piece, not a second copy of the whole
    /// message. `None` when the server returned nothing, or stopped returning pieces
    /// halfway (the message is fetched again later, as one that did not come).
    async fn fetch_in_pieces(
        &self,
        session: &mut ImapSession,
        uid: u32,
        size: u64,
        max: u64,
    ) -> Result<Option<Vec<u8>>, ImapError> {
        let mut body: Vec<u8> = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        loop {
            let query = format!("(UID BODY.PEEK[]<{}.{FETCH_PIECE}>)", body.len());
            let mut fetched = session
                .uid_fetch(uid.to_string(), &query)
                .await
                .map_err(self.protocol("fetch a message in pieces"))?;
            let mut got = None;
            while let Some(f) = fetched
                .try_next()
                .await
                .map_err(self.protocol("fetch a message in pieces"))?
            {
                if f.uid == Some(uid)
                    && let Some(piece) = f.body()
                {
                    got = Some(piece.len() as u64);
                    body.extend_from_slice(piece);
                }
            }
            match got {
                None if body.is_empty() => return Ok(None),
                None => {
                    tracing::warn!(mailbox = %self.name, uid, at = body.len(), "the server stopped returning a message halfway; will retry");
                    return Ok(None);
                }
                // The last piece is short (or empty when the size is a multiple of it); a
                // server that keeps sending is cut off past the size limit.
                Some(n) if n < FETCH_PIECE || body.len() as u64 > max => {
                    return Ok(Some(body));
                }
                Some(_) => {}
            }
        }
    }

    /// Applies `after` to processed messages and moves quarantined ones away. `false`:
    /// the server refused to apply `after` (a tagged NO: no permission, over quota...).
    /// The messages are committed, so they stay where they are, processed, and the
    /// session goes on; they are tried again (see [`Refused`]).
    /// Quarantined messages the server would not move keep their placeholder reference,
    /// which the leftover pass also tries again.
    async fn acknowledge(
        &self,
        session: &mut ImapSession,
        pipeline: &Pipeline,
        uidvalidity: i64,
        done: &[u32],
        quarantined: &[(u32, i64)],
        ops: Ops,
    ) -> Result<bool, ImapError> {
        let all: Vec<u32> = quarantined.iter().map(|(u, _)| *u).collect();
        for uids in uid_chunks(&all) {
            // A set at a time, each recorded before the next moves.
            let mapping = match self
                .move_messages(session, &uids, &self.cfg.quarantine_folder, ops)
                .await
            {
                Ok(mapping) => mapping,
                Err(e) => {
                    let Some(why) = refusal(&e) else {
                        return Err(e);
                    };
                    tracing::warn!(
                        mailbox = %self.name,
                        folder = %self.cfg.quarantine_folder,
                        uids = %uid_set(&uids),
                        reason = %why,
                        "the server refused to move quarantined messages to the quarantine folder; they stay where they are and are tried again at the next connection"
                    );
                    break;
                }
            };
            let moved: HashSet<u32> = uids.iter().copied().collect();
            for (uid, ledger_id) in quarantined.iter().filter(|(u, _)| moved.contains(u)) {
                let reference = match mapping
                    .as_ref()
                    .and_then(|(v, m)| m.get(uid).map(|n| (v, n)))
                {
                    Some((v, new_uid)) => format!(
                        "imap:{}:{}:{}:{}",
                        self.name, self.cfg.quarantine_folder, v, new_uid
                    ),
                    None => format!(
                        "imap:{}:{}:?:{uidvalidity}:{uid}",
                        self.name, self.cfg.quarantine_folder
                    ),
                };
                if let Err(e) = pipeline
                    .store()
                    .set_quarantine_ref(*ledger_id, &reference)
                    .await
                {
                    tracing::warn!(mailbox = %self.name, error = %e, "cannot record where a quarantined message went");
                }
                tracing::warn!(mailbox = %self.name, uid, to = %reference, "message quarantined");
            }
        }
        if done.is_empty() {
            return Ok(true);
        }
        let applied: Result<(), ImapError> = async {
            match &self.cfg.after {
                After::Seen => {
                    self.store_flags(session, done, "+FLAGS.SILENT (\\Seen)")
                        .await?;
                }
                After::Move(folder) => {
                    // Flagged Seen first, as processed mail is everywhere else; a set at
                    // a time (without MOVE: copied, then deleted, before the next).
                    for uids in uid_chunks(done) {
                        self.store_flags(session, &uids, "+FLAGS.SILENT (\\Seen)")
                            .await?;
                        self.move_messages(session, &uids, folder, ops).await?;
                    }
                }
                After::Delete => {
                    self.store_flags(session, done, "+FLAGS.SILENT (\\Deleted)")
                        .await?;
                    self.expunge(session, done, ops).await?;
                }
            }
            Ok(())
        }
        .await;
        match applied {
            Ok(()) => Ok(true),
            Err(e) => {
                let Some(why) = refusal(&e) else {
                    return Err(e);
                };
                tracing::warn!(
                    mailbox = %self.name,
                    after = ?self.cfg.after,
                    uids = %uid_set(done),
                    reason = %why,
                    "the server refused to acknowledge processed messages; they stay in the folder, processed, and are tried again after a later batch"
                );
                Ok(false)
            }
        }
    }

    async fn store_flags(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        flags: &str,
    ) -> Result<(), ImapError> {
        for set in uid_sets(uids) {
            self.run_tagged(session, &format!("UID STORE {set} {flags}"), "set flags")
                .await?;
        }
        Ok(())
    }

    async fn expunge(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        ops: Ops,
    ) -> Result<(), ImapError> {
        let commands = if ops.uidplus {
            uid_sets(uids)
                .into_iter()
                .map(|set| format!("UID EXPUNGE {set}"))
                .collect()
        } else {
            // Without UIDPLUS only a plain EXPUNGE exists; it also removes other
            // messages someone flagged \Deleted.
            vec!["EXPUNGE".to_string()]
        };
        for command in commands {
            self.run_tagged(session, &command, "expunge").await?;
        }
        Ok(())
    }

    /// Moves messages (MOVE, or COPY + delete without it). Returns the destination's
    /// UIDVALIDITY and the new UIDs when the server reports them (COPYUID, RFC 4315).
    async fn move_messages(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        folder: &str,
        ops: Ops,
    ) -> Result<Option<(u32, HashMap<u32, u32>)>, ImapError> {
        // One command: callers pass one of `uid_chunks` at a time, so what moved and
        // its new UIDs are recorded set by set.
        let set = uid_set(uids);
        let command = if ops.can_move {
            format!("UID MOVE {set} {}", quote(folder))
        } else {
            format!("UID COPY {set} {}", quote(folder))
        };
        let copyuid = match self.run_tagged(session, &command, "move messages").await {
            // The folder is gone (deleted in a mail client, say): create it, try again.
            Err(e) if refusal(&e).is_some_and(|why| why.starts_with(TRYCREATE)) => {
                tracing::warn!(mailbox = %self.name, folder = %folder, "the folder was gone");
                self.ensure_folders(session).await?;
                self.run_tagged(session, &command, "move messages").await?
            }
            other => other?,
        };
        if !ops.can_move {
            // Copied: from here on the messages count as moved. Refused to delete the
            // originals, trying again would copy them again, and again.
            let deleted: Result<(), ImapError> = async {
                self.store_flags(session, uids, "+FLAGS.SILENT (\\Deleted)")
                    .await?;
                self.expunge(session, uids, ops).await
            }
            .await;
            if let Err(e) = deleted {
                let Some(why) = refusal(&e) else {
                    return Err(e);
                };
                tracing::warn!(
                    mailbox = %self.name,
                    folder = %folder,
                    uids = %set,
                    reason = %why,
                    "copied to the folder, but the server refused to delete the originals; they stay where they were"
                );
            }
        }
        Ok(copyuid)
    }

    /// Runs a command and reads up to its tagged reply, which must be OK (async-imap's
    /// own STORE/EXPUNGE streams do not report a tagged NO). Returns a COPYUID response
    /// code if one came, tagged or not.
    async fn run_tagged(
        &self,
        session: &mut ImapSession,
        command: &str,
        action: &'static str,
    ) -> Result<Option<(u32, HashMap<u32, u32>)>, ImapError> {
        let id = session
            .run_command(command)
            .await
            .map_err(self.protocol(action))?;
        let mut copyuid = None;
        loop {
            let Some(response) = session
                .read_response()
                .await
                .map_err(|e| (self.protocol(action))(e.into()))?
            else {
                return Err((self.protocol(action))(
                    async_imap::error::Error::ConnectionLost,
                ));
            };
            let (status, outcome, tagged) = match response.parsed() {
                Response::Done {
                    tag,
                    status,
                    outcome,
                } => (Some(status), Some(outcome), tag == &id),
                Response::Data { status, outcome } => (Some(status), Some(outcome), false),
                _ => (None, None, false),
            };
            if let Some(ResponseCode::CopyUid(validity, from, to)) =
                outcome.and_then(|o| o.code.as_ref())
            {
                let from = expand(from);
                let to = expand(to);
                if from.len() == to.len() {
                    copyuid = Some((*validity, from.into_iter().zip(to).collect()));
                }
            }
            if tagged {
                let why = || {
                    let text = outcome
                        .and_then(|o| o.information.as_ref())
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    match outcome.and_then(|o| o.code.as_ref()) {
                        Some(ResponseCode::TryCreate) => format!("{TRYCREATE} {text}"),
                        _ => text,
                    }
                };
                return match status {
                    Some(Status::Ok) => Ok(copyuid),
                    Some(Status::No) => {
                        Err((self.protocol(action))(async_imap::error::Error::No(why())))
                    }
                    _ => Err((self.protocol(action))(
                        async_imap::error::Error::Bad(why()),
                    )),
                };
            }
        }
    }

    /// After a reconnect: messages above the UID progress started from and at or below
    /// the committed UID that are still where they should not be were committed but not
    /// acknowledged (the connection dropped in between). They are processed again — the
    /// ledger turns them into no-ops (duplicates too), or into quarantine again — and
    /// acknowledged like any other. In `seen` mode the unread ones are; quarantined
    /// messages someone read meanwhile are found through the ledger.
    async fn reprocess_leftovers(
        &self,
        session: &mut ImapSession,
        pipeline: &Pipeline,
        uidvalidity: i64,
        last_uid: i64,
        ops: Ops,
    ) -> Result<(), ImapError> {
        if last_uid <= 0 {
            return Ok(());
        }
        let store_err = |source| ImapError::Store {
            mailbox: self.name.clone(),
            source,
        };
        // Everything above the UID progress started from was committed by us (with
        // `start = "new"` the mail that was there before is below it, and not ours to
        // touch) — duplicates too, which have no ledger row of their own.
        let first_uid = pipeline
            .store()
            .mailbox_first_uid(&self.name)
            .await
            .map_err(store_err)?;
        // Nor below what was acknowledged: with after = "seen" a message staff marked
        // unread again is no leftover, and must not be flagged read behind their back.
        let acked = pipeline
            .store()
            .mailbox_acked_uid(&self.name)
            .await
            .map_err(store_err)?;
        let from = first_uid.unwrap_or(0).max(acked.unwrap_or(0)) + 1;
        let query = match self.cfg.after {
            After::Seen => format!("UID {from}:{last_uid} UNSEEN"),
            _ => format!("UID {from}:{last_uid}"),
        };
        let found: HashSet<u32> = if from <= last_uid {
            session
                .uid_search(&query)
                .await
                .map_err(self.protocol("search leftovers"))?
        } else {
            HashSet::new()
        };
        let mut uids: Vec<u32> = found
            .into_iter()
            .filter(|u| (from..=last_uid).contains(&i64::from(*u)))
            .collect();
        if first_uid.is_none() {
            // Progress recorded before the first UID was: only messages the ledger
            // knows were committed.
            let refs: Vec<String> = uids.iter().map(|u| format!("{uidvalidity}:{u}")).collect();
            let recorded = pipeline
                .store()
                .recorded_refs(&self.source_name(), &refs)
                .await
                .map_err(store_err)?;
            uids.retain(|u| recorded.contains(&format!("{uidvalidity}:{u}")));
        }
        uids.sort_unstable();
        if !uids.is_empty() {
            tracing::info!(mailbox = %self.name, count = uids.len(), "processing again messages committed before the last disconnect");
            // Scattered UIDs make a long set: listed a slice at a time, so no command
            // passes a server's line limit (Dovecot's is 64 KB, others' less).
            let mut listed = Vec::with_capacity(uids.len());
            for set in uid_sets(&uids) {
                listed.extend(
                    self.list_sizes(session, set, "list leftovers", |uid| {
                        i64::from(uid) <= last_uid
                    })
                    .await?,
                );
            }
            let mut progress = last_uid;
            while !listed.is_empty() {
                let n = self
                    .process_listed(session, pipeline, uidvalidity, &listed, &mut progress, ops)
                    .await?;
                if n == 0 {
                    // The first could not be fetched now (a throttling server): these
                    // wait for the next connection, and `acked` stays below them until
                    // then, or they would never be looked for again.
                    if let (Some(&(first, _)), Ok(mut r)) = (listed.first(), self.refused.lock()) {
                        r.from = Some(r.from.map_or(first, |f| f.min(first)));
                        r.overflow = true;
                    }
                    break;
                }
                listed.drain(..n.min(listed.len()));
            }
        }
        // Quarantined, but never moved there (and perhaps read since).
        let unmoved = pipeline
            .store()
            .unmoved_quarantine(&self.source_name(), &self.placeholder_ref())
            .await
            .map_err(|source| ImapError::Store {
                mailbox: self.name.clone(),
                source,
            })?;
        let stuck: Vec<(u32, i64)> = unmoved
            .iter()
            .filter_map(|(ledger_id, source_ref)| {
                let (v, uid) = source_ref.split_once(':')?;
                (v.parse::<i64>().ok()? == uidvalidity)
                    .then(|| Some((uid.parse::<u32>().ok()?, *ledger_id)))?
            })
            .collect();
        if !stuck.is_empty() {
            self.acknowledge(session, pipeline, uidvalidity, &[], &stuck, ops)
                .await?;
        }
        Ok(())
    }

    /// Where a quarantined message is recorded to be until its move is confirmed.
    fn placeholder_ref(&self) -> String {
        format!("imap:{}:{}", self.name, self.cfg.quarantine_folder)
    }
}

/// How [`ImapSource::run_tagged`] marks a NO with the TRYCREATE code (RFC 3501: the
/// target folder does not exist).
const TRYCREATE: &str = "[TRYCREATE]";

/// The server's words when it refused a command (a tagged NO: no permission, over
/// quota, no such folder) on a connection that is fine otherwise.
fn refusal(e: &ImapError) -> Option<String> {
    match e {
        ImapError::Protocol {
            source: async_imap::error::Error::No(why),
            ..
        } => Some(why.clone()),
        _ => None,
    }
}

/// What the server can do.
#[derive(Debug, Clone, Copy)]
struct Ops {
    can_move: bool,
    uidplus: bool,
}

fn expand(set: &[UidSetMember]) -> Vec<u32> {
    let mut out = Vec::new();
    for m in set {
        match m {
            UidSetMember::Uid(u) => out.push(*u),
            UidSetMember::UidRange(r) => out.extend(r.clone()),
        }
    }
    out
}

/// Fetches one quarantined message for `intake quarantine release`: the folder and UID
/// are in its reference (`imap:NAME:FOLDER:UIDVALIDITY:UID`).
pub async fn fetch_quarantined(
    source: &ImapSource,
    reference: &str,
) -> Result<Option<(u32, Vec<u8>)>, ImapError> {
    let Some((folder, validity, uid)) = parse_quarantine_ref(reference) else {
        return Ok(None);
    };
    let mut session = source.connect().await?;
    select_quarantine(source, &mut session, &folder, validity, uid).await?;
    let fetched: Vec<_> = session
        .uid_fetch(uid.to_string(), "(UID BODY.PEEK[])")
        .await
        .map_err(source.protocol("fetch the quarantined message"))?
        .try_collect()
        .await
        .map_err(source.protocol("fetch the quarantined message"))?;
    let body = fetched
        .iter()
        .find(|f| f.uid == Some(uid))
        .and_then(|f| f.body())
        .map(<[u8]>::to_vec);
    let _ = session.logout().await;
    Ok(body.map(|b| (uid, b)))
}

/// After a released message was processed, treat it as the mailbox treats processed
/// mail: back into the folder flagged Seen, into the `move:` folder, or deleted.
pub async fn finish_released(source: &ImapSource, reference: &str) -> Result<(), ImapError> {
    let Some((folder, validity, uid)) = parse_quarantine_ref(reference) else {
        return Ok(());
    };
    let mut session = source.connect().await?;
    let caps = session
        .capabilities()
        .await
        .map_err(source.protocol("read capabilities"))?;
    let ops = Ops {
        can_move: caps.has_str("MOVE"),
        uidplus: caps.has_str("UIDPLUS"),
    };
    select_quarantine(source, &mut session, &folder, validity, uid).await?;
    match &source.cfg.after {
        After::Seen => {
            source
                .store_flags(&mut session, &[uid], "+FLAGS.SILENT (\\Seen)")
                .await?;
            source
                .move_messages(&mut session, &[uid], &source.cfg.folder, ops)
                .await?;
        }
        After::Move(dest) => {
            source
                .move_messages(&mut session, &[uid], dest, ops)
                .await?;
        }
        After::Delete => {
            source
                .store_flags(&mut session, &[uid], "+FLAGS.SILENT (\\Deleted)")
                .await?;
            source.expunge(&mut session, &[uid], ops).await?;
        }
    }
    let _ = session.logout().await;
    Ok(())
}

/// Whether untagged responses that came while the session was busy announce a change in
/// the folder: an EXISTS with another count than the one known (`None`: unknown, so any
/// EXISTS is news), or an EXPUNGE. A server may repeat an unchanged `* N EXISTS` with its
/// replies; counted as news, it kept the session draining and never let it reach IDLE.
fn announces_change(
    responses: impl Iterator<Item = UnsolicitedResponse>,
    known_exists: &mut Option<u32>,
) -> bool {
    let mut changed = false;
    for r in responses {
        match r {
            UnsolicitedResponse::Exists(n) => {
                changed |= *known_exists != Some(n);
                *known_exists = Some(n);
            }
            UnsolicitedResponse::Expunge(_) => changed = true,
            _ => {}
        }
    }
    changed
}

/// Sorts (UID, size) pairs by UID and keeps one per UID, the largest. An unsolicited
/// FETCH (a flag change made elsewhere, with its UID) may come in among the answers
/// without RFC822.SIZE: read as size 0, it must not hide the real size, or an oversized
/// message would be downloaded whole.
fn largest_per_uid(listed: &mut Vec<(u32, u64)>) {
    listed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    listed.dedup_by_key(|(u, _)| *u);
}

/// The newest INTERNALDATE of `dates`, but never later than `now`: one message dated in
/// the future (an APPEND with a wrong date, a clock error) must not make a later rescan
/// skip mail that arrived after the first start.
fn newest_date(dates: &[(u32, i64)], now: i64) -> Option<i64> {
    dates.iter().map(|(_, d)| (*d).min(now)).max()
}

/// Where a rescan starts so that it skips the messages up to the first one that arrived
/// after `new_after` (see [`ImapSource::starting_uid`]): the UID before that one, or the
/// highest UID when none did. Only the leading run of older mail is skipped; an older
/// message above a newer one (moved in later, keeping its date) is processed.
fn first_newer(dates: &[(u32, i64)], new_after: i64) -> i64 {
    let mut sorted = dates.to_vec();
    sorted.sort_unstable();
    match sorted.iter().find(|(_, d)| *d > new_after) {
        Some((uid, _)) => i64::from(*uid) - 1,
        None => sorted.last().map_or(0, |(uid, _)| i64::from(*uid)),
    }
}

/// `imap:NAME:FOLDER:UIDVALIDITY:UID` → (FOLDER, UID).
pub fn parse_quarantine_ref(reference: &str) -> Option<(String, u32, u32)> {
    let rest = reference.strip_prefix("imap:")?;
    let mut parts = rest.rsplitn(3, ':');
    let uid: u32 = parts.next()?.parse().ok()?;
    let validity: u32 = parts.next()?.parse().ok()?;
    let name_and_folder = parts.next()?;
    // "...:?:V:U" records where the message was before the move, when the server did not
    // say where it went: not a place to fetch from.
    if name_and_folder.ends_with(":?") {
        return None;
    }
    let (_, folder) = name_and_folder.split_once(':')?;
    Some((folder.to_string(), validity, uid))
}

/// Selects the folder a message was quarantined in, refusing when the folder's
/// UIDVALIDITY is no longer the recorded one: the UID would name another message.
async fn select_quarantine(
    source: &ImapSource,
    session: &mut ImapSession,
    folder: &str,
    recorded: u32,
    uid: u32,
) -> Result<(), ImapError> {
    let mailbox = session
        .select(folder)
        .await
        .map_err(source.protocol("select the quarantine folder"))?;
    match mailbox.uid_validity {
        Some(found) if found != recorded => Err(ImapError::QuarantineRecreated {
            mailbox: source.name.clone(),
            folder: folder.to_string(),
            recorded,
            found,
            uid,
        }),
        _ => Ok(()),
    }
}

/// A shared handle so the daemon can hold sources behind `Arc`.
pub type SharedImapSource = Arc<ImapSource>;

#[cfg(test)]
#[path = "imap_tests.rs"]
mod tests;
