//! The Replica controller's decisions, pure: from what one reconcile observed, the
//! objects to apply, the call to make at the replica, the status to write, the Events
//! to publish and when to look again. No I/O, so every branch is tested by a table.

use super::FORCE_REMOVE;
use crate::builders::{self, Image};
use crate::context::Announcement;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use multisite_core::api::conditions::{self, Verdict};
use multisite_core::api::{
    MasteredCounts, PacketVersionStatus, Replica, ReplicaFamily, ReplicaPhase, ReplicaStatus, Site,
};
use multisite_replica::api::{BootstrapRequest, BootstrapSource, BootstrapState, StatusReport};
use std::sync::Arc;
use std::time::Duration;

/// What the replica's server said when asked for its status.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Not asked: no pod serves an address, or nothing needed its answer.
    NotAsked,
    Report(Box<StatusReport>),
    /// The pod serves no replica yet and waits for its bootstrap.
    AwaitingBootstrap(Box<BootstrapState>),
    /// It did not answer, or answered with an error: why.
    Unreachable(String),
}

/// What one reconcile of a Replica sees: the object, what it refers to, its workload as
/// the caches hold it, and its server's answer.
pub struct Observed<'a> {
    pub replica: &'a Replica,
    pub family: Option<&'a ReplicaFamily>,
    pub site: Option<&'a Site>,
    /// The family's Replicas, oldest first.
    pub members: &'a [Arc<Replica>],
    pub statefulset: Option<&'a StatefulSet>,
    pub service: Option<&'a Service>,
    /// Its pod, unless it is gone or going.
    pub pod: Option<&'a Pod>,
    pub answer: Answer,
    pub image: &'a Image,
    pub now: Time,
}

impl Observed<'_> {
    /// Where the pod serves the replica API, once it has an address.
    pub fn endpoint(&self) -> Option<String> {
        self.pod.and_then(endpoint)
    }
}

/// A bootstrap to ask of the pod at `url`, announced once the pod has taken it.
#[derive(Clone, Debug, PartialEq)]
pub struct Bootstrap {
    pub url: String,
    pub request: BootstrapRequest,
    pub announce: Announcement,
}

/// What to do for a Replica that is not being deleted.
#[derive(Debug)]
pub struct Placement {
    /// The family's Secret must exist first (the pod mounts it).
    pub family_secret: bool,
    /// Objects to apply: only those the caches do not already hold as built.
    pub statefulset: Option<StatefulSet>,
    pub service: Option<Service>,
    pub bootstrap: Option<Bootstrap>,
    pub status: ReplicaStatus,
    /// Published after the status is written.
    pub events: Vec<Announcement>,
    pub requeue: Duration,
}

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

pub(super) fn active_endpoint(r: &Replica) -> Option<String> {
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

/// Sets the three standard conditions at once.
fn conditions(
    status: &mut ReplicaStatus,
    generation: Option<i64>,
    now: &Time,
    ready: Verdict,
    progressing: Verdict,
    degraded: Verdict,
) {
    conditions::set_standard(
        &mut status.conditions,
        [ready, progressing, degraded],
        generation,
        now.clone(),
    );
}

/// The three conditions of a replica that cannot serve for `reason`: not ready, not on
/// its way, degraded.
fn failing(
    status: &mut ReplicaStatus,
    generation: Option<i64>,
    now: &Time,
    reason: &str,
    message: &str,
) {
    let verdict = (false, reason, message);
    conditions(
        status,
        generation,
        now,
        verdict,
        verdict,
        (true, reason, message),
    );
}

pub(super) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's API address, once it has an IP.
pub(super) fn endpoint(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    Some(format!("http://{ip}:{}", builders::API_PORT))
}

/// Why a replica's pod does not serve yet, as its status tells: (whether it needs a
/// person: the condition Degraded, reason, message). A pod the scheduler cannot place
/// (a Site's zone that no node has, no room) or whose container cannot start will not
/// come up by waiting.
pub(super) fn pod_not_serving(
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

/// Whether the reconcile must ask the replica's server before deciding: a placed
/// replica whose pod has an address, or a leaving one whose mastership may still have
/// to move.
pub fn needs_answer(replica: &Replica, placed: bool, pod: Option<&Pod>) -> bool {
    let has_address = pod.and_then(endpoint).is_some();
    if replica.metadata.deletion_timestamp.is_some() {
        has_address && !forced(replica) && served(replica)
    } else {
        has_address && placed
    }
}

fn forced(replica: &Replica) -> bool {
    replica
        .annotations()
        .get(FORCE_REMOVE)
        .is_some_and(|v| v == "true")
}

fn served(replica: &Replica) -> bool {
    replica
        .status
        .as_ref()
        .is_some_and(|s| s.incarnation.is_some())
}

/// What to do for a Replica that stays: its workload, its bootstrap, its status.
pub fn placement(o: &Observed) -> Placement {
    let replica = o.replica;
    let name = replica.name_any();
    let namespace = replica.namespace().unwrap_or_default();
    let generation = replica.metadata.generation;
    let mut status = replica.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let previous_phase = status.phase;
    let mut decision = Placement {
        family_secret: false,
        statefulset: None,
        service: None,
        bootstrap: None,
        status: ReplicaStatus::default(),
        events: Vec::new(),
        requeue: Duration::from_secs(5),
    };
    let (Some(family), Some(site)) = (o.family, o.site) else {
        let (reason, message) = if o.family.is_none() {
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
        failing(&mut status, generation, &o.now, reason, &message);
        decision.status = status;
        decision.requeue = Duration::from_secs(15);
        return decision;
    };

    decision.family_secret = true;
    let statefulset = builders::stamped(builders::statefulset(replica, site, o.image));
    if !builders::unchanged(&statefulset, o.statefulset) {
        decision.statefulset = Some(statefulset);
    }
    let service = builders::stamped(builders::service(replica));
    if !builders::unchanged(&service, o.service) {
        decision.service = Some(service);
    }

    let pod_name = builders::pod_name(&name);
    let (Some(url), Some(pod)) = (o.endpoint(), o.pod) else {
        status.phase = Some(status.phase.unwrap_or(ReplicaPhase::Pending));
        status.reachable = Some(false);
        let zone = site.spec.zone.as_deref();
        let (stuck, reason, message) = pod_not_serving(&pod_name, o.pod, zone);
        conditions(
            &mut status,
            generation,
            &o.now,
            (false, reason, &message),
            (!stuck, reason, &message),
            (stuck, reason, &message),
        );
        decision.status = status;
        decision.requeue = Duration::from_secs(2);
        return decision;
    };
    status.endpoint = Some(url.clone());
    match &o.answer {
        Answer::Report(report)
            if report.family != replica.spec.family || report.replica != name =>
        {
            let message = format!(
                "pod {pod_name} serves replica {} of family {}, not {name} of {}",
                report.replica, report.family, replica.spec.family
            );
            status.reachable = Some(true);
            failing(&mut status, generation, &o.now, "WrongReplica", &message);
            decision.requeue = Duration::from_secs(30);
        }
        Answer::Report(report) => {
            fill_status(&mut status, report);
            status.reachable = Some(true);
            status.phase = Some(ReplicaPhase::Active);
            let ready = pod_ready(pod);
            let levels = format!(
                "serving at feature levels ({}, {})",
                report.schema_repository_feature_level, report.user_database_feature_level
            );
            let restoring = format!(
                "waiting for {} to re-send what the backup lacks",
                report.restoring.join(", ")
            );
            let progressing = if report.restoring.is_empty() {
                (false, "Serving", levels.as_str())
            } else {
                (true, "Restoring", restoring.as_str())
            };
            conditions(
                &mut status,
                generation,
                &o.now,
                (
                    ready,
                    if ready { "Serving" } else { "PodNotReady" },
                    &levels,
                ),
                progressing,
                (false, "Serving", &levels),
            );
            if previous_phase != Some(ReplicaPhase::Active) {
                decision.events.push(Announcement::normal(
                    "Active",
                    "Serve",
                    format!("replica {name} is {levels}"),
                ));
            }
            decision.requeue = Duration::from_secs(5);
        }
        Answer::AwaitingBootstrap(waiting) => {
            status.reachable = Some(true);
            let request = |source| BootstrapRequest {
                family: replica.spec.family.clone(),
                replica: name.clone(),
                source,
            };
            let (request, message) = match bootstrap_plan(replica, family, o.members) {
                BootstrapPlan::Init {
                    id_prefix,
                    feature_level,
                } => (
                    Some(request(BootstrapSource::Init {
                        id_prefix,
                        feature_level,
                    })),
                    format!("creating the family's first replica at feature level {feature_level}"),
                ),
                BootstrapPlan::CloneFrom { source, endpoint } => (
                    Some(request(BootstrapSource::CloneFrom(endpoint))),
                    format!("cloning from {source}"),
                ),
                BootstrapPlan::Wait(why) => (None, why),
                BootstrapPlan::Refuse(why) => {
                    status.phase = Some(ReplicaPhase::Pending);
                    failing(&mut status, generation, &o.now, "DataLost", &why);
                    if previous_phase == Some(ReplicaPhase::Active) {
                        decision
                            .events
                            .push(Announcement::warning("DataLost", "Bootstrap", why));
                    }
                    decision.status = status;
                    decision.requeue = Duration::from_secs(30);
                    return decision;
                }
            };
            let running = waiting.running.is_some();
            decision.bootstrap = request.filter(|_| !running).map(|request| Bootstrap {
                url: url.clone(),
                request,
                announce: Announcement::normal("Bootstrapping", "Bootstrap", message.clone()),
            });
            status.phase = Some(ReplicaPhase::Bootstrapping);
            let degraded = !running && waiting.last_error.is_some();
            conditions(
                &mut status,
                generation,
                &o.now,
                (false, "Bootstrapping", &message),
                (true, "Bootstrapping", &message),
                if degraded {
                    (true, "BootstrapFailed", &waiting.error)
                } else {
                    (false, "Bootstrapping", &message)
                },
            );
            decision.requeue = Duration::from_secs(2);
        }
        Answer::Unreachable(error) => {
            status.reachable = Some(false);
            let message = format!("replica API at {url}: {error}");
            failing(&mut status, generation, &o.now, "Unreachable", &message);
            decision.requeue = Duration::from_secs(5);
        }
        // Only when observe and decide disagree on whether to ask: look again soon.
        Answer::NotAsked => {
            let message = format!("waiting for the report of the replica at {url}");
            conditions(
                &mut status,
                generation,
                &o.now,
                (false, "PodStarting", &message),
                (true, "PodStarting", &message),
                (false, "PodStarting", &message),
            );
            decision.requeue = Duration::from_secs(2);
        }
    }
    decision.status = status;
    decision
}

/// The replica that takes over what a leaving one masters: the gateway's replica if it
/// stays, else the oldest other active one.
pub fn heir(
    leaving: &str,
    family: Option<&ReplicaFamily>,
    members: &[Arc<Replica>],
) -> Option<String> {
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

/// The next step of a leaving replica's removal workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemovalStep {
    /// Delete its workload and data, announce why, then drop the finalizer.
    Finish(String),
    /// Move everything it masters to `heir` (announced once moved), then wait.
    Retire { url: String, heir: String },
    /// Only wait (the status says for what).
    Wait,
}

/// What to do for a Replica that is being deleted.
#[derive(Debug)]
pub struct Removal {
    /// Published first: the workflow starts.
    pub starting: Option<Announcement>,
    pub step: RemovalStep,
    /// Written unless the step finishes the removal.
    pub status: ReplicaStatus,
    pub requeue: Duration,
}

/// The removal workflow: mastership moved away, that change delivered to every peer,
/// then the workload and data go.
pub fn removal(o: &Observed) -> Removal {
    let replica = o.replica;
    let name = replica.name_any();
    let generation = replica.metadata.generation;
    let mut status = replica.status.clone().unwrap_or_default();
    let starting = (status.phase != Some(ReplicaPhase::Removing)).then(|| {
        Announcement::normal(
            "Removing",
            "Remove",
            format!("removing replica {name}: its mastership moves first"),
        )
    });
    status.phase = Some(ReplicaPhase::Removing);
    let mut decision = Removal {
        starting,
        step: RemovalStep::Wait,
        status: ReplicaStatus::default(),
        requeue: Duration::from_secs(2),
    };
    let waiting = |status: &mut ReplicaStatus, message: &str| {
        conditions(
            status,
            generation,
            &o.now,
            (false, "Removing", message),
            (true, "Removing", message),
            (false, "Removing", message),
        );
    };
    let finish = |decision: Removal, why: String| Removal {
        step: RemovalStep::Finish(why),
        ..decision
    };
    if forced(replica) {
        return finish(
            decision,
            format!(
                "{FORCE_REMOVE} set: workload and data of {name} deleted without moving its mastership"
            ),
        );
    }
    if !served(replica) {
        return finish(
            decision,
            "the replica never served; its workload is deleted".into(),
        );
    }
    let Some(url) = o.endpoint() else {
        let message = format!(
            "waiting for pod {} to serve, to move its mastership away (annotate {FORCE_REMOVE}=true to skip)",
            builders::pod_name(&name)
        );
        waiting(&mut status, &message);
        decision.status = status;
        decision.requeue = Duration::from_secs(5);
        return decision;
    };
    let report = match &o.answer {
        Answer::Report(report) => report,
        Answer::AwaitingBootstrap(_) => {
            return finish(
                decision,
                "the replica holds no data; its workload is deleted".into(),
            );
        }
        Answer::Unreachable(error) => {
            let message = format!(
                "cannot reach the replica to move its mastership ({error}); annotate {FORCE_REMOVE}=true to skip"
            );
            waiting(&mut status, &message);
            decision.status = status;
            decision.requeue = Duration::from_secs(5);
            return decision;
        }
        Answer::NotAsked => {
            waiting(&mut status, "waiting for the replica's own report");
            decision.status = status;
            return decision;
        }
    };
    fill_status(&mut status, report);
    match &report.removal_pending {
        None => match heir(&name, o.family, o.members) {
            Some(heir) => {
                waiting(
                    &mut status,
                    &format!(
                        "mastership moved to {heir}; waiting for every peer to receive that change"
                    ),
                );
                decision.step = RemovalStep::Retire { url, heir };
            }
            None if !o.members.iter().any(|r| r.name_any() != name) => {
                return finish(
                    decision,
                    "the family's last replica; its workload is deleted".into(),
                );
            }
            None => waiting(
                &mut status,
                "waiting for another replica to be Active, to hand this one's mastership to",
            ),
        },
        Some(pending) if !pending.is_empty() => waiting(
            &mut status,
            &format!(
                "waiting for {} to receive this replica's last changes",
                pending.join(", ")
            ),
        ),
        Some(_) => {
            return finish(
                decision,
                format!("every peer holds {name}'s changes; its workload and data are deleted"),
            );
        }
    }
    decision.status = status;
    decision
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
