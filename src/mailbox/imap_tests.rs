//! Unit tests for `src/mailbox/imap.rs`.

use super::*;

#[test]
fn uid_sets_are_compact() {
    assert_eq!(uid_set(&[5, 1, 2, 3, 9, 7, 8, 3]), "1:3,5,7:9");
    assert_eq!(uid_set(&[42]), "42");
    assert_eq!(uid_set(&[]), "");
    // The largest UID there is ends a run without overflowing.
    assert_eq!(uid_set(&[u32::MAX, u32::MAX - 1]), "4294967294:4294967295");
    assert_eq!(uid_set(&[u32::MAX, 1]), "1,4294967295");
}

/// Scattered UIDs (every other one of 5,000 at batch_size 5000) are named in several
/// commands of at most 4,000 bytes of set each; a run of consecutive ones in one.
#[test]
fn long_uid_sets_are_cut_to_fit_a_command_line() {
    let scattered: Vec<u32> = (0..5000).map(|i| 1_000_000 + 2 * i).collect();
    let sets = uid_sets(&scattered);
    assert!(sets.len() > 1, "{} bytes in one set", sets[0].len());
    assert!(sets.iter().all(|s| s.len() <= 4000 && !s.is_empty()));
    assert_eq!(sets.join(","), uid_set(&scattered));
    // The same cut as UIDs: each part is what one set names.
    let chunks = uid_chunks(&scattered);
    assert_eq!(chunks.len(), sets.len());
    for (chunk, set) in chunks.iter().zip(&sets) {
        assert_eq!(&uid_set(chunk), set);
    }
    assert_eq!(chunks.concat(), scattered);
    assert_eq!(uid_sets(&(1..=5000).collect::<Vec<u32>>()), vec!["1:5000"]);
    assert!(uid_sets(&[]).is_empty());
}

#[test]
fn a_rescan_skips_the_leading_run_of_old_mail() {
    // (UID, INTERNALDATE); new_after = 100.
    assert_eq!(
        first_newer(&[(3, 90), (1, 50), (2, 100), (4, 101), (5, 10)], 100),
        3
    );
    assert_eq!(
        first_newer(&[(1, 50), (7, 60)], 100),
        7,
        "all old: start after them"
    );
    assert_eq!(
        first_newer(&[(1, 150), (2, 50)], 100),
        0,
        "the first is new"
    );
    assert_eq!(first_newer(&[], 100), 0);
}

#[test]
fn a_message_dated_in_the_future_does_not_move_new_after_past_now() {
    assert_eq!(newest_date(&[(1, 50), (2, 90)], 100), Some(90));
    // Without the cap, new_after 10,000 would make a rescan skip mail from 100 to 9,999.
    assert_eq!(newest_date(&[(1, 50), (2, 10_000)], 100), Some(100));
    assert_eq!(newest_date(&[], 100), None);
}

#[test]
fn quarantine_refs_round_trip() {
    assert_eq!(
        parse_quarantine_ref("imap:support:Quarantine:1795456189:17"),
        Some(("Quarantine".to_string(), 1795456189, 17))
    );
    assert_eq!(
        parse_quarantine_ref("imap:support:Lists:Quarantine:1795456189:17"),
        Some(("Lists:Quarantine".to_string(), 1795456189, 17))
    );
    assert_eq!(parse_quarantine_ref("imap:support:Quarantine:?:1:17"), None);
    assert_eq!(parse_quarantine_ref("/var/quarantine/x.eml"), None);
}

#[test]
fn xoauth2_initial_response() {
    let refusal = std::sync::Arc::default();
    let mut a = XOAuth2 {
        user: "desk@example.com".into(),
        token: "ya29.token".into(),
        sent: false,
        refusal: std::sync::Arc::clone(&refusal),
    };
    use async_imap::Authenticator;
    assert_eq!(
        a.process(b""),
        "user=desk@example.com\x01auth=Bearer ya29.token\x01\x01"
    );
    // The error continuation gets an empty answer, and its reason is kept.
    let reason = br#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#;
    assert_eq!(a.process(reason), "");
    let kept = refusal.lock().unwrap().clone().unwrap();
    assert!(kept.contains("\"status\":\"401\""), "{kept}");
}

#[test]
fn a_sizeless_unsolicited_fetch_does_not_hide_a_messages_size() {
    let mut listed = vec![(7, 0), (3, 100), (7, 30_000_000), (3, 100), (5, 10)];
    largest_per_uid(&mut listed);
    assert_eq!(listed, [(3, 100), (5, 10), (7, 30_000_000)]);
}

#[test]
fn only_a_changed_count_or_an_expunge_is_news_before_idle() {
    use async_imap::types::UnsolicitedResponse as R;
    let mut known = Some(5);
    // A server repeating the count it announced: nothing new, on to IDLE.
    assert!(!announces_change(
        [R::Exists(5), R::Exists(5)].into_iter(),
        &mut known
    ));
    assert!(!announces_change(std::iter::empty(), &mut known));
    // A new message.
    assert!(announces_change([R::Exists(6)].into_iter(), &mut known));
    assert_eq!(known, Some(6));
    // One gone and one new at once: the EXPUNGE tells.
    assert!(announces_change(
        [R::Expunge(2), R::Exists(6)].into_iter(),
        &mut known
    ));
    // After IDLE the count is unknown: any EXISTS is news once.
    let mut known = None;
    assert!(announces_change([R::Exists(6)].into_iter(), &mut known));
    assert!(!announces_change([R::Exists(6)].into_iter(), &mut known));
}
