//! Test plugin: passes its self-check, then allocates (and touches) 1 MiB after 1 MiB until
//! the host's memory cap stops it.

use cm_plugin_sdk::{Command, Interpreter};

struct Hog;

impl Interpreter for Hog {
    fn command(command: Command) -> Result<(), String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xA5; 1 << 20]);
            if std::hint::black_box(hoard.len()) == usize::MAX {
                return cm_plugin_sdk::execute(command);
            }
        }
    }
}

cm_plugin_sdk::interpreter!(Hog);
