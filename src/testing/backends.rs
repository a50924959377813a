//! The databases tests run on, shared by the unit tests (`crate::testing`) and the
//! integration tests and benchmarks (`tests/it/harness.rs` includes this file): SQLite,
//! and a throwaway PostgreSQL cluster started once per test process.
//!
//! PostgreSQL: `INTAKE_TEST_DATABASE_URL` (a superuser URL) is used when set; otherwise
//! Debian's `initdb` and `pg_ctl` are run on a free loopback port (as the `postgres`
//! user when we are root, since both refuse to run as root). A small reaper process
//! stops the cluster when the test process exits. A missing PostgreSQL is a test
//! failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

struct PgCluster {
    /// Base URL without a database name, e.g. `postgres://postgres@127.0.0.1:5433`.
    base: String,
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.exists());
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("PostgreSQL's {name} not found under /usr/lib/postgresql: install the postgresql package (.ci/run does)"))
}

pub fn as_postgres(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

pub fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh cluster's data directory, `dir/data` (`dir` emptied first; owned by the
/// `postgres` user when `root`), made by `initdb`.
pub fn init_cluster(dir: &Path, root: bool) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("create the cluster directory");
    if root {
        run_ok(
            Command::new("chown").arg("postgres:postgres").arg(dir),
            "chown the cluster directory",
        );
    }
    let data = dir.join("data");
    run_ok(
        as_postgres(root, &pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null()),
        "initdb",
    );
    data
}

/// Starts a reaper that stops the cluster in `data` and removes `dir` once this test
/// process is gone (it outlives us on purpose: init reaps it).
pub fn reap_when_gone(root: bool, dir: &Path, data: &Path) {
    let script = format!(
        "while [ -d /proc/{pid} ]; do sleep 0.5; done; {pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        pg_ctl = pg_bin("pg_ctl").display(),
        data = data.display(),
        dir = dir.display()
    );
    #[allow(clippy::zombie_processes)]
    as_postgres(root, Path::new("/bin/sh"))
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the cluster reaper");
}

fn start_cluster() -> PgCluster {
    if let Ok(url) = std::env::var("INTAKE_TEST_DATABASE_URL") {
        let base = match url.rsplit_once('/') {
            Some((b, _)) if b.contains("://") && b.len() > b.find("://").unwrap_or(0) + 3 => {
                b.to_string()
            }
            _ => url,
        };
        return PgCluster { base };
    }
    let root = is_root();
    let dir = std::env::temp_dir().join(format!("intake-pg-{}", std::process::id()));
    let data = init_cluster(&dir, root);
    let port = free_port();
    // Tests trade durability for speed; benchmarks (INTAKE_PG_DURABLE=1) measure a
    // cluster with PostgreSQL's default, crash-safe settings.
    let durability = if std::env::var_os("INTAKE_PG_DURABLE").is_some() {
        ""
    } else {
        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    };
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1{durability} -c max_connections=300",
        dir.display()
    );
    run_ok(
        as_postgres(root, &pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.join("log"))
            .args(["-w", "start"])
            .stdout(Stdio::null()),
        "pg_ctl start",
    );
    reap_when_gone(root, &dir, &data);
    PgCluster {
        base: format!("postgres://postgres@127.0.0.1:{port}"),
    }
}

fn cluster() -> &'static PgCluster {
    static PG: OnceLock<PgCluster> = OnceLock::new();
    PG.get_or_init(start_cluster)
}

/// A fresh, empty PostgreSQL database; returns its URL.
pub fn postgres_database() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let pg = cluster();
    // The time too: with INTAKE_TEST_DATABASE_URL the cluster outlives this process,
    // and a later one may have the same pid.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let name = format!(
        "intake_{}_{started}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let psql = Command::new("psql")
        .arg(format!("{}/postgres", pg.base))
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("run psql");
    assert!(
        psql.status.success(),
        "cannot create database {name}: {}",
        String::from_utf8_lossy(&psql.stderr)
    );
    format!("{}/{name}", pg.base)
}
