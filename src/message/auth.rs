//! `Authentication-Results` (RFC 8601) parsing.
//!
//! This only reads what the receiving MTA wrote; deciding which headers to believe (the
//! configured authserv-ids) and what counts as authenticated is policy (`policy::trust`).

use serde::Serialize;

/// One `method=result` entry of one `Authentication-Results` header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthResult {
    /// Position of the header in the message, 0 being the topmost (most recently added).
    pub header_index: usize,
    /// The authserv-id, lowercased.
    pub authserv_id: String,
    /// `dkim`, `spf`, `dmarc`, `arc`, ... lowercased.
    pub method: String,
    /// `pass`, `fail`, `none`, ... lowercased.
    pub result: String,
    /// `ptype.property=value` pairs, property names lowercased (`header.d`, `smtp.mailfrom`).
    pub properties: Vec<(String, String)>,
}

impl AuthResult {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the value of one `Authentication-Results` header. Malformed entries are skipped.
/// A header without an authserv-id — Exchange Online writes `spf=pass (...)
/// smtp.mailfrom=...; dkim=...` — gets the empty one, which only `trust.microsoft365`
/// believes (and only in the topmost header).
pub fn parse_header(header_index: usize, value: &str) -> Vec<AuthResult> {
    let cleaned = strip_comments(value);
    let parts = split_outside_quotes(&cleaned, ';');
    let Some(first) = parts.first() else {
        return Vec::new();
    };
    let Some(id) = first.split_whitespace().next() else {
        return Vec::new();
    };
    // An authserv-id is a token or quoted string: `=` cannot be in one unquoted, so a
    // first part like `spf=pass` is a result, and there is no id.
    let (authserv_id, resinfos) = if id.contains('=') && !id.starts_with('"') {
        (String::new(), &parts[..])
    } else {
        let id = unquote(id).to_ascii_lowercase();
        if id.is_empty() {
            return Vec::new();
        }
        (id, &parts[1..])
    };
    let mut out = Vec::new();
    for resinfo in resinfos {
        let tokens = split_tokens(resinfo);
        let mut iter = tokens.iter();
        let Some(head) = iter.next() else { continue };
        let Some((method, result)) = head.split_once('=') else {
            continue;
        };
        let method = method
            .split('/')
            .next()
            .unwrap_or(method)
            .trim()
            .to_ascii_lowercase();
        if method.is_empty() || method == "none" {
            continue;
        }
        let mut properties = Vec::new();
        for tok in iter {
            if let Some((k, v)) = tok.split_once('=') {
                let k = k.trim().to_ascii_lowercase();
                if k.contains('.') {
                    properties.push((k, unquote(v.trim()).to_string()));
                }
            }
        }
        out.push(AuthResult {
            header_index,
            authserv_id: authserv_id.clone(),
            method,
            result: unquote(result.trim()).to_ascii_lowercase(),
            properties,
        });
    }
    if out.is_empty() {
        // `id; none` (RFC 8601: no method applied), or nothing readable: still the
        // header this authserv-id wrote, and it passes nothing. Were it left out, the
        // next header down with the same id would be read instead — one the sender
        // may have written.
        out.push(AuthResult {
            header_index,
            authserv_id,
            method: "none".into(),
            result: "none".into(),
            properties: Vec::new(),
        });
    }
    out
}

/// Removes RFC 5322 comments `( ... )`, nested, outside quoted strings.
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut in_quotes = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            if depth == 0 {
                out.push(c);
            }
            escaped = false;
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                in_quotes = !in_quotes;
                out.push(c);
            }
            '(' if !in_quotes => depth += 1,
            ')' if !in_quotes && depth > 0 => {
                depth -= 1;
                out.push(' ');
            }
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Splits at `sep` outside quoted strings.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    split_unquoted(s, |c| c == sep)
}

/// Splits a resinfo into whitespace-separated tokens, joining `a = b` into `a=b`.
fn split_tokens(s: &str) -> Vec<String> {
    let normalized = s.replace(" =", "=").replace("= ", "=");
    let mut tokens = split_unquoted(&normalized, char::is_whitespace);
    tokens.retain(|t| !t.is_empty());
    tokens
}

/// Splits at every character `is_sep` accepts outside quoted strings (where `\"` does
/// not end the string); empty parts included.
fn split_unquoted(s: &str, is_sep: impl Fn(char) -> bool) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
            cur.push(c);
            continue;
        }
        if c == '\\' && in_quotes {
            escaped = true;
        } else if c == '"' {
            in_quotes = !in_quotes;
        }
        if is_sep(c) && !in_quotes {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
