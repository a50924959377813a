//! What unit tests share: a minimal configuration in a temporary directory, on SQLite
//! or on a fresh database of a throwaway PostgreSQL cluster (`backends`, shared with the
//! integration tests), and the store and pipeline on it. A test of the store runs on
//! each of [`BACKENDS`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, ConfigSource};
use crate::pipeline::Pipeline;
use crate::store::Store;

mod backends;
pub use backends::{BACKENDS, Backend};

/// One desk (IT, it@desk.example), no authentication required, the outbox in `dir`;
/// the database in `dir` (SQLite) or a fresh one (PostgreSQL).
pub fn config(dir: &Path, backend: Backend) -> Arc<Config> {
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}/intake.db", dir.display()),
        Backend::Postgres => backends::postgres_database(),
    };
    let toml = format!(
        "[database]\nurl = \"{url}\"\n\
         [[desks]]\nkey = \"IT\"\naddresses = [\"it@desk.example\"]\n\
         [trust]\nrequire_authentication = false\n[outbox]\ndir = \"{d}/outbox\"\n",
        d = dir.display()
    );
    let path = dir.join("intake.toml");
    std::fs::write(&path, toml).unwrap();
    Arc::new(Config::load_with_env(&ConfigSource::File(path), Some(HashMap::new())).unwrap())
}

/// The store of [`config`]`(dir, backend)`, migrated.
pub async fn store(dir: &Path, backend: Backend) -> Store {
    Store::open(&config(dir, backend).database).await.unwrap()
}

/// A pipeline on [`config`]`(dir, backend)`.
pub async fn pipeline(dir: &Path, backend: Backend) -> Pipeline {
    let config = config(dir, backend);
    let store = Store::open(&config.database).await.unwrap();
    let templates = crate::outbox::Templates::from_config(&config).unwrap();
    Pipeline::new(store, config, templates)
}

/// Panics at `at` for a message whose subject asks for it (`[intake-test-panic:AT]`):
/// a stand-in for a bug of ours that one message meets (see `PipelineError::Panicked`).
pub fn panic_if_asked(msg: &crate::message::InboundMessage, at: &str) {
    if msg
        .subject
        .as_deref()
        .is_some_and(|s| s.contains(&format!("[intake-test-panic:{at}]")))
    {
        panic!("asked to by the test message");
    }
}
