//! Deterministic simulation: 10,000 seeded scenarios (loss, duplication, reordering, delay,
//! partitions that heal, crashes and restarts, forged and replayed packets), every invariant
//! checked on every step. A failure names its seed and the command that replays it.
//!
//! `SEEDS=n` changes the number of seeds per shard (4 shards), `SEED=s` replays one seed
//! (`cargo test -p cm-election --test sim replay -- --nocapture`).

use std::time::Duration;

use cm_election::sim::run_scenario;

const SHARDS: u64 = 4;
const DEFAULT_SEEDS_PER_SHARD: u64 = 2_500;

fn seeds_per_shard() -> u64 {
    std::env::var("SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEEDS_PER_SHARD)
}

fn run_shard(shard: u64) {
    let per = seeds_per_shard();
    let mut worst = Duration::ZERO;
    let mut failovers = 0;
    for seed in (shard * per..(shard + 1) * per).map(|s| s * SHARDS + shard) {
        match run_scenario(seed) {
            Ok(o) => {
                if let Some(f) = o.failover {
                    worst = worst.max(f);
                    failovers += 1;
                }
            }
            Err(e) => panic!(
                "simulation seed {seed} failed: {e}\n  replay: SEED={seed} cargo test -p cm-election --test sim replay -- --nocapture"
            ),
        }
    }
    assert!(failovers > per / 2, "most scenarios must exercise a failover ({failovers} of {per})");
    eprintln!(
        "shard {shard}: {per} seeds, {failovers} failovers, worst failover {worst:?} (virtual)"
    );
}

#[test]
fn seeds_shard_0() {
    run_shard(0);
}
#[test]
fn seeds_shard_1() {
    run_shard(1);
}
#[test]
fn seeds_shard_2() {
    run_shard(2);
}
#[test]
fn seeds_shard_3() {
    run_shard(3);
}

/// Replays the seed in `SEED` (no-op without it).
#[test]
fn replay() {
    let Some(seed) = std::env::var("SEED").ok().and_then(|s| s.parse().ok()) else { return };
    match run_scenario(seed) {
        Ok(o) => eprintln!("seed {seed} passed: {o:?}"),
        Err(e) => panic!("seed {seed} failed: {e}"),
    }
}
