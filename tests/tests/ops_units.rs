//! The systemd units in packaging/systemd pass `systemd-analyze verify` (with the built
//! `cmover` in place of /usr/bin/cmover). Skipped where systemd-analyze is missing.

use std::process::Command;

use cm_tests::{cmover_bin, missing_part, workspace_root};

#[test]
fn the_units_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        missing_part("systemd-analyze (Debian package systemd) to verify the units");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = cmover_bin();
    for unit in ["cmover-manager.service", "cmover-agent.service"] {
        let text =
            std::fs::read_to_string(workspace_root().join("packaging/systemd").join(unit)).unwrap();
        assert!(text.contains("Type=notify") && text.contains("ExecReload="), "{unit}");
        let text = text.replace("/usr/bin/cmover", bin.to_str().unwrap());
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        // Lines about the host's own units (not ours) are not this test's business.
        let ours: Vec<&str> = said.lines().filter(|l| l.contains(unit)).collect();
        assert!(out.status.success() && ours.is_empty(), "{unit}: {said}");
    }
}
