//! Driver for `cm-mctp` over real UDP multicast.
//!
//! The protocol lives in the sans-IO cores; this module only moves bytes: sockets with large
//! buffers, pacing by the core's timers, file reads for the sender (frames are read from disk by
//! offset, so a 4 GiB file is never in memory) and file writes for receivers (each frame is
//! written at its offset into a `.part` file that is renamed only after the BLAKE3 verifies).
//!
//! Each transfer runs on a blocking thread of its own (`spawn_blocking`), not as a tokio task:
//! a receiver must drain tens of thousands of datagrams a second while writing them to disk, and
//! a pacing sender needs sub-millisecond wake-ups. Both move datagrams in batches (`recvmmsg`,
//! `sendmmsg`), a receiver writes runs of contiguous frames with one `pwritev`, starts writeback
//! while receiving, and hashes and flushes the finished file on a helper thread while it keeps
//! answering the GL. Dropping the returned future stops the thread within 200 ms.
//!
//! Sockets: the sender uses one socket for frames to the group and for reports. A receiver uses
//! a group socket (bound to the group address and port, joined on the chosen interface, shared
//! with `SO_REUSEPORT` so several receivers can run on one host) and a unicast socket
//! (`ReceiveOptions::unicast_port`, ephemeral when 0), from which it reports and on which the GL
//! reaches it alone. A member that cannot receive multicast (`join_group: false`) has only the
//! unicast socket; the GL names it `ID@ADDR:PORT` with that port.
//!
//! A receiver that already holds an announced assignment in its directory (the file a delivery
//! would produce, same size and BLAKE3) answers "complete" at once and receives nothing.

mod announcers;
mod hash;
mod prefix_hash;
mod receive;
mod send;
mod sys;

pub use announcers::{AnnouncerMemory, FollowLeader};
pub use receive::{ReceiveOptions, Received, receive};
pub use send::{SendOptions, SendOutcome, next_origin, send_file};

// The cores' time: nanoseconds since the driver's `start` (`std::time::Instant` is the clock).
use cm_mctp::Instant as Time;
use cm_mctp::SenderError;
use socket2::Socket;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Socket buffer size we ask for (forced past `rmem_max` when running as root).
pub const SOCKET_BUFFER: usize = 32 << 20;

/// Datagrams moved per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 64;
/// Longest sleep of a driver loop (how soon a dropped future stops its thread).
const MAX_WAIT: Duration = Duration::from_millis(200);

/// Why a transfer failed.
#[derive(Debug, Error)]
pub enum MctpDriverError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("cannot start session: {0}")]
    Sender(#[from] SenderError),
    #[error("only IPv4 multicast groups are supported, got {0}")]
    NotIpv4(SocketAddr),
    #[error("no assignment was delivered within {0:?}")]
    Timeout(Duration),
}

/// Builds the error mapper. Its argument is evaluated at once: on a per-frame path, wrap the
/// call in a closure (`|e| io_err(format!(..))(e)`) so the message is formatted only on error.
fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MctpDriverError {
    let what = what.into();
    move |source| MctpDriverError::Io { what, source }
}

/// Sets a socket buffer, forcing past the sysctl cap when allowed (root), else best effort.
fn big_buffers(sock: &Socket, bytes: usize) {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain) in
        [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)]
    {
        // SAFETY: setsockopt on a valid fd with a pointer to a c_int and its exact size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                force,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    plain,
                    (&val as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

fn v4(addr: SocketAddr) -> Result<SocketAddrV4, MctpDriverError> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        other => Err(MctpDriverError::NotIpv4(other)),
    }
}

fn to_time(start: Instant, now: Instant) -> Time {
    Time::from_nanos(u64::try_from(now.duration_since(start).as_nanos()).unwrap_or(u64::MAX))
}

fn from_time(start: Instant, t: Time) -> Instant {
    start + t.since_origin()
}

/// Runs `work` on a blocking thread; dropping the returned future raises the stop flag, which
/// the loop checks at least every [`MAX_WAIT`].
async fn on_thread<T: Send + 'static>(
    work: impl FnOnce(&AtomicBool) -> Result<T, MctpDriverError> + Send + 'static,
) -> Result<T, MctpDriverError> {
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let guard = StopOnDrop(stop.clone());
    let r = tokio::task::spawn_blocking(move || work(&stop)).await;
    drop(guard);
    r.map_err(|e| MctpDriverError::Io {
        what: "MCTP driver thread".into(),
        source: io::Error::other(e),
    })?
}

fn stopped() -> MctpDriverError {
    MctpDriverError::Io {
        what: "transfer".into(),
        source: io::Error::new(io::ErrorKind::Interrupted, "cancelled by the caller"),
    }
}

fn hash_file(file: &File, path: &Path) -> Result<[u8; 32], MctpDriverError> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = file
            .read_at(&mut buf, at)
            .map_err(|e| io_err(format!("hash {}", path.display()))(e))?;
        if n == 0 {
            return Ok(*h.finalize().as_bytes());
        }
        h.update(&buf[..n]);
        at += n as u64;
    }
}
