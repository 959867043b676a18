//! The receiving half: `receive` joins the group, hands datagrams to the core in batches (GRO
//! segments split here), writes frames at their offset into a `.part` file (contiguous ones with
//! one `pwritev`), follows the file's hash as they land, verifies on a helper thread while it
//! keeps answering the GL, and renames the file into place once the BLAKE3 matches. A session
//! that fails or is abandoned, and a receive that ends without delivery, leave no `.part`
//! behind. Only fresh announcements are followed ([`AnnouncerMemory`], [`FollowLeader`]).

use super::announcers::{AnnouncerMemory, FollowLeader};
use super::prefix_hash::PrefixHash;
use super::{
    BATCH, MAX_WAIT, MctpDriverError, SOCKET_BUFFER, big_buffers, from_time, hash_file, io_err,
    on_thread, stopped, sys, to_time, v4,
};
use cm_mctp::Instant as Time;
use cm_mctp::tree::{FrameTree, TreeLayout, frame_cv};
use cm_mctp::{Dest, Keys, Receiver, ReceiverConfig, RxEvent, SessionInfo};
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

/// Messages per `recvmmsg` on a receiver: with GRO each holds up to ~60 KiB of datagrams, so
/// 16 keep the batch (resident memory) near 1 MiB.
const RX_BATCH: usize = 16;
/// Start writeback of a receiving file after this many new bytes.
const WRITEBACK_EVERY: u64 = 16 << 20;
/// Bytes of already-written frames a receiver reads back and hashes per batch, once a repaired
/// frame lets its in-order hash move on (bounded so receiving never waits long for it).
const CATCH_UP_PER_BATCH: u64 = 2 << 20;

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
    /// The announcers this member accepted before (shared by its successive receives, kept
    /// across restarts when persistent): their sessions and older ones are never started again.
    /// `None`: this receive starts with no memory (a one-off `cmover mctp receive`).
    pub announcers: Option<AnnouncerMemory>,
    /// Whose announcements to accept, asked again as the receive runs (the election's leader).
    /// `None`: any GL's.
    pub follow: Option<FollowLeader>,
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
            announcers: None,
            follow: None,
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
    announcers: Option<AnnouncerMemory>,
}

impl Drop for RxDriver {
    /// However the receive ends (an error, a stop, a timeout), an undelivered file goes.
    fn drop(&mut self) {
        if let Some(p) = self.part.take() {
            let _ = std::fs::remove_file(&p.path);
        }
    }
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
    let mut rx = Receiver::new(cfg, Keys::derive(&opts.secret), ChaCha8Rng::from_os_rng());
    if let Some(m) = &opts.announcers {
        rx.set_announcers(m.get());
    }
    let mut d = RxDriver {
        rx,
        dir: opts.dir.clone(),
        durable: opts.durable,
        not_held: Vec::new(),
        already_held: false,
        part: None,
        delivered: None,
        verifying: None,
        announcers: opts.announcers.clone(),
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
            // The part file, if any, goes with the driver.
            return Err(if stop.load(Ordering::Relaxed) {
                stopped()
            } else {
                MctpDriverError::Timeout(opts.timeout)
            });
        }
        if let Some(f) = &opts.follow {
            d.rx.set_announcer_filter((f.0)());
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
        while let Some(t) = d.rx.poll_transmit() {
            // A receiver only ever reports to its GL, by unicast.
            let (Dest::To(to) | Dest::Channel(to)) = t.dest else { continue };
            if let Err(e) = usock.send_to(&t.payload, &to.into()) {
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
        if self.rx.take_announcers_changed()
            && let Some(m) = &self.announcers
            && let Err(e) = m.store(self.rx.announcers())
        {
            // Kept in memory still; only a restart would forget the newest sessions.
            tracing::warn!("storing the accepted announcers: {e}");
        }
        while let Some(e) = self.rx.poll_event() {
            match e {
                RxEvent::Started { session, info, resumed, tree } => {
                    let path = part_path(&self.dir, &info);
                    match open_part(&path, info.size, resumed) {
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
                    if let Err(e) = std::fs::rename(&from, &to) {
                        let _ = std::fs::remove_file(&from);
                        return Err(io_err(format!(
                            "rename {} to {}",
                            from.display(),
                            to.display()
                        ))(e));
                    }
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

/// Opens the file a session is written into: the one a resumed session already filled, or a
/// new one of the announced size. A new file that cannot be given its size (no space) is
/// removed at once: a failed session leaves nothing behind.
fn open_part(path: &Path, size: u64, resumed: bool) -> io::Result<File> {
    if resumed && path.exists() {
        return std::fs::OpenOptions::new().write(true).read(true).open(path);
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    if let Err(e) = sys::preallocate(&file, size) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_that_cannot_be_sized_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".mctp-x.part");
        // Larger than any file can be: refused by every filesystem before anything is allocated.
        assert!(open_part(&path, u64::MAX, false).is_err());
        assert!(!path.exists(), "an empty .part was left behind");
        assert_eq!(open_part(&path, 4096, false).unwrap().metadata().unwrap().len(), 4096);
    }
}
