//! The election's datagrams: layout, encoding and authenticated decoding.
//!
//! Every datagram is `header ‖ body ‖ tag` (all integers big-endian, see `docs/election.md`):
//!
//! ```text
//! magic "CMEL" (4) | version u8 = 1 | kind u8 | cluster u64 | sender u64 | incarnation u64 | seq u64
//! body (per kind)
//! tag: 16 bytes of keyed BLAKE3 over everything before it (cm_wire::mac)
//! ```
//!
//! [`open`] checks, in order: length and magic/version (malformed), cluster id (foreign), tag
//! (forged), body (malformed). Replay is the state machine's business ([`crate::replay`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use cm_wire::mac::{MacKey, TAG_LEN};
use cm_wire::{DecodeError, EncodeError, Reader, Writer};

use crate::config::Registration;
use crate::priority::{ClaimKey, NodeId, Priority};

pub const MAGIC: [u8; 4] = *b"CMEL";
pub const VERSION: u8 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 4 + 1 + 1 + 8 * 4;
/// Largest heartbeat payload carried for other protocols.
pub const MAX_PAYLOAD: usize = 1024;
/// Most member ids in one report page (8 KiB of ids keeps a page in one jumbo-free datagram
/// plus IP fragments; larger segments use several pages).
pub const MAX_REPORT_IDS: usize = 1000;
pub const MAX_NAME: usize = 255;
pub const MAX_ADDRESS: usize = 128;
pub const MAX_GROUPS: usize = 32;
pub const MAX_GROUP_NAME: usize = 64;

/// Who sent a datagram and where it sits in the sender's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub cluster: u64,
    pub sender: NodeId,
    pub incarnation: u64,
    pub seq: u64,
}

/// What a member says about itself when registering.
pub type RegisterBody = Registration;

/// One page of the leader's list of registered members. Ids are sorted; the page speaks for
/// every id in `lo..=hi`, so a member whose id is in that range and not listed knows it is
/// missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    pub round: u32,
    pub lo: NodeId,
    pub hi: NodeId,
    pub members: Vec<NodeId>,
}

/// The election's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// "Leader Alive": the leader's heartbeat, with an opaque payload for other protocols.
    LeaderAlive { key: ClaimKey, members: u32, payload: Vec<u8> },
    /// "Leader Claim": a vote for oneself with the claim's strength.
    LeaderClaim { key: ClaimKey },
    /// A member registers (or refreshes its registration) with `leader`.
    Register { leader: NodeId, registration: RegisterBody },
    /// A member leaves `leader`'s group; when `leader` is the sender itself, the leader resigns.
    Leave { leader: NodeId },
    /// The leader's list of registered members.
    MemberReport(MemberReport),
    /// The leader moves everyone to another control channel. `epoch` only grows.
    ChannelMove { epoch: u32, channel: SocketAddr },
    /// The leader's data channel for each content group.
    DataChannels { channels: Vec<(String, SocketAddr)> },
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::LeaderAlive { .. } => 1,
            Message::LeaderClaim { .. } => 2,
            Message::Register { .. } => 3,
            Message::Leave { .. } => 4,
            Message::MemberReport(_) => 5,
            Message::ChannelMove { .. } => 6,
            Message::DataChannels { .. } => 7,
        }
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("malformed election datagram: {0}")]
    Malformed(DecodeError),
    #[error("datagram for another cluster ({0:#x})")]
    ForeignCluster(u64),
    #[error("bad authentication tag (forged, corrupted or wrong secret)")]
    BadTag,
    #[error("replayed or duplicated datagram")]
    Replay,
    #[error("our own datagram looped back")]
    Own,
}

fn write_key(w: &mut Writer, key: &ClaimKey) {
    w.u8(key.rank).bool(key.incumbent).u32(key.priority.0);
}

fn read_key(r: &mut Reader<'_>, node: NodeId) -> Result<ClaimKey, DecodeError> {
    Ok(ClaimKey { rank: r.u8()?, incumbent: r.bool()?, priority: Priority(r.u32()?), node })
}

pub(crate) fn write_addr(w: &mut Writer, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => w.u8(4).bytes(&ip.octets()),
        IpAddr::V6(ip) => w.u8(6).bytes(&ip.octets()),
    };
    w.u16(a.port());
}

pub(crate) fn read_addr(r: &mut Reader<'_>) -> Result<SocketAddr, DecodeError> {
    let ip = match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
        6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
        _ => return Err(DecodeError::malformed("address family not 4 or 6")),
    };
    Ok(SocketAddr::new(ip, r.u16()?))
}

/// Checks the limits a registration must respect to be encodable.
pub fn check_registration(reg: &Registration) -> Result<(), &'static str> {
    if reg.name.len() > MAX_NAME {
        return Err("name longer than 255 bytes");
    }
    if reg.address.len() > MAX_ADDRESS {
        return Err("address longer than 128 bytes");
    }
    if reg.content_groups.len() > MAX_GROUPS {
        return Err("more than 32 content groups");
    }
    if reg.content_groups.iter().any(|g| g.len() > MAX_GROUP_NAME) {
        return Err("content group name longer than 64 bytes");
    }
    Ok(())
}

fn encode_body(w: &mut Writer, msg: &Message) -> Result<(), EncodeError> {
    match msg {
        Message::LeaderAlive { key, members, payload } => {
            write_key(w, key);
            w.u32(*members);
            if payload.len() > MAX_PAYLOAD {
                return Err(EncodeError {
                    what: "heartbeat payload",
                    len: payload.len(),
                    max: MAX_PAYLOAD,
                });
            }
            w.bytes16("heartbeat payload", payload)?;
        }
        Message::LeaderClaim { key } => write_key(w, key),
        Message::Register { leader, registration: reg } => {
            w.u64(*leader);
            w.str16("name", &reg.name)?.str16("address", &reg.address)?;
            w.u16(reg.cpu_cores).u32(reg.cpu_mhz).u64(reg.free_disk_mib);
            if reg.content_groups.len() > MAX_GROUPS {
                return Err(EncodeError {
                    what: "content groups",
                    len: reg.content_groups.len(),
                    max: MAX_GROUPS,
                });
            }
            w.u8(reg.content_groups.len() as u8);
            for g in &reg.content_groups {
                w.str16("content group", g)?;
            }
        }
        Message::Leave { leader } => {
            w.u64(*leader);
        }
        Message::MemberReport(rep) => {
            if rep.members.len() > MAX_REPORT_IDS {
                return Err(EncodeError {
                    what: "report members",
                    len: rep.members.len(),
                    max: MAX_REPORT_IDS,
                });
            }
            w.u32(rep.round).u64(rep.lo).u64(rep.hi).u16(rep.members.len() as u16);
            for id in &rep.members {
                w.u64(*id);
            }
        }
        Message::ChannelMove { epoch, channel } => {
            w.u32(*epoch);
            write_addr(w, channel);
        }
        Message::DataChannels { channels } => {
            if channels.len() > usize::from(u8::MAX) {
                return Err(EncodeError {
                    what: "data channels",
                    len: channels.len(),
                    max: u8::MAX.into(),
                });
            }
            w.u8(channels.len() as u8);
            for (group, addr) in channels {
                w.str16("content group", group)?;
                write_addr(w, addr);
            }
        }
    }
    Ok(())
}

/// Decodes a body of `kind` sent by `sender`. Public for the fuzz target: callers normally go
/// through [`open`], which authenticates first.
pub fn decode_body(kind: u8, sender: NodeId, body: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader::new(body);
    let msg = match kind {
        1 => {
            let key = read_key(&mut r, sender)?;
            let members = r.u32()?;
            let payload = r.bytes16(MAX_PAYLOAD)?.to_vec();
            Message::LeaderAlive { key, members, payload }
        }
        2 => Message::LeaderClaim { key: read_key(&mut r, sender)? },
        3 => {
            let leader = r.u64()?;
            let name = r.str16(MAX_NAME)?.to_owned();
            let address = r.str16(MAX_ADDRESS)?.to_owned();
            let cpu_cores = r.u16()?;
            let cpu_mhz = r.u32()?;
            let free_disk_mib = r.u64()?;
            let n = usize::from(r.u8()?);
            if n > MAX_GROUPS {
                return Err(DecodeError::malformed("more than 32 content groups"));
            }
            let mut content_groups = Vec::with_capacity(n);
            for _ in 0..n {
                content_groups.push(r.str16(MAX_GROUP_NAME)?.to_owned());
            }
            Message::Register {
                leader,
                registration: Registration {
                    name,
                    address,
                    cpu_cores,
                    cpu_mhz,
                    free_disk_mib,
                    content_groups,
                },
            }
        }
        4 => Message::Leave { leader: r.u64()? },
        5 => {
            let round = r.u32()?;
            let lo = r.u64()?;
            let hi = r.u64()?;
            let n = usize::from(r.u16()?);
            if n > MAX_REPORT_IDS {
                return Err(DecodeError::malformed("report page over 1000 members"));
            }
            if lo > hi {
                return Err(DecodeError::malformed("report range reversed"));
            }
            // Bounded by n <= MAX_REPORT_IDS before allocating.
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.u64()?;
                if id < lo || id > hi || members.last().is_some_and(|&prev| prev >= id) {
                    return Err(DecodeError::malformed(
                        "report ids unsorted or outside their range",
                    ));
                }
                members.push(id);
            }
            Message::MemberReport(MemberReport { round, lo, hi, members })
        }
        6 => Message::ChannelMove { epoch: r.u32()?, channel: read_addr(&mut r)? },
        7 => {
            let n = usize::from(r.u8()?);
            let mut channels = Vec::with_capacity(n);
            for _ in 0..n {
                let group = r.str16(MAX_GROUP_NAME)?.to_owned();
                channels.push((group, read_addr(&mut r)?));
            }
            Message::DataChannels { channels }
        }
        _ => return Err(DecodeError::malformed("unknown message kind")),
    };
    r.finish()?;
    Ok(msg)
}

/// Encodes and authenticates one datagram.
pub fn seal(key: &MacKey, header: &Header, msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut w = Writer::with_capacity(HEADER_LEN + 64 + TAG_LEN);
    w.bytes(&MAGIC).u8(VERSION).u8(msg.kind());
    w.u64(header.cluster).u64(header.sender).u64(header.incarnation).u64(header.seq);
    encode_body(&mut w, msg)?;
    let mut out = w.into_vec();
    key.seal(&mut out);
    Ok(out)
}

/// The header of a datagram, read without checking its tag: only for datagrams already
/// authenticated (e.g. one [`crate::Election::handle_datagram`] accepted), to name them cheaply.
pub fn peek_header(datagram: &[u8]) -> Option<Header> {
    let mut r = Reader::new(datagram);
    // magic, version, kind: not checked here.
    r.bytes(MAGIC.len() + 2).ok()?;
    Some(Header {
        cluster: r.u64().ok()?,
        sender: r.u64().ok()?,
        incarnation: r.u64().ok()?,
        seq: r.u64().ok()?,
    })
}

/// Checks and decodes one datagram for `cluster`. Never panics, whatever the input.
pub fn open(key: &MacKey, cluster: u64, datagram: &[u8]) -> Result<(Header, Message), DropReason> {
    let mut r = Reader::new(datagram);
    let magic = r.array::<4>().map_err(DropReason::Malformed)?;
    if magic != MAGIC {
        return Err(DropReason::Malformed(DecodeError::malformed("bad magic")));
    }
    let version = r.u8().map_err(DropReason::Malformed)?;
    if version != VERSION {
        return Err(DropReason::Malformed(DecodeError::malformed("unsupported version")));
    }
    let kind = r.u8().map_err(DropReason::Malformed)?;
    let header = (|| {
        Ok::<_, DecodeError>(Header {
            cluster: r.u64()?,
            sender: r.u64()?,
            incarnation: r.u64()?,
            seq: r.u64()?,
        })
    })()
    .map_err(DropReason::Malformed)?;
    if r.remaining() < TAG_LEN {
        return Err(DropReason::Malformed(DecodeError::Incomplete {
            needed: TAG_LEN - r.remaining(),
        }));
    }
    if header.cluster != cluster {
        return Err(DropReason::ForeignCluster(header.cluster));
    }
    key.open(datagram).ok_or(DropReason::BadTag)?;
    // What follows the header, up to the tag.
    let body = r.bytes(r.remaining() - TAG_LEN).map_err(DropReason::Malformed)?;
    let msg = decode_body(kind, header.sender, body).map_err(DropReason::Malformed)?;
    Ok((header, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> MacKey {
        MacKey::derive(crate::config::KEY_CONTEXT, b"test secret")
    }

    fn arb_key(node: NodeId) -> impl Strategy<Value = ClaimKey> {
        (any::<u8>(), any::<bool>(), any::<u32>()).prop_map(move |(rank, incumbent, p)| ClaimKey {
            rank,
            incumbent,
            priority: Priority(p),
            node,
        })
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
        ]
    }

    fn arb_message(sender: NodeId) -> impl Strategy<Value = Message> {
        let group = "[a-z]{0,64}";
        prop_oneof![
            (
                arb_key(sender),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD)
            )
                .prop_map(|(key, members, payload)| Message::LeaderAlive {
                    key,
                    members,
                    payload
                }),
            arb_key(sender).prop_map(|key| Message::LeaderClaim { key }),
            (
                any::<u64>(),
                ".{0,60}",
                ".{0,40}",
                any::<u16>(),
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(group, 0..=MAX_GROUPS)
            )
                .prop_map(
                    |(leader, name, address, cpu_cores, cpu_mhz, free_disk_mib, content_groups)| {
                        Message::Register {
                            leader,
                            registration: Registration {
                                name,
                                address,
                                cpu_cores,
                                cpu_mhz,
                                free_disk_mib,
                                content_groups,
                            },
                        }
                    }
                ),
            any::<u64>().prop_map(|leader| Message::Leave { leader }),
            (any::<u32>(), proptest::collection::btree_set(any::<u64>(), 0..50)).prop_map(
                |(round, set)| {
                    let members: Vec<_> = set.into_iter().collect();
                    let lo = members.first().copied().unwrap_or(0);
                    let hi = members.last().copied().unwrap_or(u64::MAX);
                    Message::MemberReport(MemberReport { round, lo, hi, members })
                }
            ),
            (any::<u32>(), arb_addr())
                .prop_map(|(epoch, channel)| Message::ChannelMove { epoch, channel }),
            proptest::collection::vec((group, arb_addr()), 0..10)
                .prop_map(|channels| Message::DataChannels { channels }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(sender: u64, incarnation: u64, seq: u64, msg in any::<u64>().prop_flat_map(arb_message)) {
            // The key's node comes from the header, so build the message with the header's sender.
            let msg = match msg {
                Message::LeaderAlive { key, members, payload } => Message::LeaderAlive { key: ClaimKey { node: sender, ..key }, members, payload },
                Message::LeaderClaim { key } => Message::LeaderClaim { key: ClaimKey { node: sender, ..key } },
                other => other,
            };
            let h = Header { cluster: 42, sender, incarnation, seq };
            let d = seal(&key(), &h, &msg).unwrap();
            let (h2, m2) = open(&key(), 42, &d).unwrap();
            prop_assert_eq!(h2, h);
            prop_assert_eq!(peek_header(&d), Some(h));
            prop_assert_eq!(m2, msg.clone());
            // Any truncation is dropped, never accepted and never a panic.
            for cut in 0..d.len() {
                prop_assert!(open(&key(), 42, &d[..cut]).is_err());
            }
            // Another cluster or another key never decodes.
            prop_assert_eq!(open(&key(), 43, &d).unwrap_err(), DropReason::ForeignCluster(42));
            prop_assert_eq!(open(&MacKey::derive(crate::config::KEY_CONTEXT, b"other"), 42, &d).unwrap_err(), DropReason::BadTag);
        }

        #[test]
        fn arbitrary_bytes_never_panic(kind: u8, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_body(kind, 1, &body);
            let _ = open(&key(), 42, &body);
            let _ = peek_header(&body);
        }
    }

    #[test]
    fn flipped_bits_are_forgeries() {
        let h = Header { cluster: 7, sender: 1, incarnation: 2, seq: 3 };
        let d = seal(
            &key(),
            &h,
            &Message::LeaderClaim {
                key: ClaimKey { rank: 0, incumbent: false, priority: Priority(9), node: 1 },
            },
        )
        .unwrap();
        for bit in (4 * 8 + 16)..d.len() * 8 {
            let mut bad = d.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            // Bits in the cluster field read as foreign; everything else fails the tag or decode.
            assert!(open(&key(), 7, &bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn oversized_payload_is_refused_at_encode() {
        let h = Header { cluster: 7, sender: 1, incarnation: 2, seq: 3 };
        let key_ = ClaimKey { rank: 0, incumbent: true, priority: Priority(1), node: 1 };
        let msg = Message::LeaderAlive { key: key_, members: 0, payload: vec![0; MAX_PAYLOAD + 1] };
        assert!(seal(&key(), &h, &msg).is_err());
    }
}
