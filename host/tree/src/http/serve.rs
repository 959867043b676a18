//! The accept loop: every connection of a listener served by one handler, plain or over mutual
//! TLS (the handshake refuses a client without a certificate of the cluster CA; every request of
//! an accepted connection carries the role its certificate names, [`PeerRole`]).
//!
//! A client cannot hold the server by being slow or many ([`ServeLimits`]): request headers
//! must arrive within a timeout (hyper's `header_read_timeout`, running from the connection's
//! start), request bodies may not stall ([`read_json`](super::read_json)), and connections are
//! counted in total and per peer address. Past the soft limit, or past a peer's share, a new
//! connection is answered `503` and closed at once (over TLS it is just closed: no handshake is
//! spent on it); past the hard limit it is closed unanswered. So the process keeps file
//! descriptors for its own work, and operators and the manager still get through while a
//! slowloris holds what it may. An accept error (`EMFILE`) backs off instead of spinning.
//!
//! [`serve_until`] stops gracefully: when told to, it stops accepting, lets the requests in
//! flight finish (idle keep-alive connections are closed) for at most a grace period, and
//! returns whether every connection ended within it.

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{Body, PeerRole, Role};
use crate::tls::Tls;

/// How much one listener serves at once, and how long a client may dawdle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Time a client has to send a request's headers, from the connection's start.
    pub header_read_timeout: Duration,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections served at once; a new one past this is closed unanswered.
    pub max_connections: usize,
    /// Past this many connections, a new one is answered `503` and closed (shed before
    /// starving).
    pub shed_above: usize,
    /// Connections one peer address may hold at once; past it, `503` and close.
    pub max_per_peer: usize,
}

impl Default for ServeLimits {
    /// Sized for a process whose fd limit is raised at start (`cmover` does): 4,096
    /// connections leave a 1,024-fd process nothing, so keep that limit raised.
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
            shed_above: 3072,
            max_per_peer: 256,
        }
    }
}

/// Serves `handler` on every connection accepted from `listener`, until the task is aborted.
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_tls(listener, None, handler).await
}

/// [`serve`], over mutual TLS when `tls` is given: a connection without a client certificate
/// signed by the cluster CA ends in the handshake, before any request is read; every request
/// of an accepted connection carries the certificate's [`PeerRole`].
pub async fn serve_tls<F, Fut>(listener: TcpListener, tls: Option<Tls>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(listener, tls, ServeLimits::default(), handler).await
}

/// [`serve_tls`] with explicit [`ServeLimits`].
pub async fn serve_with<F, Fut>(
    listener: TcpListener,
    tls: Option<Tls>,
    limits: ServeLimits,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    // Nobody will ever send on this: the loop runs until its task is aborted.
    let (_never, stop) = watch::channel(false);
    serve_until(listener, tls, limits, stop, Duration::ZERO, handler).await;
}

/// [`serve_with`] until `stop` turns `true`: then the listener is closed (new connections are
/// refused by the kernel), requests in flight are answered and their connections closed.
/// Returns `true` when every connection ended within `grace`, `false` when some were still
/// open at its end (they are abandoned to the caller's exit). A dropped `stop` sender never
/// stops the loop.
pub async fn serve_until<F, Fut>(
    listener: TcpListener,
    tls: Option<Tls>,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    handler: F,
) -> bool
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor = tls.as_ref().map(Tls::acceptor);
    let connections = Connections::new(limits);
    let mut backoff = AcceptBackoff::default();
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(s) => {
                backoff.reset();
                s
            }
            Err(e) => {
                backoff.wait(&e).await;
                continue;
            }
        };
        let slot = match connections.admit(peer.ip()) {
            Admission::Serve(slot) => slot,
            Admission::Shed(why) => {
                tracing::debug!(%peer, "shedding a connection: {why}");
                if acceptor.is_none() {
                    answer_busy(&stream);
                }
                continue;
            }
            Admission::Refuse => continue,
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let Some(acceptor) = acceptor else {
                serve_connection(TokioIo::new(stream), None, limits, h, watcher).await;
                return;
            };
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream));
            let tls = match handshake.await {
                Ok(Ok(s)) => s,
                // A connection closed before any handshake (a port probe) is not worth a warning.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(%peer, "connection closed before the TLS handshake: {e}");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let role = cert.and_then(crate::tls::role_of).map(Role::from);
            // The certificate itself rides along too, for what a handler checks beyond the role.
            let cert = cert.map(|c| crate::tls::PeerCertificate(Arc::new(c.clone().into_owned())));
            let h = move |mut req: Request<Incoming>| {
                if let Some(c) = &cert {
                    req.extensions_mut().insert(c.clone());
                }
                h(req)
            };
            serve_connection(TokioIo::new(tls), Some(PeerRole(role)), limits, h, watcher).await;
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(open, "stopped accepting; finishing the requests in flight");
    }
    tokio::time::timeout(grace, graceful.shutdown()).await.is_ok()
}

/// Resolves once `stop` is `true`; never, if its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The whole answer to a shed connection: written without waiting (a fresh socket's send
/// buffer takes it), then the socket is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\ncontent-type: application/json\r\ncontent-length: 33\r\n\r\n{\"error\":\"too many connections\"}\n";

fn answer_busy(stream: &TcpStream) {
    let _ = stream.try_write(BUSY);
}

/// Accept errors: `EMFILE`/`ENFILE` and their kin last until connections close, so wait (10 ms,
/// doubling to 1 s) instead of spinning, and warn once per run of errors.
#[derive(Default)]
struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    fn reset(&mut self) {
        if self.failures > 0 {
            tracing::info!("accepting again after {} failed accepts", self.failures);
        }
        self.failures = 0;
    }

    async fn wait(&mut self, e: &std::io::Error) {
        if self.failures == 0 {
            tracing::warn!("accept: {e}; backing off");
        }
        self.failures = self.failures.saturating_add(1);
        let ms = 10u64 << self.failures.min(7).saturating_sub(1);
        tokio::time::sleep(Duration::from_millis(ms.min(1000))).await;
    }
}

/// Live connections of one listener, in total and per peer address.
#[derive(Clone)]
struct Connections {
    limits: ServeLimits,
    state: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

enum Admission {
    Serve(Slot),
    Shed(&'static str),
    Refuse,
}

/// One admitted connection; dropping it frees its place.
struct Slot {
    connections: Connections,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.connections.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

impl Connections {
    fn new(limits: ServeLimits) -> Self {
        Connections { limits, state: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Counts stay consistent under a panic elsewhere: every update is one statement.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn admit(&self, peer: IpAddr) -> Admission {
        let mut counts = self.lock();
        if counts.total >= self.limits.max_connections {
            return Admission::Refuse;
        }
        if counts.total >= self.limits.shed_above {
            return Admission::Shed("over the soft connection limit");
        }
        let mine = counts.per_peer.entry(peer).or_default();
        if *mine >= self.limits.max_per_peer {
            return Admission::Shed("over the per-peer connection limit");
        }
        *mine += 1;
        counts.total += 1;
        Admission::Serve(Slot { connections: self.clone(), peer })
    }
}

async fn serve_connection<I, F, Fut>(
    io: I,
    peer: Option<PeerRole>,
    limits: ServeLimits,
    h: F,
    watcher: Watcher,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let h = h.clone();
        if let Some(p) = peer {
            req.extensions_mut().insert(p);
        }
        async move { Ok::<_, std::convert::Infallible>(h(req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(io, svc);
    let served = watcher.watch(connection).await;
    if let Err(e) = served {
        tracing::debug!("connection: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_total_and_per_peer_and_freed_on_drop() {
        let limits = ServeLimits {
            max_connections: 4,
            shed_above: 3,
            max_per_peer: 2,
            ..ServeLimits::default()
        };
        let c = Connections::new(limits);
        let (a, b, d) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into(), [10, 0, 0, 3].into());
        let a1 = c.admit(a);
        let _a2 = c.admit(a);
        assert!(matches!(c.admit(a), Admission::Shed(_)), "a's share is 2");
        let _b1 = c.admit(b);
        assert!(matches!(c.admit(d), Admission::Shed(_)), "3 is the soft limit");
        drop(a1);
        let a3 = c.admit(a);
        assert!(matches!(a3, Admission::Serve(_)), "a's place was freed");
        assert_eq!(c.lock().total, 3);
        c.lock().total = 4;
        assert!(matches!(c.admit(d), Admission::Refuse), "4 is the hard limit");
    }

    #[test]
    fn the_busy_answer_is_one_whole_http_response() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        let len: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert_eq!(body.len(), len);
    }
}
