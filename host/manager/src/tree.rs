//! The store-and-forward distribution tree (seed Figs. 6 and 7), as a sans-IO state machine.
//!
//! The manager sorts the group leaders that serve a run; every node (the manager or a GL already
//! receiving) asks [`TreePlan::next_for`] whom to serve next and gets the first GL nobody serves
//! yet, so the tree grows dynamically toward whoever has spare upload. Few GLs make a plain star.
//! A GL that dies is routed around: [`TreePlan::leader_dead`] gives each of its unfinished children a
//! new parent (a GL that already holds the whole assignment, else the manager); the children
//! resume by HTTP range from where they stopped.
//!
//! Invariant: every live, unfinished, assigned GL's parent chain ends at the manager (no cycles):
//! a GL is only ever given as parent a node that is already assigned, or a complete GL.

use std::collections::{BTreeMap, VecDeque};

use cm_tree::link::LinkRates;

/// A node of the tree: the root (the manager) or a group leader, named by its segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Manager,
    Leader(String),
}

/// What sorting and shaping need to know of a GL (from its segment's discovery report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    pub segment: String,
    pub cpu_power: u32,
    pub location: String,
    /// Operator's pinned position; pinned GLs come first, in rank order.
    pub static_rank: Option<u32>,
    /// What the GL measured of its links in earlier runs, if anything.
    pub links: Option<LinkRates>,
}

/// Sorts GLs for distribution: operator-pinned first (by rank), then CPU power (fastest first),
/// then location (so GLs of one place are adjacent and tend to serve each other), then name.
pub fn sort_leaders(leaders: &mut [LeaderInfo]) {
    leaders.sort_by(|a, b| {
        (
            a.static_rank.is_none(),
            a.static_rank,
            std::cmp::Reverse(a.cpu_power),
            &a.location,
            &a.segment,
        )
            .cmp(&(
                b.static_rank.is_none(),
                b.static_rank,
                std::cmp::Reverse(b.cpu_power),
                &b.location,
                &b.segment,
            ))
    });
}

/// How much faster (percent) measured upload must be than download before a node serves one
/// more child at once (see [`TreeConfig::for_measured`]).
pub const FAN_OUT_MARGIN_PERCENT: u64 = 50;

/// Shape of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeConfig {
    /// Children the manager serves at once.
    pub root_fanout: usize,
    /// Children each GL serves at once.
    pub leader_fanout: usize,
    /// Up to this many GLs, the manager serves every GL itself (a star).
    pub star_max: usize,
}

impl Default for TreeConfig {
    fn default() -> Self {
        TreeConfig { root_fanout: 2, leader_fanout: 2, star_max: 3 }
    }
}

impl TreeConfig {
    /// The shape for `n` GLs from link speeds (bytes/s): with pipelined forwarding a node's
    /// upload is shared by the children it serves at once, so each node serves as many children
    /// as its upload can feed at their download speed, at least one. Uploads as fast as
    /// downloads (symmetric NICs) give fan-out 1: a chain, where every GL receives at full speed
    /// and the whole run takes one transfer plus a chunk per hop. Few GLs stay a star only when
    /// the manager can feed them all at once.
    pub fn for_links(
        manager_upload: u64,
        leader_upload: u64,
        leader_download: u64,
        n: usize,
    ) -> TreeConfig {
        let fan =
            |up: u64| usize::try_from(up / leader_download.max(1)).unwrap_or(usize::MAX).max(1);
        let root_fanout = fan(manager_upload);
        TreeConfig {
            root_fanout,
            leader_fanout: fan(leader_upload),
            star_max: if root_fanout >= n { n } else { 0 },
        }
    }

    /// The shape for a run over `leaders` (sorted or not) from the link rates they measured,
    /// `None` while no GL has measured both directions (then the configured shape stands).
    ///
    /// Measured rates are lower bounds taken inside a tree: a GL in a fan-out `k` tree whose
    /// parent's upload is the limit receives `1/k` of it and sends `k` times that, which on its
    /// own would call for fan-out `k` again. Every estimate therefore errs toward a chain, whose
    /// cost when the links could have fanned out is one chunk per hop, while a fan-out the links
    /// cannot feed divides every GL's rate: the download is the best any GL of the run showed
    /// (the tightest lower bound of a link like theirs), the upload the median over the GLs that
    /// served children, and a node serves one more child only when its upload beats the download
    /// by [`FAN_OUT_MARGIN_PERCENT`]. The manager's upload is `manager_upload` when the operator
    /// gave it, else taken to be like a GL's.
    pub fn for_measured(manager_upload: Option<u64>, leaders: &[LeaderInfo]) -> Option<TreeConfig> {
        let median = |mut v: Vec<u64>| -> Option<u64> {
            v.sort_unstable();
            v.get(v.len() / 2).copied()
        };
        let measured: Vec<LinkRates> = leaders.iter().filter_map(|l| l.links).collect();
        let down = measured.iter().map(|r| r.download_bps).filter(|d| *d > 0).max()?;
        let up = median(measured.iter().map(|r| r.upload_bps).filter(|u| *u > 0).collect())
            .unwrap_or(down);
        let damp = |u: u64| {
            u64::try_from(u128::from(u) * 100 / (100 + u128::from(FAN_OUT_MARGIN_PERCENT)))
                .unwrap_or(u64::MAX)
        };
        Some(TreeConfig::for_links(
            damp(manager_upload.unwrap_or(up)),
            damp(up),
            down,
            leaders.len(),
        ))
    }

    /// Worker slots a node runs for `n` GLs: each slot asks for a child, serves it, asks again.
    pub fn slots(&self, node: &Node, n: usize) -> usize {
        let star = n <= self.star_max;
        match node {
            Node::Manager if star => n.max(1),
            Node::Manager => self.root_fanout.max(1),
            Node::Leader(_) if star => 0,
            Node::Leader(_) => self.leader_fanout,
        }
    }
}

/// The answer to "whom do I serve next?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Notify and serve this GL.
    Serve(String),
    /// Nothing to hand out now, but the run is not finished (only the manager gets this: it stays
    /// ready to serve GLs that are revived or orphaned).
    Wait,
    /// Seed: the null address. This node serves no one else in this run.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaderState {
    parent: Option<Node>,
    complete: bool,
    dead: bool,
    /// Children given to this GL after another parent died (spreads adoption).
    adopted: usize,
}

#[derive(Debug, Clone)]
pub struct TreePlan {
    config: TreeConfig,
    order: Vec<String>,
    pending: VecDeque<String>,
    leaders: BTreeMap<String, LeaderState>,
}

impl TreePlan {
    /// A plan over sorted GLs; those in `already_complete` hold the assignment (a resumed run).
    pub fn new(config: TreeConfig, sorted: &[String], already_complete: &[String]) -> TreePlan {
        let mut leaders = BTreeMap::new();
        let mut pending = VecDeque::new();
        for s in sorted {
            let complete = already_complete.contains(s);
            leaders.insert(
                s.clone(),
                LeaderState {
                    parent: complete.then_some(Node::Manager),
                    complete,
                    dead: false,
                    adopted: 0,
                },
            );
            if !complete {
                pending.push_back(s.clone());
            }
        }
        TreePlan { config, order: sorted.to_vec(), pending, leaders }
    }

    pub fn config(&self) -> TreeConfig {
        self.config
    }

    /// Number of GLs in the run.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Worker slots `node` should run.
    pub fn slots(&self, node: &Node) -> usize {
        self.config.slots(node, self.order.len())
    }

    pub fn parent_of(&self, segment: &str) -> Option<&Node> {
        self.leaders.get(segment).and_then(|l| l.parent.as_ref())
    }

    fn alive_assigned(&self, node: &Node) -> bool {
        match node {
            Node::Manager => true,
            Node::Leader(s) => self.leaders.get(s).is_some_and(|l| !l.dead && l.parent.is_some()),
        }
    }

    /// Whom `requester` serves next. A GL that is dead, unknown, or not yet part of the tree gets
    /// `Done`; so does every GL in a star.
    pub fn next_for(&mut self, requester: &Node) -> Next {
        if !self.alive_assigned(requester) || self.slots(requester) == 0 {
            return Next::Done;
        }
        match self.pending.pop_front() {
            Some(child) => {
                if let Some(l) = self.leaders.get_mut(&child) {
                    l.parent = Some(requester.clone());
                }
                Next::Serve(child)
            }
            None if *requester == Node::Manager && !self.finished() => Next::Wait,
            None => Next::Done,
        }
    }

    /// `segment`'s GL holds the whole assignment, verified.
    pub fn received(&mut self, segment: &str) {
        if let Some(l) = self.leaders.get_mut(segment)
            && !l.dead
        {
            l.complete = true;
        }
    }

    pub fn is_complete(&self, segment: &str) -> bool {
        self.leaders.get(segment).is_some_and(|l| l.complete)
    }

    pub fn is_dead(&self, segment: &str) -> bool {
        self.leaders.get(segment).is_some_and(|l| l.dead)
    }

    /// The best node to adopt an orphan: the complete live GL that adopted fewest so far, else the manager.
    fn adoptive_parent(&mut self, orphan: &str) -> Node {
        let best = self
            .leaders
            .iter()
            .filter(|(s, l)| l.complete && !l.dead && s.as_str() != orphan)
            .min_by_key(|(s, l)| (l.adopted, self.order.iter().position(|o| o == *s)))
            .map(|(s, _)| s.clone());
        match best {
            Some(s) => {
                if let Some(l) = self.leaders.get_mut(&s) {
                    l.adopted += 1;
                }
                Node::Leader(s)
            }
            None => Node::Manager,
        }
    }

    /// `segment`'s GL is dead. Returns its unfinished children with their new parents; the caller
    /// notifies each of them (they resume from their verified offset).
    pub fn leader_dead(&mut self, segment: &str) -> Vec<(String, Node)> {
        let Some(l) = self.leaders.get_mut(segment) else { return Vec::new() };
        if l.dead {
            return Vec::new();
        }
        l.dead = true;
        l.complete = false;
        self.pending.retain(|p| p != segment);
        let dead = Node::Leader(segment.to_string());
        let orphans: Vec<String> = self
            .leaders
            .iter()
            .filter(|(_, c)| c.parent.as_ref() == Some(&dead) && !c.complete && !c.dead)
            .map(|(s, _)| s.clone())
            .collect();
        orphans
            .into_iter()
            .map(|o| {
                let p = self.adoptive_parent(&o);
                if let Some(c) = self.leaders.get_mut(&o) {
                    c.parent = Some(p.clone());
                }
                (o, p)
            })
            .collect()
    }

    /// A GL reports its parent unreachable (the manager checked that the parent is really gone or
    /// that the child must move anyway): a new parent for it.
    pub fn reparent(&mut self, segment: &str) -> Option<Node> {
        let l = self.leaders.get(segment)?;
        if l.dead || l.complete {
            return None;
        }
        let p = self.adoptive_parent(segment);
        if let Some(c) = self.leaders.get_mut(segment) {
            c.parent = Some(p.clone());
        }
        Some(p)
    }

    /// `segment` could not fetch from a parent that still answers (e.g. its copy failed the checks):
    /// it fetches from the manager, whose copy is the reference.
    pub fn adopt_by_manager(&mut self, segment: &str) -> Option<Node> {
        let l = self.leaders.get_mut(segment)?;
        if l.dead || l.complete || l.parent.is_none() {
            return None;
        }
        l.parent = Some(Node::Manager);
        Some(Node::Manager)
    }

    /// A segment whose GL died has a new GL (it reported discovery): it joins the queue again,
    /// first in line.
    pub fn revive(&mut self, segment: &str) {
        if let Some(l) = self.leaders.get_mut(segment)
            && l.dead
        {
            *l = LeaderState { parent: None, complete: false, dead: false, adopted: 0 };
            self.pending.push_front(segment.to_string());
        }
    }

    /// Every GL holds the assignment or is dead.
    pub fn finished(&self) -> bool {
        self.leaders.values().all(|l| l.complete || l.dead)
    }

    /// Depth of `segment` (manager's children are at 1); `None` if unassigned or on a broken chain.
    pub fn depth(&self, segment: &str) -> Option<usize> {
        let mut d = 0;
        let mut cur = Node::Leader(segment.to_string());
        loop {
            match cur {
                Node::Manager => return Some(d),
                Node::Leader(s) => {
                    let p = self.leaders.get(&s)?.parent.clone()?;
                    d += 1;
                    if d > self.order.len() + 1 {
                        return None; // a cycle: must never happen
                    }
                    cur = p;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn segs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("gl{i}")).collect()
    }
    fn leader(s: &str) -> Node {
        Node::Leader(s.into())
    }

    #[test]
    fn sorting_pins_then_cpu_then_location() {
        let li = |s: &str, cpu, loc: &str, rank| LeaderInfo {
            segment: s.into(),
            cpu_power: cpu,
            location: loc.into(),
            static_rank: rank,
            links: None,
        };
        let mut v = vec![
            li("a", 10, "UTC", None),
            li("b", 50, "UTC+1", None),
            li("c", 50, "UTC", None),
            li("d", 1, "X", Some(2)),
            li("e", 1, "X", Some(1)),
        ];
        sort_leaders(&mut v);
        let names: Vec<&str> = v.iter().map(|l| l.segment.as_str()).collect();
        assert_eq!(names, ["e", "d", "c", "b", "a"]);
    }

    #[test]
    fn fan_out_follows_link_speeds() {
        let mib = 1 << 20;
        assert_eq!(
            TreeConfig::for_links(100 * mib, 100 * mib, 100 * mib, 16),
            TreeConfig { root_fanout: 1, leader_fanout: 1, star_max: 0 }
        );
        assert_eq!(
            TreeConfig::for_links(1000 * mib, 250 * mib, 100 * mib, 16),
            TreeConfig { root_fanout: 10, leader_fanout: 2, star_max: 0 }
        );
        assert_eq!(
            TreeConfig::for_links(1000 * mib, 50 * mib, 100 * mib, 4),
            TreeConfig { root_fanout: 10, leader_fanout: 1, star_max: 4 }
        );
    }

    fn measured(up_mib: u64, down_mib: u64) -> LeaderInfo {
        let mib = 1 << 20;
        LeaderInfo {
            segment: format!("gl-{up_mib}-{down_mib}"),
            cpu_power: 1,
            location: String::new(),
            static_rank: None,
            links: Some(LinkRates { upload_bps: up_mib * mib, download_bps: down_mib * mib }),
        }
    }

    #[test]
    fn shape_from_measured_links() {
        let mib = 1 << 20;
        let unmeasured = LeaderInfo { links: None, ..measured(1, 1) };
        assert_eq!(
            TreeConfig::for_measured(None, &vec![unmeasured.clone(); 16]),
            None,
            "nothing measured: the configured shape"
        );
        let no_download = LeaderInfo {
            links: Some(LinkRates { upload_bps: mib, download_bps: 0 }),
            ..unmeasured.clone()
        };
        assert_eq!(
            TreeConfig::for_measured(None, &[no_download]),
            None,
            "an upload alone says nothing about fan-out"
        );
        let chain = TreeConfig { root_fanout: 1, leader_fanout: 1, star_max: 0 };
        // Symmetric links: a chain.
        assert_eq!(TreeConfig::for_measured(None, &vec![measured(64, 64); 16]), Some(chain));
        // What a fan-out 2 tree of upload-bound GLs measures (each receives half its parent's
        // upload, sends its whole upload to two children): still a chain, not fan-out 2 again.
        let mut fan2 = vec![measured(64, 32); 8];
        fan2.extend(vec![
            LeaderInfo {
                links: Some(LinkRates { upload_bps: 0, download_bps: 32 * mib }),
                ..measured(0, 32)
            };
            8
        ]);
        assert_eq!(TreeConfig::for_measured(None, &fan2), Some(chain));
        // Uploads clearly faster than downloads: fan out; a manager with a big NIC feeds more.
        assert_eq!(
            TreeConfig::for_measured(None, &vec![measured(300, 100); 16]),
            Some(TreeConfig { root_fanout: 2, leader_fanout: 2, star_max: 0 })
        );
        assert_eq!(
            TreeConfig::for_measured(Some(1000 * mib), &vec![measured(64, 64); 16]),
            Some(TreeConfig { root_fanout: 10, leader_fanout: 1, star_max: 0 })
        );
        // A manager that can feed every GL at its download speed: a star.
        assert_eq!(
            TreeConfig::for_measured(Some(1000 * mib), &vec![measured(64, 64); 4]),
            Some(TreeConfig { root_fanout: 10, leader_fanout: 1, star_max: 4 })
        );
        // Measured in the tree benchmark (16 GLs, 64 MiB/s per node, a fan-out 2 run): the GLs
        // received a little under half the 64 MiB/s the manager was configured with, which is
        // the split, not slow downloads.
        let mut bench = vec![measured(51, 26); 7];
        bench.extend(vec![
            LeaderInfo {
                links: Some(LinkRates { upload_bps: 0, download_bps: 25 * mib }),
                ..measured(0, 25)
            };
            9
        ]);
        assert_eq!(TreeConfig::for_measured(Some(64 * mib), &bench), Some(chain));
        // GLs that never served a child measured no upload: taken to be like their download.
        let leaves = vec![
            LeaderInfo {
                links: Some(LinkRates { upload_bps: 0, download_bps: 50 * mib }),
                ..unmeasured.clone()
            };
            3
        ];
        assert_eq!(
            TreeConfig::for_measured(None, &leaves),
            Some(TreeConfig { root_fanout: 1, leader_fanout: 1, star_max: 0 })
        );
        // The upload is a median: one odd GL does not fan the tree out.
        let mut mixed = vec![measured(64, 64); 5];
        mixed.push(measured(10_000, 64));
        assert_eq!(TreeConfig::for_measured(None, &mixed), Some(chain));
        // The download is the best shown: GLs slowed by their parent's split do not fan it out.
        let mut slowed = vec![measured(64, 30); 5];
        slowed.push(measured(64, 64));
        assert_eq!(TreeConfig::for_measured(None, &slowed), Some(chain));
    }

    #[test]
    fn few_leaders_make_a_star() {
        let mut t = TreePlan::new(TreeConfig::default(), &segs(3), &[]);
        assert_eq!(t.slots(&Node::Manager), 3);
        for s in segs(3) {
            assert_eq!(t.next_for(&Node::Manager), Next::Serve(s));
        }
        assert_eq!(t.next_for(&leader("gl1")), Next::Done, "GLs in a star forward to no one");
        assert_eq!(t.next_for(&Node::Manager), Next::Wait);
        for s in segs(3) {
            t.received(&s);
        }
        assert_eq!(t.next_for(&Node::Manager), Next::Done);
        assert!(t.finished());
    }

    #[test]
    fn dynamic_tree_hands_out_in_order_and_ends_with_null() {
        let mut t = TreePlan::new(
            TreeConfig { root_fanout: 2, leader_fanout: 2, star_max: 3 },
            &segs(7),
            &[],
        );
        assert_eq!(t.next_for(&Node::Manager), Next::Serve("gl1".into()));
        assert_eq!(t.next_for(&Node::Manager), Next::Serve("gl2".into()));
        assert_eq!(t.next_for(&leader("gl5")), Next::Done, "an unassigned GL serves no one");
        assert_eq!(t.next_for(&leader("gl1")), Next::Serve("gl3".into()));
        assert_eq!(t.next_for(&leader("gl2")), Next::Serve("gl4".into()));
        assert_eq!(t.next_for(&leader("gl3")), Next::Serve("gl5".into()));
        assert_eq!(t.next_for(&leader("gl1")), Next::Serve("gl6".into()));
        assert_eq!(t.next_for(&leader("gl3")), Next::Serve("gl7".into()));
        assert_eq!(t.next_for(&leader("gl4")), Next::Done);
        assert_eq!(t.depth("gl7"), Some(3));
        assert_eq!(t.depth("gl2"), Some(1));
    }

    #[test]
    fn dead_leader_children_are_adopted_by_holders_or_the_manager() {
        let mut t = TreePlan::new(
            TreeConfig { root_fanout: 1, leader_fanout: 2, star_max: 0 },
            &segs(5),
            &[],
        );
        assert_eq!(t.next_for(&Node::Manager), Next::Serve("gl1".into()));
        assert_eq!(t.next_for(&leader("gl1")), Next::Serve("gl2".into()));
        assert_eq!(t.next_for(&leader("gl1")), Next::Serve("gl3".into()));
        assert_eq!(t.next_for(&leader("gl2")), Next::Serve("gl4".into()));
        t.received("gl3");
        // gl1 dies while gl2 is still receiving: gl2 goes to gl3 (which holds it all).
        assert_eq!(t.leader_dead("gl1"), vec![("gl2".to_string(), leader("gl3"))]);
        assert_eq!(t.leader_dead("gl1"), vec![], "a second death report changes nothing");
        // gl2 dies too: gl4 is adopted, gl3 already adopted once but is the only holder.
        assert_eq!(t.leader_dead("gl2"), vec![("gl4".to_string(), leader("gl3"))]);
        assert_eq!(
            t.leader_dead("gl3"),
            vec![("gl4".to_string(), Node::Manager)],
            "no holder left: the manager adopts"
        );
        assert_eq!(t.reparent("gl4"), Some(Node::Manager));
        assert!(!t.finished());
        assert_eq!(t.next_for(&Node::Manager), Next::Serve("gl5".into()));
        t.received("gl4");
        t.received("gl5");
        assert!(t.finished());
        t.revive("gl1");
        assert!(!t.finished());
        assert_eq!(
            t.next_for(&leader("gl4")),
            Next::Serve("gl1".into()),
            "a revived segment is served first"
        );
    }

    /// Random runs: at every step each live, unfinished, assigned GL reaches the manager through
    /// live parents, and when the dust settles every live GL got the assignment.
    #[test]
    fn random_runs_keep_chains_rooted_and_finish() {
        for seed in 0..500u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let n = rng.random_range(1..40);
            let cfg = TreeConfig {
                root_fanout: rng.random_range(1..4),
                leader_fanout: rng.random_range(1..4),
                star_max: rng.random_range(0..5),
            };
            let all = segs(n);
            let mut t = TreePlan::new(cfg, &all, &[]);
            for _ in 0..(n * 6) {
                let who = if rng.random_bool(0.3) {
                    Node::Manager
                } else {
                    leader(&all[rng.random_range(0..n)])
                };
                match rng.random_range(0..10) {
                    0 => {
                        let victim = &all[rng.random_range(0..n)];
                        for (child, p) in t.leader_dead(victim) {
                            assert_ne!(Node::Leader(child.clone()), p, "seed {seed}");
                            assert!(t.alive_assigned(&p), "seed {seed}: adopted by a dead node");
                        }
                    }
                    1 | 2 => {
                        let s = &all[rng.random_range(0..n)];
                        if t.parent_of(s).is_some() {
                            t.received(s);
                        }
                    }
                    _ => {
                        let _ = t.next_for(&who);
                    }
                }
                for s in &all {
                    if t.parent_of(s).is_some() && !t.is_dead(s) && !t.is_complete(s) {
                        let mut cur = t.parent_of(s).cloned();
                        let mut hops = 0;
                        while let Some(Node::Leader(p)) = cur {
                            assert!(!t.is_dead(&p), "seed {seed}: {s} hangs under dead {p}");
                            if t.is_complete(&p) {
                                break; // p holds it all: what is above p no longer matters to s
                            }
                            cur = t.parent_of(&p).cloned();
                            hops += 1;
                            assert!(hops <= n, "seed {seed}: cycle above {s}");
                        }
                    }
                }
            }
            // Drain: the manager serves what is left; everyone receives.
            while let Next::Serve(s) = t.next_for(&Node::Manager) {
                t.received(&s);
            }
            for s in &all {
                if !t.is_dead(s) {
                    t.received(s);
                }
            }
            assert!(t.finished(), "seed {seed}");
            assert_eq!(t.next_for(&Node::Manager), Next::Done, "seed {seed}");
        }
    }
}
