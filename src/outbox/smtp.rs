//! Sending through an SMTP relay: lettre speaks the protocol, over a socket we open.
//!
//! Two things lettre's own transport does not do. The socket has `TCP_NODELAY`: lettre
//! writes a message and then its terminating `.` as two writes, and with Nagle's
//! algorithm the second waits for the relay to acknowledge the first, which it delays
//! (40 ms on Linux): every mail took 50 ms on loopback. And one connection carries the
//! mail of a whole outbox pass (up to [`MAX_PER_CONNECTION`] mails): a new connection
//! per mail is a TCP and TLS handshake and an AUTH each time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::Message;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
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

    /// Sends one mail, on the open connection when there is a fresh one. A connection
    /// that failed in any way is closed: the next mail gets a new one.
    pub async fn send(&self, message: &Message) -> Result<(), SendError> {
        let mut slot = self.session.lock().await;
        let mut session = match slot.take() {
            Some(s) if s.sent < MAX_PER_CONNECTION && s.last_used.elapsed() < IDLE_REUSE => s,
            old => {
                if let Some(mut old) = old {
                    close(&mut old.conn).await;
                }
                Session {
                    conn: self.connect().await?,
                    sent: 0,
                    last_used: Instant::now(),
                }
            }
        };
        let s = &self.settings;
        let bytes = message.formatted();
        // MAIL, RCPT, DATA and the message: four exchanges, each bounded by the timeout.
        let sent =
            tokio::time::timeout(s.timeout * 4, session.conn.send(message.envelope(), &bytes))
                .await;
        match sent {
            Ok(Ok(_)) => {
                session.sent += 1;
                session.last_used = Instant::now();
                *slot = Some(session);
                Ok(())
            }
            Ok(Err(source)) => {
                close(&mut session.conn).await;
                Err(SendError::Smtp {
                    address: s.address.clone(),
                    permanent: super::recipient_refused(&source),
                    source,
                })
            }
            Err(_) => Err(self.timed_out("sending a message")),
        }
    }

    /// Closes the open connection (QUIT), if any: the end of an outbox pass.
    pub async fn finish(&self) {
        if let Some(mut s) = self.session.lock().await.take() {
            close(&mut s.conn).await;
        }
    }

    /// A new connection: TCP (no delay), TLS as configured, EHLO, AUTH.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let s = &self.settings;
        let connected = tokio::time::timeout(s.timeout * 3, async {
            let tcp = self.tcp().await?;
            let smtp = |source| SendError::Smtp {
                address: s.address.clone(),
                permanent: false,
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
            match TcpStream::connect(addr).await {
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

/// QUIT, or just drop the socket when the connection is broken.
async fn close(conn: &mut AsyncSmtpConnection) {
    if conn.has_broken() {
        conn.abort().await;
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.quit()).await;
    }
}
