//! Desk keys (`IT`) and request keys (`IT-42`), built only through `parse`.

use std::fmt;

use serde::{Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "desk key {0:?} must be 1 to 10 characters: an uppercase letter, then uppercase letters, digits or _"
    )]
    BadDeskKey(String),
    #[error("request key {0:?} must look like DESK-123")]
    BadRequestKey(String),
}

/// A desk's short key, as in Jira project keys: `IT`, `HR`, `ACME_SUPPORT`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeskKey(String);

impl DeskKey {
    pub fn parse(input: &str) -> Result<Self, KeyError> {
        let s = input.trim();
        let mut chars = s.chars();
        let ok = s.len() <= 10
            && chars.next().is_some_and(|c| c.is_ascii_uppercase())
            && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(DeskKey(s.to_string()))
        } else {
            Err(KeyError::BadDeskKey(input.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeskKey({})", self.0)
    }
}

impl Serialize for DeskKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A request's key: the desk key, a dash and the request's number on that desk.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    desk: DeskKey,
    number: u64,
}

impl RequestKey {
    pub fn new(desk: DeskKey, number: u64) -> Self {
        RequestKey { desk, number }
    }

    pub fn parse(input: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::BadRequestKey(input.to_string());
        let (desk, number) = input.trim().rsplit_once('-').ok_or_else(bad)?;
        let desk = DeskKey::parse(desk).map_err(|_| bad())?;
        if number.is_empty() || number.len() > 18 || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let number = number.parse().map_err(|_| bad())?;
        Ok(RequestKey { desk, number })
    }

    pub fn desk(&self) -> &DeskKey {
        &self.desk
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    /// Every `[KEY-123]` tag in a subject line, in order of appearance.
    pub fn find_in_subject(subject: &str) -> Vec<RequestKey> {
        let mut found = Vec::new();
        let mut rest = subject;
        while let Some(open) = rest.find('[') {
            rest = &rest[open + 1..];
            if let Some(close) = rest.find(']')
                && let Ok(key) = RequestKey::parse(&rest[..close])
            {
                if !found.contains(&key) {
                    found.push(key);
                }
                rest = &rest[close + 1..];
            }
        }
        found
    }
}

impl fmt::Display for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.desk, self.number)
    }
}

impl fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestKey({self})")
    }
}

impl Serialize for RequestKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
