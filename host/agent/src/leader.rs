//! Group-leader duties on the segment: hand an assignment the tree delivered (cm-tree's
//! `LeaderNode`) to the segment's members with one MCTP session, and turn the session's report
//! into the GL's consolidated report (servers that succeeded, failed, missing).
//!
//! "Succeeded" here means the member holds the whole, verified assignment (MCTP's completion);
//! a member's apply result travels in its own report to the GL, which this module does not carry.

use cm_mctp::{Member, MemberId, SenderConfig};
use cm_tree::BoxFuture;
use cm_tree::leader::{DeliveryOutcome, LocalDelivery};
use cm_tree::manifest::Manifest;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::mctp::{SendOptions, send_file};

/// The segment as the GL knows it from registration.
#[derive(Debug, Clone)]
pub struct SegmentMembers {
    /// Server name → MCTP member id.
    pub members: BTreeMap<String, MemberId>,
}

/// Delivers by MCTP reliable multicast on the segment's data channel.
pub struct MctpDelivery {
    pub config: SenderConfig,
    pub interface: Ipv4Addr,
    pub ttl: u32,
    /// The cluster secret that authenticates MCTP datagrams.
    pub secret: Vec<u8>,
    pub segment: SegmentMembers,
}

impl LocalDelivery for MctpDelivery {
    fn deliver(
        &self,
        run: u64,
        assignment: PathBuf,
        manifest: Manifest,
    ) -> BoxFuture<'static, DeliveryOutcome> {
        let members: Vec<Member> =
            self.segment.members.values().map(|id| Member { id: *id, unicast: None }).collect();
        let names: BTreeMap<MemberId, String> =
            self.segment.members.iter().map(|(n, id)| (*id, n.clone())).collect();
        let opts = SendOptions {
            config: self.config.clone(),
            interface: self.interface,
            ttl: self.ttl,
            secret: self.secret.clone(),
            assignment: run,
            name: format!("run-{run}.assignment"),
            members,
            // The tree brought the assignment checked against this manifest: no need to hash
            // it again before the session starts.
            known_hash: blake3::Hash::from_hex(&manifest.blake3).ok().map(|h| *h.as_bytes()),
        };
        Box::pin(async move {
            let sent = send_file(&assignment, opts).await;
            crate::metrics::mctp_session(sent.as_ref().ok());
            match sent {
                Ok(out) => outcome_of(
                    &names,
                    &out.report.complete,
                    out.report.incomplete.iter().map(|(id, s)| (*id, format!("{s:?}"))),
                ),
                Err(e) => DeliveryOutcome {
                    failed: names
                        .values()
                        .map(|n| (n.clone(), format!("MCTP session failed: {e}")))
                        .collect(),
                    ..Default::default()
                },
            }
        })
    }
}

/// Maps an MCTP session report to server names: complete → succeeded, incomplete → failed with
/// what it lacked, never heard from → missing.
fn outcome_of(
    names: &BTreeMap<MemberId, String>,
    complete: &[MemberId],
    incomplete: impl Iterator<Item = (MemberId, String)>,
) -> DeliveryOutcome {
    let mut out = DeliveryOutcome::default();
    let mut seen = std::collections::BTreeSet::new();
    for id in complete {
        if let Some(n) = names.get(id) {
            out.succeeded.push(n.clone());
            seen.insert(*id);
        }
    }
    for (id, why) in incomplete {
        if let Some(n) = names.get(&id)
            && seen.insert(id)
        {
            out.failed.push((n.clone(), format!("MCTP incomplete: {why}")));
        }
    }
    out.missing =
        names.iter().filter(|(id, _)| !seen.contains(id)).map(|(_, n)| n.clone()).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_report_maps_to_server_names() {
        let names: BTreeMap<MemberId, String> =
            [(1, "a".to_string()), (2, "b".into()), (3, "c".into())].into();
        let o = outcome_of(&names, &[1, 9], [(2, "missing frames".to_string())].into_iter());
        assert_eq!(o.succeeded, ["a"]);
        assert_eq!(o.failed, [("b".to_string(), "MCTP incomplete: missing frames".to_string())]);
        assert_eq!(o.missing, ["c"]);
    }
}
