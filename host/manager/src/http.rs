//! HTTP plumbing shared by the manager and group leaders: a hyper/1 accept loop (plain, or mutual
//! TLS: [`crate::tls`]), JSON bodies with a size limit, roles from bearer tokens compared in
//! constant time or from the verified client certificate, and a small JSON client.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, ResponseFuture, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Serialize, de::DeserializeOwned};
use std::future::Future;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::tls::{CertRole, Tls};

/// Every response body: in-memory JSON or a streamed assignment.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// Largest JSON request body accepted (a manifest of a 4 GiB assignment in 1 MiB chunks is ~300 KiB).
pub const MAX_JSON_BODY: usize = 8 << 20;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    match serde_json::to_vec(v) {
        Ok(b) => {
            let mut r = Response::new(full(b));
            *r.status_mut() = status;
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("encoding response: {e}")),
    }
}

/// An error response: `{"error": "..."}`.
pub fn error(status: StatusCode, msg: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": msg }).to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Reads a JSON request body of at most [`MAX_JSON_BODY`] bytes.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let body = Limited::new(req.into_body(), MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("reading body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")))
}

/// Who a request is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Operator,
    Agent,
    /// The manager calling a group leader (with tokens it uses the agent token: `Agent`).
    Manager,
}

impl From<CertRole> for Role {
    fn from(r: CertRole) -> Role {
        match r {
            CertRole::Operator => Role::Operator,
            CertRole::Agent => Role::Agent,
            CertRole::Manager => Role::Manager,
        }
    }
}

/// Set on every request that arrived over mutual TLS: the role its verified client certificate
/// names (`None`: it names none). On such a request the certificate alone decides.
#[derive(Debug, Clone, Copy)]
pub struct PeerRole(pub Option<Role>);

/// The bearer tokens. Only their BLAKE3 hashes are kept; `blake3::Hash` equality is constant
/// time, so comparing a presented token leaks nothing about the right one through timing.
#[derive(Clone)]
pub struct Tokens {
    operator: blake3::Hash,
    agent: blake3::Hash,
}

impl Tokens {
    pub fn new(operator: &str, agent: &str) -> Tokens {
        Tokens {
            operator: blake3::hash(operator.as_bytes()),
            agent: blake3::hash(agent.as_bytes()),
        }
    }

    /// The role a request has: over mutual TLS the one its client certificate names (tokens
    /// are not consulted), else the one its `Authorization: Bearer` token grants, if any.
    pub fn role<B>(&self, req: &Request<B>) -> Option<Role> {
        if let Some(PeerRole(role)) = req.extensions().get::<PeerRole>() {
            return *role;
        }
        let presented = bearer(req)?;
        let h = blake3::hash(presented.as_bytes());
        // Both comparisons always run, so timing does not tell which role was close.
        let (op, ag) = (h == self.operator, h == self.agent);
        if op {
            Some(Role::Operator)
        } else if ag {
            Some(Role::Agent)
        } else {
            None
        }
    }
}

fn bearer<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

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
            let role = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(crate::tls::role_of)
                .map(Role::from);
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

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{method} {url}: {source}")]
    Transport { method: Method, url: String, source: hyper_util::client::legacy::Error },
    #[error("{method} {url}: timed out after {after:?}")]
    Timeout { method: Method, url: String, after: Duration },
    #[error("{method} {url}: HTTP {status}: {body}")]
    Status { method: Method, url: String, status: StatusCode, body: String },
    #[error("{method} {url}: reading response: {source}")]
    Body { method: Method, url: String, source: hyper::Error },
    #[error("{method} {url}: response is not the expected JSON: {source}")]
    Decode { method: Method, url: String, source: serde_json::Error },
    #[error("bad request to {url}: {what}")]
    Request { url: String, what: String },
}

/// Plain HTTP, or HTTPS only (with a client certificate).
#[derive(Clone)]
enum Transport {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

impl Transport {
    fn request(&self, req: Request<Full<Bytes>>) -> ResponseFuture {
        match self {
            Transport::Plain(c) => c.request(req),
            Transport::Tls(c) => c.request(req),
        }
    }
}

/// A JSON-over-HTTP client with a bearer token and a per-request timeout.
#[derive(Clone)]
pub struct JsonClient {
    inner: Transport,
    token: String,
    timeout: Duration,
}

impl JsonClient {
    /// A plain-HTTP client presenting `token` (empty: none).
    pub fn new(token: &str, timeout: Duration) -> JsonClient {
        JsonClient::with_tls(token, timeout, None)
    }

    /// With `tls`, an HTTPS-only client that presents the node's certificate and trusts only
    /// servers certified by the cluster CA for the URL's host; without, plain HTTP.
    pub fn with_tls(token: &str, timeout: Duration, tls: Option<&Tls>) -> JsonClient {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(timeout));
        let inner = match tls {
            None => Transport::Plain(Client::builder(TokioExecutor::new()).build(conn)),
            Some(t) => {
                conn.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((*t.client_config()).clone())
                    .https_only()
                    .enable_http1()
                    .wrap_connector(conn);
                Transport::Tls(Client::builder(TokioExecutor::new()).build(https))
            }
        };
        JsonClient { inner, token: token.to_string(), timeout }
    }

    /// `https` for a TLS client, else `http`.
    pub fn scheme(&self) -> &'static str {
        match self.inner {
            Transport::Plain(_) => "http",
            Transport::Tls(_) => "https",
        }
    }

    /// The base URL of a node at `host:port`, in this client's scheme.
    pub fn base_url(&self, address: &str) -> String {
        format!("{}://{address}", self.scheme())
    }

    /// Sends a request; `extra` adds headers (e.g. `Range`). Returns the response once its head
    /// arrived and its status is a success; the body is left to the caller.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        extra: &[(&'static str, String)],
    ) -> Result<Response<Incoming>, ClientError> {
        let mut b = Request::builder().method(method.clone()).uri(url);
        if !self.token.is_empty() {
            b = b.header(AUTHORIZATION, format!("Bearer {}", self.token));
        }
        if body.is_some() {
            b = b.header(CONTENT_TYPE, "application/json");
        }
        for (k, v) in extra {
            b = b.header(*k, v);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Request { url: url.into(), what: e.to_string() })?;
        let resp = tokio::time::timeout(self.timeout, self.inner.request(req))
            .await
            .map_err(|_| ClientError::Timeout {
                method: method.clone(),
                url: url.into(),
                after: self.timeout,
            })?
            .map_err(|source| ClientError::Transport {
                method: method.clone(),
                url: url.into(),
                source,
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = match tokio::time::timeout(self.timeout, resp.into_body().collect()).await {
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                _ => String::new(),
            };
            return Err(ClientError::Status { method, url: url.into(), status, body });
        }
        Ok(resp)
    }

    /// A JSON request and a JSON answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<&Req>,
    ) -> Result<Resp, ClientError> {
        let body = body.map(serde_json::to_vec).transpose().map_err(|source| {
            ClientError::Decode { method: method.clone(), url: url.into(), source }
        })?;
        let resp = self.send(method.clone(), url, body, &[]).await?;
        let bytes = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| ClientError::Timeout {
                method: method.clone(),
                url: url.into(),
                after: self.timeout,
            })?
            .map_err(|source| ClientError::Body {
                method: method.clone(),
                url: url.into(),
                source,
            })?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            url: url.into(),
            source,
        })
    }

    pub async fn get<Resp: DeserializeOwned>(&self, url: &str) -> Result<Resp, ClientError> {
        self.call::<(), Resp>(Method::GET, url, None).await
    }

    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        url: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        self.call(Method::POST, url, Some(body)).await
    }

    pub async fn put<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        url: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        self.call(Method::PUT, url, Some(body)).await
    }
}

/// `bytes=N-` → N. Only open-ended ranges are used (resume); anything else is refused.
pub fn parse_range_start(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_bearer_tokens() {
        let t = Tokens::new("op-secret", "agent-secret");
        let req = |h: Option<&str>| {
            let mut b = Request::builder();
            if let Some(h) = h {
                b = b.header(AUTHORIZATION, h);
            }
            b.body(()).unwrap()
        };
        assert_eq!(t.role(&req(Some("Bearer op-secret"))), Some(Role::Operator));
        assert_eq!(t.role(&req(Some("Bearer agent-secret"))), Some(Role::Agent));
        assert_eq!(t.role(&req(Some("Bearer op-secreT"))), None);
        assert_eq!(t.role(&req(Some("op-secret"))), None);
        assert_eq!(t.role(&req(None)), None);
        assert_eq!(parse_range_start("bytes=1048576-"), Some(1048576));
        assert_eq!(parse_range_start("bytes=0-10"), None);
        assert_eq!(parse_range_start("items=3-"), None);
    }
}
