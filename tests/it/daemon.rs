//! `intake run` as a real process: a Maildir watched, quarantine, outbox written, clean
//! shutdown on SIGTERM, and re-delivery after a restart doing nothing twice.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;

fn deliver_to_maildir(maildir: &Path, name: &str, fixture_name: &str) {
    // Maildir delivery: write in tmp/, rename into new/.
    std::fs::create_dir_all(maildir.join("tmp")).unwrap();
    std::fs::create_dir_all(maildir.join("new")).unwrap();
    let tmp = maildir.join("tmp").join(name);
    std::fs::copy(fixture(fixture_name), &tmp).unwrap();
    std::fs::rename(&tmp, maildir.join("new").join(name)).unwrap();
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn daemon_processes_a_maildir_and_stops_cleanly() {
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let maildir = env.path("maildir");
        deliver_to_maildir(&maildir, "1.eml", "outsider-new.eml");
        deliver_to_maildir(&maildir, "2.eml", "auto-reply.eml");
        deliver_to_maildir(&maildir, "3.eml", "unparseable.eml");
        let daemon = start_daemon(&env);
        wait_for("the first messages", Duration::from_secs(20), || {
            count(&maildir.join("new")) == 0
        });
        // A message arriving while it runs is picked up too.
        deliver_to_maildir(&maildir, "4.eml", "reply-by-reporter.eml");
        wait_for("the reply", Duration::from_secs(20), || {
            count(&maildir.join("new")) == 0
        });
        wait_for("the invitation mail", Duration::from_secs(20), || {
            !env.outbox_files().is_empty()
        });
        let log = daemon.stop();
        assert!(log.contains("intake running"), "{log}");
        assert!(log.contains("stopped"), "{log}");

        assert_eq!(count(&maildir.join("cur")), 3, "processed mail is in cur/");
        let quarantined: Vec<_> = std::fs::read_dir(maildir.join(".Quarantine/cur"))
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(quarantined.len(), 1);
        assert_eq!(
            std::fs::read(quarantined[0].path()).unwrap(),
            std::fs::read(fixture("unparseable.eml")).unwrap()
        );
        let requests = env.requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0]["comments"], 1);
        let q = env.json(&["quarantine", "list", "--json"]);
        assert_eq!(q[0]["source"], "maildir:inbox");
        assert_eq!(
            q[0]["quarantine_ref"].as_str().unwrap(),
            quarantined[0].path().display().to_string()
        );

        // The same message delivered again after a restart is a no-op.
        deliver_to_maildir(&maildir, "5.eml", "outsider-new.eml");
        let daemon = start_daemon(&env);
        wait_for("the redelivery", Duration::from_secs(20), || {
            count(&maildir.join("new")) == 0
        });
        daemon.stop();
        assert_eq!(env.requests().len(), 1);
        assert_eq!(env.outbox_files().len(), 1, "no second invitation");
        let ledger = env.json(&["requests", "show", "IT-1", "--json"]);
        assert_eq!(ledger["comments"], 1);
    }
}

#[test]
fn oversized_maildir_message_is_quarantined_unread() {
    for backend in BACKENDS {
        let env = Env::with_extra(
            backend,
            &Site::default(),
            &DeskSettings::default(),
            "[limits]\nmax_message_size = 2000\n",
        );
        let maildir = env.path("maildir");
        std::fs::create_dir_all(maildir.join("new")).unwrap();
        let mut big = std::fs::read(fixture("outsider-new.eml")).unwrap();
        big.extend(std::iter::repeat_n(b'x', 5000));
        std::fs::write(maildir.join("new").join("big.eml"), &big).unwrap();
        let daemon = start_daemon(&env);
        wait_for("the big message", Duration::from_secs(20), || {
            count(&maildir.join("new")) == 0
        });
        daemon.stop();
        let q = env.json(&["quarantine", "list", "--json"]);
        assert_eq!(q[0]["reason"], "oversized", "{q:#}");
        assert_eq!(
            q[0]["sender"], "olga@outside.example",
            "headers were read: {q:#}"
        );
        let kept = q[0]["quarantine_ref"].as_str().unwrap();
        assert_eq!(
            std::fs::read(kept).unwrap(),
            big,
            "the whole message is kept"
        );
        assert!(env.requests().is_empty());

        // After raising the limit, releasing it processes it.
        let text = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("max_message_size = 2000", "max_message_size = 100000");
        std::fs::write(&env.config, text).unwrap();
        let id = q[0]["id"].as_i64().unwrap().to_string();
        let out = env.intake(&["quarantine", "release", &id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("create_request"));
        assert_eq!(env.requests().len(), 1);
        assert!(
            env.json(&["quarantine", "list", "--json"])
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert!(!Path::new(kept).exists());
    }
}

/// Another program serving the Maildir (an IMAP server, a mail client) moves new mail
/// to cur/ before intake reads it, even reads it: the sweep of cur/ processes it,
/// keeping the flags it got there. Mail in cur/ from before intake first watched the
/// Maildir, and processed mail staff marked unread again, are left alone.
#[test]
fn mail_moved_to_cur_by_another_program_is_processed() {
    let mail = |i: u32| {
        format!(
            "From: Sender {i} <sender{i}@outside.example>\r\nTo: it@desk.example\r\n\
             Subject: Sweep {i}\r\nMessage-ID: <sweep-{i}@outside.example>\r\n\r\nHello.\r\n"
        )
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    for backend in BACKENDS {
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let maildir = env.path("maildir");
        for d in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        let cur = maildir.join("cur");
        // Before the first start: a backlog from 2023 in new/, intake's; in cur/ unread
        // mail from 2023 (even younger than that backlog), not intake's.
        std::fs::write(maildir.join("new/1700000000.M5P5.host"), mail(5)).unwrap();
        let old = cur.join("1700000100.M6P6.host:2,");
        std::fs::write(&old, mail(6)).unwrap();
        let daemon = start_daemon(&env);
        let requests = || env.requests().len();
        wait_for("the backlog", Duration::from_secs(20), || {
            cur.join("1700000000.M5P5.host:2,S").exists()
        });

        std::fs::write(maildir.join("tmp/a"), mail(1)).unwrap();
        std::fs::rename(maildir.join("tmp/a"), maildir.join("new/a")).unwrap();
        wait_for("the message in new/", Duration::from_secs(20), || {
            cur.join("a:2,S").exists()
        });

        // Moved to cur/ and flagged by someone else before intake read it.
        let b = format!("{}.M2P2.host", now());
        std::fs::write(cur.join(format!("{b}:2,F")), mail(2)).unwrap();
        wait_for("the message in cur/", Duration::from_secs(20), || {
            cur.join(format!("{b}:2,FS")).exists()
        });
        // And one read there already.
        std::fs::write(cur.join(format!("{}.M7P7.host:2,S", now())), mail(7)).unwrap();
        wait_for(
            "the message read before intake saw it",
            Duration::from_secs(20),
            || requests() == 4,
        );

        // Staff mark the first one unread again; a third message comes through cur/.
        std::fs::rename(cur.join("a:2,S"), cur.join("a:2,")).unwrap();
        let c = format!("{}.M3P3.host", now());
        std::fs::write(cur.join(format!("{c}:2,")), mail(3)).unwrap();
        wait_for("the third message", Duration::from_secs(20), || {
            cur.join(format!("{c}:2,S")).exists()
        });
        let log = daemon.stop();
        assert!(
            cur.join("a:2,").exists(),
            "marked unread stays unread:\n{log}"
        );
        assert!(old.exists(), "old mail is left alone:\n{log}");
        let mut subjects: Vec<String> = env
            .requests()
            .iter()
            .map(|r| r["subject"].as_str().unwrap_or_default().to_string())
            .collect();
        subjects.sort();
        assert_eq!(
            subjects,
            ["Sweep 1", "Sweep 2", "Sweep 3", "Sweep 5", "Sweep 7"],
            "{log}"
        );
        assert!(log.contains("never processed"), "{log}");
    }
}
