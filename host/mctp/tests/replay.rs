//! A recorded announcement multicast again during a later session (someone on the LAN replaying
//! what it captured; the tag still verifies) is ignored: the member stays in the current
//! session and delivers its bytes, never the old session's (issue 14, item 4). A member that
//! remembers what it accepted (the driver keeps it between receives and across restarts) starts
//! neither the old session nor the last one again.

use cm_mctp::wire::{self, Message};
use cm_mctp::{
    Announcers, Instant, Keys, Member, Origin, Outcome, Output, Receiver, ReceiverConfig, RxEvent,
    Sender, SenderConfig, SenderEvent, SessionInfo,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::net::SocketAddr;
use std::time::Duration;

const MEMBER: u64 = 5;
const GL: u64 = 9;

fn gl_addr() -> SocketAddr {
    "10.0.0.9:7001".parse().unwrap()
}

fn sender(keys: &Keys, now: Instant, content: &[u8], sequence: u64) -> Sender {
    let mut cfg = SenderConfig::new("239.1.2.3:7000".parse().unwrap(), 7001);
    cfg.frame_size = 4096;
    cfg.origin = Origin { node: GL, incarnation: 1_000, sequence };
    let info = SessionInfo {
        assignment: sequence,
        name: "run.assignment".into(),
        size: content.len() as u64,
        hash: *blake3::hash(content).as_bytes(),
    };
    let rng = ChaCha8Rng::seed_from_u64(sequence);
    Sender::new(now, cfg, keys.clone(), rng, info, &[Member { id: MEMBER, unicast: None }], None)
        .unwrap()
}

fn receiver(keys: &Keys, announcers: &Announcers) -> Receiver {
    let mut rx =
        Receiver::new(ReceiverConfig::new(MEMBER), keys.clone(), ChaCha8Rng::seed_from_u64(1));
    rx.set_announcers(announcers.clone());
    rx
}

/// What the member saw of one session.
#[derive(Default)]
struct Seen {
    events: Vec<RxEvent>,
    /// The session's first announcement, as it went on the wire.
    announcement: Option<Vec<u8>>,
    disk: Vec<u8>,
}

/// Runs one session between the GL and the member on a lossless network; `inject` is handed to
/// the member (from the GL's address) once the first data frames have arrived.
fn run(
    keys: &Keys,
    now: &mut Instant,
    mut s: Sender,
    rx: &mut Receiver,
    content: &[u8],
    mut inject: Option<Vec<u8>>,
) -> Seen {
    let mut seen = Seen::default();
    let mut frames_in = 0;
    for _ in 0..1_000_000 {
        s.handle_timeout(*now);
        let mut to_member: Vec<Vec<u8>> = Vec::new();
        while let Some(out) = s.poll_transmit(*now) {
            match out {
                Output::Control(t) => {
                    if seen.announcement.is_none()
                        && matches!(wire::open(keys, &t.payload), Ok(Message::Announce(_)))
                    {
                        seen.announcement = Some(t.payload.clone());
                    }
                    to_member.push(t.payload);
                }
                Output::Frame { frame, .. } => {
                    let mut buf = Vec::new();
                    let at = frame.offset as usize;
                    s.encode_frame::<()>(&frame, &mut buf, |p| {
                        p.copy_from_slice(&content[at..at + p.len()]);
                        Ok(())
                    })
                    .unwrap();
                    to_member.push(buf);
                    frames_in += 1;
                    if frames_in == 3
                        && let Some(replay) = inject.take()
                    {
                        to_member.push(replay);
                    }
                }
                Output::Coded { .. } => panic!("no loss, no repairs"),
            }
        }
        for mut d in to_member {
            if let Some(w) = rx.handle_datagram(*now, gl_addr(), &mut d) {
                assert!(w.coded.is_none());
                let end = w.offset as usize + w.bytes.len();
                seen.disk[w.offset as usize..end].copy_from_slice(w.bytes);
                let (session, seq, len) = (w.session, w.seq, w.bytes.len());
                rx.written(session, seq, len);
            }
            while let Some(e) = rx.poll_event() {
                match &e {
                    RxEvent::Started { info, resumed: false, .. } => {
                        seen.disk = vec![0; info.size as usize];
                    }
                    RxEvent::Verify { session, info } => {
                        let ok = blake3::hash(&seen.disk).as_bytes() == &info.hash;
                        rx.verified(*now, *session, ok);
                    }
                    _ => {}
                }
                seen.events.push(e);
            }
        }
        rx.handle_timeout(*now);
        while let Some(t) = rx.poll_transmit() {
            s.handle_datagram(*now, "10.0.0.5:40000".parse().unwrap(), &t.payload);
        }
        while let Some(e) = s.poll_event() {
            if let SenderEvent::Finished(report) = e {
                assert_eq!(report.outcome, Outcome::Complete, "{report:?}");
                return seen;
            }
        }
        let next = [s.poll_timeout(), rx.poll_timeout()].into_iter().flatten().min();
        *now =
            next.unwrap_or(*now + Duration::from_millis(1)).max(*now + Duration::from_micros(50));
    }
    panic!("the session did not finish");
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

#[test]
fn replayed_announcement_of_an_earlier_session_is_ignored() {
    let keys = Keys::derive(b"replay test cluster");
    let mut now = Instant::ZERO;
    let (old, new) = (content(1, 40_000), content(2, 50_000));

    // Session 1: the member receives the old content; the attacker records its announcement.
    let mut rx = receiver(&keys, &Announcers::default());
    let gl = sender(&keys, now, &old, 1);
    let first = run(&keys, &mut now, gl, &mut rx, &old, None);
    assert!(first.events.iter().any(|e| matches!(e, RxEvent::Delivered { .. })));
    let recorded = first.announcement.expect("an announcement went out");

    // Session 2, in the member's next receive (what it accepted carried over, the old content
    // still on its disk): the recording is multicast again after a few frames.
    now = now + Duration::from_secs(30);
    let mut rx2 = receiver(&keys, rx.announcers());
    rx2.add_held(*blake3::hash(&old).as_bytes());
    let gl = sender(&keys, now, &new, 2);
    let second = run(&keys, &mut now, gl, &mut rx2, &new, Some(recorded.clone()));
    assert_eq!(rx2.stats().dropped.stale_announce, 1, "the replay is counted and ignored");
    for e in &second.events {
        assert!(
            !matches!(e, RxEvent::Abandoned { .. } | RxEvent::AlreadyHeld { .. }),
            "the replay changed the session: {e:?}"
        );
    }
    let delivered: Vec<&SessionInfo> = second
        .events
        .iter()
        .filter_map(|e| match e {
            RxEvent::Delivered { info, .. } => Some(info),
            _ => None,
        })
        .collect();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].hash, *blake3::hash(&new).as_bytes());
    assert_eq!(second.disk, new, "the current session's bytes, not the old ones");

    // A later receive (or the member after a restart, with the records it kept) starts neither
    // the old session nor the one it just finished.
    let mut later = receiver(&keys, rx2.announcers());
    for mut d in [recorded, second.announcement.unwrap()] {
        assert!(later.new_announcement(&d).is_none());
        assert!(later.handle_datagram(now, gl_addr(), &mut d).is_none());
    }
    assert!(later.poll_event().is_none());
    assert_eq!(later.stats().dropped.stale_announce, 2);
    assert!(later.poll_timeout().is_none(), "no session was started");
}

#[test]
fn a_member_follows_only_the_gl_its_election_names() {
    let keys = Keys::derive(b"replay test cluster");
    let data = content(3, 9_000);
    let mut announce = None;
    let mut s = sender(&keys, Instant::ZERO, &data, 1);
    s.handle_timeout(Instant::ZERO);
    while let Some(out) = s.poll_transmit(Instant::ZERO) {
        if let Output::Control(t) = out {
            announce.get_or_insert(t.payload);
        }
    }
    let announce = announce.unwrap();
    let mut rx = receiver(&keys, &Announcers::default());
    for (filter, starts) in [
        (cm_mctp::AnnouncerFilter::Only(GL + 1), false),
        (cm_mctp::AnnouncerFilter::Nobody, false),
        (cm_mctp::AnnouncerFilter::Only(GL), true),
    ] {
        rx.set_announcer_filter(filter);
        let mut d = announce.clone();
        rx.handle_datagram(Instant::ZERO, gl_addr(), &mut d);
        assert_eq!(rx.poll_event().is_some(), starts, "{filter:?}");
    }
}
