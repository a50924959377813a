//! Supervision: start every mailbox and the outbox worker, stop them cleanly.
//!
//! The caller owns the shutdown token (the binary cancels it on SIGTERM/SIGINT; tests
//! cancel it themselves). On shutdown sources stop fetching and finish the batch in
//! flight, the outbox gets one last pass, and everything is awaited up to a deadline.
//! SIGHUP reloads the policy, directory and templates; a task that ends on its own
//! stops the daemon with an error so the service manager restarts it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigSource, MailboxKind};
use crate::mailbox::imap::ImapSource;
use crate::mailbox::lease::{Board, run_leased};
use crate::mailbox::maildir::MaildirSource;
use crate::outbox::{FileTransport, SmtpTransport, Stamp, Templates, Transport, Worker};
use crate::pipeline::Pipeline;
use crate::store::{Store, StoreError};
use crate::systemd::Notifier;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the database")]
    Store(#[from] StoreError),
    #[error("cannot load mail templates")]
    Templates(#[from] crate::outbox::templates::TemplateError),
    #[error("cannot set up outgoing mail")]
    Outbox(#[from] crate::outbox::SendError),
    #[error("stopped because a task ended unexpectedly: {0}")]
    TaskDied(String),
    #[error("cannot listen on {address} (http.listen)")]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How long shutdown waits for work in flight.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// How often the daemon deletes sent mail past `outbox.keep_sent`.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Deletes sent mail older than `outbox.keep_sent` (nothing when it is "forever").
pub async fn prune_sent_mail(
    store: &Store,
    config: &Config,
    now: i64,
) -> Result<u64, crate::store::StoreError> {
    match config.outbox.keep_sent {
        Some(keep) => store.prune_sent(now - keep.as_secs() as i64).await,
        None => Ok(0),
    }
}

/// How long the final outbox pass starts new mail; a mail begun is let finish.
const FINAL_PASS: Duration = Duration::from_secs(5);

/// How long closing the database waits for connections still in use. The deadline, the
/// final outbox pass and this stay under the unit's `TimeoutStopSec` (30 s) unless the
/// relay stalls the one mail in flight.
const STORE_CLOSE_WAIT: Duration = Duration::from_secs(3);

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
        claim_lease_secs: crate::outbox::claim_lease_secs(config.smtp.as_ref().map(|s| s.timeout)),
        pass: Default::default(),
        relay: Default::default(),
    })
}

/// Long-running tasks that ended while the daemon was not stopping.
type Died = Arc<std::sync::Mutex<Vec<String>>>;

/// Spawns a task that should run until shutdown; if it ends earlier, or panics at any
/// time, it is recorded in `died`, so the supervisor stops the daemon (and systemd
/// restarts it). A panicking mailbox task (`mailbox`: its name) is also marked failed in
/// `health`; its lease is left to expire, or to the restarted process, which sees this
/// one gone and takes it at once.
fn supervised<F>(
    tracker: &TaskTracker,
    died: &Died,
    shutdown: &CancellationToken,
    name: String,
    mailbox: Option<(crate::health::Health, String)>,
    task: F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let died = died.clone();
    let shutdown = shutdown.clone();
    // The task runs in its own spawn so that a panic ends only it and comes back here
    // as a `JoinError`; awaited inline, it would unwind through this wrapper too.
    let inner = tracker.spawn(task);
    tracker.spawn(async move {
        match inner.await {
            Err(e) if e.is_panic() => {
                let why = crate::pipeline::panic_message(e.into_panic());
                tracing::error!(task = %name, panic = %why, "a task panicked; stopping so the service manager can restart intake");
                if let Some((health, mailbox)) = &mailbox {
                    health.failed(mailbox, &format!("the mailbox task panicked: {why}"));
                }
            }
            // Ended, or cancelled (only when the runtime itself goes away).
            Ok(()) | Err(_) => {
                if shutdown.is_cancelled() {
                    return;
                }
                tracing::error!(task = %name, "a task ended unexpectedly; stopping so the service manager can restart intake");
            }
        }
        if let Ok(mut d) = died.lock() {
            d.push(name);
        }
    });
}

/// Runs until `shutdown` is cancelled. With `source`, SIGHUP reloads the configuration
/// from it. Under systemd (`NOTIFY_SOCKET`) it reports `READY=1` once every mailbox has
/// connected or reported its first failure, keeps `STATUS=` current and pings the
/// watchdog from the supervision loop.
pub async fn run(
    config: Arc<Config>,
    source: Option<ConfigSource>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let notifier = Arc::new(Notifier::from_env());
    notifier.status("starting: opening the database");
    let pipeline = prepare(config.clone()).await?;
    let tracker = TaskTracker::new();
    let died: Died = Arc::default();
    // Each mailbox is worked under a lease, so several instances on one database
    // share the mailboxes instead of racing for the same messages.
    let board = Arc::new(Board::new(
        crate::mailbox::lease::instance_id(),
        config.database.mailbox_lease,
        config.mailboxes.iter().map(|m| m.name.clone()).collect(),
    ));
    crate::mailbox::lease::forget_gone(pipeline.store()).await;
    crate::mailbox::lease::beat(pipeline.store(), &board).await;
    {
        let store = pipeline.store().clone();
        let board = board.clone();
        let token = shutdown.child_token();
        supervised(
            &tracker,
            &died,
            &shutdown,
            "heartbeat".into(),
            None,
            async move { crate::mailbox::lease::heartbeat(store, board, token).await },
        );
    }
    for mb in &config.mailboxes {
        let pipeline = pipeline.clone();
        let token = shutdown.child_token();
        let task = format!("mailbox {}", mb.name);
        let name = mb.name.clone();
        let board = board.clone();
        let health = Some((pipeline.health.clone(), mb.name.clone()));
        match &mb.kind {
            MailboxKind::Maildir(cfg) => {
                let source = Arc::new(MaildirSource::new(
                    mb.name.clone(),
                    mb.desk.clone(),
                    cfg.clone(),
                ));
                tracing::info!(mailbox = %mb.name, path = %cfg.path.display(), desk = %mb.desk, "watching maildir");
                supervised(&tracker, &died, &shutdown, task, health, async move {
                    run_leased(pipeline, name, board, token, |p, t| {
                        let source = source.clone();
                        async move { source.run(p, t).await }
                    })
                    .await
                });
            }
            MailboxKind::Imap(cfg) => {
                let source = Arc::new(ImapSource::new(
                    mb.name.clone(),
                    mb.desk.clone(),
                    (**cfg).clone(),
                ));
                tracing::info!(mailbox = %mb.name, address = %cfg.address(), folder = %cfg.folder, desk = %mb.desk, "watching imap folder");
                supervised(&tracker, &died, &shutdown, task, health, async move {
                    run_leased(pipeline, name, board, token, |p, t| {
                        let source = source.clone();
                        async move { source.run(p, t).await }
                    })
                    .await
                });
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
        supervised(
            &tracker,
            &died,
            &shutdown,
            "HTTP server".into(),
            None,
            async move {
                if let Err(e) = crate::http::serve(listener, state, token).await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            },
        );
    }
    {
        // Held requests and pending accounts past their time, once a minute.
        let pipeline = pipeline.clone();
        let token = shutdown.child_token();
        supervised(
            &tracker,
            &died,
            &shutdown,
            "expiry".into(),
            None,
            async move {
                let mut last_prune: Option<std::time::Instant> = None;
                loop {
                    if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                        last_prune = Some(std::time::Instant::now());
                        match prune_sent_mail(pipeline.store(), &pipeline.config(), crate::now())
                            .await
                        {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                deleted = n,
                                "deleted sent mail older than outbox.keep_sent"
                            ),
                            Err(e) => {
                                tracing::warn!(error = %crate::outbox::error_chain(&e), "deleting old sent mail failed")
                            }
                        }
                    }
                    let hold_ttl = pipeline.config().hold_ttl.as_secs() as i64;
                    match pipeline.store().expire(crate::now(), hold_ttl).await {
                        Ok(e) if !e.requests.is_empty() || !e.accounts.is_empty() => {
                            tracing::info!(requests = ?e.requests, accounts = ?e.accounts, "expired unconfirmed requests and accounts");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %crate::outbox::error_chain(&e), "expiry pass failed")
                        }
                    }
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                }
            },
        );
    }
    {
        let worker = worker.clone();
        let token = shutdown.child_token();
        let wake = pipeline.outbox_wake.clone();
        supervised(
            &tracker,
            &died,
            &shutdown,
            "outbox".into(),
            None,
            async move { worker.run(token, wake).await },
        );
    }
    // Why the last reload was refused, until one succeeds: kept in the status line.
    let refused: RefusedReload = Arc::default();
    if let Some(source) = source {
        let pipeline = pipeline.clone();
        let notifier = notifier.clone();
        let refused = refused.clone();
        let started = config.clone();
        let token = shutdown.child_token();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                tracker.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = token.cancelled() => return,
                            got = hup.recv() => {
                                if got.is_none() {
                                    return;
                                }
                                reload(&pipeline, &started, &source, &notifier, &refused).await;
                            }
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload needs a restart")
            }
        }
    }
    let supervisor = {
        let pipeline = pipeline.clone();
        let notifier = notifier.clone();
        let died = died.clone();
        let stop = shutdown.clone();
        let names: Vec<String> = config.mailboxes.iter().map(|m| m.name.clone()).collect();
        tokio::spawn(async move { supervise(pipeline, notifier, names, died, refused, stop).await })
    };
    tracker.close();
    tracing::info!(
        config = %config.origin,
        database = %config.database.redacted_url(),
        instance = %board.holder,
        mailboxes = config.mailboxes.len(),
        watchdog = ?notifier.watchdog(),
        "intake running"
    );

    shutdown.cancelled().await;
    notifier.notify("STOPPING=1");
    notifier.status("stopping: finishing the batch in flight");
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
    supervisor.abort();
    // One last outbox pass so mail queued by the final batch is not left waiting. It
    // waits for the running worker's mail in flight, starts mail for FINAL_PASS, and
    // never cuts one short: a mail the relay took but that was cut before it was marked
    // sent went out again after the restart. Normally that takes milliseconds; a
    // stalled relay can stretch it to two mails' longest time, and systemd is told so
    // that its stop timeout does not cut the mail either.
    let longest = FINAL_PASS + 2 * worker.longest_mail();
    notifier.notify(&format!(
        "EXTEND_TIMEOUT_USEC={}",
        (longest + STORE_CLOSE_WAIT).as_micros()
    ));
    let final_pass = worker.drain_before(crate::now(), std::time::Instant::now() + FINAL_PASS);
    if let Ok(Err(e)) = tokio::time::timeout(longest, final_pass).await {
        tracing::warn!(error = %crate::outbox::error_chain(&e), "final outbox pass failed");
    }
    close_store(pipeline.store(), STORE_CLOSE_WAIT).await;
    let died = died.lock().map(|d| d.clone()).unwrap_or_default();
    if !died.is_empty() {
        return Err(DaemonError::TaskDied(died.join(", ")));
    }
    tracing::info!("stopped");
    Ok(())
}

/// Closes the database's connections, waiting at most `wait`. Closing waits for every
/// connection in use to come back, and after the shutdown deadline one may never come
/// back in time (a batch blocked on a row lock another instance holds): the process
/// exits anyway, and the server rolls that transaction back when the socket closes.
async fn close_store(store: &Store, wait: Duration) {
    if tokio::time::timeout(wait, store.close()).await.is_err() {
        tracing::warn!(
            "database connections still in use after {:?}; exiting without closing them",
            wait
        );
    }
}

/// Why the last configuration reload was refused (`None` once one succeeds).
type RefusedReload = Arc<std::sync::Mutex<Option<String>>>;

/// How long `READY=1` waits for every mailbox's first report. A mailbox whose server
/// is down must not keep the unit "activating" until systemd gives up on it.
const READY_WAIT: Duration = Duration::from_secs(30);

/// The supervision loop: readiness, the status line, watchdog pings, and stopping the
/// daemon when a task died.
async fn supervise(
    pipeline: Pipeline,
    notifier: Arc<Notifier>,
    mailboxes: Vec<String>,
    died: Died,
    refused: RefusedReload,
    shutdown: CancellationToken,
) {
    let watchdog = notifier.watchdog();
    // Pings at a third of the interval, status at least every 10 s.
    let tick = watchdog
        .map(|w| w / 3)
        .unwrap_or(Duration::from_secs(10))
        .clamp(Duration::from_millis(100), Duration::from_secs(10));
    let started = tokio::time::Instant::now();
    let mut ready = false;
    loop {
        let dead = died.lock().map(|d| d.clone()).unwrap_or_default();
        if !dead.is_empty() {
            notifier.status(&format!("failed: {} ended", dead.join(", ")));
            shutdown.cancel();
            return;
        }
        if watchdog.is_some() {
            notifier.notify("WATCHDOG=1");
        }
        let health = pipeline.health.snapshot();
        if !ready
            && (mailboxes.iter().all(|m| health.contains_key(m)) || started.elapsed() >= READY_WAIT)
        {
            ready = true;
            notifier.notify("READY=1");
            tracing::info!("ready");
        }
        let outbox = tokio::time::timeout(Duration::from_secs(2), pipeline.store().outbox_depth())
            .await
            .ok()
            .and_then(Result::ok);
        let mut status = status_line(&pipeline.counters, outbox, &health);
        if let Some(why) = refused.lock().ok().and_then(|r| r.clone()) {
            status.push_str("; last reload refused: ");
            status.push_str(&why);
        }
        notifier.status(&status);
        tokio::time::sleep(tick).await;
    }
}

/// `STATUS=`: what `systemctl status` shows.
fn status_line(
    counters: &crate::health::Counters,
    outbox: Option<i64>,
    health: &std::collections::BTreeMap<String, crate::health::SourceHealth>,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let failing: Vec<&str> = health
        .iter()
        .filter(|(_, h)| !h.ok)
        .map(|(n, _)| n.as_str())
        .collect();
    let mailboxes = if failing.is_empty() {
        format!("{} mailbox(es) ok", health.len())
    } else {
        format!("failing: {}", failing.join(", "))
    };
    format!(
        "{} messages ({} new requests, {} quarantined) since start; outbox {}; {}",
        counters.processed.load(Relaxed),
        counters.requests.load(Relaxed),
        counters.quarantined.load(Relaxed),
        outbox.map_or("unknown".to_string(), |n| format!("{n} pending")),
        mailboxes
    )
}

/// SIGHUP: loads the configuration again and, if it is valid, puts its policy,
/// directory and templates in force. An invalid one is refused and the running one
/// kept. Settings read once at start (mailboxes, database, HTTP, SMTP, outbox) are
/// reported as needing a restart.
async fn reload(
    pipeline: &Pipeline,
    started: &Config,
    source: &ConfigSource,
    notifier: &Notifier,
    refused: &RefusedReload,
) {
    notifier.notify("RELOADING=1");
    tracing::info!(config = %source.describe(), "SIGHUP: reloading the configuration");
    let src = source.clone();
    let loaded = match tokio::task::spawn_blocking(move || Config::load(&src)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "configuration reload failed");
            notifier.notify("READY=1");
            return;
        }
    };
    let outcome = match loaded {
        Err(e) => Err(e.to_string()),
        Ok(new) => put_in_force(pipeline, started, new).await,
    };
    match outcome {
        Ok(()) => {
            tracing::info!("configuration reloaded: policy, directory and templates in force");
            if let Ok(mut r) = refused.lock() {
                *r = None;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration reload refused; the running configuration stays in force");
            notifier.status(&format!("reload refused: {e}"));
            if let Ok(mut r) = refused.lock() {
                *r = Some(e);
            }
        }
    }
    notifier.notify("READY=1");
}

/// Checks a loaded configuration against the daemon (`started` under the configuration
/// it was started with) and puts it in force: the policy, the directory (synced into the
/// database) and the templates.
async fn put_in_force(pipeline: &Pipeline, started: &Config, new: Config) -> Result<(), String> {
    let taken = desks_taken_from_running_mailboxes(started, &new);
    if !taken.is_empty() {
        return Err(format!(
            "{}: a running mailbox files into the desk it was started with, and would \
             ignore (and acknowledge) every message; restart intake to rename or remove a \
             desk a mailbox uses",
            taken.join("; ")
        ));
    }
    let templates = Templates::from_config(&new).map_err(|e| crate::outbox::error_chain(&e))?;
    pipeline
        .store()
        .sync_directory(&new.directory, crate::now(), true)
        .await
        .map_err(|e| crate::outbox::error_chain(&e))?;
    let restart = restart_only_changes(started, &new);
    if !restart.is_empty() {
        tracing::warn!(sections = ?restart, "these settings changed but take effect only after a restart");
    }
    pipeline.replace(Arc::new(new), templates);
    Ok(())
}

/// The desks the running mailboxes (started under `old`) file into that `new` no longer
/// has, as "mailbox NAME files into desk KEY, which the new configuration lacks".
fn desks_taken_from_running_mailboxes(old: &Config, new: &Config) -> Vec<String> {
    old.mailboxes
        .iter()
        .filter(|mb| !new.policy.desks.iter().any(|d| d.key == mb.desk))
        .map(|mb| {
            format!(
                "mailbox {} files into desk {}, which the new configuration lacks",
                mb.name, mb.desk
            )
        })
        .collect()
}

/// The sections a reload cannot apply to the running daemon.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    if differs(&old.mailboxes, &new.mailboxes) {
        changed.push("mailboxes");
    }
    if differs(&old.database, &new.database) {
        changed.push("database");
    }
    if differs(&old.http, &new.http) {
        changed.push("http");
    }
    if differs(&old.smtp, &new.smtp) {
        changed.push("smtp");
    }
    if differs(&old.outbox, &new.outbox) {
        changed.push("outbox");
    }
    changed
}

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod tests;
