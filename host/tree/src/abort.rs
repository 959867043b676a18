//! The manager's order to stop a run ([`AbortOrder`]), signed like a notification: a group
//! leader acts on it only after [`AbortOrder::verify`] against its pinned manager keys, so an
//! agent's token or certificate can carry an order the manager made but never make one. A GL
//! hands the signed order on to its members unchanged (they verify it too) when they ask about
//! the run or report on it.

use cm_assignment::sign::{ABORT_DOMAIN, SignatureError, SigningKey, TrustedKeys};
use serde::{Deserialize, Serialize};

use crate::message::{sign_json, verify_json};

/// "Stop run `run`": the GL stops fetching, forwarding and delivering it, and every server
/// discards the release the run prepared (live is never touched).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortOrder {
    pub run: u64,
    /// Who aborted and why, for the servers' logs ("aborted by an operator (token) at …").
    pub reason: String,
    /// When the manager issued the order (ms since the epoch).
    pub issued_ms: u64,
    /// The manager's signature (hex of key id ‖ Ed25519 signature) of the order's JSON without
    /// this field, under the domain `contentmover abort signature v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl AbortOrder {
    fn unsigned(&self) -> AbortOrder {
        AbortOrder { signature: None, ..self.clone() }
    }

    /// Signs the order with the manager's key.
    pub fn sign(&mut self, key: &SigningKey) {
        self.signature = Some(sign_json(ABORT_DOMAIN, &self.unsigned(), key));
    }

    /// Checks the manager's signature against the pinned keys.
    pub fn verify(&self, keys: &TrustedKeys) -> Result<(), SignatureError> {
        verify_json(ABORT_DOMAIN, &self.unsigned(), self.signature.as_deref(), keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use crate::message::Notification;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    #[test]
    fn an_order_verifies_only_unchanged_and_by_a_pinned_key() {
        let (k, other) = (key(), key());
        let pinned = TrustedKeys::new([k.public_key()]);
        let mut o = AbortOrder {
            run: 4,
            reason: "aborted by an operator".into(),
            issued_ms: 9,
            signature: None,
        };
        assert!(o.verify(&pinned).is_err(), "unsigned");
        o.sign(&k);
        let relayed: AbortOrder = serde_json::from_slice(&serde_json::to_vec(&o).unwrap()).unwrap();
        assert_eq!(relayed.verify(&pinned), Ok(()));
        let mut t = o.clone();
        t.run = 5;
        assert!(matches!(t.verify(&pinned), Err(SignatureError::Invalid { .. })));
        let mut forged = o.clone();
        forged.sign(&other);
        assert!(matches!(forged.verify(&pinned), Err(SignatureError::UnknownKey { .. })));
    }

    #[test]
    fn a_notification_signature_is_no_abort_signature() {
        // Domain separation: the signature of a notification never passes as an order's.
        let k = key();
        let pinned = TrustedKeys::new([k.public_key()]);
        let mut n = Notification {
            run: 4,
            segment: "s".into(),
            source: "http://m".into(),
            manager: "http://m".into(),
            manifest: Manifest::of_bytes(b"x", 1024),
            slots: 0,
            servers: vec![],
            site: "www".into(),
            cache: None,
            signature: None,
        };
        n.sign(&k);
        let o = AbortOrder { run: 4, reason: String::new(), issued_ms: 0, signature: n.signature };
        assert!(o.verify(&pinned).is_err());
    }
}
