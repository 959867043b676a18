//! What a member remembers of the GLs' announcements between sessions and across restarts
//! ([`cm_mctp::replay`]): the newest origin accepted from each GL, so a recorded announcement
//! multicast again later — in the next session, or after this agent restarted — is ignored. And
//! which GL the member follows, when an election tells it.

use cm_mctp::{AnnouncerFilter, Announcers};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The announcers a member accepted, shared by its successive receives and (when persistent)
/// kept in a file of its state directory.
#[derive(Debug, Clone, Default)]
pub struct AnnouncerMemory {
    current: Arc<Mutex<Announcers>>,
    file: Option<PathBuf>,
}

impl AnnouncerMemory {
    /// Kept only while the process runs.
    pub fn in_memory() -> Self {
        AnnouncerMemory::default()
    }

    /// Kept in `file` (created on the first accepted session). A file that does not decode is
    /// reported and replaced: its node would otherwise never receive again.
    pub fn persistent(file: PathBuf) -> Self {
        let current = match std::fs::read(&file) {
            Ok(bytes) => Announcers::decode(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), "announcer records unusable ({e}): starting empty");
                Announcers::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Announcers::default(),
            Err(e) => {
                tracing::warn!(file = %file.display(), "cannot read announcer records ({e}): starting empty");
                Announcers::default()
            }
        };
        AnnouncerMemory { current: Arc::new(Mutex::new(current)), file: Some(file) }
    }

    pub fn get(&self) -> Announcers {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Remembers `announcers` (and writes the file: a temporary one renamed over it, so a crash
    /// leaves the old or the new records, never half of them).
    pub fn store(&self, announcers: &Announcers) -> io::Result<()> {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = announcers.clone();
        let Some(file) = &self.file else { return Ok(()) };
        write_atomically(file, &announcers.encode())
    }
}

fn write_atomically(file: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut name = file.as_os_str().to_owned();
    name.push(".new");
    let tmp = PathBuf::from(name);
    std::fs::File::create(&tmp)?.write_all(bytes)?;
    std::fs::rename(&tmp, file)
}

/// Which GL's announcements a receiver accepts, asked again as it runs (the election's leader
/// can change during a receive).
#[derive(Clone)]
pub struct FollowLeader(pub Arc<dyn Fn() -> AnnouncerFilter + Send + Sync>);

impl std::fmt::Debug for FollowLeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FollowLeader").field(&(self.0)()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cm_mctp::Origin;

    #[test]
    fn persistent_memory_survives_a_restart_and_a_damaged_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state").join("mctp-announcers");
        let m = AnnouncerMemory::persistent(file.clone());
        assert!(m.get().is_empty());
        let mut a = m.get();
        a.accept(&Origin { node: 3, incarnation: 4, sequence: 5 });
        m.store(&a).unwrap();
        assert_eq!(AnnouncerMemory::persistent(file.clone()).get(), a);
        std::fs::write(&file, b"junk").unwrap();
        assert!(AnnouncerMemory::persistent(file).get().is_empty());
    }
}
