//! The configured schema name, validated once so that every statement can embed it safely.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest schema name accepted. Notification channel names are built from it and PostgreSQL
/// truncates identifiers at 63 bytes.
pub const MAX_SCHEMA_LEN: usize = 48;

/// A PostgreSQL schema name that is a plain identifier: a letter or `_`, then letters, digits or
/// `_`, at most [`MAX_SCHEMA_LEN`] bytes. It is still quoted wherever it is used.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Schema(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("schema name {name:?} is not a plain identifier: use letters, digits and `_`, starting with a letter or `_`, at most {MAX_SCHEMA_LEN} characters (e.g. \"public\" or \"app_outbox\")")]
pub struct InvalidSchema {
    pub name: String,
}

impl Schema {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidSchema> {
        let name = name.into();
        let mut chars = name.chars();
        let plain = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.len() <= MAX_SCHEMA_LEN;
        if plain {
            Ok(Self(name))
        } else {
            Err(InvalidSchema { name })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `"schema"`, for embedding in SQL.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// `"schema".name`, for embedding in SQL.
    pub fn qualify(&self, name: &str) -> String {
        format!("\"{}\".{}", self.0, name)
    }

    /// The NOTIFY channel producers signal on and relays listen to.
    pub fn channel(&self) -> String {
        if self.0 == "public" {
            "outbox_event".to_owned()
        } else {
            format!("outbox_event.{}", self.0)
        }
    }
}

impl Default for Schema {
    fn default() -> Self {
        Self("public".to_owned())
    }
}

impl TryFrom<String> for Schema {
    type Error = InvalidSchema;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Schema> for String {
    fn from(value: Schema) -> Self {
        value.0
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers_only() {
        for ok in ["public", "_x", "app_outbox2", "A"] {
            assert!(Schema::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "x\"; DROP TABLE t; --",
            "sch.ema",
            "é",
            &"a".repeat(49),
        ] {
            let err = Schema::new(bad).unwrap_err();
            assert!(err.to_string().contains("plain identifier"));
        }
    }
}
