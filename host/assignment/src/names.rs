//! The one rule for names that come in from outside (sites, content groups, segments, servers):
//! they become path components (a site's snapshots live in `DATA_DIR/snapshots/<site>`), keys of
//! the database, words in the history and the site field of an assignment's header, so `.`,
//! `..`, `/`, NUL, control characters and unbounded lengths are refused, with the field named in
//! the message. Here, below both, so the manager (`cm_manager::names`), the header's decoder and
//! the agent's configuration apply the same rule.

use thiserror::Error;

/// The site an agent serves, and a hand-built assignment is for, when none is named.
pub const DEFAULT_SITE: &str = "www";

/// Longest name, in bytes (one path component on every filesystem we run on).
pub const MAX_NAME: usize = 255;

/// Why a name was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field} {shown}: {why}")]
pub struct NameError {
    pub field: &'static str,
    /// The name as the message shows it (escaped, cut short).
    pub shown: String,
    pub why: &'static str,
}

/// Checks `value` as a `field` (e.g. "site name"): 1..=[`MAX_NAME`] bytes, not `.` or `..`,
/// no `/`, `\`, NUL or other control character.
pub fn check_name(field: &'static str, value: &str) -> Result<(), NameError> {
    let why = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > MAX_NAME {
        Some("is longer than 255 bytes")
    } else if value == "." || value == ".." {
        Some("must not be `.` or `..`")
    } else if value.contains(['/', '\\']) {
        Some("must not contain `/` or `\\`")
    } else if value.chars().any(char::is_control) {
        Some("must not contain NUL or control characters")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => {
            let mut shown: String = value.escape_debug().take(80).collect();
            if value.len() > 80 {
                shown.push('…');
            }
            Err(NameError { field, shown: format!("`{shown}`"), why })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_a_directory_are_refused() {
        for ok in ["www", "example.com", "seg-a", "a..b", ".hidden", "web servers", "ü"] {
            assert_eq!(check_name("site name", ok), Ok(()), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "/", "a\\b", "a\0b", "a\nb", "\u{7f}"] {
            let e = check_name("site name", bad).unwrap_err();
            assert!(e.to_string().starts_with("site name `"), "{e}");
        }
        assert!(check_name("server name", &"x".repeat(MAX_NAME)).is_ok());
        let e = check_name("server name", &"x".repeat(MAX_NAME + 1)).unwrap_err();
        assert!(e.to_string().contains("longer than 255"), "{e}");
        assert!(e.shown.len() < 100);
    }
}
