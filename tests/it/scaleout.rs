//! Several instances on one PostgreSQL: mailboxes are shared by lease, an instance
//! killed with SIGKILL mid-run has its mailboxes taken over, and every message is
//! processed once and every invitation sent once (one Message-ID per recipient; the
//! kill may make the relay see one copy of a mail twice, see below).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::crash::Db;
use crate::dovecot::Dovecot;
use crate::harness::*;
use crate::smtp::{Mode, Smtp};

const FOLDERS: [(&str, &str); 3] = [
    ("support", "INBOX"),
    ("sales", "Sales"),
    ("billing", "Billing"),
];
const PER_FOLDER: usize = 300;

fn request_count(env: &Env) -> usize {
    env.json(&["requests", "list", "--json", "--limit", "100000"])
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

/// (To, Message-ID) of every copy the relay received.
fn deliveries(smtp: &Smtp) -> Vec<(String, String)> {
    smtp.messages()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(m);
            let header = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name).map(|t| t.trim().to_string()))
                    .unwrap_or_default()
            };
            (header("To: "), header("Message-ID: "))
        })
        .collect()
}

#[test]
fn three_instances_share_mailboxes_and_survive_a_sigkill() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client();
    for (_, folder) in &FOLDERS[1..] {
        imap.command(&format!("CREATE {folder}"));
    }
    let smtp = Smtp::start(Mode::Plain, None);
    let mailboxes: String = FOLDERS
        .iter()
        .map(|(name, folder)| {
            dovecot
                .mailbox_toml("")
                .replace("name = \"support\"", &format!("name = \"{name}\""))
                .replace("folder = \"INBOX\"", &format!("folder = \"{folder}\""))
        })
        .collect();
    let env = Env::with_extra(
        Backend::Postgres,
        &Site::default(),
        &DeskSettings::default(),
        &format!("{mailboxes}\n{}", smtp.toml("")),
    );
    let vars = [
        ("INTAKE__DATABASE__MAILBOX_LEASE", "3s"),
        ("INTAKE__OUTBOX__MAX_PER_HOUR", "100000"),
        ("INTAKE__HTTP__LISTEN", "127.0.0.1:0"),
        ("INTAKE__SMTP__TIMEOUT", "1s"),
    ];
    let mut daemons: Vec<Daemon> = (0..3).map(|_| start_daemon_with(&env, &vars)).collect();
    // The backlog arrives once the mailboxes are shared out (four with the default
    // Maildir one: two instances hold two each, the third stands by): appended before,
    // the instance that started first could take every mailbox and finish the backlog
    // (about a second on PostgreSQL) before it gave any back. The one killed is one
    // that holds an IMAP folder, so there is something to take over.
    let db = Db::open(&env.database_url);
    let mut victim = 0;
    daemons[0].wait_for("the mailboxes shared out", Duration::from_secs(60), || {
        if db.try_count("SELECT COUNT(*) FROM mailbox_state").is_none() {
            return false;
        }
        let leases: Vec<(String, Option<String>)> =
            db.all("SELECT mailbox, lease_owner FROM mailbox_state");
        let owners: BTreeSet<&str> = leases.iter().filter_map(|(_, o)| o.as_deref()).collect();
        let imap_holder = leases.iter().find_map(|(m, o)| {
            let o = o.as_deref()?;
            FOLDERS.iter().any(|(name, _)| name == m).then_some(o)?;
            daemons
                .iter()
                .position(|d| o.contains(&format!(":{}:", d.pid())))
        });
        match imap_holder {
            Some(d) if owners.len() >= 2 => {
                victim = d;
                true
            }
            _ => false,
        }
    });
    let first = daemons.remove(victim);
    let second = daemons.remove(0);
    let third = daemons.remove(0);
    // Folder by folder in turn, so each instance has work; the first is killed once a
    // quarter of the backlog is done, while the rest is still arriving: mid-run, with
    // mail in flight, no goodbye, no release.
    let total = FOLDERS.len() * PER_FOLDER;
    let mut killed = false;
    for i in 0..PER_FOLDER {
        for (f, (_, folder)) in FOLDERS.iter().enumerate() {
            let raw = format!(
                "From: <s{f}-{i}@outside.example>\r\nTo: it@desk.example\r\n\
                 Subject: Question {f}-{i}\r\nMessage-ID: <scale-{f}-{i}@outside.example>\r\n\r\n\
                 Hello.\r\n"
            );
            imap.append(folder, raw.as_bytes());
        }
        if !killed && i % 20 == 19 && request_count(&env) >= total / 4 {
            first.signal("KILL");
            killed = true;
        }
    }
    if !killed {
        first.wait_for("part of the backlog", Duration::from_secs(60), || {
            request_count(&env) >= total / 4
        });
        first.signal("KILL");
    }
    second.wait_for("the whole backlog", Duration::from_secs(120), || {
        request_count(&env) == total
    });
    second.wait_for("every invitation", Duration::from_secs(60), || {
        smtp.messages().len() >= total
    });
    // A little longer: a second copy of anything would show up now.
    std::thread::sleep(Duration::from_secs(2));
    let logs = [first.log(), second.stop(), third.stop()];

    assert_eq!(request_count(&env), total, "every message once");
    // Each recipient got one mail (one Message-ID). A copy sent again with the same
    // Message-ID is the one thing a SIGKILL can cause: the relay accepted the mail and
    // the instance died before recording that (no relay lets a sender make that atomic;
    // receivers drop the copy by its Message-ID). One kill, at most one such copy.
    let sent = deliveries(&smtp);
    let mut ids: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (to, id) in &sent {
        ids.entry(to.as_str()).or_default().insert(id.as_str());
    }
    let doubled: Vec<_> = ids.iter().filter(|(_, set)| set.len() > 1).collect();
    assert!(doubled.is_empty(), "two different mails: {doubled:?}");
    assert_eq!(ids.len(), total, "everyone invited");
    let resent = sent.len() - total;
    println!("copies sent again after the SIGKILL (same Message-ID): {resent}");
    assert!(resent <= 1, "{resent} copies sent again after one kill");
    for (_, folder) in &FOLDERS {
        assert_eq!(
            imap.status(folder),
            (PER_FOLDER as u32, 0),
            "{folder} all seen"
        );
    }
    // The work was shared, and the dead instance's mailboxes were taken over.
    let working: Vec<usize> = logs
        .iter()
        .map(|l| l.matches("action=\"create_request\"").count())
        .collect();
    println!("requests created per instance (first was killed): {working:?}");
    assert!(
        working.iter().filter(|n| **n > 0).count() >= 2,
        "requests created per instance: {working:?}"
    );
    assert!(
        logs[1..]
            .iter()
            .any(|l| l.contains("took over the mailbox")),
        "no takeover:\n{}\n{}",
        logs[1],
        logs[2]
    );
}

/// An instance that freezes (SIGSTOP: a paused VM, a hung process) in the middle of a
/// batch holds its transaction open, and with it the desk's request counter. The server
/// ends such a session after `database.idle_transaction_timeout`; the instance that took
/// the mailbox over then gets the counter and finishes the backlog, and when the frozen
/// one wakes up its batch is gone with its session: nothing is lost or done twice.
#[test]
fn an_instance_frozen_mid_batch_does_not_hold_the_desk_for_ever() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client();
    let total = 2000;
    for i in 0..total {
        let raw = format!(
            "From: <f{i}@outside.example>\r\nTo: it@desk.example\r\n\
             Subject: Frozen {i}\r\nMessage-ID: <frozen-{i}@outside.example>\r\n\r\nHello.\r\n"
        );
        imap.append("INBOX", raw.as_bytes());
    }
    imap.logout();
    let env = Env::with_extra(
        Backend::Postgres,
        &Site::default(),
        &DeskSettings::default(),
        &dovecot.mailbox_toml("batch_size = 50"),
    );
    let vars = [
        ("INTAKE__DATABASE__MAILBOX_LEASE", "3s"),
        ("INTAKE__DATABASE__IDLE_TRANSACTION_TIMEOUT", "3s"),
        ("INTAKE__HTTP__LISTEN", "127.0.0.1:0"),
    ];
    let first = start_daemon_with(&env, &vars);
    first.wait_for("the first requests", Duration::from_secs(60), || {
        request_count(&env) > 0
    });
    // Stopped until it is caught inside a transaction that holds the counter.
    let db = Db::open(&env.database_url);
    let holding = "SELECT COUNT(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                   JOIN pg_stat_activity a ON a.pid = l.pid \
                   WHERE c.relname = 'desk_counters' AND a.state = 'idle in transaction'";
    let mut caught = false;
    for attempt in 0..200 {
        first.signal("STOP");
        std::thread::sleep(Duration::from_millis(50));
        if db.try_count(holding).unwrap_or(0) > 0 {
            caught = true;
            break;
        }
        first.signal("CONT");
        std::thread::sleep(Duration::from_millis(7 + (attempt * 13) % 60));
    }
    assert!(caught, "never caught holding the counter");
    let done_before = request_count(&env);
    assert!(
        done_before < total,
        "the backlog was done before the freeze"
    );
    let second = start_daemon_with(&env, &vars);
    second.wait_for("the whole backlog", Duration::from_secs(120), || {
        request_count(&env) == total
    });
    first.signal("CONT");
    std::thread::sleep(Duration::from_secs(2));
    let first_log = first.stop();
    let second_log = second.stop();
    assert!(second_log.contains("took over the mailbox"), "{second_log}");
    assert!(
        first_log.contains("idle-in-transaction"),
        "the frozen instance's session was ended by the server:\n{first_log}"
    );
    assert!(
        !first_log.contains("message by message"),
        "a session the server ended is a transient failure, not a bad message:\n{first_log}"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM requests"),
        total,
        "one request per message"
    );
    assert_eq!(
        db.count("SELECT COUNT(DISTINCT number) FROM requests"),
        total,
        "numbers handed out once"
    );
    assert_eq!(
        db.count("SELECT MAX(number) FROM requests"),
        total,
        "and without gaps"
    );
}

/// Maildir delivery: written in tmp/, renamed into new/.
fn deliver(maildir: &std::path::Path, name: &str, raw: &str) {
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    std::fs::write(maildir.join("tmp").join(name), raw).unwrap();
    std::fs::rename(
        maildir.join("tmp").join(name),
        maildir.join("new").join(name),
    )
    .unwrap();
}

/// An instance configured without mailboxes (an HTTP-only node) on the same database
/// used to count as live for the fair share: the instance with two mailboxes had a
/// share of one, gave the other back, and nobody ever took it; its mail waited for
/// ever while every status said ok.
#[test]
fn an_instance_without_mailboxes_leaves_no_mailbox_unworked() {
    let env = Env::new(
        Backend::Postgres,
        &Site::default(),
        &DeskSettings::default(),
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    // The HTTP-only node: the same configuration without its [[mailboxes]].
    let mut http_only = String::new();
    let mut in_mailbox = false;
    for line in base.lines() {
        if line.starts_with('[') {
            in_mailbox = line.trim() == "[[mailboxes]]";
        }
        if !in_mailbox {
            http_only.push_str(line);
            http_only.push('\n');
        }
    }
    assert!(!http_only.contains("kind = \"maildir\""), "{http_only}");
    let http_only_config = env.path("http-only.toml");
    std::fs::write(&http_only_config, http_only).unwrap();
    // The worker: the Maildir of every test's configuration and a second one.
    let second = env.path("second");
    let two = format!(
        "{base}\n[[mailboxes]]\nname = \"second\"\nkind = \"maildir\"\npath = \"{}\"\n\
         desk = \"IT\"\npoll_interval = \"100ms\"\n",
        second.display()
    );
    let two_config = env.path("two-mailboxes.toml");
    std::fs::write(&two_config, two).unwrap();
    let vars = [
        ("INTAKE__DATABASE__MAILBOX_LEASE", "3s"),
        ("INTAKE__HTTP__LISTEN", "127.0.0.1:0"),
    ];
    let db = Db::open(&env.database_url);
    let web = start_daemon_with_config(&env, &http_only_config, &vars);
    web.wait_for("the HTTP-only instance", Duration::from_secs(30), || {
        db.try_count("SELECT COUNT(*) FROM instances") == Some(1)
    });
    let worker = start_daemon_with_config(&env, &two_config, &vars);
    worker.wait_for("the worker", Duration::from_secs(30), || {
        worker.log().contains("intake running")
    });
    // Longer than a lease renewal (1 s), when a mailbox above the share went back.
    std::thread::sleep(Duration::from_secs(3));
    for (i, maildir) in [env.path("maildir"), second.clone()].iter().enumerate() {
        let raw = format!(
            "From: <o{i}@outside.example>\r\nTo: it@desk.example\r\nSubject: Question {i}\r\n\
             Message-ID: <http-only-{i}@outside.example>\r\n\r\nHello.\r\n"
        );
        deliver(maildir, "1.eml", &raw);
    }
    worker.wait_for("mail in both mailboxes", Duration::from_secs(15), || {
        request_count(&env) == 2
    });
    let leases: Vec<(String, Option<String>)> =
        db.all("SELECT mailbox, lease_owner FROM mailbox_state ORDER BY mailbox");
    let pid = format!(":{}:", worker.pid());
    assert!(
        leases
            .iter()
            .all(|(_, o)| o.as_deref().is_some_and(|o| o.contains(&pid))),
        "{leases:?}"
    );
    let log = worker.stop();
    web.stop();
    assert!(!log.contains("gave the mailbox"), "{log}");
}
