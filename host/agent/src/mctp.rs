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

mod sys;

use crate::mctp_hash::hash_frames;
// The cores' time: nanoseconds since the driver's `start` (`std::time::Instant` is the clock).
use cm_mctp::Instant as Time;
use cm_mctp::sender::SenderStats;
use cm_mctp::tree::{FrameTree, TreeLayout, frame_cv};
use cm_mctp::{
    Dest, Keys, Member, Output, Receiver, ReceiverConfig, RxEvent, Sender, SenderConfig,
    SenderError, SenderEvent, SessionInfo, SessionReport, Transmit,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Socket buffer size we ask for (forced past `rmem_max` when running as root).
pub const SOCKET_BUFFER: usize = 32 << 20;

/// Datagrams moved per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 64;
/// Messages per `recvmmsg` on a receiver: with GRO each holds up to ~60 KiB of datagrams, so
/// 16 keep the batch (resident memory) near 1 MiB.
const RX_BATCH: usize = 16;
/// Start writeback of a receiving file after this many new bytes.
const WRITEBACK_EVERY: u64 = 16 << 20;
/// Bytes of already-written frames a receiver reads back and hashes per batch, once a repaired
/// frame lets its in-order hash move on (bounded so receiving never waits long for it).
const CATCH_UP_PER_BATCH: u64 = 2 << 20;
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

/// How to send one file.
#[derive(Debug, Clone)]
pub struct SendOptions {
    pub config: SenderConfig,
    /// Interface address for multicast (`IP_MULTICAST_IF`) and for the report socket.
    pub interface: Ipv4Addr,
    pub ttl: u32,
    pub secret: Vec<u8>,
    pub assignment: u64,
    pub name: String,
    pub members: Vec<Member>,
    /// The file's BLAKE3 when it is already known and trusted, as a GL knows an assignment's
    /// from the manifest it verified the assignment against on arrival. The session then
    /// starts at once instead of after a pass over the file, and the frames' chaining values
    /// are computed alongside the sending. A value that does not match the file fails every
    /// member's verification: nothing wrong is ever delivered, the session ends with a problem.
    pub known_hash: Option<[u8; 32]>,
}

/// What a send produced.
#[derive(Debug, Clone)]
pub struct SendOutcome {
    pub report: SessionReport,
    pub stats: SenderStats,
    /// UDP payload bytes put on the wire (all datagrams, every destination).
    pub wire_bytes: u64,
    pub elapsed: Duration,
    /// The sending rate at the end (bytes per second), after the adaptation.
    pub final_rate: u64,
}

/// Sends `path` to the group and returns the GL's final report.
pub async fn send_file(path: &Path, opts: SendOptions) -> Result<SendOutcome, MctpDriverError> {
    let path = path.to_owned();
    on_thread(move |stop| send_blocking(&path, opts, stop)).await
}

fn send_blocking(
    path: &Path,
    opts: SendOptions,
    stop: &AtomicBool,
) -> Result<SendOutcome, MctpDriverError> {
    let file = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let size = file.metadata().map_err(io_err(format!("stat {}", path.display())))?.len();
    v4(opts.config.group)?;
    let sock =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    big_buffers(&sock, SOCKET_BUFFER);
    sock.set_multicast_if_v4(&opts.interface).map_err(io_err("IP_MULTICAST_IF"))?;
    sock.set_multicast_ttl_v4(opts.ttl).map_err(io_err("IP_MULTICAST_TTL"))?;
    sock.set_multicast_loop_v4(true).map_err(io_err("IP_MULTICAST_LOOP"))?;
    sock.set_nonblocking(true).map_err(io_err("nonblocking"))?;
    let bind = SocketAddrV4::new(opts.interface, opts.config.report_port);
    sock.bind(&SocketAddr::V4(bind).into()).map_err(io_err(format!("bind {bind}")))?;
    let fd = sock.as_raw_fd();

    let start = Instant::now();
    // A known hash: no pass over the file before the session; with tree tags a helper thread
    // computes the frames' CVs ahead of the sending (a frame it has not reached yet is hashed
    // as it is tagged). Otherwise, with tree-tagged frames (a frame size that fits BLAKE3's
    // tree, no encryption, several frames), the file is hashed frame by frame on every core
    // and the frames' CVs are kept, so tagging a frame does not hash it again.
    let tree_tagged = opts.config.tree_tagged(size);
    let mut cvs_ahead = None;
    let (hash, cvs) = if let Some(hash) = opts.known_hash {
        if tree_tagged {
            cvs_ahead = spawn_cv_helper(&file, size, opts.config.frame_size);
        }
        (hash, None)
    } else if tree_tagged {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        hash_frames(size, opts.config.frame_size, threads, |offset, buf| {
            file.read_exact_at(buf, offset)
        })
        .map_err(io_err(format!("hash {}", path.display())))?
    } else {
        (hash_file(&file, path)?, None)
    };
    let inline = if size <= u64::from(opts.config.frame_size) {
        Some(std::fs::read(path).map_err(io_err(format!("read {}", path.display())))?)
    } else {
        None
    };
    let info = SessionInfo { assignment: opts.assignment, name: opts.name.clone(), size, hash };
    let keys = Keys::derive(&opts.secret);
    let mut sender = Sender::new(
        to_time(start, Instant::now()),
        opts.config,
        keys,
        ChaCha8Rng::from_os_rng(),
        info,
        &opts.members,
        inline.as_deref(),
    )?;
    if let Some(cvs) = cvs {
        sender.set_frame_cvs(cvs);
    }
    let mut frames: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(65_536)).collect();
    let mut controls: Vec<Vec<u8>> = Vec::new();
    let mut gso = sys::gso_supported(fd);
    let mut reports = sys::RecvBatch::new(16, 65_536);
    let mut wire_bytes = 0u64;
    let mut logged = (0, 0);
    tracing::debug!(hash_ms = start.elapsed().as_millis(), "session starts");
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(stopped());
        }
        if let Some(rx) = &cvs_ahead {
            while let Ok((first, cvs)) = rx.try_recv() {
                sender.extend_frame_cvs(first, &cvs);
            }
        }
        let now = to_time(start, Instant::now());
        sender.handle_timeout(now);
        let st = sender.stats();
        if (st.passes, st.rounds) != logged {
            logged = (st.passes, st.rounds);
            tracing::debug!(
                pass = st.passes,
                round = st.rounds,
                frames_sent = st.frames_sent,
                reports = st.reports,
                rate = sender.rate(),
                "progress"
            );
        }
        // Everything due now, BATCH frames at a time: equal frames to the same place go out as
        // one GSO message, everything in one `sendmmsg`.
        loop {
            let mut used = 0;
            controls.clear();
            let mut order: Vec<(bool, usize, Dest)> = Vec::with_capacity(BATCH);
            while used < BATCH {
                let Some(t) = sender.poll_transmit(now) else { break };
                match t {
                    Output::Control(Transmit { dest, payload: bytes }) => {
                        order.push((false, controls.len(), dest));
                        controls.push(bytes);
                    }
                    Output::Frame { dest, frame } => {
                        let buf = &mut frames[used];
                        sender
                            .encode_frame(&frame, buf, |p| file.read_exact_at(p, frame.offset))
                            .map_err(|e| {
                            io_err(format!("read {} at {}", path.display(), frame.offset))(e)
                        })?;
                        order.push((true, used, dest));
                        used += 1;
                    }
                    Output::Coded { dest, coded } => {
                        let buf = &mut frames[used];
                        sender
                            .encode_coded(&coded, buf, |offset, p| file.read_exact_at(p, offset))
                            .map_err(|e| {
                                io_err(format!("read {} for a coded repair", path.display()))(e)
                            })?;
                        order.push((true, used, dest));
                        used += 1;
                    }
                }
            }
            if order.is_empty() {
                break;
            }
            let everyone: Vec<SocketAddrV4> =
                sender.everyone().iter().filter_map(|a| v4(*a).ok()).collect();
            let mut out: Vec<sys::Outgoing<'_>> = Vec::new();
            let mut i = 0;
            while i < order.len() {
                let (is_frame, at, dest) = order[i];
                let bytes: &[u8] = if is_frame { &frames[at] } else { &controls[at] };
                let mut pieces = vec![bytes];
                i += 1;
                while gso
                    && is_frame
                    && pieces.len() < sys::MAX_SEGMENTS
                    && (pieces.len() + 1) * bytes.len() <= sys::MAX_GSO_BYTES
                {
                    match order.get(i) {
                        Some(&(true, next, d))
                            if d == dest && frames[next].len() == bytes.len() =>
                        {
                            pieces.push(&frames[next]);
                            i += 1;
                        }
                        _ => break,
                    }
                }
                let segment = (pieces.len() > 1).then(|| bytes.len() as u16);
                let len = (pieces.len() * bytes.len()) as u64;
                let tos: Vec<SocketAddrV4> = match dest {
                    Dest::Group => everyone.clone(),
                    Dest::Channel(to) | Dest::To(to) => v4(to).ok().into_iter().collect(),
                };
                for to in tos {
                    wire_bytes += len;
                    out.push(sys::Outgoing { pieces: pieces.clone(), to, segment });
                }
            }
            let (_, refused) = sys::send_batch(fd, &out);
            if let Some(e) = refused {
                if gso
                    && out.iter().any(|o| o.segment.is_some())
                    && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP))
                {
                    tracing::info!(error = %e, "UDP GSO refused on this route; sending datagrams one by one");
                    gso = false;
                } else {
                    tracing::debug!(error = %e, "datagrams not sent; they count as lost");
                }
            }
            // Drain reports between batches so the socket never backs up.
            drain_reports(&mut sender, &mut reports, fd, now);
        }
        while let Some(e) = sender.poll_event() {
            match e {
                SenderEvent::Joined(id) => tracing::info!(member = id, "member joined the session"),
                SenderEvent::Finished(report) => {
                    return Ok(SendOutcome {
                        report,
                        stats: sender.stats().clone(),
                        wire_bytes,
                        elapsed: start.elapsed(),
                        final_rate: sender.rate(),
                    });
                }
            }
        }
        let wake = sender.poll_timeout().map_or(Instant::now() + MAX_WAIT, |t| from_time(start, t));
        let wait = wake.saturating_duration_since(Instant::now()).min(MAX_WAIT);
        if !wait.is_zero() {
            sys::wait(&[(fd, libc::POLLIN)], wait).map_err(io_err("poll"))?;
        }
        drain_reports(&mut sender, &mut reports, fd, to_time(start, Instant::now()));
    }
}

/// Frames' chaining values, computed in order on a thread of their own and handed over in
/// chunks (first frame, values). The thread stops at the end of the file, at a read error
/// (the sender then hashes the remaining frames itself) or when the sender is gone. `None`:
/// too many frames to keep their values, or no thread.
fn spawn_cv_helper(
    file: &File,
    size: u64,
    frame_size: u16,
) -> Option<std::sync::mpsc::Receiver<(u32, Vec<[u8; 32]>)>> {
    let frames = u32::try_from(size.div_ceil(u64::from(frame_size)))
        .ok()
        .filter(|f| *f <= cm_mctp::tree::MAX_KEPT_CVS)?;
    let file = file.try_clone().ok()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mctp-cvs".into())
        .spawn(move || {
            let read = |offset, buf: &mut [u8]| file.read_exact_at(buf, offset);
            let _ = cm_mctp::tree::frame_cvs_in_order(
                size,
                frame_size,
                0..frames,
                read,
                |first, cvs| tx.send((first, cvs.to_vec())).is_ok(),
            );
        })
        .ok()?;
    Some(rx)
}

fn drain_reports(
    sender: &mut Sender,
    batch: &mut sys::RecvBatch,
    fd: std::os::fd::RawFd,
    now: Time,
) {
    loop {
        let n = match batch.recv(fd) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "report socket");
                0
            }
        };
        for i in 0..n {
            let (bytes, from, seg) = batch.get(i);
            for d in bytes.chunks(seg.unwrap_or(bytes.len()).max(1)) {
                sender.handle_datagram(now, SocketAddr::V4(from), d);
            }
        }
        if n < 16 {
            return;
        }
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

/// How to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub group: SocketAddr,
    pub interface: Ipv4Addr,
    pub member: u64,
    pub secret: Vec<u8>,
    pub dir: PathBuf,
    /// Give up when nothing has been delivered after this long.
    pub timeout: Duration,
    /// After delivery, keep answering the GL until the data channel has been quiet this long.
    pub linger: Duration,
    pub session_timeout: Duration,
    /// Benchmarks and tests only: drop this share of incoming datagrams before the core sees
    /// them (loss injected in the driver, where network namespaces are not available).
    pub inject_loss: f64,
    /// Port of the unicast socket (reports go out from it; a unicast-only member receives the
    /// whole session on it). 0: an ephemeral port.
    pub unicast_port: u16,
    /// Join the multicast group (false for a member that cannot receive multicast: the GL
    /// must then list it with this member's unicast address and port).
    pub join_group: bool,
    /// `fsync` the file before reporting complete, so "complete" survives a crash of this
    /// host. Off, the copy sits in the page cache at delivery (like any file just written);
    /// whoever uses it verifies its BLAKE3 again (the site's apply does).
    pub durable: bool,
}

impl ReceiveOptions {
    /// Defaults for everything but the channel, the member and where files go: no timeout to
    /// speak of, 1 s linger, 10 s session timeout, no injected loss, an ephemeral unicast port,
    /// the group joined, not durable.
    pub fn new(
        group: SocketAddr,
        interface: Ipv4Addr,
        member: u64,
        secret: Vec<u8>,
        dir: PathBuf,
    ) -> Self {
        ReceiveOptions {
            group,
            interface,
            member,
            secret,
            dir,
            timeout: Duration::from_secs(3600),
            linger: Duration::from_secs(1),
            session_timeout: Duration::from_secs(10),
            inject_loss: 0.0,
            unicast_port: 0,
            join_group: true,
            durable: false,
        }
    }
}

/// What a receive produced.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: PathBuf,
    pub info: SessionInfo,
    pub stats: cm_mctp::ReceiverStats,
    /// The assignment was already in the directory: nothing was received, the GL was told
    /// "complete" at once.
    pub already_held: bool,
}

/// The file a session is being written into.
struct Part {
    session: u64,
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    /// The file's hash so far, fed as frames are written, so the final verification only reads
    /// back what it could not follow (nothing, on a clean pass).
    hash: PrefixHash,
    /// Bytes written since writeback was last started.
    dirty: u64,
    durable: bool,
}

/// How a receiver follows the file's BLAKE3 while frames arrive.
#[derive(Clone)]
enum PrefixHash {
    /// Plain-tagged frames: BLAKE3 of the contiguous prefix `..hashed`, fed in order (frames
    /// past a gap are read back from the page cache once it is filled).
    Linear { hasher: blake3::Hasher, hashed: u64 },
    /// Tree-tagged frames: their chaining values (computed when the tag was checked), merged
    /// in order; no byte is hashed twice.
    Tree { layout: TreeLayout, tree: FrameTree },
}

impl Part {
    fn new(
        session: u64,
        path: PathBuf,
        file: File,
        size: u64,
        tree: Option<TreeLayout>,
        durable: bool,
    ) -> Self {
        let hash = match tree {
            Some(layout) => PrefixHash::Tree { layout, tree: FrameTree::new(layout.frames) },
            None => PrefixHash::Linear { hasher: blake3::Hasher::new(), hashed: 0 },
        };
        Part { session, path, file: Arc::new(file), size, hash, dirty: 0, durable }
    }
}

impl PrefixHash {
    /// A frame was written: follow it.
    fn written(&mut self, offset: u64, seq: u32, bytes: &[u8], cv: Option<[u8; 32]>) {
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
    fn catch_up(
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
    fn root(&self) -> Option<[u8; 32]> {
        match self {
            PrefixHash::Linear { hasher, .. } => Some(*hasher.finalize().as_bytes()),
            PrefixHash::Tree { tree, .. } => tree.root(),
        }
    }
}

/// Finishes a part's hash (reads back whatever it did not follow; every frame is written by
/// now) and, when `durable`, flushes the file: the slow end of a transfer, run on a helper
/// thread so the receiver keeps answering meanwhile.
fn finish_and_flush(
    file: &File,
    mut hash: PrefixHash,
    size: u64,
    durable: bool,
) -> io::Result<[u8; 32]> {
    hash.catch_up(file, size, u64::MAX, |_| size)?;
    if durable {
        file.sync_all()?;
    }
    hash.root().ok_or_else(|| io::Error::other("hash incomplete after reading the whole file"))
}

/// One frame received and not yet written: where its bytes sit in the receive batch.
struct PendingWrite {
    session: u64,
    seq: u32,
    offset: u64,
    slot: usize,
    start: usize,
    len: usize,
    cv: Option<[u8; 32]>,
}

/// The receiving side's state between datagrams.
struct RxDriver {
    rx: Receiver,
    dir: PathBuf,
    durable: bool,
    /// Announced hashes already looked up in `dir` and not found there.
    not_held: Vec<[u8; 32]>,
    already_held: bool,
    part: Option<Part>,
    delivered: Option<(PathBuf, SessionInfo)>,
    /// A verification running on a helper thread: (session, verdict channel).
    verifying: Option<(u64, mpsc::Receiver<bool>)>,
}

/// Receives one assignment into `opts.dir` and returns where it landed (after answering the
/// GL until it stops asking).
pub async fn receive(opts: ReceiveOptions) -> Result<Received, MctpDriverError> {
    on_thread(move |stop| receive_blocking(opts, stop)).await
}

fn receive_blocking(opts: ReceiveOptions, stop: &AtomicBool) -> Result<Received, MctpDriverError> {
    let group = v4(opts.group)?;
    let gsock = if opts.join_group {
        let gsock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(io_err("socket"))?;
        gsock.set_reuse_address(true).map_err(io_err("SO_REUSEADDR"))?;
        gsock.set_reuse_port(true).map_err(io_err("SO_REUSEPORT"))?;
        big_buffers(&gsock, SOCKET_BUFFER);
        gsock.bind(&SocketAddr::V4(group).into()).map_err(io_err(format!("bind {group}")))?;
        gsock.join_multicast_v4(group.ip(), &opts.interface).map_err(io_err(format!(
            "join {} on {}",
            group.ip(),
            opts.interface
        )))?;
        gsock.set_nonblocking(true).map_err(io_err("nonblocking"))?;
        Some(gsock)
    } else {
        None
    };
    let usock =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    // A unicast-only member gets the whole session here.
    big_buffers(&usock, if opts.join_group { 4 << 20 } else { SOCKET_BUFFER });
    let ubind = SocketAddrV4::new(opts.interface, opts.unicast_port);
    usock.bind(&SocketAddr::V4(ubind).into()).map_err(io_err(format!("bind {ubind}")))?;
    usock.set_nonblocking(true).map_err(io_err("nonblocking"))?;
    let fds: Vec<std::os::fd::RawFd> =
        gsock.iter().map(AsRawFd::as_raw_fd).chain([usock.as_raw_fd()]).collect();
    let gro = fds.iter().all(|fd| sys::enable_gro(*fd));
    tracing::debug!(gro, "receive sockets ready");

    std::fs::create_dir_all(&opts.dir).map_err(io_err(format!("create {}", opts.dir.display())))?;
    let start = Instant::now();
    let mut cfg = ReceiverConfig::new(opts.member);
    cfg.session_timeout = opts.session_timeout;
    let rx = Receiver::new(cfg, Keys::derive(&opts.secret), ChaCha8Rng::from_os_rng());
    let mut d = RxDriver {
        rx,
        dir: opts.dir.clone(),
        durable: opts.durable,
        not_held: Vec::new(),
        already_held: false,
        part: None,
        delivered: None,
        verifying: None,
    };
    let mut loss = ChaCha8Rng::from_os_rng();
    let mut last_heard = Instant::now();
    let mut batch = sys::RecvBatch::new(RX_BATCH, 65_536);
    let mut pending: Vec<PendingWrite> = Vec::with_capacity(BATCH);
    loop {
        if let Some((path, info)) = &d.delivered
            && last_heard.elapsed() >= opts.linger
        {
            return Ok(Received {
                path: path.clone(),
                info: info.clone(),
                stats: d.rx.stats().clone(),
                already_held: d.already_held,
            });
        }
        if stop.load(Ordering::Relaxed)
            || (d.delivered.is_none() && start.elapsed() >= opts.timeout)
        {
            if let Some(p) = d.part.take() {
                let _ = std::fs::remove_file(&p.path);
            }
            return Err(if stop.load(Ordering::Relaxed) {
                stopped()
            } else {
                MctpDriverError::Timeout(opts.timeout)
            });
        }
        let mut wake =
            d.rx.poll_timeout()
                .map_or(Instant::now() + MAX_WAIT, |t| from_time(start, t))
                .min(Instant::now() + MAX_WAIT);
        if d.verifying.is_some() {
            wake = wake.min(Instant::now() + Duration::from_millis(2));
        }
        let polls: Vec<(std::os::fd::RawFd, libc::c_short)> =
            fds.iter().map(|fd| (*fd, libc::POLLIN)).collect();
        let ready = sys::wait(&polls, wake.saturating_duration_since(Instant::now()))
            .map_err(io_err("poll"))?;
        for (&fd, is_ready) in fds.iter().zip(ready) {
            if !is_ready {
                continue;
            }
            // Keep draining while full batches come: a backlog is cleared before timers run.
            loop {
                let n = batch.recv(fd).map_err(io_err("recv"))?;
                if n == 0 {
                    break;
                }
                last_heard = Instant::now();
                let now = to_time(start, last_heard);
                for slot in 0..n {
                    let (buf, from, seg) = batch.get(slot);
                    let base = buf.as_ptr() as usize;
                    let seg = seg.unwrap_or(buf.len()).max(1);
                    for datagram in buf.chunks_mut(seg) {
                        if opts.inject_loss > 0.0 && loss.random_bool(opts.inject_loss) {
                            continue;
                        }
                        if let Some(info) = d.rx.new_announcement(datagram) {
                            d.look_up(&info);
                        }
                        let w = d.rx.handle_datagram(now, SocketAddr::V4(from), datagram);
                        // A new session's file is opened before its first write is flushed;
                        // writes still pending for a session that just ended are refused at
                        // the flush and change nothing.
                        if d.rx.has_events() {
                            d.handle_events(now)?;
                        }
                        match w {
                            Some(w) if w.coded.is_some() => d.write_coded(&w),
                            Some(w) => pending.push(PendingWrite {
                                session: w.session,
                                seq: w.seq,
                                offset: w.offset,
                                slot,
                                start: w.bytes.as_ptr() as usize - base,
                                len: w.bytes.len(),
                                cv: w.cv,
                            }),
                            None => {}
                        }
                    }
                }
                d.flush(&mut pending, &batch);
                d.handle_events(now)?;
                d.catch_up(CATCH_UP_PER_BATCH);
                if n < RX_BATCH {
                    break;
                }
            }
        }
        let now = to_time(start, Instant::now());
        d.poll_verdict(now);
        d.rx.handle_timeout(now);
        d.handle_events(now)?;
        while let Some((to, bytes)) = d.rx.poll_transmit() {
            if let Err(e) = usock.send_to(&bytes, &to.into()) {
                tracing::debug!(%to, error = %e, "report send failed");
            }
        }
    }
}

impl RxDriver {
    /// An announced assignment we may hold already: the file a delivery would have produced,
    /// with the announced size and BLAKE3. Looked up once per content (announcements repeat).
    fn look_up(&mut self, info: &SessionInfo) {
        if self.not_held.contains(&info.hash) {
            return;
        }
        let path = final_path(&self.dir, info);
        let held = File::open(&path)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file() && m.len() == info.size))
            .is_some_and(|f| hash_file(&f, &path).is_ok_and(|h| h == info.hash));
        if held {
            tracing::debug!(path = %path.display(), "announced assignment already held");
            self.rx.add_held(info.hash);
        } else {
            self.not_held.push(info.hash);
        }
    }

    /// Moves the in-order hash over frames that arrived ahead of a gap now filled (reading
    /// them back from the page cache, at most `budget` bytes), so the verification at the end
    /// has little left to read; the CPU is spent while the GL is still sending.
    fn catch_up(&mut self, budget: u64) {
        if self.verifying.is_some() || self.rx.progress().is_none() {
            return;
        }
        let Some(p) = self.part.as_mut() else { return };
        let rx = &self.rx;
        // A read error leaves the hash where it stands: the verification reads again and decides.
        let _ = p.hash.catch_up(&p.file, p.size, budget, |offset| rx.held_through(offset));
    }

    /// Writes the pending frames (runs of contiguous ones with one `pwritev`), then confirms
    /// each to the core.
    fn flush(&mut self, pending: &mut Vec<PendingWrite>, batch: &sys::RecvBatch) {
        let mut i = 0;
        while i < pending.len() {
            let mut j = i + 1;
            while j < pending.len()
                && pending[j].session == pending[i].session
                && pending[j].offset == pending[j - 1].offset + pending[j - 1].len as u64
            {
                j += 1;
            }
            let run = &pending[i..j];
            let session = run[0].session;
            let result = match self.part.as_mut().filter(|p| p.session == session) {
                None => Err("no file open for the session".to_string()),
                Some(p) => {
                    let pieces: Vec<&[u8]> = run
                        .iter()
                        .map(|w| &batch.slice(w.slot)[w.start..w.start + w.len])
                        .collect();
                    match sys::pwrite_all(&p.file, &pieces, run[0].offset) {
                        Ok(()) => {
                            for (w, bytes) in run.iter().zip(&pieces) {
                                p.hash.written(w.offset, w.seq, bytes, w.cv);
                            }
                            p.dirty += pieces.iter().map(|b| b.len() as u64).sum::<u64>();
                            if p.durable && p.dirty >= WRITEBACK_EVERY {
                                p.dirty = 0;
                                sys::start_writeback(&p.file);
                            }
                            Ok(())
                        }
                        Err(e) => {
                            Err(format!("write {} at {}: {e}", p.path.display(), run[0].offset))
                        }
                    }
                }
            };
            match result {
                Ok(()) => run.iter().for_each(|w| self.rx.written(w.session, w.seq, w.len)),
                Err(reason) => self.rx.storage_failed(session, reason),
            }
            i = j;
        }
        pending.clear();
    }

    /// A frame recovered from a coded repair: the repair's payload XOR the other frames (read
    /// back from the file, where they were written), written at once. Repairs are few, so this
    /// path favours simplicity over batching.
    fn write_coded(&mut self, w: &cm_mctp::Write<'_>) {
        let Some(coded) = &w.coded else { return };
        let result = match self.part.as_mut().filter(|p| p.session == w.session) {
            None => Err("no file open for the session".to_string()),
            Some(p) => {
                let mut recover = || -> io::Result<()> {
                    let mut frame = w.bytes.to_vec();
                    let mut other = vec![0u8; frame.len()];
                    for &(offset, len) in &coded.xor {
                        p.file.read_exact_at(&mut other[..len], offset)?;
                        frame.iter_mut().zip(&other[..len]).for_each(|(a, b)| *a ^= b);
                    }
                    frame.truncate(coded.len);
                    p.file.write_all_at(&frame, w.offset)?;
                    let cv = matches!(p.hash, PrefixHash::Tree { .. })
                        .then(|| frame_cv(w.offset, &frame));
                    p.hash.written(w.offset, w.seq, &frame, cv);
                    Ok(())
                };
                recover().map_err(|e| {
                    format!("coded repair of frame {} in {}: {e}", w.seq, p.path.display())
                })
            }
        };
        match result {
            Ok(()) => self.rx.written(w.session, w.seq, coded.len),
            Err(reason) => self.rx.storage_failed(w.session, reason),
        }
    }

    /// The verdict of a verification running on the helper thread, if it is in.
    fn poll_verdict(&mut self, now: Time) {
        let Some((session, rx)) = &self.verifying else { return };
        match rx.try_recv() {
            Ok(ok) => {
                let session = *session;
                tracing::debug!(session, ok, "verification done");
                self.verifying = None;
                self.rx.verified(now, session, ok);
            }
            Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => {
                let session = *session;
                self.verifying = None;
                self.rx.verified(now, session, false);
            }
        }
    }

    fn handle_events(&mut self, now: Time) -> Result<(), MctpDriverError> {
        while let Some(e) = self.rx.poll_event() {
            match e {
                RxEvent::Started { session, info, resumed, tree } => {
                    let path = part_path(&self.dir, &info);
                    let open = if resumed && path.exists() {
                        std::fs::OpenOptions::new().write(true).read(true).open(&path)
                    } else {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .read(true)
                            .create(true)
                            .truncate(true)
                            .open(&path)
                            .and_then(|f| sys::preallocate(&f, info.size).map(|()| f))
                    };
                    match open {
                        // A resumed file's prefix hash is rebuilt from disk at verification.
                        Ok(file) => {
                            tracing::debug!(session, resumed, "session started");
                            self.part =
                                Some(Part::new(session, path, file, info.size, tree, self.durable));
                        }
                        Err(e) => self
                            .rx
                            .storage_failed(session, format!("create {}: {e}", path.display())),
                    }
                }
                RxEvent::Verify { session, info } => {
                    match self.part.as_ref().filter(|p| p.session == session) {
                        Some(p) => {
                            let (file, hash, durable) = (p.file.clone(), p.hash.clone(), p.durable);
                            tracing::debug!(session, "every frame held; verifying");
                            let (tx, verdict) = mpsc::channel();
                            std::thread::spawn(move || {
                                let ok = finish_and_flush(&file, hash, info.size, durable)
                                    .is_ok_and(|h| h == info.hash);
                                let _ = tx.send(ok);
                            });
                            self.verifying = Some((session, verdict));
                        }
                        None => self.rx.verified(now, session, false),
                    }
                }
                RxEvent::Delivered { info, .. } => {
                    let from = part_path(&self.dir, &info);
                    let to = final_path(&self.dir, &info);
                    // Flushed by the verification when durable.
                    self.part = None;
                    std::fs::rename(&from, &to).map_err(io_err(format!(
                        "rename {} to {}",
                        from.display(),
                        to.display()
                    )))?;
                    tracing::info!(path = %to.display(), size = info.size, "assignment delivered");
                    self.delivered = Some((to, info));
                }
                RxEvent::AlreadyHeld { info, .. } => {
                    tracing::info!(name = %info.name, "already hold this assignment; answered complete");
                    self.delivered = Some((final_path(&self.dir, &info), info));
                    self.already_held = true;
                }
                RxEvent::Abandoned { info, reason, .. } => {
                    tracing::warn!(name = %info.name, %reason, "session abandoned");
                    self.verifying = None;
                    if let Some(p) = self.part.take() {
                        let _ = std::fs::remove_file(&p.path);
                    }
                }
            }
        }
        Ok(())
    }
}

fn part_path(dir: &Path, info: &SessionInfo) -> PathBuf {
    let hex: String = info.hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!(".mctp-{hex}.part"))
}

/// The delivered file's name: the last component of the announced name, or the assignment id.
fn final_path(dir: &Path, info: &SessionInfo) -> PathBuf {
    let name = Path::new(&info.name)
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.starts_with('.') && !n.is_empty());
    dir.join(name.map_or_else(|| format!("assignment-{}", info.assignment), str::to_owned))
}
