//! Running the `cmover` operator commands as a user would, with the manager's URL and token in
//! the environment, and reading their exit code, stdout and stderr.

#![allow(dead_code, reason = "each cli_* test uses part of this")]

use std::path::{Path, PathBuf};
use std::process::Command;

/// What one command did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// The stdout as JSON (panics with the whole output when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// The operator's environment: which manager, which token file.
pub struct Operator {
    pub manager: String,
    pub token_file: PathBuf,
    /// An empty config directory, so no config file of the machine's user is read.
    pub config_home: tempfile::TempDir,
}

impl Operator {
    pub fn new(manager: &str, token_file: &Path) -> Operator {
        Operator {
            manager: manager.into(),
            token_file: token_file.into(),
            config_home: tempfile::tempdir().unwrap(),
        }
    }

    /// Runs `cmover ARGS` with `CMOVER_MANAGER` and `CMOVER_TOKEN_FILE` set.
    pub fn run(&self, args: &[&str]) -> Out {
        self.run_with(
            args,
            &[
                ("CMOVER_MANAGER", &self.manager),
                ("CMOVER_TOKEN_FILE", &self.token_file.display().to_string()),
            ],
        )
    }

    /// Runs `cmover ARGS` with only `env` as the operator's settings.
    pub fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = Command::new(cm_tests::cmover_bin());
        cmd.args(args)
            .env_remove("CMOVER_MANAGER")
            .env_remove("CMOVER_TOKEN_FILE")
            .env_remove("CMOVER_CONFIG")
            .env("XDG_CONFIG_HOME", self.config_home.path())
            .env("RUST_BACKTRACE", "0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs and requires exit code `code`.
    pub fn expect(&self, code: i32, args: &[&str]) -> Out {
        let out = self.run(args);
        assert_eq!(out.code, code, "cmover {}: {out:#?}", args.join(" "));
        out
    }
}
