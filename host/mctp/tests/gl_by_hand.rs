//! The GL's state machine driven by hand, datagram by datagram.
//!
//! The rate follows the members' gap shares during a pass. A member that falls behind answers
//! several checkpoints with one report; its gaps are weighed against every window the report
//! covers, not against the last window alone (which would double a 6 % share into a 12 % one
//! and cut the rate of a session whose members are merely losing 6 %).
//!
//! Frames' chaining values handed over ahead of the sending are used only in order, and frames
//! tagged with and without them carry the same tag.

use cm_mctp::wire::{self, Checkpoint, Message, Report, ReportStatus};
use cm_mctp::{Instant, Keys, Member, Output, Sender, SenderConfig, SessionInfo, Transmit};
use rand::SeedableRng;
use std::time::Duration;

/// Runs the sender until `n` checkpoints have gone out in all, collecting them.
fn drive_until(
    s: &mut Sender,
    keys: &Keys,
    now: &mut Instant,
    checkpoints: &mut Vec<Checkpoint>,
    n: usize,
) {
    while checkpoints.len() < n {
        s.handle_timeout(*now);
        while let Some(t) = s.poll_transmit(*now) {
            if let Output::Control(Transmit { payload: bytes, .. }) = t
                && let Ok(Message::Checkpoint(c)) = wire::open(keys, &bytes)
            {
                checkpoints.push(c);
            }
        }
        let next = s.poll_timeout().unwrap_or(*now + Duration::from_millis(1));
        *now = next.max(*now + Duration::from_micros(10));
    }
}

fn tree_session(size: u64) -> (Keys, Sender) {
    let keys = Keys::derive(b"cv test cluster");
    let mut cfg = SenderConfig::new("239.1.2.3:7000".parse().unwrap(), 7001);
    cfg.frame_size = 4096;
    let info = SessionInfo { assignment: 2, name: "cvs.bin".into(), size, hash: [9; 32] };
    let rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let s = Sender::new(
        Instant::ZERO,
        cfg,
        keys.clone(),
        rng,
        info,
        &[Member { id: 1, unicast: None }],
        None,
    )
    .unwrap();
    (keys, s)
}

/// Every frame the sender puts out, as (sequence number, datagram).
fn all_frames(s: &mut Sender, content: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let (mut now, mut out) = (Instant::ZERO, Vec::new());
    while s.stats().passes == 0
        || s.stats().frames_sent
            < u64::from(cm_mctp::wire::frame_count(content.len() as u64, 4096).unwrap())
    {
        s.handle_timeout(now);
        while let Some(t) = s.poll_transmit(now) {
            if let Output::Frame { frame, .. } = t {
                let mut buf = Vec::new();
                let at = frame.offset as usize;
                s.encode_frame::<()>(&frame, &mut buf, |p| {
                    p.copy_from_slice(&content[at..at + p.len()]);
                    Ok(())
                })
                .unwrap();
                out.push((frame.header.seq, buf));
            }
        }
        now = s
            .poll_timeout()
            .unwrap_or(now + Duration::from_millis(1))
            .max(now + Duration::from_micros(10));
    }
    out
}

#[test]
fn chaining_values_handed_ahead_are_taken_in_order_and_tag_like_the_frames_own() {
    let content: Vec<u8> = (0..40_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
    let cv = |seq: usize| {
        cm_mctp::tree::frame_cv(
            seq as u64 * 4096,
            &content[seq * 4096..((seq + 1) * 4096).min(content.len())],
        )
    };
    let (_, mut plain) = tree_session(content.len() as u64);
    let (_, mut ahead) = tree_session(content.len() as u64);
    // Ten frames: values for 0..4, then a chunk that skips ahead (refused), then 4..6.
    assert!(ahead.extend_frame_cvs(0, &(0..4).map(cv).collect::<Vec<_>>()));
    assert!(!ahead.extend_frame_cvs(7, &[cv(7)]), "a chunk past a gap is refused");
    assert!(ahead.extend_frame_cvs(4, &[cv(4), cv(5)]));
    assert!(
        !ahead.extend_frame_cvs(6, &(6..11).map(|_| [0u8; 32]).collect::<Vec<_>>()),
        "more values than frames are refused"
    );
    let (a, b) = (all_frames(&mut plain, &content), all_frames(&mut ahead, &content));
    assert_eq!(a.len(), 10);
    assert_eq!(a, b, "the same datagrams whether the values came ahead or not");
    // And they are used: a wrong value handed over changes that frame's tag (and only its).
    let (_, mut wrong) = tree_session(content.len() as u64);
    assert!(wrong.extend_frame_cvs(0, &[cv(0), [1u8; 32]]));
    let c = all_frames(&mut wrong, &content);
    let differing: Vec<u32> = a.iter().zip(&c).filter(|(x, y)| x != y).map(|(x, _)| x.0).collect();
    assert_eq!(differing, vec![1]);
}

#[test]
fn one_answer_to_two_checkpoints_is_weighed_against_both_windows() {
    let keys = Keys::derive(b"rate test cluster");
    let mut cfg = SenderConfig::new("239.1.2.3:7000".parse().unwrap(), 7001);
    cfg.frame_size = 1024;
    cfg.checkpoint_bytes = 256 << 10; // 256 frames per window
    cfg.initial_rate = 10_000_000;
    cfg.max_rate = 100_000_000;
    let info = SessionInfo { assignment: 1, name: "rate.bin".into(), size: 8 << 20, hash: [7; 32] };
    let member = Member { id: 7, unicast: None };
    let rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut s = Sender::new(Instant::ZERO, cfg, keys.clone(), rng, info, &[member], None).unwrap();
    let (mut now, mut checkpoints) = (Instant::ZERO, Vec::new());
    drive_until(&mut s, &keys, &mut now, &mut checkpoints, 2);

    // The member missed the first checkpoint's moment and answers both at once: one frame in
    // 16 (6.25 %) of each window is missing.
    let (first, second) = (&checkpoints[0], &checkpoints[1]);
    assert_eq!(first.upto, second.from, "adjacent windows");
    let runs: Vec<(u32, u32)> =
        (first.from..second.upto).filter(|seq| seq % 16 == 3).map(|seq| (seq, 1)).collect();
    let report = Report {
        session: s.session(),
        member: 7,
        round: second.checkpoint,
        part: 0,
        parts: 1,
        status: ReportStatus::Gaps(runs),
    };
    s.handle_datagram(now, "10.9.0.7:4000".parse().unwrap(), &report.encode(&keys));

    // The next checkpoint adapts the rate to that answer: 6.25 % is a small share, so up.
    let before = s.rate();
    drive_until(&mut s, &keys, &mut now, &mut checkpoints, 3);
    assert!(s.rate() > before, "a 6.25 % share must raise the rate: {before} -> {}", s.rate());
}
