//! Hot content, with real processes: a `hot` job puts named staging files on N servers the
//! manager picks (live at once, on top of the live release); the other servers are untouched;
//! the manager records the holders and does not "catch them up" back; the next publish, commit
//! and rollback work on every server as if there had been no overlay. Bad paths are refused
//! by the API before anything is built.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use cm_manager::model::{Job, JobKind, JobSpec, JobState, Payload};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use cm_tests::observe;
use serde_json::Value;

async fn run_to_done(c: &TestCluster, kind: JobKind, payload: Payload) -> Job {
    let job = c.submit_with(kind, payload, auto_commit_policy()).await.unwrap();
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let j: Job = c.op.get(&c.url(&format!("jobs/{}", job.id))).await.unwrap();
        match j.state {
            JobState::Done => return j,
            JobState::Cancelled { .. } => panic!("job {}: {j:?}\n{}", job.id, c.logs()),
            _ => {}
        }
        assert!(Instant::now() < end, "job {}: {j:?}\n{}", job.id, c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read(root: &Path, p: &str) -> Option<String> {
    fs::read_to_string(root.join("current").join(p)).ok()
}

fn hot(paths: &[&str], count: u32) -> Payload {
    Payload::Hot {
        paths: paths.iter().map(|p| p.to_string()).collect(),
        servers: vec![],
        count: Some(count),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_content_reaches_only_the_chosen_servers_and_the_next_publish_and_rollback_still_work()
{
    let src = tempfile::tempdir().unwrap();
    let st = src.path();
    fs::create_dir_all(st.join("flash")).unwrap();
    fs::write(st.join("index.html"), "<h1>one</h1>").unwrap();
    fs::write(st.join("flash/sale.html"), "sale: soon").unwrap();
    let c = TestCluster::start(&Layout::new(221, 1, 3), st).await.unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let v1 = observe(&c.staging);

    // Staging moves on: the sale page and a new page are hot, the index change is not.
    fs::write(c.staging.join("index.html"), "<h1>two</h1>").unwrap();
    fs::write(c.staging.join("flash/sale.html"), "sale: NOW").unwrap();
    fs::write(c.staging.join("flash/extra.html"), "extra").unwrap();

    // Refused before anything is built: outside the site, not in staging.
    for bad in ["../etc/passwd", "flash/missing.html", "flash"] {
        let spec = JobSpec {
            name: "hot".into(),
            kind: JobKind::Hot,
            site: "www".into(),
            payload: hot(&[bad], 1),
            start_at_ms: 0,
            every_ms: None,
            policy: auto_commit_policy(),
        };
        let e = c.op.post::<_, Value>(&c.url("jobs"), &spec).await.unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("payload.paths"), "{bad}: {e}");
    }

    let job = run_to_done(&c, JobKind::Hot, hot(&["flash/sale.html", "flash/extra.html"], 1)).await;
    let Payload::Hot { servers, .. } = &job.spec.payload else { panic!("{job:?}") };
    assert_eq!(servers.len(), 1, "the manager picked one server: {job:?}");
    let chosen = servers[0].clone();
    for a in &c.agents {
        let root = &a.site_root;
        if a.spec.name == chosen {
            assert_eq!(read(root, "flash/sale.html").as_deref(), Some("sale: NOW"));
            assert_eq!(read(root, "flash/extra.html").as_deref(), Some("extra"));
            assert_eq!(
                read(root, "index.html").as_deref(),
                Some("<h1>one</h1>"),
                "only the named files"
            );
        } else {
            assert_eq!(observe(&root.join("current")), v1, "{} untouched", a.spec.name);
        }
    }
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    let live = site["committed"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(site["holders"][&chosen], live, "a hot server still holds live: {site}");
    assert_eq!(site["hot"][&chosen]["base"], live, "{site}");
    assert_eq!(
        site["hot"][&chosen]["paths"],
        serde_json::json!(["flash/extra.html", "flash/sale.html"]),
        "{site}"
    );

    // The next publish builds on live everywhere (the overlay's base on the hot server) and
    // its commit replaces the overlay.
    run_to_done(&c, JobKind::Publish, Payload::Staging).await;
    let v2 = observe(&c.staging);
    for a in &c.agents {
        assert_eq!(observe(&a.site_root.join("current")), v2, "{}", a.spec.name);
    }
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert!(site.get("hot").is_none(), "the overlay ended with the commit: {site}");

    // A rollback returns every server to release one, the hot one included.
    run_to_done(&c, JobKind::Rollback, Payload::Rollback { to: None }).await;
    for a in &c.agents {
        assert_eq!(observe(&a.site_root.join("current")), v1, "{}", a.spec.name);
    }
    let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
    let kinds: Vec<JobKind> = jobs.iter().map(|j| j.spec.kind).collect();
    assert_eq!(
        kinds,
        vec![JobKind::Publish, JobKind::Hot, JobKind::Publish, JobKind::Rollback],
        "no job the manager made by itself: the hot server was never caught up"
    );
}
