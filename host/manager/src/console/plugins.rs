//! The plugins page (`/console/plugins`): the interpreter plugin each server reported (through
//! its GL's discovery report: name, version, BLAKE3), and which servers differ from the
//! majority — a hot swap that reached only part of a group shows here.

use std::collections::BTreeMap;

use maud::{Markup, html};

use crate::db::DbError;
use crate::model::{PluginIdentity, ServerRecord};
use crate::server::Inner;

/// The plugin most servers run (ties: the smallest name, then hash), and how many run it.
pub(crate) fn majority(servers: &[ServerRecord]) -> Option<(&PluginIdentity, usize)> {
    let mut count: BTreeMap<(&str, &str), (&PluginIdentity, usize)> = BTreeMap::new();
    for p in servers.iter().filter_map(|s| s.plugin.as_ref()) {
        count.entry((&p.name, &p.blake3)).or_insert((p, 0)).1 += 1;
    }
    // `max_by_key` keeps the last of equals: iterate in reverse so the first key wins ties.
    count.into_values().rev().max_by_key(|(_, n)| *n)
}

pub(crate) fn page(m: &Inner) -> Result<Markup, DbError> {
    let servers = m.db.servers()?;
    let most = majority(&servers);
    let reported = servers.iter().filter(|s| s.plugin.is_some()).count();
    let differ: Vec<&ServerRecord> = servers
        .iter()
        .filter(|s| s.plugin.as_ref().is_some_and(|p| most.is_some_and(|(m, _)| m != p)))
        .collect();
    Ok(html! {
        p.note {
            "Each agent tells its group leader which interpreter plugin its site applies with; the \
             group leader relays it in its discovery report. A hot swap (" code { "cmover plugin install" }
            " on a server) shows here within a few seconds."
        }
        div #plugins data-live {
            p #plugin-summary {
                @match most {
                    None => span.dim { "No server has reported its plugin yet." },
                    Some((p, n)) => {
                        (n) " of " (reported) " servers that reported run " strong { (p.name) " " (p.version) } "."
                        @if differ.is_empty() { " " span.ok { "Every server runs it." } }
                        @else { " " span.bad { (differ.len()) " differ: " @for s in &differ { (s.name) " " } } }
                    }
                }
            }
            table {
                tr { th { "server" } th { "segment" } th { "plugin" } th { "version" } th { "blake3" } th { "" } }
                @for s in &servers {
                    tr id=(format!("plugin-{}", s.name)) {
                        td { (s.name) } td { (s.segment) }
                        @match &s.plugin {
                            Some(p) => {
                                td { (p.name) }
                                td.version { code { (p.version) } }
                                td { code title=(p.blake3) { (p.blake3.get(..16).unwrap_or(&p.blake3)) } }
                                td {
                                    @if most.is_some_and(|(m, _)| m != p) { span.bad.differs { "differs from the majority" } }
                                }
                            }
                            None => { td.dim colspan="4" { "not reported" } }
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, hash: Option<char>) -> ServerRecord {
        ServerRecord {
            name: name.into(),
            segment: "s".into(),
            live: true,
            last_seen_ms: 0,
            plugin: hash.map(|c| {
                let h: String = std::iter::repeat_n(c, 64).collect();
                PluginIdentity { name: "interpreter".into(), version: h[..12].into(), blake3: h }
            }),
            space: None,
            space_ms: 0,
        }
    }

    #[test]
    fn the_majority_and_ties() {
        let s = [
            server("a", Some('a')),
            server("b", Some('b')),
            server("c", Some('b')),
            server("d", None),
        ];
        assert_eq!(majority(&s).map(|(p, n)| (p.blake3.chars().next(), n)), Some((Some('b'), 2)));
        let tie = [server("a", Some('b')), server("b", Some('a'))];
        assert_eq!(majority(&tie).map(|(p, _)| p.blake3.chars().next()), Some(Some('a')));
        assert!(majority(&[server("x", None)]).is_none());
    }
}
