//! The writes of one Replica reconcile, in the order a decision needs them: the
//! family's Secret before the pod that mounts it, the workload, the call to the
//! replica, the status, then the Events that report it.

use super::decide::{Observed, Placement, Removal, RemovalStep};
use crate::OperatorError;
use crate::builders;
use crate::context::{Ctx, apply_status};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use multisite_core::api::{Replica, ReplicaStatus};
use multisite_replica::api::Reason;

/// Writes `status` unless the Replica already has it.
async fn write(
    api: &Api<Replica>,
    replica: &Replica,
    status: &ReplicaStatus,
) -> Result<(), OperatorError> {
    if replica.status.as_ref() != Some(status) {
        apply_status(api, &replica.name_any(), status).await?;
    }
    Ok(())
}

pub(super) async fn placement(
    ctx: &Ctx,
    api: &Api<Replica>,
    replica: &Replica,
    observed: &Observed<'_>,
    placement: Placement,
) -> Result<(), OperatorError> {
    let namespace = replica.namespace().unwrap_or_default();
    if let Some(family) = observed.family.filter(|_| placement.family_secret) {
        ctx.ensure_secret(family).await?;
    }
    if let Some(statefulset) = &placement.statefulset {
        ctx.apply(statefulset).await?;
    }
    if let Some(service) = &placement.service {
        ctx.apply(service).await?;
    }
    if let Some(bootstrap) = &placement.bootstrap {
        let client = ctx.replica_client(&namespace, &replica.spec.family).await?;
        match client.bootstrap(&bootstrap.url, &bootstrap.request).await {
            Ok(_) => ctx.publish(replica, &bootstrap.announce).await,
            // Started by an earlier reconcile, or done meanwhile.
            Err(e)
                if matches!(
                    e.reason(),
                    Some(Reason::BootstrapRunning | Reason::AlreadyBootstrapped)
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    write(api, replica, &placement.status).await?;
    for event in &placement.events {
        ctx.publish(replica, event).await;
    }
    Ok(())
}

/// Carries out one step of the removal workflow; `true` once the removal is done and
/// the finalizer may go.
pub(super) async fn removal(
    ctx: &Ctx,
    api: &Api<Replica>,
    replica: &Replica,
    removal: &Removal,
) -> Result<bool, OperatorError> {
    let namespace = replica.namespace().unwrap_or_default();
    let name = replica.name_any();
    if let Some(starting) = &removal.starting {
        ctx.publish(replica, starting).await;
    }
    match &removal.step {
        RemovalStep::Finish(why) => {
            delete_workload(ctx, &namespace, &name).await?;
            ctx.event(replica, false, "Removed", "Remove", why.clone())
                .await;
            return Ok(true);
        }
        RemovalStep::Retire { url, heir } => {
            let client = ctx.replica_client(&namespace, &replica.spec.family).await?;
            client.retire(url, heir).await?;
            ctx.event(
                replica,
                false,
                "MastershipMoved",
                "Remove",
                format!("mastership of everything {name} mastered moved to {heir}"),
            )
            .await;
        }
        RemovalStep::Wait => {}
    }
    write(api, replica, &removal.status).await?;
    Ok(false)
}

/// Deletes what a removed replica leaves: its StatefulSet, Service and volume claim.
async fn delete_workload(ctx: &Ctx, namespace: &str, name: &str) -> Result<(), OperatorError> {
    let params = DeleteParams::background();
    let gone = |r: Result<_, kube::Error>| match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(OperatorError::from(e)),
    };
    gone(
        Api::<StatefulSet>::namespaced(ctx.client.clone(), namespace)
            .delete(name, &params)
            .await
            .map(|_| ()),
    )?;
    gone(
        Api::<Service>::namespaced(ctx.client.clone(), namespace)
            .delete(name, &params)
            .await
            .map(|_| ()),
    )?;
    gone(
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace)
            .delete(&builders::claim_name(name), &params)
            .await
            .map(|_| ()),
    )?;
    Ok(())
}
