//! End to end with real processes: a manager started with `--seal-secret-file` seals every
//! assignment; agents given the same secret (`[site] seal_secret_file`) apply them, an agent
//! without it or with another secret refuses every one (sealed-only), and live is untouched
//! there.

use std::time::Duration;

use cm_agent::launch::AgentSeal;
use cm_manager::model::{JobKind, Payload, ServerOutcome};
use cm_tests::cluster::{Layout, TestCluster};
use cm_tests::observe;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_runs_reach_agents_with_the_secret_only() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("index.html"), "<h1>sealed</h1>").unwrap();
    let wrong = tempfile::tempdir().unwrap();
    let wrong_secret = wrong.path().join("seal.key");
    std::fs::write(&wrong_secret, "not the manager's seal secret at all").unwrap();
    let mut layout = Layout::new(43, 1, 3);
    layout.seal = true;
    layout.tweak = Some(Box::new(move |n, spec| match n {
        // The GL (highest weight) holds the secret, so it relays to everyone.
        0 => spec.weight = 255,
        1 => spec.seal = AgentSeal::Off,
        _ => spec.seal = AgentSeal::File(wrong_secret.clone()),
    }));
    let c = TestCluster::start(&layout, src.path()).await.unwrap();
    let job = c.submit(JobKind::Publish, Payload::Staging, 30).await.unwrap();
    let (_, reports) = c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    let outcome = |name: &str| reports.iter().find(|(s, _)| s == name).map(|(_, o)| o.clone());
    assert_eq!(outcome("seg0-0"), Some(ServerOutcome::Succeeded), "{reports:?}\n{}", c.logs());
    let refused = |name: &str, why: &str| match outcome(name) {
        Some(ServerOutcome::Failed { reason }) => assert!(reason.contains(why), "{name}: {reason}"),
        other => panic!("{name}: {other:?}, expected a refusal ({why})\n{}", c.logs()),
    };
    refused("seg0-1", "sealed but no key was given");
    refused("seg0-2", "do not match the trailer hash");
    let job = c.submit(JobKind::Commit, Payload::Commit { serial: None }, 30).await.unwrap();
    c.finish(job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(observe(&c.agents[0].site_root.join("current")), observe(&c.staging));
    for a in &c.agents[1..] {
        assert!(!a.site_root.join("current").exists(), "{}: something went live", a.spec.name);
    }
}
