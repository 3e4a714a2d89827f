//! Validation of scope and key names before they reach any store path: a short charset, a length
//! limit, no `/`, no `..`, so a user-written key can never address another scope or key.

use super::error::{Error, Result};

pub const MAX_NAME_LEN: usize = 128;

fn check(what: &'static str, value: &str) -> Result<()> {
    let bad = |why| Error::InvalidName {
        what,
        value: value.to_string(),
        why,
    };
    if value.is_empty() {
        return Err(bad("must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(bad("must be at most 128 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("may contain only letters, digits, '.', '_' and '-'"));
    }
    if value.starts_with('.') || value.starts_with('-') {
        return Err(bad("must start with a letter, digit or '_'"));
    }
    if value.contains("..") {
        return Err(bad("must not contain '..'"));
    }
    Ok(())
}

/// A cache key, validated: safe to use as one path segment of a store path.
pub fn key(value: &str) -> Result<&str> {
    check("cache key", value).map(|_| value)
}

/// A scope name, validated: safe to use as one path segment of a store path.
pub fn scope(value: &str) -> Result<&str> {
    check("scope", value).map(|_| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for k in ["npm", "cargo-registry", "go_mod.v2", "main", "A1", "_x"] {
            assert!(key(k).is_ok(), "{k}");
        }
    }

    #[test]
    fn refuses_path_tricks_and_junk() {
        let long = "a".repeat(129);
        for k in [
            "", "..", "a/b", "../x", "a..b", ".hidden", "-flag", "a b", "ä", "a\\b", "a\0", &long,
        ] {
            let err = key(k).unwrap_err().to_string();
            assert!(err.contains("invalid cache key"), "{k}: {err}");
        }
    }
}
