//! The reads of one Replica reconcile: the family, Site and members from the caches,
//! the replica's StatefulSet, Service and pod from theirs, and the replica's own status
//! from its server when the decision needs it.

use super::decide::{self, Answer, Observed};
use crate::OperatorError;
use crate::builders::{self, Image};
use crate::context::Ctx;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use multisite_core::api::{Replica, ReplicaFamily, Site};
use multisite_replica::http::HttpError;
use std::sync::Arc;

/// What [`observe`] read; [`Seen::observed`] lends it to the decision.
pub(super) struct Seen {
    family: Option<Arc<ReplicaFamily>>,
    site: Option<Arc<Site>>,
    members: Vec<Arc<Replica>>,
    statefulset: Option<Arc<StatefulSet>>,
    service: Option<Arc<Service>>,
    pod: Option<Arc<Pod>>,
    answer: Answer,
}

impl Seen {
    pub(super) fn observed<'a>(&'a self, replica: &'a Replica, image: &'a Image) -> Observed<'a> {
        Observed {
            replica,
            family: self.family.as_deref(),
            site: self.site.as_deref(),
            members: &self.members,
            statefulset: self.statefulset.as_deref(),
            service: self.service.as_deref(),
            pod: self.pod.as_deref(),
            answer: self.answer.clone(),
            image,
            now: Time(Timestamp::now()),
        }
    }
}

pub(super) async fn observe(ctx: &Ctx, replica: &Replica) -> Result<Seen, OperatorError> {
    let namespace = replica.namespace().unwrap_or_default();
    let name = replica.name_any();
    let family = ctx.family(&namespace, &replica.spec.family);
    let site = ctx.site(&namespace, &replica.spec.site);
    let pod = Ctx::cached(&ctx.pods, &namespace, &builders::pod_name(&name))
        .filter(|pod| pod.metadata.deletion_timestamp.is_none());
    let placed = family.is_some() && site.is_some();
    let url = pod
        .as_deref()
        .and_then(decide::endpoint)
        .filter(|_| decide::needs_answer(replica, placed, pod.as_deref()));
    let answer = match url {
        None => Answer::NotAsked,
        Some(url) => {
            let client = ctx.replica_client(&namespace, &replica.spec.family).await?;
            match client.status(&url).await {
                Ok(report) => Answer::Report(Box::new(report)),
                Err(HttpError::AwaitingBootstrap(state)) => Answer::AwaitingBootstrap(state),
                Err(error) => Answer::Unreachable(error.to_string()),
            }
        }
    };
    Ok(Seen {
        members: ctx.members(&namespace, &replica.spec.family),
        // Only as this process last applied them: anything else is applied again.
        statefulset: ctx.as_applied(Ctx::cached(&ctx.statefulsets, &namespace, &name)),
        service: ctx.as_applied(Ctx::cached(&ctx.services, &namespace, &name)),
        family,
        site,
        pod,
        answer,
    })
}
