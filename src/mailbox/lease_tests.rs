//! Unit tests for `src/mailbox/lease.rs`.

use super::*;
use crate::testing::{BACKENDS, pipeline};

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn live(holder: &str, mailboxes: Option<&[&str]>, held: usize) -> LiveInstance {
    LiveInstance {
        holder: holder.into(),
        mailboxes: mailboxes.map(names),
        held,
    }
}

#[test]
fn fair_share_and_surplus() {
    let board = Board::new("a".into(), Duration::from_secs(30), names(&["x", "y", "z"]));
    let all: &[&str] = &["x", "y", "z"];
    assert!(board.update(&[live("a", Some(all), 0)], &[]).is_none());
    assert_eq!(board.shares().share, 3);
    board.shares().held = 3;
    assert!(!board.claim_surplus("x"), "alone it keeps all three");
    board.update(&[live("a", Some(all), 3), live("b", Some(all), 0)], &[]);
    assert_eq!(board.shares().share, 2);
    assert!(board.claim_surplus("x"), "with two instances one goes back");
    assert_eq!(board.shares().held, 2);
    assert!(!board.claim_surplus("y"));
    board.update(
        &[
            live("a", Some(all), 2),
            live("b", Some(all), 1),
            live("c", Some(all), 0),
        ],
        &[],
    );
    assert!(board.claim_surplus("y"));
    assert!(!board.claim_surplus("z"));
    assert_eq!(board.shares().held, 1);
    let many: Vec<LiveInstance> = (0..10)
        .map(|i| live(&format!("i{i}"), Some(all), 0))
        .chain([live("a", Some(all), 1)])
        .collect();
    board.update(&many, &[]);
    assert_eq!(board.shares().share, 1, "never less than one");
}

/// An instance counts toward the share only of the mailboxes it is configured for.
#[test]
fn shares_count_only_instances_that_can_take_the_mailbox() {
    let two: &[&str] = &["m1", "m2"];
    let share = |mine: &[&str], live: &[LiveInstance]| plan("a", &names(mine), live, &[]).0;
    // An HTTP-only instance (no mailboxes) takes nothing: "a" keeps both.
    assert_eq!(
        share(two, &[live("a", Some(two), 0), live("w", Some(&[]), 0)]),
        2
    );
    // The same list everywhere: ceil(mailboxes / instances), as before.
    let four: &[&str] = &["m1", "m2", "m3", "m4"];
    let same: Vec<LiveInstance> = ["a", "b", "c"]
        .iter()
        .map(|h| live(h, Some(four), 0))
        .collect();
    assert_eq!(share(four, &same), 2);
    let three: &[&str] = &["m1", "m2", "m3"];
    let same: Vec<LiveInstance> = ["a", "b", "c"]
        .iter()
        .map(|h| live(h, Some(three), 0))
        .collect();
    assert_eq!(share(three, &same), 1, "3 × 1/3 is not rounded up to 2");
    // A rolling restart: "b" still runs the old list without m3. "a" takes m3 and
    // half of the rest; "b" has room for one.
    let (a_share, peers) = plan(
        "a",
        &names(&["m1", "m2", "m3"]),
        &[
            live("a", Some(&["m1", "m2", "m3"]), 0),
            live("b", Some(two), 0),
        ],
        &[],
    );
    assert_eq!(a_share, 2);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].room, 1);
    // The same seen from "b": "a" has room for two (m3 is its alone).
    let (b_share, peers) = plan(
        "b",
        &names(two),
        &[
            live("a", Some(&["m1", "m2", "m3"]), 0),
            live("b", Some(two), 0),
        ],
        &[],
    );
    assert_eq!(b_share, 1);
    assert_eq!(peers[0].room, 2);
    // An older version that did not say counts for every mailbox, as it counts itself,
    // but is never handed one: its room is unknown.
    let (a_share, peers) = plan("a", &names(two), &[live("b", None, 0)], &[]);
    assert_eq!(a_share, 1);
    assert_eq!(peers[0].room, 0);
}

/// A mailbox goes back only to an instance that is configured for it and has room.
#[test]
fn surplus_goes_only_where_it_is_taken() {
    let board = Board::new(
        "a".into(),
        Duration::from_secs(30),
        names(&["m1", "m2", "m3"]),
    );
    board.update(
        &[
            live("a", Some(&["m1", "m2", "m3"]), 3),
            live("b", Some(&["m1"]), 0),
            live("w", Some(&[]), 0),
        ],
        &[],
    );
    // "a": 1/2 + 1 + 1 → 3; no surplus.
    assert_eq!(board.shares().share, 3);
    board.shares().held = 3;
    assert!(!board.claim_surplus("m1"));
    board.update(
        &[
            live("a", Some(&["m1", "m2", "m3"]), 3),
            live("b", Some(&["m1", "m2"]), 0),
            live("c", Some(&["m1", "m2"]), 1),
        ],
        &[],
    );
    // "a": 1/3 + 1/3 + 1 → 2, one too many; "b" has room for one (1/3 + 1/3 → 1), "c"
    // none. Only m1 or m2 can go, and only once.
    assert_eq!(board.shares().share, 2);
    assert!(!board.claim_surplus("m3"), "nobody else can take m3");
    assert!(board.claim_surplus("m2"));
    assert!(!board.claim_surplus("m1"), "at its share now");
    board.shares().held = 4;
    assert!(!board.claim_surplus("m1"), "b's room was used by m2");
}

/// The heartbeat after a give-back still counts the peer's leases without the mailbox it
/// was given (it has not taken it yet): that mailbox, unheld, fills the peer's room, so
/// a second one does not go where only one will be taken.
#[test]
fn a_mailbox_given_back_and_not_yet_taken_fills_the_peers_room() {
    let all: &[&str] = &["m1", "m2", "m3", "m4"];
    let board = Board::new("a".into(), Duration::from_secs(30), names(all));
    let beat = [live("a", Some(all), 4), live("b", Some(all), 1)];
    // Two instances: a share of two each. "a" holds four, "b" one: room for one.
    board.update(&beat, &[]);
    board.shares().held = 4;
    assert!(board.claim_surplus("m1"));
    assert!(!board.claim_surplus("m2"), "b's room is used");
    // The next heartbeat: "a" holds three, "b" still one, m1 is unheld.
    board.update(
        &[live("a", Some(all), 3), live("b", Some(all), 1)],
        &names(&["m1"]),
    );
    assert!(!board.claim_surplus("m2"), "m1 is on its way to b");
    // Once "b" took it, "a" (three, share two) gives nothing more: b is at its share.
    board.update(&[live("a", Some(all), 3), live("b", Some(all), 2)], &[]);
    assert!(!board.claim_surplus("m2"));
    // An unheld mailbox "b" is not configured for takes none of its room.
    let board = Board::new("a".into(), Duration::from_secs(30), names(all));
    board.update(
        &[
            live("a", Some(all), 4),
            live("b", Some(&["m1", "m2", "m3", "m4"]), 1),
        ],
        &names(&["elsewhere"]),
    );
    board.shares().held = 4;
    assert!(board.claim_surplus("m1"));
}

#[test]
fn instance_ids_differ() {
    assert_ne!(instance_id(), instance_id());
    assert!(instance_id().contains(&std::process::id().to_string()));
}

#[test]
fn gone_holders_here_and_elsewhere() {
    let me = instance_id();
    assert!(me.contains('/'), "carries a machine tag: {me}");
    let (name, tag) = me.rsplit_once('/').unwrap();
    // This very process (another holder name with its pid) is a predecessor.
    let (host, _) = name.split_once(':').unwrap();
    let pid = std::process::id();
    assert!(gone_from_here(&format!("{host}:{pid}:abcdef/{tag}")));
    // A live process that is not intake (pid 1 here is never the test binary) and one
    // that is: the first is not the holder, so gone; the second is alive.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let sleeping = format!("{host}:{}:abcdef/{tag}", child.id());
    assert!(gone_from_here(&sleeping), "a pid that is another program");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(gone_from_here(&sleeping), "a pid that has exited");
    // The same tag under another host name (a cloned machine sharing the machine id):
    // not judged here.
    assert!(!gone_from_here(&format!(
        "{host}-clone:{}:abcdef/{tag}",
        child.id()
    )));
    // Another machine, or no tag: never taken early.
    assert!(!gone_from_here(&format!(
        "{host}:{}:abcdef/000000000000",
        child.id()
    )));
    assert!(!gone_from_here(&format!("{host}:{}:abcdef", child.id())));
    assert!(!gone_from_here("garbage"));
    // Another user's process on this machine: under ProtectProc=invisible it is not in
    // /proc even while it runs, so it is never judged gone.
    let other = machine_tag_as(own_uid().unwrap() + 1).unwrap();
    assert_ne!(other, tag);
    assert!(!gone_from_here(&format!(
        "{host}:{}:abcdef/{other}",
        child.id()
    )));
}

#[test]
fn a_live_process_of_the_same_program_is_not_gone() {
    // `sleep` under this program's name: to /proc it looks like another instance.
    let own = std::fs::read_to_string("/proc/self/comm").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let twin = dir.path().join(own.trim());
    std::fs::copy("/usr/bin/sleep", &twin).unwrap();
    let mut child = std::process::Command::new(&twin).arg("30").spawn().unwrap();
    let me = instance_id();
    let (name, tag) = me.rsplit_once('/').unwrap();
    let (host, _) = name.split_once(':').unwrap();
    let holder = format!("{host}:{}:abcdef/{tag}", child.id());
    let alive = !gone_from_here(&holder);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(alive, "a running instance is not gone");
    assert!(gone_from_here(&holder), "and is once it exited");
}

/// Which mailboxes are being worked, and how many turns each had.
#[derive(Default)]
struct Worked {
    now: std::collections::BTreeSet<String>,
    turns: std::collections::BTreeMap<String, usize>,
}

type Shared = Arc<std::sync::Mutex<Worked>>;

/// Runs `mailboxes` under `board` with a source that records its turns.
fn work(
    pipeline: &Pipeline,
    board: &Arc<Board>,
    mailboxes: &[&str],
    shutdown: &CancellationToken,
    worked: &Shared,
) -> Vec<tokio::task::JoinHandle<()>> {
    mailboxes
        .iter()
        .map(|mb| {
            let (pipeline, board, shutdown, worked) = (
                pipeline.clone(),
                board.clone(),
                shutdown.clone(),
                worked.clone(),
            );
            let mb = mb.to_string();
            tokio::spawn(async move {
                run_leased(pipeline, mb.clone(), board, shutdown, move |_, token| {
                    let (worked, mb) = (worked.clone(), mb.clone());
                    async move {
                        {
                            let mut w = worked.lock().unwrap();
                            w.now.insert(mb.clone());
                            *w.turns.entry(mb.clone()).or_default() += 1;
                        }
                        token.cancelled().await;
                        worked.lock().unwrap().now.remove(&mb);
                    }
                })
                .await
            })
        })
        .collect()
}

/// An instance with no mailboxes (HTTP only) on the same database used to count as
/// live and halve the others' fair share: one of two mailboxes was never worked.
#[tokio::test]
async fn an_instance_without_mailboxes_does_not_starve_one() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path(), backend).await;
        let ttl = Duration::from_secs(1);
        let http_only = Board::new("w".into(), ttl, Vec::new());
        beat(pipeline.store(), &http_only).await;
        let board = Arc::new(Board::new("a".into(), ttl, names(&["m1", "m2"])));
        beat(pipeline.store(), &board).await;
        let shutdown = CancellationToken::new();
        let worked = Shared::default();
        let tasks = work(&pipeline, &board, &["m1", "m2"], &shutdown, &worked);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            beat(pipeline.store(), &http_only).await;
            beat(pipeline.store(), &board).await;
        }
        let now = worked.lock().unwrap().now.clone();
        shutdown.cancel();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(now.len(), 2, "worked: {now:?}");
    }
}

/// Another instance is configured for both mailboxes and, by the shares, has room for
/// one, but never takes it (its task failing). The mailbox nobody holds is taken above
/// the share after a lease time, and the turns settle: nothing is handed back and forth.
#[tokio::test]
async fn a_mailbox_nobody_takes_is_taken_above_the_share_and_kept() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path(), backend).await;
        let ttl = Duration::from_secs(1);
        let idle = Board::new("p".into(), ttl, names(&["m1", "m2"]));
        beat(pipeline.store(), &idle).await;
        let board = Arc::new(Board::new("a".into(), ttl, names(&["m1", "m2"])));
        beat(pipeline.store(), &board).await;
        assert_eq!(board.shares().share, 1);
        let shutdown = CancellationToken::new();
        let worked = Shared::default();
        let tasks = work(&pipeline, &board, &["m1", "m2"], &shutdown, &worked);
        // Taken at once: one mailbox within the share. After a lease time the other, above
        // it; one of the two then goes back to the idle instance, which does not take it,
        // and is taken again a lease time later, for good (about 3.5 s in all).
        let mut settled = None;
        for round in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            beat(pipeline.store(), &idle).await;
            beat(pipeline.store(), &board).await;
            if round == 19 {
                settled = Some(worked.lock().unwrap().turns.clone());
            }
        }
        let (now, turns) = {
            let w = worked.lock().unwrap();
            (w.now.clone(), w.turns.clone())
        };
        shutdown.cancel();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(now.len(), 2, "worked: {now:?}");
        assert_eq!(settled, Some(turns.clone()), "no turns in the last 3 s");
        assert!(turns.values().all(|n| *n <= 2), "turns: {turns:?}");
    }
}
