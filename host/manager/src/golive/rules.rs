//! Rules that start hot content from the load balancer's side (issue 17 §4): "a path over R
//! requests/s for T ms starts a hot job for it to N servers; cooldown C; at most K hot paths".
//! [`HotTrigger`] only decides (inputs: the rates the balancer counts, the paths already hot,
//! the time; output: the jobs to start); `trigger.rs` polls the balancer and starts them.
//!
//! Bounds, since the input is whatever clients request: a rule starts nothing while the site
//! has `max_hot_paths` hot (or being made hot); a path it started is not started again within
//! `cooldown_ms`; and the driver starts a job only for a path that passes the site's checks
//! (`hot::check_paths`: inside staging, a regular file, admitted by the filter).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One rule of a site's go-live settings (`golive.hot_rules`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotRule {
    /// Named in the history line of each job it starts (1 to 64 of `[a-z0-9_-]`).
    pub name: String,
    /// R: a path counts as hot at this many requests per second or more.
    pub requests_per_s: u64,
    /// T: and stays so, poll after poll, this long.
    pub for_ms: u64,
    /// N: the hot job's servers.
    pub servers: u32,
    /// C: a path this rule started is not started again before this many ms.
    pub cooldown_ms: u64,
    /// K: no start while the site has this many hot paths (live or on their way).
    pub max_hot_paths: u32,
}

/// Most rules a site has.
pub const MAX_RULES: usize = 16;
/// Largest `max_hot_paths`.
pub const MAX_HOT_PATHS: u32 = 100;

/// Checks a site's rules: `(field, why)` of the first problem.
pub fn check_rules(rules: &[HotRule]) -> Result<(), (String, String)> {
    if rules.len() > MAX_RULES {
        return Err(("golive.hot_rules".into(), format!("at most {MAX_RULES} rules")));
    }
    for (i, r) in rules.iter().enumerate() {
        let bad = |f: &str, why: &str| Err((format!("golive.hot_rules[{i}].{f}"), why.into()));
        let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        if r.name.is_empty() || r.name.len() > 64 || !r.name.bytes().all(plain) {
            return bad("name", "1 to 64 of [a-z0-9_-]");
        }
        if r.requests_per_s == 0 {
            return bad("requests_per_s", "must be at least 1");
        }
        if r.servers == 0 {
            return bad("servers", "must be at least 1");
        }
        if r.max_hot_paths == 0 || r.max_hot_paths > MAX_HOT_PATHS {
            return bad("max_hot_paths", "must be within 1..=100");
        }
    }
    Ok(())
}

/// A job a rule starts: `path` (a content path, e.g. `flash/sale.html`) to `servers` servers.
#[derive(Debug, Clone, PartialEq)]
pub struct HotStart {
    pub rule: String,
    pub path: String,
    pub servers: u32,
    /// The rate that started it, requests/s, and since when the path was over the rule's R.
    pub rate_per_s: f64,
    pub over_since_ms: u64,
}

/// What the rules remember between polls of one site (in memory: a restart starts afresh).
#[derive(Debug, Default)]
pub struct HotTrigger {
    /// (rule, path) → since when the path has been over the rule's rate.
    over_since: BTreeMap<(String, String), u64>,
    /// (rule, path) → when the rule last started it.
    started: BTreeMap<(String, String), u64>,
}

impl HotTrigger {
    /// One poll: `rates` (content path → requests/s, as the balancer counts them now) and
    /// `hot` (content paths live as hot content or with a hot job on the way).
    pub fn observe(
        &mut self,
        rules: &[HotRule],
        now_ms: u64,
        rates: &BTreeMap<String, f64>,
        hot: &BTreeSet<String>,
    ) -> Vec<HotStart> {
        let mut hot = hot.clone();
        let mut out = Vec::new();
        // Forget paths that dropped below their rule's rate (or out of the balancer's table).
        self.over_since.retain(|(rule, path), _| {
            rules.iter().find(|r| r.name == *rule).is_some_and(|r| {
                rates.get(path).is_some_and(|rate| *rate >= r.requests_per_s as f64)
            })
        });
        for rule in rules {
            for (path, rate) in rates {
                if *rate < rule.requests_per_s as f64 {
                    continue;
                }
                let key = (rule.name.clone(), path.clone());
                let since = *self.over_since.entry(key.clone()).or_insert(now_ms);
                let long_enough = now_ms.saturating_sub(since) >= rule.for_ms;
                let cooling = self
                    .started
                    .get(&key)
                    .is_some_and(|at| now_ms < at.saturating_add(rule.cooldown_ms));
                let room = hot.len() < rule.max_hot_paths as usize;
                if !long_enough || cooling || hot.contains(path) || !room {
                    continue;
                }
                self.started.insert(key.clone(), now_ms);
                self.over_since.remove(&key);
                hot.insert(path.clone());
                out.push(HotStart {
                    rule: rule.name.clone(),
                    path: path.clone(),
                    servers: rule.servers,
                    rate_per_s: *rate,
                    over_since_ms: since,
                });
            }
        }
        self.started.retain(|(rule, _), at| {
            rules
                .iter()
                .find(|r| r.name == *rule)
                .is_some_and(|r| now_ms < at.saturating_add(r.cooldown_ms))
        });
        out
    }
}

/// The content path a URL path names (`/a/b.html` → `a/b.html`, `/a/` → `a/index.html`),
/// percent-decoded; `None` for anything else (a query, a non-UTF-8 decoding).
pub fn content_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix('/')?;
    if url.contains(['?', '#']) {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(rest).decode_utf8().ok()?.into_owned();
    if decoded.is_empty() || decoded.ends_with('/') {
        Some(format!("{decoded}index.html"))
    } else {
        Some(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, r: u64, t: u64, c: u64, k: u32) -> HotRule {
        HotRule {
            name: name.into(),
            requests_per_s: r,
            for_ms: t,
            servers: 2,
            cooldown_ms: c,
            max_hot_paths: k,
        }
    }

    fn rates(v: &[(&str, f64)]) -> BTreeMap<String, f64> {
        v.iter().map(|(p, r)| (p.to_string(), *r)).collect()
    }

    #[test]
    fn a_path_over_the_rate_for_the_time_starts_one_job() {
        let rules = [rule("sale", 10, 3_000, 60_000, 5)];
        let mut t = HotTrigger::default();
        let none = BTreeSet::new();
        let busy = rates(&[("sale.html", 40.0), ("index.html", 3.0)]);
        assert!(t.observe(&rules, 1_000, &busy, &none).is_empty(), "not yet over for T");
        assert!(t.observe(&rules, 3_999, &busy, &none).is_empty());
        let started = t.observe(&rules, 4_000, &busy, &none);
        assert_eq!(started.len(), 1);
        assert_eq!((started[0].path.as_str(), started[0].rule.as_str()), ("sale.html", "sale"));
        assert_eq!((started[0].servers, started[0].over_since_ms), (2, 1_000));
        // Still busy: once hot, never again; once not hot, not within the cooldown.
        let hot: BTreeSet<String> = ["sale.html".to_string()].into();
        assert!(t.observe(&rules, 5_000, &busy, &hot).is_empty());
        assert!(t.observe(&rules, 40_000, &busy, &none).is_empty(), "cooldown");
        // Over the rate all along: it starts again as the cooldown ends.
        assert!(t.observe(&rules, 63_999, &busy, &none).is_empty());
        assert_eq!(t.observe(&rules, 64_000, &busy, &none).len(), 1);
    }

    #[test]
    fn a_dip_below_the_rate_restarts_the_clock() {
        let rules = [rule("r", 10, 3_000, 0, 5)];
        let mut t = HotTrigger::default();
        let none = BTreeSet::new();
        assert!(t.observe(&rules, 0, &rates(&[("a", 20.0)]), &none).is_empty());
        assert!(t.observe(&rules, 2_000, &rates(&[("a", 9.0)]), &none).is_empty());
        assert!(t.observe(&rules, 3_500, &rates(&[("a", 20.0)]), &none).is_empty());
        assert!(t.observe(&rules, 6_000, &rates(&[]), &none).is_empty(), "gone from the table");
        assert!(t.observe(&rules, 6_500, &rates(&[("a", 20.0)]), &none).is_empty());
        assert_eq!(t.observe(&rules, 9_500, &rates(&[("a", 20.0)]), &none).len(), 1);
    }

    #[test]
    fn at_most_k_hot_paths() {
        let rules = [rule("r", 10, 0, 0, 2)];
        let mut t = HotTrigger::default();
        let busy = rates(&[("a", 50.0), ("b", 40.0), ("c", 30.0)]);
        let one_hot: BTreeSet<String> = ["x".to_string()].into();
        let started = t.observe(&rules, 0, &busy, &one_hot);
        assert_eq!(started.len(), 1, "one more makes K: {started:?}");
        let full: BTreeSet<String> = ["x".to_string(), "y".to_string()].into();
        assert!(t.observe(&rules, 1, &busy, &full).is_empty());
    }

    #[test]
    fn two_rules_do_not_start_the_same_path_twice() {
        let rules = [rule("a", 10, 0, 0, 5), rule("b", 5, 0, 0, 5)];
        let mut t = HotTrigger::default();
        let started = t.observe(&rules, 0, &rates(&[("p", 50.0)]), &BTreeSet::new());
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].rule, "a");
    }

    #[test]
    fn url_paths_map_to_content_paths() {
        assert_eq!(content_path("/flash/sale.html").as_deref(), Some("flash/sale.html"));
        assert_eq!(content_path("/").as_deref(), Some("index.html"));
        assert_eq!(content_path("/a/").as_deref(), Some("a/index.html"));
        assert_eq!(content_path("/a%20b.html").as_deref(), Some("a b.html"));
        assert_eq!(content_path("a.html"), None);
        assert_eq!(content_path("/a.html?x=1"), None);
        assert_eq!(content_path("/%ff"), None);
    }

    #[test]
    fn rules_are_checked() {
        assert!(check_rules(&[rule("sale", 10, 0, 0, 5)]).is_ok());
        assert_eq!(
            check_rules(&[rule("sale", 0, 0, 0, 5)]).unwrap_err().0,
            "golive.hot_rules[0].requests_per_s"
        );
        assert_eq!(
            check_rules(&[rule("sale", 1, 0, 0, 500)]).unwrap_err().0,
            "golive.hot_rules[0].max_hot_paths"
        );
        assert_eq!(
            check_rules(&[rule("a b", 1, 0, 0, 5)]).unwrap_err().0,
            "golive.hot_rules[0].name"
        );
    }
}
