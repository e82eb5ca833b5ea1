//! The family's gateway: a one-pod Deployment pinned to `spec.gateway.replica`, the
//! token Secret for the outside system, the family setting that makes change events
//! mastered at the pinned replica, and the gateway's state in the family's status.
//!
//! Moving the pin to another replica is not carried out yet: events already mastered
//! at the old replica would not be delivered by a gateway at the new one. The status
//! says so and the gateway stays where it is.

use super::OperatorError;
use super::builders;
use super::context::{Ctx, apply_object};
use crate::api::{GatewayStatus, ReplicaFamily, ReplicaPhase};
use crate::gateway::GatewayReport;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

/// What the gateway reconcile found (for status and conditions).
pub struct GatewayOutcome {
    pub status: Option<GatewayStatus>,
    /// Why the gateway is not where the spec wants it, if so.
    pub problem: Option<String>,
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
    let Some(pinned) = members.iter().find(|r| r.name_any() == spec.replica) else {
        return Ok(GatewayOutcome {
            status: None,
            problem: Some(format!(
                "spec.gateway.replica names {}, which is not a replica of this family",
                spec.replica
            )),
        });
    };
    let pinned_status = pinned.status.clone().unwrap_or_default();
    if pinned_status.phase != Some(ReplicaPhase::Active) {
        return Ok(GatewayOutcome {
            status: None,
            problem: Some(format!("waiting for {} to be Active", spec.replica)),
        });
    }
    // The family setting: change events are mastered at the pinned replica.
    match pinned_status.gateway_replica.as_deref() {
        Some(current) if current == spec.replica => {}
        Some(other) => {
            return Ok(GatewayOutcome {
                status: None,
                problem: Some(format!(
                    "the gateway is pinned to {other}; moving it to {} (draining its change events first) is not supported yet: set spec.gateway.replica back to {other}",
                    spec.replica
                )),
            });
        }
        None => {
            if let Some(url) = &pinned_status.endpoint {
                let client = ctx.replica_client(&namespace, &family.name_any()).await?;
                let body = serde_json::json!({"key": crate::packet::change::GATEWAY_REPLICA, "value": spec.replica});
                client
                    .send_json::<serde_json::Value>(hyper::Method::POST, url, "/v1/settings", &body)
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
        }
    }
    let Some(endpoint) = &spec.endpoint else {
        return Ok(GatewayOutcome {
            status: None,
            problem: None,
        });
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = builders::gateway_name(&family.name_any());
    if secrets.get_opt(&name).await?.is_none() {
        let token =
            crate::replica::secret::generate().map_err(|e| OperatorError::Secret(e.to_string()))?;
        match secrets
            .create(
                &Default::default(),
                &serde_json::from_value(builders::gateway_token_secret(family, &token))?,
            )
            .await
        {
            Ok(_) => {}
            // Made by another reconcile first: that one stands.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    apply_object(
        &deployments,
        &builders::gateway_deployment(family, &spec.replica, endpoint, &ctx.image),
    )
    .await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    apply_object(&services, &builders::gateway_service(family)).await?;
    // The gateway's own report, from its pod.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!("app.kubernetes.io/instance={name}");
    let ip = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .find_map(|p| p.status?.pod_ip);
    let report: Option<GatewayReport> = match ip {
        Some(ip) => {
            let client = crate::replica::http::ReplicaClient::new(String::new(), None)
                .with_timeout(std::time::Duration::from_secs(5));
            client
                .get_json(&format!("http://{ip}:{}", builders::CLIENT_PORT), "/status")
                .await
                .ok()
        }
        None => None,
    };
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
