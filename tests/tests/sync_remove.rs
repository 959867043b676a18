//! Remove, with real processes: a `remove` job takes a site's content off one server (then off
//! the whole group) by a signed header-only assignment. The server removes its releases, live
//! link and history inside its site root and nothing else: links planted in the root that point
//! outside it leave what they point to intact. The manager drops the server as a holder and
//! does not bring it back on its own when it rejoins; a synchronize job naming it does. The API
//! refuses a remove naming a server outside the content group.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use cm_manager::model::{Job, JobKind, JobSpec, JobState, Payload};
use cm_tests::cluster::{Layout, TestCluster, auto_commit_policy};
use cm_tests::observe;
use serde_json::{Value, json};

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

fn emptied(root: &Path) -> bool {
    fs::symlink_metadata(root.join("current")).is_err()
        && fs::read_dir(root.join("releases")).is_ok_and(|mut d| d.next().is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_takes_the_site_off_chosen_servers_only_inside_their_site_roots() {
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("css")).unwrap();
    fs::write(src.path().join("index.html"), "<h1>to be removed</h1>").unwrap();
    fs::write(src.path().join("css/site.css"), "body{}").unwrap();
    let mut c = TestCluster::start(&Layout::new(178, 1, 3), src.path()).await.unwrap();
    c.publish_committed_everywhere().await.unwrap();
    let want = observe(&c.staging);
    let leader = c.leader_of("seg0").expect("a GL");
    let x = (0..3).find(|i| *i != leader).unwrap();
    let name = c.agents[x].spec.name.clone();

    // Refused up front: a server outside the group.
    let spec = JobSpec {
        name: "remove".into(),
        kind: JobKind::Remove,
        site: "www".into(),
        payload: Payload::Remove { servers: vec!["not-in-the-group".into()] },
        start_at_ms: 0,
        every_ms: None,
        policy: auto_commit_policy(),
    };
    let e = c.op.post::<_, Value>(&c.url("jobs"), &spec).await.unwrap_err().to_string();
    assert!(e.contains("400") && e.contains("not in content group"), "{e}");

    // Links out of the site root, planted where the removal walks.
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir(outside.path().join("dir")).unwrap();
    fs::write(outside.path().join("precious.txt"), "keep me").unwrap();
    fs::write(outside.path().join("dir/deep.txt"), "keep me too").unwrap();
    let root = c.agents[x].site_root.clone();
    let live_dir = fs::read_link(root.join("current")).unwrap();
    let live_dir = if live_dir.is_absolute() { live_dir } else { root.join(live_dir) };
    std::os::unix::fs::symlink(outside.path(), root.join("releases/planted")).unwrap();
    std::os::unix::fs::symlink(outside.path(), live_dir.join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("precious.txt"), live_dir.join("p.txt"))
        .unwrap();

    run_to_done(&c, JobKind::Remove, Payload::Remove { servers: vec![name.clone()] }).await;
    assert!(emptied(&root), "{name}: {:?}", fs::read_dir(root.join("releases")).unwrap().count());
    assert_eq!(fs::read_to_string(outside.path().join("precious.txt")).unwrap(), "keep me");
    assert_eq!(fs::read_to_string(outside.path().join("dir/deep.txt")).unwrap(), "keep me too");
    for (i, a) in c.agents.iter().enumerate().filter(|(i, _)| *i != x) {
        assert_eq!(observe(&a.site_root.join("current")), want, "server {i} untouched");
    }
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert!(site["holders"].get(&name).is_none(), "{site}");
    assert_eq!(site["removed"], json!([name]), "{site}");
    let st = c.agents[x].status().unwrap();
    assert!(st.to_string().contains("the site's content removed"), "{st}");

    // It leaves and rejoins: the manager does not put the content back on its own.
    c.agents[x].guard.kill();
    c.wait_segments(2, Duration::from_secs(30)).await.unwrap();
    c.restart_agent(x).unwrap();
    c.wait_segments(3, Duration::from_secs(30)).await.unwrap();
    let joined = format!("server {name} joined segment seg0");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let h: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
        if h.iter().filter(|e| e["event"] == joined.as_str()).count() >= 1 {
            break;
        }
        assert!(Instant::now() < end, "no `{joined}`");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A synchronize naming it brings it back (whole: it holds nothing).
    run_to_done(&c, JobKind::Synchronize, Payload::CatchUp { servers: vec![name.clone()] }).await;
    assert_eq!(observe(&root.join("current")), want);
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert_eq!(site["removed"], json!([]), "{site}");
    let jobs: Vec<Job> = c.op.get(&c.url("jobs")).await.unwrap();
    let kinds: Vec<JobKind> = jobs.iter().map(|j| j.spec.kind).collect();
    assert_eq!(
        kinds,
        vec![JobKind::Publish, JobKind::Remove, JobKind::Synchronize],
        "no job the manager made by itself"
    );

    // The whole group.
    run_to_done(&c, JobKind::Remove, Payload::Remove { servers: vec![] }).await;
    for a in &c.agents {
        assert!(emptied(&a.site_root), "{}", a.spec.name);
    }
    let site: Value = c.op.get(&c.url("sites/www")).await.unwrap();
    assert_eq!(site["holders"], json!({}), "{site}");
    let h: Vec<Value> = c.op.get(&c.url("history")).await.unwrap();
    assert!(h.iter().any(|e| {
        e["event"]
            .as_str()
            .is_some_and(|e| e.contains("removal of site www's content from every server"))
    }));
}
