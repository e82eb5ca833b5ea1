//! The two small controllers: Site (which replicas it hosts) and SchemaPackage
//! (validation against its family and status; the rollout to replicas belongs to the
//! upgrade driver).

use super::OperatorError;
use super::context::{Ctx, apply_status};
use crate::api::conditions::{self, DEGRADED, PROGRESSING, READY};
use crate::api::{SchemaPackage, SchemaPackageStatus};
use crate::api::{Site, SiteStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use std::sync::Arc;
use std::time::Duration;

fn set_all(
    conds: &mut Vec<Condition>,
    generation: Option<i64>,
    values: [(&str, bool, &str, &str); 3],
) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    for (type_, value, reason, message) in values {
        conditions::set_condition(
            conds,
            type_,
            value,
            reason,
            message,
            generation,
            now.clone(),
        );
    }
}

pub async fn reconcile_site(site: Arc<Site>, ctx: Arc<Ctx>) -> Result<Action, OperatorError> {
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
    set_all(
        &mut status.conditions,
        site.metadata.generation,
        [
            (READY, true, "Accepted", &message),
            (PROGRESSING, false, "Accepted", &message),
            (DEGRADED, false, "Accepted", &message),
        ],
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
    ctx.metrics.reconciled("Site", result.is_err());
    result.map(|_| Action::requeue(Duration::from_secs(60)))
}

pub fn site_error(site: Arc<Site>, error: &OperatorError, ctx: Arc<Ctx>) -> Action {
    let wait = ctx.backoff(&format!(
        "site/{}/{}",
        site.namespace().unwrap_or_default(),
        site.name_any()
    ));
    tracing::warn!(site = %site.name_any(), %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Why a package cannot be applied to its family's schema, if so (pure).
pub fn package_problem(package: &SchemaPackage, base_types: &[String]) -> Option<String> {
    if package.spec.record_types.is_empty() {
        return Some("the package adds no record types".into());
    }
    for t in &package.spec.record_types {
        if base_types.contains(&t.name) {
            return Some(format!(
                "record type {} already exists in the family's base schema",
                t.name
            ));
        }
        let mut names: Vec<&str> = t.fields.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Some(format!(
                "record type {} names field {} twice",
                t.name, pair[0]
            ));
        }
    }
    None
}

pub async fn reconcile_package(
    package: Arc<SchemaPackage>,
    ctx: Arc<Ctx>,
) -> Result<Action, OperatorError> {
    let namespace = package.namespace().unwrap_or_default();
    let name = package.name_any();
    let generation = package.metadata.generation;
    let old = package.status.clone().unwrap_or_default();
    let mut status = SchemaPackageStatus {
        observed_generation: generation,
        ..old.clone()
    };
    let base: Vec<String> = crate::replica::builtin_record_types()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let values = match (
        ctx.family(&namespace, &package.spec.family),
        package_problem(&package, &base),
    ) {
        (None, _) => {
            let m = format!(
                "ReplicaFamily {} does not exist in {namespace}",
                package.spec.family
            );
            [
                (READY, false, "FamilyNotFound", m.clone()),
                (PROGRESSING, false, "FamilyNotFound", m.clone()),
                (DEGRADED, true, "FamilyNotFound", m),
            ]
        }
        (Some(_), Some(problem)) => [
            (READY, false, "Invalid", problem.clone()),
            (PROGRESSING, false, "Invalid", problem.clone()),
            (DEGRADED, true, "Invalid", problem),
        ],
        (Some(_), None) => {
            // Per-replica states come with the rollout; until then each replica is listed as not yet applied.
            let members = ctx.members(&namespace, &package.spec.family);
            status.replicas = members
                .iter()
                .map(|r| {
                    let previous = old
                        .replicas
                        .iter()
                        .find(|p| p.name == r.name_any())
                        .cloned();
                    previous.unwrap_or(crate::api::PackageReplicaStatus {
                        name: r.name_any(),
                        ..Default::default()
                    })
                })
                .collect();
            let done = !status.replicas.is_empty()
                && status
                    .replicas
                    .iter()
                    .all(|r| r.applied && r.user_database_upgraded);
            let m = if done {
                "applied on every replica".to_string()
            } else {
                "valid; waiting for the rollout to the replicas".to_string()
            };
            [
                (
                    READY,
                    done,
                    if done { "Applied" } else { "Accepted" },
                    m.clone(),
                ),
                (PROGRESSING, !done, "Accepted", m.clone()),
                (DEGRADED, false, "Accepted", m),
            ]
        }
    };
    let [a, b, c] = values;
    set_all(
        &mut status.conditions,
        generation,
        [
            (a.0, a.1, a.2, &a.3),
            (b.0, b.1, b.2, &b.3),
            (c.0, c.1, c.2, &c.3),
        ],
    );
    let result = if status != old {
        apply_status(
            &Api::<SchemaPackage>::namespaced(ctx.client.clone(), &namespace),
            &name,
            &status,
        )
        .await
    } else {
        Ok(())
    };
    ctx.metrics.reconciled("SchemaPackage", result.is_err());
    result.map(|_| Action::requeue(Duration::from_secs(30)))
}

pub fn package_error(package: Arc<SchemaPackage>, error: &OperatorError, ctx: Arc<Ctx>) -> Action {
    let wait = ctx.backoff(&format!(
        "package/{}/{}",
        package.namespace().unwrap_or_default(),
        package.name_any()
    ));
    tracing::warn!(package = %package.name_any(), %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FieldType, PackageField, PackageRecordType, SchemaPackageSpec};

    fn package(types: Vec<(&str, Vec<&str>)>) -> SchemaPackage {
        SchemaPackage::new(
            "p",
            SchemaPackageSpec {
                family: "f".into(),
                package: "Interop".into(),
                version: "1.0".into(),
                record_types: types
                    .into_iter()
                    .map(|(n, fields)| PackageRecordType {
                        name: n.into(),
                        fields: fields
                            .into_iter()
                            .map(|f| PackageField {
                                name: f.into(),
                                field_type: FieldType::String,
                            })
                            .collect(),
                    })
                    .collect(),
            },
        )
    }

    #[test]
    fn package_problems() {
        let base = vec!["Defect".to_string()];
        assert_eq!(
            package_problem(
                &package(vec![("ChangeEvent", vec!["record", "action"])]),
                &base
            ),
            None
        );
        assert!(
            package_problem(&package(vec![]), &base).is_some_and(|p| p.contains("no record types"))
        );
        assert!(
            package_problem(&package(vec![("Defect", vec![])]), &base)
                .is_some_and(|p| p.contains("already exists"))
        );
        assert!(
            package_problem(&package(vec![("X", vec!["a", "b", "a"])]), &base)
                .is_some_and(|p| p.contains("field a twice"))
        );
    }
}
