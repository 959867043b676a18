//! The chunk manifest of an assignment: its size, its BLAKE3, and one BLAKE3 per fixed-size chunk.
//!
//! It travels in every notification, so each GL verifies every chunk as it arrives and forwards
//! only verified bytes (pipelined forwarding never spreads corruption), and a resumed transfer
//! restarts at a chunk boundary.
//!
//! The manifest itself is plain data and its checks are pure, with one exception that does IO:
//! [`Manifest::of_file`] reads a whole file from disk to hash it (the manager's copy of an
//! assignment, a test's delivered copy).

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;
use thiserror::Error;

/// Default chunk size: big enough that hashing and bookkeeping cost nothing, small enough that a
/// hop adds little latency to a pipelined tree.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Largest chunk a manifest may declare (bounds the receive buffer).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub size: u64,
    pub chunk_size: u32,
    /// BLAKE3 of the whole assignment, hex.
    pub blake3: String,
    /// BLAKE3 of each chunk, hex, in order.
    pub chunks: Vec<String>,
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest invalid: {0}")]
    Invalid(&'static str),
    #[error("chunk {index} of the assignment fails its BLAKE3 check")]
    ChunkMismatch { index: u64 },
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl Manifest {
    /// Hashes a file chunk by chunk: reads it from disk (blocking IO).
    pub fn of_file(path: &Path, chunk_size: u32) -> Result<Manifest, ManifestError> {
        let io = |source| ManifestError::Io { path: path.display().to_string(), source };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut whole = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; chunk_size as usize];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = file.read(&mut buf[filled..]).map_err(io)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            whole.update(&buf[..filled]);
            chunks.push(blake3::hash(&buf[..filled]).to_hex().to_string());
            size += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        Ok(Manifest { size, chunk_size, blake3: whole.finalize().to_hex().to_string(), chunks })
    }

    /// Hashes bytes in memory.
    pub fn of_bytes(data: &[u8], chunk_size: u32) -> Manifest {
        let chunks = data
            .chunks(chunk_size as usize)
            .map(|c| blake3::hash(c).to_hex().to_string())
            .collect();
        Manifest {
            size: data.len() as u64,
            chunk_size,
            blake3: blake3::hash(data).to_hex().to_string(),
            chunks,
        }
    }

    /// Checks the manifest is self-consistent before anyone sizes a buffer from it.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(ManifestError::Invalid("chunk size out of range"));
        }
        if self.chunks.len() as u64 != self.size.div_ceil(u64::from(self.chunk_size)) {
            return Err(ManifestError::Invalid("chunk count does not match size"));
        }
        let is_hash = |h: &String| blake3::Hash::from_hex(h).is_ok();
        if !is_hash(&self.blake3) || !self.chunks.iter().all(is_hash) {
            return Err(ManifestError::Invalid("hash is not 64 hex digits"));
        }
        Ok(())
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index * u64::from(self.chunk_size);
        (self.size - start).min(u64::from(self.chunk_size))
    }

    /// Verifies chunk `index`. Compares `blake3::Hash` values, which is constant time.
    pub fn verify_chunk(&self, index: u64, data: &[u8]) -> Result<(), ManifestError> {
        self.verify_chunk_hash(index, data.len() as u64, &blake3::hash(data))
    }

    /// Verifies chunk `index` from its length and hash, for a receiver that hashed the chunk
    /// piece by piece as it arrived (no copy into one buffer).
    pub fn verify_chunk_hash(
        &self,
        index: u64,
        len: u64,
        hash: &blake3::Hash,
    ) -> Result<(), ManifestError> {
        let expected = self
            .chunks
            .get(index as usize)
            .and_then(|h| blake3::Hash::from_hex(h).ok())
            .ok_or(ManifestError::Invalid("chunk index out of range"))?;
        if len != self.chunk_len(index) || *hash != expected {
            return Err(ManifestError::ChunkMismatch { index });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_verify_and_tampering_is_caught() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let m = Manifest::of_bytes(&data, 4096);
        m.validate().unwrap();
        assert_eq!(m.chunk_count(), 3);
        assert_eq!(m.chunk_len(2), 10_000 - 8192);
        for i in 0..3 {
            let s = (i * 4096) as usize;
            let e = (s + 4096).min(data.len());
            m.verify_chunk(i, &data[s..e]).unwrap();
        }
        let mut bad = data[..4096].to_vec();
        bad[17] ^= 1;
        assert!(matches!(m.verify_chunk(0, &bad), Err(ManifestError::ChunkMismatch { index: 0 })));
        assert!(m.verify_chunk(2, &data[..4096]).is_err(), "wrong length must fail");
    }

    #[test]
    fn file_and_bytes_agree_and_bad_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        let data = vec![5u8; 3 * 1000 + 1];
        std::fs::write(&p, &data).unwrap();
        assert_eq!(Manifest::of_file(&p, 1000).unwrap(), Manifest::of_bytes(&data, 1000));
        let mut m = Manifest::of_bytes(&data, 1000);
        m.chunks.pop();
        assert!(m.validate().is_err());
        let mut m = Manifest::of_bytes(&data, 1000);
        m.chunk_size = 0;
        assert!(m.validate().is_err());
        let empty = Manifest::of_bytes(&[], 1000);
        empty.validate().unwrap();
        assert_eq!(empty.chunk_count(), 0);
    }
}
