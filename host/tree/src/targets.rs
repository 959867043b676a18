//! A member's check that a run targets it, on the manager's word rather than its GL's.
//!
//! The multicast data channel brings every run to every member; the GL says which servers a
//! run is for (`GET /dist/{run}/servers`). That answer alone would let a compromised GL hand a
//! genuine, manager-signed commit (or rollback, switch, remove-site) to members the run did
//! not target — a rolling switch's other groups, say. So the GL also returns the run's
//! [`Notification`], which the manager signed and which names the segment's target servers
//! and the assignment's BLAKE3: a member that pins the manager's keys applies a run only when
//! that notification verifies, is for this run, names this server and describes exactly the
//! file it received.

use cm_assignment::TrustedKeys;
use thiserror::Error;

use crate::message::Notification;

/// Why a member does not take a run as its own.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("the group leader gave no signed notification for run {run}")]
    Missing { run: u64 },
    #[error("the run's notification is not the manager's: {0}")]
    Signature(String),
    #[error("the notification is for run {found}, not run {run}")]
    OtherRun { run: u64, found: u64 },
    #[error("the notification describes another assignment (blake3 {want}, received {got})")]
    OtherFile { want: String, got: String },
    #[error("run {run} targets {targets}, not this server")]
    NotNamed { run: u64, targets: String },
}

/// Checks that the manager's `notification` of `run` names `me` and describes the received
/// assignment (`received_blake3`, hex).
pub fn confirm(
    notification: Option<&Notification>,
    keys: &TrustedKeys,
    run: u64,
    received_blake3: &str,
    me: &str,
) -> Result<(), TargetError> {
    let n = notification.ok_or(TargetError::Missing { run })?;
    n.verify(keys).map_err(|e| TargetError::Signature(e.to_string()))?;
    if n.run != run {
        return Err(TargetError::OtherRun { run, found: n.run });
    }
    if n.manifest.blake3 != received_blake3 {
        return Err(TargetError::OtherFile {
            want: n.manifest.blake3.clone(),
            got: received_blake3.to_string(),
        });
    }
    // An empty list (managers before targets were named) means every member; a signed,
    // non-empty list must name this server.
    if !n.servers.is_empty() && !n.servers.iter().any(|s| s == me) {
        return Err(TargetError::NotNamed { run, targets: n.servers.join(", ") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use cm_assignment::SigningKey;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    fn notification(run: u64, servers: &[&str], k: &SigningKey) -> Notification {
        let mut n = Notification {
            run,
            segment: "seg0".into(),
            source: "http://m".into(),
            manager: "http://m".into(),
            manifest: Manifest { size: 1, chunk_size: 1, blake3: "ab".into(), chunks: vec![] },
            slots: 0,
            servers: servers.iter().map(|s| s.to_string()).collect(),
            site: "www".into(),
            cache: None,
            signature: None,
        };
        n.sign(k);
        n
    }

    #[test]
    fn only_a_signed_notification_naming_this_server_and_file_confirms() {
        let k = key();
        let keys = TrustedKeys::new([k.public_key()]);
        let n = notification(7, &["a", "b"], &k);
        assert_eq!(confirm(Some(&n), &keys, 7, "ab", "a"), Ok(()));
        assert!(matches!(
            confirm(Some(&n), &keys, 7, "ab", "c"),
            Err(TargetError::NotNamed { .. })
        ));
        assert!(matches!(
            confirm(Some(&n), &keys, 8, "ab", "a"),
            Err(TargetError::OtherRun { .. })
        ));
        assert!(matches!(
            confirm(Some(&n), &keys, 7, "cd", "a"),
            Err(TargetError::OtherFile { .. })
        ));
        assert_eq!(confirm(None, &keys, 7, "ab", "a"), Err(TargetError::Missing { run: 7 }));
        // A GL rewriting the list (to add a server) breaks the manager's signature.
        let mut forged = n.clone();
        forged.servers.push("c".into());
        assert!(matches!(
            confirm(Some(&forged), &keys, 7, "ab", "c"),
            Err(TargetError::Signature(_))
        ));
        // Signed by another key.
        let other = notification(7, &["c"], &key());
        assert!(matches!(
            confirm(Some(&other), &keys, 7, "ab", "c"),
            Err(TargetError::Signature(_))
        ));
    }
}
