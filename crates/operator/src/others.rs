//! The two small controllers: Site (which replicas it hosts) and SchemaPackage
//! (validation against its family and status; the rollout to replicas belongs to the
//! upgrade driver).

use super::OperatorError;
use super::context::{Ctx, apply_status};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use multisite_core::api::conditions::{self, READY, Verdict};
use multisite_core::api::{SchemaPackage, SchemaPackageStatus};
use multisite_core::api::{Site, SiteStatus};
use std::sync::Arc;
use std::time::Duration;

/// Sets the three standard conditions now.
fn set_all(conds: &mut Vec<Condition>, generation: Option<i64>, values: [Verdict; 3]) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    conditions::set_standard(conds, values, generation, now);
}

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
    set_all(
        &mut status.conditions,
        site.metadata.generation,
        [
            (true, "Accepted", &message),
            (false, "Accepted", &message),
            (false, "Accepted", &message),
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
    result.map(|_| Action::requeue(Duration::from_secs(60)))
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
    super::reconcile::instrumented(package.as_ref(), &ctx, package_once(&package, &ctx)).await
}

async fn package_once(package: &SchemaPackage, ctx: &Ctx) -> Result<Action, OperatorError> {
    let namespace = package.namespace().unwrap_or_default();
    let name = package.name_any();
    let generation = package.metadata.generation;
    let old = package.status.clone().unwrap_or_default();
    let mut status = SchemaPackageStatus {
        observed_generation: generation,
        ..old.clone()
    };
    let base: Vec<String> = multisite_replica::builtin_record_types()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let values = match (
        ctx.family(&namespace, &package.spec.family),
        package_problem(package, &base),
    ) {
        (None, _) => {
            let m = format!(
                "ReplicaFamily {} does not exist in {namespace}",
                package.spec.family
            );
            [
                (false, "FamilyNotFound", m.clone()),
                (false, "FamilyNotFound", m.clone()),
                (true, "FamilyNotFound", m),
            ]
        }
        (Some(_), Some(problem)) => [
            (false, "Invalid", problem.clone()),
            (false, "Invalid", problem.clone()),
            (true, "Invalid", problem),
        ],
        (Some(_), None) => {
            let waiting = roll_out(ctx, package, &mut status).await;
            let waiting = match waiting {
                Ok(w) => w,
                Err(e) => Some(format!("rollout: {e}")),
            };
            let done = waiting.is_none();
            let m = waiting.unwrap_or_else(|| {
                format!(
                    "schema version {} applied and every user database upgraded to it",
                    status.schema_version.unwrap_or_default()
                )
            });
            let reason = if done { "Applied" } else { "RollingOut" };
            [
                (done, reason, m.clone()),
                (!done, reason, m.clone()),
                (false, reason, m),
            ]
        }
    };
    let [a, b, c] = &values;
    set_all(
        &mut status.conditions,
        generation,
        [(a.0, a.1, &a.2), (b.0, b.1, &b.2), (c.0, c.1, &c.2)],
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
    let done = conditions::is_true(&status.conditions, READY);
    // Done packages are looked at again now and then, for replicas added later.
    result.map(|_| Action::requeue(Duration::from_secs(if done { 10 } else { 3 })))
}

/// Applies the package at the replica that masters the schema repository, then upgrades
/// each replica's user database once the new schema version reached it. Returns what
/// it waits for, or `None` when every replica is done.
async fn roll_out(
    ctx: &Ctx,
    package: &SchemaPackage,
    status: &mut SchemaPackageStatus,
) -> Result<Option<String>, OperatorError> {
    use multisite_core::api::{PackageReplicaStatus, ReplicaPhase};
    use multisite_replica::api::{PackageRequest, UpgradeRequest};
    let namespace = package.namespace().unwrap_or_default();
    let family = &package.spec.family;
    let members = ctx.members(&namespace, family);
    let serving: Vec<(String, String)> = members
        .iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(ReplicaPhase::Active))
        .filter_map(|r| Some((r.name_any(), r.status.as_ref()?.endpoint.clone()?)))
        .collect();
    if serving.is_empty() {
        return Ok(Some(format!("family {family} has no Active replica yet")));
    }
    let client = ctx.replica_client(&namespace, family).await?;
    let mut reports = Vec::new();
    for (name, url) in &serving {
        let report = client.status(url).await.ok();
        reports.push((name.clone(), url.clone(), report));
    }
    let version = match status.schema_version.and_then(|v| u64::try_from(v).ok()) {
        Some(version) => version,
        None => {
            let master = reports
                .iter()
                .find_map(|(_, _, r)| r.as_ref().map(|r| r.schema_repository_master.clone()));
            let Some((_, url, _)) = reports.iter().find(|(n, _, _)| Some(n) == master.as_ref())
            else {
                return Ok(Some(format!(
                    "the schema repository's master {} is not serving",
                    master.unwrap_or_else(|| "(unknown)".into())
                )));
            };
            let schema = client
                .apply_package(url, &PackageRequest::from(&package.spec))
                .await?;
            ctx.event(
                package,
                false,
                "Applied",
                "ApplyPackage",
                format!(
                    "package {} {} applied at {} as schema version {}",
                    package.spec.package,
                    package.spec.version,
                    master.unwrap_or_default(),
                    schema.version
                ),
            )
            .await;
            status.schema_version = i64::try_from(schema.version).ok();
            schema.version
        }
    };
    let mut pending = Vec::new();
    status.replicas = Vec::new();
    for (name, url, report) in reports {
        let mut entry = PackageReplicaStatus {
            name: name.clone(),
            ..Default::default()
        };
        match report {
            None => entry.message = Some("not reachable".into()),
            Some(report) => {
                entry.applied = report.schema_version >= version;
                entry.user_database_upgraded = report.user_database_schema_version >= version;
                if entry.applied && !entry.user_database_upgraded {
                    let step = UpgradeRequest {
                        user_database_schema: Some(version),
                        ..UpgradeRequest::default()
                    };
                    match client.upgrade(&url, &step).await {
                        Ok(_) => {
                            entry.user_database_upgraded = true;
                            ctx.event(
                                package,
                                false,
                                "UserDatabaseUpgraded",
                                "ApplyPackage",
                                format!(
                                    "the user database of {name} now uses schema version {version}"
                                ),
                            )
                            .await;
                        }
                        Err(e) => entry.message = Some(e.to_string()),
                    }
                } else if !entry.applied {
                    entry.message = Some(format!(
                        "waiting for schema version {version} to arrive in packets"
                    ));
                }
            }
        }
        if !(entry.applied && entry.user_database_upgraded) {
            pending.push(name.clone());
        }
        status.replicas.push(entry);
    }
    // Replicas still starting are pending too: they get the package once they serve.
    for r in members
        .iter()
        .filter(|r| !serving.iter().any(|(n, _)| *n == r.name_any()))
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) != Some(ReplicaPhase::Removing))
    {
        pending.push(r.name_any());
        status.replicas.push(PackageReplicaStatus {
            name: r.name_any(),
            message: Some("not serving yet".into()),
            ..Default::default()
        });
    }
    Ok((!pending.is_empty()).then(|| {
        format!(
            "rolling out schema version {version}; waiting for {}",
            pending.join(", ")
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use multisite_core::api::{FieldType, PackageField, PackageRecordType, SchemaPackageSpec};

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
