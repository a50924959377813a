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
