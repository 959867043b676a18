//! Arbitrary bytes as every JSON message a tree node reads from a peer, and as a `Range` header.
//!
//! - No decoder panics; whatever decodes re-encodes and decodes to the same value.
//! - A notification decoded from arbitrary bytes never verifies under a key the input cannot
//!   know; signed with that key, it does (the signed bytes are a function of the value).
//! - A manifest that validates can be used: chunk lengths and checks of any bytes never panic
//!   (its sizes come from the network, so nothing may trust them before `validate`).
#![no_main]

use cm_assignment::sign::{SigningKey, TrustedKeys};
use cm_tree::http::parse_range_start;
use cm_tree::manifest::Manifest;
use cm_tree::message::{
    DiscoveryReport, MemberApplyReport, NextChild, Notification, SegmentReport, TreeCall,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::OnceLock;

fn key() -> &'static (SigningKey, TrustedKeys) {
    static KEY: OnceLock<(SigningKey, TrustedKeys)> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let trusted = TrustedKeys::new([key.public_key()]);
        (key, trusted)
    })
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    data: &[u8],
) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let again: T = serde_json::from_slice(&serde_json::to_vec(&value).expect("encodes"))
        .expect("what decoded re-decodes");
    assert_eq!(again, value);
    Some(value)
}

fn use_manifest(m: &Manifest, data: &[u8]) {
    if m.validate().is_err() {
        return;
    }
    let count = m.chunk_count();
    for index in [0, 1, count.saturating_sub(1), count] {
        if index < count {
            let _ = m.chunk_len(index);
            let _ = m.verify_chunk(index, data);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(m) = round_trip::<Manifest>(data) {
        use_manifest(&m, data);
    }
    if let Some(mut n) = round_trip::<Notification>(data) {
        use_manifest(&n.manifest, data);
        let (signing, trusted) = key();
        assert!(n.verify(trusted).is_err(), "a notification from raw bytes verified");
        n.sign(signing);
        n.verify(trusted).expect("a notification signed with the pinned key verifies");
    }
    if let Some(next) = round_trip::<NextChild>(data) {
        if let Some(child) = next.child {
            use_manifest(&child.notification.manifest, data);
        }
    }
    round_trip::<DiscoveryReport>(data);
    round_trip::<SegmentReport>(data);
    round_trip::<MemberApplyReport>(data);
    round_trip::<TreeCall>(data);
    if let Ok(header) = std::str::from_utf8(data) {
        let _ = parse_range_start(header);
    }
});
