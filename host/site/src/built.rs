//! Which assignment built each release: `SITE/built/<serial>` holds the identity (hex) of the
//! assignment release `<serial>` was built from — its trailer, the BLAKE3 over header and body,
//! whose header carries the BLAKE3 of the data part, so it names every byte of the assignment.
//!
//! Serials name releases, so a serial must mean one assignment: the same assignment applied
//! again is a no-op that says so, and a *different* assignment with the serial of an existing
//! release is refused (it would otherwise be skipped as "already built" and its content lost
//! without a word). A release built before this record existed has none and is taken as built
//! by whatever carries its serial (what sites did before).
//!
//! The record is written before the release gets its name, and removed when the release is
//! pruned, so a crash leaves at most a record without a release, which the next build of that
//! serial overwrites.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cm_assignment::AssignmentReader;
use cm_assignment::format::{HEADER_LEN, TRAILER_LEN};

use crate::layout;

pub const BUILT: &str = "built";

fn record_path(site: &Path, serial: u64) -> PathBuf {
    site.join(BUILT).join(serial.to_string())
}

/// The identity of a verified assignment: its trailer, hex.
pub fn identity(reader: &AssignmentReader) -> io::Result<String> {
    let mut t = [0u8; TRAILER_LEN];
    let at = HEADER_LEN as u64 + reader.header().body_len;
    fs::File::open(reader.path())?.read_exact_at(&mut t, at)?;
    Ok(blake3::Hash::from_bytes(t).to_hex().to_string())
}

/// The identity of the assignment release `serial` was built from, if recorded.
pub fn built_by(site: &Path, serial: u64) -> io::Result<Option<String>> {
    match fs::read_to_string(record_path(site, serial)) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records (durably) that release `serial` is built from the assignment `id`.
pub fn record(site: &Path, serial: u64, id: &str) -> io::Result<()> {
    let dir = site.join(BUILT);
    fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{serial}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        writeln!(f, "{id}")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, record_path(site, serial))?;
    layout::sync_dir(&dir)
}

/// Forgets the record of a pruned release.
pub fn forget(site: &Path, serial: u64) -> io::Result<()> {
    match fs::remove_file(record_path(site, serial)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
