//! Two `intake process` runs at once on the same database: request numbers stay unique
//! and gap-free, nothing is processed twice.

use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

use crate::harness::*;

fn write_messages(dir: &std::path::Path, prefix: &str, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        let text = format!(
            "From: Sender {i} <s{i}.{prefix}@outside.example>\nTo: it@desk.example\n\
             Cc: cc{i}.{prefix}@outside.example\nSubject: {prefix} number {i}\n\
             Message-ID: <{prefix}-{i}@outside.example>\n\nHello {i}\n"
        );
        std::fs::write(dir.join(format!("{prefix}-{i:04}.eml")), text).unwrap();
    }
}

/// A desk open to anyone, whose unknown Cc's get accounts.
fn sharing_env(backend: Backend) -> Env {
    Env::new(backend, &Site::default(), &DeskSettings::sharing_any())
}

#[test]
fn concurrent_processes_share_one_database() {
    for backend in BACKENDS {
        let env = sharing_env(backend);
        let a = env.path("a");
        let b = env.path("b");
        write_messages(&a, "a", 300);
        write_messages(&b, "b", 300);
        // Both runs also see an overlap of 100 messages: processed once in total.
        for i in 0..100 {
            let name = format!("a-{i:04}.eml");
            std::fs::copy(a.join(&name), b.join(format!("overlap-{name}"))).unwrap();
        }
        let run = |dir: &std::path::Path| {
            Command::new(BIN)
                .arg("--config")
                .arg(&env.config)
                .args(["process", "--json", "--no-send"])
                .arg(dir)
                .current_dir(env.dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (pa, pb) = (run(&a), run(&b));
        for p in [pa, pb] {
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{backend:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let requests = env.json(&["requests", "list", "--json", "--limit", "1000"]);
        let mut numbers: Vec<u64> = requests
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r["key"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("IT-")
                    .parse()
                    .unwrap()
            })
            .collect();
        numbers.sort();
        assert_eq!(numbers, (1..=600).collect::<Vec<u64>>(), "{backend:?}");
        // Every Cc got exactly one account (600 senders + 600 Cc's + the directory's 5).
        let accounts = env.json(&["accounts", "list", "--json", "--limit", "5000"]);
        assert_eq!(accounts.as_array().unwrap().len(), 1205, "{backend:?}");
    }
}

/// PostgreSQL: an account another instance creates while a batch is running. The batch
/// looked the address up before (nobody), holds its own new account back until the
/// flush, and there finds the address taken: it is run again writing everything at
/// once, takes the other's account and creates nothing twice.
#[test]
fn an_account_created_meanwhile_by_another_instance_is_taken_over() {
    let env = sharing_env(Backend::Postgres);
    let dir = env.path("mail");
    write_messages(&dir, "r", 3);
    // The schema is there (the directory's accounts too).
    assert!(env.intake(&["accounts", "list"]).status.success());
    // The other instance: its account for the first sender is written but not committed.
    let mut other = Command::new("psql")
        .arg(&env.database_url)
        .args(["-v", "ON_ERROR_STOP=1", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut sql = other.stdin.take().unwrap();
    use std::io::Write;
    writeln!(
        sql,
        "BEGIN; INSERT INTO accounts (address, display_name, kind, status, origin, created_at, updated_at) \
         VALUES ('s0.r@outside.example', 'Other', 'portal_only', 'active', 'mail', 1, 1);"
    )
    .unwrap();
    sql.flush().unwrap();
    let psql = |query: &str| -> String {
        let out = Command::new("psql")
            .arg(&env.database_url)
            .args(["-tAc", query])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let start = std::time::Instant::now();
    while psql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'",
    ) != "1"
    {
        assert!(start.elapsed() < WAIT, "the other session did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = Command::new(BIN)
        .arg("--config")
        .arg(&env.config)
        .args(["process", "--no-send"])
        .arg(&dir)
        .current_dir(env.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The batch reaches the account and waits for the other's row.
    while psql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    ) == "0"
    {
        assert!(
            start.elapsed() < WAIT,
            "the batch never waited for the other's account"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    writeln!(sql, "COMMIT;").unwrap();
    drop(sql);
    assert!(other.wait().unwrap().success());
    let out = run.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("created meanwhile"),
        "the race was seen: {log}"
    );
    // Run again straight through, not message by message.
    assert!(!log.contains("message by message"), "{log}");

    let taken = psql("SELECT id FROM accounts WHERE address = 's0.r@outside.example'");
    assert_eq!(taken.lines().count(), 1, "one account: {taken}");
    assert_eq!(
        psql("SELECT display_name FROM accounts WHERE address = 's0.r@outside.example'"),
        "Other"
    );
    // Its request and participants refer to that account; the others were created once.
    assert_eq!(
        psql(
            "SELECT reporter_account_id FROM requests WHERE reporter_address = 's0.r@outside.example'"
        ),
        taken
    );
    assert_eq!(psql("SELECT count(*) FROM requests"), "3");
    assert_eq!(
        psql("SELECT count(*) FROM accounts WHERE address LIKE '%.r@outside.example'"),
        "6"
    );
    assert_eq!(
        psql(
            "SELECT count(*) FROM participants p JOIN accounts a ON a.id = p.account_id \
              WHERE a.address LIKE 'cc%.r@outside.example'"
        ),
        "3"
    );
    assert_eq!(
        psql("SELECT count(*) FROM ledger WHERE action = 'create_request'"),
        "3"
    );
}
