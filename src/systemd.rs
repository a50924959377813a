//! The systemd notification protocol (sd_notify(3)): `READY=1`, `RELOADING=1`,
//! `STOPPING=1`, `STATUS=…` and watchdog pings, as datagrams on `$NOTIFY_SOCKET`.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op, so the daemon runs the
//! same by hand, in tests and under a unit with `Type=notify`.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go, if anywhere.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let address = socket_address(path.as_encoded_bytes())?;
            let socket = UnixDatagram::unbound().ok()?;
            Some((socket, address))
        });
        let watchdog_for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && watchdog_for_us)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// Whether anyone listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog interval systemd expects pings within, if it set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// Sends one notification (newline-separated assignments). Failures are logged at
    /// debug level only: the service manager going away must not stop mail processing.
    pub fn notify(&self, state: &str) {
        if let Some((socket, address)) = &self.target
            && let Err(e) = socket.send_to_addr(state.as_bytes(), address)
        {
            tracing::debug!(error = %e, "cannot notify the service manager");
        }
    }

    /// `STATUS=` with newlines removed (they would start a new assignment).
    pub fn status(&self, text: &str) {
        self.notify(&format!("STATUS={}", one_line(text)));
    }
}

/// A `NOTIFY_SOCKET` value as a socket address: a path, or `@name` for Linux's abstract
/// namespace.
fn socket_address(value: &[u8]) -> Option<SocketAddr> {
    match value.split_first() {
        None => None,
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name).ok()
        }
        Some((b'/', _)) => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(value)).ok(),
        Some(_) => None,
    }
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

#[cfg(test)]
#[path = "systemd_tests.rs"]
mod tests;
