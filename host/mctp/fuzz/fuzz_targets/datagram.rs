//! Arbitrary bytes into every MCTP decoder and both state machines. The input is also sealed
//! with the cluster key, so the fuzzer explores what lies behind the authentication tag (what
//! a member holding the key could send), not only the tag check.
//!
//! The input is a sequence of datagrams (`len u16 | bytes`, big-endian): each goes through the
//! raw decoders (checkpoints, gap reports and tree-tagged frames included), then, sealed, into one receiver and one
//! sender that live for the whole input,
//! with time advancing between datagrams. So an announcement followed by frames, solicitations
//! and reports reaches the deeper states. Checked on the way: a receiver never asks to write
//! outside the announced size, and never delivers bytes whose BLAKE3 differs from the announced.
//! The announcer records a member keeps across restarts (`cm_mctp::replay`) are decoded too.
#![no_main]

use cm_mctp::{
    Instant, Keys, Member, Receiver, ReceiverConfig, RxEvent, Sender, SenderConfig, SessionInfo,
    wire,
};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let keys = Keys::derive(b"fuzz");
    let from = "127.0.0.1:9".parse().unwrap();
    let mut rx = Receiver::new(
        ReceiverConfig::new(1),
        keys.clone(),
        rand_chacha::ChaCha8Rng::seed_from_u64(1),
    );
    let cfg = SenderConfig::new("239.1.1.1:5000".parse().unwrap(), 5001);
    let info = SessionInfo { assignment: 1, name: "f".into(), size: 100_000, hash: [0; 32] };
    let members = [Member { id: 1, unicast: None }];
    let mut tx = Sender::new(
        Instant::ZERO,
        cfg,
        keys.clone(),
        rand_chacha::ChaCha8Rng::seed_from_u64(2),
        info,
        &members,
        None,
    )
    .unwrap();
    // The receiving member's disk: at most 1 MiB is honoured (larger announcements still run,
    // their writes are only bounds-checked).
    let mut disk: Vec<u8> = Vec::new();
    let mut size = 0u64;
    let mut hash = [0u8; 32];

    let mut tree_frame_size = 1024u16;
    let mut now = Instant::ZERO;
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let datagram = &rest[2..2 + n];
        rest = &rest[2 + n..];
        now = now + Duration::from_millis(u64::from(datagram.first().copied().unwrap_or(0)));

        let _ = wire::decode_body(datagram);
        // The announcer records a member keeps in its state directory.
        let _ = cm_mctp::Announcers::decode(datagram);
        let _ = wire::open(&keys, datagram);
        let _ = wire::open_tree_data(&keys, datagram, 1024 << (datagram.len() % 6));
        // Sealed as the datagram's kind wants: a tree-tagged frame with the frame size of the
        // last tree-tagged announcement seen (so it reaches the receiver's tree path), anything
        // else with the plain tag.
        if let Ok(wire::Message::Announce(a)) = wire::decode_body(datagram)
            && a.tree
        {
            tree_frame_size = a.frame_size;
        }
        let mut sealed = datagram.to_vec();
        if !(wire::tree_frame_claim(&[datagram, &[0; 16]].concat()).is_some()
            && wire::seal_tree_data(&keys, &mut sealed, tree_frame_size))
        {
            sealed = datagram.to_vec();
            keys.mac().seal(&mut sealed);
        }

        // What a driver asks before handing a datagram over, and while hashing as frames arrive.
        if let Some(info) = rx.new_announcement(&sealed) {
            assert!(wire::is_announce(&sealed), "only announcements start sessions");
            let _ = info;
        }
        let _ = rx.held_through(u64::from(datagram.len() as u32) * 64);
        let mut buf = sealed.clone();
        // A coded repair's frame is its payload XOR the frames it names, read from our copy.
        let write = rx.handle_datagram(now, from, &mut buf).map(|w| {
            let mut bytes = w.bytes.to_vec();
            if let Some(c) = &w.coded {
                for &(off, len) in &c.xor {
                    let end = off.checked_add(len as u64).expect("coded part end overflows");
                    assert!(
                        end <= size,
                        "coded part {off}..{end} outside the announced {size} bytes"
                    );
                    if let Some(part) = disk.get(off as usize..end as usize) {
                        bytes.iter_mut().zip(part).for_each(|(a, b)| *a ^= b);
                    }
                }
                assert!(c.len <= bytes.len(), "coded frame longer than the repair's payload");
                bytes.truncate(c.len);
            }
            (w.session, w.seq, w.offset, bytes)
        });
        events(&mut rx, now, &mut disk, &mut size, &mut hash);
        if let Some((session, seq, offset, bytes)) = write {
            let end = offset.checked_add(bytes.len() as u64).expect("write end overflows");
            assert!(end <= size, "write {offset}..{end} outside the announced {size} bytes");
            if let Some(slot) = disk.get_mut(offset as usize..end as usize) {
                slot.copy_from_slice(&bytes);
            }
            rx.written(session, seq, bytes.len());
            events(&mut rx, now, &mut disk, &mut size, &mut hash);
        }
        rx.handle_timeout(now);
        events(&mut rx, now, &mut disk, &mut size, &mut hash);
        while rx.poll_transmit().is_some() {}

        tx.handle_datagram(now, from, &sealed);
        tx.handle_timeout(now);
        for _ in 0..64 {
            if tx.poll_transmit(now).is_none() {
                break;
            }
        }
        while tx.poll_event().is_some() {}
    }
});

fn events(
    rx: &mut Receiver,
    now: Instant,
    disk: &mut Vec<u8>,
    size: &mut u64,
    hash: &mut [u8; 32],
) {
    while let Some(e) = rx.poll_event() {
        match e {
            RxEvent::Started { info, resumed, .. } => {
                *size = info.size;
                *hash = info.hash;
                if !resumed {
                    disk.clear();
                    disk.resize(info.size.min(1 << 20) as usize, 0);
                }
            }
            RxEvent::Verify { session, info } => {
                let ok = info.size <= 1 << 20 && blake3::hash(disk).as_bytes() == &info.hash;
                rx.verified(now, session, ok);
            }
            RxEvent::Delivered { info, .. } => {
                assert!(
                    info.size <= 1 << 20 && blake3::hash(disk).as_bytes() == hash,
                    "delivered bytes differ from the announced hash"
                );
            }
            RxEvent::AlreadyHeld { .. } | RxEvent::Abandoned { .. } => {}
        }
    }
}
