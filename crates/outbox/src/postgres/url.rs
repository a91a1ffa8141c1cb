//! The database connection string: accepted forms (URL or libpq key/value), the parameters the
//! outbox passes on, and redaction, so that a password never reaches logs, errors or output.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A database URL whose password never reaches logs, errors, `Debug` output or serialized
/// configuration (`outbox config` prints it redacted).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The full URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The connection string with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
    /// The password the connection string carries (URL userinfo, `?password=`, or the key/value
    /// `password=`), for redacting driver errors that might echo it.
    pub fn password(&self) -> Option<String> {
        let text = self.0.trim();
        if let Some((_, rest)) = text.split_once("://") {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            if let Some((userinfo, _)) = authority.rsplit_once('@') {
                if let Some((_, pw)) = userinfo.split_once(':') {
                    return Some(pw.to_owned());
                }
            }
            let query = rest.split_once('?').map(|(_, q)| q).unwrap_or_default();
            return query
                .split('&')
                .find_map(|pair| match pair.split_once('=') {
                    Some((k, v)) if k.eq_ignore_ascii_case("password") => Some(v.to_owned()),
                    _ => None,
                });
        }
        keyword_values(text)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "password")
            .map(|(_, v)| v)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A connection parameter the outbox accepts: as a URL query parameter (sqlx's names) and, when
/// `keyword`, in the libpq key/value form.
pub(crate) struct ConnectionParameter {
    pub name: &'static str,
    /// Accepted in the key/value form (`host=db port=5432 ...`).
    pub keyword: bool,
    /// Its value is shown in redacted connection strings (it never holds a secret).
    pub shown: bool,
}

const fn param(name: &'static str, keyword: bool, shown: bool) -> ConnectionParameter {
    ConnectionParameter {
        name,
        keyword,
        shown,
    }
}

/// Every connection parameter sqlx understands; anything else is refused rather than ignored
/// (sqlx would log an unknown parameter with its value, e.g. a misspelt password).
pub(crate) const CONNECTION_PARAMETERS: &[ConnectionParameter] = &[
    param("host", true, true),
    param("hostaddr", true, true),
    param("port", true, true),
    param("dbname", true, true),
    param("user", true, true),
    param("password", true, false),
    param("sslmode", true, true),
    param("sslrootcert", true, true),
    param("sslcert", true, true),
    param("sslkey", true, true),
    param("application_name", true, true),
    param("options", true, false),
    param("ssl-mode", false, true),
    param("ssl-root-cert", false, true),
    param("ssl-ca", false, true),
    param("ssl-cert", false, true),
    param("ssl-key", false, true),
    param("statement-cache-capacity", false, true),
];

/// Whether the value of parameter `name` may be shown in a redacted connection string.
fn shown_parameter(name: &str) -> bool {
    CONNECTION_PARAMETERS
        .iter()
        .any(|p| p.shown && p.name == name)
}

/// Replaces the password of a URL (`user:password@`) and the value of any query parameter but the
/// known harmless ones (`sslmode`, `host`, ...: a misspelt `password` included) with `***`;
/// in a libpq key/value string (`host=db password=secret`), the value of `password`.
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") {
        return redact_keyword_values(url);
    }
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                // Only parameters known to hold no secret are shown: a misspelt `password` is not.
                Some((k, _)) if !shown_parameter(k) => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", redacted.join("&"));
    }
    out
}

/// Splits a libpq key/value connection string (`host=db port=5432 password='a b'`) into its
/// pairs: values may be single-quoted, with `\\'` and `\\\\` escapes. Errors never contain a value.
pub fn keyword_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    for word in 1.. {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not echoed: a stray word may be part of a secret.
            return Err(format!("item {word} is not key=value"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("the value of `{key}` ends in a backslash")),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("the quoted value of `{key}` is not closed")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// `redact_url` for the key/value form. Text that does not parse is not shown at all: any part of
/// it may be a secret.
fn redact_keyword_values(text: &str) -> String {
    match keyword_values(text) {
        Ok(pairs) if !pairs.is_empty() => pairs
            .into_iter()
            .map(|(k, v)| {
                // As for URLs: only keywords known to hold no secret are shown.
                if !shown_parameter(&k) {
                    format!("{k}=***")
                } else if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '\'') {
                    format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Ok(_) => String::new(),
        Err(_) => "<connection string not shown: it does not parse>".to_owned(),
    }
}
