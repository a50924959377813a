//! Unit tests for `src/mailbox/mod.rs`.

use super::*;

#[test]
fn backoff_is_capped_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let first = b.next_pause();
    assert!(first <= Duration::from_millis(100) && first >= Duration::from_millis(75));
    for _ in 0..10 {
        assert!(b.next_pause() <= Duration::from_secs(2));
    }
    b.reset();
    assert!(b.next_pause() <= Duration::from_millis(100));
}
