//! What the console's browser tests share: chromedriver (and the chromium it starts) as a
//! process group of its own, a headless browser session, screenshots as test artifacts under
//! `CARGO_TARGET_TMPDIR/console-screens/`, and waiting for a page's text (bounded).

#![allow(dead_code)] // each test binary uses its own part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// chromedriver (and the chromium it starts) in a process group of their own, killed on drop.
pub struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn found(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

pub async fn start_driver(log: &Path) -> anyhow::Result<Driver> {
    use std::os::unix::process::CommandExt;
    let port = cm_agent::launch::free_port()?;
    let out = std::fs::File::create(log)?;
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .context("starting chromedriver")?;
    let driver = Driver { child, port, _profile: tempfile::tempdir()? };
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > end {
            bail!("chromedriver did not listen on {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(driver)
}

pub async fn browser(d: &Driver) -> anyhow::Result<Client> {
    let profile = d._profile.path().display().to_string();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": found("chromium").context("chromium")?,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", format!("--user-data-dir={profile}")],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    Ok(ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", d.port))
        .await?)
}

/// Saves a screenshot as a test artifact and prints its path.
pub async fn shot(b: &Client, name: &str) -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screens");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, b.screenshot().await?)?;
    println!("screenshot: {}", path.display());
    Ok(())
}

pub async fn fill(b: &Client, css: &str, text: &str) -> anyhow::Result<()> {
    let e = b.find(Locator::Css(css)).await.with_context(|| css.to_string())?;
    e.clear().await?;
    e.send_keys(text).await?;
    Ok(())
}

pub async fn click(b: &Client, css: &str) -> anyhow::Result<()> {
    b.find(Locator::Css(css)).await.with_context(|| css.to_string())?.click().await?;
    Ok(())
}

/// Waits until the text of `css` satisfies `ok` (the page is not reloaded here).
pub async fn wait_text(
    b: &Client,
    css: &str,
    limit: Duration,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let end = Instant::now() + limit;
    loop {
        let text = match b.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if ok(&text) {
            return Ok(text);
        }
        if Instant::now() > end {
            bail!("{css}: still {text:?} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Logs in with the operator token (the login page must be showing or reachable).
pub async fn login(b: &Client, base: &str, token: &str) -> anyhow::Result<()> {
    b.goto(&format!("{base}/console/login")).await?;
    fill(b, "#token", token).await?;
    click(b, "button[type=submit]").await?;
    wait_text(b, "#live", Duration::from_secs(10), |t| !t.is_empty()).await?;
    Ok(())
}
