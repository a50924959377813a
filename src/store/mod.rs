//! All SQL lives here. One schema, two engines: SQLite (the embedded default, WAL) and
//! PostgreSQL (scale-out), reached through sqlx's `Any` driver so that every query is
//! written once. The SQL is the common subset of both (`$N` parameters, `RETURNING`,
//! `ON CONFLICT`); the few places that differ ask [`Backend`].
//!
//! Times are unix seconds in BIGINT columns; enums are TEXT with CHECK constraints.

mod admin;
mod apply;
mod bounce;
mod directory;
mod facts;
mod import;
mod lease;
mod queries;
mod verify;

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::config::DatabaseConfig;

pub use admin::{
    Actor, AddedAccount, AdminError, AgentRow, CLI_ORIGIN, DeskCustomerRow, MemberRow, MergeReport,
    NewAccount, OrganizationDetail, OrganizationRow, StatusChange,
};
pub use apply::{
    ApplyInput, ApplyResult, ClaimItem, Deferred, MailContext, MailRenderer, QuarantineRecord,
    RenderedMail, SourceRef, apply, apply_release, claim_ledger, claim_ledger_batch, dedupe_key,
    new_token, open_held_request, record_quarantine, token_hash,
};
pub use directory::{DirectoryIndex, DirectorySync, directory_fingerprint};
pub use facts::{Gathered, Known, Lookups, assemble_facts, gather_facts, may_thread};
pub use import::{ImportProgress, RecordedDecision, decode_facts, encode_facts};
pub use lease::{Beat, LeaseHolder, LiveInstance, fence};
pub use queries::*;
pub use verify::{
    Expired, HeldRequest, TokenInfo, activate_account, held_requests_of, token_info, use_token,
};

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to database {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database error while trying to {context}")]
    Query {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
    /// Another writer got there first (an account created by another instance while a
    /// batch held its own): redo the work, reading what is there now.
    #[error("{0}")]
    Conflict(String),
}

impl StoreError {
    /// True when retrying later may succeed (connection lost, database busy or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { .. } => true,
            StoreError::Query { source, .. } => is_transient_sqlx(source),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => is_transient_sqlx(e),
            _ => false,
        }
    }
}

pub(crate) fn is_transient_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // SQLite: SQLITE_BUSY (5) and its extended codes, SQLITE_LOCKED (6).
            // PostgreSQL: connection exceptions (08...), serialization failure, deadlock,
            // admin/crash shutdown, cannot connect now, and a session the server ended
            // because its transaction sat idle (`database.idle_transaction_timeout`: this
            // instance was frozen; a new session may go on).
            matches!(code.as_str(), "5" | "6" | "261" | "517" | "262")
                || code.starts_with("08")
                || matches!(
                    code.as_str(),
                    "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "25P03"
                )
        }
        _ => false,
    }
}

/// `suffix` on PostgreSQL (row locks such as `FOR UPDATE`), nothing on SQLite, whose
/// write transactions (`BEGIN IMMEDIATE`) already exclude every other writer.
pub(crate) fn pg_only<'a>(conn: &AnyConnection, suffix: &'a str) -> &'a str {
    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
        ""
    } else {
        suffix
    }
}

/// Adds what we were doing to a sqlx error.
pub(crate) trait Context<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query { context, source })
    }
}

/// The database handle. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite has one writer at a time; queueing writers here, in process, is fairer and
    /// faster than letting them spin in SQLite's busy handler.
    write_lock: Arc<Mutex<()>>,
    /// The SQLite file, if any (for the migration lock).
    sqlite_path: Option<std::path::PathBuf>,
}

/// A write transaction. On SQLite it holds the in-process write lock and was opened with
/// `BEGIN IMMEDIATE`, so it can never fail to upgrade from reader to writer halfway.
pub struct WriteTx {
    pub tx: Transaction<'static, Any>,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await.ctx("commit")
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await.ctx("roll back")
    }

    pub fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

/// A connection for a write outside a transaction (one statement, committed at once).
/// On SQLite it holds the in-process write lock, so it waits its turn behind the batches
/// being written, in order, instead of in SQLite's busy handler, which gives up after
/// `busy_timeout` (15 s): behind a long batch, a mail already handed to the relay could
/// fail to be marked sent and go out again.
pub struct WriteConn {
    conn: PoolConnection<Any>,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl std::ops::Deref for WriteConn {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteConn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

impl Store {
    /// Connects (creating a SQLite file and its directory when needed). Does not migrate.
    pub async fn connect(db: &DatabaseConfig) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let raw_url = db.url.expose_secret();
        let backend = if raw_url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let (url, sqlite_path) = match backend {
            Backend::Sqlite => prepare_sqlite_url(raw_url).map_err(|e| StoreError::Connect {
                url: db.redacted_url(),
                source: sqlx::Error::Io(e),
            })?,
            Backend::Postgres => (raw_url.to_string(), None),
        };
        let options: AnyConnectOptions = url.parse().map_err(|source| StoreError::Connect {
            url: db.redacted_url(),
            source,
        })?;
        let mut pool = AnyPoolOptions::new()
            .max_connections(db.max_connections)
            .acquire_timeout(Duration::from_secs(30));
        if backend == Backend::Postgres {
            // A session of ours that sits in a transaction this long belongs to an
            // instance that froze (stopped, paused VM, hung): the server ends it, and
            // its locks — a desk's request counter above all — go to the others.
            let ms = db.idle_transaction_timeout.as_millis();
            pool = pool.after_connect(move |conn, _meta| {
                Box::pin(async move {
                    let sql = format!("SET idle_in_transaction_session_timeout = {ms}");
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            });
        }
        if backend == Backend::Sqlite {
            pool = pool.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // synchronous=FULL: a commit is on disk before we acknowledge a source.
                    // cache_size: 4 MiB per connection. A transaction's dirty pages stay
                    // in the cache until it commits or spills; with 32 MiB a batch holding
                    // a 25 MB attachment kept 20 MB of blob pages there (massif). 4 MiB is
                    // as fast as 8 on 10,000- and 20,000-message backlogs, and the peak
                    // with a 25 MB message is 87-88 MiB instead of 91-95 (benches/imap.rs).
                    sqlx::raw_sql(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                         PRAGMA busy_timeout = 15000; PRAGMA foreign_keys = ON; \
                         PRAGMA cache_size = -4096; PRAGMA temp_store = MEMORY;",
                    )
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            });
        }
        let pool = pool
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect {
                url: db.redacted_url(),
                source,
            })?;
        Ok(Store {
            pool,
            backend,
            write_lock: Arc::new(Mutex::new(())),
            sqlite_path,
        })
    }

    /// Connects and brings the schema up to date.
    pub async fn open(db: &DatabaseConfig) -> Result<Store, StoreError> {
        let store = Store::connect(db).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Brings the schema up to date. Several processes may start at once (the daemon and
    /// `intake deliver`, or several instances): PostgreSQL migrations take an advisory
    /// lock; for SQLite we hold an exclusive lock on `<database>.migrate-lock`.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        };
        let _lock = match &self.sqlite_path {
            Some(path) => {
                let lock_path = path.with_extension("migrate-lock");
                let file =
                    tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                        let f = std::fs::OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .write(true)
                            .open(&lock_path)?;
                        f.lock()?;
                        Ok(f)
                    })
                    .await
                    .map_err(|e| StoreError::Invalid(format!("migration lock task failed: {e}")))?
                    .map_err(|e| {
                        StoreError::Invalid(format!("cannot lock the database for migration: {e}"))
                    })?;
                Some(file)
            }
            None => None,
        };
        migrator.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn acquire(&self) -> Result<PoolConnection<Any>, StoreError> {
        self.pool.acquire().await.ctx("get a database connection")
    }

    /// A connection to write with outside a transaction (see [`WriteConn`]). Not to be
    /// called while this task holds a [`WriteTx`] or another `WriteConn`.
    pub async fn write_conn(&self) -> Result<WriteConn, StoreError> {
        let guard = match self.backend {
            Backend::Sqlite => Some(self.write_lock.clone().lock_owned().await),
            Backend::Postgres => None,
        };
        Ok(WriteConn {
            conn: self.acquire().await?,
            _guard: guard,
        })
    }

    /// Opens a write transaction (see [`WriteTx`]).
    pub async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        match self.backend {
            Backend::Sqlite => {
                let guard = self.write_lock.clone().lock_owned().await;
                let tx = self
                    .pool
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .ctx("begin a transaction")?;
                Ok(WriteTx {
                    tx,
                    _guard: Some(guard),
                })
            }
            Backend::Postgres => {
                let tx = self.pool.begin().await.ctx("begin a transaction")?;
                Ok(WriteTx { tx, _guard: None })
            }
        }
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.acquire().await?;
        conn.ping().await.ctx("ping the database")
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Makes sure the directory of a SQLite file exists and asks sqlx to create the file.
/// Returns the URL to connect with and the file's path.
fn prepare_sqlite_url(url: &str) -> std::io::Result<(String, Option<std::path::PathBuf>)> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path != ":memory:"
        && !path.is_empty()
        && let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    let file = (path != ":memory:" && !path.is_empty()).then(|| std::path::PathBuf::from(path));
    let url = match query {
        Some(q) if q.contains("mode=") => url.to_string(),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    };
    Ok((url, file))
}

/// `$start, $start+1, ...` placeholders for an IN list of `n` values.
pub(crate) fn placeholders(start: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 4);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('$');
        s.push_str(&(start + i).to_string());
    }
    s
}
