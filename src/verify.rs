//! Confirming an address: what the verification page shows (nothing changes on GET, since
//! mail scanners and link previews fetch links) and what confirming does (POST): the token
//! is used up, the account becomes active, and the person's held requests are released,
//! their To/Cc decided under the policy in force now. The page lists those requests,
//! each with a box to untick: someone who did not write one (a message forged in their
//! name while the link waited) leaves it held, and it expires.

use crate::address::EmailAddress;
use crate::keys::RequestKey;
use crate::message::{InboundMessage, Mailbox};
use crate::pipeline::{Pipeline, PipelineError};
use crate::policy::{self, Action};
use crate::store::{self, ApplyInput, Deferred, DirectoryIndex, TokenInfo};

/// What a token in a link stands for right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    Valid(TokenInfo),
    Expired(TokenInfo),
    Used(TokenInfo),
    /// The account was deactivated since the link was sent: it cannot be confirmed
    /// (and the link is not used up).
    Deactivated(TokenInfo),
    Unknown,
}

/// What confirming did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    Confirmed {
        address: String,
        released: Vec<RequestKey>,
        /// Held requests not opened: unticked on the page (or held after it was shown).
        left_held: Vec<RequestKey>,
    },
    Expired,
    Used,
    Deactivated,
    Unknown,
}

/// Tokens are 64 lowercase hex digits; anything else cannot be one.
fn well_formed(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

fn state(info: Option<TokenInfo>, now: i64) -> TokenState {
    match info {
        None => TokenState::Unknown,
        Some(i) if i.used_at.is_some() => TokenState::Used(i),
        Some(i) if i.account_status == "deactivated" => TokenState::Deactivated(i),
        Some(i) if i.expires_at <= now => TokenState::Expired(i),
        Some(i) => TokenState::Valid(i),
    }
}

/// Looks a token up without changing anything.
pub async fn inspect(
    pipeline: &Pipeline,
    token: &str,
    now: i64,
) -> Result<TokenState, PipelineError> {
    if !well_formed(token) {
        return Ok(TokenState::Unknown);
    }
    let mut conn = pipeline.store().acquire().await?;
    let info = store::token_info(&mut conn, &store::token_hash(token), false).await?;
    Ok(state(info, now))
}

/// The requests confirming `info`'s address would open: (key, subject).
pub async fn held(
    pipeline: &Pipeline,
    info: &TokenInfo,
) -> Result<Vec<(RequestKey, String)>, PipelineError> {
    let mut conn = pipeline.store().acquire().await?;
    Ok(store::held_requests_of(&mut conn, info.account_id)
        .await?
        .into_iter()
        .map(|h| (h.key, h.subject))
        .collect())
}

/// Confirms the address behind `token`, in one transaction, opening its held requests
/// (with `only`, just those of them).
pub async fn confirm(
    pipeline: &Pipeline,
    token: &str,
    display_name: Option<&str>,
    only: Option<&[RequestKey]>,
    now: i64,
) -> Result<Confirmation, PipelineError> {
    if !well_formed(token) {
        return Ok(Confirmation::Unknown);
    }
    let hash = store::token_hash(token);
    let display_name = display_name.and_then(|n| crate::address::clean_display_name(n, None));
    let mut wtx = pipeline.store().begin_write().await?;
    let info = match state(store::token_info(wtx.conn(), &hash, true).await?, now) {
        TokenState::Valid(info) => info,
        TokenState::Expired(_) => return Ok(Confirmation::Expired),
        TokenState::Used(_) => return Ok(Confirmation::Used),
        TokenState::Deactivated(_) => return Ok(Confirmation::Deactivated),
        TokenState::Unknown => return Ok(Confirmation::Unknown),
    };
    if !store::use_token(wtx.conn(), &hash, now).await? {
        return Ok(Confirmation::Used);
    }
    store::activate_account(wtx.conn(), info.account_id, display_name.as_deref(), now).await?;
    let address = EmailAddress::parse(&info.address)
        .map_err(|_| store::StoreError::Corrupt(format!("account address {:?}", info.address)))?;
    let held = store::held_requests_of(wtx.conn(), info.account_id).await?;
    let index = DirectoryIndex::load(wtx.conn()).await?;
    let mut deferred = Deferred::default();
    let mut released = Vec::new();
    let mut left_held = Vec::new();
    for h in held {
        if only.is_some_and(|keys| !keys.contains(&h.key)) {
            // Unticked on the page: not theirs. It stays held and expires.
            tracing::info!(request = %h.key, "held request left held: unticked on the confirmation page");
            left_held.push(h.key);
            continue;
        }
        // The held message's To/Cc, decided as if it arrived now from the confirmed person.
        let msg = InboundMessage::synthetic(
            Mailbox {
                address: address.clone(),
                display_name: display_name.clone().or_else(|| info.display_name.clone()),
            },
            h.recipients
                .iter()
                .map(|(a, n)| Mailbox {
                    address: a.clone(),
                    display_name: n.clone(),
                })
                .collect(),
            &h.subject,
        );
        let gathered =
            // Fresh lookups each time: releasing the previous request may have created
            // accounts these recipients share.
            store::gather_facts(
                wtx.conn(),
                &msg,
                &h.desk,
                &index,
                now,
                false,
                false,
                &mut store::Lookups::default(),
            )
            .await?;
        let mut facts = gathered.facts;
        // Clicking the link proved the address is theirs: an internal address held for
        // it (approved domain, signup = verify) is released as authenticated.
        facts.sender_confirmed = true;
        let mut decision = policy::decide(&facts, &pipeline.config().policy);
        if decision.action != Action::CreateRequest {
            // The policy changed since (deactivated, restricted desk...): it stays held and
            // expires; the audit of the original message says why it was held.
            tracing::warn!(request = %h.key, action = decision.action.as_str(), reason = decision.reason.code(), "held request not released");
            continue;
        }
        if !store::open_held_request(wtx.conn(), h.id, now).await? {
            tracing::warn!(request = %h.key, "held request expired meanwhile; not released");
            continue;
        }
        // The reporter just confirmed: no mail to them.
        decision.emails.retain(|e| e.to != address);
        pipeline
            .limit_mail(wtx.conn(), &mut deferred, &mut decision, now)
            .await?;
        store::apply_release(
            wtx.conn(),
            ApplyInput {
                msg: &msg,
                decision: &decision,
                known: &gathered.known,
                ledger_id: h.ledger_id,
                hold_ttl_secs: pipeline.config().hold_ttl.as_secs() as i64,
                now,
                orgs: &index,
                renderer: &*pipeline.templates(),
            },
            h.id,
            &h.key,
            &mut deferred,
        )
        .await?;
        released.push(h.key);
    }
    deferred.flush(wtx.conn()).await?;
    wtx.commit().await?;
    pipeline.outbox_wake.notify_one();
    tracing::info!(address = %address, released = released.len(), "address confirmed");
    Ok(Confirmation::Confirmed {
        address: address.to_string(),
        released,
        left_held,
    })
}
