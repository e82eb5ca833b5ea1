//! The Replica controller: a one-pod StatefulSet and a Service per Replica, the pod
//! bootstrapped (first replica of the family, or a clone of a live one), the replica's
//! own report copied into status, and on deletion the removal workflow: mastership
//! moved away, that change delivered to every peer, then the workload and data go.

use super::OperatorError;
use super::builders;
use super::context::{Ctx, apply_object, apply_status};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use multisite_core::api::ReplicaFamily;
use multisite_core::api::conditions::{self, DEGRADED, PROGRESSING, READY};
use multisite_core::api::{
    MasteredCounts, PacketVersionStatus, Replica, ReplicaPhase, ReplicaStatus,
};
use multisite_replica::api::{BootstrapRequest, BootstrapSource, Reason, StatusReport};
use multisite_replica::http::HttpError;
use std::sync::Arc;
use std::time::Duration;

/// Held on every Replica until its removal workflow has finished.
pub const FINALIZER: &str = "multisite.dev/removal";
/// `"true"` on a Replica being deleted skips the removal workflow (its changes that
/// did not reach a peer are lost): for a replica whose pod can never come back.
pub const FORCE_REMOVE: &str = "multisite.dev/force-remove";

/// Where a new replica's data comes from, or why it must wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootstrapPlan {
    Init {
        id_prefix: String,
        feature_level: i32,
    },
    CloneFrom {
        source: String,
        endpoint: String,
    },
    Wait(String),
    /// It must not be bootstrapped automatically: the reason says what to do.
    Refuse(String),
}

fn active_endpoint(r: &Replica) -> Option<String> {
    let status = r.status.as_ref()?;
    (status.phase == Some(ReplicaPhase::Active) && r.metadata.deletion_timestamp.is_none())
        .then(|| status.endpoint.clone())
        .flatten()
}

/// Decides how `me` is bootstrapped. `members` are the family's Replicas, oldest first.
pub fn bootstrap_plan(
    me: &Replica,
    family: &ReplicaFamily,
    members: &[Arc<Replica>],
) -> BootstrapPlan {
    let name = me.name_any();
    let others: Vec<&Arc<Replica>> = members.iter().filter(|r| r.name_any() != name).collect();
    let was_active = me.status.as_ref().and_then(|s| s.incarnation).is_some();
    if was_active {
        return BootstrapPlan::Refuse(format!(
            "replica {name} served before but its data directory is now empty; its peers still count it as a member, \
             so it cannot be re-created under the same name: delete this Replica (annotate {FORCE_REMOVE}=true if its \
             pod cannot serve) and create one with a new name"
        ));
    }
    if let Some(source) = &me.spec.bootstrap_from {
        return match others.iter().find(|r| r.name_any() == *source) {
            None => BootstrapPlan::Wait(format!(
                "bootstrapFrom names {source}, which is not a replica of family {}",
                me.spec.family
            )),
            Some(r) => match active_endpoint(r) {
                Some(endpoint) => BootstrapPlan::CloneFrom {
                    source: source.clone(),
                    endpoint,
                },
                None => BootstrapPlan::Wait(format!("bootstrap source {source} is not Active yet")),
            },
        };
    }
    if let Some((source, endpoint)) = others
        .iter()
        .find_map(|r| active_endpoint(r).map(|e| (r.name_any(), e)))
    {
        return BootstrapPlan::CloneFrom { source, endpoint };
    }
    // No live replica to copy: the oldest Replica that names no bootstrap source starts
    // the family, the others wait for it (two replicas created empty would be two
    // families).
    let oldest = members
        .iter()
        .find(|r| r.metadata.deletion_timestamp.is_none() && r.spec.bootstrap_from.is_none())
        .map(|r| r.name_any());
    if oldest.as_deref() == Some(name.as_str()) {
        BootstrapPlan::Init {
            id_prefix: family.spec.id_prefix.clone(),
            feature_level: family.spec.feature_level,
        }
    } else {
        BootstrapPlan::Wait(match oldest {
            Some(oldest) => format!("waiting for {oldest} to start the family"),
            None => "no replica can start the family: every one names a bootstrapFrom".into(),
        })
    }
}

/// Copies what the replica says about itself into the status.
pub fn fill_status(status: &mut ReplicaStatus, report: &StatusReport) {
    status.schema_repository_feature_level = Some(report.schema_repository_feature_level);
    status.user_database_feature_level = Some(report.user_database_feature_level);
    status.metaschema_version = Some(report.metaschema_version);
    status.packet_version = report.packet_version.as_ref().map(|p| PacketVersionStatus {
        creates: p.creates,
        accepts_min: p.accepts_min,
        accepts_max: p.accepts_max,
    });
    status.incarnation = i64::try_from(report.incarnation).ok();
    status.epochs = report
        .epochs
        .iter()
        .map(|(k, v)| (k.clone(), i64::try_from(*v).unwrap_or(i64::MAX)))
        .collect();
    status.held_packets = i64::try_from(report.held_packets).unwrap_or(i64::MAX);
    status.held_from.clear();
    for held in &report.held {
        *status.held_from.entry(held.sender.clone()).or_default() += 1;
    }
    let count = |k: &str| {
        report
            .mastered
            .get(k)
            .map(|v| i64::try_from(*v).unwrap_or(i64::MAX))
            .unwrap_or(0)
    };
    status.mastered = Some(MasteredCounts {
        records: count("records"),
        workspace_items: count("workspaceItems"),
        users: count("users"),
    });
    status.schema_repository_master = Some(report.schema_repository_master.clone());
    status.gateway_replica = report.gateway_replica.clone();
    status.removal_pending = report.removal_pending.clone();
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Sets the three standard conditions at once.
fn conditions(
    status: &mut ReplicaStatus,
    generation: Option<i64>,
    ready: (bool, &str, &str),
    progressing: (bool, &str, &str),
    degraded: (bool, &str, &str),
) {
    let t = now();
    for (type_, (value, reason, message)) in [
        (READY, ready),
        (PROGRESSING, progressing),
        (DEGRADED, degraded),
    ] {
        conditions::set_condition(
            &mut status.conditions,
            type_,
            value,
            reason,
            message,
            generation,
            t.clone(),
        );
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The replica's pod, unless it is gone or going.
async fn live_pod(ctx: &Ctx, namespace: &str, replica: &str) -> Result<Option<Pod>, OperatorError> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(pods
        .get_opt(&builders::pod_name(replica))
        .await?
        .filter(|pod| pod.metadata.deletion_timestamp.is_none()))
}

/// The pod's API address, once it has an IP.
fn endpoint(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    Some(format!("http://{ip}:{}", builders::API_PORT))
}

/// Why a replica's pod does not serve yet, as its status tells: (whether it needs a
/// person: the condition Degraded, reason, message). A pod the scheduler cannot place
/// (a Site's zone that no node has, no room) or whose container cannot start will not
/// come up by waiting.
fn pod_not_serving(
    pod_name: &str,
    pod: Option<&Pod>,
    zone: Option<&str>,
) -> (bool, &'static str, String) {
    let Some(status) = pod.and_then(|p| p.status.as_ref()) else {
        return (
            false,
            "PodStarting",
            format!("waiting for pod {pod_name} to start"),
        );
    };
    let unscheduled = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(condition) = unscheduled {
        let why = condition.message.as_deref().unwrap_or("no reason given");
        let hint = zone
            .map(|zone| format!(" (its Site asks for nodes in zone {zone})"))
            .unwrap_or_default();
        return (
            true,
            "Unschedulable",
            format!("pod {pod_name} cannot be scheduled{hint}: {why}"),
        );
    }
    let stuck = status.container_statuses.iter().flatten().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        matches!(
            reason,
            "ErrImagePull"
                | "ImagePullBackOff"
                | "CrashLoopBackOff"
                | "CreateContainerConfigError"
                | "InvalidImageName"
        )
        .then(|| {
            format!(
                "{reason}: {}",
                waiting.message.as_deref().unwrap_or("no message")
            )
        })
    });
    match stuck {
        Some(why) => (
            true,
            "PodNotStarting",
            format!("pod {pod_name} does not start: {why}"),
        ),
        None => (
            false,
            "PodStarting",
            format!("waiting for pod {pod_name} to start"),
        ),
    }
}

/// Whether an error answer is a pod waiting for its bootstrap.
fn awaiting_bootstrap(error: &HttpError) -> bool {
    matches!(error, HttpError::AwaitingBootstrap(_))
}

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
    if replica.metadata.deletion_timestamp.is_some() {
        if !held {
            Ok(Action::await_change())
        } else {
            match remove(replica, ctx, &api).await {
                Ok(Removal::Wait(after)) => Ok(Action::requeue(after)),
                Ok(Removal::Done) => {
                    let rest: Vec<String> = replica
                        .finalizers()
                        .iter()
                        .filter(|f| *f != FINALIZER)
                        .cloned()
                        .collect();
                    set_finalizers(&api, replica, rest)
                        .await
                        .map(|()| Action::await_change())
                }
                Err(e) => Err(e),
            }
        }
    } else if !held {
        // The finalizer first, so that a deletion always runs the removal workflow.
        let mut all = replica.finalizers().to_vec();
        all.push(FINALIZER.to_string());
        set_finalizers(&api, replica, all)
            .await
            .map(|()| Action::requeue(Duration::from_millis(100)))
    } else {
        apply(replica, ctx, &api).await
    }
}

/// Where the removal workflow stands.
enum Removal {
    /// Look again after this long.
    Wait(Duration),
    /// Everything is gone; the finalizer may go.
    Done,
}

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

async fn apply(replica: &Replica, ctx: &Ctx, api: &Api<Replica>) -> Result<Action, OperatorError> {
    let namespace = replica.namespace().unwrap_or_default();
    let name = replica.name_any();
    let generation = replica.metadata.generation;
    let mut status = replica.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let previous_phase = status.phase;

    let family = ctx.family(&namespace, &replica.spec.family);
    let site = ctx.site(&namespace, &replica.spec.site);
    let (Some(family), Some(site)) = (family, site) else {
        let (reason, message) = if ctx.family(&namespace, &replica.spec.family).is_none() {
            (
                "FamilyNotFound",
                format!(
                    "ReplicaFamily {} does not exist in {namespace}",
                    replica.spec.family
                ),
            )
        } else {
            (
                "SiteNotFound",
                format!("Site {} does not exist in {namespace}", replica.spec.site),
            )
        };
        status.phase = Some(status.phase.unwrap_or(ReplicaPhase::Pending));
        conditions(
            &mut status,
            generation,
            (false, reason, &message),
            (false, reason, &message),
            (true, reason, &message),
        );
        write(api, replica, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(15)));
    };

    ctx.ensure_secret(&family).await?;
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    apply_object(&sts, &builders::statefulset(replica, &site, &ctx.image)).await?;
    let svc: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    apply_object(&svc, &builders::service(replica)).await?;

    let pod = live_pod(ctx, &namespace, &name).await?;
    let Some((url, pod)) = pod.as_ref().and_then(|p| Some((endpoint(p)?, p.clone()))) else {
        status.phase = Some(status.phase.unwrap_or(ReplicaPhase::Pending));
        status.reachable = Some(false);
        let zone = site.spec.zone.as_deref();
        let (stuck, reason, message) =
            pod_not_serving(&builders::pod_name(&name), pod.as_ref(), zone);
        conditions(
            &mut status,
            generation,
            (false, reason, &message),
            (!stuck, reason, &message),
            (stuck, reason, &message),
        );
        write(api, replica, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    status.endpoint = Some(url.clone());
    let client = ctx.replica_client(&namespace, &replica.spec.family).await?;
    match client.status(&url).await {
        Ok(report) if report.family != replica.spec.family || report.replica != name => {
            let message = format!(
                "pod {} serves replica {} of family {}, not {name} of {}",
                builders::pod_name(&name),
                report.replica,
                report.family,
                replica.spec.family
            );
            status.reachable = Some(true);
            conditions(
                &mut status,
                generation,
                (false, "WrongReplica", &message),
                (false, "WrongReplica", &message),
                (true, "WrongReplica", &message),
            );
            write(api, replica, &status).await?;
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        Ok(report) => {
            fill_status(&mut status, &report);
            status.reachable = Some(true);
            status.phase = Some(ReplicaPhase::Active);
            let ready = pod_ready(&pod);
            let levels = format!(
                "serving at feature levels ({}, {})",
                report.schema_repository_feature_level, report.user_database_feature_level
            );
            let progressing = if !report.restoring.is_empty() {
                (
                    true,
                    "Restoring",
                    format!(
                        "waiting for {} to re-send what the backup lacks",
                        report.restoring.join(", ")
                    ),
                )
            } else {
                (false, "Serving", levels.clone())
            };
            conditions(
                &mut status,
                generation,
                (
                    ready,
                    if ready { "Serving" } else { "PodNotReady" },
                    &levels,
                ),
                (progressing.0, progressing.1, &progressing.2),
                (false, "Serving", &levels),
            );
            write(api, replica, &status).await?;
            if previous_phase != Some(ReplicaPhase::Active) {
                ctx.event(
                    replica,
                    false,
                    "Active",
                    "Serve",
                    format!("replica {name} is {levels}"),
                )
                .await;
            }
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Err(HttpError::AwaitingBootstrap(waiting)) => {
            status.reachable = Some(true);
            let members = ctx.members(&namespace, &replica.spec.family);
            let plan = bootstrap_plan(replica, &family, &members);
            let request = |source| BootstrapRequest {
                family: replica.spec.family.clone(),
                replica: name.clone(),
                source,
            };
            let (request, message) = match &plan {
                BootstrapPlan::Init {
                    id_prefix,
                    feature_level,
                } => (
                    Some(request(BootstrapSource::Init {
                        id_prefix: id_prefix.clone(),
                        feature_level: *feature_level,
                    })),
                    format!("creating the family's first replica at feature level {feature_level}"),
                ),
                BootstrapPlan::CloneFrom { source, endpoint } => (
                    Some(request(BootstrapSource::CloneFrom(endpoint.clone()))),
                    format!("cloning from {source}"),
                ),
                BootstrapPlan::Wait(why) => (None, why.clone()),
                BootstrapPlan::Refuse(why) => {
                    status.phase = Some(ReplicaPhase::Pending);
                    conditions(
                        &mut status,
                        generation,
                        (false, "DataLost", why),
                        (false, "DataLost", why),
                        (true, "DataLost", why),
                    );
                    write(api, replica, &status).await?;
                    if previous_phase == Some(ReplicaPhase::Active) {
                        ctx.event(replica, true, "DataLost", "Bootstrap", why.clone())
                            .await;
                    }
                    return Ok(Action::requeue(Duration::from_secs(30)));
                }
            };
            let running = waiting.running.is_some();
            if let Some(request) = request.filter(|_| !running) {
                match client.bootstrap(&url, &request).await {
                    Ok(_) => {
                        ctx.event(
                            replica,
                            false,
                            "Bootstrapping",
                            "Bootstrap",
                            message.clone(),
                        )
                        .await
                    }
                    // Started by an earlier reconcile, or done meanwhile.
                    Err(e)
                        if matches!(
                            e.reason(),
                            Some(Reason::BootstrapRunning | Reason::AlreadyBootstrapped)
                        ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            status.phase = Some(ReplicaPhase::Bootstrapping);
            let failed = waiting.error.clone();
            let degraded = !running && waiting.last_error.is_some();
            conditions(
                &mut status,
                generation,
                (false, "Bootstrapping", &message),
                (true, "Bootstrapping", &message),
                (
                    degraded,
                    if degraded {
                        "BootstrapFailed"
                    } else {
                        "Bootstrapping"
                    },
                    if degraded { &failed } else { &message },
                ),
            );
            write(api, replica, &status).await?;
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Err(error) => {
            status.reachable = Some(false);
            let message = format!("replica API at {url}: {error}");
            conditions(
                &mut status,
                generation,
                (false, "Unreachable", &message),
                (false, "Unreachable", &message),
                (true, "Unreachable", &message),
            );
            write(api, replica, &status).await?;
            Ok(Action::requeue(Duration::from_secs(5)))
        }
    }
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

/// The replica that takes over what a leaving one masters: the gateway's replica if it
/// stays, else the oldest other active one.
fn heir(leaving: &str, family: Option<&ReplicaFamily>, members: &[Arc<Replica>]) -> Option<String> {
    let active: Vec<String> = members
        .iter()
        .filter(|r| r.name_any() != leaving && active_endpoint(r).is_some())
        .map(|r| r.name_any())
        .collect();
    let gateway = family
        .and_then(|f| f.spec.gateway.as_ref())
        .map(|g| g.replica.clone());
    gateway
        .filter(|g| active.contains(g))
        .or_else(|| active.first().cloned())
}

async fn remove(
    replica: &Replica,
    ctx: &Ctx,
    api: &Api<Replica>,
) -> Result<Removal, OperatorError> {
    let namespace = replica.namespace().unwrap_or_default();
    let name = replica.name_any();
    let generation = replica.metadata.generation;
    let mut status = replica.status.clone().unwrap_or_default();
    if status.phase != Some(ReplicaPhase::Removing) {
        status.phase = Some(ReplicaPhase::Removing);
        ctx.event(
            replica,
            false,
            "Removing",
            "Remove",
            format!("removing replica {name}: its mastership moves first"),
        )
        .await;
    }
    let finish = |why: String| async move {
        delete_workload(ctx, &namespace, &name).await?;
        ctx.event(replica, false, "Removed", "Remove", why).await;
        Ok::<Removal, OperatorError>(Removal::Done)
    };
    let forced = replica
        .annotations()
        .get(FORCE_REMOVE)
        .is_some_and(|v| v == "true");
    if forced {
        return finish(format!(
            "{FORCE_REMOVE} set: workload and data of {} deleted without moving its mastership",
            replica.name_any()
        ))
        .await;
    }
    if status.incarnation.is_none() {
        return finish("the replica never served; its workload is deleted".into()).await;
    }
    let namespace = replica.namespace().unwrap_or_default();
    let name = replica.name_any();
    let waiting = |status: &mut ReplicaStatus, message: &str| {
        conditions(
            status,
            generation,
            (false, "Removing", message),
            (true, "Removing", message),
            (false, "Removing", message),
        );
    };
    let url = live_pod(ctx, &namespace, &name).await?;
    let Some(url) = url.as_ref().and_then(endpoint) else {
        let message = format!(
            "waiting for pod {} to serve, to move its mastership away (annotate {FORCE_REMOVE}=true to skip)",
            builders::pod_name(&name)
        );
        waiting(&mut status, &message);
        write(api, replica, &status).await?;
        return Ok(Removal::Wait(Duration::from_secs(5)));
    };
    let client = ctx.replica_client(&namespace, &replica.spec.family).await?;
    let report = match client.status(&url).await {
        Ok(report) => report,
        Err(e) if awaiting_bootstrap(&e) => {
            return finish("the replica holds no data; its workload is deleted".into()).await;
        }
        Err(e) => {
            let message = format!(
                "cannot reach the replica to move its mastership ({e}); annotate {FORCE_REMOVE}=true to skip"
            );
            waiting(&mut status, &message);
            write(api, replica, &status).await?;
            return Ok(Removal::Wait(Duration::from_secs(5)));
        }
    };
    fill_status(&mut status, &report);
    match &report.removal_pending {
        None => {
            let members = ctx.members(&namespace, &replica.spec.family);
            let family = ctx.family(&namespace, &replica.spec.family);
            let others = members.iter().any(|r| r.name_any() != name);
            match heir(&name, family.as_deref(), &members) {
                Some(heir) => {
                    client.retire(&url, &heir).await?;
                    ctx.event(
                        replica,
                        false,
                        "MastershipMoved",
                        "Remove",
                        format!("mastership of everything {name} mastered moved to {heir}"),
                    )
                    .await;
                    waiting(
                        &mut status,
                        &format!(
                            "mastership moved to {heir}; waiting for every peer to receive that change"
                        ),
                    );
                }
                None if !others => {
                    return finish("the family's last replica; its workload is deleted".into())
                        .await;
                }
                None => waiting(
                    &mut status,
                    "waiting for another replica to be Active, to hand this one's mastership to",
                ),
            }
            write(api, replica, &status).await?;
            Ok(Removal::Wait(Duration::from_secs(2)))
        }
        Some(pending) if !pending.is_empty() => {
            waiting(
                &mut status,
                &format!(
                    "waiting for {} to receive this replica's last changes",
                    pending.join(", ")
                ),
            );
            write(api, replica, &status).await?;
            Ok(Removal::Wait(Duration::from_secs(2)))
        }
        Some(_) => {
            finish(format!(
                "every peer holds {name}'s changes; its workload and data are deleted"
            ))
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use multisite_core::api::ReplicaFamilySpec;
    use multisite_core::api::ReplicaSpec;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "r-0"}, "status": status}))
            .expect("a pod")
    }

    #[test]
    fn why_a_pod_does_not_serve() {
        let unschedulable = pod(
            serde_json::json!({"conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."}]}),
        );
        let crashing = pod(
            serde_json::json!({"containerStatuses": [{"name": "replica", "image": "x", "imageID": "",
            "ready": false, "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}}]}),
        );
        let creating = pod(
            serde_json::json!({"containerStatuses": [{"name": "replica", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        let scheduled =
            pod(serde_json::json!({"conditions": [{"type": "PodScheduled", "status": "True"}]}));
        for (pod, zone, stuck, reason, says) in [
            (
                None,
                None,
                false,
                "PodStarting",
                "waiting for pod r-0 to start",
            ),
            (
                Some(&scheduled),
                None,
                false,
                "PodStarting",
                "waiting for pod r-0 to start",
            ),
            (
                Some(&creating),
                None,
                false,
                "PodStarting",
                "waiting for pod r-0 to start",
            ),
            (
                Some(&unschedulable),
                Some("zone-x"),
                true,
                "Unschedulable",
                "pod r-0 cannot be scheduled (its Site asks for nodes in zone zone-x): 0/3 nodes are available",
            ),
            (
                Some(&unschedulable),
                None,
                true,
                "Unschedulable",
                "pod r-0 cannot be scheduled: 0/3",
            ),
            (
                Some(&crashing),
                None,
                true,
                "PodNotStarting",
                "pod r-0 does not start: CrashLoopBackOff: back-off 40s",
            ),
        ] {
            let (got_stuck, got_reason, message) = pod_not_serving("r-0", pod, zone);
            assert_eq!((got_stuck, got_reason), (stuck, reason), "{message}");
            assert!(message.starts_with(says), "{message}");
        }
    }
    use k8s_openapi::jiff::Timestamp;

    fn family() -> ReplicaFamily {
        ReplicaFamily::new("sampl", ReplicaFamilySpec::new("SAMPL", 7))
    }

    fn replica(
        name: &str,
        age_secs: i64,
        phase: Option<ReplicaPhase>,
        from: Option<&str>,
    ) -> Arc<Replica> {
        let mut r = Replica::new(
            name,
            ReplicaSpec {
                family: "sampl".into(),
                site: "s".into(),
                storage: "1Gi".into(),
                bootstrap_from: from.map(str::to_string),
                resources: None,
            },
        );
        r.metadata.creation_timestamp = Some(Time(
            Timestamp::from_second(1_000_000 - age_secs).expect("time"),
        ));
        if let Some(phase) = phase {
            r.status = Some(ReplicaStatus {
                phase: Some(phase),
                endpoint: Some(format!("http://{name}:7400")),
                incarnation: (phase == ReplicaPhase::Active).then_some(1),
                ..Default::default()
            });
        }
        Arc::new(r)
    }

    #[test]
    fn bootstrap_table() {
        let f = family();
        let init = BootstrapPlan::Init {
            id_prefix: "SAMPL".into(),
            feature_level: 7,
        };
        let clone = |s: &str| BootstrapPlan::CloneFrom {
            source: s.into(),
            endpoint: format!("http://{s}:7400"),
        };
        let a_new = replica("a", 30, None, None);
        let b_new = replica("b", 20, None, None);
        let a_live = replica("a", 30, Some(ReplicaPhase::Active), None);
        let c_live = replica("c", 10, Some(ReplicaPhase::Active), None);
        let d_from_c = replica("d", 5, None, Some("c"));
        let d_from_b = replica("d", 5, None, Some("b"));
        type Case<'a> = (&'a Arc<Replica>, Vec<Arc<Replica>>, BootstrapPlan);
        let cases: Vec<Case> = vec![
            // The oldest of an empty family starts it; a younger one waits for it.
            (&a_new, vec![a_new.clone(), b_new.clone()], init.clone()),
            (
                &b_new,
                vec![a_new.clone(), b_new.clone()],
                BootstrapPlan::Wait("waiting for a to start the family".into()),
            ),
            // Once one serves, the others copy it (the oldest live one).
            (
                &b_new,
                vec![a_live.clone(), b_new.clone(), c_live.clone()],
                clone("a"),
            ),
            // bootstrapFrom wins, and waits for its source to serve.
            (
                &d_from_c,
                vec![a_live.clone(), c_live.clone(), d_from_c.clone()],
                clone("c"),
            ),
            (
                &d_from_b,
                vec![a_live.clone(), b_new.clone(), d_from_b.clone()],
                BootstrapPlan::Wait("bootstrap source b is not Active yet".into()),
            ),
            // Replicas that name a source never start the family, even when older.
            (
                &b_new,
                vec![replica("a", 30, None, Some("b")), b_new.clone()],
                init.clone(),
            ),
        ];
        for (me, members, expected) in cases {
            assert_eq!(
                bootstrap_plan(me, &f, &members),
                expected,
                "{}",
                me.name_any()
            );
        }
        // A replica that served before and lost its data is never re-created empty.
        let lost = replica("a", 30, Some(ReplicaPhase::Active), None);
        assert!(matches!(
            bootstrap_plan(&lost, &f, std::slice::from_ref(&lost)),
            BootstrapPlan::Refuse(_)
        ));
        let unknown = replica("d", 5, None, Some("zz"));
        assert!(
            matches!(bootstrap_plan(&unknown, &f, &[a_live.clone(), unknown.clone()]), BootstrapPlan::Wait(w) if w.contains("zz"))
        );
    }

    #[test]
    fn heir_prefers_the_gateway_replica_then_the_oldest_active() {
        let mut f = family();
        let a = replica("a", 30, Some(ReplicaPhase::Active), None);
        let b = replica("b", 20, Some(ReplicaPhase::Active), None);
        let c = replica("c", 10, Some(ReplicaPhase::Active), None);
        let members = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(heir("a", Some(&f), &members).as_deref(), Some("b"));
        f.spec.gateway = Some(multisite_core::api::GatewaySpec {
            replica: "c".into(),
            endpoint: None,
        });
        assert_eq!(heir("a", Some(&f), &members).as_deref(), Some("c"));
        assert_eq!(heir("c", Some(&f), &members).as_deref(), Some("a"));
        assert_eq!(heir("a", Some(&f), std::slice::from_ref(&a)), None);
    }
}
