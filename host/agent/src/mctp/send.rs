//! The sending half: `send_file` reads frames from disk by offset and puts the core's datagrams
//! on the wire, equal frames to one place as one GSO message and many messages per `sendmmsg`,
//! paced by the core's timers.

use super::hash::hash_frames;
use super::{
    BATCH, MAX_WAIT, MctpDriverError, SOCKET_BUFFER, big_buffers, from_time, hash_file, io_err,
    on_thread, stopped, sys, to_time, v4,
};
use cm_mctp::Instant as Time;
use cm_mctp::sender::SenderStats;
use cm_mctp::{
    Dest, Keys, Member, Origin, Output, Sender, SenderConfig, SenderEvent, SessionInfo,
    SessionReport, Transmit,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// The origin of the next session this process starts as announcer `node`, in `incarnation`
/// (`None`: this process's start time in µs, for senders without an election): the sequence
/// grows with every call, for the whole process, so each session is newer than the last
/// one of the same node and incarnation even when a node leads, steps down and leads again.
pub fn next_origin(node: u64, incarnation: Option<u64>) -> Origin {
    static STARTED: OnceLock<u64> = OnceLock::new();
    static SESSIONS: AtomicU64 = AtomicU64::new(0);
    let incarnation = incarnation.unwrap_or_else(|| {
        *STARTED.get_or_init(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        })
    });
    Origin { node, incarnation, sequence: SESSIONS.fetch_add(1, Ordering::Relaxed) + 1 }
}

/// Sends `path` to the group and returns the GL's final report. A configuration whose origin
/// is unset (incarnation 0) gets [`next_origin`] for its node.
pub async fn send_file(path: &Path, mut opts: SendOptions) -> Result<SendOutcome, MctpDriverError> {
    if opts.config.origin.incarnation == 0 {
        opts.config.origin = next_origin(opts.config.origin.node, None);
    }
    let path = path.to_owned();
    on_thread(move |stop| send_blocking(&path, opts, stop)).await
}

fn send_blocking(
    path: &Path,
    mut opts: SendOptions,
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
    opts.config.report_port = bind_report_port(&sock, opts.interface, opts.config.report_port)?;
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
                let segment = (pieces.len() > 1).then_some(bytes.len() as u16);
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

/// Binds the session's report socket to the configured port, or to an ephemeral one when that
/// port is taken — by a session of this GL that is still ending, or one running beside it (two
/// runs delivered at once). Members answer the port the announcement names, so either works;
/// a fixed port only makes firewall rules simpler. Returns the port bound.
fn bind_report_port(sock: &Socket, interface: Ipv4Addr, port: u16) -> Result<u16, MctpDriverError> {
    let at = |port| SocketAddr::V4(SocketAddrV4::new(interface, port));
    match sock.bind(&at(port).into()) {
        Ok(()) => Ok(port),
        Err(e) if port != 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
            sock.bind(&at(0).into()).map_err(io_err(format!("bind {interface}:0")))?;
            let local = sock.local_addr().map_err(io_err("report socket address"))?;
            let bound = local.as_socket().map_or(0, |a| a.port());
            tracing::info!(
                configured = port,
                bound,
                "report port in use by another session: using an ephemeral one"
            );
            Ok(bound)
        }
        Err(e) => Err(io_err(format!("bind {}", at(port)))(e)),
    }
}
