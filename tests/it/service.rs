//! Running as a systemd service: the notification protocol (READY, STATUS, WATCHDOG,
//! RELOADING, STOPPING) on a real datagram socket as systemd provides it, SIGHUP reload
//! (a valid file applies, an invalid one is refused and the old policy kept), and the
//! unit's hardening score.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(30);

/// Collects every datagram sent to the socket.
struct NotifySocket {
    path: std::path::PathBuf,
    received: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn bind(path: std::path::PathBuf) -> NotifySocket {
        let socket = UnixDatagram::bind(&path).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        NotifySocket { path, received }
    }

    fn all(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    fn count(&self, exact: &str) -> usize {
        self.all().iter().filter(|m| *m == exact).count()
    }

    fn last_status(&self) -> String {
        self.all()
            .iter()
            .rev()
            .find_map(|m| m.strip_prefix("STATUS=").map(str::to_string))
            .unwrap_or_default()
    }
}

fn drop_message(env: &Env, name: &str, sender: &str) {
    let maildir = env.path("maildir");
    for d in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(maildir.join(d)).unwrap();
    }
    let raw = format!(
        "From: <{sender}>\r\nTo: it@desk.example\r\nSubject: Help from {sender}\r\n\
         Message-ID: <{name}@outside.example>\r\n\r\nPlease help.\r\n"
    );
    std::fs::write(maildir.join("tmp").join(name), raw).unwrap();
    std::fs::rename(
        maildir.join("tmp").join(name),
        maildir.join("new").join(name),
    )
    .unwrap();
}

fn request_count(env: &Env) -> usize {
    env.json(&["requests", "list", "--json", "--limit", "100000"])
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

fn set_config(env: &Env, from: &str, to: &str) {
    let text = std::fs::read_to_string(&env.config).unwrap();
    assert!(text.contains(from), "{from} not in the config");
    std::fs::write(&env.config, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn notify_protocol_watchdog_reload_and_stop() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let notify = NotifySocket::bind(env.path("notify.sock"));
        let daemon = start_daemon_with(
            &env,
            &[
                ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
                ("WATCHDOG_USEC", "600000"),
            ],
        );
        daemon.wait_for("READY=1", WAIT, || notify.count("READY=1") == 1);
        // Pings at a third of the interval: several within a couple of seconds.
        let pings = notify.count("WATCHDOG=1");
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            notify.count("WATCHDOG=1") >= pings + 4,
            "{:?}",
            notify.all()
        );

        drop_message(&env, "m1", "first@outside.example");
        daemon.wait_for("a status line counting it", WAIT, || {
            notify
                .last_status()
                .starts_with("1 messages (1 new requests, 0 quarantined)")
        });
        assert!(notify.last_status().contains("1 mailbox(es) ok"));

        // A valid change applies without a restart.
        set_config(
            &env,
            "channel_access = \"open\"",
            "channel_access = \"restricted\"",
        );
        daemon.signal("HUP");
        daemon.wait_for("the reload", WAIT, || {
            daemon.log().contains("configuration reloaded") && notify.count("READY=1") == 2
        });
        assert_eq!(notify.count("RELOADING=1"), 1);
        drop_message(&env, "m2", "second@outside.example");
        daemon.wait_for("the second message decided", WAIT, || {
            notify.last_status().starts_with("2 messages")
        });
        assert_eq!(
            request_count(&env),
            1,
            "the restricted desk took no stranger"
        );

        // An invalid file is refused, named with key and file, and the old policy stays.
        set_config(&env, "sharing = \"", "sharing = \"everyone");
        daemon.signal("HUP");
        daemon.wait_for("the refusal", WAIT, || {
            daemon.log().contains("configuration reload refused") && notify.count("READY=1") == 3
        });
        let log = daemon.log();
        assert!(log.contains("desks[0].sharing"), "{log}");
        assert!(notify.last_status().contains("reload refused"));
        drop_message(&env, "m3", "third@outside.example");
        daemon.wait_for("the third message decided", WAIT, || {
            notify.last_status().starts_with("3 messages")
        });
        // The refusal stays in the status line until a reload succeeds.
        let status = notify.last_status();
        assert!(
            status.contains("last reload refused: ") && status.contains("desks[0].sharing"),
            "{status}"
        );
        // (The CLI reads the file too: make it valid again before asking.)
        set_config(&env, "sharing = \"everyone", "sharing = \"");
        assert_eq!(request_count(&env), 1, "still restricted");
        daemon.signal("HUP");
        daemon.wait_for("a reload that succeeds clears it", WAIT, || {
            notify.count("READY=1") == 4 && !notify.last_status().contains("refused")
        });

        let log = daemon.stop();
        assert!(notify.count("STOPPING=1") == 1, "{:?}", notify.all());
        assert!(log.contains("stopped"), "{log}");
    }
}

/// Renaming (or removing) a desk a running mailbox files into is refused on reload: the
/// mailbox keeps the desk it was started with and would ignore, and acknowledge, every
/// message until a restart.
#[test]
fn a_reload_that_takes_a_running_mailboxs_desk_away_is_refused() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let daemon = start_daemon(&env);
        daemon.wait_for("the maildir watched", WAIT, || {
            daemon.log().contains("watching maildir")
        });
        let original = std::fs::read_to_string(&env.config).unwrap();
        // Renamed everywhere: the desk, its directory entries, the mailbox.
        std::fs::write(&env.config, original.replace("\"IT\"", "\"SUPPORT\"")).unwrap();
        daemon.signal("HUP");
        daemon.wait_for("the refusal", WAIT, || {
            daemon.log().contains("configuration reload refused")
        });
        let log = daemon.log();
        assert!(
            log.contains("mailbox inbox files into desk IT, which the new configuration lacks"),
            "{log}"
        );
        std::fs::write(&env.config, original).unwrap();
        drop_message(&env, "m1", "first@outside.example");
        daemon.wait_for("a request on IT", WAIT, || request_count(&env) == 1);
        daemon.stop();
    }
}

#[test]
fn the_unit_is_hardened() {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/intake.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for intake.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 2.0, "exposure {score}:\n{text}");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=",
        "StateDirectory=intake",
        "ConfigurationDirectory=intake",
    ] {
        assert!(unit_text.contains(line), "{line} missing from the unit");
    }
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn sigterm_mid_backlog_loses_and_doubles_nothing() {
    const N: usize = 2000;
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        for i in 0..N {
            drop_message(
                &env,
                &format!("b{i}"),
                &format!("sender{i}@outside.example"),
            );
        }
        let new = env.path("maildir/new");
        let cur = env.path("maildir/cur");
        // Every new sender is invited; lift the hourly cap on outgoing mail.
        let vars = [("INTAKE__OUTBOX__MAX_PER_HOUR", "100000")];
        let daemon = start_daemon_with(&env, &vars);
        daemon.wait_for("part of the backlog", WAIT, || count_files(&cur) >= 300);
        let log = daemon.stop();
        assert!(log.contains("shutting down"), "{log}");
        let done = count_files(&cur);
        assert!(done < N, "stopped before the end ({done})");
        // Clean stop: every committed message was also acknowledged (moved to cur/).
        assert_eq!(request_count(&env), done);
        assert_eq!(count_files(&new) + done, N);

        let daemon = start_daemon_with(&env, &vars);
        daemon.wait_for("the rest", Duration::from_secs(120), || {
            count_files(&new) == 0
        });
        daemon.wait_for("every invitation", WAIT, || env.outbox_files().len() >= N);
        daemon.stop();
        assert_eq!(request_count(&env), N);
        let mut recipients: Vec<String> = env
            .outbox_files()
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap();
                text.lines()
                    .find_map(|l| l.strip_prefix("To: ").map(str::to_string))
                    .unwrap()
            })
            .collect();
        assert_eq!(recipients.len(), N, "one mail each");
        recipients.sort();
        recipients.dedup();
        assert_eq!(recipients.len(), N, "no one mailed twice");
    }
}
