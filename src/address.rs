//! Email addresses and domains, canonicalized in exactly one place.
//!
//! Every address that reaches a decision, the database or an outgoing mail goes through
//! [`EmailAddress::parse`]. The canonical form lowercases the whole address and converts
//! the domain to its IDNA ASCII form, so `Ann@Exämple.COM` and `ann@xn--exmple-cua.com`
//! are the same person. Lowercasing the local part is not what RFC 5321 promises, but it
//! is what every service desk does and what admins expect: one account per mailbox.

use std::fmt;

use serde::{Serialize, Serializer};

/// Why a string is not a usable address or domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,
    #[error("address {0:?} has no @")]
    MissingAt(String),
    #[error("address {0:?} has an empty local part")]
    EmptyLocalPart(String),
    #[error("address {0:?} has a local part longer than 64 characters")]
    LocalPartTooLong(String),
    #[error("address {0:?} has a character not allowed in a local part")]
    BadLocalPart(String),
    #[error("domain {0:?} is not a valid host name")]
    BadDomain(String),
}

/// A validated, canonical email address. Built only by [`EmailAddress::parse`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EmailAddress {
    canonical: String,
    at: usize,
}

impl EmailAddress {
    /// Parses and canonicalizes `input`, which may carry surrounding `<>` and whitespace.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let trimmed = input.trim();
        let trimmed = trimmed
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(trimmed)
            .trim();
        if trimmed.is_empty() {
            return Err(AddressError::Empty);
        }
        let Some(at) = trimmed.rfind('@') else {
            return Err(AddressError::MissingAt(trimmed.to_string()));
        };
        let (local, domain) = (&trimmed[..at], &trimmed[at + 1..]);
        if local.is_empty() {
            return Err(AddressError::EmptyLocalPart(trimmed.to_string()));
        }
        if local.chars().count() > 64 {
            return Err(AddressError::LocalPartTooLong(trimmed.to_string()));
        }
        if !valid_local_part(local) {
            return Err(AddressError::BadLocalPart(trimmed.to_string()));
        }
        let domain = Domain::parse(domain)?;
        let local = local.to_lowercase();
        let mut canonical = String::with_capacity(local.len() + 1 + domain.0.len());
        canonical.push_str(&local);
        canonical.push('@');
        canonical.push_str(&domain.0);
        Ok(EmailAddress {
            at: local.len(),
            canonical,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    pub fn local_part(&self) -> &str {
        &self.canonical[..self.at]
    }

    /// The canonical (lowercase, IDNA ASCII) domain.
    pub fn domain(&self) -> &str {
        &self.canonical[self.at + 1..]
    }

    /// True for the addresses mail systems use for their own mail: MAILER-DAEMON and
    /// postmaster.
    pub fn is_mailer_daemon(&self) -> bool {
        matches!(self.local_part(), "mailer-daemon" | "postmaster")
    }

    /// True for an address that says it takes no replies: `noreply`, `no-reply`,
    /// `donotreply`, `do-not-reply` (also with `_`), alone or before `-`, `.`, `_` or a
    /// `+tag` (`noreply-billing@`, `no-reply+x@`). Mail sent there is never read.
    pub fn is_no_reply(&self) -> bool {
        let local = self.local_part();
        [
            "noreply",
            "no-reply",
            "no_reply",
            "donotreply",
            "do-not-reply",
            "do_not_reply",
        ]
        .iter()
        .any(|w| {
            local
                .strip_prefix(w)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '.', '_', '+']))
        })
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

impl fmt::Debug for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EmailAddress({})", self.canonical)
    }
}

impl Serialize for EmailAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.canonical)
    }
}

impl std::str::FromStr for EmailAddress {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn valid_local_part(local: &str) -> bool {
    if local.starts_with('"') && local.ends_with('"') && local.len() >= 2 {
        // Quoted local part: anything printable except an unescaped quote or control.
        return !local[1..local.len() - 1]
            .chars()
            .any(|c| c.is_control() || c == '"');
    }
    !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| {
            !c.is_control()
                && !c.is_whitespace()
                && !matches!(
                    c,
                    '<' | '>' | '(' | ')' | '[' | ']' | ',' | ';' | ':' | '\\' | '"' | '@'
                )
        })
}

/// A validated, canonical domain name (lowercase IDNA ASCII form).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let trimmed = input.trim().trim_end_matches('.');
        let bad = || AddressError::BadDomain(input.trim().to_string());
        if trimmed.is_empty() {
            return Err(bad());
        }
        let ascii = if trimmed.is_ascii() {
            trimmed.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii_strict(trimmed).map_err(|_| bad())?
        };
        if ascii.len() > 253 || !ascii.split('.').all(valid_label) {
            return Err(bad());
        }
        Ok(Domain(ascii))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` is `other` or a subdomain of it.
    pub fn is_within(&self, other: &Domain) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.ends_with(&other.0)
                && self.0.as_bytes()[self.0.len() - other.0.len() - 1] == b'.')
    }
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Domain({})", self.0)
    }
}

impl Serialize for Domain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A domain rule as admins write it: `example.com` matches exactly that domain,
/// `*.example.com` matches every subdomain of it (but not `example.com` itself).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    Exact(Domain),
    Subdomains(Domain),
}

impl DomainPattern {
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let trimmed = input.trim();
        match trimmed.strip_prefix("*.") {
            Some(rest) => Ok(DomainPattern::Subdomains(Domain::parse(rest)?)),
            None => Ok(DomainPattern::Exact(Domain::parse(trimmed)?)),
        }
    }

    pub fn matches(&self, domain: &str) -> bool {
        match self {
            DomainPattern::Exact(d) => d.0 == domain,
            DomainPattern::Subdomains(d) => {
                domain.len() > d.0.len()
                    && domain.ends_with(&d.0)
                    && domain.as_bytes()[domain.len() - d.0.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(d) => write!(f, "{d}"),
            DomainPattern::Subdomains(d) => write!(f, "*.{d}"),
        }
    }
}

impl fmt::Debug for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainPattern({self})")
    }
}

/// True when any pattern in `patterns` matches `domain`.
pub fn any_matches(patterns: &[DomainPattern], domain: &str) -> bool {
    patterns.iter().any(|p| p.matches(domain))
}

/// Cleans a display name taken from a header: RFC 2047 is already decoded by the parser;
/// here control characters (CR and LF above all, so a name can never inject a header) are
/// removed, whitespace collapsed, surrounding quotes dropped, and the length capped.
/// Returns `None` when nothing useful is left or the name is just the address again.
pub fn clean_display_name(raw: &str, address: Option<&EmailAddress>) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut pending_space = false;
    for c in raw.chars() {
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(c);
    }
    let trimmed = out.trim_matches(|c| c == '"' || c == '\'' || c == ' ');
    if trimmed.is_empty() {
        return None;
    }
    if let Some(addr) = address
        && trimmed.eq_ignore_ascii_case(addr.as_str())
    {
        return None;
    }
    let capped: String = trimmed.chars().take(200).collect();
    Some(capped)
}

#[cfg(test)]
#[path = "address_tests.rs"]
mod tests;
