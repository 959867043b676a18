//! MCTP over real UDP multicast on loopback: one sender, eight receivers, 64 MiB, identical
//! copies; and a sender with a foreign key cannot get anything delivered.
//!
//! Each test uses its own group and ports (239.77.x.y, 471xx) so parallel tests never collide.

use cm_agent::mctp::{receive, send_file, ReceiveOptions, Received, SendOptions};
use cm_mctp::{Member, Outcome, SenderConfig};
use rand::{Rng, SeedableRng};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn random_file(path: &Path, size: usize, seed: u64) -> [u8; 32] {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill(&mut data[..]);
    std::fs::write(path, &data).unwrap();
    *blake3::hash(&data).as_bytes()
}

fn receive_options(group: SocketAddr, member: u64, secret: &[u8], dir: &Path, timeout: Duration) -> ReceiveOptions {
    ReceiveOptions {
        group,
        interface: LOOPBACK,
        member,
        secret: secret.to_vec(),
        dir: dir.to_owned(),
        timeout,
        linger: Duration::from_secs(1),
        session_timeout: Duration::from_secs(10),
        inject_loss: 0.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_eight_receivers_64_mib_identical_copies() -> anyhow::Result<()> {
    let group: SocketAddr = "239.77.41.7:47110".parse()?;
    let tmp = tempfile::tempdir()?;
    let source = tmp.path().join("site-update.bin");
    let hash = random_file(&source, 64 << 20, 7);
    let secret = b"loopback test cluster".to_vec();

    let mut receivers = Vec::new();
    for i in 0..8u64 {
        let dir = tmp.path().join(format!("member-{i}"));
        receivers.push(tokio::spawn(receive(receive_options(group, 100 + i, &secret, &dir, Duration::from_secs(240)))));
    }
    // Let every receiver join the group before the first announcement.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut config = SenderConfig::new(group, 47111);
    config.frame_size = 8192;
    config.initial_rate = 100_000_000;
    config.max_rate = 400_000_000;
    let members: Vec<Member> = (0..8).map(|i| Member { id: 100 + i, unicast: None }).collect();
    let opts = SendOptions { config, interface: LOOPBACK, ttl: 0, secret: secret.clone(), assignment: 42, name: "site-update.bin".into(), members };
    let out = tokio::time::timeout(Duration::from_secs(240), send_file(&source, opts)).await??;
    assert_eq!(out.report.outcome, Outcome::Complete, "report: {:?}", out.report);
    assert_eq!(out.report.complete.len(), 8);

    for r in receivers {
        let got: Received = r.await??;
        assert_eq!(got.path.file_name().unwrap(), "site-update.bin");
        let bytes = std::fs::read(&got.path)?;
        assert_eq!(bytes.len(), 64 << 20);
        assert_eq!(blake3::hash(&bytes).as_bytes(), &hash, "copy at {} differs", got.path.display());
        // Nothing but the delivered file is left behind (no .part files).
        assert_eq!(std::fs::read_dir(got.path.parent().unwrap())?.count(), 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_without_the_cluster_key_delivers_nothing() -> anyhow::Result<()> {
    let group: SocketAddr = "239.77.41.8:47120".parse()?;
    let tmp = tempfile::tempdir()?;
    let source = tmp.path().join("forged.bin");
    random_file(&source, 200_000, 8);
    let dir = tmp.path().join("member");
    let rx = tokio::spawn(receive(receive_options(group, 1, b"the real key", &dir, Duration::from_secs(4))));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut config = SenderConfig::new(group, 47121);
    config.stall_limit = 2;
    config.max_report_window = Duration::from_millis(200);
    let opts = SendOptions { config, interface: LOOPBACK, ttl: 0, secret: b"an outsider's key".to_vec(), assignment: 1, name: "forged.bin".into(), members: vec![Member { id: 1, unicast: None }] };
    let out = send_file(&source, opts).await?;
    assert_eq!(out.report.outcome, Outcome::Problem, "nobody can answer a forged session");
    let err = rx.await?.expect_err("the receiver must not deliver forged data");
    assert!(err.to_string().contains("no assignment was delivered"), "{err}");
    assert_eq!(std::fs::read_dir(&dir)?.count(), 0, "no file, partial or whole, is left");
    Ok(())
}
