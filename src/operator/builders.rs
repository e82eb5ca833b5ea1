//! The Kubernetes objects a resource owns, built as apply patches (pure: no I/O).
//!
//! A Replica owns a one-pod StatefulSet and a headless Service, both named after it, so
//! its pod is `<replica>-0` and its volume claim `data-<replica>-0`. A ReplicaFamily
//! owns the Secret `<family>-secret` holding the shared secret under the key `secret`.

use crate::api::Replica;
use crate::api::ReplicaFamily;
use crate::api::Site;
use kube::Resource;
use serde_json::{Value, json};

/// The port every replica serves its API on, named `api` in pods and Services.
pub const API_PORT: u16 = 7400;
/// Where a replica pod keeps its database (the volume claim `data`).
pub const DATA_DIR: &str = "/var/lib/multisite";
/// Where a replica pod finds the family secret; the file is `secret` inside.
pub const SECRET_DIR: &str = "/etc/multisite/secret";
/// The key of the family Secret that holds the shared secret.
pub const SECRET_KEY: &str = "secret";

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

/// The labels every object made for a replica carries (and its pod's selector).
pub fn replica_labels(replica: &Replica) -> Value {
    let name = replica.metadata.name.clone().unwrap_or_default();
    json!({
        "app.kubernetes.io/name": "multisite-replica",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "replica",
        "app.kubernetes.io/part-of": replica.spec.family,
        "app.kubernetes.io/managed-by": "multisite-operator",
        "multisite.dev/family": replica.spec.family,
        "multisite.dev/replica": name,
        "multisite.dev/site": replica.spec.site,
    })
}

fn selector(replica: &Replica) -> Value {
    json!({
        "app.kubernetes.io/name": "multisite-replica",
        "app.kubernetes.io/instance": replica.metadata.name.clone().unwrap_or_default(),
    })
}

fn owner<K: Resource<DynamicType = ()>>(object: &K) -> Value {
    match object.controller_owner_ref(&()) {
        Some(reference) => json!([reference]),
        None => json!([]),
    }
}

/// The StatefulSet that runs `replica`'s server, placed by its `site`.
pub fn statefulset(replica: &Replica, site: &Site, image: &Image) -> Value {
    let name = replica.metadata.name.clone().unwrap_or_default();
    let labels = replica_labels(replica);
    let mut pod_spec = json!({
        "terminationGracePeriodSeconds": 30,
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"}
        },
        "containers": [{
            "name": "replica",
            "image": image.reference,
            "imagePullPolicy": image.pull_policy,
            "args": [
                "replica", "serve",
                format!("--data={DATA_DIR}"),
                format!("--listen=0.0.0.0:{API_PORT}"),
                format!("--secret-file={SECRET_DIR}/{SECRET_KEY}"),
                "--await-bootstrap",
                format!("--family={}", replica.spec.family),
                format!("--replica={name}"),
                "--log-json",
            ],
            "ports": [{"name": "api", "containerPort": API_PORT, "protocol": "TCP"}],
            "readinessProbe": {
                "httpGet": {"path": "/readyz", "port": "api"},
                "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 3
            },
            "livenessProbe": {
                "httpGet": {"path": "/healthz", "port": "api"},
                "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 5,
                "failureThreshold": 6
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]}
            },
            "volumeMounts": [
                {"name": "data", "mountPath": DATA_DIR},
                {"name": "secret", "mountPath": SECRET_DIR, "readOnly": true},
                {"name": "tmp", "mountPath": "/tmp"}
            ],
            // SQLite puts temporary files for large sorts and VACUUM INTO here.
            "env": [{"name": "SQLITE_TMPDIR", "value": "/tmp"}]
        }],
        "volumes": [
            {
                "name": "secret",
                "secret": {"secretName": secret_name(&replica.spec.family), "defaultMode": 0o440}
            },
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}
        ]
    });
    if let Some(resources) = &replica.spec.resources {
        pod_spec["containers"][0]["resources"] = json!({
            "requests": resources.requests,
            "limits": resources.limits,
        });
    }
    if !site.spec.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(site.spec.node_selector);
    }
    if let Some(zone) = &site.spec.zone {
        pod_spec["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": [zone]}
            ]}]
        }}});
    }
    let mut claim_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": replica.spec.storage}}
    });
    if let Some(class) = &site.spec.storage_class_name {
        claim_spec["storageClassName"] = json!(class);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "namespace": replica.metadata.namespace,
            "labels": labels,
            "ownerReferences": owner(replica),
        },
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "podManagementPolicy": "OrderedReady",
            "selector": {"matchLabels": selector(replica)},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels},
                "spec": claim_spec
            }]
        }
    })
}

/// The headless Service in front of `replica`'s pod (stable DNS for its peers).
pub fn service(replica: &Replica) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": replica.metadata.name,
            "namespace": replica.metadata.namespace,
            "labels": replica_labels(replica),
            "ownerReferences": owner(replica),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": selector(replica),
            "ports": [{"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"}]
        }
    })
}

/// The family Secret holding `value` (hex), owned by the family so it goes with it.
pub fn family_secret(family: &ReplicaFamily, value: &str) -> Value {
    let name = family.metadata.name.clone().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(&name),
            "namespace": family.metadata.namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "multisite-operator",
                "app.kubernetes.io/part-of": name,
                "multisite.dev/family": name,
            },
            "ownerReferences": owner(family),
        },
        "stringData": {SECRET_KEY: value}
    })
}

/// The port of a client tier's page and API, named `http`.
pub const CLIENT_PORT: u16 = 8080;

/// The name of a client tier's Deployment and Service.
pub fn tier_name(family: &str, tier: &str) -> String {
    format!("{family}-{tier}")
}

/// The labels of a client tier's objects (and its pods' selector, without the release).
fn tier_labels(family: &str, tier: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "multisite-client",
        "app.kubernetes.io/instance": tier_name(family, tier),
        "app.kubernetes.io/component": "client",
        "app.kubernetes.io/part-of": family,
        "app.kubernetes.io/managed-by": "multisite-operator",
        "multisite.dev/family": family,
        "multisite.dev/tier": tier,
    })
}

/// The Deployment of client tier `tier` at `release`, using replica `replica`.
pub fn client_deployment(
    family: &ReplicaFamily,
    tier: &crate::api::ClientTier,
    release: &str,
    replica: &str,
    image: &Image,
) -> Value {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    let namespace = family.metadata.namespace.clone().unwrap_or_default();
    let mut labels = tier_labels(&family_name, &tier.name);
    labels["multisite.dev/release"] = json!(release);
    let replica_url = format!("http://{replica}.{namespace}.svc:{API_PORT}");
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": tier_name(&family_name, &tier.name),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": owner(family),
        },
        "spec": {
            "replicas": tier.replicas,
            "selector": {"matchLabels": {
                "app.kubernetes.io/name": "multisite-client",
                "app.kubernetes.io/instance": tier_name(&family_name, &tier.name),
            }},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "enableServiceLinks": false,
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    "containers": [{
                        "name": "client",
                        "image": image.reference,
                        "imagePullPolicy": image.pull_policy,
                        "args": [
                            "client",
                            format!("--replica={replica_url}"),
                            format!("--release={release}"),
                            format!("--family={family_name}"),
                            format!("--tier={}", tier.name),
                            format!("--listen=0.0.0.0:{CLIENT_PORT}"),
                            format!("--secret-file={SECRET_DIR}/{SECRET_KEY}"),
                        ],
                        "ports": [{"name": "http", "containerPort": CLIENT_PORT, "protocol": "TCP"}],
                        "readinessProbe": {
                            "httpGet": {"path": "/readyz", "port": "http"},
                            "periodSeconds": 2, "timeoutSeconds": 5, "failureThreshold": 2
                        },
                        "livenessProbe": {
                            "httpGet": {"path": "/healthz", "port": "http"},
                            "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}
                        },
                        "volumeMounts": [{"name": "secret", "mountPath": SECRET_DIR, "readOnly": true}]
                    }],
                    "volumes": [{
                        "name": "secret",
                        "secret": {"secretName": secret_name(&family_name), "defaultMode": 0o440}
                    }]
                }
            }
        }
    })
}

/// The Service in front of a client tier's pods.
pub fn client_service(family: &ReplicaFamily, tier: &str) -> Value {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": tier_name(&family_name, tier),
            "namespace": family.metadata.namespace,
            "labels": tier_labels(&family_name, tier),
            "ownerReferences": owner(family),
        },
        "spec": {
            "selector": {
                "app.kubernetes.io/name": "multisite-client",
                "app.kubernetes.io/instance": tier_name(&family_name, tier),
            },
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
        }
    })
}

/// The name of a family's gateway Deployment, Service and token Secret.
pub fn gateway_name(family: &str) -> String {
    format!("{family}-gateway")
}

/// The key of the gateway Secret holding the token the outside system presents.
pub const GATEWAY_TOKEN_KEY: &str = "token";

/// The family's gateway: one pod (recreated, never two at once), pinned to `replica`.
pub fn gateway_deployment(
    family: &ReplicaFamily,
    replica: &str,
    endpoint: &str,
    image: &Image,
) -> Value {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    let namespace = family.metadata.namespace.clone().unwrap_or_default();
    let name = gateway_name(&family_name);
    let labels = json!({
        "app.kubernetes.io/name": "multisite-gateway",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "gateway",
        "app.kubernetes.io/part-of": family_name,
        "app.kubernetes.io/managed-by": "multisite-operator",
        "multisite.dev/family": family_name,
        "multisite.dev/replica": replica,
    });
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": owner(family)},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app.kubernetes.io/name": "multisite-gateway", "app.kubernetes.io/instance": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "enableServiceLinks": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "gateway",
                        "image": image.reference,
                        "imagePullPolicy": image.pull_policy,
                        "args": [
                            "gateway",
                            "serve",
                            format!("--replica=http://{replica}.{namespace}.svc:{API_PORT}"),
                            format!("--replica-name={replica}"),
                            format!("--endpoint={endpoint}"),
                            format!("--listen=0.0.0.0:{CLIENT_PORT}"),
                            format!("--secret-file={SECRET_DIR}/{SECRET_KEY}"),
                            format!("--token-file=/etc/multisite/gateway/{GATEWAY_TOKEN_KEY}"),
                        ],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "http", "containerPort": CLIENT_PORT, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 2, "failureThreshold": 3},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "secret", "mountPath": SECRET_DIR, "readOnly": true},
                            {"name": "token", "mountPath": "/etc/multisite/gateway", "readOnly": true}
                        ]
                    }],
                    "volumes": [
                        {"name": "secret", "secret": {"secretName": secret_name(&family_name), "defaultMode": 0o440}},
                        {"name": "token", "secret": {"secretName": name, "defaultMode": 0o440}}
                    ]
                }
            }
        }
    })
}

/// The Service in front of the gateway (the outside system's updates come in here).
pub fn gateway_service(family: &ReplicaFamily) -> Value {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    let name = gateway_name(&family_name);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": family.metadata.namespace, "ownerReferences": owner(family),
            "labels": {"app.kubernetes.io/managed-by": "multisite-operator", "multisite.dev/family": family_name}},
        "spec": {
            "selector": {"app.kubernetes.io/name": "multisite-gateway", "app.kubernetes.io/instance": name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
        }
    })
}

/// The Secret with the token outside systems present to the gateway.
pub fn gateway_token_secret(family: &ReplicaFamily, token: &str) -> Value {
    let family_name = family.metadata.name.clone().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": gateway_name(&family_name), "namespace": family.metadata.namespace,
            "ownerReferences": owner(family),
            "labels": {"app.kubernetes.io/managed-by": "multisite-operator", "multisite.dev/family": family_name}},
        "stringData": {GATEWAY_TOKEN_KEY: token}
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ReplicaFamilySpec;
    use crate::api::ReplicaSpec;
    use crate::api::SiteSpec;
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{Secret, Service};

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

    fn image() -> Image {
        Image {
            reference: "ghcr.io/multisite/multisite:0.1.0".into(),
            pull_policy: "IfNotPresent".into(),
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
        let value = statefulset(&replica(), &site, &image());
        let sts: StatefulSet = serde_json::from_value(value.clone()).expect("a StatefulSet");
        let spec = sts.spec;
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.service_name.as_deref(), Some("sampl-tokyo"));
        let owners = sts.metadata.owner_references.expect("owner");
        assert_eq!(owners[0].kind, "Replica");
        assert_eq!(owners[0].controller, Some(true));
        let pod = spec.template.spec.expect("pod spec");
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
        assert!(container.readiness_probe.is_some() && container.liveness_probe.is_some());
        assert_eq!(pod.node_selector.expect("selector")["disk"], "ssd");
        assert_eq!(
            value["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0],
            "asia-northeast1-a"
        );
        let claims = spec.volume_claim_templates.expect("claims");
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        let claim = claims[0].spec.clone().expect("claim spec");
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            value["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
            "5Gi"
        );
        // The selector must match the template's labels, or the API server refuses it.
        let labels = spec
            .template
            .metadata
            .expect("meta")
            .labels
            .expect("labels");
        for (k, v) in spec.selector.match_labels.expect("match labels") {
            assert_eq!(labels.get(&k), Some(&v));
        }
    }

    #[test]
    fn a_site_without_placement_adds_none() {
        let value = statefulset(
            &replica(),
            &Site::new("tokyo", SiteSpec::default()),
            &image(),
        );
        let pod = &value["spec"]["template"]["spec"];
        assert!(pod.get("affinity").is_none() && pod.get("nodeSelector").is_none());
        assert!(
            value["spec"]["volumeClaimTemplates"][0]["spec"]
                .get("storageClassName")
                .is_none()
        );
    }

    #[test]
    fn service_and_secret_are_valid_and_owned() {
        let svc: Service = serde_json::from_value(service(&replica())).expect("a Service");
        assert_eq!(svc.spec.expect("spec").cluster_ip.as_deref(), Some("None"));
        let mut family = ReplicaFamily::new("sampl", ReplicaFamilySpec::new("SAMPL", 7));
        family.metadata.uid = Some("uid-2".into());
        let secret: Secret =
            serde_json::from_value(family_secret(&family, "abcd")).expect("a Secret");
        assert_eq!(secret.metadata.name.as_deref(), Some("sampl-secret"));
        assert_eq!(secret.string_data.expect("data")["secret"], "abcd");
        assert_eq!(
            secret.metadata.owner_references.expect("owner")[0].kind,
            "ReplicaFamily"
        );
    }
}
