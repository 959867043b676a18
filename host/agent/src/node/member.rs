//! The member side, which every server runs while it is not the GL: receive each assignment by
//! MCTP on the segment's data channel (member id = election node id), apply it, report the
//! outcome to the current GL. Receiving goes on while an apply runs (applies are queued on the
//! [`Applier`](super::apply::Applier)'s lock, in arrival order).
//!
//! Only announcements of the GL the election follows are accepted, and only fresh ones: the
//! newest session accepted from each GL is kept in `STATE_DIR/mctp-announcers` across restarts,
//! so a recorded announcement replayed on the LAN starts nothing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cm_mctp::AnnouncerFilter;
use cm_tree::message::MemberApplyReport;

use crate::mctp::{AnnouncerMemory, FollowLeader, MctpDriverError, ReceiveOptions, receive};

use super::{Shared, apply_report, report};

/// How long a member keeps trying to hand an apply report to a GL (across GL changes).
const REPORT_GIVE_UP: Duration = Duration::from_secs(600);
/// How long a member that received a run keeps asking for the run's targets. A run nobody
/// confirms is skipped: a GL that wants it here delivers it again.
const TARGETS_GIVE_UP: Duration = Duration::from_secs(60);

/// Runs until the agent stops.
pub async fn member_loop(shared: Arc<Shared>) {
    let mut status = shared.status.clone();
    // Runs received and not yet applied and reported. A GL that announces one of them again
    // (a new GL, a restarted session) finds the file in the inbox and is told "complete" at
    // once; the task already applying it reports, so it must not be applied a second time.
    let in_flight: Arc<Mutex<HashSet<u64>>> = Default::default();
    let announcers = AnnouncerMemory::persistent(shared.cfg.state_dir.join("mctp-announcers"));
    let leader = shared.status.clone();
    let follow = FollowLeader(Arc::new(move || match leader.borrow().leader {
        Some(node) => AnnouncerFilter::Only(node),
        None => AnnouncerFilter::Nobody,
    }));
    loop {
        if status.borrow_and_update().is_leader {
            // The GL applies from the tree's copy; its member side rests meanwhile.
            if status.changed().await.is_err() {
                return;
            }
            continue;
        }
        let d = &shared.cfg.data;
        let opts = ReceiveOptions {
            group: d.channel,
            interface: d.interface,
            member: status.borrow().node,
            secret: shared.cfg.secret.clone(),
            dir: shared.cfg.state_dir.join("inbox"),
            timeout: Duration::from_secs(3600),
            linger: Duration::from_millis(300),
            session_timeout: d.session_timeout,
            inject_loss: 0.0,
            unicast_port: 0,
            join_group: true,
            durable: false,
            announcers: Some(announcers.clone()),
            follow: Some(follow.clone()),
        };
        let mut leadership = shared.status.clone();
        let became_leader = async move {
            loop {
                if leadership.borrow_and_update().is_leader || leadership.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            r = receive(opts) => match r {
                Ok(got) => {
                    let (shared, run) = (shared.clone(), got.info.assignment);
                    if !in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(run) {
                        tracing::info!(run, already_held = got.already_held, "assignment announced again while it is being applied: left to that apply");
                        continue;
                    }
                    tracing::info!(run, path = %got.path.display(), already_held = got.already_held, "assignment received by MCTP");
                    let in_flight = in_flight.clone();
                    tokio::spawn(async move {
                        let _done = InFlight { runs: in_flight, run };
                        // The data channel is multicast: every member hears every run, and
                        // applies only those that target it (a replicate names its servers).
                        let targeted = report::is_target(shared.gl_url.subscribe(), &shared.client, run, &shared.cfg.name, TARGETS_GIVE_UP).await;
                        if let Some(report::Target::Yes { aborted_before, .. }) = &targeted {
                            for order in aborted_before {
                                super::abort::follow_now(&shared, order).await;
                            }
                        }
                        if !matches!(targeted, Some(report::Target::Yes { .. })) {
                            match targeted {
                                Some(report::Target::Aborted(order)) => {
                                    tracing::info!(run, "the manager aborted the run: not applied");
                                    super::abort::follow(&shared, &order);
                                }
                                Some(_) => tracing::info!(run, "the run targets other servers of the segment: skipped"),
                                None => tracing::warn!(run, "no group leader said whether the run targets this server within {TARGETS_GIVE_UP:?}: skipped"),
                            }
                            let _ = std::fs::remove_file(&got.path);
                            return;
                        }
                        // The GL's word is checked against the manager's signed notification.
                        if let Some(report::Target::Yes { notification, .. }) = &targeted
                            && let Err(why) = confirm_target(&shared, run, &got.path, notification.as_deref()).await
                        {
                            tracing::warn!(run, "not applied: {why}");
                            let _ = std::fs::remove_file(&got.path);
                            // Said to the GL, so the run's report names the reason.
                            let refused = MemberApplyReport {
                                server: shared.cfg.name.clone(),
                                node: shared.status.borrow().node,
                                run,
                                error: Some(format!("not applied: {why}")),
                                live: None,
                                summary: String::new(),
                                site: String::new(),
                            };
                            let _ = report::send_to_gl(shared.gl_url.subscribe(), shared.client.clone(), refused, REPORT_GIVE_UP).await;
                            return;
                        }
                        let r = apply_report(&shared, run, got.path.clone()).await;
                        let _ = std::fs::remove_file(&got.path);
                        let answer = report::send_to_gl(shared.gl_url.subscribe(), shared.client.clone(), r, REPORT_GIVE_UP).await;
                        // Aborted while it applied: what it prepared goes.
                        if let Some(order) = answer.as_ref().and_then(super::abort::order_in) {
                            super::abort::follow(&shared, &order);
                        }
                    });
                }
                Err(MctpDriverError::Timeout(_)) => {}
                Err(e) => {
                    tracing::warn!("receiving on the data channel: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            () = became_leader => {}
        }
    }
}

/// Takes a run out of the member's in-flight set when its task ends, however it ends.
struct InFlight {
    runs: Arc<Mutex<HashSet<u64>>>,
    run: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.run);
    }
}

/// With pinned manager keys, a run is applied only when the manager's signed notification
/// (relayed by the GL) names this server and describes the received file
/// (`cm_tree::targets`): a GL cannot hand a genuine run to members it does not target.
async fn confirm_target(
    shared: &Arc<Shared>,
    run: u64,
    file: &std::path::Path,
    notification: Option<&cm_tree::message::Notification>,
) -> Result<(), String> {
    let Some(keys) = shared.applier.signers() else { return Ok(()) };
    let path = file.to_path_buf();
    let hash = tokio::task::spawn_blocking(move || {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(path)?)?;
        Ok::<_, std::io::Error>(h.finalize().to_hex().to_string())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("hashing the received assignment: {e}"))?;
    cm_tree::targets::confirm(notification, keys, run, &hash, &shared.cfg.name)
        .map_err(|e| e.to_string())
}
