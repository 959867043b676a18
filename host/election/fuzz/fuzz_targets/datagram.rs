//! Arbitrary bytes through the election's decoders and into a live state machine.
//!
//! - `decode_body` (the parser behind the MAC) must never panic and must round-trip whatever
//!   it accepts;
//! - `open` with the real key must never panic, nor must the restart state decoder
//!   (`RestartState::decode`), which must round-trip whatever it accepts;
//! - the same bytes, re-sealed with the cluster key so they pass authentication, fed to an
//!   `Election` must never panic and never leave a timer in the past.
#![no_main]

use std::time::Duration;

use cm_election::wire::{self, Header};
use cm_election::{Config, Election, Instant, RestartState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = RestartState::decode(data) {
        assert_eq!(RestartState::decode(&state.encode()), Ok(state));
    }
    let Some((&kind, body)) = data.split_first() else { return };
    let sender = 9;
    let cfg = Config::new(
        1,
        7,
        1,
        b"fuzz secret",
        "239.1.1.1:7000".parse().unwrap(),
        Duration::from_millis(100),
    );
    let _ = wire::open(&cfg.key, 1, data);
    let Ok(msg) = wire::decode_body(kind, sender, body) else { return };
    let header = Header { cluster: 1, sender, incarnation: 1, seq: 1 };
    let sealed = wire::seal(&cfg.key, &header, &msg).expect("a decoded message re-encodes");
    let (h2, m2) = wire::open(&cfg.key, 1, &sealed).expect("a sealed message opens");
    assert_eq!(h2, header);
    assert_eq!(m2, msg);

    let mut e = Election::new(cfg, Instant::ZERO, 1).unwrap();
    let now = Instant::from_origin(Duration::from_millis(50));
    let _ = e.handle_datagram(now, "10.0.0.9:7000".parse().unwrap(), &sealed);
    e.handle_timeout(now);
    assert!(e.poll_timeout().is_none_or(|t| t > now));
    while e.poll_transmit().is_some() {}
    while e.poll_event().is_some() {}
});
