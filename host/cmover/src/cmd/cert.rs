//! `cmover cert`: the cluster's certificate authority for mutual TLS (cm-manager's `ca`; nodes
//! load what it issues with cm-tree's `tls`).
//!
//! ```text
//! cmover cert init  --dir ca/                                   # ca/ca.pem, ca/ca.key (0600)
//! cmover cert issue --ca ca/ --name manager --role manager --host 10.0.0.1
//! cmover cert issue --ca ca/ --name bes-7 --role agent --host 10.0.0.7 --out certs/bes-7
//! cmover cert issue --ca ca/ --name alice --role operator
//! cmover cert signing-key --dir keys/ --name manager-2026      # keys/manager-2026.pk8 (0600),
//!                                                              # keys/manager-2026.pub
//! ```
//!
//! The signing key signs every run (`cmover manager --signing-key`); agents pin the `.pub`
//! (`cmover agent --manager-key`, one key per line: to rotate, pin old and new, switch the
//! manager to the new key, then drop the old line; docs/manager.md).
//!
//! `issue` writes `<out>/<name>.pem` and `<out>/<name>.key` (owner only) and, when `<out>` has
//! none, a copy of `ca.pem`: everything one node needs. Keep `ca.key` off the servers.

use std::path::PathBuf;

use anyhow::Context;
use cm_manager::ca::ClusterCa;
use cm_tree::tls::CertRole;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create the cluster CA in a directory (ca.pem and ca.key).
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate for a manager, an agent or an operator, signed by the cluster CA.
    Issue {
        /// The CA directory (`cmover cert init --dir`).
        #[arg(long)]
        ca: PathBuf,
        /// The holder's name (an agent's server name, the manager, a person).
        #[arg(long)]
        name: String,
        /// manager, agent or operator: which API routes and endpoints it opens.
        #[arg(long, value_parser = parse_role)]
        role: CertRole,
        /// A host name or IP address the holder serves at (repeatable; default localhost and 127.0.0.1).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Where to write the files (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Generate the manager's Ed25519 signing key: `<dir>/<name>.pk8` (PKCS#8, owner only; for
    /// `cmover manager --signing-key`) and `<dir>/<name>.pub` (for the agents' --manager-key).
    SigningKey {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "manager-signing")]
        name: String,
    },
}

fn parse_role(s: &str) -> Result<CertRole, String> {
    CertRole::parse(s).ok_or_else(|| format!("`{s}` is not a role: manager, agent or operator"))
}

pub async fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Init { dir } => {
            ClusterCa::init_dir(&dir).context("creating the cluster CA")?;
            println!(
                "cluster CA created: {} (give it to every node), {} (keep it secret)",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display()
            );
        }
        Command::SigningKey { dir, name } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let (key, public) = (dir.join(format!("{name}.pk8")), dir.join(format!("{name}.pub")));
            let k = cm_assignment::SigningKey::generate_files(&key, &public)
                .context("generating the signing key")?;
            println!(
                "signing key {} (keep it on the manager only), public key {} (pin it on every agent); key id {}",
                key.display(),
                public.display(),
                k.public_key().to_hex().get(..16).unwrap_or_default()
            );
        }
        Command::Issue { ca, name, role, hosts, out } => {
            let authority = ClusterCa::open_dir(&ca)
                .with_context(|| format!("opening the cluster CA in {}", ca.display()))?;
            let hosts = if hosts.is_empty() {
                vec!["localhost".to_string(), "127.0.0.1".to_string()]
            } else {
                hosts
            };
            let out = out.unwrap_or(ca);
            let files = authority
                .issue_to_dir(&out, &name, role, &hosts)
                .with_context(|| format!("issuing a certificate for {name}"))?;
            println!(
                "{} certificate for {name} (valid at {}): {} and {}; CA certificate {}",
                role.name(),
                hosts.join(", "),
                files.cert.display(),
                files.key.display(),
                files.ca.display()
            );
        }
    }
    Ok(())
}
