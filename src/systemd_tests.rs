//! Unit tests for `src/systemd.rs`.

use super::*;

#[test]
fn socket_addresses() {
    assert!(socket_address(b"").is_none());
    assert!(socket_address(b"relative/path").is_none());
    let path = socket_address(b"/run/systemd/notify").unwrap();
    assert_eq!(
        path.as_pathname(),
        Some(std::path::Path::new("/run/systemd/notify"))
    );
    let abstract_name = socket_address(b"@intake-test").unwrap();
    assert!(abstract_name.as_pathname().is_none());
}

#[test]
fn notifications_arrive_as_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = UnixDatagram::bind(&path).unwrap();
    let notifier = Notifier {
        target: Some((
            UnixDatagram::unbound().unwrap(),
            SocketAddr::from_pathname(&path).unwrap(),
        )),
        watchdog: Some(Duration::from_secs(10)),
    };
    assert!(notifier.enabled());
    assert_eq!(notifier.watchdog(), Some(Duration::from_secs(10)));
    notifier.notify("READY=1");
    notifier.status("two\nlines");
    let mut buf = [0u8; 256];
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STATUS=two lines");
}

#[test]
fn without_a_socket_nothing_happens() {
    let notifier = Notifier {
        target: None,
        watchdog: Some(Duration::from_secs(10)),
    };
    assert!(!notifier.enabled());
    assert_eq!(notifier.watchdog(), None);
    notifier.notify("READY=1");
}
