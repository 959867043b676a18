//! Arbitrary bytes into every MCTP decoder and both state machines. The input is also sealed
//! with the cluster key, so the fuzzer explores what lies behind the authentication tag (what
//! a member holding the key could send), not only the tag check.
#![no_main]

use cm_mctp::{Keys, Member, Receiver, ReceiverConfig, Sender, SenderConfig, SessionInfo, Time, wire};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let keys = Keys::derive(b"fuzz");
    let _ = wire::decode_body(data);
    let _ = wire::open(&keys, data);

    let mut sealed = data.to_vec();
    keys.mac().seal(&mut sealed);
    let from = "127.0.0.1:9".parse().unwrap();

    let mut rx = Receiver::new(ReceiverConfig::new(1), keys.clone(), rand_chacha::ChaCha8Rng::seed_from_u64(1));
    let mut buf = sealed.clone();
    if let Some(w) = rx.handle_datagram(Time::ZERO, from, &mut buf) {
        let (session, seq, len) = (w.session, w.seq, w.bytes.len());
        rx.written(session, seq, len);
    }
    rx.handle_timeout(Time::from_nanos(u64::MAX / 2));
    while rx.poll_event().is_some() {}

    let cfg = SenderConfig::new("239.1.1.1:5000".parse().unwrap(), 5001);
    let info = SessionInfo { assignment: 1, name: "f".into(), size: 100_000, hash: [0; 32] };
    let members = [Member { id: 1, unicast: None }];
    let mut tx = Sender::new(Time::ZERO, cfg, keys, rand_chacha::ChaCha8Rng::seed_from_u64(2), info, &members, None).unwrap();
    tx.handle_datagram(Time::ZERO, from, &sealed);
    tx.handle_timeout(Time::ZERO);
    while tx.poll_transmit(Time::ZERO).is_some() {}
});
