//! A real SMTP server for tests: Debian's `python3-aiosmtpd` (it imports only under
//! `/usr/bin/python3`), delivering into a Maildir, with optional STARTTLS, implicit TLS
//! and AUTH; it can refuse our sender or some recipients, as a misconfigured relay or an
//! unknown mailbox does. Exits with the test process.

#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER_PY: &str = r#"
import json, os, ssl, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword
port, maildir, mode, cert, key, user, password, parent, per_session, sender_reply, refused = sys.argv[1:12]
per_session = int(per_session)
refused = json.loads(refused)
class Auth:
    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user \
            and auth_data.password.decode() == password
        return AuthResult(success=ok, handled=False)
kwargs = {}
if mode in ('starttls', 'implicit'):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if mode == 'implicit':
        kwargs['ssl_context'] = ctx
    else:
        kwargs['tls_context'] = ctx
        kwargs['require_starttls'] = True
if user:
    kwargs['authenticator'] = Auth()
    kwargs['auth_required'] = True
    # aiosmtpd only counts STARTTLS as TLS: on an implicit-TLS (SMTPS) port it would
    # never offer AUTH, although the whole session is encrypted.
    kwargs['auth_require_tls'] = mode == 'starttls'
class Recording(Mailbox):
    # With a per-session limit, MAIL beyond it is refused with 421, as relays that cap
    # a session's messages do.
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        n = getattr(session, 'intake_mails', 0) + 1
        session.intake_mails = n
        if per_session and n > per_session:
            return '421 4.7.0 too many messages in this session'
        if sender_reply:
            return sender_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return '250 OK'
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in refused:
            return refused[address.lower()]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return '250 OK'
    # One line per message: the client's address and port, so a test can count the
    # connections that carried them.
    async def handle_DATA(self, server, session, envelope):
        with open(maildir.rstrip('/') + '.peers', 'a') as f:
            f.write('%s:%s\n' % tuple(session.peer[:2]))
        return await super().handle_DATA(server, session, envelope)
c = Controller(Recording(maildir), hostname='127.0.0.1', port=int(port), **kwargs)
c.start()
print('ready', flush=True)
while os.path.exists('/proc/%s' % parent):
    time.sleep(0.2)
c.stop()
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    StartTls,
    Implicit,
}

pub struct Smtp {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub maildir: PathBuf,
    pub ca_file: PathBuf,
    mode: Mode,
    auth: Option<(String, String)>,
    /// MAIL commands a session may send before the server answers 421 (0: no limit).
    pub per_session: u32,
    /// The reply to every MAIL FROM instead of 250 (empty: accept).
    pub sender_reply: String,
    /// Recipients (lowercase) refused at RCPT TO, with the reply.
    pub refused_recipients: Vec<(String, String)>,
    child: Option<Child>,
}

impl Smtp {
    pub fn start(mode: Mode, auth: Option<(&str, &str)>) -> Smtp {
        Self::start_on(crate::harness::free_port(), mode, auth)
    }

    /// Prepares a server on `port` without starting it (for "SMTP down, then up").
    pub fn stopped(mode: Mode) -> Smtp {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_file = crate::dovecot::make_certs(dir.path());
        Smtp {
            maildir: dir.path().join("maildir"),
            port: crate::harness::free_port(),
            ca_file,
            dir,
            mode,
            auth: None,
            per_session: 0,
            sender_reply: String::new(),
            refused_recipients: Vec::new(),
            child: None,
        }
    }

    pub fn start_on(port: u16, mode: Mode, auth: Option<(&str, &str)>) -> Smtp {
        let mut s = Self::stopped(mode);
        s.port = port;
        s.auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        s.launch();
        s
    }

    pub fn launch(&mut self) {
        let script = self.dir.path().join("smtpd.py");
        std::fs::write(&script, SERVER_PY).expect("server script");
        let mode = match self.mode {
            Mode::Plain => "none",
            Mode::StartTls => "starttls",
            Mode::Implicit => "implicit",
        };
        let (user, password) = self.auth.clone().unwrap_or_default();
        let mut child = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(self.port.to_string())
            .arg(&self.maildir)
            .arg(mode)
            .arg(self.dir.path().join("cert.pem"))
            .arg(self.dir.path().join("key.pem"))
            .arg(user)
            .arg(password)
            .arg(std::process::id().to_string())
            .arg(self.per_session.to_string())
            .arg(&self.sender_reply)
            .arg(
                serde_json::Value::from_iter(
                    self.refused_recipients
                        .iter()
                        .map(|(a, r)| (a.clone(), serde_json::Value::from(r.as_str()))),
                )
                .to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("smtpd.log")).expect("log"),
            ))
            .spawn()
            .expect("run /usr/bin/python3 -m aiosmtpd (install python3-aiosmtpd; .ci/run does)");
        // Wait for "ready" on stdout, then for the port.
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        assert!(
            line.starts_with("ready"),
            "aiosmtpd did not start: {}",
            std::fs::read_to_string(self.dir.path().join("smtpd.log")).unwrap_or_default()
        );
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "aiosmtpd is not listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Messages received so far, oldest first.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<PathBuf> = ["new", "cur"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(self.maildir.join(d))
                    .map(|r| {
                        r.filter_map(|e| e.ok())
                            .map(|e| e.path())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    }

    /// How many connections carried the messages received so far.
    pub fn connections(&self) -> usize {
        let mut path = self.maildir.clone().into_os_string();
        path.push(".peers");
        let peers = std::fs::read_to_string(path).unwrap_or_default();
        peers
            .lines()
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// The `[smtp]` section for this server.
    pub fn toml(&self, extra: &str) -> String {
        let tls = match self.mode {
            Mode::Plain => "none",
            Mode::StartTls => "starttls",
            Mode::Implicit => "implicit",
        };
        let auth = match &self.auth {
            Some((user, password)) => {
                let file = self.dir.path().join("smtp-password");
                std::fs::write(&file, password).expect("password file");
                format!(
                    "username = \"{user}\"\npassword_file = \"{}\"\n",
                    file.display()
                )
            }
            None => String::new(),
        };
        let host = if self.mode == Mode::Plain {
            "127.0.0.1"
        } else {
            "localhost"
        };
        format!(
            "[smtp]\nhost = \"{host}\"\nport = {}\ntls = \"{tls}\"\nca_file = \"{}\"\ntimeout = \"5s\"\n{auth}{extra}\n",
            self.port,
            self.ca_file.display()
        )
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first `http…/verify/…` link in a message's text.
pub fn verification_link(raw: &[u8]) -> Option<String> {
    let msg = intake::message::parse(raw).ok()?;
    let text = msg.text_body;
    let start = text.find("http")?;
    let link: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    link.contains("/verify/").then_some(link)
}

/// Waits for `n` messages at the server.
pub fn wait_for_messages(smtp: &Smtp, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let start = Instant::now();
    loop {
        let m = smtp.messages();
        if m.len() >= n {
            return m;
        }
        assert!(
            start.elapsed() < timeout,
            "{} of {n} messages arrived; server log:\n{}",
            m.len(),
            std::fs::read_to_string(smtp.dir.path().join("smtpd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn dir_exists(p: &Path) -> bool {
    p.is_dir()
}
