//! The scheduler, as a pure function: which due idle jobs start now, which wait behind a running
//! job and which are cancelled (seed: runtime conflicts — a job in progress distributing to a
//! hosted site on a server, and a new job for the same hosted site on the same server).

use std::collections::BTreeSet;

use crate::model::{Job, JobState, OnBlocked};

/// A due job, with the servers its content group resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub job: u64,
    pub due_ms: u64,
    pub site: String,
    pub servers: BTreeSet<String>,
    pub on_conflict: OnBlocked,
}

/// A job that is running now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    pub job: u64,
    pub site: String,
    pub servers: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Start {
        job: u64,
    },
    /// Stays idle and is considered again on the next tick.
    Queue {
        job: u64,
        conflicts_with: u64,
    },
    Cancel {
        job: u64,
        conflicts_with: u64,
    },
}

/// Jobs that are idle and due at `now_ms`, earliest first (ties by id, so the order is stable).
pub fn due(jobs: &[Job], now_ms: u64) -> Vec<&Job> {
    let mut v: Vec<&Job> =
        jobs.iter().filter(|j| j.state == JobState::Idle && j.next_run_ms <= now_ms).collect();
    v.sort_by_key(|j| (j.next_run_ms, j.id));
    v
}

/// The first running job `c` conflicts with: same hosted site and at least one shared server.
/// A job never conflicts with its own run (a commit run follows its distribution at once, while
/// the finished distribution may still be on its way out).
pub fn conflict<'a>(c: &Candidate, active: impl IntoIterator<Item = &'a Active>) -> Option<u64> {
    active
        .into_iter()
        .find(|a| a.job != c.job && a.site == c.site && !a.servers.is_disjoint(&c.servers))
        .map(|a| a.job)
}

/// Decides every candidate in order. A job started by this call counts as running for the ones
/// after it, so two due jobs for the same servers never start together.
pub fn decide(mut candidates: Vec<Candidate>, active: &[Active]) -> Vec<Decision> {
    candidates.sort_by_key(|c| (c.due_ms, c.job));
    let mut running: Vec<Active> = active.to_vec();
    let mut out = Vec::with_capacity(candidates.len());
    for c in candidates {
        match conflict(&c, &running) {
            None => {
                out.push(Decision::Start { job: c.job });
                running.push(Active { job: c.job, site: c.site, servers: c.servers });
            }
            Some(other) => out.push(match c.on_conflict {
                OnBlocked::Queue => Decision::Queue { job: c.job, conflicts_with: other },
                OnBlocked::Cancel => Decision::Cancel { job: c.job, conflicts_with: other },
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobKind, JobSpec, Payload};

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
    fn cand(
        job: u64,
        due_ms: u64,
        site: &str,
        servers: &[&str],
        on_conflict: OnBlocked,
    ) -> Candidate {
        Candidate { job, due_ms, site: site.into(), servers: set(servers), on_conflict }
    }

    #[test]
    fn same_site_and_shared_server_conflicts_otherwise_not() {
        let active = [Active { job: 1, site: "shop".into(), servers: set(&["a", "b"]) }];
        let out = decide(
            vec![
                cand(2, 5, "shop", &["b", "c"], OnBlocked::Queue),
                cand(3, 5, "shop", &["c", "d"], OnBlocked::Queue),
                cand(4, 5, "news", &["a", "b"], OnBlocked::Queue),
                cand(5, 6, "shop", &["a"], OnBlocked::Cancel),
            ],
            &active,
        );
        assert_eq!(
            out,
            vec![
                Decision::Queue { job: 2, conflicts_with: 1 },
                Decision::Start { job: 3 },
                Decision::Start { job: 4 },
                Decision::Cancel { job: 5, conflicts_with: 1 },
            ]
        );
    }

    #[test]
    fn a_job_does_not_wait_for_its_own_ending_run() {
        let active = [Active { job: 7, site: "s".into(), servers: set(&["x"]) }];
        assert_eq!(
            decide(vec![cand(7, 0, "s", &["x"], OnBlocked::Queue)], &active),
            vec![Decision::Start { job: 7 }]
        );
    }

    #[test]
    fn two_due_jobs_on_the_same_servers_do_not_start_together() {
        let out = decide(
            vec![
                cand(9, 2, "s", &["x"], OnBlocked::Queue),
                cand(8, 1, "s", &["x", "y"], OnBlocked::Queue),
            ],
            &[],
        );
        assert_eq!(
            out,
            vec![Decision::Start { job: 8 }, Decision::Queue { job: 9, conflicts_with: 8 }]
        );
    }

    #[test]
    fn only_idle_due_jobs_are_picked_earliest_first() {
        let spec = JobSpec {
            name: "j".into(),
            kind: JobKind::Publish,
            site: "s".into(),
            payload: Payload::File { path: "a".into() },
            start_at_ms: 0,
            every_ms: None,
            policy: Default::default(),
        };
        let job = |id, next_run_ms, state| Job {
            id,
            spec: spec.clone(),
            state,
            next_run_ms,
            attempts: 0,
            last_reason: None,
            pending_commit: None,
            roll: None,
            space_wait: None,
            cache_wait: None,
        };
        let jobs = vec![
            job(1, 50, JobState::Idle),
            job(2, 10, JobState::Idle),
            job(3, 200, JobState::Idle),
            job(4, 0, JobState::Running { run: 1 }),
            job(5, 0, JobState::Done),
        ];
        let ids: Vec<u64> = due(&jobs, 100).iter().map(|j| j.id).collect();
        assert_eq!(ids, vec![2, 1]);
    }
}
