//! The Replica controller: a one-pod StatefulSet and a Service per Replica, the pod
//! bootstrapped (first replica of the family, or a clone of a live one), the replica's
//! own report copied into status, and on deletion the removal workflow: mastership
//! moved away, that change delivered to every peer, then the workload and data go.
//!
//! Each reconcile runs in stages: [`observe`] reads (the caches, and the replica's
//! server when its pod has an address), [`decide`] is pure and says what to apply, what
//! to ask of the replica, the status and the Events, and [`apply`] carries that out.
//! Objects the caches already hold as built are not applied again, so a settled
//! replica costs its poll one call to its own server and no request to Kubernetes.

mod apply;
pub mod decide;
mod observe;

use super::OperatorError;
use super::context::Ctx;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use multisite_core::api::Replica;
use std::sync::Arc;
use std::time::Duration;

pub use decide::{BootstrapPlan, bootstrap_plan, fill_status};

/// Held on every Replica until its removal workflow has finished.
pub const FINALIZER: &str = "multisite.dev/removal";
/// `"true"` on a Replica being deleted skips the removal workflow (its changes that
/// did not reach a peer are lost): for a replica whose pod can never come back.
pub const FORCE_REMOVE: &str = "multisite.dev/force-remove";

/// Sets the finalizers to `finalizers`, if the object is still at the version read
/// (a merge patch carrying the resourceVersion fails on a stale copy).
async fn set_finalizers(
    api: &Api<Replica>,
    replica: &Replica,
    finalizers: Vec<String>,
) -> Result<(), OperatorError> {
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": replica.resource_version(),
    }});
    api.patch(
        &replica.name_any(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

pub async fn reconcile(replica: Arc<Replica>, ctx: Arc<Ctx>) -> Result<Action, OperatorError> {
    super::reconcile::instrumented(replica.as_ref(), &ctx, reconcile_once(&replica, &ctx)).await
}

async fn reconcile_once(replica: &Replica, ctx: &Ctx) -> Result<Action, OperatorError> {
    let namespace = replica.namespace().unwrap_or_default();
    let api: Api<Replica> = Api::namespaced(ctx.client.clone(), &namespace);
    let held = replica.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = replica.metadata.deletion_timestamp.is_some();
    if deleting && !held {
        return Ok(Action::await_change());
    }
    if !held {
        // The finalizer first, so that a deletion always runs the removal workflow.
        let mut all = replica.finalizers().to_vec();
        all.push(FINALIZER.to_string());
        set_finalizers(&api, replica, all).await?;
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let seen = observe::observe(ctx, replica).await?;
    let observed = seen.observed(replica, &ctx.image);
    if deleting {
        let removal = decide::removal(&observed);
        if apply::removal(ctx, &api, replica, &removal).await? {
            let rest: Vec<String> = replica
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            set_finalizers(&api, replica, rest).await?;
            return Ok(Action::await_change());
        }
        Ok(Action::requeue(removal.requeue))
    } else {
        let placement = decide::placement(&observed);
        let requeue = placement.requeue;
        apply::placement(ctx, &api, replica, &observed, placement).await?;
        Ok(Action::requeue(requeue))
    }
}
