//! The command line. `main` calls [`main_exit`]; each command returns an exit code and
//! errors travel up as `anyhow::Error` to be printed with their causes.
//!
//! Exit codes follow sysexits(3) where an MTA or systemd reads them: 0 done, 64 usage,
//! 65 bad input, 69 not found, 70 internal error, 75 temporary failure (retry later),
//! 78 configuration error.

/// `println!` for command output: a reader that went away (`intake requests list | head`)
/// ends the command quietly instead of a panic.
macro_rules! out {
    () => {
        $crate::cli::print_out(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::cli::print_out(format_args!($($arg)*), true)
    };
}

/// `print!` for command output (no newline added), as [`out!`].
macro_rules! out_text {
    ($($arg:tt)*) => {
        $crate::cli::print_out(format_args!($($arg)*), false)
    };
}

mod admin;
mod import;
mod mbox;
mod simulate;
mod table;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, ConfigSource};
use crate::keys::DeskKey;
use crate::pipeline::{Envelope, Outcome, Pipeline};
use crate::store::{RequestFilter, SourceRef, Store};

use table::Table;

pub const EX_OK: u8 = 0;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOINPUT: u8 = 66;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_CONFIG: u8 = 78;

/// The exit code when standard output turns out to be a closed pipe: 0, or the failure
/// a command is reporting when it prints (set by [`failing_with`]).
static BROKEN_PIPE_EXIT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// What follows on standard output reports a failure with `code`: a closed pipe must
/// not turn it into success.
fn failing_with(code: u8) -> u8 {
    BROKEN_PIPE_EXIT.store(code, std::sync::atomic::Ordering::Relaxed);
    code
}

/// Writes command output (and a newline). When standard output is a closed pipe the
/// command's work is done and nobody reads the rest: exit at once, with 0 (as `head`
/// expects) or the failure being reported. Any other write error ends the command with
/// EX_IOERR (74).
pub fn print_out(args: std::fmt::Arguments, newline: bool) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(args).and_then(|()| {
        if newline {
            stdout.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(i32::from(
            BROKEN_PIPE_EXIT.load(std::sync::atomic::Ordering::Relaxed),
        )),
        Err(e) => {
            eprintln!("intake: cannot write to standard output: {e}");
            std::process::exit(74);
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "intake",
    version,
    about = "Turns inbound email into service-desk requests, deciding for every address who \
             may open a request, who gets an account, who becomes a participant and who is \
             dropped — and why.",
    after_help = "Configuration: --config FILE, else $CONFIGURATION_DIRECTORY/intake.toml, else the \
                  embedded defaults (config.example.toml). Any key can be overridden as \
                  INTAKE__SECTION__KEY."
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch the configured mailboxes, send queued mail, until SIGTERM.
    Run,
    /// Validate the configuration and print OK or every problem with its key and file.
    CheckConfig,
    /// Decide what would happen to a message, without changing anything.
    Explain {
        /// The message file (.eml).
        message: PathBuf,
        /// The desk it arrived for (default: routed by its addresses).
        #[arg(long)]
        desk: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// Decide as of this unix time instead of now.
        #[arg(long, value_name = "UNIX_SECONDS")]
        at: Option<i64>,
    },
    /// Process one message from standard input (MTA pipe delivery). Exit 75 asks the MTA
    /// to retry later.
    Deliver {
        /// The desk the mail is for (default: routed by its addresses).
        #[arg(long)]
        desk: Option<String>,
    },
    /// Process message files and folders (backfill). Files are not moved; running it again
    /// is a no-op for what was already processed.
    Process {
        /// Message files, and folders of them (Maildirs included).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The desk the mail is for (default: routed by its addresses).
        #[arg(long)]
        desk: Option<String>,
        /// Do not write queued mail to the outbox directory afterwards.
        #[arg(long)]
        no_send: bool,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Import a backlog: mbox files and Maildirs, in batches, with progress. Resumable:
    /// interrupted and run again, it continues where it stopped.
    Import {
        /// mbox files and Maildirs (cur/ and new/).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The desk the mail is for (default: routed by its addresses).
        #[arg(long)]
        desk: Option<String>,
        /// Do not write queued mail to the outbox directory afterwards.
        #[arg(long)]
        no_send: bool,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Decide recent mail again under this configuration's policy (--config NEW.toml) and
    /// show what would change. Writes nothing.
    Simulate {
        /// How far back: 30d, 12h, 90m, or a date (2026-11-01).
        #[arg(long, default_value = "30d")]
        since: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Requests: list and show.
    #[command(subcommand)]
    Requests(RequestsCommand),
    /// Accounts: list, show, add, deactivate, reactivate, deliverable, rename, merge.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Organizations: list, show, add, remove, add-member, remove-member.
    #[command(subcommand)]
    Orgs(admin::OrgsCommand),
    /// Desks: customers list, add, remove.
    #[command(subcommand)]
    Desks(admin::DesksCommand),
    /// Agents: list, add, remove.
    #[command(subcommand)]
    Agents(admin::AgentsCommand),
    /// Every decision that touched an address: why does this person have an account?
    Audit {
        /// The email address to look up.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Quarantined messages: list and release (process again).
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Outgoing mail: list, retry dead mail, send what is due.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Create or update the database schema and sync the directory, then exit.
    Migrate,
    /// Expire held requests and pending accounts that are past their time, and delete
    /// sent mail older than outbox.keep_sent (the daemon does this every minute, and
    /// hourly for sent mail).
    Expire {
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RequestsCommand {
    /// List requests, newest first.
    List(RequestListArgs),
    /// A request with its participants, comments and decisions.
    Show {
        /// The request key, e.g. IT-42.
        key: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Write an attachment of a request to stdout (or a file).
    Attachment {
        /// The request key, e.g. IT-42.
        key: String,
        /// Which attachment, counting from 1 in the order `requests show` lists them.
        number: usize,
        /// Write it to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RequestListArgs {
    /// Only requests of this desk.
    #[arg(long)]
    desk: Option<String>,
    /// open, held or expired.
    #[arg(long)]
    status: Option<String>,
    /// Only requests reported by this address.
    #[arg(long)]
    reporter: Option<String>,
    /// At most this many rows.
    #[arg(long, default_value_t = 100)]
    limit: i64,
    /// Print JSON instead of a table (for scripts).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// List accounts.
    List {
        /// internal or portal_only.
        #[arg(long)]
        kind: Option<String>,
        /// pending, active or deactivated.
        #[arg(long)]
        status: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// An account with its organizations, desks, requests, bounces and decision history.
    Show {
        /// The account's email address.
        address: String,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Admin(admin::AccountsAdminCommand),
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// List quarantined messages with their reasons.
    List {
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Process a quarantined message again (e.g. after raising the size limit).
    Release {
        /// The quarantine id (intake quarantine list).
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List outgoing mail with its state and last error.
    List {
        /// pending, sending, sent or dead.
        #[arg(long)]
        status: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Put dead mail (one id, or all) back in the queue.
    Retry {
        /// The outbox id (default: every dead mail).
        id: Option<i64>,
    },
    /// Send everything that is due now.
    Send,
}

/// Entry point for the binary.
pub fn main_exit() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, matches!(cli.command, Command::Run));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("intake: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("intake: {}", format_chain(&e));
            ExitCode::from(exit_code_for(&e))
        }
    }
}

fn format_chain(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        s.push_str(&format!("\n  caused by: {cause}"));
    }
    s
}

fn exit_code_for(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.downcast_ref::<ConfigError>().is_some() {
            return EX_CONFIG;
        }
        if let Some(s) = cause.downcast_ref::<crate::store::StoreError>() {
            return if s.is_transient() {
                EX_TEMPFAIL
            } else {
                EX_SOFTWARE
            };
        }
        if let Some(p) = cause.downcast_ref::<crate::pipeline::PipelineError>() {
            return if p.is_transient() {
                EX_TEMPFAIL
            } else {
                EX_SOFTWARE
            };
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return EX_NOINPUT;
        }
    }
    EX_SOFTWARE
}

fn init_tracing(format: LogFormat, daemon: bool) {
    use tracing_subscriber::EnvFilter;
    // Commands other than `run` print results on stdout; keep stderr to warnings.
    let default = if daemon { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("INTAKE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn load_config(cli: &Cli) -> anyhow::Result<Arc<Config>> {
    let source = ConfigSource::locate(cli.config.as_deref());
    let config = Config::load(&source)?;
    Ok(Arc::new(config))
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::open(&config.database)
        .await
        .with_context(|| format!("cannot open database {}", config.database.redacted_url()))?;
    store
        .sync_directory(&config.directory, crate::now(), false)
        .await
        .context("cannot sync the directory from configuration")?;
    Ok(store)
}

async fn pipeline(config: Arc<Config>) -> anyhow::Result<Pipeline> {
    let store = open_store(&config).await?;
    let templates = crate::outbox::Templates::from_config(&config)?;
    Ok(Pipeline::new(store, config, templates))
}

fn desk_arg(config: &Config, desk: Option<&str>) -> anyhow::Result<Option<DeskKey>> {
    match desk {
        None => Ok(None),
        Some(d) => {
            let key = DeskKey::parse(d)?;
            anyhow::ensure!(
                config.policy.desk(&key).is_some(),
                "desk {key} is not configured"
            );
            Ok(Some(key))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match &cli.command {
        Command::CheckConfig => return Ok(check_config(&cli)),
        Command::Run => {
            let config = load_config(&cli)?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone())?;
            let source = ConfigSource::locate(cli.config.as_deref());
            crate::daemon::run(config, Some(source), shutdown).await?;
            return Ok(EX_OK);
        }
        _ => {}
    }
    let config = load_config(&cli)?;
    match cli.command {
        Command::Run | Command::CheckConfig => Ok(EX_OK),
        Command::Expire { json } => {
            let store = open_store(&config).await?;
            let now = crate::now();
            let expired = store.expire(now, config.hold_ttl.as_secs() as i64).await?;
            let sent_deleted = crate::daemon::prune_sent_mail(&store, &config, now).await?;
            if json {
                print_json(&serde_json::json!({
                    "requests": expired.requests,
                    "accounts": expired.accounts,
                    "sent_mail_deleted": sent_deleted,
                }))?;
            } else {
                out!(
                    "{} held request(s) expired, {} pending account(s) removed, {} sent mail(s) past outbox.keep_sent deleted",
                    expired.requests.len(),
                    expired.accounts.len(),
                    sent_deleted
                );
            }
            Ok(EX_OK)
        }
        Command::Migrate => {
            open_store(&config).await?;
            out!("database {} is up to date", config.database.redacted_url());
            Ok(EX_OK)
        }
        Command::Explain {
            message,
            desk,
            format,
            at,
        } => {
            let raw = std::fs::read(&message)
                .with_context(|| format!("cannot read {}", message.display()))?;
            let desk = desk_arg(&config, desk.as_deref())?;
            let pipeline = pipeline(config).await?;
            let decision = pipeline
                .explain(&raw, desk.as_ref(), at.unwrap_or_else(crate::now))
                .await?;
            match format {
                Format::Json => out!("{}", serde_json::to_string_pretty(&decision)?),
                Format::Text => out_text!("{}", decision.to_text()),
            }
            Ok(EX_OK)
        }
        Command::Deliver { desk } => deliver(config, desk.as_deref()).await,
        Command::Process {
            paths,
            desk,
            no_send,
            json,
        } => process(config, &paths, desk.as_deref(), no_send, json).await,
        Command::Import {
            paths,
            desk,
            no_send,
            json,
        } => import::import(config, &paths, desk.as_deref(), no_send, json).await,
        Command::Simulate { since, json } => simulate::simulate(config, &since, json).await,
        Command::Requests(cmd) => requests(config, cmd).await,
        Command::Accounts(cmd) => accounts(config, cmd).await,
        Command::Orgs(cmd) => admin::orgs(config, cmd).await,
        Command::Desks(cmd) => admin::desks_command(config, cmd).await,
        Command::Agents(cmd) => admin::agents(config, cmd).await,
        Command::Audit { address, json } => audit(config, &address, json).await,
        Command::Quarantine(cmd) => quarantine(config, cmd).await,
        Command::Outbox(cmd) => outbox(config, cmd).await,
    }
}

fn check_config(cli: &Cli) -> u8 {
    let source = ConfigSource::locate(cli.config.as_deref());
    match Config::load(&source) {
        Ok(config) => {
            if let Err(e) = crate::outbox::templates::check(&config) {
                let code = failing_with(EX_CONFIG);
                out!(
                    "{}: outbox.templates_dir: {}",
                    config.origin,
                    crate::outbox::error_chain(&e)
                );
                return code;
            }
            out!("OK: {}", config.origin);
            for (k, v) in crate::config::summary(&config) {
                out!("  {k}: {v}");
            }
            EX_OK
        }
        Err(ConfigError::Invalid(issues)) => {
            failing_with(EX_CONFIG);
            for issue in &issues {
                out!("{issue}");
            }
            out!(
                "{} problem{} found",
                issues.len(),
                if issues.len() == 1 { "" } else { "s" }
            );
            EX_CONFIG
        }
        Err(e) => {
            failing_with(EX_CONFIG);
            out!("{e}");
            EX_CONFIG
        }
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Reads standard input, keeping at most `max` bytes in memory. A larger message is
/// streamed to a file in `spill_dir` (named by its hash) as it is read, and only its head
/// is returned. Returns (bytes or head, total size, SHA-256, spilled file).
fn read_stdin_bounded(
    max: u64,
    spill_dir: &std::path::Path,
) -> std::io::Result<(Vec<u8>, u64, String, Option<PathBuf>)> {
    use sha2::Digest;
    use std::io::Write;
    let mut stdin = std::io::stdin().lock();
    let mut hasher = sha2::Sha256::new();
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut spill: Option<(std::fs::File, PathBuf)> = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = stdin.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
        total += n as u64;
        match &mut spill {
            Some((file, _)) => file.write_all(&chunk[..n])?,
            None if total > max => {
                std::fs::create_dir_all(spill_dir)?;
                let tmp = spill_dir.join(format!(".stdin-{}.tmp", std::process::id()));
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&kept)?;
                file.write_all(&chunk[..n])?;
                kept.truncate(64 * 1024);
                spill = Some((file, tmp));
            }
            None => kept.extend_from_slice(&chunk[..n]),
        }
    }
    let hash = hex::encode(hasher.finalize());
    let spilled = match spill {
        Some((file, tmp)) => {
            file.sync_all()?;
            let path = spill_dir.join(format!("{hash}.eml"));
            std::fs::rename(&tmp, &path)?;
            Some(path)
        }
        None => None,
    };
    Ok((kept, total, hash, spilled))
}

async fn deliver(config: Arc<Config>, desk: Option<&str>) -> anyhow::Result<u8> {
    let desk = desk_arg(&config, desk)?;
    let quarantine_dir = config.quarantine_dir.clone();
    // Anything that goes wrong from here on is answered with 75: the MTA keeps the
    // message and retries, so nothing is lost.
    let (raw, size, hash, spilled) =
        match read_stdin_bounded(config.max_message_size, &quarantine_dir) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("intake: cannot read the message from standard input: {e}");
                return Ok(EX_TEMPFAIL);
            }
        };
    let pipeline = match pipeline(config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("intake: {}", format_chain(&e));
            return Ok(EX_TEMPFAIL);
        }
    };
    let env = Envelope {
        size,
        truncated: spilled.is_some(),
        content_hash: Some(hash.clone()),
        fetch_error: None,
        quarantine_ref: quarantine_dir
            .join(format!("{hash}.eml"))
            .display()
            .to_string(),
        source: SourceRef {
            source: "stdin".into(),
            reference: hash,
        },
        desk,
        raw,
    };
    let outcomes = match pipeline
        .process_batch(std::slice::from_ref(&env), crate::now())
        .await
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("intake: {}", crate::outbox::error_chain(&e));
            return Ok(EX_TEMPFAIL);
        }
    };
    for o in &outcomes {
        // An oversized message was streamed to quarantine while it was read.
        if o.is_quarantined()
            && spilled.is_none()
            && let Err(e) = crate::mailbox::keep_quarantined(&quarantine_dir, &env.raw).await
        {
            // The ledger row says "quarantined"; without the file the MTA must retry
            // (the next attempt quarantines it again and writes the file).
            eprintln!(
                "intake: cannot keep the quarantined message in {}: {e}",
                quarantine_dir.display()
            );
            return Ok(EX_TEMPFAIL);
        }
        let (action, reason) = o.summary();
        eprintln!("intake: {action} ({reason})");
    }
    Ok(EX_OK)
}

async fn process(
    config: Arc<Config>,
    paths: &[PathBuf],
    desk: Option<&str>,
    no_send: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let desk = desk_arg(&config, desk)?;
    let files = crate::mailbox::collect_files(paths).context("cannot list the files to process")?;
    let quarantine_dir = config.quarantine_dir.clone();
    let max = config.max_message_size;
    let pipeline = pipeline(config).await?;
    let started = Instant::now();
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    let mut total = 0usize;
    for chunk in files.chunks(crate::mailbox::maildir::BATCH) {
        let mut envelopes = Vec::with_capacity(chunk.len());
        for path in chunk {
            let source = SourceRef {
                source: "file".into(),
                reference: path.display().to_string(),
            };
            // The quarantine copy is named by content hash; read first to know it.
            let Some(mut env) =
                crate::mailbox::read_envelope(path, max, source, desk.clone(), String::new())
                    .await
                    .with_context(|| format!("cannot read {}", path.display()))?
            else {
                continue;
            };
            // An oversized file was read only in part; its copy is named by the whole.
            let hash = if env.size > env.raw.len() as u64 {
                crate::mailbox::file_content_hash(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
            } else {
                // The whole message: the pipeline need not hash it again.
                let hash = crate::message::content_hash(&env.raw);
                env.content_hash = Some(hash.clone());
                hash
            };
            env.quarantine_ref = quarantine_dir
                .join(format!("{hash}.eml"))
                .display()
                .to_string();
            envelopes.push((path.clone(), env));
        }
        let batch: Vec<Envelope> = envelopes.iter().map(|(_, e)| e.clone()).collect();
        let outcomes = pipeline.process_batch(&batch, crate::now()).await?;
        for ((path, env), o) in envelopes.iter().zip(&outcomes) {
            if let Outcome::Quarantined { .. } = o {
                // An oversized file was only partly read: copy the whole file.
                let raw = if env.size > env.raw.len() as u64 {
                    std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?
                } else {
                    env.raw.clone()
                };
                crate::mailbox::keep_quarantined(&quarantine_dir, &raw).await?;
            }
            let (action, reason) = o.summary();
            *counts
                .entry((action.to_string(), reason.to_string()))
                .or_default() += 1;
        }
        total += outcomes.len();
    }
    let elapsed = started.elapsed();
    let mut sent = 0;
    if !no_send {
        let worker = crate::daemon::outbox_worker(&pipeline)?;
        sent = worker.drain_once(crate::now()).await?.sent;
    }
    if json {
        let rows: Vec<_> = counts
            .iter()
            .map(|((a, r), n)| serde_json::json!({"action": a, "reason": r, "count": n}))
            .collect();
        out!(
            "{}",
            serde_json::json!({"processed": total, "seconds": elapsed.as_secs_f64(), "outcomes": rows, "mail_sent": sent})
        );
    } else {
        let mut t = Table::new(&["ACTION", "REASON", "COUNT"]);
        for ((a, r), n) in &counts {
            t.row(vec![a.clone(), r.clone(), n.to_string()]);
        }
        out_text!("{t}");
        out!(
            "{total} message{} in {:.2}s ({:.0}/s); {sent} mail written",
            if total == 1 { "" } else { "s" },
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64().max(1e-9)
        );
    }
    Ok(EX_OK)
}

fn when(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]"
            ))
            .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn requests(config: Arc<Config>, cmd: RequestsCommand) -> anyhow::Result<u8> {
    let store = open_store(&config).await?;
    match cmd {
        RequestsCommand::List(a) => {
            let rows = store
                .list_requests(&RequestFilter {
                    desk: a.desk,
                    status: a.status,
                    reporter: a.reporter,
                    limit: a.limit,
                })
                .await?;
            if a.json {
                print_json(&rows)?;
            } else {
                let mut t = Table::new(&[
                    "KEY",
                    "STATUS",
                    "REPORTER",
                    "PARTICIPANTS",
                    "CREATED",
                    "SUBJECT",
                ]);
                for r in rows {
                    t.row(vec![
                        r.key,
                        r.status,
                        r.reporter,
                        r.participants.to_string(),
                        when(r.created_at),
                        r.subject,
                    ]);
                }
                out_text!("{t}");
            }
        }
        RequestsCommand::Attachment {
            key,
            number,
            output,
        } => {
            let Some(r) = shown_request(&store, &key).await? else {
                return Ok(69);
            };
            let Some(a) = number.checked_sub(1).and_then(|i| r.attachments.get(i)) else {
                eprintln!(
                    "intake: {key} has {} attachment(s); there is no number {number}",
                    r.attachments.len()
                );
                return Ok(69);
            };
            let mut out: Box<dyn std::io::Write + Send> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            store.write_attachment(&a.sha256, &mut *out).await?;
            out.flush().context("cannot write the attachment")?;
        }
        RequestsCommand::Show { key, json } => {
            let Some(r) = shown_request(&store, &key).await? else {
                return Ok(69);
            };
            if json {
                print_json(&r)?;
            } else {
                out!(
                    "{}  [{}]  {}",
                    r.request.key,
                    r.request.status,
                    r.request.subject
                );
                out!("reporter: {}", r.request.reporter);
                out!("created:  {}", when(r.request.created_at));
                if let Some(h) = r.held_until {
                    out!("held until: {}", when(h));
                }
                out!("participants:");
                for p in &r.participant_list {
                    out!("  {} ({}, {})", p.address, p.kind, p.status);
                }
                for a in &r.attachments {
                    out!(
                        "attachment: {} ({}, {} bytes)",
                        a.filename,
                        a.content_type,
                        a.size
                    );
                }
                out!("\n{}", r.description.trim_end());
                for c in &r.comment_list {
                    out!(
                        "\n--- {} at {}\n{}",
                        c.author,
                        when(c.created_at),
                        c.body.trim_end()
                    );
                }
            }
        }
    }
    Ok(EX_OK)
}

async fn accounts(config: Arc<Config>, cmd: AccountsCommand) -> anyhow::Result<u8> {
    let store = open_store(&config).await?;
    match cmd {
        AccountsCommand::List {
            kind,
            status,
            limit,
            json,
        } => {
            let rows = store
                .list_accounts(kind.as_deref(), status.as_deref(), limit)
                .await?;
            if json {
                print_json(&rows)?;
            } else {
                let mut t = Table::new(&[
                    "ADDRESS",
                    "NAME",
                    "KIND",
                    "STATUS",
                    "ORIGIN",
                    "ORGANIZATIONS",
                ]);
                for a in rows {
                    t.row(vec![
                        a.address,
                        a.display_name.unwrap_or_default(),
                        a.kind,
                        a.status,
                        a.origin,
                        a.organizations.join(", "),
                    ]);
                }
                out_text!("{t}");
            }
        }
        AccountsCommand::Show { address, json } => {
            let address = crate::address::EmailAddress::parse(&address)?;
            let a = match store.show_account(address.as_str()).await {
                Ok(a) => a,
                Err(crate::store::StoreError::NotFound(m)) => {
                    eprintln!("intake: {m}");
                    return Ok(69);
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&a)?;
            } else {
                out!(
                    "{}  {}",
                    a.account.address,
                    a.account.display_name.clone().unwrap_or_default()
                );
                out!(
                    "kind: {}   status: {}   origin: {}",
                    a.account.kind,
                    a.account.status,
                    a.account.origin
                );
                out!("created: {}", when(a.account.created_at));
                if let Some(v) = a.verified_at {
                    out!("verified: {}", when(v));
                }
                if let Some(u) = a.undeliverable_at {
                    out!(
                        "undeliverable since: {} (a permanent bounce, or the relay refused it)",
                        when(u)
                    );
                }
                if a.soft_bounces > 0 {
                    out!("temporary bounces: {}", a.soft_bounces);
                }
                out!("organizations: {}", a.account.organizations.join(", "));
                out!("customer of desks: {}", a.desks.join(", "));
                out!("reported: {}", a.reported.join(", "));
                out!("participant in: {}", a.participating.join(", "));
                print_audit(&a.history);
            }
        }
        AccountsCommand::Admin(cmd) => return admin::accounts(&config, &store, cmd).await,
    }
    Ok(EX_OK)
}

fn print_audit(history: &[crate::store::AuditEntry]) {
    let mut t = Table::new(&[
        "WHEN", "DESK", "ACTION", "REQUEST", "ROLE", "OUTCOME", "REASON",
    ]);
    for h in history {
        t.row(vec![
            when(h.at),
            h.desk.clone().unwrap_or_default(),
            format!("{} ({})", h.action, h.reason),
            h.request.clone().unwrap_or_default(),
            h.role.clone(),
            h.outcome.clone(),
            h.address_reason.clone(),
        ]);
    }
    out_text!("{t}");
}

async fn audit(config: Arc<Config>, address: &str, json: bool) -> anyhow::Result<u8> {
    let address = crate::address::EmailAddress::parse(address)?;
    let store = open_store(&config).await?;
    let history = store.audit_for_address(address.as_str()).await?;
    if json {
        print_json(&history)?;
    } else if history.is_empty() {
        out!("no decision has touched {address}");
    } else {
        print_audit(&history);
    }
    Ok(EX_OK)
}

async fn quarantine(config: Arc<Config>, cmd: QuarantineCommand) -> anyhow::Result<u8> {
    match cmd {
        QuarantineCommand::List { json } => {
            let store = open_store(&config).await?;
            let rows = store.list_quarantine().await?;
            if json {
                print_json(&rows)?;
            } else {
                let mut t = Table::new(&[
                    "ID", "WHEN", "SOURCE", "REASON", "SENDER", "DETAIL", "WHERE",
                ]);
                for r in rows {
                    t.row(vec![
                        r.id.to_string(),
                        when(r.processed_at),
                        format!("{} {}", r.source, r.source_ref),
                        r.reason,
                        r.sender.unwrap_or_default(),
                        r.detail.unwrap_or_default(),
                        r.quarantine_ref.unwrap_or_default(),
                    ]);
                }
                out_text!("{t}");
            }
            Ok(EX_OK)
        }
        QuarantineCommand::Release { id } => {
            let pipeline = pipeline(config.clone()).await?;
            let rows = pipeline.store().list_quarantine().await?;
            let Some(row) = rows.into_iter().find(|r| r.id == id) else {
                eprintln!("intake: no quarantined message {id}");
                return Ok(69);
            };
            let reference = row.quarantine_ref.clone().unwrap_or_default();
            // A message from a mailbox goes back to that mailbox's desk.
            let mailbox = row
                .source
                .split_once(':')
                .and_then(|(_, name)| config.mailboxes.iter().find(|m| m.name == name));
            let desk = mailbox.map(|m| m.desk.clone());
            let imap = match mailbox {
                Some(m) if reference.starts_with("imap:") => match &m.kind {
                    crate::config::MailboxKind::Imap(cfg) => {
                        Some(crate::mailbox::imap::ImapSource::new(
                            m.name.clone(),
                            m.desk.clone(),
                            (**cfg).clone(),
                        ))
                    }
                    crate::config::MailboxKind::Maildir(_) => None,
                },
                _ => None,
            };
            let raw = match &imap {
                Some(source) => {
                    match crate::mailbox::imap::fetch_quarantined(source, &reference).await? {
                        Some((_, raw)) => raw,
                        None => {
                            eprintln!("intake: message {id} is not in {reference} any more");
                            return Ok(69);
                        }
                    }
                }
                None => std::fs::read(&reference)
                    .with_context(|| format!("cannot read the quarantined message {reference}"))?,
            };
            let env = Envelope {
                size: raw.len() as u64,
                truncated: false,
                content_hash: None,
                fetch_error: None,
                raw,
                source: SourceRef {
                    source: format!("release:{}", row.source),
                    reference: row.source_ref.clone(),
                },
                desk,
                quarantine_ref: reference.clone(),
            };
            let now = crate::now();
            let outcomes = pipeline
                .process_batch(std::slice::from_ref(&env), now)
                .await?;
            let Some(o) = outcomes.first() else {
                return Ok(EX_SOFTWARE);
            };
            if let Outcome::Quarantined { reason, detail, .. } = o {
                let code = failing_with(EX_DATAERR);
                out!(
                    "message {id} is still quarantined: {} ({detail})",
                    reason.code()
                );
                return Ok(code);
            }
            pipeline.store().mark_released(id, now).await?;
            match &imap {
                Some(source) => {
                    if let Err(e) = crate::mailbox::imap::finish_released(source, &reference).await
                    {
                        tracing::warn!(error = %crate::outbox::error_chain(&e), "cannot move the released message out of quarantine");
                    }
                }
                None => {
                    if let Err(e) = std::fs::remove_file(&reference) {
                        tracing::warn!(path = %reference, error = %e, "cannot remove released message");
                    }
                }
            }
            let (action, reason) = o.summary();
            out!("message {id} released: {action} ({reason})");
            Ok(EX_OK)
        }
    }
}

/// The request `key` for `requests show` and `requests attachment`; `None` (said on
/// stderr) when there is no such request, for exit code 69.
async fn shown_request(
    store: &Store,
    key: &str,
) -> anyhow::Result<Option<crate::store::RequestDetail>> {
    match store.show_request(key).await {
        Ok(r) => Ok(Some(r)),
        Err(crate::store::StoreError::NotFound(m)) => {
            eprintln!("intake: {m}");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

async fn outbox(config: Arc<Config>, cmd: OutboxCommand) -> anyhow::Result<u8> {
    match cmd {
        OutboxCommand::List {
            status,
            limit,
            json,
        } => {
            let store = open_store(&config).await?;
            let rows = store.list_outbox(status.as_deref(), limit).await?;
            if json {
                print_json(&rows)?;
            } else {
                let mut t = Table::new(&[
                    "ID",
                    "STATUS",
                    "KIND",
                    "TO",
                    "ATTEMPTS",
                    "CREATED",
                    "LAST ERROR",
                ]);
                for r in rows {
                    t.row(vec![
                        r.id.to_string(),
                        r.status,
                        r.kind,
                        r.to,
                        r.attempts.to_string(),
                        when(r.created_at),
                        r.last_error.unwrap_or_default(),
                    ]);
                }
                out_text!("{t}");
            }
        }
        OutboxCommand::Retry { id } => {
            let store = open_store(&config).await?;
            let n = store.outbox_retry(id, crate::now()).await?;
            out!("{n} mail{} queued again", if n == 1 { "" } else { "s" });
        }
        OutboxCommand::Send => {
            let pipeline = pipeline(config).await?;
            let report = crate::daemon::outbox_worker(&pipeline)?
                .drain_once(crate::now())
                .await?;
            out!(
                "{} sent, {} failed (will retry), {} dead",
                report.sent,
                report.failed,
                report.dead
            );
        }
    }
    Ok(EX_OK)
}
