//! Runs mailbox sources only while this instance holds their leases, and shares the
//! mailboxes fairly between instances.
//!
//! Several instances may point at one database with the same mailboxes; each mailbox
//! is worked by one of them at a time (`store::lease`). Instances announce themselves
//! ([`heartbeat`]); each takes at most its fair share, `ceil(mailboxes / instances)`,
//! and one holding more than that (another instance joined) gives one back after the
//! batch in flight. When an instance dies its leases expire (`database.mailbox_lease`)
//! and the others take its mailboxes over. A holder whose renewals fail for the whole
//! lease time stops its source; the batch in flight cannot commit anyway, as every
//! batch renews the lease in its own transaction ([`crate::pipeline::Fence`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pipeline::{Fence, Pipeline};
use crate::store::Store;

/// This process's name in lease rows: host, pid and a random suffix, so a restarted
/// process (same pid in a container) is a different holder; then, after a `/`, a tag
/// for this machine's boot and pid namespace, so a successor can tell that a holder was
/// a process here that is gone ([`gone_from_here`]).
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let name = format!(
        "{host}:{}:{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    );
    match machine_tag() {
        Some(tag) => format!("{name}/{tag}"),
        None => name,
    }
}

/// This boot of this machine and this pid namespace: a pid means the same process
/// only where both are the same.
fn machine_tag() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let tag =
        crate::message::content_hash(format!("{}|{}", boot.trim(), pid_ns.display()).as_bytes());
    Some(tag[..12].to_string())
}

/// True when `holder` (another instance's [`instance_id`]) was a process on this
/// machine, in this pid namespace, that no longer runs: killed, crashed, or the
/// process this one replaced on a restart. Its leases can be taken at once instead of
/// after they expire. Anything uncertain (another machine, an older holder name, a pid
/// now used by another intake) is false: that lease is waited out.
pub fn gone_from_here(holder: &str) -> bool {
    let Some((name, tag)) = holder.rsplit_once('/') else {
        return false;
    };
    if machine_tag().as_deref() != Some(tag) {
        return false;
    }
    let mut parts = name.rsplitn(3, ':');
    let (Some(_suffix), Some(pid), Some(_host)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if pid == std::process::id() {
        // This process has the pid now; the holder was an earlier one (the name differs).
        return true;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // `pid (comm) state ...`: a zombie is dead, and a pid reused by another program
    // is not the holder.
    let Some((comm_part, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    if rest.starts_with('Z') || rest.starts_with('X') {
        return true;
    }
    let comm = comm_part.split_once(" (").map_or("", |(_, c)| c);
    let own = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    comm != own.trim()
}

/// What this instance's mailbox tasks share.
#[derive(Debug)]
pub struct Board {
    pub holder: String,
    pub ttl: Duration,
    /// Mailboxes in the configuration (every instance has the same).
    mailboxes: usize,
    /// Leases this instance holds.
    held: AtomicUsize,
    /// Instances alive, as of the last heartbeat.
    live: AtomicUsize,
}

impl Board {
    pub fn new(holder: String, ttl: Duration, mailboxes: usize) -> Board {
        Board {
            holder,
            ttl,
            mailboxes,
            held: AtomicUsize::new(0),
            live: AtomicUsize::new(1),
        }
    }

    fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs().max(1) as i64
    }

    fn fair_share(&self) -> usize {
        let live = self.live.load(Ordering::Relaxed).max(1);
        self.mailboxes.div_ceil(live).max(1)
    }

    /// Claims the right to give one lease back when holding more than the fair share.
    fn claim_surplus(&self) -> bool {
        let share = self.fair_share();
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                (h > share).then(|| h - 1)
            })
            .is_ok()
    }
}

/// Announces this instance every third of the lease time until `shutdown`, keeping
/// the count of live instances on `board`. Call [`beat`] once before starting sources.
pub async fn heartbeat(store: Store, board: Arc<Board>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(board.ttl / 3) => {}
        }
        beat(&store, &board).await;
    }
    if let Err(e) = store.instance_leave(&board.holder).await {
        tracing::debug!(error = %crate::outbox::error_chain(&e), "cannot remove this instance's row; it expires");
    }
}

/// Forgets instances that ran on this machine and are gone (the process this one
/// replaced on a restart), so the first heartbeat does not count them as alive.
pub async fn forget_gone(store: &Store) {
    let holders = match store.instance_holders().await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %crate::outbox::error_chain(&e), "cannot list instances");
            return;
        }
    };
    for holder in holders.iter().filter(|h| gone_from_here(h)) {
        match store.instance_leave(holder).await {
            Ok(()) => {
                tracing::info!(instance = %holder, "forgot an instance on this machine that is gone")
            }
            Err(e) => {
                tracing::warn!(instance = %holder, error = %crate::outbox::error_chain(&e), "cannot forget an instance that is gone")
            }
        }
    }
}

/// One heartbeat.
pub async fn beat(store: &Store, board: &Board) {
    match store.instance_beat(&board.holder, board.ttl_secs()).await {
        Ok(live) => {
            let live = usize::try_from(live).unwrap_or(1);
            let before = board.live.swap(live, Ordering::Relaxed);
            if before != live {
                tracing::info!(
                    instances = live,
                    fair_share = board.fair_share(),
                    "instances sharing the mailboxes"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %crate::outbox::error_chain(&e), "cannot record this instance")
        }
    }
}

/// How a turn with the lease ended.
enum Ended {
    /// Another instance has the lease now, or renewals failed too long.
    Lost,
    /// This instance held more than its share and gave this one back.
    GivenBack,
}

/// Runs `source` (until its token is cancelled) whenever this instance holds the lease
/// on `mailbox`, until `shutdown`.
pub async fn run_leased<F, Fut>(
    pipeline: Pipeline,
    mailbox: String,
    board: Arc<Board>,
    shutdown: CancellationToken,
    source: F,
) where
    F: Fn(Pipeline, CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let ttl_secs = board.ttl_secs();
    let every = board.ttl / 3;
    let store = pipeline.store().clone();
    let mut standing_by = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let attempt = if board.held.load(Ordering::SeqCst) >= board.fair_share() {
            Ok(false)
        } else {
            match store.lease_acquire(&mailbox, &board.holder, ttl_secs).await {
                Ok(false) => take_from_gone(&store, &mailbox, &board.holder, ttl_secs).await,
                other => other,
            }
        };
        match attempt {
            Ok(true) => {
                board.held.fetch_add(1, Ordering::SeqCst);
                if standing_by {
                    tracing::info!(mailbox = %mailbox, "took over the mailbox");
                }
                standing_by = false;
                let session = shutdown.child_token();
                let fenced = pipeline.with_fence(Fence {
                    mailbox: mailbox.clone(),
                    holder: board.holder.clone(),
                    ttl_secs,
                });
                let work = source(fenced, session.clone());
                let keeper = keep(&store, &mailbox, &board, every, session.clone());
                tokio::pin!(work);
                let ended = tokio::select! {
                    () = &mut work => None,
                    ended = keeper => {
                        // Let the source finish its batch in flight and stop.
                        session.cancel();
                        work.await;
                        Some(ended)
                    }
                };
                session.cancel();
                if !matches!(ended, Some(Ended::GivenBack)) {
                    board.held.fetch_sub(1, Ordering::SeqCst);
                }
                if shutdown.is_cancelled() || matches!(ended, Some(Ended::GivenBack)) {
                    if let Err(e) = store.lease_release(&mailbox, &board.holder).await {
                        tracing::warn!(mailbox = %mailbox, error = %crate::outbox::error_chain(&e), "cannot release the mailbox lease; it expires by itself");
                    }
                    if shutdown.is_cancelled() {
                        return;
                    }
                    tracing::info!(mailbox = %mailbox, "gave the mailbox to another instance (more instances than before)");
                } else {
                    tracing::warn!(mailbox = %mailbox, "lost the mailbox lease; standing by");
                }
            }
            Ok(false) => {
                if !standing_by {
                    standing_by = true;
                    let who = store.lease_holder(&mailbox).await.ok().flatten();
                    tracing::info!(
                        mailbox = %mailbox,
                        holder = who.as_ref().map_or("none", |w| w.holder.as_str()),
                        "another instance works this mailbox, or this one has its share; standing by"
                    );
                }
                pipeline.health.ok(&mailbox);
            }
            Err(e) => {
                tracing::warn!(mailbox = %mailbox, error = %crate::outbox::error_chain(&e), "cannot take the mailbox lease");
                pipeline.health.failed(&mailbox, &e.to_string());
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Takes the lease on `mailbox` when its holder was a process on this machine that is
/// gone (see [`gone_from_here`]), instead of waiting for it to expire.
async fn take_from_gone(
    store: &Store,
    mailbox: &str,
    holder: &str,
    ttl_secs: i64,
) -> Result<bool, crate::store::StoreError> {
    let Some(current) = store.lease_holder(mailbox).await? else {
        return Ok(false);
    };
    if current.holder == holder || !gone_from_here(&current.holder) {
        return Ok(false);
    }
    let taken = store
        .lease_take_over(mailbox, &current.holder, holder, ttl_secs)
        .await?;
    if taken {
        tracing::info!(mailbox = %mailbox, from = %current.holder, "took over the lease of an instance on this machine that is gone");
        store.instance_leave(&current.holder).await?;
    }
    Ok(taken)
}

/// Renews the lease every `every` while `session` lasts (then never returns), and
/// returns when the lease is lost or this instance gives it back.
async fn keep(
    store: &Store,
    mailbox: &str,
    board: &Board,
    every: Duration,
    session: CancellationToken,
) -> Ended {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = session.cancelled() => return std::future::pending().await,
            _ = tokio::time::sleep(every) => {}
        }
        if board.claim_surplus() {
            return Ended::GivenBack;
        }
        match store
            .lease_renew(mailbox, &board.holder, board.ttl_secs())
            .await
        {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => return Ended::Lost,
            Err(e) => {
                tracing::warn!(mailbox = %mailbox, error = %crate::outbox::error_chain(&e), "cannot renew the mailbox lease");
                if last_renewed.elapsed() >= board.ttl {
                    return Ended::Lost;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
