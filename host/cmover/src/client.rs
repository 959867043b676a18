//! The one HTTP client of the operator commands (`cmover publish`, `status`, `job` …): where the
//! manager is and how to authenticate to it, and what each failure means as an exit code.
//!
//! Settings come from, in this order of precedence: flags (`--manager`, `--token-file`, `--ca`,
//! `--cert`, `--key`), the environment (`CMOVER_MANAGER`, `CMOVER_TOKEN_FILE`, `CMOVER_CA`,
//! `CMOVER_CERT`, `CMOVER_KEY`), then a CLI config file (`$CMOVER_CONFIG`, else
//! `~/.config/cmover/cli.toml`, keys `manager`, `token_file`, `ca`, `cert`, `key`).
//!
//! Exit codes ([`Exit`]), the same for every operator command: 0 done, 1 failed (the manager
//! refused the request or the work failed), 2 usage (bad arguments, missing settings), 3 quorum
//! not met or partial (some servers did not succeed), 4 manager unreachable. Commands return
//! [`CliError`] inside their `anyhow::Error`; [`exit_code`] is the single place that maps it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cm_tree::http::{ClientError, JsonClient};
use cm_tree::tls::{Tls, TlsFiles};
use hyper::body::Incoming;
use hyper::{Method, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A process exit code of the operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Done = 0,
    Failed = 1,
    Usage = 2,
    /// The quorum was not met, or the job ended with some servers failed or missing.
    Partial = 3,
    Unreachable = 4,
}

/// What went wrong, typed by the exit code it leads to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or missing settings, found before anything was sent.
    #[error("{0}")]
    Usage(String),
    /// The manager could not be reached (connection refused, timeout, TLS handshake).
    #[error("manager at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    /// The manager answered with an error status.
    #[error("{}", refused_text(.status, .message, .field))]
    Refused { status: u16, message: String, field: Option<String> },
    /// The work ran and failed.
    #[error("{0}")]
    Failed(String),
    /// The quorum was not met, or only some servers succeeded.
    #[error("{0}")]
    Partial(String),
}

fn refused_text(status: &u16, message: &str, field: &Option<String>) -> String {
    match field {
        Some(f) => format!("the manager refused the request ({status}): {f}: {message}"),
        None => format!("the manager refused the request ({status}): {message}"),
    }
}

impl CliError {
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Unreachable { .. } => Exit::Unreachable,
            CliError::Refused { .. } | CliError::Failed(_) => Exit::Failed,
            CliError::Partial(_) => Exit::Partial,
        }
    }
}

/// The exit code for an error returned by a command: a [`CliError`] anywhere in its chain
/// decides; anything else is a failure (1).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain().find_map(|c| c.downcast_ref::<CliError>()).map_or(Exit::Failed, CliError::exit) as u8
}

/// How to reach the manager: flattened into every operator command.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnectArgs {
    /// The manager's URL, e.g. http://10.0.0.1:7700 [env: CMOVER_MANAGER; config: manager]
    #[arg(long, env = "CMOVER_MANAGER", global = true, hide_env = true)]
    pub manager: Option<String>,
    /// File holding the operator's bearer token [env: CMOVER_TOKEN_FILE; config: token_file]
    #[arg(long, env = "CMOVER_TOKEN_FILE", global = true, hide_env = true)]
    pub token_file: Option<PathBuf>,
    /// Mutual TLS: the cluster CA's certificate [env: CMOVER_CA; config: ca]
    #[arg(long, env = "CMOVER_CA", global = true, hide_env = true)]
    pub ca: Option<PathBuf>,
    /// Mutual TLS: the operator's certificate (`cmover cert issue --role operator`) [env: CMOVER_CERT]
    #[arg(long, env = "CMOVER_CERT", global = true, hide_env = true)]
    pub cert: Option<PathBuf>,
    /// Mutual TLS: the operator's private key [env: CMOVER_KEY; config: key]
    #[arg(long, env = "CMOVER_KEY", global = true, hide_env = true)]
    pub key: Option<PathBuf>,
    /// The CLI config file [env: CMOVER_CONFIG; default: ~/.config/cmover/cli.toml]
    #[arg(long, env = "CMOVER_CONFIG", global = true, hide_env = true)]
    pub config: Option<PathBuf>,
    /// Print the manager's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The CLI config file (TOML). Relative paths are taken from the file's directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    pub manager: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl CliConfig {
    /// The explicit file (which must exist), else `~/.config/cmover/cli.toml` if there is one.
    fn load(explicit: Option<&Path>) -> anyhow::Result<CliConfig> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => match default_config_path() {
                Some(p) => (p, false),
                None => return Ok(CliConfig::default()),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(CliConfig::default());
            }
            Err(e) => {
                return Err(CliError::Usage(format!(
                    "reading the CLI config {}: {e}",
                    path.display()
                ))
                .into());
            }
        };
        let mut c: CliConfig = toml::from_str(&text).map_err(|e| {
            CliError::Usage(format!("the CLI config {} is not valid: {e}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.token_file, &mut c.ca, &mut c.cert, &mut c.key].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }
}

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("cmover/cli.toml"))
}

/// The error body of the manager's API: `{"error": …, "field": …}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    field: Option<String>,
}

/// An operator's connection to the manager's API.
pub struct Client {
    base: String,
    http: JsonClient,
    pub json: bool,
}

impl Client {
    /// Resolves the settings (flags, environment, config file) and builds the client. Nothing
    /// is sent yet.
    pub fn connect(args: &ConnectArgs) -> anyhow::Result<Client> {
        let file = CliConfig::load(args.config.as_deref())?;
        let manager = args.manager.clone().or(file.manager).ok_or_else(|| {
            CliError::Usage(
                "no manager given: pass --manager URL, set CMOVER_MANAGER, or write \
                 `manager = \"URL\"` in ~/.config/cmover/cli.toml"
                    .into(),
            )
        })?;
        let manager = manager.trim_end_matches('/').to_string();
        if !(manager.starts_with("http://") || manager.starts_with("https://")) {
            return Err(CliError::Usage(format!(
                "manager URL `{manager}` must start with http:// or https://"
            ))
            .into());
        }
        let token_file = args.token_file.clone().or(file.token_file);
        let ca = args.ca.clone().or(file.ca);
        let cert = args.cert.clone().or(file.cert);
        let key = args.key.clone().or(file.key);
        let tls = match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => {
                let files = TlsFiles { ca, cert, key };
                Some(Tls::load(&files).context("loading the operator's TLS certificate")?)
            }
            (None, None, None) => None,
            _ => {
                return Err(CliError::Usage(
                    "mutual TLS needs all three of --ca, --cert and --key (or CMOVER_CA, \
                     CMOVER_CERT, CMOVER_KEY)"
                        .into(),
                )
                .into());
            }
        };
        let token = match &token_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| {
                    CliError::Usage(format!("reading the token file {}: {e}", f.display()))
                })?
                .trim()
                .to_string(),
            None if tls.is_some() => String::new(),
            None => {
                return Err(CliError::Usage(
                    "no operator credentials: pass --token-file FILE (or set CMOVER_TOKEN_FILE), \
                     or --ca/--cert/--key for mutual TLS"
                        .into(),
                )
                .into());
            }
        };
        if tls.is_some() != manager.starts_with("https://") {
            return Err(CliError::Usage(format!(
                "manager URL `{manager}`: use https:// with --ca/--cert/--key and http:// without"
            ))
            .into());
        }
        let http = JsonClient::with_tls(&token, Duration::from_secs(30), tls.as_ref());
        Ok(Client { base: manager, http, json: args.json })
    }

    /// The manager's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{}", self.base, path.trim_start_matches('/'))
    }

    /// `GET /api/v1/{path}`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// `POST /api/v1/{path}` with a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `PUT /api/v1/{path}` with a JSON body.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// `GET /api/v1/{path}` as a Server-Sent Events stream: the response body, read as it
    /// comes (`cmover run show --follow`). Only the answer's head is bound by the timeout.
    pub async fn stream(&self, path: &str) -> Result<Incoming, CliError> {
        let accept = [("accept", "text/event-stream".to_string())];
        let resp = self.http.send(Method::GET, &self.url(path), None, &accept).await;
        resp.map(Response::into_body).map_err(|e| self.typed(e))
    }

    /// Whether the manager answers at all (`GET /healthz`, no credentials needed).
    pub async fn health(&self) -> Result<(), CliError> {
        let url = format!("{}/healthz", self.base);
        self.http.get::<serde_json::Value>(&url).await.map(|_| ()).map_err(|e| self.typed(e))
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CliError> {
        self.http.call(method, &self.url(path), body).await.map_err(|e| self.typed(e))
    }

    /// The client's error, typed by what it means to an operator.
    fn typed(&self, e: ClientError) -> CliError {
        match e {
            ClientError::Transport { source, .. } => {
                CliError::Unreachable { url: self.base.clone(), detail: transport_detail(&source) }
            }
            ClientError::Timeout { after, .. } => CliError::Unreachable {
                url: self.base.clone(),
                detail: format!("no answer within {after:?}"),
            },
            ClientError::Status { status, body, .. } => {
                match serde_json::from_str::<ErrorBody>(&body) {
                    Ok(b) => CliError::Refused {
                        status: status.as_u16(),
                        message: b.error,
                        field: b.field,
                    },
                    Err(_) => {
                        CliError::Refused { status: status.as_u16(), message: body, field: None }
                    }
                }
            }
            other => CliError::Failed(other.to_string()),
        }
    }
}

/// The innermost cause of a transport error ("Connection refused (os error 111)"), which is
/// what an operator needs, rather than hyper's outer "client error (Connect)".
fn transport_detail(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        last = c.to_string();
        cur = c.source();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_its_documented_exit_code() {
        let cases = [
            (CliError::Usage("x".into()), 2),
            (CliError::Unreachable { url: "u".into(), detail: "d".into() }, 4),
            (CliError::Refused { status: 400, message: "m".into(), field: None }, 1),
            (CliError::Failed("x".into()), 1),
            (CliError::Partial("x".into()), 3),
        ];
        for (e, code) in cases {
            assert_eq!(exit_code(&anyhow::Error::new(e).context("while doing X")), code);
        }
        assert_eq!(exit_code(&anyhow::anyhow!("anything else")), 1);
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let dir = std::env::temp_dir().join(format!("cmover-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("t"), "tok\n").unwrap();
        std::fs::write(
            dir.join("cli.toml"),
            "manager = \"http://from-file:1\"\ntoken_file = \"t\"\n",
        )
        .unwrap();
        let args = ConnectArgs { config: Some(dir.join("cli.toml")), ..Default::default() };
        assert_eq!(Client::connect(&args).unwrap().base(), "http://from-file:1");
        let args = ConnectArgs {
            manager: Some("http://flag:2/".into()),
            config: Some(dir.join("cli.toml")),
            ..Default::default()
        };
        assert_eq!(Client::connect(&args).unwrap().base(), "http://flag:2");
        std::fs::write(dir.join("bad.toml"), "manger = 1\n").unwrap();
        let args = ConnectArgs { config: Some(dir.join("bad.toml")), ..Default::default() };
        let e = Client::connect(&args).err().unwrap();
        assert_eq!(exit_code(&e), 2, "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
