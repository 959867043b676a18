//! Mutual TLS for the manager's API and the tree transfers between the manager and the group
//! leaders (rustls on the `ring` provider), and the cluster's certificate authority
//! (`cmover cert`, rcgen).
//!
//! One private CA per cluster signs every certificate. A certificate names its holder's **role**
//! (`manager`, `agent` or `operator`) as a subject-alternative DNS name under a reserved domain,
//! `<role>.role.cmover.invalid` (`.invalid` never resolves, so the name can never be mistaken for
//! a host), and, for people reading it, as the subject's OU. Servers require a client
//! certificate signed by the CA and read the role from the *verified* certificate with the same
//! library that verified it (rustls-webpki's name check), so a role is exactly as trustworthy as
//! the CA's signature. A certificate naming no role, or more than one, grants nothing.
//!
//! Clients verify the server's certificate against the same CA and the host of the URL, so a
//! certificate carries the host names and IP addresses its holder serves at; and only a
//! `manager` or `agent` certificate may serve (an operator's certificate cannot pose as a node).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
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
    #[error("TLS: writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("TLS: {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("TLS: {0}")]
    Config(String),
    #[error("TLS: generating {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("TLS: {0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
}

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

/// File names in a CA directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// The CA's distinguished name and usages. `cmover cert issue` rebuilds the issuer from these
/// and the CA's key (rcgen signs with the issuer's name, key identifier and usages; the key
/// identifier derives from the key), and checks the result against the stored CA certificate.
fn ca_params(validity_from: i32, years: i32) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Content Mover");
    dn.push(DnType::CommonName, "Content Mover cluster CA");
    p.distinguished_name = dn;
    // It signs end-entity certificates only.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(validity_from, 1, 1);
    p.not_after = rcgen::date_time_ymd(validity_from + years, 1, 1);
    p
}

/// The current calendar year (UTC), for validity periods that start on its first day.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days since 1970 → civil year (Howard Hinnant's algorithm, year part only).
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2)) as i32
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA: its certificate and signing key.
pub struct ClusterCa {
    pub cert_pem: String,
    key: KeyPair,
}

impl ClusterCa {
    /// A new CA (ECDSA P-256), valid for ten years from the start of this year.
    pub fn generate() -> Result<ClusterCa, TlsError> {
        let generate = |what: &str| {
            let what = what.to_string();
            move |source| TlsError::Generate { what, source }
        };
        let key = KeyPair::generate().map_err(generate("the CA key"))?;
        let cert =
            ca_params(this_year(), 10).self_signed(&key).map_err(generate("the CA certificate"))?;
        Ok(ClusterCa { cert_pem: cert.pem(), key })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, TlsError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| TlsError::Pem { what: "the CA key", detail: e.to_string() })?;
        Ok(ClusterCa { cert_pem: cert_pem.to_string(), key })
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for `name` with `role`, valid at `hosts` (DNS names or IP addresses), for
    /// three years from the start of this year; usable as a server and as a client.
    pub fn issue(&self, name: &str, role: CertRole, hosts: &[String]) -> Result<Issued, TlsError> {
        let generate = |what: String| move |source| TlsError::Generate { what, source };
        let mut sans: Vec<String> = hosts.to_vec();
        sans.push(role.marker().to_string());
        let mut p =
            CertificateParams::new(sans).map_err(generate(format!("the names of {name}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Content Mover");
        dn.push(DnType::OrganizationalUnitName, role.name());
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let year = this_year();
        p.not_before = rcgen::date_time_ymd(year, 1, 1);
        p.not_after = rcgen::date_time_ymd(year + 3, 1, 1);
        let key = KeyPair::generate().map_err(generate(format!("the key of {name}")))?;
        let issuer = Issuer::new(ca_params(year, 10), &self.key);
        let cert =
            p.signed_by(&key, &issuer).map_err(generate(format!("the certificate of {name}")))?;
        let issued = Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        // The rebuilt issuer must match the stored CA certificate (same key, same name): the
        // new certificate has to verify under it, or it is worthless.
        Tls::from_pem(self.cert_pem.as_bytes(), issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
            .map_err(|e| TlsError::Config(format!("the certificate issued for {name} does not verify under the CA certificate ({e}): is the CA key the one that made ca.pem?")))?;
        Ok(issued)
    }

    /// `cmover cert init`: a new CA in `dir` (`ca.pem`, and `ca.key` readable by its owner only).
    pub fn init_dir(dir: &Path) -> Result<ClusterCa, TlsError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| TlsError::Write { path: dir.into(), source })?;
        for f in [CA_CERT, CA_KEY] {
            if dir.join(f).exists() {
                return Err(TlsError::Exists(dir.join(f)));
            }
        }
        let ca = ClusterCa::generate()?;
        write_private(&dir.join(CA_KEY), &ca.key_pem())?;
        write_public(&dir.join(CA_CERT), &ca.cert_pem)?;
        Ok(ca)
    }

    pub fn open_dir(dir: &Path) -> Result<ClusterCa, TlsError> {
        let text = |f: &str, what| {
            String::from_utf8(read(what, &dir.join(f))?)
                .map_err(|e| TlsError::Pem { what, detail: e.to_string() })
        };
        ClusterCa::from_pem(&text(CA_CERT, "the CA certificate")?, &text(CA_KEY, "the CA key")?)
    }

    /// `cmover cert issue`: writes `out/<name>.pem` and `out/<name>.key` (owner only), and a copy
    /// of the CA certificate as `out/ca.pem` when `out` has none, so `out` is a node's whole set.
    pub fn issue_to_dir(
        &self,
        out: &Path,
        name: &str,
        role: CertRole,
        hosts: &[String],
    ) -> Result<TlsFiles, TlsError> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') || name == "ca" {
            return Err(TlsError::Config(format!("`{name}` cannot name a certificate file")));
        }
        std::fs::create_dir_all(out)
            .map_err(|source| TlsError::Write { path: out.into(), source })?;
        let files = TlsFiles::in_dir(out, name);
        for f in [&files.cert, &files.key] {
            if f.exists() {
                return Err(TlsError::Exists(f.clone()));
            }
        }
        let issued = self.issue(name, role, hosts)?;
        write_private(&files.key, &issued.key_pem)?;
        write_public(&files.cert, &issued.cert_pem)?;
        if !files.ca.exists() {
            write_public(&files.ca, &self.cert_pem)?;
        }
        Ok(files)
    }
}

fn write_public(path: &Path, text: &str) -> Result<(), TlsError> {
    std::fs::write(path, text).map_err(|source| TlsError::Write { path: path.into(), source })
}

/// A key file: created with mode 0600, never readable by others even for a moment.
fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| TlsError::Write { path: path.into(), source })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| TlsError::Write { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into()]
    }

    #[test]
    fn issued_certificates_carry_exactly_their_role() {
        let ca = ClusterCa::generate().unwrap();
        for role in CertRole::ALL {
            let c = ca.issue("node", role, &hosts()).unwrap();
            let tls =
                Tls::from_pem(ca.cert_pem.as_bytes(), c.cert_pem.as_bytes(), c.key_pem.as_bytes())
                    .unwrap();
            assert_eq!(tls.role, Some(role));
            assert_eq!(CertRole::parse(role.name()), Some(role));
        }
    }

    #[test]
    fn a_certificate_of_another_ca_is_refused_even_with_the_same_ca_name() {
        let (ours, theirs) = (ClusterCa::generate().unwrap(), ClusterCa::generate().unwrap());
        let c = theirs.issue("intruder", CertRole::Operator, &hosts()).unwrap();
        let e =
            Tls::from_pem(ours.cert_pem.as_bytes(), c.cert_pem.as_bytes(), c.key_pem.as_bytes())
                .unwrap_err();
        assert!(e.to_string().contains("not valid under the cluster CA"), "{e}");
        // A CA key that did not make ca.pem cannot issue under it.
        let mixed = ClusterCa::from_pem(&ours.cert_pem, &theirs.key_pem()).unwrap();
        assert!(mixed.issue("x", CertRole::Agent, &hosts()).is_err());
    }

    #[test]
    fn ca_and_certificates_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init_dir(dir.path()).unwrap();
        assert!(matches!(ClusterCa::init_dir(dir.path()), Err(TlsError::Exists(_))));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the CA key is readable by others: {mode:o}");
        let reopened = ClusterCa::open_dir(dir.path()).unwrap();
        assert_eq!(reopened.cert_pem, ca.cert_pem);
        let out = dir.path().join("gl-1");
        let files = reopened.issue_to_dir(&out, "gl-1", CertRole::Agent, &hosts()).unwrap();
        assert_eq!(Tls::load(&files).unwrap().role, Some(CertRole::Agent));
        assert!(matches!(
            reopened.issue_to_dir(&out, "gl-1", CertRole::Agent, &hosts()),
            Err(TlsError::Exists(_))
        ));
        assert!(reopened.issue_to_dir(&out, "../x", CertRole::Agent, &hosts()).is_err());
    }

    #[test]
    fn calendar_year() {
        let y = this_year();
        assert!((2024..2200).contains(&y), "{y}");
    }
}
