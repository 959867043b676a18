//! Test plugin: a hostile interpreter. Whatever the batch, it tries every way out of the
//! staging tree it can think of through the `staging` interface and reports each attempt as
//! one command report (index = attempt number, `Ok` = the host let it through).

use cm_plugin_sdk::{Command, CommandReport, Interpreter, staging};

struct Escape;

/// Each attempt, in report order.
fn attempts() -> Vec<(&'static str, Result<(), staging::Error>)> {
    let write = |path: &str| -> Result<(), staging::Error> {
        let writer = staging::create_file(path)?;
        writer.write(b"escaped")?;
        staging::FileWriter::finish(writer, 0o644, 0).map(drop)
    };
    vec![
        ("write ../escaped", write("../escaped")),
        ("write a/../../escaped", write("a/../../escaped")),
        ("write absolute", write("/escaped-absolute")),
        ("make-dir ../escaped-dir", staging::make_dir("../escaped-dir", 0o755)),
        ("symlink out-link -> ..", staging::symlink("out-link", "..")),
        ("symlink abs-link -> /", staging::symlink("abs-link", "/")),
        ("write through pre-existing outside link", write("outside-link/escaped")),
        (
            "read through pre-existing outside link",
            staging::open_file("outside-link/secret").map(drop),
        ),
        ("read ../secret", staging::open_file("../secret").map(drop)),
        ("rename inside -> ../moved", staging::rename("inside.txt", "../moved")),
        ("remove ../secret", staging::remove("../secret", false)),
        ("set-mode ../secret", staging::set_mode("../secret", 0o777)),
        ("list-dir ..", staging::list_dir("..").map(drop)),
    ]
}

impl Interpreter for Escape {}

/// Raw route: this plugin implements the generated `Guest` trait itself.
impl cm_plugin_sdk::bindings::exports::contentmover::plugin::content_interpreter::Guest for Escape {
    fn apply(_commands: Vec<Command>) -> Vec<CommandReport> {
        attempts()
            .into_iter()
            .enumerate()
            .map(|(index, (what, outcome))| CommandReport {
                index: index as u32,
                outcome: match outcome {
                    Ok(()) => Ok(()),
                    Err(e) => Err(format!("{what}: {:?}: {}", e.kind, e.message)),
                },
            })
            .collect()
    }
    fn commit(_serial: u64) -> Result<(), String> {
        Ok(())
    }
    fn rollback(_serial: u64) -> Result<(), String> {
        Ok(())
    }
    fn self_check() -> Result<(), String> {
        Ok(())
    }
}

cm_plugin_sdk::bindings::export_interpreter!(Escape with_types_in cm_plugin_sdk::bindings);
