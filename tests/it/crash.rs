//! Crash safety and faults: `intake run` killed with SIGKILL at random moments of a
//! large ingest (from a Maildir, and from an IMAP backlog in Dovecot), restarted at once
//! each time and finally left to finish, loses and doubles nothing: every message has one
//! ledger row, every new sender one request and one account, every reply one comment,
//! every account one invitation. PostgreSQL crashing and restarting under a running
//! daemon, and Dovecot restarting while intake waits in IDLE, are survived without
//! restarting intake.
//!
//! The kill schedule is random but repeatable: it comes from a seed, printed by each
//! test (`--nocapture` shows it; failure messages include it). Set `INTAKE_CRASH_SEED`
//! to replay one. Kill k comes a random delay (up to 0.6 s; none for one kill in four)
//! after the job (messages acknowledged plus mails delivered) passed the k-th of some
//! random points, and after the run got somewhere, so the kills spread over the whole
//! job however fast the machine is: mid-batch, between commit and acknowledgement,
//! mid-send. Where exactly in the code a kill lands still depends on timing.
//!
//! One limit is inherent, and measured rather than hidden: a mail is marked sent after
//! the transport took it, so a kill in between sends it again, with the same Message-ID
//! (README.md, "Several instances"). Over SMTP that window is most of each send: once
//! lettre has written the end of DATA the kernel delivers it even if the process is
//! gone, and lettre 0.11 leaves Nagle on, so that last small write waits about 40 ms for
//! the relay's delayed ACK. A kill while mail is going out nearly always resends one.
//! The file transport replaces its file on a resend, which the test sees as a new inode.
//! Resends are printed, and must stay within one per kill.
//!
//! (SMTP down and then up is `verification::smtp_down_then_up_loses_and_doubles_nothing`;
//! Dovecot crashing mid-backlog is `imap::dovecot_restart_mid_backlog_loses_and_doubles_nothing`.)

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::dovecot::Dovecot;
use crate::harness::*;
use crate::smtp::{Mode, Smtp};

const WAIT: Duration = Duration::from_secs(30);

/// The seed when `INTAKE_CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 20_261_123;

/// Every `REPLY_EVERY`-th new request gets a reply from its reporter.
const REPLY_EVERY: usize = 9;

/// A kill comes up to this long after its point in the job was reached: about one
/// batch's work, so it lands anywhere in one.
const JITTER_MS: u64 = 600;

/// Settings for every run. A killed instance cannot give its mailbox back, so the next
/// one waits for the lease to run out: 3 s is the least allowed.
fn vars(env: &Env) -> Vec<(&'static str, &'static str)> {
    let mut vars = vec![
        ("INTAKE__DATABASE__MAILBOX_LEASE", "3s"),
        ("INTAKE__OUTBOX__MAX_PER_HOUR", "100000"),
        // A new process binds at once, whatever the killed one left behind.
        ("INTAKE__HTTP__LISTEN", "127.0.0.1:0"),
    ];
    // A mail a killed instance had claimed waits for the claim to run out: nine SMTP
    // timeouts per mail claimed, plus 5 s (23 s here; 30 s with the file transport).
    if std::fs::read_to_string(&env.config).is_ok_and(|c| c.contains("[smtp]")) {
        vars.push(("INTAKE__SMTP__TIMEOUT", "1s"));
    }
    vars
}

/// SplitMix64: small, and the same sequence on every platform and crate version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The run's seed: `INTAKE_CRASH_SEED` (decimal or 0x-hex) or [`DEFAULT_SEED`].
fn seed(test: &str) -> u64 {
    let seed = match std::env::var("INTAKE_CRASH_SEED") {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("INTAKE_CRASH_SEED={s:?}: {e}"))
        }
        Err(_) => DEFAULT_SEED,
    };
    println!("{test}: seed {seed} (replay with INTAKE_CRASH_SEED={seed})");
    seed
}

fn sender(i: usize) -> String {
    format!("s{i:05}@outside.example")
}

fn original_id(i: usize) -> String {
    format!("crash-{i}@outside.example")
}

fn reply_id(j: usize) -> String {
    format!("crash-reply-{j}@outside.example")
}

/// One ingest: new requests from distinct senders, and a reply from the reporter of every
/// ninth one, delivered three messages after it (so a reply usually shares a batch with
/// its request, and after some kills does not). Half of the replies thread by
/// In-Reply-To, half by the subject key alone (`[IT-n]`, which works because the sender
/// is the reporter).
struct Workload {
    originals: usize,
    /// Originals that get a reply.
    replied: Vec<usize>,
    /// (name, message) in delivery order: Maildir names sort in it, IMAP UIDs follow it.
    messages: Vec<(String, Vec<u8>)>,
}

impl Workload {
    fn new(total: usize) -> Workload {
        let originals = total * REPLY_EVERY / (REPLY_EVERY + 1);
        let replied: Vec<usize> = (0..originals).step_by(REPLY_EVERY).collect();
        assert_eq!(originals + replied.len(), total, "pick a multiple of 10");
        let mut messages: Vec<(String, Vec<u8>)> = (0..originals)
            .map(|i| {
                let raw = format!(
                    "From: Sender {i} <{from}>\r\nTo: it@desk.example\r\nSubject: Problem {i}\r\n\
                     Message-ID: <{id}>\r\n\r\nThe thing number {i} is broken.\r\n",
                    from = sender(i),
                    id = original_id(i)
                );
                (format!("{i:05}-a"), raw.into_bytes())
            })
            .collect();
        for (n, &j) in replied.iter().enumerate() {
            let threading = if n % 2 == 0 {
                format!(
                    "Subject: Re: Problem {j}\r\nIn-Reply-To: <{}>\r\n",
                    original_id(j)
                )
            } else {
                // Request numbers follow delivery order: original j is IT-(j+1).
                format!("Subject: Re: [IT-{}] Problem {j}\r\n", j + 1)
            };
            let raw = format!(
                "From: Sender {j} <{from}>\r\nTo: it@desk.example\r\n{threading}\
                 Message-ID: <{id}>\r\n\r\nStill broken, says {j}.\r\n",
                from = sender(j),
                id = reply_id(j)
            );
            messages.push((format!("{:05}-b", j + 3), raw.into_bytes()));
        }
        messages.sort_by(|a, b| a.0.cmp(&b.0));
        Workload {
            originals,
            replied,
            messages,
        }
    }

    fn total(&self) -> usize {
        self.messages.len()
    }

    /// Delivers every message into the Maildir (via `tmp/`, as an MTA does).
    fn deliver_to_maildir(&self, env: &Env) {
        let maildir = env.path("maildir");
        for d in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        for (name, raw) in &self.messages {
            let tmp = maildir.join("tmp").join(name);
            std::fs::write(&tmp, raw).unwrap();
            std::fs::rename(&tmp, maildir.join("new").join(name)).unwrap();
        }
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Where outgoing mail lands, and how a second copy of a mail is seen.
enum Sink<'a> {
    /// A real relay (aiosmtpd): every copy is a file; copies share the Message-ID.
    Smtp(&'a Smtp),
    /// The file transport writes one file per outbox row, and a resend replaces it
    /// (atomically, by rename): the file's inode changes. Inodes are noted after every
    /// kill; `replaced` counts the files found replaced since.
    Files {
        dir: PathBuf,
        inodes: RefCell<BTreeMap<String, u64>>,
        replaced: Cell<usize>,
    },
}

impl Sink<'_> {
    fn files(dir: PathBuf) -> Sink<'static> {
        Sink::Files {
            dir,
            inodes: RefCell::default(),
            replaced: Cell::new(0),
        }
    }

    fn paths(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        v
    }

    /// Mails delivered so far (copies included).
    fn delivered(&self) -> usize {
        match self {
            Sink::Smtp(smtp) => {
                count_files(&smtp.maildir.join("new")) + count_files(&smtp.maildir.join("cur"))
            }
            Sink::Files { dir, .. } => Self::paths(dir).len(),
        }
    }

    /// Notes which file is which, counting those replaced since the last look.
    fn note(&self) {
        if let Sink::Files {
            dir,
            inodes,
            replaced,
        } = self
        {
            use std::os::unix::fs::MetadataExt;
            let mut inodes = inodes.borrow_mut();
            for path in Self::paths(dir) {
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if let Some(old) = inodes.insert(name, meta.ino())
                    && old != meta.ino()
                {
                    replaced.set(replaced.get() + 1);
                }
            }
        }
    }

    /// (Message-ID, To) of every copy delivered, and how many were sent again without
    /// leaving a copy (a replaced file).
    fn mails(&self) -> (Vec<(String, String)>, usize) {
        let raws: Vec<Vec<u8>> = match self {
            Sink::Smtp(smtp) => smtp.messages(),
            Sink::Files { dir, .. } => Self::paths(dir)
                .iter()
                .map(|p| std::fs::read(p).unwrap())
                .collect(),
        };
        let mails = raws
            .iter()
            .map(|raw| {
                let raw = String::from_utf8_lossy(raw);
                (
                    header(&raw, "Message-ID").unwrap_or_default(),
                    header(&raw, "To").unwrap_or_default(),
                )
            })
            .collect();
        self.note();
        let replaced = match self {
            Sink::Smtp(_) => 0,
            Sink::Files { replaced, .. } => replaced.get(),
        };
        (mails, replaced)
    }
}

/// The value of the first `name:` header.
fn header(raw: &str, name: &str) -> Option<String> {
    raw.lines()
        .take_while(|l| !l.is_empty())
        .find(|l| {
            l.len() > name.len()
                && l[..name.len()].eq_ignore_ascii_case(name)
                && l.as_bytes()[name.len()] == b':'
        })
        .map(|l| {
            l[name.len() + 1..]
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
}

/// The database, read directly: the invariants below are about rows the CLI only
/// shows one request at a time.
pub(crate) struct Db {
    rt: tokio::runtime::Runtime,
    pool: sqlx::AnyPool,
}

impl Db {
    pub(crate) fn open(url: &str) -> Db {
        sqlx::any::install_default_drivers();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pool = rt
            .block_on(
                sqlx::any::AnyPoolOptions::new()
                    .max_connections(1)
                    .connect(url),
            )
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
        Db { rt, pool }
    }

    pub(crate) fn all<T>(&self, sql: &'static str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
    {
        self.rt
            .block_on(sqlx::query_as::<_, T>(sql).fetch_all(&self.pool))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// [`Db::count`], or `None` while the query fails (the schema not created yet).
    pub(crate) fn try_count(&self, sql: &'static str) -> Option<usize> {
        self.rt
            .block_on(sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool))
            .ok()
            .map(|n| n as usize)
    }

    pub(crate) fn count(&self, sql: &'static str) -> usize {
        self.rt
            .block_on(sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool))
            .unwrap_or_else(|e| panic!("{sql}: {e}")) as usize
    }

    /// Every message decided and every mail marked sent.
    fn finished(&self, w: &Workload) -> bool {
        self.count("SELECT COUNT(*) FROM ledger") >= w.total()
            && self.count("SELECT COUNT(*) FROM outbox") >= w.originals
            && self.count("SELECT COUNT(*) FROM outbox WHERE status <> 'sent'") == 0
    }
}

/// What the final checks saw besides the invariants.
#[derive(Debug, Default)]
struct Seen {
    /// Mails sent more than once (a second copy with the same Message-ID at the relay,
    /// or a replaced file): sent, then killed before the outbox row was marked sent.
    resent: usize,
    /// Messages processed again after a kill and found in the ledger.
    duplicates_skipped: usize,
}

/// The invariants after the final run: nothing lost, nothing doubled.
fn check(db: &Db, w: &Workload, sink: &Sink, kills: usize, logs: &[String], ctx: &str) -> Seen {
    let mut seen = Seen::default();
    // Requests: one per original, numbered in delivery order without gaps.
    let requests: Vec<(String, i64, String, String)> = db
        .all("SELECT request_key, number, reporter_address, status FROM requests ORDER BY number");
    assert_eq!(requests.len(), w.originals, "{ctx}: requests");
    for (i, (key, number, reporter, status)) in requests.iter().enumerate() {
        assert_eq!(
            (*number, reporter.as_str(), status.as_str()),
            (i as i64 + 1, sender(i).as_str(), "open"),
            "{ctx}: request {key}: every reporter exactly once, in delivery order"
        );
    }
    // Comments: exactly the replies, each once, on its reporter's request.
    let comments: Vec<(String, String, Option<String>)> = db.all(
        "SELECT r.reporter_address, c.author_address, c.message_id \
         FROM comments c JOIN requests r ON r.id = c.request_id",
    );
    let mut got: Vec<(String, String, String)> = comments
        .into_iter()
        .map(|(r, a, m)| (r, a, m.unwrap_or_default()))
        .collect();
    got.sort();
    let mut want: Vec<(String, String, String)> = w
        .replied
        .iter()
        .map(|&j| (sender(j), sender(j), reply_id(j)))
        .collect();
    want.sort();
    assert_eq!(got, want, "{ctx}: one comment per reply");
    // Accounts: one per sender (the directory's own are on other domains).
    let mut accounts: Vec<String> = db
        .all::<(String,)>("SELECT address FROM accounts")
        .into_iter()
        .map(|(a,)| a)
        .filter(|a| a.ends_with("@outside.example"))
        .collect();
    accounts.sort();
    let senders: Vec<String> = (0..w.originals).map(sender).collect();
    assert_eq!(accounts, senders, "{ctx}: one account per sender");
    // Ledger: one row per message, none quarantined.
    let actions: BTreeMap<String, i64> = db
        .all::<(String, i64)>("SELECT action, COUNT(*) FROM ledger GROUP BY action")
        .into_iter()
        .collect();
    let want_actions: BTreeMap<String, i64> = [
        ("add_comment".to_string(), w.replied.len() as i64),
        ("create_request".to_string(), w.originals as i64),
    ]
    .into();
    assert_eq!(actions, want_actions, "{ctx}: ledger rows by action");
    let audit: Vec<(i64, i64)> =
        db.all("SELECT COUNT(*), COUNT(DISTINCT ledger_id) FROM audit WHERE ledger_id IS NOT NULL");
    assert_eq!(
        audit,
        vec![(w.total() as i64, w.total() as i64)],
        "{ctx}: one audit row per message"
    );
    // Outbox: one invitation per new account, every one sent.
    let outbox: Vec<(String, String, String, String)> =
        db.all("SELECT to_address, kind, status, message_id FROM outbox ORDER BY to_address");
    let rows: Vec<(String, String, String)> = outbox
        .iter()
        .map(|(to, kind, status, _)| (to.clone(), kind.clone(), status.clone()))
        .collect();
    let want_rows: Vec<(String, String, String)> = senders
        .iter()
        .map(|s| (s.clone(), "invitation".into(), "sent".into()))
        .collect();
    assert_eq!(rows, want_rows, "{ctx}: outbox rows");
    // Delivered: each outbox row's Message-ID, to its recipient, and nothing else.
    let by_id: BTreeMap<&str, &str> = outbox
        .iter()
        .map(|(to, _, _, id)| (id.as_str(), to.as_str()))
        .collect();
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    let (mails, replaced) = sink.mails();
    for (id, to) in mails {
        assert_eq!(
            by_id.get(id.as_str()).copied(),
            Some(to.as_str()),
            "{ctx}: a mail that is no outbox row's: Message-ID {id}, To {to}"
        );
        *copies.entry(id).or_default() += 1;
    }
    assert_eq!(copies.len(), w.originals, "{ctx}: every invitation arrived");
    seen.resent = copies.values().map(|n| n - 1).sum::<usize>() + replaced;
    assert!(
        seen.resent <= kills,
        "{ctx}: {} resends after {kills} kills: more than the one mail a kill can catch \
         between sending and marking it sent: {:?}, {replaced} files replaced",
        seen.resent,
        copies.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    for (n, log) in logs.iter().enumerate() {
        assert!(!log.contains("panicked"), "{ctx}: run {n} panicked:\n{log}");
        seen.duplicates_skipped += log.matches("reason=\"duplicate_message\"").count();
    }
    seen
}

/// How the kills went.
struct Crashes {
    /// Logs of every run, the killed ones first.
    logs: Vec<String>,
    /// Job progress at each kill.
    killed_at: Vec<usize>,
    /// Kills that came before the job was done.
    mid_job: usize,
}

/// When the kills come, drawn up front so that it depends on the seed alone.
struct Schedule {
    /// The job's size, in the units of its progress.
    total: usize,
    /// Kill k comes after the job passed `points[k]`...
    points: Vec<usize>,
    /// ...and then this many milliseconds.
    delays: Vec<u64>,
}

impl Schedule {
    fn draw(rng: &mut Rng, kills: usize, total: usize) -> Schedule {
        let mut points: Vec<usize> = (0..kills)
            // Not in the last tenth: the kills are for the job, not for its last mails.
            .map(|_| rng.below(total as u64 * 9 / 10) as usize)
            .collect();
        points.sort();
        // One kill in four comes at once when its point is reached: a point is reached
        // while a batch is being acknowledged, after its commit, which is the moment the
        // ledger exists for.
        let delays = (0..kills)
            .map(|_| match rng.below(4) {
                0 => 0,
                _ => rng.below(JITTER_MS),
            })
            .collect();
        Schedule {
            total,
            points,
            delays,
        }
    }
}

/// Starts `intake run` and kills it with SIGKILL as `schedule` says, restarting it at
/// once each time, then lets one last run finish and stops it with SIGTERM. `progress`
/// says how far the job is; `finished`, when it is all done.
fn crash_repeatedly(
    ctx: &str,
    env: &Env,
    sink: &Sink,
    schedule: &Schedule,
    mut progress: impl FnMut() -> usize,
    mut finished: impl FnMut() -> bool,
) -> Crashes {
    let Schedule {
        total,
        points,
        delays,
    } = schedule;
    let total = *total;
    let mut crashes = Crashes {
        logs: Vec::new(),
        killed_at: Vec::new(),
        mid_job: 0,
    };
    for (k, (&point, &delay)) in points.iter().zip(delays).enumerate() {
        let mut daemon = start_daemon_with(env, &vars(env));
        let started = Instant::now();
        // Each run gets somewhere before its kill (a batch acknowledged, a mail sent):
        // otherwise a kill could land in the wait for the dead one's mailbox lease,
        // where nothing happens.
        let point = point.max(progress() + 1).min(total);
        loop {
            if let Some(status) = daemon.exited() {
                panic!(
                    "{ctx}: run {k} ended by itself ({status}) before its kill:\n{}",
                    daemon.log()
                );
            }
            if progress() >= point {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{ctx}: run {k} made no progress to {point} of {total} in 2 minutes:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay));
        if let Some(status) = daemon.exited() {
            panic!(
                "{ctx}: run {k} ended by itself ({status}) before its kill:\n{}",
                daemon.log()
            );
        }
        let at = progress();
        crashes.logs.push(daemon.kill());
        sink.note();
        crashes.killed_at.push(at);
        if !finished() {
            crashes.mid_job += 1;
        }
    }
    let daemon = start_daemon_with(env, &vars(env));
    // Up, with its signal handlers, before the SIGTERM below.
    daemon.wait_for("the last run to start", WAIT, || {
        daemon.log().contains("intake running")
    });
    daemon.wait_for(
        &format!("the rest of the job ({ctx})"),
        Duration::from_secs(240),
        &mut finished,
    );
    crashes.logs.push(daemon.stop());
    crashes
}

#[test]
fn sigkill_at_random_moments_of_a_maildir_ingest_loses_and_doubles_nothing() {
    const MESSAGES: usize = 2000;
    const KILLS: usize = 20;
    let seed = seed("maildir");
    for (b, backend) in BACKENDS.into_iter().enumerate() {
        let started = Instant::now();
        let mut rng = Rng(seed.wrapping_add(b as u64));
        let ctx = format!("{backend:?}, seed {seed}");
        // The file transport (the default): fast enough for 1,800 invitations.
        let env = Env::new(backend, &Site::default(), &DeskSettings::default());
        let sink = Sink::files(env.path("outbox"));
        let w = Workload::new(MESSAGES);
        w.deliver_to_maildir(&env);
        let cur = env.path("maildir/cur");
        let new = env.path("maildir/new");
        let total = w.total() + w.originals;
        let mut db: Option<Db> = None;
        let crashes = crash_repeatedly(
            &ctx,
            &env,
            &sink,
            &Schedule::draw(&mut rng, KILLS, total),
            || count_files(&cur) + sink.delivered(),
            || {
                count_files(&new) == 0
                    && db
                        .get_or_insert_with(|| Db::open(&env.database_url))
                        .finished(&w)
            },
        );
        let db = Db::open(&env.database_url);
        assert_eq!(count_files(&new), 0, "{ctx}");
        assert_eq!(
            count_files(&cur),
            MESSAGES,
            "{ctx}: every message acknowledged"
        );
        assert_eq!(
            count_files(&env.path("maildir/.Quarantine/cur")),
            0,
            "{ctx}: nothing quarantined"
        );
        let seen = check(&db, &w, &sink, KILLS, &crashes.logs, &ctx);
        println!(
            "maildir {backend:?}: {MESSAGES} messages, {KILLS} kills ({} before the job was done) \
             at progress {:?} of {total}; {} messages found in the ledger again after a kill; \
             {} mails resent; {:.1} s",
            crashes.mid_job,
            crashes.killed_at,
            seen.duplicates_skipped,
            seen.resent,
            started.elapsed().as_secs_f64()
        );
        assert!(
            crashes.mid_job >= KILLS * 3 / 4,
            "{ctx}: only {} of {KILLS} kills came before the job was done",
            crashes.mid_job
        );
    }
}

#[test]
fn sigkill_at_random_moments_of_an_imap_backlog_loses_and_doubles_nothing() {
    // Smaller than the Maildir ingest: over SMTP each mail takes about 50 ms (see the
    // module comment), so mail, not the backlog, sets the length of this test.
    const MESSAGES: usize = 500;
    const KILLS: usize = 10;
    let seed = seed("imap");
    for (b, backend) in BACKENDS.into_iter().enumerate() {
        let started = Instant::now();
        let mut rng = Rng(seed.wrapping_add(0x100 + b as u64));
        let ctx = format!("IMAP {backend:?}, seed {seed}");
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        let w = Workload::new(MESSAGES);
        for (_, raw) in &w.messages {
            imap.append("INBOX", raw);
        }
        // A real relay here, where a resend leaves a second copy.
        let smtp = Smtp::start(Mode::Plain, None);
        let sink = Sink::Smtp(&smtp);
        let env = Env::with_extra(
            backend,
            &Site::default(),
            &DeskSettings::default(),
            &format!("{}\n{}", dovecot.mailbox_toml(""), smtp.toml("")),
        );
        let total = w.total() + w.originals;
        let mut db: Option<Db> = None;
        let mut watcher = dovecot.client();
        let crashes = {
            let mut seen_in_folder = || {
                let (messages, unseen) = watcher.status("INBOX");
                (messages - unseen) as usize
            };
            crash_repeatedly(
                &ctx,
                &env,
                &sink,
                &Schedule::draw(&mut rng, KILLS, total),
                || seen_in_folder() + sink.delivered(),
                || {
                    db.get_or_insert_with(|| Db::open(&env.database_url))
                        .finished(&w)
                },
            )
        };
        // A clean stop acknowledges the batch it committed last.
        assert_eq!(
            imap.status("INBOX"),
            (MESSAGES as u32, 0),
            "{ctx}: everything flagged seen"
        );
        assert_eq!(imap.status("Quarantine").0, 0, "{ctx}: nothing quarantined");
        let db = Db::open(&env.database_url);
        let seen = check(&db, &w, &sink, KILLS, &crashes.logs, &ctx);
        println!(
            "imap {backend:?}: {MESSAGES} messages, {KILLS} kills ({} before the job was done) \
             at progress {:?} of {total}; {} messages found in the ledger again after a kill; \
             {} mails resent; {:.1} s",
            crashes.mid_job,
            crashes.killed_at,
            seen.duplicates_skipped,
            seen.resent,
            started.elapsed().as_secs_f64()
        );
        assert!(
            crashes.mid_job >= KILLS * 3 / 4,
            "{ctx}: only {} of {KILLS} kills came before the job was done",
            crashes.mid_job
        );
    }
}

#[test]
fn postgres_crash_and_restart_under_a_running_backlog_loses_nothing() {
    const MESSAGES: usize = 600;
    let pg = OwnCluster::start();
    let smtp = Smtp::start(Mode::Plain, None);
    let mut env = Env::with_extra(
        Backend::Postgres,
        &Site::default(),
        &DeskSettings::default(),
        &smtp.toml(""),
    );
    // The same test world, on a server of this test's own.
    let url = pg.database("intake_restart");
    let text = std::fs::read_to_string(&env.config).unwrap();
    let line = format!("url = \"{}\"", env.database_url);
    assert!(text.contains(&line));
    std::fs::write(
        &env.config,
        text.replace(&line, &format!("url = \"{url}\"")),
    )
    .unwrap();
    env.database_url = url;

    let w = Workload::new(MESSAGES);
    w.deliver_to_maildir(&env);
    let cur = env.path("maildir/cur");
    let new = env.path("maildir/new");
    let started = Instant::now();
    let daemon = start_daemon_with(&env, &vars(&env));
    daemon.wait_for("part of the backlog", WAIT, || count_files(&cur) >= 200);

    // A crash: every connection cut mid-batch, no checkpoint. Down for longer than the
    // mailbox lease (3 s).
    pg.crash();
    std::thread::sleep(Duration::from_secs(5));
    let before = count_files(&cur);
    pg.start_again();
    let up = Instant::now();
    daemon.wait_for("work going on after the crash", WAIT, || {
        count_files(&cur) > before
    });
    let recovered_in = up.elapsed();
    assert!(
        count_files(&new) > 0,
        "the backlog was done before the server came back"
    );
    // An administrator's restart while mail is still being sent.
    let sink = Sink::Smtp(&smtp);
    let sent_before = sink.delivered();
    pg.restart();
    daemon.wait_for("mail going out after the restart", WAIT, || {
        sink.delivered() > sent_before || sink.delivered() >= w.originals
    });

    let db = Db::open(&env.database_url);
    daemon.wait_for(
        "the whole backlog and its mail",
        Duration::from_secs(180),
        || count_files(&new) == 0 && db.finished(&w),
    );
    // Still the same process: it recovered by itself, and stops cleanly.
    let log = daemon.stop();
    assert!(
        log.contains("terminating connection"),
        "the connections were cut:\n{log}"
    );
    assert_eq!(count_files(&cur), MESSAGES);
    let seen = check(
        &db,
        &w,
        &sink,
        0,
        std::slice::from_ref(&log),
        "PostgreSQL restart",
    );
    println!(
        "postgres restart: {MESSAGES} messages; work resumed {:.1} s after the server came back; \
         {} mails resent; {:.1} s",
        recovered_in.as_secs_f64(),
        seen.resent,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn dovecot_restart_during_idle_then_new_mail_arrives() {
    for backend in BACKENDS {
        let dovecot = Dovecot::start();
        let mut imap = dovecot.client();
        let w = Workload::new(10);
        imap.append("INBOX", &w.messages[0].1);
        // Polling every 10 minutes: after the restart only IDLE can bring new mail in time.
        let env = Env::with_extra(
            backend,
            &Site::default(),
            &DeskSettings::default(),
            &dovecot.mailbox_toml("poll_interval = \"10m\""),
        );
        let daemon = start_daemon(&env);
        let requests = || {
            env.json(&["requests", "list", "--json"])
                .as_array()
                .map(Vec::len)
                .unwrap_or(0)
        };
        let connections = || daemon.log().matches("idle=true").count();
        daemon.wait_for("the first message", WAIT, || requests() == 1);
        for (round, crash) in [(1, false), (2, true)] {
            // Waiting in IDLE now.
            std::thread::sleep(Duration::from_millis(500));
            if crash {
                dovecot.crash_restart();
            } else {
                dovecot.restart();
            }
            daemon.wait_for("a new connection", WAIT, || connections() == round + 1);
            std::thread::sleep(Duration::from_millis(500));
            imap = dovecot.client();
            imap.append("INBOX", &w.messages[round].1);
            daemon.wait_for("the message appended after the restart", WAIT, || {
                requests() == round + 1
            });
        }
        let log = daemon.stop();
        assert!(log.contains("mailbox connection failed"), "{log}");
        assert_eq!(imap.status("INBOX"), (3, 0));
    }
}
