//! The console in a real browser: Debian's `chromium`, headless, driven through `chromedriver`
//! (WebDriver, fantoccini) against a live loopback cluster of real processes. A wrong token
//! shows the login page and no data; the operator logs in, creates a content group, a site and a
//! publish job from the pages, watches the run reach every server on an overview that the event
//! stream updates (the page is not reloaded), publishes again and rolls back from the sites
//! page; a name with markup renders as text; logout ends the session. Screenshots go to
//! `CARGO_TARGET_TMPDIR/console-screens/` (their paths are printed).

mod console_common;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::missing_part;
use console_common::{browser, click, fill, found, shot, start_driver, wait_text};
use fantoccini::{Client, Locator};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn operate_the_cluster_from_a_browser() -> anyhow::Result<()> {
    if found("chromium").is_none() || found("chromedriver").is_none() {
        missing_part("chromium or chromedriver not installed (Debian: chromium chromium-driver)");
        return Ok(());
    }
    let site = tempfile::tempdir()?;
    std::fs::write(site.path().join("index.html"), "version one")?;
    let mut layout = Layout::new(61, 2, 2);
    // The servers host site `docs`, which the operator creates from the console.
    layout.tweak = Some(Box::new(|_, spec| spec.site_name = "docs".into()));
    let c = TestCluster::start(&layout, site.path()).await?;
    let logs = tempfile::tempdir()?;
    let driver = start_driver(&logs.path().join("chromedriver.log")).await?;
    let b = browser(&driver).await?;
    let result = drive(&b, &c).await;
    if result.is_err() {
        let _ = shot(&b, "failure").await;
    }
    b.close().await?;
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", c.logs()))
}

async fn drive(b: &Client, c: &TestCluster) -> anyhow::Result<()> {
    let base = &c.manager.url;
    let servers: Vec<String> = c.agents.iter().map(|a| a.spec.name.clone()).collect();

    // No session: every page leads to the login form; a wrong token stays there, showing nothing.
    b.goto(&format!("{base}/console/jobs")).await?;
    assert!(b.current_url().await?.path().ends_with("/console/login"));
    fill(b, "#token", "not-the-token").await?;
    click(b, "button[type=submit]").await?;
    // A wrong token is answered after a second: wait for the answer, not the form still shown.
    wait_text(b, "body", Duration::from_secs(15), |t| t.contains("That is not the operator token"))
        .await?;
    let page = b.source().await?;
    for secret in servers.iter().chain([&"seg0".to_string(), &"Runs in flight".to_string()]) {
        assert!(!page.contains(secret.as_str()), "the login page shows {secret}");
    }
    shot(b, "01-wrong-token").await?;

    fill(b, "#token", &c.manager.operator_token).await?;
    click(b, "button[type=submit]").await?;
    wait_text(b, "#servers", Duration::from_secs(10), |t| servers.iter().all(|s| t.contains(s)))
        .await?;
    shot(b, "02-overview").await?;

    // A content group of every server, and the site.
    b.goto(&format!("{base}/console/sites")).await?;
    fill(b, "#group-name", "everyone").await?;
    fill(b, "#group-servers", &servers.join(" ")).await?;
    click(b, "#group-form button").await?;
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("content group everyone set"))
        .await?;
    fill(b, "#site-name", "docs").await?;
    b.find(Locator::Css("#site-group")).await?.select_by_value("everyone").await?;
    fill(b, "#site-staging", &c.staging.display().to_string()).await?;
    click(b, "#site-form button").await?;
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("site docs set")).await?;

    // Markup in a name is text.
    fill(b, "#group-name", "<img src=x onerror=alert(1)>").await?;
    fill(b, "#group-servers", "x").await?;
    click(b, "#group-form button").await?;
    wait_text(b, "#groups", Duration::from_secs(5), |t| t.contains("<img src=x onerror=alert(1)>"))
        .await?;
    assert!(b.find_all(Locator::Css("img")).await?.is_empty(), "the name became an element");
    shot(b, "03-sites").await?;

    // A publish job from the jobs page, starting in two seconds.
    b.goto(&format!("{base}/console/jobs")).await?;
    fill(b, "#job-name", "first publish").await?;
    b.find(Locator::Css("#job-site")).await?.select_by_value("docs").await?;
    b.find(Locator::Css("#job-what")).await?.select_by_value("publish").await?;
    fill(b, "#job-start", "2").await?;
    click(b, "#job-form button").await?;
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("created")).await?;
    shot(b, "04-jobs").await?;

    // The overview, loaded once: the event stream moves it until every server holds release 1.
    b.goto(&format!("{base}/console/")).await?;
    b.execute("window.notReloaded = true; return true;", vec![]).await?;
    wait_text(b, "#live", Duration::from_secs(10), |t| t == "live").await?;
    let mut saw_in_flight = false;
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let inflight = b.find(Locator::Css("#inflight")).await?.text().await?;
        saw_in_flight |= inflight.contains("distributing");
        let table = b.find(Locator::Css("#servers")).await?.text().await?;
        if servers
            .iter()
            .all(|s| table.lines().any(|l| l.contains(s.as_str()) && l.contains("docs: 1")))
        {
            break;
        }
        if Instant::now() > end {
            bail!("not every server shows docs: 1 —\n{table}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A loopback run may distribute faster than one refresh; it is shown when it lasts longer.
    println!("run in flight seen on the overview while distributing: {saw_in_flight}");
    let same_page = b.execute("return window.notReloaded === true;", vec![]).await?;
    assert_eq!(same_page, Value::Bool(true), "the overview was updated in place, not reloaded");
    shot(b, "05-overview-after-publish").await?;
    b.goto(&format!("{base}/console/runs/1")).await?;
    wait_text(b, "#run", Duration::from_secs(5), |t| t.contains("succeeded")).await?;
    shot(b, "06-run").await?;

    // A second release, then back to the first from the sites page.
    std::fs::write(c.staging.join("index.html"), "version two")?;
    b.goto(&format!("{base}/console/sites")).await?;
    click(b, "#site-docs form[action$='/publish'] button").await?;
    // The form's answer navigates to the jobs page: wait for it before leaving, or it lands
    // after the next page was asked for.
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("created")).await?;
    b.goto(&format!("{base}/console/sites")).await?;
    // Serials count every assignment (the commit took one): the second release is not 2.
    // (A live section being replaced reads empty for a moment: wait for a number.)
    let second = wait_text(b, "#site-docs .live-release", Duration::from_secs(90), |t| {
        t.parse::<u64>().is_ok_and(|serial| serial > 1)
    })
    .await?;
    println!("second release live: {second}");
    click(b, "#site-docs form[action$='/rollback'] button").await?;
    wait_text(b, "#flash", Duration::from_secs(5), |t| t.contains("created")).await?;
    b.goto(&format!("{base}/console/sites")).await?;
    wait_text(b, "#site-docs .live-release", Duration::from_secs(90), |t| t == "1").await?;
    shot(b, "07-rolled-back").await?;
    let sites: Vec<Value> = c.op.get(&c.url("sites")).await?;
    let docs = sites.iter().find(|s| s["name"] == "docs").context("site docs")?;
    assert_eq!(docs["committed"], json!([1]));
    for s in &servers {
        assert_eq!(docs["holders"][s], 1, "{s} went back to release 1");
    }

    // Logging out ends the session.
    click(b, "header form button").await?;
    b.goto(&format!("{base}/console/")).await?;
    assert!(b.current_url().await?.path().ends_with("/console/login"));
    Ok(())
}
