//! Test plugin: a hostile interpreter that tries to exhaust the host. The path of each command
//! names the attack; any other path is carried out normally.
//!
//! - `log-flood`: 100,000 records of 4 KiB (400 MiB), then the command itself.
//! - `hoard-handles`: opens `base.txt` 20,000 times and keeps every reader.
//! - `write-flood`: writes 1 MiB after 1 MiB (up to 1 GiB) into one file.
//! - `create-flood`: creates 100,000 empty files.
//!
//! Errors from the host are ignored, as a hostile plugin would: only the host's own limits
//! stop it.

use cm_plugin_sdk::{Command, Interpreter, log, staging};

struct Flood;

fn path(command: &Command) -> &str {
    match command {
        Command::MakeDir(c) => &c.path,
        Command::WriteFile(c) => &c.path,
        Command::ApplyDelta(c) => &c.path,
        Command::Remove(c) => &c.path,
        Command::Rename(c) => &c.from,
        Command::Symlink(c) => &c.path,
        Command::SetMode(c) => &c.path,
    }
}

impl Interpreter for Flood {
    fn command(command: Command) -> Result<(), String> {
        match path(&command) {
            "log-flood" => {
                let record = "x".repeat(4096);
                for _ in 0..100_000 {
                    log::write(log::Level::Info, &record);
                }
                cm_plugin_sdk::execute(command)
            }
            "hoard-handles" => {
                let mut hoard = Vec::new();
                for _ in 0..20_000 {
                    if let Ok(reader) = staging::open_file("base.txt") {
                        hoard.push(reader);
                    }
                }
                Err(format!("hoarded {} readers", hoard.len()))
            }
            "write-flood" => {
                let chunk = vec![0x5A; 1 << 20];
                let writer = staging::create_file("flood.bin").map_err(|e| e.message)?;
                for _ in 0..1024 {
                    let _ = writer.write(&chunk);
                }
                staging::FileWriter::finish(writer, 0o644, 0).map(drop).map_err(|e| e.message)
            }
            "create-flood" => {
                for i in 0..100_000 {
                    if let Ok(writer) = staging::create_file(&format!("f{i}")) {
                        let _ = staging::FileWriter::finish(writer, 0o644, 0);
                    }
                }
                Err("created files without bound".into())
            }
            _ => cm_plugin_sdk::execute(command),
        }
    }
}

cm_plugin_sdk::interpreter!(Flood);
