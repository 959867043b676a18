//! Costs of the sans-IO core: sealing and opening one heartbeat, and one whole simulated
//! scenario (a few thousand datagrams through N state machines).
//! `cargo bench -p cm-election --bench election_core`

use std::hint::black_box;

use cm_election::wire::{self, Header, Message};
use cm_election::{ClaimKey, Config, Priority};
use criterion::{Criterion, criterion_group, criterion_main};

fn codec(c: &mut Criterion) {
    let key = Config::derive_key(b"bench secret");
    let msg = Message::LeaderAlive {
        key: ClaimKey { rank: 0, incumbent: true, priority: Priority(12345), node: 7 },
        members: 40,
        payload: vec![0; 64],
    };
    let header = Header { cluster: 1, sender: 7, incarnation: 1, seq: 99 };
    let sealed = wire::seal(&key, &header, &msg).unwrap();
    c.bench_function("seal leader alive (64-byte payload)", |b| {
        b.iter(|| wire::seal(&key, black_box(&header), black_box(&msg)))
    });
    c.bench_function("open leader alive (64-byte payload)", |b| {
        b.iter(|| wire::open(&key, 1, black_box(&sealed)))
    });
}

fn scenario(c: &mut Criterion) {
    let mut seed = 0;
    c.bench_function("one simulated scenario", |b| {
        b.iter(|| {
            seed += 1;
            cm_election::sim::run_scenario(seed).unwrap()
        })
    });
}

criterion_group!(benches, codec, scenario);
criterion_main!(benches);
