//! Unit tests for `src/mailbox/lease.rs`.

use super::*;

#[test]
fn fair_share_and_surplus() {
    let board = Board::new("a".into(), Duration::from_secs(30), 3);
    assert_eq!(board.fair_share(), 3);
    board.held.store(3, Ordering::SeqCst);
    assert!(!board.claim_surplus(), "alone it keeps all three");
    board.live.store(2, Ordering::SeqCst);
    assert_eq!(board.fair_share(), 2);
    assert!(board.claim_surplus(), "with two instances one goes back");
    assert_eq!(board.held.load(Ordering::SeqCst), 2);
    assert!(!board.claim_surplus());
    board.live.store(3, Ordering::SeqCst);
    assert!(board.claim_surplus());
    assert!(!board.claim_surplus());
    assert_eq!(board.held.load(Ordering::SeqCst), 1);
    board.live.store(10, Ordering::SeqCst);
    assert_eq!(board.fair_share(), 1, "never less than one");
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
    // Another machine, or no tag: never taken early.
    assert!(!gone_from_here(&format!(
        "{host}:{}:abcdef/000000000000",
        child.id()
    )));
    assert!(!gone_from_here(&format!("{host}:{}:abcdef", child.id())));
    assert!(!gone_from_here("garbage"));
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
