//! The console's checkpoints and plugins pages in a real browser (Debian's `chromium` through
//! `chromedriver`, as `console_browser.rs`) against a live loopback cluster of real processes:
//! the operator creates a checkpoint from the page, a change is published, the checkpoint is
//! restored from the page and every server serves the checkpoint's content again; a kept
//! release is made live with the page's switch button; a refused form says on the page what was
//! wrong; a checkpoint is deleted; the plugins page lists every server with the interpreter
//! version its agent reports, and marks the one server whose plugin was hot-swapped as
//! differing from the majority (updated in place by the event stream). Screenshots go to `CARGO_TARGET_TMPDIR/console-screens/`.

mod console_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cm_manager::model::{Job, JobState, ServerRecord};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::{missing_part, observe};
use console_common::{browser, click, fill, found, login, shot, start_driver, wait_text};
use fantoccini::{Client, Locator};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_and_plugins_from_a_browser() -> anyhow::Result<()> {
    if found("chromium").is_none() || found("chromedriver").is_none() {
        missing_part("chromium or chromedriver not installed (Debian: chromium chromium-driver)");
        return Ok(());
    }
    let site = tempfile::tempdir()?;
    std::fs::write(site.path().join("index.html"), "checkpointed content")?;
    std::fs::write(site.path().join("about.html"), "about us")?;
    let c = TestCluster::start(&Layout::new(63, 2, 2), site.path()).await?;
    let logs = tempfile::tempdir()?;
    let driver = start_driver(&logs.path().join("chromedriver.log")).await?;
    let b = browser(&driver).await?;
    let result = drive(&b, &c).await;
    if result.is_err() {
        let _ = shot(&b, "versions-failure").await;
    }
    b.close().await?;
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", c.logs()))
}

/// Waits until every server's live tree is `want`.
async fn served_everywhere(
    c: &TestCluster,
    want: &BTreeMap<String, String>,
    what: &str,
) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let behind: Vec<&str> = c
            .agents
            .iter()
            .filter(|a| &observe(&a.site_root.join("current")) != want)
            .map(|a| a.spec.name.as_str())
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{what}: {behind:?} do not serve it after 90 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The newest job of the site whose name starts with `prefix`, once it has ended `Done`.
async fn job_done(c: &TestCluster, prefix: &str) -> anyhow::Result<Job> {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await?;
        if let Some(j) = jobs.iter().rev().find(|j| j.spec.name.starts_with(prefix)) {
            match &j.state {
                JobState::Done => return Ok(j.clone()),
                JobState::Cancelled { reason } => bail!("job {} cancelled: {reason}", j.spec.name),
                _ => {}
            }
        }
        if Instant::now() > end {
            bail!("no job `{prefix}…` done after 90 s: {jobs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn live_release(sites: &[Value]) -> anyhow::Result<u64> {
    let www = sites.iter().find(|s| s["name"] == "www").context("site www")?;
    www["committed"].as_array().and_then(|c| c.last()).and_then(Value::as_u64).context("live")
}

async fn drive(b: &Client, c: &TestCluster) -> anyhow::Result<()> {
    let base = &c.manager.url;
    c.publish_committed_everywhere().await?;
    let first = observe(&c.staging);
    login(b, base, &c.manager.operator_token).await?;

    // A checkpoint of what is live, with a note, from the page.
    b.goto(&format!("{base}/console/checkpoints")).await?;
    wait_text(b, "#live", Duration::from_secs(10), |t| t == "live").await?;
    fill(b, "#note-www", "before the redesign").await?;
    click(b, "#site-www form.create button").await?;
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("created")).await?;
    // The checkpoint job writes the archive; the page updates in place when it is recorded.
    let row = wait_text(b, "#checkpoint-www-1", Duration::from_secs(60), |t| {
        t.contains("before the redesign")
    })
    .await?;
    println!("checkpoint row: {row}");
    shot(b, "11-checkpoint-created").await?;

    // A change is published and goes live everywhere.
    std::fs::write(c.staging.join("index.html"), "the redesign")?;
    std::fs::remove_file(c.staging.join("about.html"))?;
    std::fs::write(c.staging.join("new.html"), "new page")?;
    c.publish_committed_everywhere().await?;
    let second = observe(&c.staging);
    served_everywhere(c, &second, "the redesign").await?;
    let redesign = live_release(&c.op.get::<Vec<Value>>(&c.url("sites")).await?)?;

    // Restore the checkpoint from the page: every server serves its content again.
    b.goto(&format!("{base}/console/checkpoints")).await?;
    click(b, "#checkpoint-www-1 form[action$='/restore'] button").await?;
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("restore checkpoint 1")).await?;
    job_done(c, "restore checkpoint 1").await?;
    served_everywhere(c, &first, "the restored checkpoint").await?;
    let restored = live_release(&c.op.get::<Vec<Value>>(&c.url("sites")).await?)?;
    assert!(restored > redesign, "the restore is a new release ({restored} after {redesign})");
    b.goto(&format!("{base}/console/checkpoints")).await?;
    let row = b.find(Locator::Css(&format!("#release-www-{restored}"))).await?.text().await?;
    assert!(row.contains("live"), "{row}");
    let snap = b.find(Locator::Css(&format!("#snapshot-www-{restored}"))).await?;
    let cells: Vec<String> = {
        let mut v = Vec::new();
        for td in snap.find_all(Locator::Css("td")).await? {
            v.push(td.text().await?);
        }
        v
    };
    assert_eq!(cells, [restored.to_string(), "live".into(), "1".into()], "follows checkpoint 1");
    shot(b, "12-restored").await?;

    // Switch to the kept release of the redesign from the page.
    click(b, &format!("#release-www-{redesign} form[action$='/switch'] button")).await?;
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("switch www to release")).await?;
    job_done(c, "switch www to release").await?;
    served_everywhere(c, &second, "the release switched to").await?;
    let live = live_release(&c.op.get::<Vec<Value>>(&c.url("sites")).await?)?;
    assert_eq!(live, redesign, "the switched-to release is live");
    b.goto(&format!("{base}/console/checkpoints")).await?;
    wait_text(b, &format!("#release-www-{redesign}"), Duration::from_secs(10), |t| {
        t.contains("live")
    })
    .await?;
    shot(b, "13-switched").await?;

    // A refused form says on the page what was wrong (a control character in the note).
    b.execute("document.getElementById('note-www').value = 'bad\\u0007note'; return true;", vec![])
        .await?;
    click(b, "#site-www form.create button").await?;
    let said =
        wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("Nothing was changed"))
            .await?;
    assert!(said.contains("note") && said.contains("control characters"), "{said}");

    // Delete the checkpoint from the page.
    click(b, "#checkpoint-www-1 form[action$='/delete'] button").await?;
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("Checkpoint 1 of site www"))
        .await?;
    assert!(b.find_all(Locator::Css("#checkpoint-www-1")).await?.is_empty(), "still listed");
    let cps: Vec<Value> = c.op.get(&c.url("sites/www/checkpoints")).await?;
    assert!(cps.is_empty(), "{cps:?}");
    shot(b, "14-deleted").await?;

    // The plugins page: every server with the interpreter version its agent reports.
    let mut versions = BTreeMap::new();
    for a in &c.agents {
        let v = a.status()?["interpreter"].as_str().context("interpreter version")?.to_string();
        versions.insert(a.spec.name.clone(), v);
    }
    b.goto(&format!("{base}/console/plugins")).await?;
    for (name, v) in &versions {
        wait_text(b, &format!("#plugin-{name} .version"), Duration::from_secs(30), |t| t == v)
            .await?;
    }
    let summary = b.find(Locator::Css("#plugin-summary")).await?.text().await?;
    assert!(summary.contains("Every server runs it"), "{summary}");
    shot(b, "15-plugins").await?;
    let servers: Vec<ServerRecord> = c.op.get(&c.url("servers")).await?;
    for s in &servers {
        let p = s.plugin.as_ref().with_context(|| format!("{} reported no plugin", s.name))?;
        assert_eq!((p.name.as_str(), &p.version), ("interpreter", &versions[&s.name]));
        assert!(p.blake3.starts_with(&p.version));
    }

    // A hot swap on one server: the page marks it as differing from the majority.
    let swapped = &c.agents[0];
    c.install_interpreter(0, "test-swap-v2.wasm")?;
    let row = format!("#plugin-{}", swapped.spec.name);
    let marked = wait_text(b, &row, Duration::from_secs(30), |t| t.contains("differs")).await?;
    assert!(!marked.contains(&versions[&swapped.spec.name]), "a new version: {marked}");
    let summary = b.find(Locator::Css("#plugin-summary")).await?.text().await?;
    assert!(summary.contains(&format!("1 differ: {}", swapped.spec.name)), "{summary}");
    for a in &c.agents[1..] {
        let t = b.find(Locator::Css(&format!("#plugin-{}", a.spec.name))).await?.text().await?;
        assert!(!t.contains("differs"), "{t}");
    }
    shot(b, "16-plugins-one-differs").await?;
    Ok(())
}
