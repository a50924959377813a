//! Supervision: start every mailbox and the outbox worker, stop them cleanly.
//!
//! The caller owns the shutdown token (the binary cancels it on SIGTERM/SIGINT; tests
//! cancel it themselves). On shutdown sources stop fetching and finish the batch in
//! flight, the outbox gets one last pass, and everything is awaited up to a deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, MailboxKind};
use crate::mailbox::imap::ImapSource;
use crate::mailbox::maildir::MaildirSource;
use crate::outbox::{FileTransport, Stamp, Templates, Worker};
use crate::pipeline::Pipeline;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the database")]
    Store(#[from] StoreError),
    #[error("cannot load mail templates")]
    Templates(#[from] crate::outbox::templates::TemplateError),
}

/// How long shutdown waits for work in flight.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// Opens the database, brings schema and directory up to date, and builds the pipeline.
pub async fn prepare(config: Arc<Config>) -> Result<Pipeline, DaemonError> {
    let store = Store::open(&config.database).await?;
    if let Some(report) = store
        .sync_directory(&config.directory, crate::now(), true)
        .await?
    {
        tracing::info!(
            organizations = report.organizations,
            accounts = report.accounts,
            agents = report.agents,
            groups = report.groups,
            "directory synced from configuration"
        );
        for missing in report.missing_group_members {
            tracing::warn!(address = %missing, "group member has no account; skipped");
        }
    }
    let templates = Templates::from_config(&config)?;
    Ok(Pipeline::new(store, config, templates))
}

/// The outbox worker for this configuration.
pub fn outbox_worker(pipeline: &Pipeline) -> Worker {
    let config = pipeline.config();
    Worker {
        store: pipeline.store().clone(),
        transport: FileTransport::new(config.outbox.dir.clone()),
        stamp: Stamp {
            from_name: config.outbox.from_name.clone(),
            loop_id: config.policy.hygiene.loop_id.clone(),
        },
        max_attempts: config.outbox.max_attempts,
        poll_interval: config.outbox.poll_interval,
    }
}

/// Runs until `shutdown` is cancelled.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let pipeline = prepare(config.clone()).await?;
    let tracker = TaskTracker::new();
    for mb in &config.mailboxes {
        match &mb.kind {
            MailboxKind::Maildir(cfg) => {
                let source = MaildirSource::new(mb.name.clone(), mb.desk.clone(), cfg.clone());
                let pipeline = pipeline.clone();
                let token = shutdown.child_token();
                tracing::info!(mailbox = %mb.name, path = %cfg.path.display(), desk = %mb.desk, "watching maildir");
                tracker.spawn(async move { source.run(pipeline, token).await });
            }
            MailboxKind::Imap(cfg) => {
                let source = ImapSource::new(mb.name.clone(), mb.desk.clone(), (**cfg).clone());
                let pipeline = pipeline.clone();
                let token = shutdown.child_token();
                tracing::info!(mailbox = %mb.name, address = %cfg.address(), folder = %cfg.folder, desk = %mb.desk, "watching imap folder");
                tracker.spawn(async move { source.run(pipeline, token).await });
            }
        }
    }
    let worker = Arc::new(outbox_worker(&pipeline));
    {
        let worker = worker.clone();
        let token = shutdown.child_token();
        let wake = pipeline.outbox_wake.clone();
        tracker.spawn(async move { worker.run(token, wake).await });
    }
    tracker.close();
    tracing::info!(
        config = %config.origin,
        database = %config.database.redacted_url(),
        mailboxes = config.mailboxes.len(),
        "intake running"
    );

    shutdown.cancelled().await;
    tracing::info!("shutting down: finishing the batch in flight");
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "work still running after {:?}; exiting anyway",
            SHUTDOWN_DEADLINE
        );
    }
    // One last outbox pass so mail queued by the final batch is not left waiting.
    if let Ok(Err(e)) =
        tokio::time::timeout(Duration::from_secs(5), worker.drain_once(crate::now())).await
    {
        tracing::warn!(error = %crate::outbox::error_chain(&e), "final outbox pass failed");
    }
    pipeline.store().close().await;
    tracing::info!("stopped");
    Ok(())
}
