//! Test harness: the databases (SQLite, and a throwaway PostgreSQL cluster once per test
//! process: `src/testing/backends.rs`, shared with the unit tests), a temp dir and
//! config per test, and helpers to run the real `intake` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

#[path = "../../src/testing/backends.rs"]
mod backends;
pub use backends::{BACKENDS, Backend, free_port, postgres_database};
use backends::{as_postgres, init_cluster, is_root, pg_bin, reap_when_gone, run_ok};

pub const BIN: &str = env!("CARGO_BIN_EXE_intake");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/mail")
        .join(name)
}

/// Site-wide settings a test varies.
#[derive(Debug, Clone)]
pub struct Site {
    pub signup: &'static str,
    pub approved: &'static [&'static str],
    pub portal_only: bool,
    pub external: &'static [&'static str],
    pub require_auth: bool,
    pub rejection_notices: bool,
}

impl Default for Site {
    fn default() -> Self {
        Site {
            signup: "open",
            approved: &["corp.example"],
            portal_only: true,
            external: &[],
            require_auth: true,
            rejection_notices: false,
        }
    }
}

/// Settings of the IT desk a test varies (HR is always restricted, sharing none).
#[derive(Debug, Clone)]
pub struct DeskSettings {
    pub channel_access: &'static str,
    pub sharing: &'static str,
    pub unknown: &'static str,
    pub agents_may_add: bool,
}

impl Default for DeskSettings {
    fn default() -> Self {
        DeskSettings {
            channel_access: "open",
            sharing: "organization",
            unknown: "drop",
            agents_may_add: false,
        }
    }
}

impl DeskSettings {
    /// A desk open to anyone, whose unknown Cc's get accounts.
    pub fn sharing_any() -> Self {
        DeskSettings {
            sharing: "any",
            unknown: "create",
            ..DeskSettings::default()
        }
    }
}

fn list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// One test's world: a temp dir with a config, a database, a Maildir and an outbox dir.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub backend: Backend,
    pub database_url: String,
    /// Where `intake run` serves its pages.
    pub http_port: u16,
}

impl Env {
    pub fn new(backend: Backend, site: &Site, desk: &DeskSettings) -> Env {
        Self::with_extra(backend, site, desk, "")
    }

    /// `extra` is appended to the generated configuration.
    pub fn with_extra(backend: Backend, site: &Site, desk: &DeskSettings, extra: &str) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("intake.db").display()),
            Backend::Postgres => postgres_database(),
        };
        let d = dir.path().display();
        let http_port = free_port();
        let text = format!(
            r#"
[database]
url = "{database_url}"
max_connections = 4

[customer_access]
approved_domains = {approved}
portal_only_accounts = {portal_only}
external_domains = {external}
signup = "{signup}"
rejection_notices = {notices}

[trust]
authserv_ids = ["mx.desk.example"]
require_authentication = {require_auth}

[[desks]]
key = "IT"
name = "IT Service Desk"
addresses = ["it@desk.example", "help@desk.example"]
channel_access = "{access}"
sharing = "{sharing}"
unknown_participants = "{unknown}"
agents_may_add_customers = {agents_may_add}

[[desks]]
key = "HR"
name = "HR"
addresses = ["hr@desk.example"]
channel_access = "restricted"
sharing = "any"
unknown_participants = "create"

[[mailboxes]]
name = "inbox"
kind = "maildir"
path = "{d}/maildir"
desk = "IT"
poll_interval = "100ms"

[outbox]
dir = "{d}/outbox"
message_id_domain = "intake.desk.example"
poll_interval = "200ms"

[quarantine]
dir = "{d}/quarantine"

[http]
listen = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"

[[directory.organizations]]
name = "Acme"
domains = ["acme.example"]
desks = ["IT"]

[[directory.organizations]]
name = "Other"
domains = ["other.example"]

[[directory.accounts]]
address = "ann@acme.example"
display_name = "Ann Acme"
organizations = ["Acme"]

[[directory.accounts]]
address = "bea@acme.example"
organizations = ["Acme"]

[[directory.accounts]]
address = "cy@other.example"
organizations = ["Other"]

[[directory.accounts]]
address = "gone@ext.example"
status = "deactivated"

[[directory.accounts]]
address = "vic@ext.example"
desks = ["HR"]

[[directory.agents]]
address = "agnes@corp.example"
display_name = "Agnes Agent"
desks = ["IT", "HR"]
{extra}
"#,
            approved = list(site.approved),
            portal_only = site.portal_only,
            external = list(site.external),
            signup = site.signup,
            notices = site.rejection_notices,
            require_auth = site.require_auth,
            access = desk.channel_access,
            sharing = desk.sharing,
            unknown = desk.unknown,
            agents_may_add = desk.agents_may_add,
        );
        let config = dir.path().join("intake.toml");
        std::fs::write(&config, text).expect("write config");
        Env {
            dir,
            config,
            backend,
            database_url,
            http_port,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs one SQL statement on this environment's database, for what no command does
    /// (making rows look old). Returns the rows it changed.
    pub fn sql(&self, statement: &str) -> u64 {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut conn = sqlx::AnyConnection::connect(&self.database_url)
                .await
                .expect("connect to the test database");
            let done = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_string()))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
            conn.close().await.expect("close");
            done.rows_affected()
        })
    }

    /// Runs `intake --config FILE ARGS...` in the test dir.
    pub fn intake(&self, args: &[&str]) -> Output {
        self.intake_with_stdin(args, None)
    }

    pub fn intake_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("CONFIGURATION_DIRECTORY")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("INTAKE__") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("run intake");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input).expect("write stdin");
        }
        child.wait_with_output().expect("wait for intake")
    }

    /// Runs a command that must succeed and returns its stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.intake(args);
        assert!(
            out.status.success(),
            "intake {args:?} failed ({:?}):\n{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "intake {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn explain(&self, fixture_name: &str) -> Value {
        let path = fixture(fixture_name);
        self.json(&[
            "explain",
            path.to_str().expect("utf-8 path"),
            "--format",
            "json",
        ])
    }

    /// Processes fixtures with `intake process --json`.
    pub fn process(&self, fixture_names: &[&str]) -> Value {
        let paths: Vec<String> = fixture_names
            .iter()
            .map(|f| fixture(f).display().to_string())
            .collect();
        let mut args = vec!["process", "--json"];
        args.extend(paths.iter().map(String::as_str));
        self.json(&args)
    }

    pub fn requests(&self) -> Vec<Value> {
        match self.json(&["requests", "list", "--json"]) {
            Value::Array(a) => a,
            other => panic!("requests list is not an array: {other}"),
        }
    }

    pub fn request(&self, key: &str) -> Value {
        self.json(&["requests", "show", key, "--json"])
    }

    pub fn accounts(&self) -> Vec<Value> {
        match self.json(&["accounts", "list", "--json"]) {
            Value::Array(a) => a,
            other => panic!("accounts list is not an array: {other}"),
        }
    }

    pub fn account_addresses(&self) -> Vec<String> {
        self.accounts()
            .iter()
            .filter_map(|a| a["address"].as_str().map(String::from))
            .collect()
    }

    /// Files the file transport wrote.
    pub fn outbox_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.path("outbox"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        v.sort();
        v
    }
}

/// `(address, outcome, reason)` of every participant in a decision.
pub fn participants(decision: &Value) -> Vec<(String, String, String)> {
    decision["participants"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["address"].as_str().unwrap_or_default().to_string(),
                        p["outcome"].as_str().unwrap_or_default().to_string(),
                        p["reason"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(to, kind)` of every mail a decision queues.
pub fn emails(decision: &Value) -> Vec<(String, String)> {
    decision["emails"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["to"].as_str().unwrap_or_default().to_string(),
                        e["kind"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn strings(items: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    items
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

/// A running `intake run`; its log goes to a file in the test's directory.
pub struct Daemon {
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `done` holds; on timeout the panic shows the daemon's log.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: std::time::Duration,
        mut done: impl FnMut() -> bool,
    ) {
        let start = std::time::Instant::now();
        while !done() {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; intake's log:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends a signal (`"HUP"`, `"KILL"`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Sends SIGTERM, waits for a clean exit (within 15 s) and returns the log.
    pub fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let log = self.log();
                assert!(status.success(), "intake run exited with {status}:\n{log}");
                return log;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(15),
                "SIGTERM did not stop intake run:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A test that failed halfway must not leave the daemon running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `intake run` for `env`.
pub fn start_daemon(env: &Env) -> Daemon {
    start_daemon_with(env, &[])
}

/// Starts `intake run` for `env` with extra environment variables.
pub fn start_daemon_with(env: &Env, vars: &[(&str, &str)]) -> Daemon {
    start_daemon_with_config(env, &env.config, vars)
}

/// Starts `intake run` in `env` with another configuration file (another instance's
/// list of mailboxes, say) and extra environment variables.
pub fn start_daemon_with_config(env: &Env, config: &Path, vars: &[(&str, &str)]) -> Daemon {
    spawn_daemon(env, Command::new(BIN), config, vars)
}

/// Starts `intake run` as the systemd unit's `ProcSubset=pid` has it: in a mount
/// namespace whose /proc shows processes only (no /proc/sys), in this pid namespace.
pub fn start_daemon_with_proc_subset_pid(env: &Env, vars: &[(&str, &str)]) -> Daemon {
    let mut wrapped = Command::new("unshare");
    wrapped.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t proc -o subset=pid proc /proc && test ! -e /proc/sys && exec \"$0\" \"$@\"",
        BIN,
    ]);
    spawn_daemon(env, wrapped, &env.config, vars)
}

fn spawn_daemon(env: &Env, mut command: Command, config: &Path, vars: &[(&str, &str)]) -> Daemon {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let log = env.path(&format!(
        "intake-{}.log",
        RUNS.fetch_add(1, Ordering::SeqCst)
    ));
    let file = std::fs::File::create(&log).expect("log file");
    let child = command
        .arg("--config")
        .arg(config)
        .arg("run")
        .current_dir(env.dir.path())
        .env("INTAKE_LOG", "info")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start intake run");
    Daemon { child, log }
}

impl Daemon {
    /// How `intake run` ended, if it already has (by itself); does not wait.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait for intake run")
    }

    /// SIGKILL: no shutdown path runs, as in a crash or an OOM kill. Waits until the
    /// process is gone (its sockets and locks released) and returns its log.
    pub fn kill(mut self) -> String {
        // `Child::kill` is SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

/// A PostgreSQL cluster of one test's own, for tests that stop or restart the server:
/// the shared cluster serves every other test running at the same time. Stopped and
/// removed on drop (and by a reaper if the test process dies first). Always runs Debian's `initdb`/`pg_ctl`, even when
/// `INTAKE_TEST_DATABASE_URL` names an outside server, which a test cannot restart.
pub struct OwnCluster {
    dir: PathBuf,
    data: PathBuf,
    opts: String,
    root: bool,
    pub port: u16,
}

impl OwnCluster {
    pub fn start() -> OwnCluster {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let root = is_root();
        let dir = std::env::temp_dir().join(format!(
            "intake-pg-own-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let data = init_cluster(&dir, root);
        let port = free_port();
        // Durable, unlike the shared cluster (fsync and synchronous_commit off, for
        // speed): there, a crash loses transactions whose commit was already reported,
        // which no client can survive.
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100",
            dir.display()
        );
        let cluster = OwnCluster {
            dir,
            data,
            opts,
            root,
            port,
        };
        cluster.start_again();
        reap_when_gone(root, &cluster.dir, &cluster.data);
        cluster
    }

    /// A fresh database in this cluster; returns its URL.
    pub fn database(&self, name: &str) -> String {
        let base = format!("postgres://postgres@127.0.0.1:{}", self.port);
        run_ok(
            Command::new("psql")
                .arg(format!("{base}/postgres"))
                .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
                .arg(format!("CREATE DATABASE {name}")),
            "create a database",
        );
        format!("{base}/{name}")
    }

    fn pg_ctl(&self, args: &[&str], what: &str) {
        run_ok(
            as_postgres(self.root, &pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(args)
                .stdout(Stdio::null()),
            what,
        );
    }

    /// Stops the server the way a crash does (`-m immediate`: no checkpoint, every
    /// connection cut); the next start runs crash recovery.
    pub fn crash(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"], "pg_ctl stop -m immediate");
    }

    /// Starts the (stopped) server again on the same port and data directory.
    pub fn start_again(&self) {
        let log = self.dir.join("log");
        let log = log.to_str().expect("utf-8 path");
        self.pg_ctl(
            &["-o", &self.opts, "-l", log, "-w", "start"],
            "pg_ctl start",
        );
    }

    /// `pg_ctl restart -m fast`: the administrator's restart (connections are cut).
    pub fn restart(&self) {
        let log = self.dir.join("log");
        let log = log.to_str().expect("utf-8 path");
        self.pg_ctl(
            &["-m", "fast", "-o", &self.opts, "-l", log, "-w", "restart"],
            "pg_ctl restart",
        );
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = as_postgres(self.root, &pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Base64 (RFC 4648, padded), for building MIME test messages.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(ABC[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
