//! Sending through an SMTP relay: lettre speaks the protocol, over a socket we open.
//!
//! Three things lettre's own transport does not do. The socket has `TCP_NODELAY`: lettre
//! writes a message and then its terminating `.` as two writes, and with Nagle's
//! algorithm the second waits for the relay to acknowledge the first, which it delays
//! (40 ms on Linux): every mail took 50 ms on loopback. And one connection carries the
//! mail of a whole outbox pass (up to [`MAX_PER_CONNECTION`] mails): a new connection
//! per mail is a TCP and TLS handshake and an AUTH each time. And a refusal says which
//! command it answered ([`Step`]): a refused sender is our configuration, to be retried
//! until it is fixed; only a refused recipient is that mailbox's, for good.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::Message;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use secrecy::ExposeSecret;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::SendError;
use crate::config::{SmtpConfig, SmtpTls};

/// Mails sent over one connection before it is closed and a new one opened: relays
/// limit a session's messages (Exchange Online, some Postfix set-ups), and a long-lived
/// session holds server resources.
pub const MAX_PER_CONNECTION: u32 = 100;

/// A connection unused for longer than this is closed rather than reused: relays drop
/// idle sessions (Postfix after 300 s, others sooner), and a send on a dropped one fails.
const IDLE_REUSE: Duration = Duration::from_secs(10);

/// A connection unused for longer than this is asked (NOOP) before it is reused.
const CHECK_AFTER: Duration = Duration::from_secs(1);

/// The longest one [`SmtpTransport::send`] takes, given the relay's per-exchange
/// `timeout`: closing the previous connection (QUIT), a NOOP, connecting (up to three
/// exchanges' worth) and sending (four) fit; a second try on a new connection after a
/// 4xx reply gets what is left. A claimed mail's lease must outlast it.
pub fn longest_send(timeout: Duration) -> Duration {
    timeout * 9
}

/// The step of an SMTP exchange a relay's reply answered: what a refusal means depends
/// on it (a refused sender is our configuration, a refused recipient that mailbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Greeting, EHLO, STARTTLS, AUTH.
    Connect,
    /// MAIL FROM: our sender address.
    Sender,
    /// RCPT TO: the recipient.
    Recipient,
    /// The DATA command.
    Data,
    /// The reply after the message's final `.`.
    Message,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Connect => "while connecting",
            Step::Sender => "at MAIL FROM (our sender address)",
            Step::Recipient => "at RCPT TO (the recipient)",
            Step::Data => "at DATA",
            Step::Message => "after the message",
        })
    }
}

/// Sends through an SMTP relay. Cloning shares the open connection.
#[derive(Clone)]
pub struct SmtpTransport {
    settings: Arc<Settings>,
    session: Arc<Mutex<Option<Session>>>,
}

struct Settings {
    host: String,
    port: u16,
    address: String,
    security: Security,
    hello: ClientId,
    credentials: Option<Credentials>,
    timeout: Duration,
}

enum Security {
    None,
    /// STARTTLS, required: lettre upgrades the connection.
    StartTls(TlsParameters),
    /// TLS from the first byte (SMTPS), with the same verification as IMAP.
    Implicit(Arc<rustls::ClientConfig>),
}

struct Session {
    conn: AsyncSmtpConnection,
    sent: u32,
    last_used: Instant,
}

impl Session {
    fn new(conn: AsyncSmtpConnection) -> Session {
        Session {
            conn,
            sent: 0,
            last_used: Instant::now(),
        }
    }
}

/// TLS from the first byte, as lettre's stream trait wants it.
#[derive(Debug)]
struct TlsTcp(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncTokioStream for TlsTcp {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl tokio::io::AsyncRead for TlsTcp {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsTcp {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl SmtpTransport {
    pub fn new(cfg: &SmtpConfig) -> Result<SmtpTransport, SendError> {
        let address = cfg.address();
        let setup = |message: String| SendError::SmtpSetup {
            address: address.clone(),
            message,
        };
        let security = match cfg.tls {
            SmtpTls::None => Security::None,
            SmtpTls::StartTls => {
                let mut builder = TlsParameters::builder(cfg.host.clone());
                if let Some(path) = &cfg.ca_file {
                    let pem = std::fs::read(path)
                        .map_err(|e| setup(format!("cannot read {}: {e}", path.display())))?;
                    let cert = Certificate::from_pem(&pem).map_err(|e| setup(e.to_string()))?;
                    builder = builder.add_root_certificate(cert);
                }
                Security::StartTls(builder.build_rustls().map_err(|e| setup(e.to_string()))?)
            }
            SmtpTls::Implicit => Security::Implicit(
                crate::mailbox::tls::client_config(cfg.ca_file.as_deref())
                    .map_err(|e| setup(super::error_chain(&e)))?,
            ),
        };
        let hello = match &cfg.hello_name {
            Some(name) => ClientId::Domain(name.clone()),
            None => ClientId::default(),
        };
        let credentials = match (&cfg.username, &cfg.password) {
            (Some(user), Some(password)) => Some(Credentials::new(
                user.clone(),
                password.expose_secret().to_string(),
            )),
            _ => None,
        };
        Ok(SmtpTransport {
            settings: Arc::new(Settings {
                host: cfg.host.clone(),
                port: cfg.port,
                address,
                security,
                hello,
                credentials,
                timeout: cfg.timeout,
            }),
            session: Arc::new(Mutex::new(None)),
        })
    }

    /// The longest one [`send`](Self::send) takes.
    pub fn longest_send(&self) -> Duration {
        longest_send(self.settings.timeout)
    }

    /// Sends one mail, on the open connection when there is a fresh one. A connection
    /// that failed in any way is closed: the next mail gets a new one.
    pub async fn send(&self, message: &Message) -> Result<(), SendError> {
        let limit = longest_send(self.settings.timeout);
        match tokio::time::timeout(limit, self.send_within(message)).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out("sending a message")),
        }
    }

    async fn send_within(&self, message: &Message) -> Result<(), SendError> {
        let mut slot = self.session.lock().await;
        let (session, reused) = self.session(slot.take()).await?;
        let session = match self.send_on(session, message).await {
            // A 4xx reply means the relay did not take the mail; on a reused connection
            // it is often the session's own limit (421 after so many messages): once
            // more, at once, on a new connection. Anything else (a dropped connection
            // after the message may have been taken) waits for the retry schedule.
            Err(SendError::Smtp { source, .. }) if reused && source.is_transient() => {
                tracing::debug!(relay = %self.settings.address, error = %source, "reused SMTP connection refused the mail; trying a new one");
                let fresh = Session::new(self.connect().await?);
                self.send_on(fresh, message).await?
            }
            other => other?,
        };
        *slot = Some(session);
        Ok(())
    }

    /// The open session when it is fresh and still answers, else a new one.
    async fn session(&self, open: Option<Session>) -> Result<(Session, bool), SendError> {
        if let Some(mut s) = open {
            let idle = s.last_used.elapsed();
            let usable = s.sent < MAX_PER_CONNECTION
                && idle < IDLE_REUSE
                // Mail of one pass follows at once; after a pause, ask (NOOP) first.
                && (idle < CHECK_AFTER
                    || tokio::time::timeout(self.settings.timeout, s.conn.test_connected())
                        .await
                        .unwrap_or(false));
            if usable {
                return Ok((s, true));
            }
            close(&mut s.conn, self.settings.timeout).await;
        }
        Ok((Session::new(self.connect().await?), false))
    }

    /// MAIL, RCPT, DATA and the message: four exchanges, each bounded by the timeout.
    /// The session comes back when the relay took the mail.
    async fn send_on(&self, mut session: Session, message: &Message) -> Result<Session, SendError> {
        let s = &self.settings;
        let bytes = message.formatted();
        let sent = tokio::time::timeout(
            s.timeout * 4,
            self.transaction(&mut session.conn, message.envelope(), &bytes),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                session.sent += 1;
                session.last_used = Instant::now();
                Ok(session)
            }
            Ok(Err(e)) => {
                close(&mut session.conn, s.timeout).await;
                Err(e)
            }
            Err(_) => Err(self.timed_out("sending a message")),
        }
    }

    /// One mail's exchanges, as lettre's `AsyncSmtpConnection::send` has them (with its
    /// SMTPUTF8 and 8BITMIME checks), one command at a time, so that a refusal says
    /// which command it answered: lettre's own error does not.
    async fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        bytes: &[u8],
    ) -> Result<(), SendError> {
        let refused = |step, source| SendError::Smtp {
            address: self.settings.address.clone(),
            step,
            source,
        };
        let unsupported = |what| SendError::SmtpUnsupported {
            address: self.settings.address.clone(),
            what,
        };
        let mut options = Vec::new();
        let ascii_addresses = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .all(|a| AsRef::<str>::as_ref(a).is_ascii());
        if !ascii_addresses {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(unsupported("non-ASCII address, and no SMTPUTF8"));
            }
            options.push(MailParameter::SmtpUtfEight);
        }
        if !bytes.is_ascii() {
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                return Err(unsupported("non-ASCII message, and no 8BITMIME"));
            }
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        conn.command(Mail::new(envelope.from().cloned(), options))
            .await
            .map_err(|e| refused(Step::Sender, e))?;
        for to in envelope.to() {
            conn.command(Rcpt::new(to.clone(), Vec::new()))
                .await
                .map_err(|e| refused(Step::Recipient, e))?;
        }
        conn.command(Data)
            .await
            .map_err(|e| refused(Step::Data, e))?;
        conn.message(bytes)
            .await
            .map_err(|e| refused(Step::Message, e))?;
        Ok(())
    }

    /// Closes the open connection (QUIT), if any: the end of an outbox pass.
    pub async fn finish(&self) {
        if let Some(mut s) = self.session.lock().await.take() {
            close(&mut s.conn, self.settings.timeout).await;
        }
    }

    /// A new connection: TCP (no delay), TLS as configured, EHLO, AUTH.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let s = &self.settings;
        let connected = tokio::time::timeout(s.timeout * 3, async {
            let tcp = self.tcp().await?;
            let smtp = |source| SendError::Smtp {
                address: s.address.clone(),
                step: Step::Connect,
                source,
            };
            let stream: Box<dyn AsyncTokioStream> = match &s.security {
                Security::Implicit(config) => Box::new(TlsTcp(
                    crate::mailbox::tls::connect(config.clone(), &s.host, tcp)
                        .await
                        .map_err(|e| self.io_error("TLS handshake", e))?,
                )),
                Security::None | Security::StartTls(_) => Box::new(tcp),
            };
            let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &s.hello)
                .await
                .map_err(smtp)?;
            if let Security::StartTls(params) = &s.security {
                conn.starttls(params.clone(), &s.hello)
                    .await
                    .map_err(smtp)?;
            }
            if let Some(credentials) = &s.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                    .await
                    .map_err(smtp)?;
            }
            Ok(conn)
        })
        .await;
        match connected {
            Ok(result) => result,
            Err(_) => Err(self.timed_out("connecting")),
        }
    }

    /// The first address of the relay's name that accepts a connection.
    async fn tcp(&self) -> Result<TcpStream, SendError> {
        let s = &self.settings;
        let addrs = tokio::net::lookup_host((s.host.as_str(), s.port))
            .await
            .map_err(|e| self.io_error("name lookup", e))?;
        let mut last = None;
        for addr in addrs {
            // Each address within the timeout: one that never answers (a broken IPv6
            // route) must not use up the time the next one needs.
            let attempt = tokio::time::timeout(s.timeout, TcpStream::connect(addr)).await;
            match attempt.unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{addr} did not answer within {:?}", s.timeout),
                ))
            }) {
                Ok(tcp) => {
                    tcp.set_nodelay(true)
                        .map_err(|e| self.io_error("TCP_NODELAY", e))?;
                    return Ok(tcp);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(self.io_error(
            "connect",
            last.unwrap_or_else(|| std::io::Error::other("the name has no addresses")),
        ))
    }

    fn io_error(&self, what: &'static str, source: std::io::Error) -> SendError {
        debug_assert!(
            what == "sending a message" || CONNECTING.contains(&what),
            "{what}: name it in CONNECTING if it is about opening a session"
        );
        SendError::SmtpIo {
            address: self.settings.address.clone(),
            what,
            source,
        }
    }

    fn timed_out(&self, what: &'static str) -> SendError {
        self.io_error(
            what,
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.settings.timeout),
            ),
        )
    }
}

/// What an I/O error (`SendError::SmtpIo`) was doing when it was about opening a
/// session, not sending a mail.
pub const CONNECTING: [&str; 5] = [
    "name lookup",
    "connect",
    "TCP_NODELAY",
    "TLS handshake",
    "connecting",
];

/// QUIT (waiting up to `timeout` for its answer), or just drop the socket when the
/// connection is broken.
async fn close(conn: &mut AsyncSmtpConnection, timeout: Duration) {
    if conn.has_broken() {
        conn.abort().await;
    } else {
        let _ = tokio::time::timeout(timeout, conn.quit()).await;
    }
}
