//! Unit tests for `src/config.rs`.

use super::*;
use std::io::Write;

fn write(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let f = write(text);
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::load_with_env(&ConfigSource::File(f.path().to_path_buf()), Some(env))
}

const MINIMAL: &str = r#"
[trust]
require_authentication = false
[[desks]]
key = "IT"
addresses = ["it@desk.example"]
"#;

#[test]
fn embedded_defaults_are_valid() {
    let c = Config::load_with_env(&ConfigSource::Embedded, Some(HashMap::new())).unwrap();
    assert!(c.database.is_sqlite());
    assert!(!c.policy.desks.is_empty());
    assert!(!c.mailboxes.is_empty());
}

#[test]
fn minimal_config_gets_safe_defaults() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.policy.access.signup, Signup::Verify);
    let d = &c.policy.desks[0];
    assert_eq!(d.sharing, Sharing::Organization);
    assert_eq!(d.unknown_participants, UnknownParticipants::Drop);
    assert!(!d.agents_may_add_customers);
    assert_eq!(c.outbox.message_id_domain, "intake.desk.example");
    assert_eq!(c.desk_from[&d.key].as_str(), "it@desk.example");
}

#[test]
fn every_problem_is_reported_with_key_and_file() {
    let text = r#"
[customer_access]
signup = "maybe"
approved_domains = ["good.example", "bad domain"]
colour = "blue"
[[desks]]
key = "IT"
addresses = ["it@desk.example"]
sharing = "everyone"
[[desks]]
key = "HR"
addresses = ["IT@desk.example"]
[[mailboxes]]
name = "inbox"
kind = "maildir"
path = "x"
desk = "NOPE"
"#;
    let f = write(text);
    let err = Config::load_with_env(
        &ConfigSource::File(f.path().to_path_buf()),
        Some(HashMap::new()),
    )
    .unwrap_err();
    let ConfigError::Invalid(issues) = err else {
        panic!("{err}")
    };
    let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
    for expected in [
        "customer_access.colour",
        "customer_access.signup",
        "customer_access.approved_domains[1]",
        "desks[0].sharing",
        "desks[1].addresses[0]",
        "mailboxes[0].desk",
        "trust.require_authentication",
    ] {
        assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
    }
    let path = f.path().display().to_string();
    assert!(issues.iter().all(|i| i.origin == path), "{issues:?}");
    assert!(
        issues
            .iter()
            .any(|i| i.message.contains("already an address of desk IT"))
    );
}

#[test]
fn environment_overrides_and_is_named_as_origin() {
    let c = load(
        MINIMAL,
        &[
            ("INTAKE__CUSTOMER_ACCESS__SIGNUP", "open"),
            (
                "INTAKE__CUSTOMER_ACCESS__APPROVED_DOMAINS",
                "a.example,b.example",
            ),
        ],
    )
    .unwrap();
    assert_eq!(c.policy.access.signup, Signup::Open);
    assert_eq!(c.policy.access.approved_domains.len(), 2);
    let err = load(MINIMAL, &[("INTAKE__CUSTOMER_ACCESS__SIGNUP", "sometimes")]).unwrap_err();
    let ConfigError::Invalid(issues) = err else {
        panic!()
    };
    assert_eq!(issues[0].origin, "the environment");
    assert_eq!(issues[0].key, "customer_access.signup");
}

#[test]
fn secrets_come_from_files() {
    let mut secret = tempfile::NamedTempFile::new().unwrap();
    writeln!(secret, "postgres://intake:s3cret@db.example/intake").unwrap();
    let text = format!(
        "[database]\nurl_file = {:?}\n{MINIMAL}",
        secret.path().display().to_string()
    );
    let c = load(&text, &[]).unwrap();
    assert!(!c.database.is_sqlite());
    assert_eq!(
        c.database.redacted_url(),
        "postgres://intake:***@db.example/intake"
    );
    assert!(!format!("{c:?}").contains("s3cret"));
    let missing = format!("[database]\nurl_file = \"/nonexistent/x\"\n{MINIMAL}");
    let ConfigError::Invalid(issues) = load(&missing, &[]).unwrap_err() else {
        panic!()
    };
    assert_eq!(issues[0].key, "database.url_file");
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("72h"), Some(Duration::from_secs(259200)));
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("5 m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("soon"), None);
    assert_eq!(parse_size("25MB"), Some(25 * 1024 * 1024));
    assert_eq!(parse_size("12"), Some(12));
    assert_eq!(parse_size("1T"), None);
}

#[test]
fn type_errors_name_the_key() {
    let err = load(
        "[customer_access]\nportal_only_accounts = \"perhaps\"\n",
        &[],
    )
    .unwrap_err();
    let ConfigError::Invalid(issues) = err else {
        panic!()
    };
    assert_eq!(issues[0].key, "customer_access.portal_only_accounts");
}

#[test]
fn imap_folders_that_would_loop_are_refused() {
    let text = format!(
        r#"{MINIMAL}
[[mailboxes]]
name = "support:desk"
kind = "imap"
desk = "IT"
host = "127.0.0.1"
tls = "none"
username = "u"
password = "p"
folder = "INBOX"
after = "move:inbox"
quarantine_folder = "INBOX"
"#
    );
    let Err(ConfigError::Invalid(issues)) = load(&text, &[]) else {
        panic!("accepted")
    };
    let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
    for expected in [
        "mailboxes[0].name",
        "mailboxes[0].after",
        "mailboxes[0].quarantine_folder",
    ] {
        assert!(keys.contains(&expected), "missing {expected} in {issues:?}");
    }
}

#[test]
fn imap_timeouts_are_read_and_a_reply_timeout_under_a_second_refused() {
    let mailbox = |extra: &str| {
        format!(
            r#"{MINIMAL}
[[mailboxes]]
name = "support"
kind = "imap"
desk = "IT"
host = "127.0.0.1"
tls = "none"
username = "u"
password = "p"
{extra}
"#
        )
    };
    // Each timeout: its default, a value read, and values refused with the key named.
    // IDLE is re-issued every idle_timeout, never 29 minutes or more (RFC 2177: a server
    // may end an IDLE after 29 minutes of inactivity).
    struct Case {
        key: &'static str,
        read: fn(&ImapConfig) -> Duration,
        default: u64,
        given: (&'static str, u64),
        refused: &'static [&'static str],
    }
    let cases = [
        Case {
            key: "reply_timeout",
            read: |i| i.reply_timeout,
            default: 120,
            given: ("45s", 45),
            refused: &["0s"],
        },
        Case {
            key: "idle_timeout",
            read: |i| i.idle_timeout,
            default: 25 * 60,
            given: ("10m", 600),
            refused: &["29m", "1h", "0s"],
        },
        Case {
            key: "unfetchable_after",
            read: |i| i.unfetchable_after,
            default: 600,
            given: ("1h", 3600),
            refused: &["0s", "30d"],
        },
    ];
    for Case {
        key,
        read,
        default,
        given: (given, secs),
        refused,
    } in cases
    {
        let value =
            |extra: &str| match load(&mailbox(extra), &[]).map(|c| c.mailboxes[0].kind.clone()) {
                Ok(MailboxKind::Imap(imap)) => read(&imap),
                other => panic!("{key}: {other:?}"),
            };
        assert_eq!(value(""), Duration::from_secs(default), "{key}");
        assert_eq!(
            value(&format!("{key} = \"{given}\"")),
            Duration::from_secs(secs)
        );
        for bad in refused {
            let Err(ConfigError::Invalid(issues)) =
                load(&mailbox(&format!("{key} = \"{bad}\"")), &[])
            else {
                panic!("{key} = {bad} accepted")
            };
            assert_eq!(issues[0].key, format!("mailboxes[0].{key}"));
        }
    }
}

/// No TLS sends the password in clear: only to a loopback address, or when the admin
/// says so with `allow_plaintext`.
#[test]
fn imap_without_tls_only_on_loopback_or_when_allowed() {
    let mailbox = |host: &str, extra: &str| {
        format!(
            r#"{MINIMAL}
[[mailboxes]]
name = "support"
kind = "imap"
desk = "IT"
host = "{host}"
tls = "none"
username = "u"
password = "p"
{extra}
"#
        )
    };
    for host in ["127.0.0.1", "localhost", "::1", "127.0.0.2"] {
        assert!(load(&mailbox(host, ""), &[]).is_ok(), "{host}");
    }
    for host in ["imap.example.com", "192.0.2.1", "10.0.0.5"] {
        let Err(ConfigError::Invalid(issues)) = load(&mailbox(host, ""), &[]) else {
            panic!("tls = none to {host} accepted")
        };
        assert_eq!(issues[0].key, "mailboxes[0].tls");
        assert!(issues[0].message.contains(host), "{issues:?}");
        assert!(load(&mailbox(host, "allow_plaintext = true"), &[]).is_ok());
    }
}

#[test]
fn idle_transaction_timeout_defaults_to_a_minute_and_is_bounded() {
    let config = load(MINIMAL, &[]).unwrap();
    assert_eq!(
        config.database.idle_transaction_timeout,
        Duration::from_secs(60)
    );
    let text = format!("[database]\nidle_transaction_timeout = \"5s\"\n{MINIMAL}");
    let config = load(&text, &[]).unwrap();
    assert_eq!(
        config.database.idle_transaction_timeout,
        Duration::from_secs(5)
    );
    let text = format!("[database]\nidle_transaction_timeout = \"500ms\"\n{MINIMAL}");
    let Err(ConfigError::Invalid(issues)) = load(&text, &[]) else {
        panic!("accepted")
    };
    assert_eq!(issues[0].key, "database.idle_transaction_timeout");
}

/// Sent mail is kept 90 days unless told otherwise; "forever" keeps it; less than a
/// week is refused (bounces are matched to sent mail), naming the key.
#[test]
fn keep_sent_defaults_to_90_days_and_refuses_less_than_a_week() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.outbox.keep_sent, Some(DEFAULT_KEEP_SENT));
    let c = load(
        &format!("{MINIMAL}\n[outbox]\nkeep_sent = \"forever\"\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.outbox.keep_sent, None);
    let c = load(&format!("{MINIMAL}\n[outbox]\nkeep_sent = \"14d\"\n"), &[]).unwrap();
    assert_eq!(c.outbox.keep_sent, Some(Duration::from_secs(14 * 86_400)));
    for bad in ["1d", "soon"] {
        let e = load(
            &format!("{MINIMAL}\n[outbox]\nkeep_sent = \"{bad}\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("outbox.keep_sent"), "{bad}: {e}");
    }
}

/// Two mailboxes reading one folder would both take (move, flag, delete) every message:
/// refused, naming the second and the first. The same server with another folder or
/// user, or another Maildir, is fine.
#[test]
fn two_mailboxes_on_one_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("md");
    std::fs::create_dir_all(&md).unwrap();
    let maildir = |name: &str, path: &str| {
        format!(
            "[[mailboxes]]\nname = \"{name}\"\nkind = \"maildir\"\ndesk = \"IT\"\npath = \"{path}\"\n"
        )
    };
    let imap = |name: &str, host: &str, user: &str, folder: &str| {
        format!(
            "[[mailboxes]]\nname = \"{name}\"\nkind = \"imap\"\ndesk = \"IT\"\nhost = \"{host}\"\n\
             tls = \"none\"\nusername = \"{user}\"\npassword = \"p\"\nfolder = \"{folder}\"\n"
        )
    };
    let refused = |mailboxes: String| {
        let Err(ConfigError::Invalid(issues)) = load(&format!("{MINIMAL}{mailboxes}"), &[]) else {
            panic!("accepted:\n{mailboxes}")
        };
        issues
    };
    // The same directory, spelled another way.
    let issues = refused(
        maildir("a", &md.display().to_string())
            + &maildir("b", &format!("{}/./md/", dir.path().display())),
    );
    assert_eq!(issues[0].key, "mailboxes[1].path");
    assert!(issues[0].message.contains("\"a\""), "{issues:?}");
    // INBOX in any case, the host in any case.
    let issues =
        refused(imap("a", "127.0.0.1", "desk", "INBOX") + &imap("b", "127.0.0.1", "desk", "inbox"));
    assert_eq!(issues[0].key, "mailboxes[1].folder");
    let issues = refused(
        imap("a", "localhost", "desk", "Support") + &imap("b", "LOCALHOST", "desk", "Support"),
    );
    assert_eq!(issues[0].key, "mailboxes[1].folder");
    // A path not there yet, spelled two ways.
    let issues = refused(
        maildir("a", &dir.path().join("later").display().to_string())
            + &maildir("b", &format!("{}/./later/", dir.path().display())),
    );
    assert_eq!(issues[0].key, "mailboxes[1].path");
    // One reads where the other files its processed or quarantined mail.
    let issues = refused(
        imap("a", "127.0.0.1", "desk", "INBOX") + &imap("b", "127.0.0.1", "Desk", "Quarantine"),
    );
    assert!(
        issues.iter().any(|i| i.key == "mailboxes[1].folder"),
        "{issues:?}"
    );
    let issues = refused(
        imap("a", "127.0.0.1", "desk", "Processed")
            + &imap("b", "127.0.0.1", "desk", "INBOX").replace(
                "folder = \"INBOX\"",
                "folder = \"INBOX\"\nafter = \"move:Processed\"",
            ),
    );
    assert_eq!(issues[0].key, "mailboxes[1].after");
    let issues = refused(
        maildir("a", &md.display().to_string())
            + &maildir("b", &md.join(".Quarantine").display().to_string()),
    );
    assert_eq!(issues[0].key, "mailboxes[1].path");
    // Through a symlink, before the quarantine folder exists.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&md, &link).unwrap();
    let issues = refused(
        maildir("a", &link.display().to_string())
            .replace("path =", "quarantine_folder = \"Held\"\npath =")
            + &maildir("b", &md.join(".Held").display().to_string()),
    );
    assert_eq!(issues[0].key, "mailboxes[1].path");
    let fine = maildir("a", &md.display().to_string())
        + &maildir("b", &dir.path().join("other").display().to_string())
        + &imap("c", "127.0.0.1", "desk", "INBOX")
        + &imap("d", "127.0.0.1", "desk", "Support")
        + &imap("e", "127.0.0.1", "other", "INBOX");
    load(&format!("{MINIMAL}{fine}"), &[]).unwrap();
}
