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
use crate::outbox::{FileTransport, SmtpTransport, Stamp, Templates, Transport, Worker};
use crate::pipeline::Pipeline;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the database")]
    Store(#[from] StoreError),
    #[error("cannot load mail templates")]
    Templates(#[from] crate::outbox::templates::TemplateError),
    #[error("cannot set up outgoing mail")]
    Outbox(#[from] crate::outbox::SendError),
    #[error("cannot listen on {address} (http.listen)")]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
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

/// The outbox worker for this configuration: SMTP when `[smtp]` is configured, files
/// otherwise.
pub fn outbox_worker(pipeline: &Pipeline) -> Result<Worker, crate::outbox::SendError> {
    let config = pipeline.config();
    let transport = match &config.smtp {
        Some(smtp) => Transport::Smtp(SmtpTransport::new(smtp)?),
        None => Transport::File(FileTransport::new(config.outbox.dir.clone())),
    };
    Ok(Worker {
        store: pipeline.store().clone(),
        transport,
        stamp: Stamp {
            from_name: config.outbox.from_name.clone(),
            loop_id: config.policy.hygiene.loop_id.clone(),
        },
        max_attempts: config.outbox.max_attempts,
        poll_interval: config.outbox.poll_interval,
        retry_first_secs: config.outbox.retry_first.as_secs().max(1) as i64,
    })
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
    let worker = Arc::new(outbox_worker(&pipeline)?);
    if let Some(address) = config.http.listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| DaemonError::Listen { address, source })?;
        let state = crate::http::AppState {
            pipeline: pipeline.clone(),
            health: pipeline.health.clone(),
        };
        let token = shutdown.child_token();
        tracing::info!(%address, public_url = %config.http.public_url, "serving verification pages");
        tracker.spawn(async move {
            if let Err(e) = crate::http::serve(listener, state, token).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }
    {
        // Held requests and pending accounts past their time, once a minute.
        let store = pipeline.store().clone();
        let token = shutdown.child_token();
        let hold_ttl = config.hold_ttl.as_secs() as i64;
        tracker.spawn(async move {
            loop {
                match store.expire(crate::now(), hold_ttl).await {
                    Ok(e) if !e.requests.is_empty() || !e.accounts.is_empty() => {
                        tracing::info!(requests = ?e.requests, accounts = ?e.accounts, "expired unconfirmed requests and accounts");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %crate::outbox::error_chain(&e), "expiry pass failed"),
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        });
    }
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
