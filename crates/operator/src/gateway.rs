//! The family's gateway: a one-pod Deployment pinned to `spec.gateway.replica`, the
//! token Secret for the outside system, the family setting that makes change events
//! mastered at the pinned replica, and the gateway's state in the family's status.
//!
//! Moving the pin drains first: the old gateway stops, the change events it would have
//! delivered are handed to the new replica, and only then does the new gateway start.

use super::OperatorError;
use super::builders;
use super::context::Ctx;
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::Api;
use multisite_core::api::{GatewayStatus, ReplicaFamily, ReplicaPhase};
use multisite_core::packet::change::{CHANGE_EVENT_TYPE, GATEWAY_REPLICA, ItemKind};
use multisite_replica::api::{GatewayReport, ItemQuery, MoveMastership, ReplicaClient, Setting};
use multisite_replica::http::HttpClient;

/// `"true"` on a family asks for the one-directional records' mastership to move to the
/// gateway's replica; the operator removes it once done (`multisite gateway remaster`).
pub const REMASTER: &str = "multisite.dev/remaster";

/// Moves the mastership of `ids` to `to`, each at its current master. Returns how many
/// moved and how many are left (their master unreachable, not holding the item yet, or
/// the item already moving), for a later request.
async fn remaster(
    ctx: &Ctx,
    family: &ReplicaFamily,
    to: &str,
    ids: &[String],
) -> Result<Moved, OperatorError> {
    let namespace = family.namespace().unwrap_or_default();
    let members = ctx.members(&namespace, &family.name_any());
    let endpoint = |n: &str| Ctx::endpoint_of(&members, n);
    let mut result = Moved::default();
    let Some(to_url) = endpoint(to) else {
        result.left = ids.len();
        return Ok(result);
    };
    let client = ctx
        .replica_client(&namespace, &family.name_any())
        .await?
        .with_release(Some(ctx.compat.newest_release_version()));
    for id in ids {
        let item = client.get_item(&to_url, ItemKind::Record, id).await?;
        if item.master == to {
            continue;
        }
        let Some(master_url) = endpoint(&item.master) else {
            result.left += 1;
            continue;
        };
        // Its master may not hold it yet, or it may be moving already: the next
        // request takes it.
        match client
            .move_mastership(&master_url, ItemKind::Record, id, &move_to(to))
            .await
        {
            Ok(_) => result.moved += 1,
            Err(error) => {
                result.left += 1;
                tracing::debug!(item = %id, master = %item.master, %error, "mastership not moved yet")
            }
        }
    }
    Ok(result)
}

/// What [`remaster`] did.
#[derive(Debug, Default)]
struct Moved {
    moved: usize,
    /// Not moved this time; a later request takes them.
    left: usize,
}

/// The live change events at the replica at `url` that are mastered at another replica
/// than `gateway`: made where the pin was not known yet (mastered at the schema
/// repository's master then), or before the family had a gateway.
async fn stray_events(
    client: &ReplicaClient,
    url: &str,
    gateway: &str,
) -> Result<Vec<String>, OperatorError> {
    events_where(client, url, |m| m != gateway).await
}

/// What the gateway reconcile found (for status and conditions).
pub struct GatewayOutcome {
    pub status: Option<GatewayStatus>,
    /// Why the gateway is not where the spec wants it, if so.
    pub problem: Option<String>,
}

fn waiting(status: Option<GatewayStatus>, problem: String) -> GatewayOutcome {
    GatewayOutcome {
        status,
        problem: Some(problem),
    }
}

fn move_to(to: &str) -> MoveMastership {
    MoveMastership {
        to: Some(to.to_string()),
        force: false,
    }
}

fn gateway_setting(replica: &str) -> Setting {
    Setting {
        key: GATEWAY_REPLICA.to_string(),
        value: replica.to_string(),
    }
}

/// The ids of the live change events at the replica at `url` whose master `keep` takes.
async fn events_where(
    client: &ReplicaClient,
    url: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<String>, OperatorError> {
    let events = client
        .list_items(
            url,
            ItemKind::Record,
            &ItemQuery::of_type(CHANGE_EVENT_TYPE),
        )
        .await?;
    Ok(events
        .into_iter()
        .filter(|e| !e.deleted && keep(&e.master))
        .map(|e| e.id)
        .collect())
}

/// The live change events at the replica at `url` mastered at `master`.
async fn events_mastered_at(
    client: &ReplicaClient,
    url: &str,
    master: &str,
) -> Result<Vec<String>, OperatorError> {
    events_where(client, url, |m| m == master).await
}

/// Moving the gateway from `from` to `to`: the old gateway stops, change events are
/// mastered at `to` from now on, the events still mastered at `from` are handed to `to`
/// once nothing travels towards either end, and the new gateway starts only when `to`
/// masters every one of them. Returns what it waits for, or `None` when done.
async fn move_pin(
    ctx: &Ctx,
    family: &ReplicaFamily,
    from: &str,
    to: &str,
) -> Result<Option<String>, OperatorError> {
    let namespace = family.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = builders::gateway_name(&family.name_any());
    let moving = format!("moving the gateway from {from} to {to}");
    if Ctx::cached(&ctx.deployments, &namespace, &name).is_some() {
        match deployments.delete(&name, &Default::default()).await {
            Ok(_) => {}
            // The cache lagged its deletion.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        ctx.event(
            family,
            false,
            "GatewayMoving",
            "Gateway",
            format!("{moving}: the gateway at {from} is stopped first"),
        )
        .await;
    }
    let members = ctx.members(&namespace, &family.name_any());
    let endpoint = |n: &str| Ctx::endpoint_of(&members, n);
    let (Some(from_url), Some(to_url)) = (endpoint(from), endpoint(to)) else {
        return Ok(Some(format!("{moving}: both must be serving")));
    };
    let client = ctx
        .replica_client(&namespace, &family.name_any())
        .await?
        .with_release(Some(ctx.compat.newest_release_version()));
    let knows = |n: &str| {
        members
            .iter()
            .find(|r| r.name_any() == n)
            .and_then(|r| r.status.as_ref()?.gateway_replica.clone())
            .is_some_and(|g| g == to)
    };
    if !knows(to) {
        client.set_setting(&to_url, &gateway_setting(to)).await?;
        return Ok(Some(format!(
            "{moving}: change events are mastered at {to} from now on"
        )));
    }
    // Every replica must know the new pin, and nothing may still travel towards either end.
    let unaware: Vec<String> = members
        .iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(ReplicaPhase::Active))
        .filter(|r| r.status.as_ref().and_then(|s| s.gateway_replica.as_deref()) != Some(to))
        .map(|r| r.name_any())
        .collect();
    if !unaware.is_empty() {
        return Ok(Some(format!(
            "{moving}: waiting for {} to learn the new pin",
            unaware.join(", ")
        )));
    }
    let links = ctx.links_of(&(namespace.clone(), family.name_any()));
    if let Some(l) = links
        .iter()
        .find(|l| (l.to == from || l.to == to) && l.lag_changes > 0)
    {
        return Ok(Some(format!(
            "{moving}: waiting for {}->{} to deliver its last changes",
            l.from, l.to
        )));
    }
    let at_from = events_mastered_at(&client, &from_url, from).await?;
    for id in &at_from {
        client
            .move_mastership(&from_url, ItemKind::Record, id, &move_to(to))
            .await?;
    }
    if !at_from.is_empty() {
        ctx.event(
            family,
            false,
            "GatewayMoving",
            "Gateway",
            format!("{moving}: {} change events handed over", at_from.len()),
        )
        .await;
        return Ok(Some(format!(
            "{moving}: {} change events handed over",
            at_from.len()
        )));
    }
    let still = events_mastered_at(&client, &to_url, from).await?;
    if !still.is_empty() {
        return Ok(Some(format!(
            "{moving}: {} change events not handed over at {to} yet",
            still.len()
        )));
    }
    ctx.event(
        family,
        false,
        "GatewayMoved",
        "Gateway",
        format!("every change event is mastered at {to}; the gateway starts there"),
    )
    .await;
    Ok(None)
}

pub async fn reconcile(ctx: &Ctx, family: &ReplicaFamily) -> Result<GatewayOutcome, OperatorError> {
    let Some(spec) = &family.spec.gateway else {
        return Ok(GatewayOutcome {
            status: None,
            problem: None,
        });
    };
    let namespace = family.namespace().unwrap_or_default();
    let members = ctx.members(&namespace, &family.name_any());
    let previous = family.status.as_ref().and_then(|s| s.gateway.clone());
    let Some(pinned) = members.iter().find(|r| r.name_any() == spec.replica) else {
        return Ok(waiting(
            previous,
            format!(
                "spec.gateway.replica names {}, which is not a replica of this family",
                spec.replica
            ),
        ));
    };
    let pinned_status = pinned.status.clone().unwrap_or_default();
    if pinned_status.phase != Some(ReplicaPhase::Active) {
        return Ok(waiting(
            previous,
            format!("waiting for {} to be Active", spec.replica),
        ));
    }
    // Where the gateway was connected: a different replica means the pin moves.
    let current = previous
        .as_ref()
        .map(|g| g.replica.clone())
        .or_else(|| pinned_status.gateway_replica.clone())
        .filter(|r| members.iter().any(|m| m.name_any() == *r));
    if let Some(from) = current.filter(|r| *r != spec.replica) {
        if let Some(why) = move_pin(ctx, family, &from, &spec.replica).await? {
            let mut status = previous.unwrap_or_default();
            status.replica = from;
            status.connected = false;
            return Ok(waiting(Some(status), why));
        }
    } else if pinned_status.gateway_replica.as_deref() != Some(spec.replica.as_str())
        && let Some(url) = &pinned_status.endpoint
    {
        // The family setting: change events are mastered at the pinned replica.
        let client = ctx.replica_client(&namespace, &family.name_any()).await?;
        client
            .set_setting(url, &gateway_setting(&spec.replica))
            .await?;
        ctx.event(
            family,
            false,
            "GatewayPinned",
            "Gateway",
            format!(
                "change events are now mastered at {}, the gateway's replica",
                spec.replica
            ),
        )
        .await;
    }
    // The gateway delivers and removes only the events mastered at its replica: those
    // mastered elsewhere (made before their replica knew the pin) are handed to it.
    if pinned_status.gateway_replica.as_deref() == Some(spec.replica.as_str())
        && let Some(url) = &pinned_status.endpoint
    {
        // The item routes want the caller's client release.
        let client = ctx
            .replica_client(&namespace, &family.name_any())
            .await?
            .with_release(Some(ctx.compat.newest_release_version()));
        let stray = stray_events(&client, url, &spec.replica).await?;
        if !stray.is_empty() {
            let moved = remaster(ctx, family, &spec.replica, &stray).await?.moved;
            if moved > 0 {
                ctx.event(
                    family,
                    false,
                    "ChangeEventsHandedOver",
                    "Gateway",
                    format!(
                        "{moved} change event(s) mastered at another replica handed to {}, the gateway's replica",
                        spec.replica
                    ),
                )
                .await;
            }
        }
    }
    let Some(endpoint) = &spec.endpoint else {
        let status = GatewayStatus {
            replica: spec.replica.clone(),
            ..Default::default()
        };
        return Ok(GatewayOutcome {
            status: Some(status),
            problem: None,
        });
    };
    let name = builders::gateway_name(&family.name_any());
    ctx.create_secret_once(&namespace, &name, |token| {
        builders::gateway_token_secret(family, token)
    })
    .await?;
    let deployment = builders::gateway_deployment(family, &spec.replica, endpoint, &ctx.image);
    ctx.apply_changed(deployment, Ctx::cached(&ctx.deployments, &namespace, &name))
        .await?;
    let service = builders::gateway_service(family);
    ctx.apply_changed(service, Ctx::cached(&ctx.services, &namespace, &name))
        .await?;
    // The gateway's own report, from its pod.
    let ip = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(namespace.as_str())
                && p.labels().get("app.kubernetes.io/instance") == Some(&name)
                && p.metadata.deletion_timestamp.is_none()
        })
        .find_map(|p| p.status.as_ref()?.pod_ip.clone());
    let report: Option<GatewayReport> = match ip {
        Some(ip) => {
            let client = HttpClient::new(String::new(), None)
                .with_timeout(std::time::Duration::from_secs(5));
            client
                .get_json(
                    &format!("http://{ip}:{}", builders::CLIENT_PORT),
                    multisite_replica::api::route::workload::STATUS,
                )
                .await
                .ok()
        }
        None => None,
    };
    if family
        .annotations()
        .get(REMASTER)
        .is_some_and(|v| v == "true")
        && let Some(report) = &report
    {
        let result = remaster(ctx, family, &spec.replica, &report.one_directional_records).await?;
        // The request stays until every record moved: the next look tries the rest.
        if result.left == 0 {
            ctx.remove_annotation(family, REMASTER).await?;
        }
        let note = format!(
            "mastership of {} one-directional record(s) moved to {}, the gateway's replica{}",
            result.moved,
            spec.replica,
            if result.left == 0 {
                String::new()
            } else {
                format!(
                    "; {} not yet (their master is unreachable or the move is under way), tried again",
                    result.left
                )
            }
        );
        ctx.event(family, result.left > 0, "Remastered", "Gateway", note)
            .await;
    }
    let status = GatewayStatus {
        replica: spec.replica.clone(),
        connected: report.as_ref().is_some_and(|r| r.connected),
        events_pending: report
            .as_ref()
            .map(|r| r.events_pending as i64)
            .unwrap_or(0),
        events_delivered: report
            .as_ref()
            .map(|r| r.events_delivered as i64)
            .unwrap_or(0),
        one_directional_records: report
            .as_ref()
            .map(|r| r.one_directional_records.len() as i64)
            .unwrap_or(0),
    };
    let problem = match &report {
        None => Some("the gateway pod does not answer yet".to_string()),
        Some(r) if !r.connected => Some(format!(
            "the gateway is not connected to {}: {}",
            spec.replica,
            r.last_error.clone().unwrap_or_default()
        )),
        Some(r) => r.last_error.clone().map(|e| format!("gateway: {e}")),
    };
    Ok(GatewayOutcome {
        status: Some(status),
        problem,
    })
}
