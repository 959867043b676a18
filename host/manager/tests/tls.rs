//! The manager's API over mutual TLS: the right certificate works; no certificate, a
//! certificate from another CA (even one with the same CA name), a certificate of the wrong role,
//! a plain-HTTP client and a bearer token without a certificate are all refused and change
//! nothing. A group leader's endpoint over TLS takes the manager's and agents' certificates only.
//! An agent's certificate reports discovery only for its own server.

use std::sync::Arc;
use std::time::Duration;

use cm_manager::ca::ClusterCa;
use cm_manager::server::{Manager, ManagerConfig};
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::leader::{DeliveryOutcome, LeaderConfig, LeaderNode, LocalDelivery};
use cm_tree::manifest::Manifest;
use cm_tree::message::DiscoveryReport;
use cm_tree::tls::{CertRole, Tls};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OP: &str = "operator-token-for-tls-test";
const AGENT: &str = "agent-token-for-tls-test";

fn identity(ca: &ClusterCa, ca_pem: &str, name: &str, role: CertRole) -> Tls {
    let c = ca.issue(name, role, &["127.0.0.1".into(), "localhost".into()]).unwrap();
    Tls::from_pem(ca_pem.as_bytes(), c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap()
}

fn client(tls: &Tls, token: &str) -> JsonClient {
    JsonClient::with_tls(token, Duration::from_secs(5), Some(tls))
}

fn status_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Option<u16> {
    match r {
        Err(ClientError::Status { status, .. }) => Some(status.as_u16()),
        _ => None,
    }
}

fn report(leader: &str) -> DiscoveryReport {
    // From JSON, as an agent sends it (fields added later default).
    serde_json::from_value(serde_json::json!({
        "segment": "seg-a", "leader": leader, "address": "127.0.0.1:9", "location": "Etc/UTC",
        "cpu_power": 1, "free_disk": 1u64 << 30, "connections": 0, "members": [leader],
    }))
    .unwrap()
}

/// Everything an operator can read.
async fn state(op: &JsonClient, url: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for p in ["groups", "sites", "jobs", "runs", "segments", "servers", "history"] {
        out.push(op.get::<serde_json::Value>(&format!("{url}/api/v1/{p}")).await.unwrap());
    }
    out
}

/// A raw TLS request presenting `identity`'s certificate, or none: the answer, if any.
async fn raw_answer(
    ca_pem: &str,
    identity: Option<&Tls>,
    addr: std::net::SocketAddr,
) -> Option<String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca =
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            ca_pem.as_bytes(),
        )
        .unwrap();
    roots.add(ca).unwrap();
    let cfg = match identity {
        Some(t) => t.client_config(),
        None => Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        ),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let mut s = connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.ok()?;
    let req = format!(
        "GET /api/v1/groups HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {OP}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let n =
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test]
async fn api_over_mutual_tls_takes_the_right_certificate_only_and_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    let other_ca = ClusterCa::generate().unwrap();
    let pem = ca.cert_pem.clone();
    let mut cfg = ManagerConfig::new(dir.path().join("m"), OP, AGENT);
    cfg.tls = Some(identity(&ca, &pem, "manager", CertRole::Manager));
    let m = Manager::start(cfg).await.unwrap();
    assert!(m.url().starts_with("https://"), "{}", m.url());
    let api = |p: &str| format!("{}/api/v1/{p}", m.url());

    // The right certificates: an operator sets a group, an agent reports its segment.
    let op = client(&identity(&ca, &pem, "alice", CertRole::Operator), "");
    let agent = client(&identity(&ca, &pem, "gl-1", CertRole::Agent), "");
    let _: serde_json::Value =
        op.put(&api("groups/g"), &serde_json::json!({ "servers": ["gl-1"] })).await.unwrap();
    let _: serde_json::Value = agent.post(&api("discovery"), &report("gl-1")).await.unwrap();
    let before = state(&op, m.url()).await;
    assert_eq!(before[0].as_array().unwrap().len(), 1, "the group was set");
    assert_eq!(before[4].as_array().unwrap().len(), 1, "the segment was reported");

    let group = serde_json::json!({ "servers": ["intruder"] });
    let intruder = report("intruder");
    // Another CA's operator certificate, though that CA has the same name as ours.
    let foreign = identity(&other_ca, &other_ca.cert_pem, "mallory", CertRole::Operator);
    for c in [client(&foreign, OP), client(&foreign, "")] {
        let r = c.put::<_, serde_json::Value>(&api("groups/g"), &group).await;
        assert!(
            matches!(r, Err(ClientError::Transport { .. })),
            "a foreign certificate got through: {r:?}"
        );
    }
    // Wrong roles: agent certificates on operator routes, operator ones on agent routes (404,
    // as with tokens), the manager's own certificate on its API (403).
    assert_eq!(
        status_of(agent.put::<_, serde_json::Value>(&api("groups/g"), &group).await),
        Some(404)
    );
    assert_eq!(
        status_of(op.post::<_, serde_json::Value>(&api("discovery"), &intruder).await),
        Some(404)
    );
    let manager_cert = client(&identity(&ca, &pem, "manager-2", CertRole::Manager), OP);
    assert_eq!(
        status_of(manager_cert.put::<_, serde_json::Value>(&api("groups/g"), &group).await),
        Some(403)
    );
    // A valid agent certificate with the operator's token: the certificate decides.
    let agent_with_op_token = client(&identity(&ca, &pem, "gl-2", CertRole::Agent), OP);
    assert_eq!(
        status_of(agent_with_op_token.put::<_, serde_json::Value>(&api("groups/g"), &group).await),
        Some(404)
    );
    // Plain HTTP with the right token: the TLS port does not speak it.
    let plain = JsonClient::new(OP, Duration::from_secs(5));
    let r = plain
        .put::<_, serde_json::Value>(&api("groups/g").replacen("https://", "http://", 1), &group)
        .await;
    assert!(r.is_err() && status_of(r).is_none(), "plain HTTP was answered");
    // No client certificate at all (the right token in the request).
    let addr = m.url().trim_start_matches("https://").parse().unwrap();
    assert_eq!(
        raw_answer(&pem, None, addr).await,
        None,
        "a client without a certificate got an answer"
    );
    // The same raw request with the operator's certificate is answered (the check is not vacuous).
    let answer =
        raw_answer(&pem, Some(&identity(&ca, &pem, "bob", CertRole::Operator)), addr).await;
    assert!(answer.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 200")), "{answer:?}");

    assert_eq!(state(&op, m.url()).await, before, "refused requests changed nothing");
    // Not vacuous: the operator's certificate does change things.
    let _: serde_json::Value = op.put(&api("groups/g"), &group).await.unwrap();
    assert_ne!(state(&op, m.url()).await, before);
}

struct NoDelivery;

impl LocalDelivery for NoDelivery {
    fn deliver(
        &self,
        _run: u64,
        _a: std::path::PathBuf,
        _m: Manifest,
    ) -> cm_tree::BoxFuture<'static, DeliveryOutcome> {
        Box::pin(async { DeliveryOutcome::default() })
    }
}

#[tokio::test]
async fn a_group_leaders_endpoint_over_tls_takes_manager_and_agent_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    let pem = ca.cert_pem.clone();
    let mut lc = LeaderConfig::new("seg-a", "gl-1", AGENT, &dir.path().join("gl"));
    lc.tls = Some(identity(&ca, &pem, "gl-1", CertRole::Agent));
    let gl = LeaderNode::start(lc, Arc::new(NoDelivery)).await.unwrap();
    let url = format!("https://{}/members/report", gl.addr);
    let apply_report =
        serde_json::json!({ "server": "m-1", "node": 2, "run": 1, "error": null, "live": 1 });
    // The GL takes the report (its delivery does not collect them: 404 past authentication).
    for (name, role) in [("m-1", CertRole::Agent), ("manager", CertRole::Manager)] {
        let c = client(&identity(&ca, &pem, name, role), "");
        assert_eq!(
            status_of(c.post::<_, serde_json::Value>(&url, &apply_report).await),
            Some(404),
            "{role:?}"
        );
    }
    let op = client(&identity(&ca, &pem, "alice", CertRole::Operator), AGENT);
    assert_eq!(status_of(op.post::<_, serde_json::Value>(&url, &apply_report).await), Some(401));
    let other = ClusterCa::generate().unwrap();
    let foreign = client(&identity(&other, &other.cert_pem, "m-1", CertRole::Agent), AGENT);
    assert!(matches!(
        foreign.post::<_, serde_json::Value>(&url, &apply_report).await,
        Err(ClientError::Transport { .. })
    ));
    gl.stop();

    // A node never talks to a server holding an operator's certificate (CA-signed, right host).
    let mut fake = LeaderConfig::new("seg-a", "gl-fake", AGENT, &dir.path().join("fake"));
    fake.tls = Some(identity(&ca, &pem, "alice", CertRole::Operator));
    let fake = LeaderNode::start(fake, Arc::new(NoDelivery)).await.unwrap();
    let agent = client(&identity(&ca, &pem, "m-2", CertRole::Agent), "");
    let r = agent
        .post::<_, serde_json::Value>(
            &format!("https://{}/members/report", fake.addr),
            &apply_report,
        )
        .await;
    assert!(
        matches!(r, Err(ClientError::Transport { .. })),
        "an operator's certificate served a node: {r:?}"
    );
    fake.stop();
}

/// Issue 14, item 7: with an agent's certificate, one server cannot report for another (take
/// over its segment, or invent one led by it).
#[tokio::test]
async fn an_agent_certificate_reports_discovery_only_for_its_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    let pem = ca.cert_pem.clone();
    let mut cfg = ManagerConfig::new(dir.path().join("m"), OP, AGENT);
    cfg.tls = Some(identity(&ca, &pem, "manager", CertRole::Manager));
    let m = Manager::start(cfg).await.unwrap();
    let api = |p: &str| format!("{}/api/v1/{p}", m.url());
    let op = client(&identity(&ca, &pem, "alice", CertRole::Operator), "");
    let gl1 = client(&identity(&ca, &pem, "gl-1", CertRole::Agent), "");
    let _: serde_json::Value = gl1.post(&api("discovery"), &report("gl-1")).await.unwrap();
    let before = state(&op, m.url()).await;

    let r = gl1.post::<_, serde_json::Value>(&api("discovery"), &report("gl-2")).await;
    match r {
        Err(ClientError::Status { status, body, .. }) => {
            assert_eq!(status.as_u16(), 403, "{body}");
            assert!(body.contains("does not name that server"), "{body}");
        }
        other => panic!("a report for another server was accepted: {other:?}"),
    }
    // A server that is a live member of segment A cannot lead another segment either, even
    // with its own certificate.
    let member = client(&identity(&ca, &pem, "a-member", CertRole::Agent), "");
    let mut with_member = report("gl-1");
    with_member.members.push("a-member".into());
    let _: serde_json::Value = gl1.post(&api("discovery"), &with_member).await.unwrap();
    let before_member = state(&op, m.url()).await;
    let mut other = report("a-member");
    other.segment = "seg-b".into();
    assert_eq!(
        status_of(member.post::<_, serde_json::Value>(&api("discovery"), &other).await),
        Some(403)
    );
    assert_eq!(state(&op, m.url()).await, before_member, "refused reports changed nothing");
    assert_ne!(before, before_member, "not vacuous: the right report did change things");
}
