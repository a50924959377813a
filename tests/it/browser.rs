//! Headless Chromium (Debian's `chromium`) driven through `chromedriver` (Debian's
//! `chromium-driver`) over the W3C WebDriver protocol, and a tiny HTTP/1.1 client for
//! plain requests. No browser download, nothing outside loopback.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A plain HTTP/1.1 request to 127.0.0.1. Returns (status, headers, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some((content_type, data)) = body {
        request.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            data.len()
        ));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    if let Some((_, data)) = body {
        stream.write_all(data).expect("write body");
    }
    // Read the head, then exactly the body its headers announce: some servers keep the
    // connection open despite `Connection: close`.
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "connection closed before the response head");
        response.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&response[..head_end]).to_string();
    let lower = head.to_ascii_lowercase();
    let length: Option<usize> = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let chunked = lower.contains("transfer-encoding: chunked");
    loop {
        let have = response.len() - head_end;
        let done = match length {
            Some(n) => have >= n,
            None if chunked => response[head_end..].windows(5).any(|w| w == b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = stream.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let rest = String::from_utf8_lossy(&response[head_end..]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if chunked { dechunk(&rest) } else { rest };
    (status, head.trim_end().to_string(), body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = s.split_once("\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            return out;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
}

fn json_call(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let data = body.map(|b| b.to_string());
    let (status, _, text) = http(
        port,
        method,
        path,
        data.as_deref().map(|d| ("application/json", d.as_bytes())),
    );
    let value: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}: {text}"));
    assert!(
        status < 400,
        "chromedriver {method} {path} -> {status}: {value}"
    );
    value["value"].clone()
}

/// A headless Chromium session.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        let port = crate::harness::free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run chromedriver (install chromium-driver; .ci/run does)");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        format!("--user-data-dir={}", profile.path().display()),
                    ]
                }
            }}
        });
        let value = json_call(port, "POST", "/session", Some(caps));
        let session = value["sessionId"].as_str().expect("session id").to_string();
        Browser {
            driver,
            port,
            session,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        json_call(
            self.port,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn source(&self) -> String {
        self.call("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The page's text; empty while a page is loading (after a form was submitted,
    /// there is a moment with no body to read).
    pub fn text(&self) -> String {
        let (status, _, found) = http(
            self.port,
            "POST",
            &format!("/session/{}/element", self.session),
            Some((
                "application/json",
                json!({ "using": "css selector", "value": "body" })
                    .to_string()
                    .as_bytes(),
            )),
        );
        if status == 404 {
            return String::new();
        }
        let found: Value = serde_json::from_str(&found)
            .unwrap_or_else(|e| panic!("chromedriver find body: {e}: {found}"));
        let Some(body) = found["value"]
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
        else {
            return String::new();
        };
        let (status, _, text) = http(
            self.port,
            "GET",
            &format!("/session/{}/element/{body}/text", self.session),
            None,
        );
        if status >= 400 {
            // The body went stale: the next page replaced it meanwhile.
            return String::new();
        }
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["value"].as_str().map(String::from))
            .unwrap_or_default()
    }

    pub fn title(&self) -> String {
        self.call("GET", "/title", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The element matching a CSS selector.
    pub fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    pub fn fill(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.call("POST", &format!("/element/{el}/clear"), Some(json!({})));
        self.call(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        );
    }

    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.call("POST", &format!("/element/{el}/click"), Some(json!({})));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            http(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            )
        }));
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
