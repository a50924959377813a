//! A real Dovecot for tests: started per test on free loopback ports (plain IMAP and
//! implicit TLS, STARTTLS offered on the plain port), with its own config, base_dir and
//! instance name, a passwd-file user and a Maildir under a temp dir. Also a small
//! synchronous IMAP client to put mail in and look at folders.
//!
//! Settings that matter (see DESIGN.md): mail processes run as uid/gid 65534 when we are
//! root (Dovecot refuses uid 0), `mail_max_userip_connections` is raised, TLS uses a CA
//! and a leaf certificate with `CA:FALSE` and SAN `localhost, 127.0.0.1` (rustls rejects
//! a self-signed certificate that is its own CA).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "desk";
pub const PASSWORD: &str = "s3cret-pass";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn ids() -> (u32, u32, String) {
    let uid = String::from_utf8_lossy(&Command::new("id").arg("-u").output().expect("id").stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    if uid == 0 {
        (65534, 65534, "nobody".into())
    } else {
        let gid =
            String::from_utf8_lossy(&Command::new("id").arg("-g").output().expect("id").stdout)
                .trim()
                .parse()
                .unwrap_or(0);
        let name =
            String::from_utf8_lossy(&Command::new("id").arg("-un").output().expect("id").stdout)
                .trim()
                .to_string();
        (uid, gid, name)
    }
}

/// A CA and a server certificate for localhost / 127.0.0.1, as PEM files in `dir`.
/// Returns the CA file's path.
pub fn make_certs(dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intake test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("leaf params");
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca");
    std::fs::write(dir.join("cert.pem"), leaf.pem()).expect("write cert");
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).expect("write key");
    dir.join("ca.pem")
}

/// A token introspection endpoint for Dovecot's oauth2 passdb: accepts the token that is
/// in `accepted-token` at the time of the request. Exits when the test process is gone.
const INTROSPECT_PY: &str = r#"
import http.server, json, os, sys, threading, time, urllib.parse
port, token_file, parent = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get('Content-Length', 0))
        token = (urllib.parse.parse_qs(self.rfile.read(n).decode()).get('token') or [''])[0]
        ok = token != '' and token == open(token_file).read().strip()
        data = json.dumps({'active': True, 'username': 'desk'} if ok else {'active': False}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a): pass
def watch():
    while os.path.exists('/proc/%d' % parent): time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"#;

pub struct Dovecot {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub tls_port: u16,
    pub ca_file: PathBuf,
    conf: PathBuf,
    introspect: Option<std::process::Child>,
}

impl Dovecot {
    pub fn start() -> Dovecot {
        Self::start_with(false, false, false)
    }

    /// With the ACL plugin and a global ACL file, empty at first (every right);
    /// [`Dovecot::set_acl`] changes it, taking effect at once.
    pub fn start_with_acl() -> Dovecot {
        Self::start_with(false, true, false)
    }

    /// [`Dovecot::start_with_acl`], and a server that does not offer MOVE (RFC 6851):
    /// a client moves with COPY, STORE \Deleted and EXPUNGE.
    pub fn start_with_acl_without_move() -> Dovecot {
        Self::start_with(false, true, true)
    }

    /// Replaces the global ACL rules (`<mailbox> <identifier> <rights>` lines).
    pub fn set_acl(&self, rules: &str) {
        std::fs::write(self.dir.path().join("acl"), rules).expect("acl file");
    }

    /// Also accepts XOAUTH2: tokens are checked against the file `accepted-token` (see
    /// [`Dovecot::accept_token`]) by an introspection endpoint on loopback.
    pub fn start_with_oauth() -> Dovecot {
        Self::start_with(true, false, false)
    }

    /// Changes which OAuth2 access token the server accepts.
    pub fn accept_token(&self, token: &str) {
        std::fs::write(self.dir.path().join("accepted-token"), token).expect("token file");
    }

    /// Drops every session of the desk user (as a server-side token revocation would).
    pub fn kick(&self) {
        self.doveadm(&["kick", USER]);
    }

    fn start_with(oauth: bool, acl: bool, without_move: bool) -> Dovecot {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        // Login and mail processes run unprivileged: they must reach the files.
        Command::new("chmod")
            .arg("755")
            .arg(root)
            .status()
            .expect("chmod");
        let (uid, gid, user) = ids();
        let mail = root.join("mail");
        std::fs::create_dir_all(&mail).expect("mail dir");
        Command::new("chown")
            .arg(format!("{uid}:{gid}"))
            .arg(&mail)
            .status()
            .expect("chown mail");
        std::fs::write(root.join("passwd"), format!("{USER}:{{PLAIN}}{PASSWORD}\n"))
            .expect("passwd");
        let ca_file = make_certs(root);
        let (port, tls_port) = (free_port(), free_port());
        let r = root.display();
        let mut introspect = None;
        let oauth_conf = if oauth {
            let http_port = free_port();
            std::fs::write(root.join("introspect.py"), INTROSPECT_PY).expect("introspect.py");
            std::fs::write(root.join("accepted-token"), "").expect("token");
            introspect = Some(
                Command::new("python3")
                    .arg(root.join("introspect.py"))
                    .arg(http_port.to_string())
                    .arg(root.join("accepted-token"))
                    .arg(std::process::id().to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("python3 for the token endpoint"),
            );
            let start = Instant::now();
            while TcpStream::connect(("127.0.0.1", http_port)).is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "token endpoint not up"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            std::fs::write(
                root.join("oauth2.conf.ext"),
                format!(
                    "introspection_mode = post\nintrospection_url = http://127.0.0.1:{http_port}/introspect\n\
                     username_attribute = username\nactive_attribute = active\nactive_value = true\n"
                ),
            )
            .expect("oauth2 conf");
            format!(
                "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {r}/oauth2.conf.ext\n}}\n"
            )
        } else {
            String::new()
        };
        let acl_conf = if acl {
            std::fs::write(root.join("acl"), "").expect("acl file");
            format!(
                "mail_plugins = $mail_plugins acl\nplugin {{\n  acl = vfile:{r}/acl:cache_secs=0\n  acl_globals_only = yes\n}}\n"
            )
        } else {
            String::new()
        };
        let capability_conf = if without_move {
            "imap_capability = IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE UIDPLUS NAMESPACE CHILDREN UNSELECT\n"
        } else {
            ""
        };
        let mechanisms = if oauth {
            "plain login xoauth2 oauthbearer"
        } else {
            "plain login"
        };
        let instance = format!("intake{}", port);
        // Maildir by default (what the tests were written against); the IMAP bench sets
        // INTAKE_DOVECOT_FORMAT=mdbox for big backlogs, where appending to a Maildir of
        // tens of thousands of files slows to a crawl.
        let format = std::env::var("INTAKE_DOVECOT_FORMAT").unwrap_or_else(|_| "maildir".into());
        let conf = root.join("dovecot.conf");
        let root_only = if uid == 65534 {
            "default_internal_user = nobody\ndefault_internal_group = nogroup\ndefault_login_user = nobody\n".to_string()
        } else {
            format!("default_internal_user = {user}\ndefault_login_user = {user}\n")
        };
        std::fs::write(
            &conf,
            format!(
                r#"base_dir = {r}/run
state_dir = {r}/state
instance_name = {instance}
listen = 127.0.0.1
protocols = imap
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
ssl = yes
ssl_cert = <{r}/cert.pem
ssl_key = <{r}/key.pem
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
mail_location = {format}:{r}/mail/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
mail_max_userip_connections = 200
{root_only}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {r}/passwd
}}
{oauth_conf}{acl_conf}{capability_conf}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={r}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
"#
            ),
        )
        .expect("write dovecot.conf");
        std::fs::create_dir_all(root.join("state")).expect("state dir");
        let d = Dovecot {
            dir,
            port,
            tls_port,
            ca_file,
            conf,
            introspect,
        };
        d.launch();
        // Reaper: stops this Dovecot when the test process is gone.
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 0.5; done; dovecot -c {conf} stop >/dev/null 2>&1",
            pid = std::process::id(),
            conf = d.conf.display()
        );
        #[allow(clippy::zombie_processes)]
        Command::new("/bin/sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("reaper");
        d
    }

    fn launch(&self) {
        // Dovecot daemonizes and its children keep the standard streams: never give it a
        // pipe we would wait on. Right after a crash the old processes may still be
        // exiting (and holding the ports): try again for a few seconds.
        let errors = self.dir.path().join("dovecot-start.err");
        let started = Instant::now();
        loop {
            let status = Command::new("dovecot")
                .arg("-c")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(&errors).expect("stderr file"),
                ))
                .status()
                .expect("run dovecot (install dovecot-imapd; .ci/run does)");
            if status.success() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "dovecot did not start: {}\n{}",
                std::fs::read_to_string(&errors).unwrap_or_default(),
                self.log()
            );
            let _ = std::fs::remove_file(self.dir.path().join("run/master.pid"));
            std::thread::sleep(Duration::from_millis(200));
        }
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "dovecot is not listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops Dovecot (existing connections are cut).
    pub fn stop(&self) {
        let _ = Command::new("dovecot")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "dovecot did not stop"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The master's pid file goes away when it has exited.
        let pid = self.dir.path().join("run/master.pid");
        let start = Instant::now();
        while pid.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn restart(&self) {
        self.stop();
        self.launch();
    }

    /// Restarts with a command line limit of `bytes` (`imap_max_line_length`; Dovecot's
    /// default is 64 KB, other servers allow less).
    pub fn restart_with_line_limit(&self, bytes: usize) {
        let mut conf = std::fs::read_to_string(&self.conf).expect("read dovecot.conf");
        conf.push_str(&format!("imap_max_line_length = {bytes}\n"));
        std::fs::write(&self.conf, conf).expect("write dovecot.conf");
        self.restart();
    }

    /// Kills this Dovecot and every process of it at once (as a crash or an OOM kill
    /// would: connections are cut mid-command), then starts it again.
    pub fn crash_restart(&self) {
        let instance = format!("dovecot-intake{}", self.port);
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &instance])
            .status();
        let pid_file = self.dir.path().join("run/master.pid");
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "dovecot did not die"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Imap processes are titled "dovecot/imap"; kill this instance's by their config.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &format!("{}", self.conf.display())])
            .status();
        let _ = std::fs::remove_file(&pid_file);
        self.launch();
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`) to this instance's imap processes, the ones
    /// serving logged-in clients: a stopped one keeps its connections open and answers
    /// nothing, as a hung server does.
    pub fn signal_imap(&self, signal: &str) {
        let status = Command::new("pkill")
            .arg(format!("-{signal}"))
            .args(["-f", &format!("^dovecot-intake{}/imap( |$)", self.port)])
            .status()
            .expect("pkill");
        assert!(status.success(), "no imap process to {signal}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    pub fn doveadm(&self, args: &[&str]) -> String {
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("doveadm");
        assert!(
            out.status.success(),
            "doveadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Sets a new UIDVALIDITY on a folder (what a server migration or rebuild does).
    pub fn change_uidvalidity(&self, folder: &str, value: u32) {
        self.doveadm(&[
            "mailbox",
            "update",
            "-u",
            USER,
            "--uid-validity",
            &value.to_string(),
            folder,
        ]);
    }

    pub fn client(&self) -> ImapClient {
        ImapClient::connect(self.port)
    }

    /// The `[[mailboxes]]` entry for this server (plain IMAP on loopback).
    pub fn mailbox_toml(&self, extra: &str) -> String {
        std::fs::write(self.dir.path().join("imap-password"), PASSWORD).expect("password file");
        format!(
            r#"
[[mailboxes]]
name = "support"
kind = "imap"
host = "127.0.0.1"
port = {port}
tls = "none"
username = "{USER}"
password_file = "{pw}"
folder = "INBOX"
desk = "IT"
{extra}
"#,
            port = self.port,
            pw = self.dir.path().join("imap-password").display()
        )
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Some(mut child) = self.introspect.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("dovecot")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A minimal, synchronous IMAP client for tests.
pub struct ImapClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    tag: u32,
}

impl ImapClient {
    pub fn connect(port: u16) -> ImapClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to dovecot");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut c = ImapClient {
            reader: BufReader::new(stream),
            writer,
            tag: 0,
        };
        let mut greeting = String::new();
        c.reader.read_line(&mut greeting).expect("greeting");
        c.command(&format!("LOGIN {USER} \"{PASSWORD}\""));
        c
    }

    fn read_until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read");
            assert!(n > 0, "connection closed");
            // Literals: {N}\r\n followed by N bytes.
            if let Some(open) = line
                .trim_end()
                .strip_suffix('}')
                .and_then(|l| l.rfind('{').map(|i| (i, l)))
            {
                let (i, l) = open;
                if let Ok(n) = l[i + 1..].parse::<usize>() {
                    let mut buf = vec![0u8; n];
                    self.reader.read_exact(&mut buf).expect("literal");
                    line.push_str(&String::from_utf8_lossy(&buf));
                    let mut rest = String::new();
                    self.reader.read_line(&mut rest).expect("after literal");
                    line.push_str(&rest);
                }
            }
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Runs a command; panics unless it ends OK. Returns the response lines.
    pub fn command(&mut self, cmd: &str) -> Vec<String> {
        let lines = self.try_command(cmd);
        let last = lines.last().cloned().unwrap_or_default();
        assert!(
            last.starts_with(&format!("t{} OK", self.tag)),
            "{cmd} failed: {lines:?}"
        );
        lines
    }

    /// Runs a command, whatever its outcome. Returns the response lines, the tagged
    /// one last.
    pub fn try_command(&mut self, cmd: &str) -> Vec<String> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        write!(self.writer, "{tag} {cmd}\r\n").expect("write");
        self.read_until_tagged(&tag)
    }

    pub fn append(&mut self, folder: &str, message: &[u8]) {
        self.append_dated(folder, None, message);
    }

    /// APPEND with an INTERNALDATE (`"01-Jan-2024 09:00:00 +0000"`) instead of now.
    pub fn append_dated(&mut self, folder: &str, date: Option<&str>, message: &[u8]) {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        let date = date.map(|d| format!("\"{d}\" ")).unwrap_or_default();
        write!(
            self.writer,
            "{tag} APPEND \"{folder}\" {date}{{{}+}}\r\n",
            message.len()
        )
        .expect("write");
        self.writer.write_all(message).expect("write message");
        self.writer.write_all(b"\r\n").expect("write");
        let lines = self.read_until_tagged(&tag);
        let last = lines.last().cloned().unwrap_or_default();
        assert!(
            last.starts_with(&format!("{tag} OK")),
            "APPEND failed: {lines:?}"
        );
    }

    /// (messages, unseen) in a folder; (0, 0) when it does not exist.
    pub fn status(&mut self, folder: &str) -> (u32, u32) {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        write!(
            self.writer,
            "{tag} STATUS \"{folder}\" (MESSAGES UNSEEN)\r\n"
        )
        .expect("write");
        let lines = self.read_until_tagged(&tag);
        let num = |key: &str| -> u32 {
            lines
                .iter()
                .find_map(|l| {
                    let i = l.find(key)?;
                    l[i + key.len()..]
                        .trim_start()
                        .split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        (num("MESSAGES"), num("UNSEEN"))
    }

    pub fn logout(mut self) {
        self.tag += 1;
        let _ = write!(self.writer, "t{} LOGOUT\r\n", self.tag);
    }
}

/// Waits until `done` holds, polling every 20 ms.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
