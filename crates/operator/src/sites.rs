//! The Site controller: which replicas each Site hosts, in its status.

use super::OperatorError;
use super::context::{Ctx, apply_status};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use multisite_core::api::conditions;
use multisite_core::api::{Site, SiteStatus};
use std::sync::Arc;
use std::time::Duration;

pub async fn reconcile_site(site: Arc<Site>, ctx: Arc<Ctx>) -> Result<Action, OperatorError> {
    super::reconcile::instrumented(site.as_ref(), &ctx, site_once(&site, &ctx)).await
}

async fn site_once(site: &Site, ctx: &Ctx) -> Result<Action, OperatorError> {
    let namespace = site.namespace().unwrap_or_default();
    let name = site.name_any();
    let mut hosted: Vec<String> = ctx
        .replicas
        .state()
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(namespace.as_str()) && r.spec.site == name)
        .map(|r| r.name_any())
        .collect();
    hosted.sort();
    let old = site.status.clone().unwrap_or_default();
    let mut status = SiteStatus {
        observed_generation: site.metadata.generation,
        conditions: old.conditions.clone(),
        replica_count: i32::try_from(hosted.len()).unwrap_or(i32::MAX),
        replicas: hosted,
    };
    let message = format!("hosts {} replica(s)", status.replica_count);
    conditions::set_standard(
        &mut status.conditions,
        [
            (true, "Accepted", &message),
            (false, "Accepted", &message),
            (false, "Accepted", &message),
        ],
        site.metadata.generation,
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let result = if status != old {
        apply_status(
            &Api::<Site>::namespaced(ctx.client.clone(), &namespace),
            &name,
            &status,
        )
        .await
    } else {
        Ok(())
    };
    result.map(|_| Action::requeue(Duration::from_secs(60)))
}
