//! Attack (issue 14, item 4): someone on the segment's LAN records the announcement of one MCTP
//! transfer and multicasts it again during a later one. Its tag still verifies (it was made
//! with the cluster key), so before announcements carried an origin the member dropped the
//! session under way, found the old assignment in its inbox and "delivered" that instead.
//!
//! Real sockets on loopback multicast, driven as an agent's member drives them: successive
//! receives sharing what they accepted (kept in a file, as the agent keeps it across restarts).
//! The attacker is a plain UDP socket on the group that captures the first transfer's
//! announcement and sends it back while the second transfer's frames flow.

use cm_agent::mctp::{AnnouncerMemory, ReceiveOptions, SendOptions, receive, send_file};
use cm_mctp::{Member, Outcome, SenderConfig, wire};
use rand::{Rng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
const GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 77, 43, 1), 47310);
const REPORT_PORT: u16 = 47311;
const MEMBER: u64 = 100;

fn random_file(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill(&mut data[..]);
    std::fs::write(path, &data).unwrap();
    data
}

/// A socket on the group beside the member's (as anyone on the LAN can open).
fn listener() -> anyhow::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&SocketAddr::V4(GROUP).into())?;
    s.join_multicast_v4(GROUP.ip(), &LOOPBACK)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(s.into())
}

fn attacker_sender() -> anyhow::Result<UdpSocket> {
    let s = UdpSocket::bind((LOOPBACK, 0))?;
    s.set_multicast_loop_v4(true)?;
    Ok(s)
}

/// Watches the group until `stop`: keeps the first announcement it sees in `captured`; once it
/// holds `replay`, sends it to the group after the 1st, 20th and 200th data datagram that
/// follows, while the transfer under way is sending frames.
fn watch(
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
    replay: Option<Vec<u8>>,
) -> std::thread::JoinHandle<(Option<Vec<u8>>, usize)> {
    std::thread::spawn(move || {
        let out = attacker_sender().unwrap();
        let (mut captured, mut frames, mut replayed) = (None, 0usize, 0usize);
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, _)) = sock.recv_from(&mut buf) else { continue };
            let d = &buf[..n];
            if wire::is_announce(d) {
                if captured.is_none() && Some(d) != replay.as_deref() {
                    captured = Some(d.to_vec());
                }
                continue;
            }
            frames += 1;
            if let Some(r) = &replay
                && [1, 20, 200].contains(&frames)
            {
                out.send_to(r, SocketAddr::V4(GROUP)).unwrap();
                replayed += 1;
            }
        }
        (captured, replayed)
    })
}

fn receive_options(dir: &Path, memory: &AnnouncerMemory) -> ReceiveOptions {
    let mut o =
        ReceiveOptions::new(SocketAddr::V4(GROUP), LOOPBACK, MEMBER, SECRET.to_vec(), dir.into());
    o.timeout = Duration::from_secs(120);
    o.linger = Duration::from_millis(300);
    o.announcers = Some(memory.clone());
    o
}

const SECRET: &[u8] = b"replay attack cluster";

fn send_options(run: u64, hash: [u8; 32]) -> SendOptions {
    let mut config = SenderConfig::new(SocketAddr::V4(GROUP), REPORT_PORT);
    config.frame_size = 8192;
    // Slow enough that the second transfer is still sending when the replays arrive.
    config.initial_rate = 20_000_000;
    config.max_rate = 20_000_000;
    SendOptions {
        config,
        interface: LOOPBACK,
        ttl: 0,
        secret: SECRET.to_vec(),
        assignment: run,
        name: format!("run-{run}.assignment"),
        members: vec![Member { id: MEMBER, unicast: None }],
        known_hash: Some(hash),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_announcement_during_a_later_transfer_is_ignored() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let inbox = tmp.path().join("inbox");
    let memory = AnnouncerMemory::persistent(tmp.path().join("state").join("mctp-announcers"));
    let (old_path, new_path) = (tmp.path().join("old.bin"), tmp.path().join("new.bin"));
    let old = random_file(&old_path, 3 << 20, 1);
    let new = random_file(&new_path, 6 << 20, 2);

    // Transfer 1, recorded by the attacker.
    let stop = Arc::new(AtomicBool::new(false));
    let recorder = watch(listener()?, stop.clone(), None);
    let member = tokio::spawn(receive(receive_options(&inbox, &memory)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = send_file(&old_path, send_options(1, *blake3::hash(&old).as_bytes())).await?;
    assert_eq!(out.report.outcome, Outcome::Complete, "{:?}", out.report);
    let first = member.await??;
    assert_eq!(first.info.assignment, 1);
    stop.store(true, Ordering::Relaxed);
    let (recorded, _) = recorder.join().unwrap();
    let recorded = recorded.expect("the attacker captured the first announcement");
    // The member still holds the first run in its inbox (an agent deletes it only after the
    // apply): exactly what the replay used to make it "deliver" again.
    assert_eq!(std::fs::read(&first.path)?, old);

    // Transfer 2, with the recording multicast again while its frames flow. The member's next
    // receive starts from what the first one accepted, read back from the file.
    let memory = AnnouncerMemory::persistent(tmp.path().join("state").join("mctp-announcers"));
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = watch(listener()?, stop.clone(), Some(recorded));
    let member = tokio::spawn(receive(receive_options(&inbox, &memory)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = send_file(&new_path, send_options(2, *blake3::hash(&new).as_bytes())).await?;
    let second = member.await??;
    stop.store(true, Ordering::Relaxed);
    let (_, replayed) = attacker.join().unwrap();
    assert!(replayed >= 1, "the attacker replayed the recording during the transfer");

    assert_eq!(out.report.outcome, Outcome::Complete, "{:?}", out.report);
    assert_eq!(second.info.assignment, 2, "the member delivered {:?}", second.info);
    assert!(!second.already_held);
    assert_eq!(second.path.file_name().unwrap(), "run-2.assignment");
    assert_eq!(std::fs::read(&second.path)?, new, "the second transfer's bytes");
    assert_eq!(second.stats.dropped.stale_announce, replayed as u64, "each replay ignored");
    let parts = std::fs::read_dir(&inbox)?
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".part")))
        .count();
    assert_eq!(parts, 0, "no .part left behind");
    Ok(())
}
