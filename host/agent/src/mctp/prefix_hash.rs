//! `PrefixHash`: how a receiver follows the file's BLAKE3 while frames arrive, so the final
//! verification only reads back what it could not follow (nothing, on a clean pass).

use cm_mctp::tree::{FrameTree, TreeLayout, frame_cv};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// How a receiver follows the file's BLAKE3 while frames arrive.
#[derive(Clone)]
#[allow(clippy::large_enum_variant, reason = "one per transfer (the Linear hasher inline)")]
pub(super) enum PrefixHash {
    /// Plain-tagged frames: BLAKE3 of the contiguous prefix `..hashed`, fed in order (frames
    /// past a gap are read back from the page cache once it is filled).
    Linear { hasher: blake3::Hasher, hashed: u64 },
    /// Tree-tagged frames: their chaining values (computed when the tag was checked), merged
    /// in order; no byte is hashed twice.
    Tree { layout: TreeLayout, tree: FrameTree },
}

impl PrefixHash {
    /// A frame was written: follow it.
    pub(super) fn written(&mut self, offset: u64, seq: u32, bytes: &[u8], cv: Option<[u8; 32]>) {
        match self {
            PrefixHash::Linear { hasher, hashed } => {
                if offset == *hashed {
                    hasher.update(bytes);
                    *hashed += bytes.len() as u64;
                }
            }
            // A frame without a CV (a plain-tagged repair from an older GL) is read back.
            PrefixHash::Tree { tree, .. } => {
                if let Some(cv) = cv {
                    tree.add(seq, cv);
                }
            }
        }
    }

    /// Reads back from `file` what the hash could not follow, from where it stands up to byte
    /// `upto` (the end of what is written contiguously from there, per `held_through`), at most
    /// `budget` bytes.
    pub(super) fn catch_up(
        &mut self,
        file: &File,
        size: u64,
        budget: u64,
        held_through: impl Fn(u64) -> u64,
    ) -> io::Result<()> {
        match self {
            PrefixHash::Linear { hasher, hashed } => {
                let end = held_through(*hashed).min(hashed.saturating_add(budget));
                let mut buf = vec![0u8; (end - *hashed).min(1 << 20) as usize];
                while *hashed < end {
                    let n = (end - *hashed).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], *hashed)?;
                    hasher.update(&buf[..n]);
                    *hashed += n as u64;
                }
            }
            PrefixHash::Tree { layout, tree } => {
                let fs = u64::from(layout.frame_size);
                let mut buf = Vec::new();
                let mut spent = 0;
                while let Some(seq) = tree.needs() {
                    let offset = u64::from(seq) * fs;
                    if spent >= budget || held_through(offset) <= offset {
                        break;
                    }
                    let n = (size - offset).min(fs) as usize;
                    buf.resize(n, 0);
                    file.read_exact_at(&mut buf[..n], offset)?;
                    tree.add(seq, frame_cv(offset, &buf[..n]));
                    spent += n as u64;
                }
            }
        }
        Ok(())
    }

    /// The file's BLAKE3 once everything up to `size` has been followed.
    pub(super) fn root(&self) -> Option<[u8; 32]> {
        match self {
            PrefixHash::Linear { hasher, .. } => Some(*hasher.finalize().as_bytes()),
            PrefixHash::Tree { tree, .. } => tree.root(),
        }
    }
}
