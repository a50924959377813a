//! Runs mailbox sources only while this instance holds their leases, and shares the
//! mailboxes fairly between instances.
//!
//! Several instances may point at one database; each mailbox is worked by one of them at
//! a time (`store::lease`). Instances announce themselves with the mailboxes they are
//! configured for ([`heartbeat`]). An instance's fair share is what it would hold if
//! every mailbox were split evenly between the instances that can take it: the sum of
//! `1 / instances configured for it` over its mailboxes, rounded up (`ceil(mailboxes /
//! instances)` when all have the same list). So an instance without mailboxes (HTTP
//! only) or with another list (a rolling restart) does not lower the others' shares.
//! Each takes at most its share; one holding more gives one back after the batch in
//! flight, but only a mailbox that another instance could take within its own share, so
//! what is given back is taken. Shares alone can still leave a mailbox unworked (every
//! instance configured for it at its share); a mailbox nobody has held for a lease time
//! is therefore taken above the share, with a warning, and not given back while this
//! instance holds it: every mailbox ends up worked, and nothing flaps. When an instance
//! dies its leases expire (`database.mailbox_lease`) and the others take its mailboxes
//! over. A holder whose renewals fail for the whole lease time stops its source; the
//! batch in flight cannot commit anyway, as every batch renews the lease in its own
//! transaction ([`crate::pipeline::Fence`]).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pipeline::{Fence, Pipeline};
use crate::store::{LiveInstance, Store};

/// This process's name in lease rows: host, pid and a random suffix, so a restarted
/// process (same pid in a container) is a different holder; then, after a `/`, a tag
/// for this machine's boot and pid namespace, so a successor can tell that a holder was
/// a process here that is gone ([`gone_from_here`]).
pub fn instance_id() -> String {
    let name = format!(
        "{}:{}:{:06x}",
        host_name(),
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    );
    match machine_tag() {
        Some(tag) => format!("{name}/{tag}"),
        None => name,
    }
}

/// The host name; /proc/sys is hidden under the unit's ProcSubset=pid: /etc/hostname then.
fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// This boot of this machine, this pid namespace and this user: a pid means the same
/// process only where all are the same. Under the unit's `ProcSubset=pid` the boot id
/// is hidden and the machine id stands in: a holder from before a reboot is gone, and
/// its pid, if in use again, is checked like any other ([`gone_from_here`]). The user
/// is in it because under `ProtectProc=invisible` another user's processes are not in
/// /proc at all: an instance run by another user (a second unit, an admin's `intake
/// run`) would look gone while it runs.
fn machine_tag() -> Option<String> {
    machine_tag_as(own_uid()?)
}

/// [`machine_tag`] for a process of user `uid` on this machine.
fn machine_tag_as(uid: u32) -> Option<String> {
    let boot = ["/proc/sys/kernel/random/boot_id", "/etc/machine-id"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find(|id| !id.trim().is_empty())?;
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let tag = crate::message::content_hash(
        format!("{}|{}|{uid}", boot.trim(), pid_ns.display()).as_bytes(),
    );
    Some(tag[..12].to_string())
}

/// The user this process runs as (the owner of its /proc entry).
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
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
    let (Some(_suffix), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    // Cloned machines may share a machine id (the tag under ProcSubset=pid); their
    // names tell them apart.
    if host != host_name() {
        return false;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if pid == std::process::id() {
        // This process has the pid now; the holder was an earlier one (the name differs).
        return true;
    }
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        // No such process. Anything else (not allowed to look) is uncertain.
        Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
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
    /// The mailboxes this instance is configured for.
    mailboxes: Vec<String>,
    shares: Mutex<Shares>,
}

/// Leases held and the shares, as of the last heartbeat.
#[derive(Debug)]
struct Shares {
    /// Leases this instance holds.
    held: usize,
    /// This instance's fair share.
    share: usize,
    /// Instances alive, this one included.
    live: usize,
    /// The other live instances.
    peers: Vec<Peer>,
}

/// Another live instance, as of the last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    /// The mailboxes it is configured for; `None`: a version that did not say.
    serves: Option<BTreeSet<String>>,
    /// How many more leases it would take within its share. Counted down as this
    /// instance gives it mailboxes, until the next heartbeat.
    room: usize,
}

impl Peer {
    fn serves(&self, mailbox: &str) -> bool {
        self.serves.as_ref().is_none_or(|s| s.contains(mailbox))
    }
}

/// This instance's fair share and the other live instances, from the heartbeat's list
/// (this instance, configured for `mine`, is `me`). An instance counts toward the share
/// of a mailbox only when configured for it; one that did not say which (an older
/// version) counts for every mailbox, as it counts itself, and is never given one (its
/// room is unknown). A mailbox nobody holds (`unheld`: given back and not yet taken, or
/// its holder gone) takes room from every peer that could take it: counted from the
/// leases held alone, the room a mailbox given back has not filled yet would look free,
/// and a second one went where only one was taken — unworked until rescued.
fn plan(me: &str, mine: &[String], live: &[LiveInstance], unheld: &[String]) -> (usize, Vec<Peer>) {
    let mut peers: Vec<(Peer, usize)> = live
        .iter()
        .filter(|i| i.holder != me)
        .map(|i| {
            let serves = i.mailboxes.as_ref().map(|m| m.iter().cloned().collect());
            (Peer { serves, room: 0 }, i.held)
        })
        .collect();
    let takers = |mailbox: &str| {
        let this = usize::from(mine.iter().any(|m| m == mailbox));
        (this + peers.iter().filter(|(p, _)| p.serves(mailbox)).count()).max(1)
    };
    // The share of an instance configured for `mailboxes`: the sum of 1/takers, rounded
    // up. The epsilon keeps float error from rounding a whole number up (3 × 1/3).
    let share_of = |mailboxes: &mut dyn Iterator<Item = &String>| -> usize {
        let sum: f64 = mailboxes.map(|m| 1.0 / takers(m) as f64).sum();
        (sum - 1e-9).ceil().max(0.0) as usize
    };
    let share = share_of(&mut mine.iter());
    let rooms: Vec<usize> = peers
        .iter()
        .map(|(p, held)| match &p.serves {
            Some(serves) => {
                let coming = unheld.iter().filter(|m| serves.contains(*m)).count();
                share_of(&mut serves.iter()).saturating_sub(*held + coming)
            }
            None => 0,
        })
        .collect();
    for ((peer, _), room) in peers.iter_mut().zip(rooms) {
        peer.room = room;
    }
    (share, peers.into_iter().map(|(p, _)| p).collect())
}

impl Board {
    pub fn new(holder: String, ttl: Duration, mailboxes: Vec<String>) -> Board {
        let share = mailboxes.len();
        Board {
            holder,
            ttl,
            mailboxes,
            shares: Mutex::new(Shares {
                held: 0,
                share,
                live: 1,
                peers: Vec::new(),
            }),
        }
    }

    fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs().max(1) as i64
    }

    fn shares(&self) -> MutexGuard<'_, Shares> {
        // Nothing panics while holding the lock; if something did, the counts are
        // still whole numbers worth using.
        self.shares.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a heartbeat's list of live instances in force. Returns the share and the
    /// number of instances when either changed.
    fn update(&self, live: &[LiveInstance], unheld: &[String]) -> Option<(usize, usize)> {
        let (share, peers) = plan(&self.holder, &self.mailboxes, live, unheld);
        let mut shares = self.shares();
        let changed = shares.share != share || shares.live != peers.len() + 1;
        shares.share = share;
        shares.live = peers.len() + 1;
        shares.peers = peers;
        changed.then_some((share, shares.live))
    }

    /// True while this instance holds fewer leases than its share.
    fn below_share(&self) -> bool {
        let shares = self.shares();
        shares.held < shares.share
    }

    fn took(&self) {
        self.shares().held += 1;
    }

    fn dropped(&self) {
        let mut shares = self.shares();
        shares.held = shares.held.saturating_sub(1);
    }

    /// Claims the right to give `mailbox` back: this instance holds more than its share
    /// and another one configured for the mailbox has room for it.
    fn claim_surplus(&self, mailbox: &str) -> bool {
        let mut shares = self.shares();
        if shares.held <= shares.share {
            return false;
        }
        let Some(taker) = shares
            .peers
            .iter_mut()
            .find(|p| p.room > 0 && p.serves(mailbox))
        else {
            return false;
        };
        taker.room -= 1;
        shares.held -= 1;
        true
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
    match store
        .instance_beat(&board.holder, board.ttl_secs(), &board.mailboxes)
        .await
    {
        Ok(beat) => {
            if let Some((share, live)) = board.update(&beat.live, &beat.unheld) {
                tracing::info!(
                    instances = live,
                    fair_share = share,
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

/// Why this instance holds a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Within its share.
    Share,
    /// Above its share, because nobody else took the mailbox: kept while held.
    Rescue,
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
    // Since when this task, at its share, has seen nobody hold the lease.
    let mut unheld_since = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let attempt = if board.below_share() {
            unheld_since = None;
            match store.lease_acquire(&mailbox, &board.holder, ttl_secs).await {
                Ok(false) => take_from_gone(&store, &mailbox, &board.holder, ttl_secs).await,
                other => other,
            }
            .map(|taken| taken.then_some(Turn::Share))
        } else {
            rescue(&store, &mailbox, &board, &mut unheld_since).await
        };
        match attempt {
            Ok(Some(turn)) => {
                board.took();
                if standing_by {
                    tracing::info!(mailbox = %mailbox, "took over the mailbox");
                }
                standing_by = false;
                unheld_since = None;
                let session = shutdown.child_token();
                let fenced = pipeline.with_fence(Fence {
                    mailbox: mailbox.clone(),
                    holder: board.holder.clone(),
                    ttl_secs,
                });
                let work = source(fenced, session.clone());
                let keeper = keep(&store, &mailbox, &board, turn, every, session.clone());
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
                    board.dropped();
                }
                if shutdown.is_cancelled() || matches!(ended, Some(Ended::GivenBack)) {
                    if let Err(e) = store.lease_release(&mailbox, &board.holder).await {
                        tracing::warn!(mailbox = %mailbox, error = %crate::outbox::error_chain(&e), "cannot release the mailbox lease; it expires by itself");
                    }
                    if shutdown.is_cancelled() {
                        return;
                    }
                    tracing::info!(mailbox = %mailbox, "gave the mailbox to another instance (this one held more than its share)");
                } else {
                    tracing::warn!(mailbox = %mailbox, "lost the mailbox lease; standing by");
                }
            }
            Ok(None) => {
                if !standing_by {
                    standing_by = true;
                    let who = store.lease_holder(&mailbox).await.ok().flatten();
                    tracing::info!(
                        mailbox = %mailbox,
                        holder = who.as_ref().map_or("none", |w| w.holder.as_str()),
                        "another instance works this mailbox, or this one has its share; standing by"
                    );
                }
                // Unheld for a lease time, the mailbox is taken above the share
                // (`rescue`): standing by means someone works it.
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

/// Takes `mailbox` above this instance's share once nobody has held its lease for a
/// lease time (`unheld_since` keeps when this task first saw it unheld). Shares are fair
/// on the whole, not for every mailbox: every instance configured for this one may be at
/// its share with others (or another may count as having room and not take it, its
/// task failing), and then only this keeps the mailbox worked.
async fn rescue(
    store: &Store,
    mailbox: &str,
    board: &Board,
    unheld_since: &mut Option<tokio::time::Instant>,
) -> Result<Option<Turn>, crate::store::StoreError> {
    let unheld = match store.lease_holder(mailbox).await? {
        None => true,
        Some(lease) => lease.expires_at < lease.now,
    };
    if !unheld {
        *unheld_since = None;
        return Ok(None);
    }
    let since = *unheld_since.get_or_insert_with(tokio::time::Instant::now);
    if since.elapsed() < board.ttl {
        return Ok(None);
    }
    tracing::warn!(
        mailbox = %mailbox,
        unheld_for = ?since.elapsed(),
        "nobody has worked this mailbox for a lease time; taking it above this instance's share"
    );
    let taken = store
        .lease_acquire(mailbox, &board.holder, board.ttl_secs())
        .await?;
    if !taken {
        // Another instance was quicker: the mailbox is worked.
        *unheld_since = None;
    }
    Ok(taken.then_some(Turn::Rescue))
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
/// returns when the lease is lost or this instance gives it back (only a `Turn::Share`).
async fn keep(
    store: &Store,
    mailbox: &str,
    board: &Board,
    turn: Turn,
    every: Duration,
    session: CancellationToken,
) -> Ended {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = session.cancelled() => return std::future::pending().await,
            _ = tokio::time::sleep(every) => {}
        }
        // A mailbox taken because nobody else did is not given back: that could hand
        // it to an instance that again does not take it, and so on.
        if turn == Turn::Share && board.claim_surplus(mailbox) {
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
