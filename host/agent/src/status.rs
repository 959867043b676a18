//! The agent's status port (`[status] listen`, loopback by default): every TCP connection gets
//! one JSON document — the election (state, leader, members, counters) and, for a server agent,
//! its role, GL URL, live release, interpreter version and last runs applied — and is closed.
//! `cmover agent status` reads it with [`fetch`] and words it; the JSON shape is what `--json`
//! prints (`docs/agent.md`).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::error::Elapsed;

use crate::election::ElectionStatus;
use crate::node::{AgentStatus, AgentStatusReader, ServerAgent};

/// How long `fetch` waits to connect, and then to read.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum StatusError {
    #[error("binding the status address {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("timed out connecting to the agent at {addr}")]
    ConnectTimeout { addr: SocketAddr, source: Elapsed },
    #[error("no agent answers at {addr}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("timed out reading the agent's status")]
    ReadTimeout(#[source] Elapsed),
    #[error(transparent)]
    Read(std::io::Error),
    #[error("the agent's status is not JSON")]
    NotJson(#[source] serde_json::Error),
}

/// What the status port reports on.
pub enum StatusSource {
    /// A server agent.
    Agent(AgentStatusReader),
    /// An agent that runs the election only.
    Election(watch::Receiver<ElectionStatus>),
}

impl StatusSource {
    /// The status document now.
    pub fn json(&self, segment: &str) -> Value {
        match self {
            StatusSource::Agent(a) => status_json(segment, &a.status()),
            StatusSource::Election(e) => election_only_json(segment, &e.borrow()),
        }
    }
}

/// The bound status port, not yet answering.
pub struct StatusServer {
    listener: TcpListener,
}

impl StatusServer {
    /// Binds the port (before the agent joins its segment, so a taken port fails the start).
    pub async fn bind(addr: SocketAddr) -> Result<StatusServer, StatusError> {
        let listener =
            TcpListener::bind(addr).await.map_err(|source| StatusError::Bind { addr, source })?;
        Ok(StatusServer { listener })
    }

    /// Answers every connection with `source`'s status at that moment, on the current runtime,
    /// until the task is aborted.
    pub fn spawn(self, segment: String, source: StatusSource) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match self.listener.accept().await {
                    Ok((mut stream, _)) => {
                        let body = source.json(&segment).to_string();
                        tokio::spawn(async move {
                            // A reader that never reads does not hold the task forever.
                            let write = stream.write_all(body.as_bytes());
                            let _ = tokio::time::timeout(CLIENT_TIMEOUT, write).await;
                        });
                    }
                    // Out of file descriptors (EMFILE) lasts until some close: wait, don't spin.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            }
        })
    }
}

/// Reads a running agent's status document from its status port.
pub async fn fetch(addr: SocketAddr) -> Result<Value, StatusError> {
    let mut stream = tokio::time::timeout(CLIENT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|source| StatusError::ConnectTimeout { addr, source })?
        .map_err(|source| StatusError::Connect { addr, source })?;
    let mut body = String::new();
    tokio::time::timeout(CLIENT_TIMEOUT, stream.read_to_string(&mut body))
        .await
        .map_err(StatusError::ReadTimeout)?
        .map_err(StatusError::Read)?;
    serde_json::from_str(&body).map_err(StatusError::NotJson)
}

/// The status of an election-only agent: the election, and its role named as a server agent's is.
pub fn election_only_json(segment: &str, st: &ElectionStatus) -> Value {
    let mut v = election_json(segment, st);
    v["role"] = json!(ServerAgent::role_of(st));
    v
}

/// The status of a server agent.
pub fn status_json(segment: &str, a: &AgentStatus) -> Value {
    let mut v = election_json(segment, &a.election);
    v["role"] = json!(a.role);
    v["gl_url"] = json!(a.gl_url);
    v["serving"] = json!(a.serving.map(|s| s.to_string()));
    v["live"] = json!(a.live);
    v["site_root"] = json!(a.site_root.display().to_string());
    v["interpreter"] = json!(a.interpreter);
    v["sites"] = json!(a.sites);
    v["applied"] = a
        .recent
        .iter()
        .map(|r| json!({ "run": r.run, "site": r.site, "ok": r.error.is_none(), "error": r.error, "live": r.live, "summary": r.summary, "at_ms": r.at_ms, "interpreter": r.interpreter }))
        .collect();
    v
}

fn election_json(segment: &str, s: &ElectionStatus) -> Value {
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "node": m.node,
                "name": m.registration.name,
                "address": m.registration.address,
                "source": m.source.to_string(),
                "content_groups": m.registration.content_groups,
                "cpu_cores": m.registration.cpu_cores,
                "free_disk_mib": m.registration.free_disk_mib,
            })
        })
        .collect();
    let st = &s.stats;
    json!({
        "node": s.node,
        "segment": segment,
        "state": format!("{:?}", s.state),
        "leader": s.leader,
        "is_leader": s.is_leader,
        "registered_with": s.registered_with,
        "control_channel": s.control_channel.to_string(),
        "data_channels": s.data_channels.iter().map(|(g, a)| (g.clone(), Value::from(a.to_string()))).collect::<serde_json::Map<_, _>>(),
        "members": members,
        "stats": {
            "received": st.received, "accepted": st.accepted, "malformed": st.malformed,
            "foreign": st.foreign, "forged": st.forged, "replayed": st.replayed,
            "sent": st.sent, "send_errors": s.send_errors,
        },
        "save_errors": s.save_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fetch_reads_what_the_port_serves_and_names_a_silent_address() {
        let server = StatusServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = server.listener.accept().await.unwrap();
            s.write_all(br#"{"node": 7}"#).await.unwrap();
        });
        assert_eq!(fetch(addr).await.unwrap(), json!({ "node": 7 }));
        task.await.unwrap();
        let gone = fetch(addr).await.unwrap_err();
        assert!(matches!(gone, StatusError::Connect { .. }), "{gone:?}");
    }
}
