//! Unit tests for `src/mailbox/mod.rs`.

use super::*;

/// A seen-mode Maildir source at `dir/md` on `backend`, sweeping `cur/` at least
/// `every`, after its first (empty) pass: intake has watched it since now.
async fn watched_maildir(
    dir: &std::path::Path,
    backend: crate::testing::Backend,
    every: Duration,
) -> (
    crate::pipeline::Pipeline,
    std::path::PathBuf,
    maildir::MaildirSource,
) {
    let pipeline = crate::testing::pipeline(dir, backend).await;
    let md = dir.join("md");
    let source = seen_maildir(md.clone()).sweeping_every(every);
    source.ensure_dirs().await.unwrap();
    let running = tokio_util::sync::CancellationToken::new();
    assert_eq!(source.run_once(&pipeline, &running).await.unwrap(), 0);
    (pipeline, md, source)
}

/// A customer's message to the IT desk, its Message-ID `<TAG-I@cust.example>`.
fn customer_mail(tag: &str, i: usize) -> String {
    format!(
        "From: c{i}@cust.example\r\nTo: it@desk.example\r\nSubject: s{i}\r\n\
         Message-ID: <{tag}-{i}@cust.example>\r\n\r\nhello\r\n"
    )
}

/// A Maildir source named "mb" for desk IT at `path`, `after = "seen"`.
fn seen_maildir(path: std::path::PathBuf) -> maildir::MaildirSource {
    maildir::MaildirSource::new(
        "mb".into(),
        DeskKey::parse("IT").unwrap(),
        crate::config::MaildirConfig {
            path,
            poll_interval: Duration::from_secs(60),
            after: crate::config::After::Seen,
            quarantine_folder: "Quarantine".into(),
        },
    )
}

#[test]
fn backoff_is_capped_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // Doubling from the base up to the cap, each pause up to a quarter shorter.
    for full in [100, 200, 400, 800, 1600, 2000, 2000, 2000] {
        let full = Duration::from_millis(full);
        let pause = b.next_pause();
        assert!(
            pause <= full && pause >= full.mul_f64(0.75),
            "{pause:?} for {full:?}"
        );
    }
    b.reset();
    assert!(b.next_pause() <= Duration::from_millis(100));
    // The jitter varies: mailboxes failing together do not retry in step.
    let pauses: std::collections::HashSet<Duration> = (0..20)
        .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(2)).next_pause())
        .collect();
    assert!(pauses.len() > 1, "{pauses:?}");
}

#[tokio::test]
async fn a_file_over_the_limit_is_read_as_its_head_and_marked_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    std::fs::write(&path, vec![b'x'; 100_000]).unwrap();
    let read = |max| {
        read_envelope(
            &path,
            max,
            SourceRef {
                source: "test".into(),
                reference: "m".into(),
            },
            None,
            String::new(),
        )
    };
    let head = read(50_000).await.unwrap().unwrap();
    assert!(head.truncated);
    assert_eq!(head.size, 100_000);
    assert_eq!(head.raw.len() as u64, OVERSIZED_HEAD);
    let whole = read(100_000).await.unwrap().unwrap();
    assert!(!whole.truncated);
    assert_eq!(whole.raw.len(), 100_000);
}

#[test]
fn a_scan_keeps_the_oldest_names_and_leaves_out_hidden_skipped_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    // Written in a scrambled order: the directory's order is not the names' order.
    for i in (0..60).map(|i| (i * 37) % 60) {
        std::fs::write(dir.path().join(format!("{:04}.M{i}.host", 1000 + i)), "x").unwrap();
    }
    std::fs::write(dir.path().join(".0000.hidden"), "x").unwrap();
    std::fs::create_dir(dir.path().join("0001.a-directory")).unwrap();
    let skip: std::collections::HashSet<std::path::PathBuf> =
        [dir.path().join("1002.M2.host")].into_iter().collect();
    let names: Vec<String> = maildir::oldest_files(dir.path(), 5, &skip, |_| true)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "1000.M0.host",
            "1001.M1.host",
            "1003.M3.host",
            "1004.M4.host",
            "1005.M5.host"
        ]
    );
    let all = maildir::oldest_files(dir.path(), 1000, &skip, |_| true).unwrap();
    assert_eq!(all.len(), 59);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
}

/// A message another program (an IMAP server with a client on the folder) moved from
/// `new/` to `cur/` between our read and our acknowledgement is acknowledged where it is
/// now: a quarantined one reaches the quarantine folder the ledger names, a processed
/// one is flagged Seen, its other flags kept.
#[tokio::test]
async fn a_message_moved_to_cur_after_it_was_read_is_acknowledged_there() {
    use crate::pipeline::Outcome;
    use crate::policy::{Decision, Reason};
    let dir = tempfile::tempdir().unwrap();
    let source = seen_maildir(dir.path().to_path_buf());
    source.ensure_dirs().await.unwrap();
    let new = dir.path().join("new");
    let cur = dir.path().join("cur");
    for (name, flags) in [("1700000000.M1P1.host", "F"), ("1700000001.M2P1.host", "")] {
        std::fs::write(new.join(name), "x").unwrap();
        std::fs::rename(new.join(name), cur.join(format!("{name}:2,{flags}"))).unwrap();
    }
    let quarantined = Outcome::Quarantined {
        reason: Reason::Unparseable,
        detail: "test".into(),
        ledger_id: 1,
    };
    source
        .ack(&new.join("1700000000.M1P1.host"), &quarantined)
        .await
        .unwrap();
    assert!(
        dir.path()
            .join(".Quarantine/cur/1700000000.M1P1.host:2,")
            .exists()
    );
    let processed = Outcome::Duplicate {
        decision: Box::new(Decision::ignored(Reason::DuplicateMessage, "test")),
    };
    source
        .ack(&new.join("1700000001.M2P1.host"), &processed)
        .await
        .unwrap();
    assert!(cur.join("1700000001.M2P1.host:2,S").exists());
    // Gone altogether: the error stands.
    let gone = source
        .ack(&new.join("1700000002.M3P1.host"), &processed)
        .await;
    assert_eq!(gone.unwrap_err().kind(), std::io::ErrorKind::NotFound);
}

/// What a sweep of `cur/` found but did not get to (the lease given up, a shutdown) is
/// swept again by the next pass: the window did not move past it.
#[tokio::test]
async fn a_sweep_cut_short_leaves_its_window_for_the_next_pass() {
    for backend in crate::testing::BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let (pipeline, md, source) =
            watched_maildir(dir.path(), backend, Duration::from_secs(60)).await;
        let running = tokio_util::sync::CancellationToken::new();
        // Another program moved two new messages into cur/ before we read them.
        let t = crate::now() + 5;
        for i in 0..2 {
            std::fs::write(
                md.join("cur").join(format!("{t}.M{i}P1.host:2,")),
                customer_mail("cut", i),
            )
            .unwrap();
        }
        let stopped = tokio_util::sync::CancellationToken::new();
        stopped.cancel();
        assert_eq!(source.run_once(&pipeline, &stopped).await.unwrap(), 0);
        assert_eq!(source.run_once(&pipeline, &running).await.unwrap(), 2);
    }
}

/// A message listed in `new/` that another program moved to `cur/` before we read it is
/// taken from there by the next pass, though it was delivered before intake first
/// watched the mailbox (mail waiting at the first start), which a sweep leaves alone.
#[tokio::test]
async fn a_message_moved_away_before_it_was_read_is_taken_from_cur() {
    for backend in crate::testing::BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let (pipeline, md, source) =
            watched_maildir(dir.path(), backend, Duration::from_secs(60)).await;
        let running = tokio_util::sync::CancellationToken::new();
        // Two messages from before the first start, now in cur/: one was listed in new/
        // and vanished, the other was never ours to see.
        let old = crate::now() - 3600;
        for i in 0..2 {
            std::fs::write(
                md.join("cur").join(format!("{old}.M{i}P1.host:2,")),
                customer_mail("moved", i),
            )
            .unwrap();
        }
        assert_eq!(source.run_once(&pipeline, &running).await.unwrap(), 0);
        source.note_vanished(&md.join("new").join(format!("{old}.M0P1.host")));
        // And one that is not in cur/ either (deleted): forgotten by the sweep.
        source.note_vanished(&md.join("new").join(format!("{old}.M7P1.host")));
        assert_eq!(source.looked_for().len(), 2);
        assert_eq!(source.run_once(&pipeline, &running).await.unwrap(), 1);
        assert!(source.looked_for().is_empty(), "{:?}", source.looked_for());
        assert!(md.join("cur").join(format!("{old}.M0P1.host:2,S")).exists());
        assert!(md.join("cur").join(format!("{old}.M1P1.host:2,")).exists());
        // Handed over: not looked for again.
        assert_eq!(source.run_once(&pipeline, &running).await.unwrap(), 0);
    }
}

/// Under a steady inflow `new/` is never found empty: the pass still ends once a sweep is
/// due, so what another program moved to `cur/` meanwhile is not left for good.
#[tokio::test]
async fn a_steady_inflow_does_not_keep_cur_from_being_swept() {
    for backend in crate::testing::BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let (pipeline, md, source) =
            watched_maildir(dir.path(), backend, Duration::from_millis(300)).await;
        let running = tokio_util::sync::CancellationToken::new();
        let mail = |i: usize| customer_mail("inflow", i);
        // A feeder drops 20 messages into new/ every 2 ms, faster than they are processed,
        // until told to stop: new/ is never found empty (500 are there before the first
        // pass looks, whenever the feeder task gets to run).
        let write = |i: usize| {
            let name = format!("{}.M{i}P2.host", crate::now());
            std::fs::write(md.join("new").join(&name), mail(i)).unwrap();
        };
        (0..500).for_each(write);
        let stop = tokio_util::sync::CancellationToken::new();
        let feeder = {
            let (new, stop) = (md.join("new"), stop.clone());
            tokio::spawn(async move {
                let mut i = 500;
                while !stop.is_cancelled() {
                    for _ in 0..20 {
                        let name = format!("{}.M{i}P2.host", crate::now());
                        std::fs::write(new.join(&name), mail(i)).unwrap();
                        i += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        // Another program moves a message to cur/ while the pass is under way.
        let moved = md
            .join("cur")
            .join(format!("{}.M99999P3.host:2,", crate::now() + 1));
        let mover = {
            let (moved, text) = (moved.clone(), mail(99_999));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::fs::write(&moved, text).unwrap();
            })
        };
        let pass = || {
            tokio::time::timeout(
                Duration::from_secs(20),
                source.run_once(&pipeline, &running),
            )
        };
        let first = pass().await;
        mover.await.unwrap();
        let second = pass().await;
        stop.cancel();
        feeder.await.unwrap();
        let never = "the pass never ended while mail kept coming";
        assert!(first.expect(never).unwrap() > 0);
        assert!(second.expect(never).unwrap() > 0);
        // The message moved to cur/ was processed (flagged seen there).
        assert!(!moved.exists());
        let seen = md
            .join("cur")
            .join(format!("{}S", moved.file_name().unwrap().to_string_lossy()));
        assert!(seen.exists(), "{}", seen.display());
    }
}
