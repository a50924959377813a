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
