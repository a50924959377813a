//! TLS for IMAP: rustls with the system's root certificates plus an optional extra CA
//! file, and the stream a session runs over: plain TCP or TLS (STARTTLS starts plain),
//! with a limit on how long the server may stay silent when a reply is due.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA file {path}")]
    CaFile {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no usable root certificates (system store empty and no ca_file)")]
    NoRoots,
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// A client configuration trusting the system roots and, if given, the CA file's certs.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot use is skipped, as other TLS stacks do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path).map_err(|source| TlsError::CaFile {
            path: path.display().to_string(),
            source,
        })?;
        for cert in certs {
            let cert = cert.map_err(|source| TlsError::CaFile {
                path: path.display().to_string(),
                source,
            })?;
            roots.add(cert).map_err(TlsError::Config)?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Config)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Wraps `tcp` in TLS, verifying the certificate for `host`.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(host.to_string()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            TlsError::ServerName(host.into()),
        )
    })?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// How long the server may stay silent while we wait for its reply; shared between an
/// [`ImapSource`](super::imap::ImapSource) and the stream of its current session, so
/// IDLE (where silence is the normal state) can lift it and restore it afterwards.
#[derive(Debug, Clone)]
pub struct ReplyTimeout {
    /// The limit in milliseconds (at least 1).
    limit: u64,
    /// Milliseconds in force; 0 while lifted.
    current: Arc<AtomicU64>,
}

impl ReplyTimeout {
    pub fn new(limit: Duration) -> Self {
        let limit = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        ReplyTimeout {
            limit,
            current: Arc::new(AtomicU64::new(limit)),
        }
    }

    /// No limit until [`restore`](Self::restore) (IDLE).
    pub fn lift(&self) {
        self.current.store(0, Ordering::Relaxed);
    }

    pub fn restore(&self) {
        self.current.store(self.limit, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Duration> {
        match self.current.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// The connection an IMAP session runs over: plain TCP or TLS, and a watch on the
/// server's silence. A read that gets nothing for the [`ReplyTimeout`] fails with
/// `TimedOut`, so a server that stops answering (a hung process, a connection a
/// firewall dropped without a word) ends the session instead of stalling the mailbox
/// for ever. The clock starts when a read has to wait and restarts with every byte that
/// arrives and every command sent.
pub struct ImapStream {
    transport: Transport,
    timeout: ReplyTimeout,
    /// The silence clock, made once and reset (a read waits often in a backlog).
    clock: Pin<Box<tokio::time::Sleep>>,
    /// Whether `clock` runs for the read waiting now.
    running: bool,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ImapStream {
    pub fn plain(tcp: TcpStream, timeout: ReplyTimeout) -> Self {
        ImapStream::new(Transport::Plain(tcp), timeout)
    }

    pub fn tls(stream: TlsStream<TcpStream>, timeout: ReplyTimeout) -> Self {
        ImapStream::new(Transport::Tls(Box::new(stream)), timeout)
    }

    fn new(transport: Transport, timeout: ReplyTimeout) -> Self {
        ImapStream {
            transport,
            timeout,
            clock: Box::pin(tokio::time::sleep(Duration::ZERO)),
            running: false,
        }
    }

    /// The TCP stream of a plain connection (for STARTTLS); `None` for TLS.
    pub fn into_plain(self) -> Option<TcpStream> {
        match self.transport {
            Transport::Plain(tcp) => Some(tcp),
            Transport::Tls(_) => None,
        }
    }
}

impl fmt::Debug for ImapStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transport {
            Transport::Plain(_) => f.write_str("ImapStream::Plain"),
            Transport::Tls(_) => f.write_str("ImapStream::Tls"),
        }
    }
}

impl AsyncRead for ImapStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if read.is_ready() {
            this.running = false;
            return read;
        }
        let Some(limit) = this.timeout.get() else {
            this.running = false;
            return Poll::Pending;
        };
        if !this.running {
            this.clock
                .as_mut()
                .reset(tokio::time::Instant::now() + limit);
            this.running = true;
        }
        match this.clock.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.running = false;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the server sent nothing for {}s while a reply was due",
                        limit.as_secs()
                    ),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for ImapStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // A command sent: the wait for its reply starts afresh (a read abandoned
        // earlier must not leave its clock running).
        this.running = false;
        match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
