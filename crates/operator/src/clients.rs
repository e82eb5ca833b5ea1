//! Client tiers: one Deployment and Service per entry of `spec.clients`, rolled out to a
//! release only by the upgrade driver (so that a tier never runs ahead of the plan), and
//! observed for the family's `status.clients`.

use super::OperatorError;
use super::builders;
use super::context::Ctx;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use multisite_core::api::{ClientTier, ClientTierStatus, ReplicaFamily, ReplicaPhase};

/// The replica a tier uses: an Active one at its site (or any site), oldest first.
fn replica_for(ctx: &Ctx, family: &ReplicaFamily, tier: &ClientTier) -> Option<String> {
    let namespace = family.namespace().unwrap_or_default();
    ctx.members(&namespace, &family.name_any())
        .into_iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(ReplicaPhase::Active))
        .find(|r| tier.site.as_ref().is_none_or(|site| *site == r.spec.site))
        .map(|r| r.name_any())
}

/// Applies tier `tier`'s Deployment at `release`; returns how far the rollout is.
pub async fn roll_out(
    ctx: &Ctx,
    family: &ReplicaFamily,
    tier: &str,
    release: &str,
) -> Result<String, OperatorError> {
    let Some(spec) = family.spec.clients.iter().find(|c| c.name == tier) else {
        return Ok(format!("client tier {tier} is no longer in spec.clients"));
    };
    let Some(replica) = replica_for(ctx, family, spec) else {
        return Ok(format!(
            "client tier {tier} waits for an Active replica{}",
            spec.site
                .as_ref()
                .map(|s| format!(" at site {s}"))
                .unwrap_or_default()
        ));
    };
    let namespace = family.namespace().unwrap_or_default();
    let name = builders::tier_name(&family.name_any(), tier);
    let before = Ctx::cached(&ctx.deployments, &namespace, &name);
    let old_release = before
        .as_ref()
        .and_then(|d| d.labels().get("multisite.dev/release").cloned());
    let deployment = builders::client_deployment(family, spec, release, &replica, &ctx.image);
    ctx.apply_changed(deployment, before.clone()).await?;
    let service = builders::client_service(family, tier);
    ctx.apply_changed(service, Ctx::cached(&ctx.services, &namespace, &name))
        .await?;
    if old_release.as_deref() != Some(release) {
        ctx.event(
            family,
            false,
            "ClientRollout",
            "Upgrade",
            format!(
                "client tier {tier}: rolling out release {release}{} over replica {replica}",
                old_release
                    .map(|r| format!(" (was {r})"))
                    .unwrap_or_default()
            ),
        )
        .await;
    }
    let ready = before
        .and_then(|d| d.status.clone())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    Ok(format!(
        "client tier {tier}: rolling out release {release} ({ready}/{} ready)",
        spec.replicas
    ))
}

/// Each tier as deployed: its release once every pod runs it and is ready.
pub fn observe(ctx: &Ctx, family: &ReplicaFamily) -> Vec<ClientTierStatus> {
    let namespace = family.namespace().unwrap_or_default();
    family
        .spec
        .clients
        .iter()
        .map(|tier| {
            let name = builders::tier_name(&family.name_any(), &tier.name);
            let deployment = Ctx::cached(&ctx.deployments, &namespace, &name);
            tier_status(tier, deployment.as_deref())
        })
        .collect()
}

/// A tier's status from its Deployment (pure).
pub fn tier_status(tier: &ClientTier, deployment: Option<&Deployment>) -> ClientTierStatus {
    let mut status = ClientTierStatus {
        name: tier.name.clone(),
        release: None,
        replicas: tier.replicas,
        ready_replicas: 0,
    };
    let Some(deployment) = deployment else {
        return status;
    };
    let observed = deployment.status.clone().unwrap_or_default();
    let wanted = deployment.spec.replicas.unwrap_or(1);
    status.ready_replicas = observed.ready_replicas.unwrap_or(0);
    let current = observed.observed_generation >= deployment.metadata.generation;
    let complete = current
        && observed.updated_replicas.unwrap_or(0) == wanted
        && observed.replicas.unwrap_or(0) == wanted
        && status.ready_replicas == wanted;
    if complete {
        status.release = deployment.labels().get("multisite.dev/release").cloned();
    }
    status
}

/// Deletes the Deployments and Services of tiers no longer in the spec.
pub async fn prune(ctx: &Ctx, family: &ReplicaFamily) -> Result<(), OperatorError> {
    let namespace = family.namespace().unwrap_or_default();
    let family_name = family.name_any();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let tiers = ctx.deployments.state().into_iter().filter(|d| {
        let labels = d.labels();
        d.namespace().as_deref() == Some(namespace.as_str())
            && labels.get("multisite.dev/family") == Some(&family_name)
            && labels.get(builders::COMPONENT_LABEL).map(String::as_str) == Some("client")
            && d.metadata.deletion_timestamp.is_none()
    });
    for deployment in tiers {
        let tier = deployment
            .labels()
            .get("multisite.dev/tier")
            .cloned()
            .unwrap_or_default();
        if family.spec.clients.iter().any(|c| c.name == tier) {
            continue;
        }
        let name = deployment.name_any();
        match deployments.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            // Deleted already: the cache has not seen it go yet.
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e.into()),
        }
        let _ = services.delete(&name, &DeleteParams::background()).await;
        ctx.event(
            family,
            false,
            "ClientTierRemoved",
            "Upgrade",
            format!("client tier {tier} left spec.clients; its Deployment {name} is deleted"),
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    #[test]
    fn a_tier_has_a_release_only_once_every_pod_is_ready_at_it() {
        let tier = ClientTier {
            name: "web".into(),
            release: "8.0.1.1".into(),
            replicas: 2,
            site: None,
        };
        assert_eq!(tier_status(&tier, None).release, None);
        let deployment = |ready: i32, updated: i32, generation: i64, observed: i64| {
            let mut d = Deployment {
                spec: DeploymentSpec {
                    replicas: Some(2),
                    ..Default::default()
                },
                status: Some(DeploymentStatus {
                    observed_generation: Some(observed),
                    ready_replicas: Some(ready),
                    updated_replicas: Some(updated),
                    replicas: Some(2),
                    ..Default::default()
                }),
                ..Default::default()
            };
            d.metadata.generation = Some(generation);
            d.metadata.labels =
                Some([("multisite.dev/release".to_string(), "8.0.1.1".to_string())].into());
            d
        };
        let done = tier_status(&tier, Some(&deployment(2, 2, 3, 3)));
        assert_eq!(
            (done.release.as_deref(), done.ready_replicas),
            (Some("8.0.1.1"), 2)
        );
        assert_eq!(
            tier_status(&tier, Some(&deployment(1, 2, 3, 3))).release,
            None
        );
        assert_eq!(
            tier_status(&tier, Some(&deployment(2, 1, 3, 3))).release,
            None
        );
        assert_eq!(
            tier_status(&tier, Some(&deployment(2, 2, 4, 3))).release,
            None
        );
    }
}
