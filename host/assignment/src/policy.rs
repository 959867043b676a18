//! Which payloads are compressed: decided per file from its extension (the seed's "compress all
//! .html, not .gif"), with a size floor. The writer also stores a payload raw whenever zstd did
//! not make it smaller, so a wrong guess costs time, never bytes.

use std::collections::HashSet;

use crate::format::Codec;

/// Largest zstd window (log2 bytes) a reader accepts: 8 MiB, what level 19 uses at most, so
/// decompressing a payload never needs more memory than that however the frame was forged.
pub const MAX_WINDOW_LOG: u32 = 23;
/// Highest level the writer uses (levels above 19 want windows past [`MAX_WINDOW_LOG`]).
pub const MAX_LEVEL: i32 = 19;

/// Per-file compression policy.
#[derive(Debug, Clone)]
pub struct CompressionPolicy {
    /// Lower-case extensions (without the dot) that are stored raw.
    pub never: HashSet<String>,
    /// zstd level (1–19, higher is clamped to 19 so frames fit [`MAX_WINDOW_LOG`]; 3 is
    /// zstd's default and streams at several hundred MB/s).
    pub level: i32,
    /// Files smaller than this are stored raw: compression cannot win much on them.
    pub min_size: u64,
}

/// Formats that are already compressed: compressing them again only burns CPU.
const ALREADY_COMPRESSED: &[&str] = &[
    "jpg", "jpeg", "png", "gif", "webp", "avif", "heic", "ico", "mp3", "mp4", "m4a", "m4v", "mkv",
    "mov", "webm", "ogg", "opus", "flac", "zip", "gz", "tgz", "bz2", "xz", "zst", "7z", "rar",
    "br", "woff", "woff2", "jar", "apk", "deb", "rpm",
];

impl Default for CompressionPolicy {
    fn default() -> Self {
        CompressionPolicy {
            never: ALREADY_COMPRESSED.iter().map(|s| s.to_string()).collect(),
            level: 3,
            min_size: 128,
        }
    }
}

impl CompressionPolicy {
    /// A policy that never compresses.
    pub fn none() -> Self {
        CompressionPolicy { never: HashSet::new(), level: 0, min_size: u64::MAX }
    }

    /// The codec for a file at `path` of `len` bytes.
    pub fn choose(&self, path: &str, len: u64) -> Codec {
        if len < self.min_size {
            return Codec::Raw;
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        match name.rsplit_once('.') {
            Some((stem, ext))
                if !stem.is_empty() && self.never.contains(&ext.to_ascii_lowercase()) =>
            {
                Codec::Raw
            }
            _ => Codec::Zstd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_compressed_jpeg_not() {
        let p = CompressionPolicy::default();
        assert_eq!(p.choose("a/index.html", 10_000), Codec::Zstd);
        assert_eq!(p.choose("a/photo.JPG", 10_000), Codec::Raw);
        assert_eq!(p.choose("a/tiny.html", 10), Codec::Raw);
        assert_eq!(p.choose("dir.jpg/README", 10_000), Codec::Zstd);
        assert_eq!(CompressionPolicy::none().choose("x.html", 1 << 30), Codec::Raw);
    }
}

/// The setuid, setgid and sticky bits.
pub const SPECIAL_BITS: u32 = 0o7000;

/// What a site does with setuid, setgid and sticky bits (`0o7000`) in content: nothing a web
/// site serves needs them, and a setuid file put live by root is a privilege escalation. The
/// same policy applies where content enters (the manager's build from staging) and where it
/// lands (every server's apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SpecialBits {
    /// Cleared, and counted in the build or apply report (the default).
    #[default]
    Strip,
    /// The build or the apply fails, naming the path.
    Refuse,
}

impl SpecialBits {
    /// The mode to use for `mode` and whether bits were cleared; `None` when refused.
    pub fn apply(self, mode: u32) -> Option<(u32, bool)> {
        match (mode & SPECIAL_BITS, self) {
            (0, _) => Some((mode, false)),
            (_, SpecialBits::Strip) => Some((mode & !SPECIAL_BITS, true)),
            (_, SpecialBits::Refuse) => None,
        }
    }

    pub fn parse(s: &str) -> Option<SpecialBits> {
        match s {
            "strip" => Some(SpecialBits::Strip),
            "refuse" => Some(SpecialBits::Refuse),
            _ => None,
        }
    }
}
