//! The GL's rate follows its members' gap shares during a pass. A member that falls behind
//! answers several checkpoints with one report; its gaps are weighed against every window the
//! report covers, not against the last window alone (which would double a 6 % share into a
//! 12 % one and cut the rate of a session whose members are merely losing 6 %).

use cm_mctp::wire::{self, Checkpoint, Message, Report, ReportStatus};
use cm_mctp::{Keys, Member, Sender, SenderConfig, SessionInfo, Time, Transmit};
use rand::SeedableRng;
use std::time::Duration;

/// Runs the sender until `n` checkpoints have gone out in all, collecting them.
fn drive_until(s: &mut Sender, keys: &Keys, now: &mut Time, checkpoints: &mut Vec<Checkpoint>, n: usize) {
    while checkpoints.len() < n {
        s.handle_timeout(*now);
        while let Some(t) = s.poll_transmit(*now) {
            if let Transmit::Control { bytes, .. } = t
                && let Ok(Message::Checkpoint(c)) = wire::open(keys, &bytes)
            {
                checkpoints.push(c);
            }
        }
        let next = s.poll_timeout().unwrap_or(*now + Duration::from_millis(1));
        *now = next.max(*now + Duration::from_micros(10));
    }
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
    let mut s = Sender::new(Time::ZERO, cfg, keys.clone(), rng, info, &[member], None).unwrap();
    let (mut now, mut checkpoints) = (Time::ZERO, Vec::new());
    drive_until(&mut s, &keys, &mut now, &mut checkpoints, 2);

    // The member missed the first checkpoint's moment and answers both at once: one frame in
    // 16 (6.25 %) of each window is missing.
    let (first, second) = (&checkpoints[0], &checkpoints[1]);
    assert_eq!(first.upto, second.from, "adjacent windows");
    let runs: Vec<(u32, u32)> = (first.from..second.upto).filter(|seq| seq % 16 == 3).map(|seq| (seq, 1)).collect();
    let report = Report { session: s.session(), member: 7, round: second.checkpoint, part: 0, parts: 1, status: ReportStatus::Gaps(runs) };
    s.handle_datagram(now, "10.9.0.7:4000".parse().unwrap(), &report.encode(&keys));

    // The next checkpoint adapts the rate to that answer: 6.25 % is a small share, so up.
    let before = s.rate();
    drive_until(&mut s, &keys, &mut now, &mut checkpoints, 3);
    assert!(s.rate() > before, "a 6.25 % share must raise the rate: {before} -> {}", s.rate());
}
