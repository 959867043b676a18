//! Following the active manager among its replicas: every call a server makes to the manager
//! (discovery, the tree's calls, reports, cache reports) goes through one [`Managers`].
//!
//! It keeps calling the replica that answered last. On a refused connection, a timeout, `502`,
//! `503` or `504` it moves to the next configured URL; on a redirect (`3xx`, a standby naming
//! the active replica) it jumps to the URL the `Location` names, but only when that origin is
//! one of the configured managers: a hostile responder's redirect elsewhere never gets this
//! server's token (it moves to the next configured URL instead). After a whole round of URLs
//! failed it pauses, longer each round (up to a second), until the call's patience runs out.
//!
//! Only the origin of a `Location` is used; the path is the caller's own.
//!
//! With no URL configured (a GL node on its own, as the tree tests run it) the follower learns
//! the manager from each manager-signed notification ([`Managers::prefer`]); with URLs
//! configured, a notification only says which of them is active now.

use std::sync::Mutex;
use std::time::Duration;

use hyper::{Method, StatusCode, Uri};
use serde::{Serialize, de::DeserializeOwned};

use crate::http::{ClientError, JsonClient};

/// Managers learned from signed notifications when none is configured (the oldest go first).
const LEARNED_MAX: usize = 8;

/// The longest pause between two rounds of URLs.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Every manager URL this server may call, and the one it follows now.
pub struct Managers {
    client: JsonClient,
    state: Mutex<State>,
}

struct State {
    /// Base URLs (`scheme://host:port`, no trailing `/`).
    urls: Vec<String>,
    current: usize,
    /// Configured by the operator: a notification does not add to them.
    configured: bool,
}

impl std::fmt::Debug for Managers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Managers").field("urls", &st.urls).field("current", &st.current).finish()
    }
}

/// What to do after a failed call.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// The same replica again, after a pause (a `500`: it is the right one, but failed).
    Stay,
    /// The next configured replica (this one is down, or a standby with no active one known).
    Move,
    /// The replica a redirect named (its index).
    Jump(usize),
    /// Not a question of which replica: the caller gets the error.
    Final,
}

/// `scheme://authority` of a URL, lower-cased: what two URLs must share to be the same manager.
fn origin(url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?).to_ascii_lowercase())
}

fn normalize(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

impl Managers {
    /// A follower of `urls` (in the operator's order; the first is tried first), calling with
    /// `client` (its token or certificate go only to these URLs).
    pub fn new(client: JsonClient, urls: &[String]) -> Managers {
        let urls: Vec<String> = urls.iter().map(|u| normalize(u)).collect();
        let configured = !urls.is_empty();
        Managers { client, state: Mutex::new(State { urls, current: 0, configured }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL calls go to now (`None`: no manager known).
    pub fn current(&self) -> Option<String> {
        let st = self.lock();
        st.urls.get(st.current).cloned()
    }

    /// Every URL it may call.
    pub fn urls(&self) -> Vec<String> {
        self.lock().urls.clone()
    }

    /// Whether any manager is known.
    pub fn is_empty(&self) -> bool {
        self.lock().urls.is_empty()
    }

    /// A manager-signed notification names the replica that sent it: follow it. Only call this
    /// with a verified notification's `manager`. With configured URLs it must be one of them
    /// (else ignored); with none, it is learned.
    pub fn prefer(&self, url: &str) {
        let Some(want) = origin(url) else { return };
        let mut st = self.lock();
        if let Some(i) = st.urls.iter().position(|u| origin(u).as_deref() == Some(&want)) {
            st.current = i;
        } else if !st.configured {
            if st.urls.len() >= LEARNED_MAX {
                st.urls.remove(0);
            }
            st.urls.push(normalize(url));
            st.current = st.urls.len() - 1;
        }
    }

    fn index_of(&self, url: &str) -> Option<usize> {
        let want = origin(url)?;
        self.lock().urls.iter().position(|u| origin(u).as_deref() == Some(&want))
    }

    fn classify(&self, e: &ClientError) -> Next {
        match e {
            ClientError::Transport { .. } | ClientError::Timeout { .. } => Next::Move,
            ClientError::Body { .. } => Next::Move,
            ClientError::Status { status, location, url, .. } if status.is_redirection() => {
                match location.as_deref().and_then(|l| self.index_of(l)) {
                    Some(i) => Next::Jump(i),
                    None => {
                        tracing::warn!(
                            "{url}: redirected to {location:?}, which is not a configured manager; not followed"
                        );
                        Next::Move
                    }
                }
            }
            ClientError::Status { status, .. }
                if matches!(
                    *status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ) =>
            {
                Next::Move
            }
            ClientError::Status { status, .. } if status.is_server_error() => Next::Stay,
            _ => Next::Final,
        }
    }

    /// Moves from replica `from` to `to` unless another call moved already.
    fn switch(&self, from: usize, to: usize) {
        let mut st = self.lock();
        if st.current == from && to < st.urls.len() && to != from {
            st.current = to;
            tracing::info!("following the manager at {}", st.urls[to]);
        }
    }

    /// Calls `path` (e.g. `/api/v1/discovery`) on the active manager, following replicas as
    /// above for at most `patience`. Errors that are not about which replica (a `4xx`, an
    /// answer that does not decode) return at once; else the last error once patience ran out.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
        patience: Duration,
    ) -> Result<Resp, ClientError> {
        let end = tokio::time::Instant::now() + patience;
        let (mut tried, mut round) = (0usize, 0u32);
        loop {
            let (index, base, count) = {
                let st = self.lock();
                match st.urls.get(st.current) {
                    Some(u) => (st.current, u.clone(), st.urls.len()),
                    None => {
                        return Err(ClientError::Request {
                            url: path.into(),
                            what: "no manager URL known".into(),
                        });
                    }
                }
            };
            let err = match self.client.call(method.clone(), &format!("{base}{path}"), body).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let next = self.classify(&err);
            tracing::debug!("{err} → {next:?}");
            match next {
                Next::Final => return Err(err),
                Next::Jump(i) => self.switch(index, i),
                Next::Move => self.switch(index, (index + 1) % count),
                Next::Stay => tried = count,
            }
            tried += 1;
            if tokio::time::Instant::now() >= end {
                return Err(err);
            }
            // A whole round failed (or redirects went round in a circle): pause before the next.
            if tried >= count {
                tried = 0;
                round += 1;
                let pause = (Duration::from_millis(100) * round).min(MAX_PAUSE);
                tokio::time::sleep_until(end.min(tokio::time::Instant::now() + pause)).await;
            }
        }
    }

    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
        patience: Duration,
    ) -> Result<Resp, ClientError> {
        self.call(Method::POST, path, Some(body), patience).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(m: &Managers) -> Vec<String> {
        m.urls()
    }

    #[test]
    fn origins_compare_scheme_and_authority_only() {
        assert_eq!(
            origin("http://127.0.0.1:7700/api/v1/x?y").as_deref(),
            Some("http://127.0.0.1:7700")
        );
        assert_eq!(origin("HTTP://Host:1/"), origin("http://host:1"));
        assert_ne!(origin("https://host:1"), origin("http://host:1"));
        assert_eq!(origin("/relative/path"), None);
    }

    #[tokio::test]
    async fn a_notification_selects_a_configured_manager_and_never_adds_one() {
        let m = Managers::new(
            JsonClient::new("t", Duration::from_secs(1)),
            &["http://a:1/".into(), "http://b:2".into()],
        );
        assert_eq!(m.current().as_deref(), Some("http://a:1"));
        m.prefer("http://b:2");
        assert_eq!(m.current().as_deref(), Some("http://b:2"));
        m.prefer("http://evil:3");
        assert_eq!(m.current().as_deref(), Some("http://b:2"));
        assert_eq!(urls(&m), ["http://a:1", "http://b:2"]);
    }

    #[tokio::test]
    async fn with_none_configured_it_learns_from_notifications_bounded() {
        let m = Managers::new(JsonClient::new("t", Duration::from_secs(1)), &[]);
        assert!(m.is_empty());
        for i in 0..(LEARNED_MAX + 3) {
            m.prefer(&format!("http://m{i}:1"));
        }
        assert_eq!(m.urls().len(), LEARNED_MAX);
        assert_eq!(m.current(), Some(format!("http://m{}:1", LEARNED_MAX + 2)));
    }

    #[tokio::test]
    async fn redirects_are_followed_only_to_configured_managers() {
        let m = Managers::new(
            JsonClient::new("t", Duration::from_secs(1)),
            &["http://a:1".into(), "http://b:2".into()],
        );
        let redirect = |to: &str| ClientError::Status {
            method: Method::POST,
            url: "http://a:1/x".into(),
            status: StatusCode::TEMPORARY_REDIRECT,
            body: String::new(),
            location: Some(to.into()),
        };
        assert_eq!(m.classify(&redirect("http://b:2/x")), Next::Jump(1));
        assert_eq!(m.classify(&redirect("http://evil:2/x")), Next::Move);
        assert_eq!(m.classify(&redirect("https://b:2/x")), Next::Move);
        let status = |s: u16| ClientError::Status {
            method: Method::POST,
            url: "http://a:1/x".into(),
            status: StatusCode::from_u16(s).unwrap(),
            body: String::new(),
            location: None,
        };
        assert_eq!(m.classify(&status(503)), Next::Move);
        assert_eq!(m.classify(&status(500)), Next::Stay);
        assert_eq!(m.classify(&status(400)), Next::Final);
        assert_eq!(m.classify(&status(307)), Next::Move);
    }
}
