//! A member's state report to its GL (`POST /members/state`, `cm_tree::member_state`): the
//! identity of its interpreter plugin, so the manager can show which plugin every server runs.
//! Sent to each new GL, again when the plugin changes (a hot swap), and every
//! [`RESEND`] in case the GL restarted at the same address. Every node sends it, the GL to
//! itself too: one path for every server's plugin.

use std::sync::Arc;
use std::time::Duration;

use cm_tree::member_state::MemberState;
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
            };
            let due = sent.as_ref().is_none_or(|(u, s)| *u != url || *s != state)
                || sent_at.elapsed() >= RESEND;
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
