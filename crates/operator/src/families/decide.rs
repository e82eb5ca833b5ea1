//! The ReplicaFamily controller's decisions, pure: the family's status (feature level
//! reached, links, conditions, client tiers, plan, gateway) from what one reconcile
//! observed and what the upgrade driver did, the transitions to announce as Events, and
//! when to look again. No I/O, so each rule is tested by a table.

use crate::context::Announcement;
use crate::gateway::GatewayOutcome;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use multisite_core::api::conditions::{self, DEGRADED, PROGRESSING, READY, SYNCHRONIZED};
use multisite_core::api::{
    ClientTierStatus, LinkStatus, PlanStatus, Replica, ReplicaFamily, ReplicaFamilyStatus,
    ReplicaPhase,
};
use multisite_core::domain::scheduler::TaskKind;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Asks for a sync task now: `incremental` or `full`, for every link, or
/// `full:FROM->TO` for one. The operator removes the annotation once it has queued it.
pub const SYNC_NOW: &str = "multisite.dev/sync-now";

/// Parses the value of [`SYNC_NOW`].
pub fn parse_sync_now(value: &str) -> Result<(TaskKind, Option<(String, String)>), String> {
    let (kind, link) = match value.split_once(':') {
        Some((kind, link)) => (kind.trim(), Some(link.trim())),
        None => (value.trim(), None),
    };
    let kind = match kind {
        "incremental" => TaskKind::Incremental,
        "full" => TaskKind::Full,
        other => {
            return Err(format!(
                "{SYNC_NOW}: {other:?} is not a task kind; use incremental or full, optionally followed by :FROM->TO"
            ));
        }
    };
    let link = match link {
        None => None,
        Some(link) => match link.split_once("->") {
            Some((from, to)) if !from.trim().is_empty() && !to.trim().is_empty() => {
                Some((from.trim().to_string(), to.trim().to_string()))
            }
            _ => {
                return Err(format!(
                    "{SYNC_NOW}: {link:?} is not a link; write FROM->TO"
                ));
            }
        },
    };
    Ok((kind, link))
}

/// The conditions of a family from its replicas and links (pure).
pub struct Verdicts {
    pub ready: Verdict,
    pub progressing: Verdict,
    pub degraded: Verdict,
    pub synchronized: Verdict,
}

/// A condition's value, reason and message.
pub type Verdict = (bool, &'static str, String);

pub fn verdicts(
    replicas: &[Arc<Replica>],
    links: &[LinkStatus],
    topology_error: Option<&str>,
    gateway_problem: Option<&str>,
) -> Verdicts {
    let v = |b: bool, r: &'static str, m: String| (b, r, m);
    let phase = |r: &Replica| r.status.as_ref().and_then(|s| s.phase);
    let not_ready: Vec<String> = replicas
        .iter()
        .filter(|r| {
            !r.status
                .as_ref()
                .is_some_and(|s| conditions::is_true(&s.conditions, READY))
        })
        .map(|r| r.name_any())
        .collect();
    let moving: Vec<String> = replicas
        .iter()
        .filter(|r| {
            matches!(
                phase(r),
                None | Some(
                    ReplicaPhase::Pending | ReplicaPhase::Bootstrapping | ReplicaPhase::Removing
                )
            )
        })
        .map(|r| r.name_any())
        .collect();
    let troubled: Vec<String> = replicas
        .iter()
        .filter(|r| {
            r.status
                .as_ref()
                .is_some_and(|s| conditions::is_true(&s.conditions, DEGRADED))
        })
        .map(|r| r.name_any())
        .collect();
    let failing: Vec<String> = links
        .iter()
        .filter(|l| l.error.is_some())
        .map(|l| {
            format!(
                "{}->{}: {}",
                l.from,
                l.to,
                l.error.clone().unwrap_or_default()
            )
        })
        .collect();
    let ready = if replicas.is_empty() {
        v(false, "NoReplicas", "the family has no Replica yet".into())
    } else if not_ready.is_empty() {
        v(
            true,
            "AllReplicasReady",
            format!("{} replica(s) ready", replicas.len()),
        )
    } else {
        v(
            false,
            "ReplicasNotReady",
            format!("not ready: {}", not_ready.join(", ")),
        )
    };
    let progressing = if moving.is_empty() {
        v(false, "Stable", "no replica is starting or leaving".into())
    } else {
        v(
            true,
            "ReplicasChanging",
            format!("starting or leaving: {}", moving.join(", ")),
        )
    };
    let degraded = if let Some(e) = topology_error {
        v(true, "TopologyInvalid", e.to_string())
    } else if !troubled.is_empty() {
        v(
            true,
            "ReplicasDegraded",
            format!("degraded: {}", troubled.join(", ")),
        )
    } else if !failing.is_empty() {
        v(true, "LinksFailing", failing.join("; "))
    } else if let Some(problem) = gateway_problem {
        v(true, "Gateway", problem.to_string())
    } else {
        v(false, "Healthy", "replicas and links are healthy".into())
    };
    let lagging: Vec<String> = links
        .iter()
        .filter(|l| {
            l.lag_changes > 0 || l.held_packets > 0 || l.last_task.is_none() || l.error.is_some()
        })
        .map(|l| format!("{}->{}", l.from, l.to))
        .collect();
    let active = replicas
        .iter()
        .filter(|r| phase(r) == Some(ReplicaPhase::Active))
        .count();
    let synchronized = if replicas.is_empty() {
        v(false, "NoReplicas", "the family has no Replica yet".into())
    } else if active == replicas.len() && replicas.len() == 1 {
        v(
            true,
            "SingleReplica",
            "one replica: nothing to exchange".into(),
        )
    } else if links.is_empty() {
        v(false, "NoLinks", "no link can run yet".into())
    } else if lagging.is_empty() {
        v(
            true,
            "InSync",
            format!("{} link(s) with nothing left to send", links.len()),
        )
    } else {
        v(
            false,
            "Lagging",
            format!(
                "links with changes to send, held packets or no task yet: {}",
                lagging.join(", ")
            ),
        )
    };
    Verdicts {
        ready,
        progressing,
        degraded,
        synchronized,
    }
}

/// The announcement key of a refused plan, beside the conditions'.
const UPGRADE_REFUSED: &str = "UpgradeRefused";

/// What one family reconcile observed, for the status.
pub struct Observed<'a> {
    pub family: &'a ReplicaFamily,
    /// The family's Replicas, oldest first.
    pub members: &'a [Arc<Replica>],
    /// The sync runner's link states and topology error.
    pub links: Vec<LinkStatus>,
    pub topology_error: Option<String>,
    pub clients: Vec<ClientTierStatus>,
    pub gateway: GatewayOutcome,
    /// What this process last announced of each condition (empty after a start).
    pub announced: BTreeMap<String, bool>,
    pub now: Time,
}

/// Where the upgrade driver stands after this reconcile.
pub struct Upgrade {
    pub plan: PlanStatus,
    /// Why it waits, if it does.
    pub waiting: Option<String>,
    /// A step is being carried out.
    pub progressing: bool,
}

/// What the family's status becomes, and what to say about it.
#[derive(Debug)]
pub struct Decision {
    pub status: ReplicaFamilyStatus,
    /// Transitions to publish as Events, after the status is written.
    pub events: Vec<Announcement>,
    /// The states now announced, for the next reconcile to compare with.
    pub announced: BTreeMap<String, bool>,
    pub requeue: Duration,
}

/// The feature level every replica has reached: the lowest of their two levels, once
/// every replica reports its user database's.
pub fn feature_level(members: &[Arc<Replica>]) -> Option<i32> {
    let all_known = members.iter().all(|r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.user_database_feature_level.is_some())
    });
    members
        .iter()
        .filter_map(|r| {
            let s = r.status.as_ref()?;
            Some(
                s.schema_repository_feature_level?
                    .min(s.user_database_feature_level?),
            )
        })
        .min()
        .filter(|_| all_known)
}

/// The status fields that come straight from what was observed: generation, feature
/// level, links and their largest lag, client tiers. Conditions, plan and gateway stay
/// as they were.
pub fn observed_status(o: &Observed) -> ReplicaFamilyStatus {
    let mut status = o.family.status.clone().unwrap_or_default();
    status.observed_generation = o.family.metadata.generation;
    status.feature_level = feature_level(o.members);
    status.max_lag_changes = o.links.iter().map(|l| l.lag_changes).max();
    status.links = o.links.clone();
    status.clients = o.clients.clone();
    status
}

/// The family's status and the Events that announce its transitions. A condition is
/// announced when it changed against what this process last announced or, after a
/// restart, against the stored status; Progressing is never announced, Degraded
/// becoming true and anything else becoming false are warnings. A refused plan is
/// announced once until it is no longer refused.
pub fn status(o: &Observed, upgrade: Upgrade) -> Decision {
    let family = o.family;
    let generation = family.metadata.generation;
    let old = family.status.clone().unwrap_or_default();
    let mut status = observed_status(o);
    let verdicts = verdicts(
        o.members,
        &status.links,
        o.topology_error.as_deref(),
        o.gateway.problem.as_deref(),
    );
    let progressing: Verdict = match (&upgrade.plan.blocked, &upgrade.waiting) {
        (Some(blocked), _) => (false, "UpgradeRefused", blocked.reason.clone()),
        (None, Some(waiting)) if family.spec.paused => (true, "Paused", waiting.clone()),
        (None, Some(waiting)) => (true, "Upgrading", waiting.clone()),
        (None, None) if upgrade.progressing => (
            true,
            "Upgrading",
            format!(
                "carrying out step {} of {}",
                upgrade.plan.current + 1,
                upgrade.plan.steps.len()
            ),
        ),
        (None, None) => verdicts.progressing.clone(),
    };
    let mut events = Vec::new();
    let mut announced = BTreeMap::new();
    for (type_, (value, reason, message)) in [
        (READY, &verdicts.ready),
        (PROGRESSING, &progressing),
        (DEGRADED, &verdicts.degraded),
        (SYNCHRONIZED, &verdicts.synchronized),
    ] {
        let in_status = old
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status == "True");
        let before = o.announced.get(type_).copied().or(in_status);
        conditions::set_condition(
            &mut status.conditions,
            type_,
            *value,
            reason,
            message,
            generation,
            o.now.clone(),
        );
        announced.insert(type_.to_string(), *value);
        if before.is_some_and(|b| b != *value) && type_ != PROGRESSING {
            let note = format!("{type_} is now {value}: {message}");
            events.push(if (type_ == DEGRADED) == *value {
                Announcement::warning(reason, "Observe", note)
            } else {
                Announcement::normal(reason, "Observe", note)
            });
        }
    }
    let refused = upgrade.plan.blocked.as_ref().map(|b| b.reason.clone());
    if let Some(reason) = &refused
        && o.announced.get(UPGRADE_REFUSED) != Some(&true)
    {
        events.push(Announcement::warning(
            "UpgradeRefused",
            "Plan",
            reason.clone(),
        ));
    }
    announced.insert(UPGRADE_REFUSED.to_string(), refused.is_some());
    status.gateway = o.gateway.status.clone();
    status.plan = Some(upgrade.plan);
    let requeue = next_look(&status.conditions, family.spec.gateway.is_some());
    Decision {
        status,
        events,
        announced,
        requeue,
    }
}

/// When to look at a family again without a change to trigger it. Changes of the family,
/// its Replicas, its Deployments and its links trigger a reconcile at once; what no
/// watch reports (a replica's answers, the gateway's own report) is polled: often while
/// the family is on its way somewhere, seldom once it is settled.
pub fn next_look(conditions: &[Condition], gateway: bool) -> Duration {
    let settled =
        conditions::is_true(conditions, READY) && !conditions::is_true(conditions, PROGRESSING);
    match (settled, gateway) {
        (false, _) => Duration::from_secs(2),
        // The gateway's delivery counts come from its pod, not from a watch.
        (true, true) => Duration::from_secs(10),
        (true, false) => Duration::from_secs(30),
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
