//! The ReplicaFamily controller: the family's shared Secret, its status (feature level
//! reached by every replica, the links' sync state from the sync runner, the standard
//! conditions and `Synchronized`), and the annotation that asks for a sync task now.
//!
//! A reconcile observes (the caches and the sync runner's link index), lets the
//! gateway, the client tiers and the upgrade driver take their own steps, then
//! [`decide::status`] (pure) says what the status becomes and which transitions to
//! announce, and the status is written when it changed.

pub mod decide;

use super::OperatorError;
use super::context::{Announcement, Ctx, ManualRequest, apply_status};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use multisite_core::api::{ReplicaFamily, ReplicaFamilyStatus};
use multisite_core::domain::scheduler::TaskKind;
use std::sync::Arc;

pub use decide::{SYNC_NOW, Verdicts, parse_sync_now, verdicts};

pub async fn reconcile(family: Arc<ReplicaFamily>, ctx: Arc<Ctx>) -> Result<Action, OperatorError> {
    super::reconcile::instrumented(family.as_ref(), &ctx, reconcile_once(&family, &ctx)).await
}

/// Queues the sync task the [`SYNC_NOW`] annotation asks for, says so, and removes it.
async fn sync_now(ctx: &Ctx, family: &ReplicaFamily, value: &str) -> Result<(), OperatorError> {
    let namespace = family.namespace().unwrap_or_default();
    let name = family.name_any();
    let announcement = match parse_sync_now(value) {
        Ok((kind, link)) => {
            let what = match &link {
                Some((f, t)) => format!("{f}->{t}"),
                None => "every link".into(),
            };
            ctx.ask(ManualRequest {
                family: (namespace.clone(), name.clone()),
                kind,
                link,
            });
            let kind = if kind == TaskKind::Full {
                "full"
            } else {
                "incremental"
            };
            Announcement::normal(
                "SyncRequested",
                "Sync",
                format!("{kind} task asked for on {what}"),
            )
        }
        Err(e) => Announcement::warning("InvalidAnnotation", "Sync", e),
    };
    ctx.publish(family, &announcement).await;
    ctx.remove_annotation(family, SYNC_NOW).await
}

async fn reconcile_once(family: &ReplicaFamily, ctx: &Ctx) -> Result<Action, OperatorError> {
    if family.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = family.namespace().unwrap_or_default();
    let name = family.name_any();
    let key = (namespace.clone(), name.clone());
    let api: Api<ReplicaFamily> = Api::namespaced(ctx.client.clone(), &namespace);
    ctx.ensure_secret(family).await?;
    if let Some(value) = family.annotations().get(SYNC_NOW) {
        sync_now(ctx, family, value).await?;
    }

    // Observe: the caches, the sync runner's links, and the gateway's own step.
    let members = ctx.members(&namespace, &name);
    super::clients::prune(ctx, family).await?;
    let observed = decide::Observed {
        family,
        members: &members,
        links: ctx.links_of(&key),
        topology_error: ctx.topology_error(&key),
        clients: super::clients::observe(ctx, family),
        gateway: super::gateway::reconcile(ctx, family).await?,
        announced: ctx.announced(&key),
        now: Time(k8s_openapi::jiff::Timestamp::now()),
    };

    // The upgrade driver plans from the family as observed: its client tiers as
    // deployed, and the plan this process wrote last (the cache may not have caught up
    // with it, and a step missing from the history would be lost from status).
    let old = family.status.clone().unwrap_or_default();
    let mut as_observed = family.clone();
    let status = as_observed.status.get_or_insert_with(Default::default);
    status.clients = observed.clients.clone();
    if let Some(plan) = ctx.last_plan(&key) {
        status.plan = Some(plan);
    }
    let drive = super::upgrade::drive(ctx, &ctx.compat, &as_observed, &members).await?;
    let mut plan = drive.status;
    let mut waiting = drive.waiting;
    if let Some(step) = &drive.next {
        // Published before it is carried out, so that a restart knows it ran.
        if old.plan.as_ref() != Some(&plan) {
            // Conditions and gateway as they were: only the plan and what was observed.
            let mut published = decide::observed_status(&observed);
            published.plan = Some(plan.clone());
            apply_status(&api, &name, &owned_status(&published)).await?;
        }
        ctx.remember_plan(key.clone(), plan.clone());
        waiting = super::upgrade::execute(ctx, &as_observed, &members, step, &mut plan).await?;
    }

    let upgrade = decide::Upgrade {
        plan,
        waiting,
        progressing: drive.progressing,
    };
    let decision = decide::status(&observed, upgrade);
    if decision.status != old {
        apply_status(&api, &name, &owned_status(&decision.status)).await?;
    }
    if let Some(plan) = &decision.status.plan {
        ctx.remember_plan(key.clone(), plan.clone());
    }
    ctx.record_announced(&key, decision.announced);
    for event in &decision.events {
        ctx.publish(family, event).await;
    }
    Ok(Action::requeue(decision.requeue))
}

/// Every status field the operator writes, each named even when empty, in one apply:
/// an apply that left one out would remove it, as the operator's single field manager
/// owns them all.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OwnedStatus<'a> {
    observed_generation: Option<i64>,
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    feature_level: Option<i32>,
    max_lag_changes: Option<i64>,
    links: &'a [multisite_core::api::LinkStatus],
    clients: &'a [multisite_core::api::ClientTierStatus],
    plan: Option<&'a multisite_core::api::PlanStatus>,
    gateway: Option<&'a multisite_core::api::GatewayStatus>,
}

fn owned_status(status: &ReplicaFamilyStatus) -> OwnedStatus<'_> {
    OwnedStatus {
        observed_generation: status.observed_generation,
        conditions: &status.conditions,
        feature_level: status.feature_level,
        max_lag_changes: status.max_lag_changes,
        links: &status.links,
        clients: &status.clients,
        plan: status.plan.as_ref(),
        gateway: status.gateway.as_ref(),
    }
}
