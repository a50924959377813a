//! Whether the From address is authenticated, from the receiving MTA's
//! `Authentication-Results`.
//!
//! Anyone can write an `Authentication-Results` header, so only headers whose authserv-id
//! is configured count (or, at Microsoft 365, the topmost header when it has none, as
//! Exchange Online writes it), and of those only the topmost one (the one our MTA added last;
//! RFC 8601 §5 asks MTAs to remove forged copies carrying their own id). The From domain
//! is authenticated by DMARC pass, or by a DKIM or SPF pass whose domain is aligned with
//! it (relaxed alignment: the same domain, or one under the other).

use serde::Serialize;

use crate::message::AuthResult;

use super::model::Trust;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustVerdict {
    pub authenticated: bool,
    /// `dmarc`, `dkim`, `spf`, `exchange` (Microsoft 365's own mark) or `link` (our
    /// confirmation link) when authenticated.
    pub method: Option<&'static str>,
    /// A sentence for explanations.
    pub detail: String,
    /// The trusted header reports DMARC fail for the From domain: its owner says the
    /// message is not theirs. Believed even where authentication is not required.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dmarc_failed: bool,
}

/// `exchange_auth_as`: the message's `X-MS-Exchange-Organization-AuthAs` values. At
/// Microsoft 365 (`trust.microsoft365`), mail between the tenant's own mailboxes gets no
/// passing `Authentication-Results`, but Exchange Online marks it `Internal`; it strips
/// its organization headers from mail coming in from outside (its "header firewall")
/// and marks that `Anonymous`. Every such header must say `Internal`, and the From
/// domain must be one of ours (`from_is_ours`: an approved domain) — the mark says
/// where the mail came from, not whose address the From is.
pub fn verdict(
    trust: &Trust,
    from_domain: &str,
    results: &[AuthResult],
    exchange_auth_as: &[String],
    from_is_ours: bool,
) -> TrustVerdict {
    let v = from_results(trust, from_domain, results);
    if !v.authenticated
        && !v.dmarc_failed
        && from_is_ours
        && trust.microsoft365
        && !exchange_auth_as.is_empty()
        && exchange_auth_as.iter().all(|a| a == "internal")
    {
        return ok(
            "exchange",
            "Exchange Online marks it as sent from inside the organization \
             (X-MS-Exchange-Organization-AuthAs: Internal)",
        );
    }
    v
}

fn from_results(trust: &Trust, from_domain: &str, results: &[AuthResult]) -> TrustVerdict {
    // Exchange Online's header has no authserv-id; it is the topmost one (a sender's
    // own, lower down, never counts).
    let trusted = |r: &&AuthResult| {
        trust.authserv_ids.iter().any(|id| id == &r.authserv_id)
            || (trust.microsoft365 && r.authserv_id.is_empty() && r.header_index == 0)
    };
    let Some(top) = results.iter().filter(trusted).map(|r| r.header_index).min() else {
        return TrustVerdict {
            authenticated: false,
            method: None,
            detail: if trust.microsoft365 {
                "no Authentication-Results header from Microsoft 365 or a trusted authserv-id"
            } else {
                "no Authentication-Results header from a trusted authserv-id"
            }
            .into(),
            dmarc_failed: false,
        };
    };
    let header: Vec<&AuthResult> = results
        .iter()
        .filter(|r| r.header_index == top && trusted(r))
        .collect();
    let pass = |method: &'static str| {
        header
            .iter()
            .filter(move |r| r.method == method && r.result == "pass")
    };
    // The MTA names the From domain it evaluated; without it, a DMARC result says
    // nothing about this From (every MTA we know writes it). Compared canonically: a
    // trailing dot or a Unicode spelling is the same domain.
    let from = canonical(from_domain);
    let dmarc = |result: &str| {
        header.iter().any(|r| {
            r.method == "dmarc"
                && r.result == result
                && r.property("header.from")
                    .and_then(canonical)
                    .is_some_and(|d| Some(&d) == from.as_ref())
        })
    };
    let id = match header.first().map(|r| r.authserv_id.as_str()) {
        Some("") => "Microsoft 365",
        Some(id) => id,
        None => "",
    };
    if dmarc("pass") {
        return ok("dmarc", "DMARC passed");
    }
    // A DMARC fail stands, whatever else passed: a domain with strict alignment fails a
    // DKIM or SPF pass for one of its subdomains (a vendor's, an ESP's) on purpose.
    if dmarc("fail") {
        return TrustVerdict {
            authenticated: false,
            method: None,
            detail: format!("{id} reports DMARC fail for {from_domain}"),
            dmarc_failed: true,
        };
    }
    if let Some(r) = pass("dkim").find(|r| {
        r.property("header.d")
            .or_else(|| r.property("header.i").map(domain_of))
            .is_some_and(|d| aligned(from_domain, d))
    }) {
        let d = r.property("header.d").unwrap_or_default();
        return ok(
            "dkim",
            &format!("DKIM passed for {d}, aligned with {from_domain}"),
        );
    }
    if let Some(r) = pass("spf").find(|r| {
        r.property("smtp.mailfrom")
            .map(domain_of)
            .is_some_and(|d| aligned(from_domain, d))
    }) {
        let d = r
            .property("smtp.mailfrom")
            .map(domain_of)
            .unwrap_or_default();
        return ok(
            "spf",
            &format!("SPF passed for {d}, aligned with {from_domain}"),
        );
    }
    TrustVerdict {
        authenticated: false,
        method: None,
        detail: format!(
            "{id} reports no DMARC pass and no aligned DKIM or SPF pass for {from_domain}"
        ),
        dmarc_failed: false,
    }
}

/// The canonical form of a domain (lowercase, IDNA ASCII, no trailing dot), if it is one.
fn canonical(domain: &str) -> Option<String> {
    crate::address::Domain::parse(domain)
        .ok()
        .map(|d| d.as_str().to_string())
}

fn ok(method: &'static str, detail: &str) -> TrustVerdict {
    TrustVerdict {
        authenticated: true,
        method: Some(method),
        detail: detail.to_string(),
        dmarc_failed: false,
    }
}

fn domain_of(value: &str) -> &str {
    value.rsplit_once('@').map(|(_, d)| d).unwrap_or(value)
}

/// Relaxed alignment without a public suffix list: equal, or one a subdomain of the
/// other where the parent has at least two labels (so `com` never aligns with
/// anything). DMARC's relaxed alignment (same organizational domain) also aligns
/// `mail.corp.example` with `corp.example` either way round; siblings
/// (`a.corp.example`, `b.corp.example`) would need the list and do not align here. Nor
/// does the list stop a From on a two-label public suffix (`co.uk`) aligning with a
/// domain under it; no address there has rights to guard.
fn aligned(from: &str, auth: &str) -> bool {
    let (Some(from), Some(auth)) = (canonical(from), canonical(auth)) else {
        return false;
    };
    from == auth || under(&from, &auth) || under(&auth, &from)
}

/// `child` is a subdomain of `parent`, and `parent` is no single label.
fn under(child: &str, parent: &str) -> bool {
    parent.contains('.')
        && child.len() > parent.len()
        && child.ends_with(parent)
        && child.as_bytes()[child.len() - parent.len() - 1] == b'.'
}

#[cfg(test)]
#[path = "trust_tests.rs"]
mod tests;
