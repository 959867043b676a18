//! Commands as an interpreter is handed them: a [`Command`] whose payload is a reader of the
//! bytes ([`StreamedCommand`]) instead of their location in the data part ([`Payload`]).
//!
//! The site opens each payload of an assignment as a [`PayloadStream`] (decrypted and
//! decompressed on the fly) and passes it on boxed; the plugin host streams it to the guest in
//! chunks, so no payload is ever held in memory whole. [`MemoryPayload`] serves tests and small
//! generated files.
//!
//! [`Payload`]: crate::Payload

use std::fmt;
use std::io::{self, Read};

use crate::format::Command;
use crate::read::PayloadStream;

/// The bytes of one command's payload, read from their start.
pub trait PayloadReader: Read + Send {
    /// Total number of bytes the reader yields from its start.
    fn size(&self) -> u64;
}

impl fmt::Debug for dyn PayloadReader + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({} bytes)", self.size())
    }
}

/// A command ready for an interpreter: its payload (write-file, apply-delta) is a reader.
pub type StreamedCommand = Command<Box<dyn PayloadReader>>;

impl PayloadReader for PayloadStream {
    fn size(&self) -> u64 {
        PayloadStream::size(self)
    }
}

/// A payload held in memory (tests, small generated files).
#[derive(Debug, Clone)]
pub struct MemoryPayload {
    bytes: io::Cursor<Vec<u8>>,
}

impl MemoryPayload {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self { bytes: io::Cursor::new(bytes.into()) }
    }

    /// Boxed, ready to go into a [`StreamedCommand`].
    pub fn boxed(bytes: impl Into<Vec<u8>>) -> Box<dyn PayloadReader> {
        Box::new(Self::new(bytes))
    }
}

impl Read for MemoryPayload {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.bytes.read(buf)
    }
}

impl PayloadReader for MemoryPayload {
    fn size(&self) -> u64 {
        self.bytes.get_ref().len() as u64
    }
}
