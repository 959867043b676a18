//! A throwaway PostgreSQL cluster for a test: `initdb` into a temporary directory and `pg_ctl`
//! start on a free loopback port, stopped (immediately) and deleted when dropped. Debian's
//! `postgresql` package puts the binaries under `/usr/lib/postgresql/<version>/bin`.
//!
//! PostgreSQL refuses to run as root; a test running as root (CI) runs the cluster as `nobody`
//! through `runuser`, in directories handed to that user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The newest installed PostgreSQL's binary directory.
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    /// The cluster's one role (a superuser; the cluster trusts loopback).
    pub user: String,
    as_nobody: bool,
    _dir: tempfile::TempDir,
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

impl PgCluster {
    /// Starts a cluster, or `None` (after [`crate::missing_part`]) when PostgreSQL is not
    /// installed: a skip on a bare machine, a failure under `CI=true`.
    pub fn start() -> anyhow::Result<Option<PgCluster>> {
        let Some(bin) = bin_dir() else {
            crate::missing_part("PostgreSQL (Debian's postgresql package) is not installed");
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let as_nobody = is_root();
        let (data, sock) = (dir.path().join("data"), dir.path().join("sock"));
        std::fs::create_dir(&sock)?;
        if as_nobody {
            // nobody must reach the directories: the temp dir is root's 0700.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
            std::fs::create_dir(&data)?;
            let nobody = user_ids("nobody")?;
            for d in [&data, &sock] {
                std::os::unix::fs::chown(d, Some(nobody.0), Some(nobody.1))?;
            }
        }
        let port = cm_agent::launch::free_port()?;
        let c = PgCluster { bin, data, port, user: "cm".into(), as_nobody, _dir: dir };
        let data = c.data.display().to_string();
        c.run("initdb", &["-D", &data, "-U", "cm", "--auth=trust", "-E", "UTF8", "--no-sync"])?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            sock.display()
        );
        let log = c.data.join("server.log").display().to_string();
        if let Err(e) =
            c.run("pg_ctl", &["-D", &data, "-o", &opts, "-l", &log, "-w", "-t", "60", "start"])
        {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{e:#}\nserver log:\n{log}");
        }
        Ok(Some(c))
    }

    /// Runs one of the cluster's binaries (as `nobody` under root), failing with its output.
    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir("/")
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} {}: {}\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new empty database; returns its connection URL.
    pub fn create_db(&self, name: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        self.run("createdb", &["-h", "127.0.0.1", "-p", &port, "-U", &self.user, name])?;
        Ok(self.url(name))
    }

    /// The connection URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{}@127.0.0.1:{}/{name}", self.user, self.port)
    }

    /// Runs SQL through `psql` on database `name`, returning its unaligned output.
    pub fn psql(&self, name: &str, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let args = ["-h", "127.0.0.1", "-p", &port, "-U", &self.user, "-d", name, "-Atqc", sql];
        self.run("psql", &args)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

/// A user's uid and gid, from `id`.
fn user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        anyhow::ensure!(out.status.success(), "no user {user} on this machine");
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}
