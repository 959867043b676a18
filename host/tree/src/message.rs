//! The tree's messages, JSON over HTTP: what the manager tells a group leader ([`Notification`],
//! [`NextChild`]), what a GL asks or tells the manager ([`TreeCall`], [`DiscoveryReport`],
//! [`SegmentReport`]) and what a member tells its GL ([`MemberApplyReport`]). Field names are the
//! wire format (`docs/manager.md`).

use cm_assignment::sign::{
    NOTIFICATION_DOMAIN, Signature, SignatureError, SigningKey, TrustedKeys,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::link::LinkRates;
use crate::manifest::Manifest;
use crate::member_state::PluginIdentity;
use crate::space::FsSpace;

/// What a group leader reports about its segment (seed: discovery). Sent on election, on every
/// join or leave, and periodically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryReport {
    /// The segment's name: stable when the GL changes (the key of the segment record).
    pub segment: String,
    /// The GL's server name.
    pub leader: String,
    /// `host:port` of the GL's tree endpoint (notifications and assignment serving).
    pub address: String,
    /// Location or time zone, e.g. "Europe/London"; used to keep nearby GLs together in the tree.
    pub location: String,
    /// Relative CPU power (higher is faster).
    pub cpu_power: u32,
    pub free_disk: u64,
    pub connections: u32,
    /// Registered members, the GL included when it also serves content.
    pub members: Vec<String>,
    /// The GL's link speeds as measured from its transfers; the manager shapes the tree with them.
    #[serde(default)]
    pub links: Option<LinkRates>,
    /// The interpreter plugin of each member that reported one to this GL (`member_state`):
    /// relayed, never acted on; the manager checks and stores it per server.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginIdentity>,
    /// The free space and inodes of each member's site root filesystem, as it reported them to
    /// this GL (`member_state`): relayed; the manager checks them against what a run will write.
    #[serde(default)]
    pub spaces: BTreeMap<String, FsSpace>,
}

/// A GL's consolidated report for one run (seed: GL Assignment Status Report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentReport {
    pub segment: String,
    pub leader: String,
    pub succeeded: Vec<String>,
    /// (server, reason)
    pub failed: Vec<(String, String)>,
    pub missing: Vec<String>,
    /// The hosted site of the run (from its notification): what the servers that succeeded
    /// now hold is that site's. Empty from an older GL.
    #[serde(default)]
    pub site: String,
}

/// What a member did with one run's assignment, sent to its current GL: the apply outcome
/// (not just "received"), so the GL's consolidated report says which servers hold it applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberApplyReport {
    /// The member's server name (its election registration name).
    pub server: String,
    /// Its election node id (= its MCTP member id).
    pub node: u64,
    pub run: u64,
    /// `None`: applied; `Some(reason)`: the apply failed and live is unchanged.
    pub error: Option<String>,
    /// The member site's live release after the apply.
    pub live: Option<u64>,
    /// One line on what the apply did (release built, live switched, already applied).
    #[serde(default)]
    pub summary: String,
    /// The hosted site the assignment named (its header), whose root the apply went to; `live`
    /// is that site's. Empty when the header could not be read, or from an older member.
    #[serde(default)]
    pub site: String,
}

/// Seed: the notification message. Tells a GL where to fetch the assignment and how to go on.
///
/// Signed by the manager ([`Notification::sign`]): every field is covered, so a GL relays it
/// unchanged and only the manager can originate one; a GL acts on it only after
/// [`Notification::verify`] against its pinned manager keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub run: u64,
    /// The recipient's segment.
    pub segment: String,
    /// Base URL of the parent to fetch from (`http://host:port`): the manager or another GL.
    pub source: String,
    /// Base URL of the manager (for "next", "received", reports).
    pub manager: String,
    pub manifest: Manifest,
    /// Children the recipient serves at once; 0 = it forwards to no one (a star).
    pub slots: usize,
    /// The servers of the recipient's segment this run targets (the manager counts only their
    /// outcomes); empty = every member (older managers).
    #[serde(default)]
    pub servers: Vec<String>,
    /// The hosted site of the run. Signed with the rest; the assignment's header names the
    /// same site under the manager's signature, and that is what servers apply by.
    #[serde(default)]
    pub site: String,
    /// For a run that changes what is live (commit, rollback, switch): what the GL tells its
    /// segment's caches once the servers committed (`crate::cache`). Signed with the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::cache::CacheOrder>,
    /// The manager's signature (hex of key id ‖ Ed25519 signature) of the notification's JSON
    /// without this field, under the domain `contentmover notification signature v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// The manager's signature of a message: over `domain`, then the JSON of the message without
/// its signature field (`unsigned`), every other field in declaration order. Hex of key id ‖
/// Ed25519 signature.
pub(crate) fn sign_json<T: Serialize>(domain: &[u8], unsigned: &T, key: &SigningKey) -> String {
    // Serialising plain strings, integers and vectors cannot fail.
    key.sign(domain, &serde_json::to_vec(unsigned).unwrap_or_default()).to_hex()
}

/// Checks a [`sign_json`] signature against the pinned keys (`None`: not signed).
pub(crate) fn verify_json<T: Serialize>(
    domain: &[u8],
    unsigned: &T,
    signature: Option<&str>,
    keys: &TrustedKeys,
) -> Result<(), SignatureError> {
    let sig = signature.ok_or(SignatureError::Malformed("not signed"))?;
    let bytes = serde_json::to_vec(unsigned).unwrap_or_default();
    keys.verify(domain, &bytes, &Signature::from_hex(sig)?)
}

impl Notification {
    fn unsigned(&self) -> Notification {
        Notification { signature: None, ..self.clone() }
    }

    /// Signs (or re-signs) the notification with the manager's key.
    pub fn sign(&mut self, key: &SigningKey) {
        self.signature = Some(sign_json(NOTIFICATION_DOMAIN, &self.unsigned(), key));
    }

    /// Checks the manager's signature against the pinned keys.
    pub fn verify(&self, keys: &TrustedKeys) -> Result<(), SignatureError> {
        verify_json(NOTIFICATION_DOMAIN, &self.unsigned(), self.signature.as_deref(), keys)
    }
}

/// Manager's answer to a GL's "whom next?": `child: null` is the seed's null address (done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextChild {
    pub child: Option<ChildTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildTarget {
    pub segment: String,
    /// `host:port` of the child's tree endpoint.
    pub address: String,
    pub notification: Notification,
}

/// Body of the tree endpoints a GL calls on the manager (`next`, `received`, `dead`, `reparent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeCall {
    /// The calling GL's segment (for `dead`: the child it could not reach).
    pub segment: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    #[test]
    fn a_notification_verifies_only_unchanged_and_by_a_pinned_key() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let other = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let pinned = TrustedKeys::new([key.public_key()]);
        let mut n = Notification {
            run: 7,
            segment: "s".into(),
            source: "http://m".into(),
            manager: "http://m".into(),
            manifest: Manifest::of_bytes(b"abc", 1024),
            slots: 1,
            servers: vec!["a".into()],
            site: "www".into(),
            cache: None,
            signature: None,
        };
        assert!(n.verify(&pinned).is_err());
        n.sign(&key);
        // Relayed as JSON, unchanged: still verifies.
        let relayed: Notification =
            serde_json::from_slice(&serde_json::to_vec(&n).unwrap()).unwrap();
        assert_eq!(relayed.verify(&pinned), Ok(()));
        for tamper in [
            |n: &mut Notification| n.source = "http://attacker".into(),
            |n: &mut Notification| n.servers.clear(),
            |n: &mut Notification| n.manifest = Manifest::of_bytes(b"evil", 1024),
            |n: &mut Notification| n.run += 1,
            |n: &mut Notification| n.site = "shop".into(),
            // The cache order is signed too: a relay cannot make a GL purge other paths.
            |n: &mut Notification| {
                n.cache = Some(crate::cache::CacheOrder {
                    site: "www".into(),
                    from: Some(1),
                    to: 2,
                    change: crate::cache::CacheChange::Site { reason: "forged".into() },
                })
            },
        ] {
            let mut t = n.clone();
            tamper(&mut t);
            assert!(matches!(t.verify(&pinned), Err(SignatureError::Invalid { .. })));
        }
        let mut forged = n.clone();
        forged.sign(&other);
        assert!(matches!(forged.verify(&pinned), Err(SignatureError::UnknownKey { .. })));
    }
}
