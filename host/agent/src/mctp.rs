//! Tokio driver for `cm-mctp` over real UDP multicast.
//!
//! The protocol lives in the sans-IO cores; this module only moves bytes: sockets with large
//! buffers, pacing by the core's timers, file reads for the sender (frames are read from disk by
//! offset, so a 4 GiB file is never in memory) and file writes for receivers (each frame is
//! written at its offset into a `.part` file that is renamed only after the BLAKE3 verifies).
//!
//! Sockets: the sender uses one socket for frames to the group and for reports. A receiver uses
//! a group socket (bound to the group address and port, joined on the chosen interface, shared
//! with `SO_REUSEPORT` so several receivers can run on one host) and a unicast socket on an
//! ephemeral port, from which it reports and on which the GL reaches it alone.

use cm_mctp::sender::SenderStats;
use cm_mctp::{
    Dest, Keys, Member, Receiver, ReceiverConfig, RxEvent, Sender, SenderConfig, SenderError, SenderEvent, SessionInfo, SessionReport, Time,
    Transmit,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// Socket buffer size we ask for (forced past `rmem_max` when running as root).
pub const SOCKET_BUFFER: usize = 32 << 20;

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

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MctpDriverError {
    let what = what.into();
    move |source| MctpDriverError::Io { what, source }
}

/// Sets a socket buffer, forcing past the sysctl cap when allowed (root), else best effort.
fn big_buffers(sock: &Socket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        // SAFETY: setsockopt on a valid fd with a pointer to a c_int and its exact size.
        let rc = unsafe {
            libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, force, (&val as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
        };
        if rc != 0 {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, plain, (&val as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t);
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
}

/// What a send produced.
#[derive(Debug, Clone)]
pub struct SendOutcome {
    pub report: SessionReport,
    pub stats: SenderStats,
    /// UDP payload bytes put on the wire (all datagrams, every destination).
    pub wire_bytes: u64,
    pub elapsed: Duration,
}

/// Sends `path` to the group and returns the GL's final report.
pub async fn send_file(path: &Path, opts: SendOptions) -> Result<SendOutcome, MctpDriverError> {
    let file = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let size = file.metadata().map_err(io_err(format!("stat {}", path.display())))?.len();
    let hash = hash_file(path).await?;
    let group = v4(opts.config.group)?;
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    big_buffers(&sock, SOCKET_BUFFER);
    sock.set_multicast_if_v4(&opts.interface).map_err(io_err("IP_MULTICAST_IF"))?;
    sock.set_multicast_ttl_v4(opts.ttl).map_err(io_err("IP_MULTICAST_TTL"))?;
    sock.set_multicast_loop_v4(true).map_err(io_err("IP_MULTICAST_LOOP"))?;
    sock.set_nonblocking(true).map_err(io_err("nonblocking"))?;
    let bind = SocketAddrV4::new(opts.interface, opts.config.report_port);
    sock.bind(&SocketAddr::V4(bind).into()).map_err(io_err(format!("bind {bind}")))?;
    let sock = UdpSocket::from_std(sock.into()).map_err(io_err("tokio socket"))?;
    let _ = group;

    let inline = if size <= u64::from(opts.config.frame_size) {
        Some(std::fs::read(path).map_err(io_err(format!("read {}", path.display())))?)
    } else {
        None
    };
    let start = Instant::now();
    let info = SessionInfo { assignment: opts.assignment, name: opts.name.clone(), size, hash };
    let keys = Keys::derive(&opts.secret);
    let rng = ChaCha8Rng::from_os_rng();
    let mut sender = Sender::new(Time::ZERO, opts.config, keys, rng, info, &opts.members, inline.as_deref())?;
    let mut buf = Vec::with_capacity(65_536);
    let mut rbuf = vec![0u8; 65_536];
    let mut wire_bytes = 0u64;
    loop {
        let now = to_time(start, Instant::now());
        sender.handle_timeout(now);
        while let Some(t) = sender.poll_transmit(now) {
            let (dest, bytes): (Dest, &[u8]) = match &t {
                Transmit::Control { dest, bytes } => (*dest, bytes),
                Transmit::Frame { dest, frame } => {
                    sender
                        .encode_frame(frame, &mut buf, |p| file.read_exact_at(p, frame.offset))
                        .map_err(io_err(format!("read {} at {}", path.display(), frame.offset)))?;
                    (*dest, &buf)
                }
            };
            match dest {
                Dest::Everyone => {
                    for to in sender.everyone() {
                        send_one(&sock, bytes, *to).await;
                        wire_bytes += bytes.len() as u64;
                    }
                }
                Dest::To(to) => {
                    send_one(&sock, bytes, to).await;
                    wire_bytes += bytes.len() as u64;
                }
            }
            // Drain reports between bursts so the socket never backs up.
            while let Ok((n, from)) = sock.try_recv_from(&mut rbuf) {
                sender.handle_datagram(now, from, &rbuf[..n]);
            }
        }
        while let Some(e) = sender.poll_event() {
            match e {
                SenderEvent::Joined(id) => tracing::info!(member = id, "member joined the session"),
                SenderEvent::Finished(report) => {
                    return Ok(SendOutcome { report, stats: sender.stats().clone(), wire_bytes, elapsed: start.elapsed() });
                }
            }
        }
        let wake = sender.poll_timeout().map_or_else(|| Instant::now() + Duration::from_secs(1), |t| from_time(start, t));
        tokio::select! {
            r = sock.recv_from(&mut rbuf) => {
                if let Ok((n, from)) = r {
                    let now = to_time(start, Instant::now());
                    sender.handle_datagram(now, from, &rbuf[..n]);
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// One datagram; a full socket buffer is waited out, other errors are logged and the datagram
/// counts as lost (the protocol repairs it).
async fn send_one(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, to).await {
        tracing::debug!(%to, error = %e, "send failed; the datagram counts as lost");
    }
}

async fn hash_file(path: &Path) -> Result<[u8; 32], MctpDriverError> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut h = blake3::Hasher::new();
        let f = File::open(&p).map_err(io_err(format!("open {}", p.display())))?;
        h.update_reader(io::BufReader::with_capacity(1 << 20, f)).map_err(io_err(format!("hash {}", p.display())))?;
        Ok(*h.finalize().as_bytes())
    })
    .await
    .map_err(|e| MctpDriverError::Io { what: "hash task".into(), source: io::Error::other(e) })?
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
}

/// What a receive produced.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: PathBuf,
    pub info: SessionInfo,
    pub stats: cm_mctp::ReceiverStats,
}

/// The file a session is being written into.
struct Part {
    session: u64,
    path: PathBuf,
    file: File,
    /// BLAKE3 of the file's contiguous prefix `..hashed`, fed as frames arrive in order, so the
    /// final verification only reads back what came out of order (nothing, on a clean pass).
    hasher: blake3::Hasher,
    hashed: u64,
}

impl Part {
    fn new(session: u64, path: PathBuf, file: File) -> Self {
        Part { session, path, file, hasher: blake3::Hasher::new(), hashed: 0 }
    }

    /// Finishes the hash: reads `hashed..size` back from the file.
    fn finish_hash(&mut self, size: u64) -> io::Result<[u8; 32]> {
        let mut buf = vec![0u8; 1 << 20];
        while self.hashed < size {
            let n = (size - self.hashed).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..n], self.hashed)?;
            self.hasher.update(&buf[..n]);
            self.hashed += n as u64;
        }
        Ok(*self.hasher.finalize().as_bytes())
    }
}

/// Receives one assignment into `opts.dir` and returns where it landed (after answering the
/// GL until it stops asking).
pub async fn receive(opts: ReceiveOptions) -> Result<Received, MctpDriverError> {
    let group = v4(opts.group)?;
    let gsock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    gsock.set_reuse_address(true).map_err(io_err("SO_REUSEADDR"))?;
    gsock.set_reuse_port(true).map_err(io_err("SO_REUSEPORT"))?;
    big_buffers(&gsock, SOCKET_BUFFER);
    gsock.bind(&SocketAddr::V4(group).into()).map_err(io_err(format!("bind {group}")))?;
    gsock.join_multicast_v4(group.ip(), &opts.interface).map_err(io_err(format!("join {} on {}", group.ip(), opts.interface)))?;
    gsock.set_nonblocking(true).map_err(io_err("nonblocking"))?;
    let gsock = UdpSocket::from_std(gsock.into()).map_err(io_err("tokio socket"))?;
    let usock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("socket"))?;
    big_buffers(&usock, 4 << 20);
    usock.bind(&SocketAddr::V4(SocketAddrV4::new(opts.interface, 0)).into()).map_err(io_err("bind unicast"))?;
    usock.set_nonblocking(true).map_err(io_err("nonblocking"))?;
    let usock = UdpSocket::from_std(usock.into()).map_err(io_err("tokio socket"))?;

    std::fs::create_dir_all(&opts.dir).map_err(io_err(format!("create {}", opts.dir.display())))?;
    let start = Instant::now();
    let mut cfg = ReceiverConfig::new(opts.member);
    cfg.session_timeout = opts.session_timeout;
    let mut rx = Receiver::new(cfg, Keys::derive(&opts.secret), ChaCha8Rng::from_os_rng());
    let mut loss = ChaCha8Rng::from_os_rng();
    let mut part: Option<Part> = None;
    let mut delivered: Option<(PathBuf, SessionInfo)> = None;
    let mut last_heard = Instant::now();
    let mut gbuf = vec![0u8; 65_536];
    let mut ubuf = vec![0u8; 65_536];
    loop {
        if let Some((path, info)) = &delivered
            && last_heard.elapsed() >= opts.linger
        {
            return Ok(Received { path: path.clone(), info: info.clone(), stats: rx.stats().clone() });
        }
        if delivered.is_none() && start.elapsed() >= opts.timeout {
            if let Some(p) = part.take() {
                let _ = std::fs::remove_file(&p.path);
            }
            return Err(MctpDriverError::Timeout(opts.timeout));
        }
        let wake = rx.poll_timeout().map_or_else(|| Instant::now() + Duration::from_millis(200), |t| from_time(start, t)).min(Instant::now() + Duration::from_millis(200));
        let got = tokio::select! {
            r = gsock.recv_from(&mut gbuf) => Some((r, true)),
            r = usock.recv_from(&mut ubuf) => Some((r, false)),
            _ = tokio::time::sleep_until(wake) => None,
        };
        let now = to_time(start, Instant::now());
        if let Some((r, from_group)) = got {
            let (n, from) = r.map_err(io_err("recv"))?;
            last_heard = Instant::now();
            if opts.inject_loss == 0.0 || !loss.random_bool(opts.inject_loss) {
                let buf = if from_group { &mut gbuf[..n] } else { &mut ubuf[..n] };
                let write = rx.handle_datagram(now, from, buf);
                handle_rx_events(&mut rx, now, &opts.dir, &mut part, &mut delivered).await?;
                if let Some(w) = write {
                    apply_write(&mut rx, &mut part, w.session, w.seq, w.offset, w.bytes);
                    handle_rx_events(&mut rx, now, &opts.dir, &mut part, &mut delivered).await?;
                }
            }
        }
        rx.handle_timeout(now);
        handle_rx_events(&mut rx, now, &opts.dir, &mut part, &mut delivered).await?;
        while let Some((to, bytes)) = rx.poll_transmit() {
            if let Err(e) = usock.send_to(&bytes, to).await {
                tracing::debug!(%to, error = %e, "report send failed");
            }
        }
    }
}

fn apply_write(rx: &mut Receiver, part: &mut Option<Part>, session: u64, seq: u32, offset: u64, bytes: &[u8]) {
    match part.as_mut().filter(|p| p.session == session) {
        Some(p) => match p.file.write_all_at(bytes, offset) {
            Ok(()) => {
                if offset == p.hashed {
                    p.hasher.update(bytes);
                    p.hashed += bytes.len() as u64;
                }
                rx.written(session, seq, bytes.len())
            }
            Err(e) => rx.storage_failed(session, format!("write {} at {offset}: {e}", p.path.display())),
        },
        None => rx.storage_failed(session, "no file open for the session".into()),
    }
}

fn part_path(dir: &Path, info: &SessionInfo) -> PathBuf {
    let hex: String = info.hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!(".mctp-{hex}.part"))
}

/// The delivered file's name: the last component of the announced name, or the assignment id.
fn final_path(dir: &Path, info: &SessionInfo) -> PathBuf {
    let name = Path::new(&info.name).file_name().and_then(|n| n.to_str()).filter(|n| !n.starts_with('.') && !n.is_empty());
    dir.join(name.map_or_else(|| format!("assignment-{}", info.assignment), str::to_owned))
}

async fn handle_rx_events(
    rx: &mut Receiver,
    now: Time,
    dir: &Path,
    part: &mut Option<Part>,
    delivered: &mut Option<(PathBuf, SessionInfo)>,
) -> Result<(), MctpDriverError> {
    while let Some(e) = rx.poll_event() {
        match e {
            RxEvent::Started { session, info, resumed } => {
                let path = part_path(dir, &info);
                let open = if resumed && path.exists() {
                    std::fs::OpenOptions::new().write(true).read(true).open(&path)
                } else {
                    std::fs::OpenOptions::new().write(true).read(true).create(true).truncate(true).open(&path).and_then(|f| f.set_len(info.size).map(|()| f))
                };
                match open {
                    // A resumed file's prefix hash is rebuilt from disk at verification.
                    Ok(file) => *part = Some(Part::new(session, path, file)),
                    Err(e) => rx.storage_failed(session, format!("create {}: {e}", path.display())),
                }
            }
            RxEvent::Verify { session, info } => {
                let ok = match part.as_mut().filter(|p| p.session == session) {
                    Some(p) => p.finish_hash(info.size).is_ok_and(|h| h == info.hash),
                    None => false,
                };
                rx.verified(now, session, ok);
            }
            RxEvent::Delivered { info, .. } => {
                let from = part_path(dir, &info);
                let to = final_path(dir, &info);
                if let Some(p) = part.take() {
                    p.file.sync_all().map_err(io_err(format!("sync {}", p.path.display())))?;
                }
                std::fs::rename(&from, &to).map_err(io_err(format!("rename {} to {}", from.display(), to.display())))?;
                tracing::info!(path = %to.display(), size = info.size, "assignment delivered");
                *delivered = Some((to, info));
            }
            RxEvent::AlreadyHeld { info, .. } => {
                tracing::info!(name = %info.name, "already hold this assignment; answered complete");
            }
            RxEvent::Abandoned { info, reason, .. } => {
                tracing::warn!(name = %info.name, %reason, "session abandoned");
                if let Some(p) = part.take() {
                    let _ = std::fs::remove_file(&p.path);
                }
            }
        }
    }
    Ok(())
}
