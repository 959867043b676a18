//! MCTP over real UDP multicast on loopback: one sender, eight receivers, 64 MiB, identical
//! copies; a sender with a foreign key cannot get anything delivered; a member that already
//! holds the assignment answers "complete" without receiving it; a member that cannot receive
//! multicast gets the session by unicast on its configured port, beside multicast members; a
//! GL announcing a hash its file does not match gets nothing delivered.
//!
//! Each test uses its own group and ports (239.77.x.y, 471xx) so parallel tests never collide.

use cm_agent::mctp::{ReceiveOptions, Received, SendOptions, receive, send_file};
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

fn receive_options(
    group: SocketAddr,
    member: u64,
    secret: &[u8],
    dir: &Path,
    timeout: Duration,
) -> ReceiveOptions {
    let mut o = ReceiveOptions::new(group, LOOPBACK, member, secret.to_vec(), dir.to_owned());
    o.timeout = timeout;
    o
}

fn sender_config(group: SocketAddr, report_port: u16) -> SenderConfig {
    let mut config = SenderConfig::new(group, report_port);
    config.frame_size = 8192;
    config.initial_rate = 100_000_000;
    config.max_rate = 400_000_000;
    config
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
        receivers.push(tokio::spawn(receive(receive_options(
            group,
            100 + i,
            &secret,
            &dir,
            Duration::from_secs(240),
        ))));
    }
    // Let every receiver join the group before the first announcement.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let config = sender_config(group, 47111);
    let members: Vec<Member> = (0..8).map(|i| Member { id: 100 + i, unicast: None }).collect();
    // As a GL sends an assignment: its BLAKE3 known from the manifest, each frame's chaining
    // value computed as the frame goes out.
    let opts = SendOptions {
        config,
        interface: LOOPBACK,
        ttl: 0,
        secret: secret.clone(),
        assignment: 42,
        name: "site-update.bin".into(),
        members,
        known_hash: Some(hash),
    };
    let out = tokio::time::timeout(Duration::from_secs(240), send_file(&source, opts)).await??;
    assert_eq!(out.report.outcome, Outcome::Complete, "report: {:?}", out.report);
    assert_eq!(out.report.complete.len(), 8);

    for r in receivers {
        let got: Received = r.await??;
        assert_eq!(got.path.file_name().unwrap(), "site-update.bin");
        let bytes = std::fs::read(&got.path)?;
        assert_eq!(bytes.len(), 64 << 20);
        assert_eq!(
            blake3::hash(&bytes).as_bytes(),
            &hash,
            "copy at {} differs",
            got.path.display()
        );
        // Nothing but the delivered file is left behind (no .part files).
        assert_eq!(std::fs::read_dir(got.path.parent().unwrap())?.count(), 1);
    }
    Ok(())
}

/// Loss injected in each receiver's driver (its own 8 %): frames arrive past gaps, the repaired
/// ones fill them (many recovered from coded repairs, XORed with frames read back from the
/// file), and the receiver's hash follows both ways of tagging frames — tree tags (the hash
/// assembled from the frames' chaining values, frames past a gap waiting) and plain tags (the
/// prefix hash reading repaired stretches back from the file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_receivers_verify_with_tree_tags_and_with_plain_tags() -> anyhow::Result<()> {
    for (k, tree_tags) in [true, false].into_iter().enumerate() {
        let group: SocketAddr = format!("239.77.41.{}:{}", 20 + k, 47130 + 2 * k).parse()?;
        let tmp = tempfile::tempdir()?;
        let source = tmp.path().join("lossy.bin");
        let hash = random_file(&source, (12 << 20) + 777, 11 + k as u64);
        let secret = b"loopback test cluster".to_vec();
        let mut receivers = Vec::new();
        for i in 0..3u64 {
            let mut o = receive_options(
                group,
                300 + i,
                &secret,
                &tmp.path().join(format!("member-{i}")),
                Duration::from_secs(120),
            );
            o.inject_loss = 0.08;
            receivers.push(tokio::spawn(receive(o)));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut config = sender_config(group, 47131 + 2 * k as u16);
        config.tree_tags = tree_tags;
        let members: Vec<Member> = (0..3).map(|i| Member { id: 300 + i, unicast: None }).collect();
        let opts = SendOptions {
            config,
            interface: LOOPBACK,
            ttl: 0,
            secret: secret.clone(),
            assignment: 43,
            name: "lossy.bin".into(),
            members,
            known_hash: None,
        };
        let out =
            tokio::time::timeout(Duration::from_secs(120), send_file(&source, opts)).await??;
        assert_eq!(
            out.report.outcome,
            Outcome::Complete,
            "tree tags {tree_tags}: {:?}",
            out.report
        );
        assert!(
            out.stats.frames_sent > (12 << 20) / 8192,
            "tree tags {tree_tags}: loss made repairs"
        );
        // Each receiver loses its own frames: repairs combine them.
        assert!(out.stats.coded > 0, "tree tags {tree_tags}: no coded repair in {:?}", out.stats);
        let mut recovered = 0;
        for r in receivers {
            let got: Received = r.await??;
            assert_eq!(
                blake3::hash(&std::fs::read(&got.path)?).as_bytes(),
                &hash,
                "tree tags {tree_tags}"
            );
            recovered += got.stats.coded_used;
        }
        assert!(recovered > 0, "tree tags {tree_tags}: no member used a coded repair");
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
    let rx = tokio::spawn(receive(receive_options(
        group,
        1,
        b"the real key",
        &dir,
        Duration::from_secs(4),
    )));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut config = SenderConfig::new(group, 47121);
    config.stall_limit = 2;
    config.max_report_window = Duration::from_millis(200);
    let opts = SendOptions {
        config,
        interface: LOOPBACK,
        ttl: 0,
        secret: b"an outsider's key".to_vec(),
        assignment: 1,
        name: "forged.bin".into(),
        members: vec![Member { id: 1, unicast: None }],
        known_hash: None,
    };
    let out = send_file(&source, opts).await?;
    assert_eq!(out.report.outcome, Outcome::Problem, "nobody can answer a forged session");
    let err = rx.await?.expect_err("the receiver must not deliver forged data");
    assert!(err.to_string().contains("no assignment was delivered"), "{err}");
    assert_eq!(std::fs::read_dir(&dir)?.count(), 0, "no file, partial or whole, is left");
    Ok(())
}

/// A GL whose copy does not match the hash it announces (the manifest's, say, with the file
/// changed on its disk since): every member's verification fails, nothing is delivered, no
/// file is left, and the session ends with a problem naming the members — for tree tags (the
/// frames' chaining values computed as they are sent) and plain tags alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_known_hash_delivers_nothing_and_ends_with_a_problem() -> anyhow::Result<()> {
    for (k, tree_tags) in [true, false].into_iter().enumerate() {
        let group: SocketAddr = format!("239.77.41.{}:{}", 30 + k, 47150 + 2 * k).parse()?;
        let tmp = tempfile::tempdir()?;
        let source = tmp.path().join("changed.bin");
        let mut announced = random_file(&source, (2 << 20) + 123, 12);
        announced[0] ^= 1;
        let secret = b"loopback test cluster".to_vec();
        let dirs: Vec<_> = (0..2).map(|i| tmp.path().join(format!("member-{i}"))).collect();
        let receivers: Vec<_> = dirs
            .iter()
            .zip(400u64..)
            .map(|(d, id)| {
                tokio::spawn(receive(receive_options(
                    group,
                    id,
                    &secret,
                    d,
                    Duration::from_secs(4),
                )))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut config = sender_config(group, 47151 + 2 * k as u16);
        config.tree_tags = tree_tags;
        let members: Vec<Member> = (400..402).map(|id| Member { id, unicast: None }).collect();
        let opts = SendOptions {
            config,
            interface: LOOPBACK,
            ttl: 0,
            secret: secret.clone(),
            assignment: 44,
            name: "changed.bin".into(),
            members,
            known_hash: Some(announced),
        };
        let out = tokio::time::timeout(Duration::from_secs(60), send_file(&source, opts)).await??;
        assert_eq!(out.report.outcome, Outcome::Problem, "tree tags {tree_tags}: {:?}", out.report);
        assert!(out.report.complete.is_empty(), "tree tags {tree_tags}: {:?}", out.report);
        assert_eq!(
            out.report.incomplete.len(),
            2,
            "tree tags {tree_tags}: both members named: {:?}",
            out.report
        );
        for (r, d) in receivers.into_iter().zip(&dirs) {
            let err = r.await?.expect_err("a copy that fails its hash is never delivered");
            assert!(
                err.to_string().contains("no assignment was delivered"),
                "tree tags {tree_tags}: {err}"
            );
            assert_eq!(
                std::fs::read_dir(d).map_or(0, |e| e.count()),
                0,
                "tree tags {tree_tags}: no file, partial or whole, is left"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_already_holds_the_assignment_answers_complete_without_receiving()
-> anyhow::Result<()> {
    let group: SocketAddr = "239.77.41.9:47136".parse()?;
    let tmp = tempfile::tempdir()?;
    let source = tmp.path().join("held.bin");
    let hash = random_file(&source, 3 << 20, 9);
    let secret = b"held test cluster".to_vec();
    // Member 1 holds the assignment already (a delivery's file name, same bytes); member 2 has
    // a file of that name and size with other bytes, which must not count; member 3 has nothing.
    let dirs: Vec<_> = (1..=3).map(|i| tmp.path().join(format!("member-{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    std::fs::copy(&source, dirs[0].join("held.bin"))?;
    random_file(&dirs[1].join("held.bin"), 3 << 20, 10);
    let receivers: Vec<_> = dirs
        .iter()
        .zip(1u64..)
        .map(|(d, id)| {
            tokio::spawn(receive(receive_options(group, id, &secret, d, Duration::from_secs(60))))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let members: Vec<Member> = (1..=3).map(|id| Member { id, unicast: None }).collect();
    let opts = SendOptions {
        config: sender_config(group, 47137),
        interface: LOOPBACK,
        ttl: 0,
        secret: secret.clone(),
        assignment: 5,
        name: "held.bin".into(),
        members,
        known_hash: None,
    };
    let out = tokio::time::timeout(Duration::from_secs(60), send_file(&source, opts)).await??;
    assert_eq!(out.report.outcome, Outcome::Complete, "report: {:?}", out.report);

    let got: Vec<Received> = futures_join(receivers).await?;
    assert!(got[0].already_held, "member 1 holds it");
    assert_eq!(got[0].stats.frames, 0, "member 1 wrote no frame");
    assert_eq!(got[0].path, dirs[0].join("held.bin"));
    for g in &got[1..] {
        assert!(
            !g.already_held,
            "{}: a same-named file with other bytes is not the assignment",
            g.path.display()
        );
        assert!(g.stats.frames > 0);
    }
    for g in &got {
        assert_eq!(
            blake3::hash(&std::fs::read(&g.path)?).as_bytes(),
            &hash,
            "{}",
            g.path.display()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unicast_only_member_on_its_configured_port_receives_beside_multicast_members()
-> anyhow::Result<()> {
    let group: SocketAddr = "239.77.41.10:47140".parse()?;
    let unicast_port = 47142;
    let tmp = tempfile::tempdir()?;
    let source = tmp.path().join("mixed.bin");
    let hash = random_file(&source, 8 << 20, 11);
    let secret = b"mixed test cluster".to_vec();
    let mut receivers = Vec::new();
    for id in 1..=3u64 {
        receivers.push(tokio::spawn(receive(receive_options(
            group,
            id,
            &secret,
            &tmp.path().join(format!("m{id}")),
            Duration::from_secs(60),
        ))));
    }
    // Member 4 never joins the group: everything reaches it on its fixed unicast port.
    let mut unicast =
        receive_options(group, 4, &secret, &tmp.path().join("u4"), Duration::from_secs(60));
    unicast.join_group = false;
    unicast.unicast_port = unicast_port;
    receivers.push(tokio::spawn(receive(unicast)));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut members: Vec<Member> = (1..=3).map(|id| Member { id, unicast: None }).collect();
    members.push(Member { id: 4, unicast: Some(SocketAddr::new(LOOPBACK.into(), unicast_port)) });
    let opts = SendOptions {
        config: sender_config(group, 47141),
        interface: LOOPBACK,
        ttl: 0,
        secret: secret.clone(),
        assignment: 6,
        name: "mixed.bin".into(),
        members,
        known_hash: None,
    };
    let out = tokio::time::timeout(Duration::from_secs(60), send_file(&source, opts)).await??;
    assert_eq!(out.report.outcome, Outcome::Complete, "report: {:?}", out.report);
    assert_eq!(out.report.complete, vec![1, 2, 3, 4]);
    let got = futures_join(receivers).await?;
    for g in &got {
        assert_eq!(
            blake3::hash(&std::fs::read(&g.path)?).as_bytes(),
            &hash,
            "{}",
            g.path.display()
        );
    }
    assert_eq!(got[3].stats.frames, 1024, "the unicast-only member received every frame itself");
    Ok(())
}

async fn futures_join(
    handles: Vec<tokio::task::JoinHandle<Result<Received, cm_agent::mctp::MctpDriverError>>>,
) -> anyhow::Result<Vec<Received>> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}

/// Two sessions of one GL at once (two runs delivered together, or one starting as the last
/// ends) configured with the same report port: the second takes an ephemeral port, named in
/// its announcement, and both complete. It used to fail with "Address already in use".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_sharing_a_report_port_both_complete() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let secret = b"loopback test cluster".to_vec();
    let mut receivers = Vec::new();
    let mut sends = Vec::new();
    let groups: [SocketAddr; 2] = ["239.77.41.30:47190".parse()?, "239.77.41.31:47192".parse()?];
    for (k, group) in groups.into_iter().enumerate() {
        for i in 0..2u64 {
            let dir = tmp.path().join(format!("s{k}-member-{i}"));
            let id = 300 + 10 * k as u64 + i;
            let opts = receive_options(group, id, &secret, &dir, Duration::from_secs(60));
            receivers.push((k, tokio::spawn(receive(opts))));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut hashes = Vec::new();
    for (k, group) in groups.into_iter().enumerate() {
        let source = tmp.path().join(format!("run-{k}.bin"));
        hashes.push(random_file(&source, 2 << 20, 40 + k as u64));
        let members = (0..2).map(|i| Member { id: 300 + 10 * k as u64 + i, unicast: None });
        let opts = SendOptions {
            config: sender_config(group, 47199),
            interface: LOOPBACK,
            ttl: 0,
            secret: secret.clone(),
            assignment: 70 + k as u64,
            name: format!("run-{k}.bin"),
            members: members.collect(),
            known_hash: Some(hashes[k]),
        };
        sends.push(tokio::spawn(async move { send_file(&source, opts).await }));
    }
    for s in sends {
        let out = tokio::time::timeout(Duration::from_secs(60), s).await???;
        assert_eq!(out.report.outcome, Outcome::Complete, "report: {:?}", out.report);
        assert_eq!(out.report.complete.len(), 2);
    }
    for (k, r) in receivers {
        let got: Received = r.await??;
        assert_eq!(blake3::hash(&std::fs::read(&got.path)?).as_bytes(), &hashes[k]);
    }
    Ok(())
}
