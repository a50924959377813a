//! What a delivery report does to our records.
//!
//! Only a report about mail *we* sent counts: its original Message-ID must be one of
//! our outbox rows (random, so it cannot be guessed). Then the account we mailed is
//! marked undeliverable (a permanent failure) or has its soft-bounce count raised (a
//! temporary one), and the outbox row says it bounced. Anyone can send a report that
//! names an address; one that does not match our mail changes nothing, or a forged
//! bounce could silence a customer's verification mail.

use sqlx::{AnyConnection, Row};

use crate::address::EmailAddress;
use crate::message::bounce::{Bounce, BounceRecipient};

use super::{Context, StoreError};

/// An address a report touched, for the audit: (address, role, outcome, reason).
pub type BouncedAddress = (String, &'static str, &'static str, &'static str);

/// Applies a delivery report on the caller's transaction.
pub async fn record_bounce(
    conn: &mut AnyConnection,
    bounce: &Bounce,
    now: i64,
) -> Result<Vec<BouncedAddress>, StoreError> {
    let failed: Vec<&BounceRecipient> = bounce
        .recipients
        .iter()
        .filter(|r| !r.is_success() && r.action.as_deref() != Some("delayed"))
        .collect();
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    let ours = match &bounce.original_message_id {
        Some(id) => sqlx::query("SELECT id, to_address FROM outbox WHERE message_id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .ctx("find the bounced mail")?
            .map(|r| -> Result<(i64, String), StoreError> {
                Ok((
                    r.try_get(0).ctx("read outbox")?,
                    r.try_get(1).ctx("read outbox")?,
                ))
            })
            .transpose()?,
        None => None,
    };
    let Some((outbox_id, to)) = ours else {
        return Ok(failed
            .iter()
            .filter_map(|r| r.address.as_ref())
            .map(|a| (a.to_string(), "bounced", "ignored", "bounce_not_ours"))
            .collect());
    };
    // The recipient the report names for our mail; when it names one other address
    // only (the mail was forwarded), that one failure is our recipient's.
    let to_address = EmailAddress::parse(&to).ok();
    let recipient = failed
        .iter()
        .find(|r| r.address.is_some() && r.address == to_address)
        .or_else(|| (failed.len() == 1).then(|| &failed[0]))
        .copied();
    let Some(r) = recipient else {
        return Ok(Vec::new());
    };
    let (outcome, reason) = if r.permanent {
        mark_undeliverable(conn, &to, now).await?;
        ("undeliverable", "bounce_permanent")
    } else {
        sqlx::query(
            "UPDATE accounts SET soft_bounces = soft_bounces + 1, updated_at = $1 WHERE address = $2",
        )
        .bind(now)
        .bind(&to)
        .execute(&mut *conn)
        .await
        .ctx("count a soft bounce")?;
        ("soft_bounce", "bounce_temporary")
    };
    let what = format!(
        "bounced{}{}{}",
        if r.permanent {
            " (permanent)"
        } else {
            " (temporary)"
        },
        r.status
            .as_deref()
            .map(|s| format!(" {s}"))
            .unwrap_or_default(),
        r.diagnostic
            .as_deref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default()
    );
    sqlx::query("UPDATE outbox SET last_error = $1 WHERE id = $2")
        .bind(what.chars().take(1000).collect::<String>())
        .bind(outbox_id)
        .execute(&mut *conn)
        .await
        .ctx("record a bounce on the outbox")?;
    Ok(vec![(to, "bounced", outcome, reason)])
}

/// Marks the account at `address` (as our outbox row has it) undeliverable, since the
/// first time: intake mails it nothing more. A permanent bounce of our mail does it, and
/// so does a relay refusing the recipient when we send
/// ([`Store::outbox_refused`](super::Store::outbox_refused)).
pub(super) async fn mark_undeliverable(
    conn: &mut AnyConnection,
    address: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE accounts SET undeliverable_at = COALESCE(undeliverable_at, $1), updated_at = $1 \
         WHERE address = $2",
    )
    .bind(now)
    .bind(address)
    .execute(&mut *conn)
    .await
    .ctx("mark an address undeliverable")?;
    Ok(())
}
