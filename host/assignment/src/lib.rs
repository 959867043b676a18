//! Assignments: the streaming, versioned file format (`docs/assignment-format.md`), change
//! detection between a staging tree and the shadow copy of what the servers hold, and
//! rsync-class deltas.
//!
//! - [`format`]: the byte layout (header, command records) and validation rules; its
//!   [`Command`] is also what interpreters are handed.
//! - [`payload`]: commands with their payload as a reader ([`StreamedCommand`]), the batches
//!   an interpreter (native or plugin) applies.
//! - [`write`] / [`read`]: streaming writer and reader; no assignment is ever held in memory.
//! - [`delta`]: the delta engine (prefix/suffix, then rolling hash + BLAKE3 blocks).
//! - [`detect`]: staging vs shadow → an assignment (with the manifest of the whole tree).
//! - [`names`]: the one rule for names from outside (the header's site field, the manager's
//!   sites, groups, segments and servers).
//! - [`links`]: symlink chains resolved on the whole tree (no two links combine to escape).
//! - [`plugin_run`]: the plugin assignment (a component and its manifest for the plugin store).
//! - [`policy`]: per-file compression policy.
//! - [`sign`]: the manager's Ed25519 signatures and the keys servers pin.
//! - [`cipher`]: optional ChaCha20-Poly1305 encryption of the data part, chunk by chunk.
//! - [`reference`]: a native interpreter giving each command its exact meaning; tests compare
//!   the plugin interpreter's results against it.

pub mod cipher;
pub mod delta;
pub mod detect;
pub mod format;
pub mod links;
pub mod names;
pub mod payload;
pub mod plugin_run;
pub mod policy;
pub mod read;
pub mod reference;
pub mod sign;
pub mod write;

pub use cipher::CipherKey;
pub use detect::{BuildOptions, BuildReport, build};
pub use format::{AssignmentType, Codec, Command, DeltaOp, Header, Payload, TreeEntry, TreeKind};
pub use payload::{MemoryPayload, PayloadReader, StreamedCommand};
pub use policy::CompressionPolicy;
pub use read::{AssignmentReader, PayloadStream, ReadError};
pub use sign::{PublicKey, SignatureError, SigningKey, TrustedKeys};
pub use write::{AssignmentWriter, ChangeOutcome, Meta, WriteError};

/// The cluster's key for sealing assignments: with it the trailer is a keyed BLAKE3, so only
/// holders of the operator's secret can produce an assignment a server accepts.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// Derives the assignment key from the operator's cluster secret.
    pub fn derive(secret: &[u8]) -> Self {
        SealKey(blake3::derive_key("contentmover assignment seal v1", secret))
    }
}

/// The hasher for the trailer: keyed under the seal key when there is one.
pub(crate) fn trailer_hasher(key: Option<&SealKey>) -> blake3::Hasher {
    match key {
        Some(k) => blake3::Hasher::new_keyed(&k.0),
        None => blake3::Hasher::new(),
    }
}
