//! A site's content rules, applied where the manager builds a release: which paths of the
//! staging tree make it (include/exclude globs, `globset`), and how its assignments compress
//! payloads (cm-assignment's `CompressionPolicy`, from the site's `compression`).
//!
//! The filter is applied when the staging tree is snapshotted, so an excluded file is in no
//! snapshot, no assignment and on no server; and when a recurring publish asks whether staging
//! changed (`unchanged.rs`), so a change to excluded files alone makes no release. Globs match
//! the path relative to the staging root with `/` between components; `*` and `?` stay within
//! one component, `**` crosses them (`**/*.tmp`, `drafts/**`).

use std::path::Path;

use cm_assignment::policy::{CompressionPolicy, MAX_LEVEL};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use thiserror::Error;

use crate::model::{Compression, ContentFilter};

/// Most globs per list, and bytes per glob: the operator's input stays small.
pub const MAX_GLOBS: usize = 256;
pub const MAX_GLOB_LEN: usize = 1024;
/// Most file types in `skip_extensions`, and bytes per type.
pub const MAX_EXTENSIONS: usize = 256;
pub const MAX_EXTENSION_LEN: usize = 32;

/// A content rule an operator wrote that cannot be used; `field` is its path in the site body.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {why}")]
pub struct RuleError {
    pub field: String,
    pub why: String,
}

fn refuse(field: impl Into<String>, why: impl Into<String>) -> RuleError {
    RuleError { field: field.into(), why: why.into() }
}

/// The compiled filter of a site.
#[derive(Debug, Clone)]
pub struct Filter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

fn compile(globs: &[String], field: &str) -> Result<GlobSet, RuleError> {
    if globs.len() > MAX_GLOBS {
        return Err(refuse(field, format!("{} globs; at most {MAX_GLOBS}", globs.len())));
    }
    let mut set = GlobSetBuilder::new();
    for (i, g) in globs.iter().enumerate() {
        let at = format!("{field}.{i}");
        if g.is_empty() || g.len() > MAX_GLOB_LEN {
            return Err(refuse(at, format!("a glob is 1 to {MAX_GLOB_LEN} bytes")));
        }
        if g.starts_with('/') || g.chars().any(char::is_control) {
            return Err(refuse(
                at,
                format!(
                    "`{g}`: globs are relative to the staging root, without control characters"
                ),
            ));
        }
        let glob: Glob = GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .map_err(|e| refuse(at, format!("`{g}`: {}", e.kind())))?;
        set.add(glob);
    }
    set.build().map_err(|e| refuse(field, e.to_string()))
}

impl Filter {
    /// A filter that admits everything.
    pub fn all() -> Filter {
        Filter { include: None, exclude: GlobSet::empty() }
    }

    pub fn of(f: &ContentFilter) -> Result<Filter, RuleError> {
        let include = match f.include.is_empty() {
            true => None,
            false => Some(compile(&f.include, "filter.include")?),
        };
        Ok(Filter { include, exclude: compile(&f.exclude, "filter.exclude")? })
    }

    /// Whether the entry at `rel` (relative to the staging root) makes the release: not
    /// excluded, and for a file or symlink, included when there are include globs.
    pub fn admits(&self, rel: &Path, is_dir: bool) -> bool {
        if self.exclude.is_match(rel) {
            return false;
        }
        is_dir || self.include.as_ref().is_none_or(|inc| inc.is_match(rel))
    }
}

/// The compression policy a site's assignments are built with.
pub fn compression_policy(c: &Compression) -> CompressionPolicy {
    if c.level == 0 {
        return CompressionPolicy::none();
    }
    let mut p = CompressionPolicy { level: c.level, min_size: c.min_size, ..Default::default() };
    if let Some(types) = &c.skip_extensions {
        p.never = types.iter().map(|t| t.to_ascii_lowercase()).collect();
    }
    p
}

/// Checks a site's rules before they are stored.
pub fn check(filter: &ContentFilter, compression: &Compression) -> Result<(), RuleError> {
    Filter::of(filter)?;
    if !(0..=MAX_LEVEL).contains(&compression.level) {
        return Err(refuse(
            "compression.level",
            format!("{}: accepted 1 to {MAX_LEVEL}, or 0 for none", compression.level),
        ));
    }
    let types = compression.skip_extensions.as_deref().unwrap_or_default();
    if types.len() > MAX_EXTENSIONS {
        return Err(refuse(
            "compression.skip_extensions",
            format!("{} file types; at most {MAX_EXTENSIONS}", types.len()),
        ));
    }
    for (i, t) in types.iter().enumerate() {
        let ok = !t.is_empty()
            && t.len() <= MAX_EXTENSION_LEN
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(refuse(
                format!("compression.skip_extensions.{i}"),
                format!(
                    "`{t}`: a file type is its extension without the dot: 1 to {MAX_EXTENSION_LEN} letters, digits, `_` or `-`"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cm_assignment::format::Codec;

    fn filter(include: &[&str], exclude: &[&str]) -> Filter {
        Filter::of(&ContentFilter {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    #[test]
    fn excludes_win_includes_select_files_and_star_stays_in_one_component() {
        let f = filter(&[], &["**/*.tmp", "drafts", ".git"]);
        assert!(f.admits(Path::new("index.html"), false));
        assert!(!f.admits(Path::new("a/b/x.tmp"), false));
        assert!(!f.admits(Path::new("x.tmp"), false));
        assert!(!f.admits(Path::new("drafts"), true), "an excluded directory goes whole");
        assert!(f.admits(Path::new("css/drafts"), true), "globs match from the root");
        let f = filter(&["*.html", "css/**"], &["css/old/**"]);
        assert!(f.admits(Path::new("index.html"), false));
        assert!(!f.admits(Path::new("blog/post.html"), false), "`*` does not cross `/`");
        assert!(f.admits(Path::new("blog"), true), "directories are walked");
        assert!(f.admits(Path::new("css/a/site.css"), false));
        assert!(!f.admits(Path::new("css/old/site.css"), false));
        assert!(Filter::all().admits(Path::new("anything/at/all"), false));
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        let bad = |include: &[&str], exclude: &[&str]| {
            check(
                &ContentFilter {
                    include: include.iter().map(|s| s.to_string()).collect(),
                    exclude: exclude.iter().map(|s| s.to_string()).collect(),
                },
                &Compression::default(),
            )
            .unwrap_err()
            .field
        };
        assert_eq!(bad(&[], &["ok", "a[b"]), "filter.exclude.1");
        assert_eq!(bad(&["/abs"], &[]), "filter.include.0");
        assert_eq!(bad(&[""], &[]), "filter.include.0");
        let c = |level, types: Option<Vec<&str>>| {
            check(
                &ContentFilter::default(),
                &Compression {
                    level,
                    min_size: 128,
                    skip_extensions: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
                },
            )
        };
        assert_eq!(c(20, None).unwrap_err().field, "compression.level");
        assert_eq!(c(-1, None).unwrap_err().field, "compression.level");
        assert_eq!(
            c(3, Some(vec!["png", ".jpg"])).unwrap_err().field,
            "compression.skip_extensions.1"
        );
        assert!(c(0, Some(vec!["png", "tar-gz"])).is_ok());
    }

    #[test]
    fn the_policy_follows_the_site() {
        let p = compression_policy(&Compression {
            level: 9,
            min_size: 10,
            skip_extensions: Some(vec!["LOG".into()]),
        });
        assert_eq!((p.level, p.min_size), (9, 10));
        assert_eq!(p.choose("a/b.log", 1000), Codec::Raw);
        assert_eq!(
            p.choose("a/b.png", 1000),
            Codec::Zstd,
            "the site's list replaces the built-in one"
        );
        assert_eq!(
            compression_policy(&Compression { level: 0, ..Compression::default() })
                .choose("x.html", 1 << 20),
            Codec::Raw
        );
        let d = compression_policy(&Compression::default());
        assert_eq!((d.level, d.choose("x.png", 1000)), (3, Codec::Raw));
    }
}
