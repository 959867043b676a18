//! Tokio driver for `cm-election` over real UDP multicast.
//!
//! One task per node owns the socket and the state machine: it feeds received datagrams and
//! timer expiries in, sends what the machine emits, republishes the status on a `watch`
//! channel and the events on a `broadcast` channel. Protocol decisions all live in the core.
//!
//! The socket is bound to the control channel's group address (so it only sees that group),
//! joins the group on the configured interface, and sets `IP_MULTICAST_IF` (where we send),
//! the TTL (1 keeps the traffic on the segment) and `IP_MULTICAST_LOOP` (needed when several
//! nodes share a host, e.g. on loopback: each node then drops its own datagrams by id).
//!
//! With a [`StateFile`] ([`spawn_persistent`]) the node survives restarts: the task stores the
//! core's restart state (incarnation, control channel, replay windows; `cm_election::restart`)
//! before it sends what an input produced, and the next run resumes from it.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cm_election::{
    Config, Dest, Election, Event, Instant, Member, NodeId, PriorityInputs, RequestError,
    RestartState, RestartStateError, Save, State, Stats,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How the driver uses the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverConfig {
    /// The interface for sending and for the group membership (`IP_MULTICAST_IF`).
    pub interface: Ipv4Addr,
    /// Multicast TTL; 1 keeps the election on the LAN segment.
    pub ttl: u32,
    /// `IP_MULTICAST_LOOP`: deliver our datagrams to other sockets on this host.
    pub loopback: bool,
}

impl DriverConfig {
    /// Several nodes on one host over loopback.
    pub fn loopback() -> Self {
        DriverConfig { interface: Ipv4Addr::LOCALHOST, ttl: 1, loopback: true }
    }
}

/// Why the driver could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("control channel {0} is not an IPv4 multicast address (IPv6 is not supported yet)")]
    NotIpv4Multicast(SocketAddr),
    #[error("cannot open control channel {channel} on interface {interface}: {source}")]
    Socket { channel: SocketAddr, interface: Ipv4Addr, source: io::Error },
    #[error("bad election configuration: {0}")]
    Config(#[from] cm_election::ConfigError),
    #[error("election request refused: {0}")]
    Request(#[from] RequestError),
    #[error("the election task has stopped")]
    Stopped,
    #[error("cannot read the election state file {path}: {source}")]
    StateRead { path: PathBuf, source: io::Error },
    #[error(
        "the election state file {path} is unusable ({reason}); it holds this node's incarnation and control channel — remove it only if this node's identity or cluster changed"
    )]
    StateCorrupt { path: PathBuf, reason: RestartStateError },
    #[error("cannot store the election state in {path}: {source}")]
    StateWrite { path: PathBuf, source: io::Error },
}

/// A snapshot of one node's election, republished after every input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionStatus {
    pub node: NodeId,
    /// This run's incarnation (above every earlier run's): a GL's MCTP sessions carry it, so
    /// members tell its sessions from a replay of an earlier run's.
    pub incarnation: u64,
    pub state: State,
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    /// Leader side: the registered members. Empty on members.
    pub members: Vec<Member>,
    pub registered_with: Option<NodeId>,
    pub control_channel: SocketAddr,
    pub data_channels: BTreeMap<String, SocketAddr>,
    pub stats: Stats,
    /// Datagrams the socket failed to send (counted, the protocol copes with loss).
    pub send_errors: u64,
    /// The current leader's latest heartbeat payload (see
    /// [`ElectionHandle::set_heartbeat_payload`]): on the leader its own, on a member what its
    /// leader's last Leader Alive carried; `None` while no leader is known.
    pub leader_payload: Option<Vec<u8>>,
    /// Restart states the task failed to store (logged; the node keeps running, but a restart
    /// would resume from an older state).
    pub save_errors: u64,
}

impl ElectionStatus {
    fn of(e: &Election, send_errors: u64, save_errors: u64) -> Self {
        ElectionStatus {
            node: e.node(),
            incarnation: e.config().incarnation,
            state: e.state(),
            leader: e.leader(),
            is_leader: e.is_leader(),
            members: e.members().cloned().collect(),
            registered_with: e.registered_with(),
            control_channel: e.control_channel(),
            data_channels: e.data_channels().clone(),
            stats: e.stats(),
            send_errors,
            leader_payload: e.leader_payload().map(<[u8]>::to_vec),
            save_errors,
        }
    }
}

enum Request {
    MoveControlChannel(SocketAddr, oneshot::Sender<Result<(), RequestError>>),
    SetDataChannel(String, SocketAddr, oneshot::Sender<Result<(), RequestError>>),
    SetHeartbeatPayload(Vec<u8>, oneshot::Sender<Result<(), RequestError>>),
    Leave(oneshot::Sender<()>),
}

/// The running election of one node.
#[derive(Debug)]
pub struct ElectionHandle {
    status: watch::Receiver<ElectionStatus>,
    events: broadcast::Sender<Event>,
    requests: mpsc::Sender<Request>,
    task: JoinHandle<Result<(), DriverError>>,
}

impl ElectionHandle {
    /// The latest status.
    pub fn status(&self) -> ElectionStatus {
        self.status.borrow().clone()
    }
    /// A receiver that wakes on every status change.
    pub fn watch_status(&self) -> watch::Receiver<ElectionStatus> {
        self.status.clone()
    }
    /// Every event from now on (leader changes, member joins and leaves, channel moves, …).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, DriverError> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(make(tx)).await.map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// Leader only: moves the segment to another control channel.
    pub async fn move_control_channel(&self, channel: SocketAddr) -> Result<(), DriverError> {
        Ok(self.request(|tx| Request::MoveControlChannel(channel, tx)).await??)
    }
    /// Leader only: sets a content group's data channel.
    pub async fn set_data_channel(
        &self,
        group: String,
        channel: SocketAddr,
    ) -> Result<(), DriverError> {
        Ok(self.request(|tx| Request::SetDataChannel(group, channel, tx)).await??)
    }
    /// The opaque payload (≤ 1024 bytes) every Leader Alive carries from now on. May be set
    /// before this node leads: it goes out once it does. Members see the leader's latest payload
    /// in [`ElectionStatus::leader_payload`] and get [`Event::LeaderPayload`] when it changes.
    /// There is one payload per leader: duties that share it encode their parts together.
    ///
    /// How a group leader tells its members where its HTTP endpoint is:
    ///
    /// ```no_run
    /// # async fn example(handle: cm_agent::election::ElectionHandle) -> Result<(), cm_agent::election::DriverError> {
    /// // Every node sets it; only the leader's heartbeats carry it.
    /// handle.set_heartbeat_payload(b"http://10.0.0.7:7720".to_vec()).await?;
    ///
    /// // Any node: wait until a leader is known and read its address.
    /// let mut status = handle.watch_status();
    /// let status = status.wait_for(|s| s.leader_payload.as_ref().is_some_and(|p| !p.is_empty())).await
    ///     .map_err(|_| cm_agent::election::DriverError::Stopped)?;
    /// let leader_http = String::from_utf8_lossy(status.leader_payload.as_deref().unwrap_or_default());
    /// println!("leader {:?} serves at {leader_http}", status.leader);
    /// # Ok(()) }
    /// ```
    pub async fn set_heartbeat_payload(&self, payload: Vec<u8>) -> Result<(), DriverError> {
        Ok(self.request(|tx| Request::SetHeartbeatPayload(payload, tx)).await??)
    }
    /// Leaves gracefully (a leader resigns) and stops the task.
    pub async fn leave(self) -> Result<(), DriverError> {
        let _ = self.request(Request::Leave).await;
        self.task.await.map_err(|_| DriverError::Stopped)?
    }
    /// Stops at once without a word, like a crash.
    pub fn abort(&self) {
        self.task.abort();
    }
    /// Whether the task has ended (an error, `leave` or `abort`).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

fn ipv4_group(channel: SocketAddr) -> Result<SocketAddrV4, DriverError> {
    match channel {
        SocketAddr::V4(v4) if v4.ip().is_multicast() => Ok(v4),
        other => Err(DriverError::NotIpv4Multicast(other)),
    }
}

/// Opens a socket that receives `channel`'s group and sends with the driver's settings.
pub fn multicast_socket(
    channel: SocketAddr,
    driver: &DriverConfig,
) -> Result<UdpSocket, DriverError> {
    let group = ipv4_group(channel)?;
    let wrap = |source| DriverError::Socket { channel, interface: driver.interface, source };
    let open = || -> io::Result<UdpSocket> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // Several nodes (and tests) on one host share the port.
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        // Bound to the group address, the socket receives only this group's datagrams.
        s.bind(&SocketAddr::V4(group).into())?;
        s.join_multicast_v4(group.ip(), &driver.interface)?;
        s.set_multicast_if_v4(&driver.interface)?;
        s.set_multicast_ttl_v4(driver.ttl)?;
        s.set_multicast_loop_v4(driver.loopback)?;
        UdpSocket::from_std(s.into())
    };
    open().map_err(wrap)
}

/// Where one node keeps its election restart state (`cm_election::restart`): two slot files,
/// `<path>.0` and `<path>.1`, each `generation u64 · length u32 · state` (trailing bytes
/// ignored). A save overwrites the older slot in place with the next generation; loading takes
/// the valid slot with the higher generation. So a save torn by a crash only spoils the slot
/// it was writing, and no save pays for creating and renaming a file (on ext4 that costs
/// ~2 ms; a node saves after every datagram it accepts). Saves that change the incarnation or
/// the control channel are fsynced before anything is sent; saves that only advance replay
/// windows are plain writes, which survive a crash of the process but may lose their last
/// seconds to a crash of the OS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    path: PathBuf,
}

/// The two slots of a [`StateFile`], open for writing.
#[derive(Debug)]
struct StateSlots {
    files: [std::fs::File; 2],
    paths: [PathBuf; 2],
    /// Generation of the newest save; the next one goes to slot `(generation + 1) % 2`.
    generation: u64,
}

const SLOT_HEADER: usize = 12;

impl StateFile {
    /// `election.state.0` and `.1` in the node's data directory (created if missing).
    pub fn in_dir(data_dir: &Path) -> Self {
        StateFile { path: data_dir.join("election.state") }
    }
    /// Slots `<path>.0` and `<path>.1`.
    pub fn at(path: PathBuf) -> Self {
        StateFile { path }
    }
    /// The two slot files.
    pub fn slot_paths(&self) -> [PathBuf; 2] {
        [0, 1].map(|i| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        })
    }

    /// The saved state, `None` when this node has never run here. A torn slot is skipped
    /// when the other one is valid; when no slot is valid the start stops with an error
    /// naming the file.
    pub fn load(&self) -> Result<Option<RestartState>, DriverError> {
        Ok(self.load_slots()?.map(|(_, state)| state))
    }

    /// The newest valid slot's generation and state.
    fn load_slots(&self) -> Result<Option<(u64, RestartState)>, DriverError> {
        let mut newest: Option<(u64, RestartState)> = None;
        let mut first_error = None;
        for path in self.slot_paths() {
            let bytes = match std::fs::read(&path) {
                // Created but never written (a start stopped before its first save): absent.
                Ok(b) if b.is_empty() => continue,
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(DriverError::StateRead { path, source }),
            };
            match decode_slot(&bytes) {
                Ok((generation, state)) => {
                    if newest.as_ref().is_none_or(|(g, _)| generation > *g) {
                        newest = Some((generation, state));
                    }
                }
                Err(reason) => {
                    first_error.get_or_insert(DriverError::StateCorrupt { path, reason });
                }
            }
        }
        match (newest, first_error) {
            (Some(n), _) => Ok(Some(n)),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(None),
        }
    }

    /// Replaces the stored state with `save` (durably when `save.sync`).
    pub fn store(&self, save: &Save) -> Result<(), DriverError> {
        let generation = self.load_slots().ok().flatten().map_or(0, |(g, _)| g);
        self.open(generation)?.store(save)
    }

    fn open(&self, generation: u64) -> Result<StateSlots, DriverError> {
        let paths = self.slot_paths();
        let [a, b] = &paths;
        let wrap = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DriverError::StateWrite { path, source }
        };
        let dir =
            self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(wrap(dir))?;
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(p)
                .map_err(wrap(p))
        };
        let files = [open(a)?, open(b)?];
        // The slot files' directory entries must survive before the first durable save counts.
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(wrap(dir))?;
        Ok(StateSlots { files, paths, generation })
    }
}

fn decode_slot(bytes: &[u8]) -> Result<(u64, RestartState), RestartStateError> {
    // The slot is overwritten in place, so bytes past the body are an older, longer save's.
    let mut r = cm_wire::Reader::new(bytes);
    let mut header = || Ok::<_, cm_wire::DecodeError>((r.u64()?, r.u32()?));
    let (generation, len) = header().map_err(|_| RestartStateError::BadCheck)?;
    let len = usize::try_from(len).map_err(|_| RestartStateError::BadCheck)?;
    let body = r.bytes(len).map_err(|_| RestartStateError::BadCheck)?;
    Ok((generation, RestartState::decode(body)?))
}

impl StateSlots {
    fn store(&mut self, save: &Save) -> Result<(), DriverError> {
        use std::os::unix::fs::FileExt;
        let state = save.state.encode();
        let generation = self.generation + 1;
        let mut slot = Vec::with_capacity(SLOT_HEADER + state.len());
        slot.extend_from_slice(&generation.to_be_bytes());
        slot.extend_from_slice(&u32::try_from(state.len()).unwrap_or(u32::MAX).to_be_bytes());
        slot.extend_from_slice(&state);
        let i = (generation % 2) as usize;
        let file = &self.files[i];
        let result = file
            .write_all_at(&slot, 0)
            .and_then(|()| if save.sync { file.sync_data() } else { Ok(()) });
        result.map_err(|source| DriverError::StateWrite { path: self.paths[i].clone(), source })?;
        self.generation = generation;
        Ok(())
    }
}

/// Starts the election of one node on a tokio task, with no memory of earlier runs (tests,
/// benches). The config's control channel must be an IPv4 multicast address. `rng_seed` seeds
/// the protocol's random delays. A server agent uses [`spawn_persistent`].
pub fn spawn(
    config: Config,
    driver: DriverConfig,
    rng_seed: u64,
) -> Result<ElectionHandle, DriverError> {
    let election = Election::new(config, Instant::ZERO, rng_seed)?;
    start(election, driver, None)
}

/// Starts the election of one node that remembers its earlier runs in `state`: it resumes from
/// the saved state (the control channel the segment moved to, the replay windows) with an
/// incarnation above every earlier one — the larger of `config.incarnation`, the wall clock in
/// µs and the saved incarnation + 1 — stored durably before the first datagram is sent.
///
/// ```no_run
/// # fn example(cfg: cm_election::Config, data_dir: &std::path::Path) -> Result<(), cm_agent::election::DriverError> {
/// use cm_agent::election::{self, DriverConfig, StateFile};
/// let handle = election::spawn_persistent(cfg, DriverConfig::loopback(), rand::random(), StateFile::in_dir(data_dir))?;
/// # Ok(()) }
/// ```
pub fn spawn_persistent(
    mut config: Config,
    driver: DriverConfig,
    rng_seed: u64,
    state: StateFile,
) -> Result<ElectionHandle, DriverError> {
    let loaded = state.load_slots()?;
    let generation = loaded.as_ref().map_or(0, |(g, _)| *g);
    let saved = loaded.map(|(_, s)| s);
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    config.incarnation =
        cm_election::next_incarnation(saved.as_ref(), clock.max(config.incarnation));
    let mut election = Election::resume(config, Instant::ZERO, rng_seed, saved.as_ref())?;
    let mut slots = state.open(generation)?;
    // The new incarnation is on disk before any datagram carries it.
    if let Some(save) = election.poll_save() {
        slots.store(&save)?;
    }
    start(election, driver, Some(slots))
}

fn start(
    election: Election,
    driver: DriverConfig,
    state: Option<StateSlots>,
) -> Result<ElectionHandle, DriverError> {
    let origin = tokio::time::Instant::now();
    let socket = multicast_socket(election.control_channel(), &driver)?;
    let (status_tx, status) = watch::channel(ElectionStatus::of(&election, 0, 0));
    let (events, _) = broadcast::channel(1024);
    let (requests, rx) = mpsc::channel(16);
    let task =
        tokio::spawn(run(election, socket, driver, state, origin, status_tx, events.clone(), rx));
    Ok(ElectionHandle { status, events, requests, task })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mut election: Election,
    mut socket: UdpSocket,
    driver: DriverConfig,
    mut state: Option<StateSlots>,
    origin: tokio::time::Instant,
    status: watch::Sender<ElectionStatus>,
    events: broadcast::Sender<Event>,
    mut requests: mpsc::Receiver<Request>,
) -> Result<(), DriverError> {
    let now = || Instant::from_origin(origin.elapsed());
    let mut buf = vec![0u8; 65_536];
    let mut send_errors = 0u64;
    let mut save_errors = 0u64;
    let mut leaving: Option<oneshot::Sender<()>> = None;
    loop {
        // Stored before this input's datagrams go out and its events are passed on, so what
        // the node acted on is never accepted again after a restart. A small blocking write
        // (an fsync only on the rare channel moves).
        if let Some(state) = state.as_mut()
            && let Some(save) = election.poll_save()
            && let Err(e) = state.store(&save)
        {
            save_errors += 1;
            tracing::error!(node = election.node(), error = %e, "cannot store the election state");
        }
        while let Some(t) = election.poll_transmit() {
            let to = match t.dest {
                Dest::Group => election.control_channel(),
                Dest::Channel(a) | Dest::To(a) => a,
            };
            if let Err(e) = socket.send_to(&t.payload, to).await {
                send_errors += 1;
                tracing::debug!(node = election.node(), %to, error = %e, "election send failed");
            }
        }
        while let Some(ev) = election.poll_event() {
            if let Event::ChannelMove { channel } = ev {
                // Join the new channel before leaving the old one; if that fails, stay.
                match multicast_socket(channel, &driver) {
                    Ok(s) => socket = s,
                    Err(e) => {
                        tracing::error!(node = election.node(), error = %e, "cannot follow control channel move")
                    }
                }
            }
            let _ = events.send(ev);
        }
        status.send_if_modified(|s| {
            let fresh = ElectionStatus::of(&election, send_errors, save_errors);
            let changed = *s != fresh;
            if changed {
                *s = fresh;
            }
            changed
        });
        if let Some(done) = leaving.take() {
            let _ = done.send(());
            return Ok(());
        }
        let deadline = election.poll_timeout().map(|t| origin + t.since_origin());
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    feed(&mut election, now(), from, &buf[..n]);
                    // Take in what else has arrived before saving and sending once for all of
                    // it: under load (a big segment starting) one save covers many datagrams.
                    for _ in 0..MAX_BATCH {
                        let Ok((n, from)) = socket.try_recv_from(&mut buf) else { break };
                        feed(&mut election, now(), from, &buf[..n]);
                    }
                }
                Err(e) => tracing::debug!(node = election.node(), error = %e, "election receive failed"),
            },
            () = sleep_until(deadline) => election.handle_timeout(now()),
            req = requests.recv() => match req {
                Some(Request::MoveControlChannel(ch, tx)) => { let _ = tx.send(election.move_control_channel(now(), ch)); }
                Some(Request::SetDataChannel(g, ch, tx)) => { let _ = tx.send(election.set_data_channel(now(), g, ch)); }
                Some(Request::SetHeartbeatPayload(p, tx)) => { let _ = tx.send(election.set_heartbeat_payload(p)); }
                Some(Request::Leave(tx)) => { election.leave(now()); leaving = Some(tx); }
                // Every handle is gone: nobody can see this node's status any more.
                None => { election.leave(now()); leaving = Some(oneshot::channel().0); }
            },
        }
    }
}

/// Most queued datagrams taken in before the loop saves, sends and runs timers again.
const MAX_BATCH: usize = 64;

fn feed(election: &mut Election, now: Instant, from: SocketAddr, datagram: &[u8]) {
    if let Err(reason) = election.handle_datagram(now, from, datagram) {
        tracing::trace!(node = election.node(), %from, %reason, "dropped election datagram");
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Measures this server's priority inputs (Linux `/proc` and `statvfs` of `data_dir`); what
/// cannot be measured stays 0. Failures, content lag and the operator weight come from the
/// agent's configuration and state, not from here.
pub fn measure_priority_inputs(data_dir: &Path) -> PriorityInputs {
    let cpu_cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |mhz| mhz as u32);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let free_memory_mib = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    let uptime_secs = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .map_or(0, |s| s as u64);
    PriorityInputs {
        cpu_cores,
        cpu_mhz,
        free_memory_mib,
        free_disk_mib: free_disk_mib(data_dir),
        uptime_secs,
        ..Default::default()
    }
}

#[cfg(unix)]
fn free_disk_mib(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return 0 };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) / (1024 * 1024)
}

#[cfg(not(unix))]
fn free_disk_mib(_dir: &Path) -> u64 {
    0
}
