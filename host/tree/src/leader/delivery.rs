//! The segment side of a GL's duty, as the tree sees it: [`LocalDelivery`] hands a whole,
//! verified assignment to the segment's members (the agent implements it with MCTP; tests with
//! plain copies) and answers with a [`DeliveryOutcome`], the GL's consolidated report less its
//! names.

use std::path::PathBuf;

use crate::BoxFuture;
use crate::abort::AbortOrder;
use crate::manifest::Manifest;
use crate::message::{MemberApplyReport, Notification, SegmentReport};

/// What the segment made of an assignment: the GL's consolidated report, less its names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeliveryOutcome {
    pub succeeded: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub missing: Vec<String>,
}

/// Hands a whole, verified assignment to the members of the GL's segment and collects their reports.
pub trait LocalDelivery: Send + Sync + 'static {
    fn deliver(
        &self,
        run: u64,
        assignment: PathBuf,
        manifest: Manifest,
    ) -> BoxFuture<'static, DeliveryOutcome>;

    /// Delivers to `servers` only (the notification's targets; empty: every member). The
    /// default delivers to everyone; a delivery that can leave servers out overrides it.
    fn deliver_to(
        &self,
        run: u64,
        assignment: PathBuf,
        manifest: Manifest,
        servers: Vec<String>,
    ) -> BoxFuture<'static, DeliveryOutcome> {
        let _ = servers;
        self.deliver(run, assignment, manifest)
    }

    /// A member's apply report arrived at this GL (`POST /members/report`). Returns whether the
    /// delivery takes such reports; the default (deliveries that end at MCTP completion) does not.
    fn member_report(&self, _report: MemberApplyReport) -> bool {
        false
    }

    /// The manager aborted `order.run` (signature checked): discard what the run prepared in
    /// the segment. The delivery itself is already stopped. The default has nothing to discard.
    fn abort(&self, _order: &AbortOrder) {}

    /// The segment's report on `notification`'s run went to the manager (or the GL gave up
    /// offering it): what follows the run in the segment, e.g. telling its caches what the
    /// commit changed (`notification.cache`). Must not block: spawn what takes time. The
    /// default does nothing.
    fn reported(&self, _notification: &Notification, _report: &SegmentReport) {}
}
