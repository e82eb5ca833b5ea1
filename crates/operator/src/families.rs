//! The ReplicaFamily controller: the family's shared Secret, its status (feature level
//! reached by every replica, the links' sync state from the sync runner, the standard
//! conditions and `Synchronized`), and the annotation that asks for a sync task now.

use super::OperatorError;
use super::context::{Ctx, ManualRequest, apply_status};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use multisite_core::api::conditions::{self, DEGRADED, PROGRESSING, READY, SYNCHRONIZED};
use multisite_core::api::{LinkStatus, ReplicaFamily, ReplicaFamilyStatus};
use multisite_core::api::{Replica, ReplicaPhase};
use multisite_core::domain::scheduler::TaskKind;
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
    pub ready: (bool, String, String),
    pub progressing: (bool, String, String),
    pub degraded: (bool, String, String),
    pub synchronized: (bool, String, String),
}

pub fn verdicts(
    replicas: &[Arc<Replica>],
    links: &[LinkStatus],
    topology_error: Option<&str>,
    gateway_problem: Option<&str>,
) -> Verdicts {
    let v = |b: bool, r: &str, m: String| (b, r.to_string(), m);
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

pub async fn reconcile(family: Arc<ReplicaFamily>, ctx: Arc<Ctx>) -> Result<Action, OperatorError> {
    super::reconcile::instrumented(family.as_ref(), &ctx, apply(&family, &ctx)).await
}

async fn apply(family: &ReplicaFamily, ctx: &Ctx) -> Result<Action, OperatorError> {
    if family.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = family.namespace().unwrap_or_default();
    let name = family.name_any();
    let api: Api<ReplicaFamily> = Api::namespaced(ctx.client.clone(), &namespace);
    ctx.ensure_secret(family).await?;

    if let Some(value) = family.annotations().get(SYNC_NOW) {
        match parse_sync_now(value) {
            Ok((kind, link)) => {
                ctx.ask(ManualRequest {
                    family: (namespace.clone(), name.clone()),
                    kind,
                    link: link.clone(),
                });
                let what = match &link {
                    Some((f, t)) => format!("{f}->{t}"),
                    None => "every link".into(),
                };
                ctx.event(
                    family,
                    false,
                    "SyncRequested",
                    "Sync",
                    format!(
                        "{} task asked for on {what}",
                        if kind == TaskKind::Full {
                            "full"
                        } else {
                            "incremental"
                        }
                    ),
                )
                .await;
            }
            Err(e) => {
                ctx.event(family, true, "InvalidAnnotation", "Sync", e)
                    .await
            }
        }
        let patch = serde_json::json!({"metadata": {"annotations": {SYNC_NOW: null}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }

    let members: Vec<Arc<Replica>> = ctx.members(&namespace, &name);
    let links = ctx.links_of(&(namespace.clone(), name.clone()));
    let topology_error = ctx.topology_error(&(namespace.clone(), name.clone()));
    let old = family.status.clone().unwrap_or_default();
    let mut status = ReplicaFamilyStatus {
        observed_generation: family.metadata.generation,
        conditions: old.conditions.clone(),
        ..Default::default()
    };
    status.feature_level = members
        .iter()
        .filter_map(|r| {
            let s = r.status.as_ref()?;
            Some(
                s.schema_repository_feature_level?
                    .min(s.user_database_feature_level?),
            )
        })
        .min()
        .filter(|_| {
            members.iter().all(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.user_database_feature_level.is_some())
            })
        });
    status.max_lag_changes = links.iter().map(|l| l.lag_changes).max();
    status.links = links;
    let gateway = super::gateway::reconcile(ctx, family).await?;
    let verdicts = verdicts(
        &members,
        &status.links,
        topology_error.as_deref(),
        gateway.problem.as_deref(),
    );
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    for (type_, (value, reason, message)) in [
        (READY, &verdicts.ready),
        (PROGRESSING, &verdicts.progressing),
        (DEGRADED, &verdicts.degraded),
        (SYNCHRONIZED, &verdicts.synchronized),
    ] {
        let in_status = old
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status == "True");
        let announced = ctx.announce(&(namespace.clone(), name.clone()), type_, *value);
        // A change against what this process last announced, or (after a restart)
        // against the stored status.
        let before = announced.or(in_status);
        conditions::set_condition(
            &mut status.conditions,
            type_,
            *value,
            reason,
            message,
            family.metadata.generation,
            now.clone(),
        );
        if before.is_some_and(|b| b != *value) && type_ != PROGRESSING {
            let warning = (type_ == DEGRADED) == *value;
            ctx.event(
                family,
                warning,
                reason,
                "Observe",
                format!("{type_} is now {value}: {message}"),
            )
            .await;
        }
    }
    // Client tiers as deployed, then the upgrade plan (which reads them).
    super::clients::prune(ctx, family).await?;
    let clients = super::clients::observe(ctx, family);
    let mut observed_family = family.clone();
    let observed_status = observed_family.status.get_or_insert_with(Default::default);
    observed_status.clients = clients.clone();
    // The plan this process wrote last: the cache may not have caught up with it, and a
    // step missing from the history would be lost from status.
    let plan_key = (namespace.clone(), name.clone());
    if let Some(plan) = ctx.last_plan(&plan_key) {
        observed_status.plan = Some(plan);
    }
    let drive = super::upgrade::drive(ctx, &ctx.compat, &observed_family, &members).await?;
    let mut plan = drive.status;
    let mut waiting = drive.waiting;
    if let Some(step) = &drive.next {
        // Published before it is carried out, so that a restart knows it ran.
        if old.plan.as_ref() != Some(&plan) {
            let mut published = old.clone();
            published.observed_generation = status.observed_generation;
            published.feature_level = status.feature_level;
            published.max_lag_changes = status.max_lag_changes;
            published.links = status.links.clone();
            published.clients = clients.clone();
            published.plan = Some(plan.clone());
            apply_status(&api, &name, &owned_status(&published)).await?;
        }
        ctx.remember_plan(plan_key.clone(), plan.clone());
        waiting = super::upgrade::execute(ctx, &observed_family, &members, step, &mut plan).await?;
    }
    let key = (namespace.clone(), name.clone());
    let (progressing, reason, message) = match (&plan.blocked, &waiting) {
        (Some(blocked), _) => (false, "UpgradeRefused".to_string(), blocked.reason.clone()),
        (None, Some(waiting)) if family.spec.paused => {
            (true, "Paused".to_string(), waiting.clone())
        }
        (None, Some(waiting)) => (true, "Upgrading".to_string(), waiting.clone()),
        (None, None) if drive.progressing => (
            true,
            "Upgrading".to_string(),
            format!(
                "carrying out step {} of {}",
                plan.current + 1,
                plan.steps.len()
            ),
        ),
        (None, None) => verdicts.progressing.clone(),
    };
    conditions::set_condition(
        &mut status.conditions,
        PROGRESSING,
        progressing,
        &reason,
        &message,
        family.metadata.generation,
        now.clone(),
    );
    let refused = plan.blocked.is_some();
    if refused && ctx.announce(&key, "UpgradeRefused", true) != Some(true) {
        ctx.event(family, true, "UpgradeRefused", "Plan", message.clone())
            .await;
    } else if !refused {
        ctx.announce(&key, "UpgradeRefused", false);
    }
    let mut ours = old.clone();
    ours.gateway = gateway.status;
    ours.observed_generation = status.observed_generation;
    ours.conditions = status.conditions;
    ours.feature_level = status.feature_level;
    ours.max_lag_changes = status.max_lag_changes;
    ours.links = status.links;
    ours.clients = clients;
    ours.plan = Some(plan);
    if ours != old {
        apply_status(&api, &name, &owned_status(&ours)).await?;
    }
    if let Some(plan) = &ours.plan {
        ctx.remember_plan(plan_key, plan.clone());
    }
    Ok(Action::requeue(next_look(
        &ours.conditions,
        family.spec.gateway.is_some(),
    )))
}

/// When to look at a family again without a change to trigger it. Changes of the family,
/// its Replicas, its Deployments and its links trigger a reconcile at once; what no
/// watch reports (a replica's answers, the gateway's own report) is polled: often while
/// the family is on its way somewhere, seldom once it is settled.
fn next_look(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    gateway: bool,
) -> Duration {
    let settled =
        conditions::is_true(conditions, READY) && !conditions::is_true(conditions, PROGRESSING);
    match (settled, gateway) {
        (false, _) => Duration::from_secs(2),
        // The gateway's delivery counts come from its pod, not from a watch.
        (true, true) => Duration::from_secs(10),
        (true, false) => Duration::from_secs(30),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_now_values() {
        assert_eq!(parse_sync_now("full"), Ok((TaskKind::Full, None)));
        assert_eq!(
            parse_sync_now(" incremental "),
            Ok((TaskKind::Incremental, None))
        );
        assert_eq!(
            parse_sync_now("full:a->b"),
            Ok((TaskKind::Full, Some(("a".into(), "b".into()))))
        );
        assert!(
            parse_sync_now("now")
                .unwrap_err()
                .contains("not a task kind")
        );
        assert!(parse_sync_now("full:a-b").unwrap_err().contains("FROM->TO"));
        assert!(parse_sync_now("full:->b").is_err());
    }

    fn link(lag: i64, held: i64, ran: bool, error: Option<&str>) -> LinkStatus {
        LinkStatus {
            from: "a".into(),
            to: "b".into(),
            last_task: ran.then(|| "Incremental".to_string()),
            lag_changes: lag,
            held_packets: held,
            error: error.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn synchronized_needs_every_link_run_empty_and_healthy() {
        let replica = |name: &str| {
            let mut r = Replica::new(
                name,
                multisite_core::api::ReplicaSpec {
                    family: "f".into(),
                    site: "s".into(),
                    storage: "1Gi".into(),
                    bootstrap_from: None,
                    resources: None,
                },
            );
            r.status = Some(multisite_core::api::ReplicaStatus {
                phase: Some(ReplicaPhase::Active),
                ..Default::default()
            });
            Arc::new(r)
        };
        let two = vec![replica("a"), replica("b")];
        let cases = [
            (vec![link(0, 0, true, None)], true),
            (vec![link(3, 0, true, None)], false),
            (vec![link(0, 1, true, None)], false),
            (vec![link(0, 0, false, None)], false),
            (vec![link(0, 0, true, Some("down"))], false),
            (vec![], false),
        ];
        for (links, expected) in cases {
            assert_eq!(
                verdicts(&two, &links, None, None).synchronized.0,
                expected,
                "{links:?}"
            );
        }
        assert!(verdicts(&[replica("a")], &[], None, None).synchronized.0);
        assert!(!verdicts(&[], &[], None, None).ready.0);
        let failing = verdicts(&two, &[link(0, 0, true, Some("down"))], None, None);
        assert!(failing.degraded.0 && failing.degraded.2.contains("down"));
        assert_eq!(
            verdicts(&two, &[], Some("bad hub"), None).degraded.1,
            "TopologyInvalid"
        );
        let gateway = verdicts(&two, &[link(0, 0, true, None)], None, Some("gateway down"));
        assert_eq!(
            (gateway.degraded.0, gateway.degraded.1.as_str()),
            (true, "Gateway")
        );
    }
}
