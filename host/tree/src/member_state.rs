//! What a member tells its GL about itself between runs ([`MemberState`], `POST /members/state`
//! on the GL's endpoint): the identity of its site's interpreter plugin and the free space of
//! its site root's filesystem ([`crate::space`]). The GL keeps the latest state of each server
//! ([`MemberStates`], bounded) and relays the plugins and spaces of its registered members in
//! its discovery report (`DiscoveryReport::plugins`, `spaces`) to the manager.
//!
//! It is a report, not a command: nothing acts on it but the operator's eyes. It still comes
//! from whoever holds the agent token, so both the GL and the manager check it
//! ([`PluginIdentity::check`]) before keeping it, and the GL keeps at most
//! [`MAX_MEMBER_STATES`] servers.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Notify;

use crate::space::{FsSpace, SpaceError};

/// Servers whose state a GL keeps (a segment has far fewer; the rest are refused).
pub const MAX_MEMBER_STATES: usize = 4096;
/// Longest server name a member state may carry (the manager's name rule allows 255 bytes).
pub const MAX_SERVER_NAME: usize = 255;
/// Longest plugin name (the plugin store's rule: 1 to 64 of `[a-z0-9_-]`).
pub const MAX_PLUGIN_NAME: usize = 64;
/// Hex digits of a short version (the first of the component's BLAKE3).
pub const VERSION_LEN: usize = 12;
/// Hex digits of a BLAKE3.
pub const BLAKE3_LEN: usize = 64;

/// The interpreter plugin a server's site applies with: its install name, its short version and
/// the BLAKE3 of its component (the version is the first 12 hex digits of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginIdentity {
    pub name: String,
    pub version: String,
    pub blake3: String,
}

/// What a member reports of itself to its GL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberState {
    /// The member's server name (its election registration name).
    pub server: String,
    /// Its interpreter plugin; `None` while none is installed.
    pub plugin: Option<PluginIdentity>,
    /// Free space and inodes of its site root's filesystem; `None`: not measured.
    #[serde(default)]
    pub space: Option<FsSpace>,
}

/// Why a plugin or member report was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    #[error("plugin name `{shown}` must be 1 to {MAX_PLUGIN_NAME} of [a-z0-9_-]")]
    PluginName { shown: String },
    #[error("plugin {name}: blake3 must be {BLAKE3_LEN} lowercase hex digits")]
    Hash { name: String },
    #[error(
        "plugin {name}: version `{shown}` must be the first {VERSION_LEN} hex digits of its blake3"
    )]
    Version { name: String, shown: String },
    #[error(
        "server name must be 1 to {MAX_SERVER_NAME} bytes without `/`, `\\` or control characters"
    )]
    ServerName,
    #[error("the group leader keeps the state of at most {MAX_MEMBER_STATES} servers")]
    TooMany,
    #[error(transparent)]
    Space(#[from] SpaceError),
}

/// At most `n` characters of `s`, escaped, for an error message.
fn shown(s: &str) -> String {
    s.escape_debug().take(80).collect()
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl PluginIdentity {
    /// The name by the plugin store's rule, the hash's length and digits, the version its prefix.
    pub fn check(&self) -> Result<(), StateError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_PLUGIN_NAME
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(StateError::PluginName { shown: shown(&self.name) });
        }
        if self.blake3.len() != BLAKE3_LEN || !is_lower_hex(&self.blake3) {
            return Err(StateError::Hash { name: self.name.clone() });
        }
        if self.version.len() != VERSION_LEN || !self.blake3.starts_with(&self.version) {
            return Err(StateError::Version {
                name: self.name.clone(),
                shown: shown(&self.version),
            });
        }
        Ok(())
    }
}

impl MemberState {
    /// The server name's length and characters (the manager's rule), and the plugin.
    pub fn check(&self) -> Result<(), StateError> {
        let s = &self.server;
        if s.is_empty()
            || s.len() > MAX_SERVER_NAME
            || s == "."
            || s == ".."
            || s.contains(['/', '\\'])
            || s.chars().any(char::is_control)
        {
            return Err(StateError::ServerName);
        }
        self.plugin.as_ref().map_or(Ok(()), PluginIdentity::check)?;
        self.space.as_ref().map_or(Ok(()), |s| Ok(s.check()?))
    }
}

/// What a GL keeps of a member's state: its plugin and its space.
type Kept = (Option<PluginIdentity>, Option<FsSpace>);

/// A GL's latest [`MemberState`] per server, bounded by [`MAX_MEMBER_STATES`].
#[derive(Default)]
pub struct MemberStates {
    states: Mutex<BTreeMap<String, Kept>>,
    /// Signalled on every change (one waiter: the GL's discovery loop; a permit is kept).
    changed: Notify,
}

impl MemberStates {
    /// Checks and keeps a member's state; `Ok(true)` when it changed what is kept.
    pub fn insert(&self, s: MemberState) -> Result<bool, StateError> {
        s.check()?;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if states.len() >= MAX_MEMBER_STATES && !states.contains_key(&s.server) {
            return Err(StateError::TooMany);
        }
        let kept = (s.plugin, s.space);
        let changed = states.insert(s.server, kept.clone()).as_ref() != Some(&kept);
        if changed {
            self.changed.notify_one();
        }
        Ok(changed)
    }

    /// Resolves after the next change (or at once if one came since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The plugins of `members` (those that reported one); forgets every other server.
    pub fn plugins_of<'a>(
        &self,
        members: impl IntoIterator<Item = &'a String>,
    ) -> BTreeMap<String, PluginIdentity> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let members: std::collections::BTreeSet<&String> = members.into_iter().collect();
        states.retain(|name, _| members.contains(name));
        states.iter().filter_map(|(n, (p, _))| p.clone().map(|p| (n.clone(), p))).collect()
    }

    /// The spaces of `members` (those that reported one).
    pub fn spaces_of<'a>(
        &self,
        members: impl IntoIterator<Item = &'a String>,
    ) -> BTreeMap<String, FsSpace> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        members.into_iter().filter_map(|m| Some((m.clone(), states.get(m)?.1?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(name: &str, blake3: &str, version: &str) -> PluginIdentity {
        PluginIdentity { name: name.into(), version: version.into(), blake3: blake3.into() }
    }

    #[test]
    fn checks_name_hash_and_version() {
        let h = "0123456789abcdef".repeat(4);
        assert!(plugin("interpreter", &h, &h[..12]).check().is_ok());
        let bad = [
            plugin("", &h, &h[..12]),
            plugin("Interp", &h, &h[..12]),
            plugin(&"x".repeat(65), &h, &h[..12]),
            plugin("a/b", &h, &h[..12]),
            plugin("i", &h[..63], &h[..12]),
            plugin("i", &h.to_uppercase(), &h.to_uppercase()[..12]),
            plugin("i", &format!("{}zz", &h[..62]), &h[..12]),
            plugin("i", &h, &h[1..13]),
            plugin("i", &h, &h[..11]),
        ];
        for p in bad {
            assert!(p.check().is_err(), "{p:?}");
        }
    }

    #[test]
    fn keeps_at_most_the_bound_and_forgets_non_members() {
        let h = "ab".repeat(32);
        let states = MemberStates::default();
        let st = |s: &str| MemberState {
            server: s.into(),
            plugin: Some(plugin("i", &h, &h[..12])),
            space: None,
        };
        assert_eq!(states.insert(st("a")), Ok(true));
        assert_eq!(states.insert(st("a")), Ok(false));
        assert_eq!(states.insert(st("../x")), Err(StateError::ServerName));
        for i in 1..MAX_MEMBER_STATES {
            states.insert(st(&format!("s{i}"))).unwrap();
        }
        assert_eq!(states.insert(st("one-too-many")), Err(StateError::TooMany));
        let kept = states.plugins_of(&["a".to_string(), "nobody".to_string()]);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["a"]);
        assert!(states.insert(st("one-too-many")).is_ok());
    }

    #[test]
    fn keeps_each_members_space_and_refuses_an_impossible_one() {
        let states = MemberStates::default();
        let space = FsSpace { free_bytes: 5, total_bytes: 10, free_inodes: 1, total_inodes: 2 };
        let st = |space| MemberState { server: "a".into(), plugin: None, space };
        assert_eq!(states.insert(st(Some(space))), Ok(true));
        let bad = FsSpace { free_bytes: 11, ..space };
        assert!(matches!(states.insert(st(Some(bad))), Err(StateError::Space(_))));
        let members = ["a".to_string(), "b".to_string()];
        assert_eq!(states.spaces_of(&members), BTreeMap::from([("a".to_string(), space)]));
        assert!(states.plugins_of(&members).is_empty());
        let less = FsSpace { free_bytes: 1, ..space };
        assert_eq!(states.insert(st(Some(less))), Ok(true), "a new space is a change");
    }
}
