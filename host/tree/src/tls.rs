//! Mutual TLS for the manager's API and the tree transfers between the manager and the group
//! leaders (rustls on the `ring` provider): a node's identity loaded from PEM files ([`Tls`],
//! [`TlsFiles`]) and the role a verified certificate names ([`CertRole`], [`role_of`]). The
//! cluster's certificate authority that issues them (`cmover cert`, rcgen) is the manager's
//! (`cm_manager::ca`).
//!
//! One private CA per cluster signs every certificate. A certificate names its holder's **role**
//! (`manager`, `agent` or `operator`) as a subject-alternative DNS name under a reserved domain,
//! `<role>.role.cmover.invalid` (`.invalid` never resolves, so the name can never be mistaken for
//! a host), and, for people reading it, as the subject's OU. Servers require a client
//! certificate signed by the CA and read the role from the *verified* certificate with the same
//! library that verified it (rustls-webpki's name check), so a role is exactly as trustworthy as
//! the CA's signature. A certificate naming no role, or more than one, grants nothing.
//!
//! An agent's certificate also names its holder's server as `<name>.server.cmover.invalid`
//! ([`server_marker`]): the manager accepts a group leader's discovery report over mutual TLS
//! only for the server its certificate names ([`PeerCertificate::names_server`]), so one agent's
//! certificate cannot speak for another server or its segment.
//!
//! Clients verify the server's certificate against the same CA and the host of the URL, so a
//! certificate carries the host names and IP addresses its holder serves at; and only a
//! `manager` or `agent` certificate may serve (an operator's certificate cannot pose as a node).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use thiserror::Error;

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertRole {
    /// The manager: serves the API, notifies group leaders.
    Manager,
    /// A server agent: discovery, the tree, apply reports.
    Agent,
    /// A person or tool configuring and running jobs.
    Operator,
}

impl CertRole {
    pub const ALL: [CertRole; 3] = [CertRole::Manager, CertRole::Agent, CertRole::Operator];

    pub fn name(self) -> &'static str {
        match self {
            CertRole::Manager => "manager",
            CertRole::Agent => "agent",
            CertRole::Operator => "operator",
        }
    }

    /// The subject-alternative DNS name that carries the role.
    pub fn marker(self) -> &'static str {
        match self {
            CertRole::Manager => "manager.role.cmover.invalid",
            CertRole::Agent => "agent.role.cmover.invalid",
            CertRole::Operator => "operator.role.cmover.invalid",
        }
    }

    pub fn parse(s: &str) -> Option<CertRole> {
        CertRole::ALL.into_iter().find(|r| r.name() == s)
    }
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS: reading {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("TLS: {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("TLS: {0}")]
    Config(String),
}

/// The CA certificate's file name in a directory of certificates (`cmover cert` writes it).
pub const CA_CERT: &str = "ca.pem";

/// Where a node's TLS material is: the cluster CA's certificate, its own certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `cmover cert` writes: `dir/ca.pem`, `dir/<name>.pem`, `dir/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join(CA_CERT),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// A node's TLS identity: its server side (client certificate required, checked against the
/// CA) and its client side (presents its certificate, checks servers against the CA).
#[derive(Clone)]
pub struct Tls {
    pub role: Option<CertRole>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("role", &self.role).finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.into(), source })
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        Tls::from_pem(
            &read("the CA certificate", &files.ca)?,
            &read("the certificate", &files.cert)?,
            &read("the key", &files.key)?,
        )
    }

    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Tls, TlsError> {
        let pem = |what: &'static str| {
            move |e: rustls::pki_types::pem::Error| TlsError::Pem { what, detail: e.to_string() }
        };
        let ca = CertificateDer::from_pem_slice(ca_pem).map_err(pem("the CA certificate"))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(pem("the certificate"))?;
        let own = chain.first().cloned().ok_or_else(|| TlsError::Pem {
            what: "the certificate",
            detail: "no certificate in it".into(),
        })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(pem("the key"))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca).map_err(|e| TlsError::Config(format!("the CA certificate: {e}")))?;
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Config(format!("the certificate and key: {e}")))?;
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Config(format!("server verifier: {e}")))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeVerifier(servers)))
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("the certificate and key: {e}")))?;
        // Our own certificate must pass the check every peer will make of it.
        verifier.verify_client_cert(&own, &[], UnixTime::now()).map_err(|e| {
            TlsError::Config(format!("the certificate is not valid under the cluster CA: {e}"))
        })?;
        Ok(Tls { role: role_of(&own), server: Arc::new(server), client: Arc::new(client) })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
}

/// The CA's own server check, then: the server's certificate names a node's role (`manager` or
/// `agent`), never an operator's.
#[derive(Debug)]
struct NodeVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        match role_of(end_entity) {
            Some(CertRole::Manager | CertRole::Agent) => Ok(verified),
            other => Err(rustls::Error::General(format!(
                "the server's certificate is not a node's (role {}): only manager and agent certificates may serve",
                other.map_or("none", CertRole::name)
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The role a peer's certificate names; `None` when it names none or several. Call it only on a
/// certificate the handshake verified against the CA.
pub fn role_of(cert: &CertificateDer<'_>) -> Option<CertRole> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut named = CertRole::ALL.into_iter().filter(|r| {
        ServerName::try_from(r.marker())
            .is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
    });
    let first = named.next()?;
    named.next().is_none().then_some(first)
}

/// The subject-alternative DNS name that names a certificate's server (`None` when `name` is not
/// a DNS name: such a certificate names no server).
pub fn server_marker(name: &str) -> Option<String> {
    let marker = format!("{name}.server.cmover.invalid");
    ServerName::try_from(marker.as_str()).is_ok().then_some(marker)
}

/// The verified client certificate of a request that came over mutual TLS (the accept loop puts
/// it in the request's extensions beside the [`PeerRole`](crate::http::PeerRole)).
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<CertificateDer<'static>>);

impl PeerCertificate {
    /// True when the certificate names the server `name` ([`server_marker`]).
    pub fn names_server(&self, name: &str) -> bool {
        let Some(marker) = server_marker(name) else { return false };
        let Ok(ee) = webpki::EndEntityCert::try_from(self.0.as_ref()) else { return false };
        ServerName::try_from(marker.as_str())
            .is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
    }
}
