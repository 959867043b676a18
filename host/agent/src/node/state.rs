//! A member's state report to its GL (`POST /members/state`, `cm_tree::member_state`): the
//! identity of its interpreter plugin, so the manager can show which plugin every server runs,
//! and the free space and inodes of its site root's filesystem ([`super::space`]), which the
//! manager checks runs against. Sent to each new GL, again when the plugin changes (a hot
//! swap) or the space moves by 1 % ([`FsSpace::moved_from`]), and every [`RESEND`] in case the
//! GL restarted at the same address. Every node sends it, the GL to itself too: one path for
//! every server.

use std::sync::Arc;
use std::time::Duration;

use cm_tree::member_state::MemberState;
use cm_tree::space::FsSpace;
use tokio::time::Instant;

use super::Shared;
use super::report::with_current_gl;

/// How often the state goes to the GL unchanged, and how often the plugin is looked at.
const RESEND: Duration = Duration::from_secs(30);
const LOOK: Duration = Duration::from_millis(500);
/// A report not delivered within this is dropped; the next look sends it again.
const GIVE_UP: Duration = Duration::from_secs(10);

pub async fn state_loop(shared: Arc<Shared>) {
    let mut gl = shared.gl_url.subscribe();
    let mut sent: Option<(String, MemberState)> = None;
    let mut sent_at = Instant::now();
    loop {
        let url = gl.borrow_and_update().clone();
        if let Some(url) = url {
            let state = MemberState {
                server: shared.cfg.name.clone(),
                plugin: shared.applier.plugin_identity(),
                space: super::space::measure_all(shared.cfg.sites.iter().map(|s| s.root.as_path())),
            };
            let due = sent.as_ref().is_none_or(|(u, s)| {
                *u != url || s.plugin != state.plugin || space_moved(&s.space, &state.space)
            }) || sent_at.elapsed() >= RESEND;
            if due {
                let client = &shared.client;
                let ok = with_current_gl(gl.clone(), GIVE_UP, "member state", |u| {
                    let state = &state;
                    async move {
                        client
                            .post::<_, serde_json::Value>(&format!("{u}/members/state"), state)
                            .await
                    }
                })
                .await;
                if ok.is_some() {
                    sent = Some((url, state));
                    sent_at = Instant::now();
                }
            }
        }
        let _ = tokio::time::timeout(LOOK, gl.changed()).await;
    }
}

/// Whether the space measured now is worth a report before the periodic one.
fn space_moved(sent: &Option<FsSpace>, now: &Option<FsSpace>) -> bool {
    match (sent, now) {
        (Some(a), Some(b)) => b.moved_from(a),
        (a, b) => a.is_some() != b.is_some(),
    }
}
