//! HTTP plumbing shared by the manager and group leaders: a hyper/1 accept loop (plain, or mutual
//! TLS: [`crate::tls`]; [`serve`](mod@serve)), JSON bodies with a size limit, roles from bearer
//! tokens compared in constant time or from the verified client certificate (here), and a small
//! JSON client ([`client`]).

mod client;
mod serve;

pub use client::{ClientError, JsonClient};
pub use serve::{ServeLimits, serve, serve_tls, serve_until, serve_with};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;

use crate::tls::CertRole;

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

/// Longest pause allowed while a request body arrives.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest time a whole JSON request body may take (a slow drip under the idle timeout ends
/// here too).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads a JSON request body of at most [`MAX_JSON_BODY`] bytes, which must keep arriving
/// ([`BODY_IDLE_TIMEOUT`], [`BODY_TIMEOUT`]): a stalled body is answered `408` and its
/// connection closed.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let body = read_body(req.into_body(), MAX_JSON_BODY, BODY_IDLE_TIMEOUT, BODY_TIMEOUT).await?;
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")))
}

/// Collects a body of at most `max` bytes, each frame within `idle`, all within `total`.
async fn read_body<B>(
    body: B,
    max: usize,
    idle: Duration,
    total: Duration,
) -> Result<Bytes, Response<Body>>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stalled = || error(StatusCode::REQUEST_TIMEOUT, "request body stalled");
    let mut body = Limited::new(body, max);
    let mut bytes = Vec::new();
    let collect = async {
        while let Some(frame) =
            tokio::time::timeout(idle, body.frame()).await.map_err(|_| stalled())?
        {
            let frame =
                frame.map_err(|e| error(StatusCode::BAD_REQUEST, &format!("reading body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    tokio::time::timeout(total, collect).await.map_err(|_| stalled())??;
    Ok(Bytes::from(bytes))
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
/// Clones share the tokens, so [`Tokens::replace`] (a SIGHUP re-reading the token files) takes
/// effect for every request after it.
#[derive(Clone)]
pub struct Tokens {
    hashes: std::sync::Arc<std::sync::RwLock<TokenHashes>>,
}

#[derive(Clone, Copy)]
struct TokenHashes {
    operator: blake3::Hash,
    agent: blake3::Hash,
}

impl Tokens {
    pub fn new(operator: &str, agent: &str) -> Tokens {
        Tokens {
            hashes: std::sync::Arc::new(std::sync::RwLock::new(TokenHashes::of(operator, agent))),
        }
    }

    /// From now on only these tokens are accepted (the old ones are refused).
    pub fn replace(&self, operator: &str, agent: &str) {
        *self.hashes.write().unwrap_or_else(|p| p.into_inner()) = TokenHashes::of(operator, agent);
    }

    /// The role a request has: over mutual TLS the one its client certificate names (tokens
    /// are not consulted), else the one its `Authorization: Bearer` token grants, if any.
    pub fn role<B>(&self, req: &Request<B>) -> Option<Role> {
        if let Some(PeerRole(role)) = req.extensions().get::<PeerRole>() {
            return *role;
        }
        let presented = bearer(req)?;
        let h = blake3::hash(presented.as_bytes());
        let t = *self.hashes.read().unwrap_or_else(|p| p.into_inner());
        // Both comparisons always run, so timing does not tell which role was close.
        let (op, ag) = (h == t.operator, h == t.agent);
        if op {
            Some(Role::Operator)
        } else if ag {
            Some(Role::Agent)
        } else {
            None
        }
    }
}

impl TokenHashes {
    fn of(operator: &str, agent: &str) -> TokenHashes {
        TokenHashes {
            operator: blake3::hash(operator.as_bytes()),
            agent: blake3::hash(agent.as_bytes()),
        }
    }
}

/// The `Authorization: Bearer` token of a request, if any.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
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
        t.clone().replace("op-new-secret", "agent-secret");
        assert_eq!(t.role(&req(Some("Bearer op-secret"))), None, "the old token is refused");
        assert_eq!(t.role(&req(Some("Bearer op-new-secret"))), Some(Role::Operator));
        assert_eq!(parse_range_start("bytes=1048576-"), Some(1048576));
        assert_eq!(parse_range_start("bytes=0-10"), None);
        assert_eq!(parse_range_start("items=3-"), None);
    }

    /// A body that sends one frame, then nothing ever again.
    struct Stalls(bool);

    impl hyper::body::Body for Stalls {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from("{")))))
            }
        }
    }

    #[tokio::test]
    async fn a_stalled_body_is_answered_408() {
        let idle = Duration::from_millis(50);
        let r = read_body(Stalls(false), 1024, idle, Duration::from_secs(60)).await.unwrap_err();
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        let whole = read_body(full("{}"), 1024, Duration::from_secs(60), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(&whole[..], b"{}");
    }
}
