//! Bounces: delivery status notifications (RFC 3464) and the many non-standard formats
//! MTAs send, reduced to who could not be reached and how permanently.
