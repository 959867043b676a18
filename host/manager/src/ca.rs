//! The cluster's certificate authority (`cmover cert init|issue`, rcgen): one private CA per
//! cluster signs every node's and operator's certificate, each naming its holder's role
//! (`cm_tree::tls::CertRole`) as a subject-alternative name. Only the manager's side has it:
//! nodes load what it issued with `cm_tree::tls::Tls`, and never link rcgen.

use std::path::Path;

use cm_tree::tls::{CA_CERT, CertRole, Tls, TlsError, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;

/// Why making, opening or using the CA failed.
#[derive(Debug, Error)]
pub enum CaError {
    /// Reading the CA's files or decoding their PEM.
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS: writing {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
    #[error("TLS: {0}")]
    Config(String),
    #[error("TLS: generating {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("TLS: {0} already exists; refusing to overwrite it")]
    Exists(std::path::PathBuf),
}

/// The CA key's file name in the CA directory (beside [`CA_CERT`]).
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
    pub fn generate() -> Result<ClusterCa, CaError> {
        let generate = |what: &str| {
            let what = what.to_string();
            move |source| CaError::Generate { what, source }
        };
        let key = KeyPair::generate().map_err(generate("the CA key"))?;
        let cert =
            ca_params(this_year(), 10).self_signed(&key).map_err(generate("the CA certificate"))?;
        Ok(ClusterCa { cert_pem: cert.pem(), key })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| TlsError::Pem { what: "the CA key", detail: e.to_string() })?;
        Ok(ClusterCa { cert_pem: cert_pem.to_string(), key })
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for `name` with `role`, valid at `hosts` (DNS names or IP addresses), for
    /// three years from the start of this year; usable as a server and as a client. An agent's
    /// also names its server (`cm_tree::tls::server_marker`): the manager takes discovery
    /// reports over mutual TLS only from the server the certificate names.
    pub fn issue(&self, name: &str, role: CertRole, hosts: &[String]) -> Result<Issued, CaError> {
        let generate = |what: String| move |source| CaError::Generate { what, source };
        let mut sans: Vec<String> = hosts.to_vec();
        sans.push(role.marker().to_string());
        if role == CertRole::Agent
            && let Some(marker) = cm_tree::tls::server_marker(name)
        {
            sans.push(marker);
        }
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
            .map_err(|e| CaError::Config(format!("the certificate issued for {name} does not verify under the CA certificate ({e}): is the CA key the one that made ca.pem?")))?;
        Ok(issued)
    }

    /// `cmover cert init`: a new CA in `dir` (`ca.pem`, and `ca.key` readable by its owner only).
    pub fn init_dir(dir: &Path) -> Result<ClusterCa, CaError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| CaError::Write { path: dir.into(), source })?;
        for f in [CA_CERT, CA_KEY] {
            if dir.join(f).exists() {
                return Err(CaError::Exists(dir.join(f)));
            }
        }
        let ca = ClusterCa::generate()?;
        write_private(&dir.join(CA_KEY), &ca.key_pem())?;
        write_public(&dir.join(CA_CERT), &ca.cert_pem)?;
        Ok(ca)
    }

    pub fn open_dir(dir: &Path) -> Result<ClusterCa, CaError> {
        let text = |f: &str, what| {
            let path = dir.join(f);
            let bytes =
                std::fs::read(&path).map_err(|source| TlsError::Read { what, path, source })?;
            String::from_utf8(bytes).map_err(|e| TlsError::Pem { what, detail: e.to_string() })
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
    ) -> Result<TlsFiles, CaError> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') || name == "ca" {
            return Err(CaError::Config(format!("`{name}` cannot name a certificate file")));
        }
        std::fs::create_dir_all(out)
            .map_err(|source| CaError::Write { path: out.into(), source })?;
        let files = TlsFiles::in_dir(out, name);
        for f in [&files.cert, &files.key] {
            if f.exists() {
                return Err(CaError::Exists(f.clone()));
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

fn write_public(path: &Path, text: &str) -> Result<(), CaError> {
    std::fs::write(path, text).map_err(|source| CaError::Write { path: path.into(), source })
}

/// A key file: created with mode 0600, never readable by others even for a moment.
fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| CaError::Write { path: path.into(), source })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| CaError::Write { path: path.into(), source })
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
        assert!(matches!(ClusterCa::init_dir(dir.path()), Err(CaError::Exists(_))));
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
            Err(CaError::Exists(_))
        ));
        assert!(reopened.issue_to_dir(&out, "../x", CertRole::Agent, &hosts()).is_err());
    }

    #[test]
    fn calendar_year() {
        let y = this_year();
        assert!((2024..2200).contains(&y), "{y}");
    }
}
