//! What unit tests share: a minimal configuration on SQLite in a temporary directory,
//! and the store and pipeline on it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, ConfigSource};
use crate::pipeline::Pipeline;
use crate::store::Store;

/// One desk (IT, it@desk.example), no authentication required, SQLite and the outbox
/// in `dir`.
pub fn config(dir: &Path) -> Arc<Config> {
    let toml = format!(
        "[database]\nurl = \"sqlite://{d}/intake.db\"\n\
         [[desks]]\nkey = \"IT\"\naddresses = [\"it@desk.example\"]\n\
         [trust]\nrequire_authentication = false\n[outbox]\ndir = \"{d}/outbox\"\n",
        d = dir.display()
    );
    let path = dir.join("intake.toml");
    std::fs::write(&path, toml).unwrap();
    Arc::new(Config::load_with_env(&ConfigSource::File(path), Some(HashMap::new())).unwrap())
}

/// The store of [`config`]`(dir)`, migrated.
pub async fn store(dir: &Path) -> Store {
    Store::open(&config(dir).database).await.unwrap()
}

/// A pipeline on [`config`]`(dir)`.
pub async fn pipeline(dir: &Path) -> Pipeline {
    let config = config(dir);
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
