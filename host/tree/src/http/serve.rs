//! The accept loop: every connection of a listener served by one handler, plain or over mutual
//! TLS (the handshake refuses a client without a certificate of the cluster CA; every request of
//! an accepted connection carries the role its certificate names, [`PeerRole`]).

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

use super::{Body, PeerRole, Role};
use crate::tls::Tls;

/// Serves `handler` on every connection accepted from `listener`, until the task is aborted.
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_tls(listener, None, handler).await
}

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`serve`], over mutual TLS when `tls` is given: a connection without a client certificate
/// signed by the cluster CA ends in the handshake, before any request is read; every request
/// of an accepted connection carries the certificate's [`PeerRole`].
pub async fn serve_tls<F, Fut>(listener: TcpListener, tls: Option<Tls>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor = tls.as_ref().map(Tls::acceptor);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                serve_connection(TokioIo::new(stream), None, h).await;
                return;
            };
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
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
                    tracing::warn!(%peer, "TLS handshake timed out");
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
            serve_connection(TokioIo::new(tls), Some(PeerRole(role)), h).await;
        });
    }
}

async fn serve_connection<I, F, Fut>(io: I, peer: Option<PeerRole>, h: F)
where
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
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
        tracing::debug!("connection: {e}");
    }
}
