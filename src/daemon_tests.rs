//! Unit tests for `src/daemon.rs`.

use super::*;
use crate::testing::{BACKENDS, store};

/// A connection still in use (a batch blocked on a row lock after the shutdown
/// deadline) must not keep the process from exiting.
#[tokio::test]
async fn closing_the_store_does_not_wait_for_a_connection_in_use() {
    for backend in BACKENDS {
        eprintln!("on {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), backend).await;
        let busy = store.acquire().await.unwrap();
        let closed = tokio::time::timeout(
            Duration::from_secs(5),
            close_store(&store, Duration::from_millis(200)),
        )
        .await;
        drop(busy);
        assert!(closed.is_ok(), "close waited for the connection in use");
    }
}

/// A mailbox task that panics is noticed: it counts as died (the supervisor stops the
/// daemon so systemd restarts it) and its mailbox is not ok.
#[tokio::test]
async fn a_panicking_task_is_recorded_as_died() {
    let tracker = TaskTracker::new();
    let died: Died = Arc::default();
    let shutdown = CancellationToken::new();
    let health = crate::health::Health::default();
    health.ok("support");
    supervised(
        &tracker,
        &died,
        &shutdown,
        "mailbox support".into(),
        Some((health.clone(), "support".into())),
        async { panic!("bad state") },
    );
    // One that stops on shutdown, as it should, is not recorded.
    let token = shutdown.child_token();
    supervised(
        &tracker,
        &died,
        &shutdown,
        "outbox".into(),
        None,
        async move { token.cancelled().await },
    );
    tracker.close();
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .unwrap();
    assert_eq!(*died.lock().unwrap(), ["mailbox support"]);
    let support = &health.snapshot()["support"];
    assert!(!support.ok);
    assert_eq!(
        support.last_error.as_deref(),
        Some("the mailbox task panicked: bad state")
    );
}
