//! Test plugin: passes its self-check, then never returns from a batch, so the host's
//! epoch-interruption deadline can be tested.

use cm_plugin_sdk::{Command, Interpreter};

struct Endless;

impl Interpreter for Endless {
    fn command(command: Command) -> Result<(), String> {
        let mut spins: u64 = 0;
        // `black_box` keeps the optimiser from proving the loop endless and deleting it.
        while std::hint::black_box(spins) != u64::MAX {
            spins = spins.wrapping_add(1) % (u64::MAX - 1);
        }
        cm_plugin_sdk::execute(command)
    }
}

cm_plugin_sdk::interpreter!(Endless);
