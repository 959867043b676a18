//! Several hosted sites on the same servers, end to end with a real manager and real agents:
//! every agent serves `www` and `shop` (two `[[site]]` entries: different roots and different
//! interpreter plugins).
//!
//! - Both sites are published and committed with their runs in flight at the same time (the
//!   scheduler starts both: different sites never conflict); each root then holds only its own
//!   site's content and releases, and each site's serials are its own (both start at 1).
//! - A rollback of `www` leaves `shop`'s live tree and releases untouched.
//! - An assignment for a site the agents do not serve (`blog`) is refused by every one of them
//!   and reported: the run fails naming the reason, and no root gets anything.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use cm_agent::launch::ExtraSite;
use cm_manager::model::{Job, JobKind, JobState, Payload, ServerOutcome};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use site_common::{noise, observe};

mod site_common;

fn releases(root: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(root.join("releases"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

async fn job(c: &TestCluster, id: u64) -> Job {
    c.op.get(&c.url(&format!("jobs/{id}"))).await.unwrap()
}

/// Waits until jobs `a` and `b` are both running at one moment (bounded); panics if either
/// ends first.
async fn both_running(c: &TestCluster, a: u64, b: u64) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let (ja, jb) = (job(c, a).await, job(c, b).await);
        let running = |j: &Job| matches!(j.state, JobState::Running { .. });
        if running(&ja) && running(&jb) {
            return;
        }
        let over = |j: &Job| matches!(j.state, JobState::Done | JobState::Cancelled { .. });
        assert!(
            !over(&ja) && !over(&jb) && Instant::now() < end,
            "the two sites' jobs never ran at the same time: {:?} / {:?}\n{}",
            ja.state,
            jb.state,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn done(c: &TestCluster, id: u64, what: &str) {
    let (j, reports) = c.finish(id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(j.state, JobState::Done, "{what}: {:?}\n{}", j.last_reason, c.logs());
    assert_eq!(reports.len(), c.agents.len(), "{what}: {reports:?}");
    assert!(reports.iter().all(|(_, o)| *o == ServerOutcome::Succeeded), "{what}: {reports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_on_the_same_servers_stay_apart() {
    let www_src = tempfile::tempdir().unwrap();
    fs::write(www_src.path().join("index.html"), "www one").unwrap();
    // Incompressible, so the two distributions take a while (the GLs' rate is capped).
    fs::write(www_src.path().join("big.bin"), noise(400_000, 1)).unwrap();
    let mut layout = Layout::new(90, 1, 3);
    // Slow enough that the two runs are in flight together, fast enough for a test.
    layout.max_rate_mbps = Some(4);
    layout.tweak = Some(Box::new(|_, spec| {
        spec.more_sites =
            vec![ExtraSite { name: "shop".into(), plugin: "shop-interpreter".into() }];
    }));
    let c = TestCluster::start(&layout, www_src.path()).await.unwrap();
    let shop_staging = c.dir.path().join("shop-staging");
    fs::create_dir_all(shop_staging.join("cart")).unwrap();
    fs::write(shop_staging.join("cart/index.html"), "shop one").unwrap();
    fs::write(shop_staging.join("catalogue.bin"), noise(400_000, 2)).unwrap();
    c.put_site_named("shop", &shop_staging).await.unwrap();

    // Both sites at once: neither waits for the other.
    let www = c.submit_for("www", JobKind::Publish, Payload::Staging, auto_commit_policy());
    let shop = c.submit_for("shop", JobKind::Publish, Payload::Staging, auto_commit_policy());
    let (www, shop) = (www.await.unwrap(), shop.await.unwrap());
    both_running(&c, www.id, shop.id).await;
    done(&c, www.id, "www publish").await;
    done(&c, shop.id, "shop publish").await;

    let (www_v1, shop_v1) = (observe(&c.staging), observe(&shop_staging));
    for a in &c.agents {
        let (www_root, shop_root) = (a.root_of("www").unwrap(), a.root_of("shop").unwrap());
        assert_eq!(observe(&www_root.join("current")), www_v1, "{}: www", a.spec.name);
        assert_eq!(observe(&shop_root.join("current")), shop_v1, "{}: shop", a.spec.name);
        // Serials are per site: each site's first release is 1, in its own root.
        assert_eq!(releases(www_root), [1], "{}: www releases", a.spec.name);
        assert_eq!(releases(shop_root), [1], "{}: shop releases", a.spec.name);
        // The agent reports both sites, each with its own plugin and live release.
        let st = a.status().unwrap();
        let sites: BTreeMap<&str, (&str, u64)> = st["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let name = s["name"].as_str().unwrap();
                (name, (s["plugin"].as_str().unwrap(), s["live"].as_u64().unwrap()))
            })
            .collect();
        assert_eq!(
            sites,
            BTreeMap::from([("www", ("interpreter", 1)), ("shop", ("shop-interpreter", 1))]),
            "{st}"
        );
    }

    // A second www release, then its rollback: shop's live tree and releases never move.
    fs::write(c.staging.join("index.html"), "www two").unwrap();
    let j = c.submit_for("www", JobKind::Publish, Payload::Staging, auto_commit_policy());
    done(&c, j.await.unwrap().id, "www publish two").await;
    let shop_link: Vec<_> = c
        .agents
        .iter()
        .map(|a| fs::read_link(a.root_of("shop").unwrap().join("current")).unwrap())
        .collect();
    let j = c.submit_for(
        "www",
        JobKind::Rollback,
        Payload::Rollback { to: None },
        auto_commit_policy(),
    );
    done(&c, j.await.unwrap().id, "www rollback").await;
    for (a, link) in c.agents.iter().zip(&shop_link) {
        let (www_root, shop_root) = (a.root_of("www").unwrap(), a.root_of("shop").unwrap());
        assert_eq!(observe(&www_root.join("current")), www_v1, "{}: www rolled back", a.spec.name);
        assert_eq!(&fs::read_link(shop_root.join("current")).unwrap(), link, "{}", a.spec.name);
        assert_eq!(observe(&shop_root.join("current")), shop_v1, "{}: shop untouched", a.spec.name);
        assert_eq!(releases(shop_root), [1], "{}: shop releases untouched", a.spec.name);
    }

    // A site these servers do not serve: every agent refuses it and says why; no root changes.
    let blog_staging = c.dir.path().join("blog-staging");
    fs::create_dir_all(&blog_staging).unwrap();
    fs::write(blog_staging.join("post.html"), "blog").unwrap();
    c.put_site_named("blog", &blog_staging).await.unwrap();
    let before: Vec<_> = c
        .agents
        .iter()
        .map(|a| (observe(a.root_of("www").unwrap()), observe(a.root_of("shop").unwrap())))
        .collect();
    let j = c.submit_for("blog", JobKind::Publish, Payload::Staging, auto_commit_policy());
    let (j, reports) = c.finish(j.await.unwrap().id, Duration::from_secs(60)).await.unwrap();
    assert_ne!(j.state, JobState::Done, "a run no server applied");
    assert_eq!(reports.len(), c.agents.len(), "{reports:?}");
    for (server, outcome) in &reports {
        match outcome {
            ServerOutcome::Failed { reason } => assert!(
                reason.contains("for site blog, which this server does not serve"),
                "{server}: {reason}"
            ),
            other => panic!("{server}: {other:?}\n{}", c.logs()),
        }
    }
    for (a, (www_before, shop_before)) in c.agents.iter().zip(before) {
        assert_eq!(observe(a.root_of("www").unwrap()), www_before, "{}", a.spec.name);
        assert_eq!(observe(a.root_of("shop").unwrap()), shop_before, "{}", a.spec.name);
        assert!(!a.dir.join("sites/blog").exists());
        let st = a.status().unwrap();
        let refused = st["applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["site"] == "blog" && r["ok"] == false);
        assert!(refused, "{}: the refusal is in its status: {st}", a.spec.name);
    }
}
