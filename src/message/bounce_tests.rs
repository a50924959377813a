//! Unit tests for `src/message/bounce.rs`.

use super::*;
