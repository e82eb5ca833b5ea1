//! The SchemaPackage controller: the package checked against its family, applied once
//! at the replica that masters the schema repository, then each replica's user database
//! upgraded once the new schema version has reached it in packets.
//!
//! A reconcile observes (the family, the members, each serving replica's report),
//! [`calls`] decides what to ask of the replicas, the calls are made, and [`status`]
//! (pure, like [`calls`]) says what the package's status becomes.

use super::OperatorError;
use super::context::{Announcement, Ctx, apply_status};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use multisite_core::api::conditions;
use multisite_core::api::{
    PackageReplicaStatus, Replica, ReplicaPhase, SchemaPackage, SchemaPackageStatus,
};
use multisite_replica::api::{PackageRequest, StatusReport, UpgradeRequest};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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

/// What one package reconcile observed.
pub struct Observed<'a> {
    pub package: &'a SchemaPackage,
    pub family_exists: bool,
    /// The record types of the family's base schema.
    pub base_types: &'a [String],
    /// The family's Replicas, oldest first.
    pub members: &'a [Arc<Replica>],
    /// Each serving replica's name, address and report (`None`: it did not answer).
    pub reports: Vec<(String, String, Option<StatusReport>)>,
    pub now: Time,
}

/// Why the rollout cannot go on now, if so: the family is missing, the package is
/// invalid (both need a person: Degraded), or nothing serves yet.
fn blocked(o: &Observed) -> Option<(bool, &'static str, String)> {
    let spec = &o.package.spec;
    if !o.family_exists {
        let namespace = o.package.namespace().unwrap_or_default();
        return Some((
            true,
            "FamilyNotFound",
            format!(
                "ReplicaFamily {} does not exist in {namespace}",
                spec.family
            ),
        ));
    }
    if let Some(problem) = package_problem(o.package, o.base_types) {
        return Some((true, "Invalid", problem));
    }
    if o.reports.is_empty() {
        return Some((
            false,
            "RollingOut",
            format!("family {} has no Active replica yet", spec.family),
        ));
    }
    None
}

/// The schema version the package made, once it was applied.
fn applied_version(package: &SchemaPackage) -> Option<u64> {
    package
        .status
        .as_ref()?
        .schema_version
        .and_then(|v| u64::try_from(v).ok())
}

/// What a package's rollout asks of the replicas now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Calls {
    /// Nothing: the package waits, or is done.
    None,
    /// Apply it at `master`, the replica that masters the schema repository.
    Apply { master: String, url: String },
    /// Upgrade these replicas' user databases (name, address) to `version`.
    Upgrade {
        version: u64,
        replicas: Vec<(String, String)>,
    },
}

/// Whether the package must first be applied, or which user databases to upgrade.
pub fn calls(o: &Observed) -> Calls {
    if blocked(o).is_some() {
        return Calls::None;
    }
    let Some(version) = applied_version(o.package) else {
        let master = o
            .reports
            .iter()
            .find_map(|(_, _, r)| r.as_ref().map(|r| r.schema_repository_master.clone()));
        return match o
            .reports
            .iter()
            .find(|(n, _, _)| Some(n) == master.as_ref())
        {
            Some((master, url, _)) => Calls::Apply {
                master: master.clone(),
                url: url.clone(),
            },
            None => Calls::None,
        };
    };
    let replicas: Vec<(String, String)> = o
        .reports
        .iter()
        .filter(|(_, _, r)| {
            r.as_ref().is_some_and(|r| {
                r.schema_version >= version && r.user_database_schema_version < version
            })
        })
        .map(|(name, url, _)| (name.clone(), url.clone()))
        .collect();
    if replicas.is_empty() {
        Calls::None
    } else {
        Calls::Upgrade { version, replicas }
    }
}

/// What the calls made of [`calls`] came to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The schema version the package made, if it was applied now.
    pub applied: Option<u64>,
    /// Each upgraded replica: done, or why not.
    pub upgraded: BTreeMap<String, Result<(), String>>,
    /// Why the rollout could not go on (a replica call failed), if so.
    pub failed: Option<String>,
}

/// The package's status: its schema version, where each replica stands, and the
/// standard conditions; and when to look again.
pub fn status(o: &Observed, outcome: &Outcome) -> (SchemaPackageStatus, Duration) {
    let package = o.package;
    let generation = package.metadata.generation;
    let mut status = SchemaPackageStatus {
        observed_generation: generation,
        ..package.status.clone().unwrap_or_default()
    };
    let version = outcome.applied.or_else(|| applied_version(package));
    if let Some(version) = outcome.applied {
        status.schema_version = i64::try_from(version).ok();
    }
    let (degraded, reason, message) = match (blocked(o), version) {
        (Some(blocked), _) => blocked,
        (None, _) if outcome.failed.is_some() => (
            false,
            "RollingOut",
            format!("rollout: {}", outcome.failed.clone().unwrap_or_default()),
        ),
        (None, None) => {
            let master = o
                .reports
                .iter()
                .find_map(|(_, _, r)| r.as_ref().map(|r| r.schema_repository_master.clone()));
            (
                false,
                "RollingOut",
                format!(
                    "the schema repository's master {} is not serving",
                    master.unwrap_or_else(|| "(unknown)".into())
                ),
            )
        }
        (None, Some(version)) => {
            let pending = replicas(o, version, &outcome.upgraded, &mut status);
            if pending.is_empty() {
                (
                    false,
                    "Applied",
                    format!(
                        "schema version {version} applied and every user database upgraded to it"
                    ),
                )
            } else {
                (
                    false,
                    "RollingOut",
                    format!(
                        "rolling out schema version {version}; waiting for {}",
                        pending.join(", ")
                    ),
                )
            }
        }
    };
    let done = reason == "Applied";
    conditions::set_standard(
        &mut status.conditions,
        [
            (done, reason, &message),
            (!done && !degraded, reason, &message),
            (degraded, reason, &message),
        ],
        generation,
        o.now.clone(),
    );
    // Done packages are looked at again now and then, for replicas added later.
    let requeue = Duration::from_secs(if done { 10 } else { 3 });
    (status, requeue)
}

/// Each replica's entry in the status; returns those not done yet.
fn replicas(
    o: &Observed,
    version: u64,
    upgraded: &BTreeMap<String, Result<(), String>>,
    status: &mut SchemaPackageStatus,
) -> Vec<String> {
    let mut pending = Vec::new();
    status.replicas = Vec::new();
    for (name, _, report) in &o.reports {
        let mut entry = PackageReplicaStatus {
            name: name.clone(),
            ..Default::default()
        };
        match report {
            None => entry.message = Some("not reachable".into()),
            Some(report) => {
                entry.applied = report.schema_version >= version;
                entry.user_database_upgraded = report.user_database_schema_version >= version;
                match upgraded.get(name) {
                    Some(Ok(())) => entry.user_database_upgraded = true,
                    Some(Err(why)) => entry.message = Some(why.clone()),
                    None if !entry.applied => {
                        entry.message = Some(format!(
                            "waiting for schema version {version} to arrive in packets"
                        ))
                    }
                    None => {}
                }
            }
        }
        if !(entry.applied && entry.user_database_upgraded) {
            pending.push(name.clone());
        }
        status.replicas.push(entry);
    }
    // Replicas still starting are pending too: they get the package once they serve.
    for r in o
        .members
        .iter()
        .filter(|r| !o.reports.iter().any(|(n, _, _)| *n == r.name_any()))
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) != Some(ReplicaPhase::Removing))
    {
        pending.push(r.name_any());
        status.replicas.push(PackageReplicaStatus {
            name: r.name_any(),
            message: Some("not serving yet".into()),
            ..Default::default()
        });
    }
    pending
}

/// Asks each serving replica for its report, then makes the calls [`calls`] decides.
async fn roll_out(
    ctx: &Ctx,
    observed: &mut Observed<'_>,
    serving: Vec<(String, String)>,
    outcome: &mut Outcome,
    events: &mut Vec<Announcement>,
) -> Result<(), OperatorError> {
    let package = observed.package;
    let namespace = package.namespace().unwrap_or_default();
    let client = ctx.replica_client(&namespace, &package.spec.family).await?;
    for (name, url) in serving {
        let report = client.status(&url).await.ok();
        observed.reports.push((name, url, report));
    }
    match calls(observed) {
        Calls::None => {}
        Calls::Apply { master, url } => {
            let schema = client
                .apply_package(&url, &PackageRequest::from(&package.spec))
                .await?;
            events.push(Announcement::normal(
                "Applied",
                "ApplyPackage",
                format!(
                    "package {} {} applied at {master} as schema version {}",
                    package.spec.package, package.spec.version, schema.version
                ),
            ));
            outcome.applied = Some(schema.version);
        }
        Calls::Upgrade { version, replicas } => {
            let step = UpgradeRequest {
                user_database_schema: Some(version),
                ..UpgradeRequest::default()
            };
            for (name, url) in replicas {
                let result = client.upgrade(&url, &step).await;
                if result.is_ok() {
                    events.push(Announcement::normal(
                        "UserDatabaseUpgraded",
                        "ApplyPackage",
                        format!("the user database of {name} now uses schema version {version}"),
                    ));
                }
                outcome
                    .upgraded
                    .insert(name, result.map(|_| ()).map_err(|e| e.to_string()));
            }
        }
    }
    Ok(())
}

pub async fn reconcile_package(
    package: Arc<SchemaPackage>,
    ctx: Arc<Ctx>,
) -> Result<Action, OperatorError> {
    super::reconcile::instrumented(package.as_ref(), &ctx, package_once(&package, &ctx)).await
}

async fn package_once(package: &SchemaPackage, ctx: &Ctx) -> Result<Action, OperatorError> {
    let namespace = package.namespace().unwrap_or_default();
    let family = &package.spec.family;
    let base_types: Vec<String> = multisite_replica::builtin_record_types()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let members = ctx.members(&namespace, family);
    let mut observed = Observed {
        package,
        family_exists: ctx.family(&namespace, family).is_some(),
        base_types: &base_types,
        members: &members,
        reports: Vec::new(),
        now: Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let serving: Vec<(String, String)> = members
        .iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(ReplicaPhase::Active))
        .filter_map(|r| Some((r.name_any(), r.status.as_ref()?.endpoint.clone()?)))
        .collect();
    let valid = observed.family_exists && package_problem(package, &base_types).is_none();
    let mut outcome = Outcome::default();
    let mut events = Vec::new();
    if valid && !serving.is_empty() {
        // A failed call is reported in the status and tried again at the next look.
        if let Err(error) = roll_out(ctx, &mut observed, serving, &mut outcome, &mut events).await {
            outcome.failed = Some(error.to_string());
        }
    }
    for event in &events {
        ctx.publish(package, event).await;
    }
    let (status, requeue) = status(&observed, &outcome);
    if Some(&status) != package.status.as_ref() {
        let api: Api<SchemaPackage> = Api::namespaced(ctx.client.clone(), &namespace);
        apply_status(&api, &package.name_any(), &status).await?;
    }
    Ok(Action::requeue(requeue))
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

    fn report(name: &str, schema: u64, user_database: u64) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "family": "f", "replica": name, "idPrefix": "F", "idTag": "t",
            "incarnation": 1, "schemaRepositoryFeatureLevel": 7,
            "userDatabaseFeatureLevel": 7, "metaschemaVersion": 22, "packetVersion": null,
            "syncBlocked": null, "schemaVersion": schema,
            "userDatabaseSchemaVersion": user_database, "schemaRepositoryMaster": "a",
            "epochs": {}, "heldPackets": 0, "held": [], "peers": [], "mastered": {},
            "changeLog": 0
        }))
        .expect("a report")
    }

    fn member(name: &str, phase: ReplicaPhase) -> Arc<Replica> {
        let mut r: Replica = serde_json::from_value(serde_json::json!({
            "apiVersion": "multisite.dev/v1alpha1", "kind": "Replica",
            "metadata": {"name": name, "namespace": "t"},
            "spec": {"family": "f", "site": "s", "storage": "1Gi"}
        }))
        .expect("a replica");
        r.status = Some(multisite_core::api::ReplicaStatus {
            phase: Some(phase),
            ..Default::default()
        });
        Arc::new(r)
    }

    /// A valid package of family `f`, applied as `version` if given.
    fn valid(version: Option<i64>) -> SchemaPackage {
        let mut p = package(vec![("ChangeEvent", vec!["record"])]);
        p.metadata.namespace = Some("t".into());
        p.metadata.generation = Some(1);
        p.status = version.map(|v| SchemaPackageStatus {
            schema_version: Some(v),
            ..Default::default()
        });
        p
    }

    fn observed<'a>(
        package: &'a SchemaPackage,
        members: &'a [Arc<Replica>],
        reports: Vec<(&str, Option<StatusReport>)>,
    ) -> Observed<'a> {
        const BASE: &[String] = &[];
        Observed {
            package,
            family_exists: true,
            base_types: BASE,
            members,
            reports: reports
                .into_iter()
                .map(|(n, r)| (n.to_string(), format!("http://{n}:7400"), r))
                .collect(),
            now: Time(k8s_openapi::jiff::Timestamp::from_second(1_000).expect("time")),
        }
    }

    fn verdict(status: &SchemaPackageStatus) -> Vec<(String, bool, String)> {
        status
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status == "True", c.reason.clone()))
            .collect()
    }

    #[test]
    fn what_a_rollout_asks_of_the_replicas() {
        let members = [
            member("a", ReplicaPhase::Active),
            member("b", ReplicaPhase::Active),
        ];
        let new = valid(None);
        let applied = valid(Some(2));
        let mut no_family = observed(&new, &members, vec![("a", Some(report("a", 1, 1)))]);
        no_family.family_exists = false;
        let invalid_package = package(vec![]);
        let rows: Vec<(&str, Observed, Calls)> = vec![
            ("no family", no_family, Calls::None),
            (
                "invalid",
                observed(
                    &invalid_package,
                    &members,
                    vec![("a", Some(report("a", 1, 1)))],
                ),
                Calls::None,
            ),
            (
                "nothing serves",
                observed(&new, &members, vec![]),
                Calls::None,
            ),
            (
                "first: at the master",
                observed(
                    &new,
                    &members,
                    vec![
                        ("a", Some(report("a", 1, 1))),
                        ("b", Some(report("b", 1, 1))),
                    ],
                ),
                Calls::Apply {
                    master: "a".into(),
                    url: "http://a:7400".into(),
                },
            ),
            (
                "the master does not serve",
                observed(&new, &members, vec![("b", Some(report("b", 1, 1)))]),
                Calls::None,
            ),
            (
                "arrived at b only",
                observed(
                    &applied,
                    &members,
                    vec![
                        ("a", Some(report("a", 2, 2))),
                        ("b", Some(report("b", 2, 1))),
                    ],
                ),
                Calls::Upgrade {
                    version: 2,
                    replicas: vec![("b".into(), "http://b:7400".into())],
                },
            ),
            (
                "not arrived, or not answering",
                observed(
                    &applied,
                    &members,
                    vec![("a", None), ("b", Some(report("b", 1, 1)))],
                ),
                Calls::None,
            ),
            (
                "done",
                observed(
                    &applied,
                    &members,
                    vec![
                        ("a", Some(report("a", 2, 2))),
                        ("b", Some(report("b", 3, 3))),
                    ],
                ),
                Calls::None,
            ),
        ];
        for (name, o, expected) in rows {
            assert_eq!(calls(&o), expected, "{name}");
        }
    }

    #[test]
    fn a_rollouts_status_says_where_each_replica_stands() {
        let members = [
            member("a", ReplicaPhase::Active),
            member("b", ReplicaPhase::Active),
            member("c", ReplicaPhase::Bootstrapping),
            member("d", ReplicaPhase::Removing),
        ];
        // Just applied: version recorded, every replica waits for it to arrive.
        let new = valid(None);
        let o = observed(
            &new,
            &members,
            vec![("a", Some(report("a", 1, 1))), ("b", None)],
        );
        let (status, requeue) = super::status(
            &o,
            &Outcome {
                applied: Some(2),
                ..Default::default()
            },
        );
        assert_eq!(status.schema_version, Some(2));
        let names: Vec<_> = status.replicas.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "a leaving replica is left out");
        assert_eq!(
            status.replicas[0].message.as_deref(),
            Some("waiting for schema version 2 to arrive in packets")
        );
        assert_eq!(status.replicas[1].message.as_deref(), Some("not reachable"));
        assert_eq!(
            status.replicas[2].message.as_deref(),
            Some("not serving yet")
        );
        assert_eq!(
            verdict(&status)[1],
            ("Progressing".into(), true, "RollingOut".into())
        );
        assert_eq!(requeue, Duration::from_secs(3));

        // Upgrades made: one done, one refused with its reason.
        let applied = valid(Some(2));
        let two = &members[..2];
        let o = observed(
            &applied,
            two,
            vec![
                ("a", Some(report("a", 2, 1))),
                ("b", Some(report("b", 2, 1))),
            ],
        );
        let outcome = Outcome {
            upgraded: [
                ("a".to_string(), Ok(())),
                ("b".to_string(), Err("disk full".to_string())),
            ]
            .into(),
            ..Default::default()
        };
        let (status, _) = super::status(&o, &outcome);
        assert!(status.replicas[0].user_database_upgraded);
        assert!(!status.replicas[1].user_database_upgraded);
        assert_eq!(status.replicas[1].message.as_deref(), Some("disk full"));

        // Everything there: Ready, looked at seldom.
        let o = observed(
            &applied,
            two,
            vec![
                ("a", Some(report("a", 2, 2))),
                ("b", Some(report("b", 2, 2))),
            ],
        );
        let (status, requeue) = super::status(&o, &Outcome::default());
        assert_eq!(
            verdict(&status),
            [
                ("Ready".into(), true, "Applied".into()),
                ("Progressing".into(), false, "Applied".into()),
                ("Degraded".into(), false, "Applied".into()),
            ]
        );
        assert_eq!(requeue, Duration::from_secs(10));

        // A failed call: said in the status, replicas as they were.
        let (failed, _) = super::status(
            &o,
            &Outcome {
                failed: Some("cannot reach a".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            verdict(&failed)[1],
            ("Progressing".into(), true, "RollingOut".into())
        );
        assert!(
            failed.conditions[0]
                .message
                .starts_with("rollout: cannot reach a")
        );

        // A missing family or an invalid package needs a person: Degraded.
        let mut gone = observed(&applied, two, vec![]);
        gone.family_exists = false;
        let (status, _) = super::status(&gone, &Outcome::default());
        assert_eq!(
            verdict(&status)[2],
            ("Degraded".into(), true, "FamilyNotFound".into())
        );
    }
}
