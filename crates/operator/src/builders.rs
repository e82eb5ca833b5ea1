//! The Kubernetes objects a resource owns, as typed k8s-openapi objects ready to apply
//! (pure: no I/O).
//!
//! A Replica owns a one-pod StatefulSet and a headless Service, both named after it, so
//! its pod is `<replica>-0` and its volume claim `data-<replica>-0`. A ReplicaFamily
//! owns the Secret `<family>-secret` holding the shared secret under the key `secret`,
//! its client tiers' Deployments and Services, and its gateway's.

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use multisite_core::api::Replica;
use multisite_core::api::ReplicaFamily;
use multisite_core::api::Site;
use std::collections::BTreeMap;

/// The port every replica serves its API on, named `api` in pods and Services.
pub const API_PORT: u16 = 7400;
/// Where a replica pod keeps its database (the volume claim `data`).
pub const DATA_DIR: &str = "/var/lib/multisite";
/// Where a replica pod finds the family secret; the file is `secret` inside.
pub const SECRET_DIR: &str = "/etc/multisite/secret";
/// The key of the family Secret that holds the shared secret.
pub const SECRET_KEY: &str = "secret";
/// The user and group every container of the product runs as (not root).
const RUN_AS: i64 = 65532;

/// The annotation holding a digest of an object as the operator last applied it: a
/// reconcile that finds the same digest in its cache knows an apply would change
/// nothing and makes none.
pub const APPLIED: &str = "multisite.dev/applied";

/// Selects every object the operator makes (and the pods of its workloads): what its
/// caches of StatefulSets, Deployments, Services and pods watch.
pub const MANAGED: &str = "app.kubernetes.io/managed-by=multisite-operator";

/// The label that says which part of the product an object belongs to.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

/// The label on a replica's objects that names the Replica they serve.
pub const REPLICA_LABEL: &str = "multisite.dev/replica";

/// Which image and pull policy the operator gives the pods it creates.
#[derive(Clone, Debug)]
pub struct Image {
    pub reference: String,
    pub pull_policy: String,
}

/// The family Secret's name.
pub fn secret_name(family: &str) -> String {
    format!("{family}-secret")
}

/// The pod that serves `replica`.
pub fn pod_name(replica: &str) -> String {
    format!("{replica}-0")
}

/// The volume claim that holds `replica`'s data.
pub fn claim_name(replica: &str) -> String {
    format!("data-{replica}-0")
}

type Labels = BTreeMap<String, String>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What selects a workload's pods: its name and instance labels.
fn instance_selector(app: &str, instance: &str) -> Labels {
    labels(&[
        ("app.kubernetes.io/name", app),
        ("app.kubernetes.io/instance", instance),
    ])
}

/// The labels every object made for a replica carries (and its pod's selector).
pub fn replica_labels(replica: &Replica) -> Labels {
    let name = replica.metadata.name.clone().unwrap_or_default();
    labels(&[
        ("app.kubernetes.io/name", "multisite-replica"),
        ("app.kubernetes.io/instance", &name),
        (COMPONENT_LABEL, "replica"),
        ("app.kubernetes.io/part-of", &replica.spec.family),
        ("app.kubernetes.io/managed-by", "multisite-operator"),
        ("multisite.dev/family", &replica.spec.family),
        (REPLICA_LABEL, &name),
        ("multisite.dev/site", &replica.spec.site),
    ])
}

fn replica_selector(replica: &Replica) -> Labels {
    instance_selector(
        "multisite-replica",
        replica.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// The labels of the objects a family owns that have no workload labels of their own.
fn family_labels(family: &str) -> Labels {
    labels(&[
        ("app.kubernetes.io/managed-by", "multisite-operator"),
        ("multisite.dev/family", family),
    ])
}

fn owner<K: Resource<DynamicType = ()>>(object: &K) -> Option<Vec<OwnerReference>> {
    Some(object.controller_owner_ref(&()).into_iter().collect())
}

/// An object's metadata: name, namespace, labels, and `owner` as its controller.
fn meta<K: Resource<DynamicType = ()>>(name: &str, owner_object: &K, labels: Labels) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: owner_object.meta().namespace.clone(),
        labels: Some(labels),
        owner_references: owner(owner_object),
        ..ObjectMeta::default()
    }
}

/// Not root, the runtime's default seccomp profile; `fs_group` where a volume needs it.
fn pod_security(fs_group: Option<i64>) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group,
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// No privilege escalation, a read-only root file system, no capabilities.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// How often and how patiently a probe asks.
struct Patience {
    initial_delay: Option<i32>,
    period: i32,
    timeout: Option<i32>,
    failures: i32,
}

fn http_probe(path: &str, port: &str, patience: Patience) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(port.to_string()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: patience.initial_delay,
        period_seconds: Some(patience.period),
        timeout_seconds: patience.timeout,
        failure_threshold: Some(patience.failures),
        ..Probe::default()
    }
}

fn container_port(name: &str, port: u16) -> Vec<ContainerPort> {
    vec![ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(port),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }]
}

fn service_port(name: &str, port: u16) -> Vec<ServicePort> {
    vec![ServicePort {
        name: Some(name.to_string()),
        port: i32::from(port),
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }]
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// A volume of Secret `secret`, readable by the owner and group only.
fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// A container of the product's image running `multisite ARGS`, unprivileged.
fn product_container(name: &str, image: &Image, args: &[&str]) -> Container {
    Container {
        name: name.to_string(),
        image: Some(image.reference.clone()),
        image_pull_policy: Some(image.pull_policy.clone()),
        args: Some(args.iter().map(|a| a.to_string()).collect()),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

fn quantities(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, Quantity>> {
    (!map.is_empty()).then(|| {
        map.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    })
}

/// Pod placement by a Site: its node selector and a required zone.
fn placement(site: &Site) -> (Option<BTreeMap<String, String>>, Option<Affinity>) {
    let selector = (!site.spec.node_selector.is_empty()).then(|| site.spec.node_selector.clone());
    let affinity = site.spec.zone.as_ref().map(|zone| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "topology.kubernetes.io/zone".into(),
                        operator: "In".into(),
                        values: Some(vec![zone.clone()]),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    });
    (selector, affinity)
}

/// The StatefulSet that runs `replica`'s server, placed by its `site`.
pub fn statefulset(replica: &Replica, site: &Site, image: &Image) -> StatefulSet {
    let name = replica.metadata.name.clone().unwrap_or_default();
    let labels = replica_labels(replica);
    let args = [
        "replica",
        "serve",
        &format!("--data={DATA_DIR}"),
        &format!("--listen=0.0.0.0:{API_PORT}"),
        &format!("--secret-file={SECRET_DIR}/{SECRET_KEY}"),
        "--await-bootstrap",
        &format!("--family={}", replica.spec.family),
        &format!("--replica={name}"),
        "--log-json",
    ];
    let container = Container {
        ports: Some(container_port("api", API_PORT)),
        readiness_probe: Some(http_probe(
            "/readyz",
            "api",
            Patience {
                initial_delay: None,
                period: 2,
                timeout: Some(2),
                failures: 3,
            },
        )),
        liveness_probe: Some(http_probe(
            "/healthz",
            "api",
            Patience {
                initial_delay: Some(10),
                period: 10,
                timeout: Some(5),
                failures: 6,
            },
        )),
        volume_mounts: Some(vec![
            mount("data", DATA_DIR, false),
            mount("secret", SECRET_DIR, true),
            mount("tmp", "/tmp", false),
        ]),
        // SQLite puts temporary files for large sorts and VACUUM INTO here.
        env: Some(vec![EnvVar {
            name: "SQLITE_TMPDIR".into(),
            value: Some("/tmp".into()),
            ..EnvVar::default()
        }]),
        resources: replica
            .spec
            .resources
            .as_ref()
            .map(|r| ResourceRequirements {
                requests: quantities(&r.requests),
                limits: quantities(&r.limits),
                ..ResourceRequirements::default()
            }),
        ..product_container("replica", image, &args)
    };
    let (node_selector, affinity) = placement(site);
    let pod = PodSpec {
        termination_grace_period_seconds: Some(30),
        enable_service_links: Some(false),
        security_context: Some(pod_security(Some(RUN_AS))),
        containers: vec![container],
        volumes: Some(vec![
            secret_volume("secret", &secret_name(&replica.spec.family)),
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("1Gi".into())),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        node_selector,
        affinity,
        ..PodSpec::default()
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(
                    [(
                        "storage".to_string(),
                        Quantity(replica.spec.storage.clone()),
                    )]
                    .into(),
                ),
                ..VolumeResourceRequirements::default()
            }),
            storage_class_name: site.spec.storage_class_name.clone(),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    StatefulSet {
        metadata: meta(&name, replica, labels.clone()),
        spec: StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(name.clone()),
            pod_management_policy: Some("OrderedReady".into()),
            selector: LabelSelector {
                match_labels: Some(replica_selector(replica)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// The headless Service in front of `replica`'s pod (stable DNS for its peers).
pub fn service(replica: &Replica) -> Service {
    let name = replica.metadata.name.clone().unwrap_or_default();
    Service {
        metadata: meta(&name, replica, replica_labels(replica)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(replica_selector(replica)),
            ports: Some(service_port("api", API_PORT)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// An Opaque Secret owned by `family`, holding `key` = `value`.
fn owned_secret(
    family: &ReplicaFamily,
    name: &str,
    labels: Labels,
    key: &str,
    value: &str,
) -> Secret {
    Secret {
        metadata: meta(name, family, labels),
        type_: Some("Opaque".into()),
        string_data: Some([(key.to_string(), value.to_string())].into()),
        ..Secret::default()
    }
}

/// The family Secret holding `value` (hex), owned by the family so it goes with it.
pub fn family_secret(family: &ReplicaFamily, value: &str) -> Secret {
    let name = family.metadata.name.clone().unwrap_or_default();
    let mut labels = family_labels(&name);
    labels.insert("app.kubernetes.io/part-of".into(), name.clone());
    owned_secret(family, &secret_name(&name), labels, SECRET_KEY, value)
}

/// The port of a client tier's page and API, named `http`.
pub const CLIENT_PORT: u16 = 8080;

/// The name of a client tier's Deployment and Service.
pub fn tier_name(family: &str, tier: &str) -> String {
    format!("{family}-{tier}")
}

/// The labels of a client tier's objects (and its pods' selector, without the release).
fn tier_labels(family: &str, tier: &str) -> Labels {
    labels(&[
        ("app.kubernetes.io/name", "multisite-client"),
        ("app.kubernetes.io/instance", &tier_name(family, tier)),
        (COMPONENT_LABEL, "client"),
        ("app.kubernetes.io/part-of", family),
        ("app.kubernetes.io/managed-by", "multisite-operator"),
        ("multisite.dev/family", family),
        ("multisite.dev/tier", tier),
    ])
}

/// A Deployment of one container named `container` running `args`, serving `http`.
struct Workload<'a> {
    name: &'a str,
    app: &'a str,
    labels: Labels,
    replicas: i32,
    recreate: bool,
    container: Container,
    volumes: Vec<Volume>,
}

fn deployment(family: &ReplicaFamily, workload: Workload<'_>) -> Deployment {
    Deployment {
        metadata: meta(workload.name, family, workload.labels.clone()),
        spec: DeploymentSpec {
            replicas: Some(workload.replicas),
            strategy: workload.recreate.then(|| DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }),
            selector: LabelSelector {
                match_labels: Some(instance_selector(workload.app, workload.name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(workload.labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    enable_service_links: Some(false),
                    security_context: Some(pod_security(None)),
                    containers: vec![workload.container],
                    volumes: Some(workload.volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

/// The Service in front of a family workload's `http` port.
fn workload_service(family: &ReplicaFamily, name: &str, app: &str, labels: Labels) -> Service {
    Service {
        metadata: meta(name, family, labels),
        spec: Some(ServiceSpec {
            selector: Some(instance_selector(app, name)),
            ports: Some(service_port("http", 80)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Deployment of client tier `tier` at `release`, using replica `replica`.
pub fn client_deployment(
    family: &ReplicaFamily,
    tier: &multisite_core::api::ClientTier,
    release: &str,
    replica: &str,
    image: &Image,
) -> Deployment {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    let namespace = family.metadata.namespace.clone().unwrap_or_default();
    let name = tier_name(&family_name, &tier.name);
    let mut labels = tier_labels(&family_name, &tier.name);
    labels.insert("multisite.dev/release".into(), release.to_string());
    let replica_url = format!("http://{replica}.{namespace}.svc:{API_PORT}");
    let args = [
        "client",
        &format!("--replica={replica_url}"),
        &format!("--release={release}"),
        &format!("--family={family_name}"),
        &format!("--tier={}", tier.name),
        &format!("--listen=0.0.0.0:{CLIENT_PORT}"),
        &format!("--secret-file={SECRET_DIR}/{SECRET_KEY}"),
    ];
    let container = Container {
        ports: Some(container_port("http", CLIENT_PORT)),
        readiness_probe: Some(http_probe(
            "/readyz",
            "http",
            Patience {
                initial_delay: None,
                period: 2,
                timeout: Some(5),
                failures: 2,
            },
        )),
        liveness_probe: Some(http_probe(
            "/healthz",
            "http",
            Patience {
                initial_delay: None,
                period: 10,
                timeout: Some(5),
                failures: 6,
            },
        )),
        volume_mounts: Some(vec![mount("secret", SECRET_DIR, true)]),
        ..product_container("client", image, &args)
    };
    deployment(
        family,
        Workload {
            name: &name,
            app: "multisite-client",
            labels,
            replicas: tier.replicas,
            recreate: false,
            container,
            volumes: vec![secret_volume("secret", &secret_name(&family_name))],
        },
    )
}

/// The Service in front of a client tier's pods.
pub fn client_service(family: &ReplicaFamily, tier: &str) -> Service {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    workload_service(
        family,
        &tier_name(&family_name, tier),
        "multisite-client",
        tier_labels(&family_name, tier),
    )
}

/// The name of a family's gateway Deployment, Service and token Secret.
pub fn gateway_name(family: &str) -> String {
    format!("{family}-gateway")
}

/// The key of the gateway Secret holding the token the outside system presents.
pub const GATEWAY_TOKEN_KEY: &str = "token";
/// Where the gateway pod finds that token.
const GATEWAY_TOKEN_DIR: &str = "/etc/multisite/gateway";

/// The family's gateway: one pod (recreated, never two at once), pinned to `replica`.
pub fn gateway_deployment(
    family: &ReplicaFamily,
    replica: &str,
    endpoint: &str,
    image: &Image,
) -> Deployment {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    let namespace = family.metadata.namespace.clone().unwrap_or_default();
    let name = gateway_name(&family_name);
    let labels = labels(&[
        ("app.kubernetes.io/name", "multisite-gateway"),
        ("app.kubernetes.io/instance", &name),
        (COMPONENT_LABEL, "gateway"),
        ("app.kubernetes.io/part-of", &family_name),
        ("app.kubernetes.io/managed-by", "multisite-operator"),
        ("multisite.dev/family", &family_name),
        ("multisite.dev/replica", replica),
    ]);
    let args = [
        "gateway",
        "serve",
        &format!("--replica=http://{replica}.{namespace}.svc:{API_PORT}"),
        &format!("--replica-name={replica}"),
        &format!("--endpoint={endpoint}"),
        &format!("--listen=0.0.0.0:{CLIENT_PORT}"),
        &format!("--secret-file={SECRET_DIR}/{SECRET_KEY}"),
        &format!("--token-file={GATEWAY_TOKEN_DIR}/{GATEWAY_TOKEN_KEY}"),
    ];
    let container = Container {
        env: Some(vec![EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(container_port("http", CLIENT_PORT)),
        readiness_probe: Some(http_probe(
            "/readyz",
            "http",
            Patience {
                initial_delay: None,
                period: 2,
                timeout: None,
                failures: 3,
            },
        )),
        liveness_probe: Some(http_probe(
            "/healthz",
            "http",
            Patience {
                initial_delay: None,
                period: 10,
                timeout: None,
                failures: 6,
            },
        )),
        volume_mounts: Some(vec![
            mount("secret", SECRET_DIR, true),
            mount("token", GATEWAY_TOKEN_DIR, true),
        ]),
        ..product_container("gateway", image, &args)
    };
    deployment(
        family,
        Workload {
            name: &name,
            app: "multisite-gateway",
            labels,
            replicas: 1,
            recreate: true,
            container,
            volumes: vec![
                secret_volume("secret", &secret_name(&family_name)),
                secret_volume("token", &name),
            ],
        },
    )
}

/// The Service in front of the gateway (the outside system's updates come in here).
pub fn gateway_service(family: &ReplicaFamily) -> Service {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    let name = gateway_name(&family_name);
    workload_service(
        family,
        &name,
        "multisite-gateway",
        family_labels(&family_name),
    )
}

/// The Secret with the token outside systems present to the gateway.
pub fn gateway_token_secret(family: &ReplicaFamily, token: &str) -> Secret {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    owned_secret(
        family,
        &gateway_name(&family_name),
        family_labels(&family_name),
        GATEWAY_TOKEN_KEY,
        token,
    )
}

/// `object` with a digest of itself in the [`APPLIED`] annotation. The digest leaves the
/// object's annotations out (none of the builders sets any, and it must not cover
/// itself). An object that cannot be encoded gets no digest, so it is always applied.
pub fn stamped<K: Resource + serde::Serialize>(mut object: K) -> K {
    let annotations = object.meta_mut().annotations.take();
    let encoded = serde_json::to_vec(&object);
    object.meta_mut().annotations = annotations;
    let Ok(bytes) = encoded else {
        return object;
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    // 16 bytes tell two builds of an object apart; the rest only lengthens the annotation.
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED.into(), hex);
    object
}

/// Whether `observed` (from a cache) is what applying `desired` (stamped) would leave:
/// it exists, is not going away, carries the same digest, and still has the labels and
/// owner references the operator gives it (others may add their own).
pub fn unchanged<K: Resource>(desired: &K, observed: Option<&K>) -> bool {
    let digest = |o: &K| o.meta().annotations.as_ref()?.get(APPLIED).cloned();
    let Some(observed) = observed else {
        return false;
    };
    let (want, have) = (desired.meta(), observed.meta());
    let labels_kept = want.labels.iter().flatten().all(|(k, v)| {
        have.labels
            .as_ref()
            .is_some_and(|labels| labels.get(k) == Some(v))
    });
    let owners_kept = want
        .owner_references
        .iter()
        .flatten()
        .all(|o| have.owner_references.iter().flatten().any(|h| h == o));
    have.deletion_timestamp.is_none()
        && digest(observed).is_some()
        && digest(observed) == digest(desired)
        && labels_kept
        && owners_kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use multisite_core::api::ReplicaFamilySpec;
    use multisite_core::api::ReplicaSpec;
    use multisite_core::api::SiteSpec;

    fn replica() -> Replica {
        let mut r = Replica::new(
            "sampl-tokyo",
            ReplicaSpec {
                family: "sampl".into(),
                site: "tokyo".into(),
                storage: "5Gi".into(),
                bootstrap_from: None,
                resources: None,
            },
        );
        r.metadata.namespace = Some("tracker".into());
        r.metadata.uid = Some("uid-1".into());
        r
    }

    fn family() -> ReplicaFamily {
        let mut family = ReplicaFamily::new("sampl", ReplicaFamilySpec::new("SAMPL", 7));
        family.metadata.namespace = Some("tracker".into());
        family.metadata.uid = Some("uid-2".into());
        family
    }

    fn image() -> Image {
        Image {
            reference: "ghcr.io/multisite/multisite:0.1.0".into(),
            pull_policy: "IfNotPresent".into(),
        }
    }

    /// The selector must match the template's labels, or the API server refuses it.
    fn selector_matches(selector: &LabelSelector, template: &PodTemplateSpec) {
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("labels");
        for (k, v) in selector.match_labels.clone().expect("match labels") {
            assert_eq!(labels.get(&k), Some(&v), "{k}");
        }
    }

    /// Every container runs as the product's user, unprivileged, read-only.
    fn hardened(pod: &PodSpec) {
        let security = pod.security_context.as_ref().expect("pod security");
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.run_as_user, Some(RUN_AS));
        for container in &pod.containers {
            let c = container
                .security_context
                .as_ref()
                .expect("container security");
            assert_eq!(c.allow_privilege_escalation, Some(false));
            assert_eq!(c.read_only_root_filesystem, Some(true));
        }
    }

    #[test]
    fn statefulset_is_a_valid_one_pod_set_owned_by_the_replica() {
        let site = Site::new(
            "tokyo",
            SiteSpec {
                zone: Some("asia-northeast1-a".into()),
                storage_class_name: Some("fast".into()),
                node_selector: [("disk".to_string(), "ssd".to_string())].into(),
            },
        );
        let sts = statefulset(&replica(), &site, &image());
        // What the API server receives: the kind and version the apply needs.
        let wire = serde_json::to_value(&sts).expect("JSON");
        assert_eq!(
            (wire["apiVersion"].as_str(), wire["kind"].as_str()),
            (Some("apps/v1"), Some("StatefulSet"))
        );
        let spec = &sts.spec;
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.service_name.as_deref(), Some("sampl-tokyo"));
        let owners = sts.metadata.owner_references.clone().expect("owner");
        assert_eq!(owners[0].kind, "Replica");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(sts.metadata.namespace.as_deref(), Some("tracker"));
        let pod = spec.template.spec.clone().expect("pod spec");
        hardened(&pod);
        assert_eq!(
            pod.security_context.as_ref().and_then(|s| s.fs_group),
            Some(RUN_AS)
        );
        let container = &pod.containers[0];
        let args = container.args.clone().expect("args");
        for wanted in [
            "--await-bootstrap",
            "--family=sampl",
            "--replica=sampl-tokyo",
            "--listen=0.0.0.0:7400",
            "--data=/var/lib/multisite",
            "--secret-file=/etc/multisite/secret/secret",
        ] {
            assert!(
                args.iter().any(|a| a == wanted),
                "{wanted} missing from {args:?}"
            );
        }
        assert_eq!(
            container.ports.as_ref().expect("ports")[0].name.as_deref(),
            Some("api")
        );
        let readiness = container.readiness_probe.as_ref().expect("readiness");
        assert_eq!(
            readiness
                .http_get
                .as_ref()
                .map(|g| (g.path.as_deref(), g.port.clone())),
            Some((Some("/readyz"), IntOrString::String("api".into())))
        );
        assert!(container.liveness_probe.is_some());
        assert_eq!(pod.node_selector.clone().expect("selector")["disk"], "ssd");
        let zone = pod
            .affinity
            .and_then(|a| a.node_affinity)
            .and_then(|n| n.required_during_scheduling_ignored_during_execution)
            .and_then(|s| s.node_selector_terms[0].match_expressions.clone())
            .expect("a zone requirement");
        assert_eq!(zone[0].values, Some(vec!["asia-northeast1-a".to_string()]));
        let claims = spec.volume_claim_templates.clone().expect("claims");
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        let claim = claims[0].spec.clone().expect("claim spec");
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim.resources.and_then(|r| r.requests).expect("requests")["storage"],
            Quantity("5Gi".into())
        );
        selector_matches(&spec.selector, &spec.template);
    }

    #[test]
    fn a_site_without_placement_adds_none() {
        let sts = statefulset(
            &replica(),
            &Site::new("tokyo", SiteSpec::default()),
            &image(),
        );
        let pod = sts.spec.template.spec.expect("pod");
        assert!(pod.affinity.is_none() && pod.node_selector.is_none());
        let claim = sts.spec.volume_claim_templates.expect("claims")[0]
            .spec
            .clone()
            .expect("claim spec");
        assert!(claim.storage_class_name.is_none());
        // Nothing unset reaches the API server as an empty value.
        let wire = serde_json::to_value(statefulset(
            &replica(),
            &Site::new("tokyo", SiteSpec::default()),
            &image(),
        ))
        .expect("JSON");
        let pod = &wire["spec"]["template"]["spec"];
        assert!(pod.get("affinity").is_none() && pod.get("nodeSelector").is_none());
        assert!(pod["containers"][0].get("resources").is_none());
    }

    #[test]
    fn resources_are_passed_as_quantities() {
        let mut r = replica();
        r.spec.resources = Some(multisite_core::api::ReplicaResources {
            requests: [("cpu".to_string(), "250m".to_string())].into(),
            limits: BTreeMap::new(),
        });
        let sts = statefulset(&r, &Site::new("tokyo", SiteSpec::default()), &image());
        let resources = sts.spec.template.spec.expect("pod").containers[0]
            .resources
            .clone()
            .expect("resources");
        assert_eq!(
            resources.requests.expect("requests")["cpu"],
            Quantity("250m".into())
        );
        assert!(resources.limits.is_none());
    }

    #[test]
    fn service_and_secret_are_valid_and_owned() {
        let svc = service(&replica());
        assert_eq!(svc.spec.expect("spec").cluster_ip.as_deref(), Some("None"));
        let secret = family_secret(&family(), "abcd");
        assert_eq!(secret.metadata.name.as_deref(), Some("sampl-secret"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("tracker"));
        assert_eq!(secret.string_data.expect("data")["secret"], "abcd");
        assert_eq!(
            secret.metadata.owner_references.expect("owner")[0].kind,
            "ReplicaFamily"
        );
    }

    #[test]
    fn client_tier_and_gateway_are_owned_hardened_and_selectable() {
        let family = family();
        let tier = multisite_core::api::ClientTier {
            name: "web".into(),
            release: "8.0.1.1".into(),
            replicas: 2,
            site: None,
        };
        let client = client_deployment(&family, &tier, "8.0.1.1", "sampl-tokyo", &image());
        assert_eq!(client.metadata.name.as_deref(), Some("sampl-web"));
        assert_eq!(client.spec.replicas, Some(2));
        selector_matches(&client.spec.selector, &client.spec.template);
        let pod = client.spec.template.spec.clone().expect("pod");
        hardened(&pod);
        let args = pod.containers[0].args.clone().expect("args");
        assert!(
            args.contains(&"--replica=http://sampl-tokyo.tracker.svc:7400".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"--release=8.0.1.1".to_string()), "{args:?}");
        let svc = client_service(&family, "web").spec.expect("spec");
        assert_eq!(svc.ports.expect("ports")[0].port, 80);
        let labels = client
            .spec
            .template
            .metadata
            .and_then(|m| m.labels)
            .expect("labels");
        for (k, v) in svc.selector.expect("selector") {
            assert_eq!(labels.get(&k), Some(&v), "{k}");
        }

        let gateway =
            gateway_deployment(&family, "sampl-tokyo", "https://x.example/events", &image());
        assert_eq!(
            gateway
                .spec
                .strategy
                .as_ref()
                .and_then(|s| s.type_.as_deref()),
            Some("Recreate")
        );
        selector_matches(&gateway.spec.selector, &gateway.spec.template);
        let pod = gateway.spec.template.spec.clone().expect("pod");
        hardened(&pod);
        let volumes: Vec<Option<String>> = pod
            .volumes
            .expect("volumes")
            .into_iter()
            .map(|v| v.secret.and_then(|s| s.secret_name))
            .collect();
        assert_eq!(
            volumes,
            [
                Some("sampl-secret".to_string()),
                Some("sampl-gateway".to_string())
            ]
        );
        let token = gateway_token_secret(&family, "t");
        assert_eq!(token.metadata.name.as_deref(), Some("sampl-gateway"));
        assert_eq!(token.string_data.expect("data")[GATEWAY_TOKEN_KEY], "t");
        assert_eq!(
            gateway_service(&family)
                .metadata
                .owner_references
                .expect("owner")[0]
                .kind,
            "ReplicaFamily"
        );
    }
}
