//! The resources served from the start, and the discovery documents (`/api`, `/apis`, the
//! per group/version resource lists) built from them and from the registered CRDs.

use crate::objects::{GenerationPolicy, ResourceInfo, ResourceKey, Store};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// What discovery tells of a resource beyond what the store keeps.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
}

/// One built-in resource: group, version, plural, kind, namespaced, status subresource,
/// generation, short names.
struct Builtin {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    generation: GenerationPolicy,
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status: true,
        generation: GenerationPolicy::None,
        short_names: &["ns"],
        categories: &[],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        status: true,
        generation: GenerationPolicy::Spec,
        short_names: &["po"],
        categories: &["all"],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        status: true,
        generation: GenerationPolicy::None,
        short_names: &["svc"],
        categories: &["all"],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        status: false,
        generation: GenerationPolicy::None,
        short_names: &["cm"],
        categories: &[],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        status: false,
        generation: GenerationPolicy::None,
        short_names: &[],
        categories: &[],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        generation: GenerationPolicy::None,
        short_names: &["ev"],
        categories: &[],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "persistentvolumeclaims",
        kind: "PersistentVolumeClaim",
        namespaced: true,
        status: true,
        generation: GenerationPolicy::None,
        short_names: &["pvc"],
        categories: &[],
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "statefulsets",
        kind: "StatefulSet",
        namespaced: true,
        status: true,
        generation: GenerationPolicy::Spec,
        short_names: &["sts"],
        categories: &["all"],
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "deployments",
        kind: "Deployment",
        namespaced: true,
        status: true,
        generation: GenerationPolicy::Spec,
        short_names: &["deploy"],
        categories: &["all"],
    },
    Builtin {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status: false,
        generation: GenerationPolicy::None,
        short_names: &[],
        categories: &[],
    },
    Builtin {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        generation: GenerationPolicy::None,
        short_names: &["ev"],
        categories: &[],
    },
    Builtin {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        kind: "CustomResourceDefinition",
        namespaced: false,
        status: true,
        generation: GenerationPolicy::Content,
        short_names: &["crd", "crds"],
        categories: &["api-extensions"],
    },
];

/// The key of the CRD resource.
pub fn crd_resource() -> ResourceKey {
    ResourceKey::new("apiextensions.k8s.io", "v1", "customresourcedefinitions")
}

/// The key of the namespaces resource.
pub fn namespaces_resource() -> ResourceKey {
    ResourceKey::new("", "v1", "namespaces")
}

/// Registers every built-in resource in `store`.
pub fn register_builtins(store: &mut Store) {
    for b in BUILTINS {
        let mut info = ResourceInfo::new(b.kind, b.namespaced).with_generation(b.generation);
        if b.status {
            info = info.with_status_subresource();
        }
        if b.plural == "namespaces" {
            info = info.with_name_rule(crate::names::NameRule::Label);
        }
        info = info.with_selectable_fields(selectable_fields(b.group, b.plural));
        store.register(ResourceKey::new(b.group, b.version, b.plural), info);
    }
}

/// The fields a built-in kind offers to field selectors besides `metadata.name` and
/// `metadata.namespace`, as the real server's (`kubectl describe` lists a pod's Events by
/// `involvedObject.*`, a node's pods by `spec.nodeName`).
fn selectable_fields(group: &str, plural: &str) -> &'static [&'static str] {
    match (group, plural) {
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "type",
        ],
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
        ],
        _ => &[],
    }
}

/// Discovery names of every resource served now: built-ins from the table, custom
/// resources from their CRDs.
pub fn names(store: &Store) -> BTreeMap<ResourceKey, Names> {
    let mut all = BTreeMap::new();
    for b in BUILTINS {
        all.insert(
            ResourceKey::new(b.group, b.version, b.plural),
            Names {
                singular: b.kind.to_ascii_lowercase(),
                short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
                categories: b.categories.iter().map(|s| s.to_string()).collect(),
            },
        );
    }
    for crd in super::crd::stored_crds(store) {
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or_default();
        let names = &spec["names"];
        let plural = names["plural"].as_str().unwrap_or_default();
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let singular = names["singular"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                names["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_ascii_lowercase()
            });
        for version in spec["versions"].as_array().into_iter().flatten() {
            let Some(v) = version["name"].as_str() else {
                continue;
            };
            all.insert(
                ResourceKey::new(group, v, plural),
                Names {
                    singular: singular.clone(),
                    short_names: strings(&names["shortNames"]),
                    categories: strings(&names["categories"]),
                },
            );
        }
    }
    all
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

/// `/api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    })
}

/// `/apis`: every group but the core one, each with its versions (the first registered
/// one preferred).
pub fn group_list(store: &Store) -> Value {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, _) in store.resources() {
        if key.group.is_empty() {
            continue;
        }
        let versions = groups.entry(key.group.as_str()).or_default();
        if !versions.contains(&key.version.as_str()) {
            versions.push(key.version.as_str());
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| group_json(group, &versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group_json(group: &str, versions: &[&str]) -> Value {
    let list: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = list.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": list, "preferredVersion": preferred})
}

/// `/apis/{group}`, or `None` when nothing of the group is served.
pub fn group(store: &Store, group: &str) -> Option<Value> {
    let mut versions: Vec<&str> = Vec::new();
    for (key, _) in store.resources() {
        if key.group == group && !versions.contains(&key.version.as_str()) {
            versions.push(key.version.as_str());
        }
    }
    if versions.is_empty() {
        return None;
    }
    let mut answer = group_json(group, &versions);
    answer["kind"] = json!("APIGroup");
    answer["apiVersion"] = json!("v1");
    Some(answer)
}

/// What the real server puts in `storageVersionHash`: the first 8 bytes of the SHA-256
/// of `group/version/kind` of the storage version (here the version served), in base64.
pub fn storage_version_hash(group: &str, version: &str, kind: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{group}/{version}/{kind}").as_bytes(),
    );
    let bytes = digest.as_ref()[..8].to_vec();
    serde_json::to_value(k8s_openapi::ByteString(bytes))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The APIResourceList of one group/version, or `None` when it serves nothing.
pub fn resource_list(store: &Store, group: &str, version: &str) -> Option<Value> {
    let names = names(store);
    let mut resources = Vec::new();
    for (key, info) in store.resources() {
        if key.group != group || key.version != version {
            continue;
        }
        let extra = names.get(key).cloned().unwrap_or_default();
        let mut entry = json!({
            "name": key.plural,
            "singularName": extra.singular,
            "namespaced": info.namespaced,
            "kind": info.kind,
            "verbs": VERBS,
            "storageVersionHash": storage_version_hash(group, version, &info.kind),
        });
        if !extra.short_names.is_empty() {
            entry["shortNames"] = json!(extra.short_names);
        }
        if !extra.categories.is_empty() {
            entry["categories"] = json!(extra.categories);
        }
        resources.push(entry);
        if key.group == "apps" && matches!(key.plural.as_str(), "statefulsets" | "deployments") {
            resources.push(json!({
                "name": format!("{}/scale", key.plural),
                "singularName": "",
                "namespaced": true,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": STATUS_VERBS,
            }));
        }
        if info.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", key.plural),
                "singularName": "",
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// The content type of aggregated discovery (v2) answers.
pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether the client asks for aggregated discovery v2 before anything else.
pub fn aggregated_wanted(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| {
        first.contains("as=APIGroupDiscoveryList")
            && first.contains("g=apidiscovery.k8s.io")
            && first.split(';').any(|p| p.trim() == "v=v2")
    })
}

/// A version and the discovery entries of its resources.
type VersionResources = (String, Vec<Value>);

/// Aggregated discovery (`APIGroupDiscoveryList`, v2): of the core group (`core`) or of
/// every other group, with their resources in one document.
pub fn aggregated(store: &Store, core: bool) -> Value {
    let names = names(store);
    let mut groups: Vec<(String, Vec<VersionResources>)> = Vec::new();
    for (key, info) in store.resources() {
        if key.group.is_empty() != core {
            continue;
        }
        let extra = names.get(key).cloned().unwrap_or_default();
        let kind = json!({"group": key.group, "version": key.version, "kind": info.kind});
        let mut resource = json!({
            "resource": key.plural,
            "responseKind": kind,
            "scope": if info.namespaced { "Namespaced" } else { "Cluster" },
            "singularResource": extra.singular,
            "verbs": VERBS,
        });
        if !extra.short_names.is_empty() {
            resource["shortNames"] = json!(extra.short_names);
        }
        if !extra.categories.is_empty() {
            resource["categories"] = json!(extra.categories);
        }
        let mut subresources = Vec::new();
        if info.status_subresource {
            subresources.push(
                json!({"subresource": "status", "responseKind": kind, "verbs": STATUS_VERBS}),
            );
        }
        if key.group == "apps" && matches!(key.plural.as_str(), "statefulsets" | "deployments") {
            subresources.push(json!({"subresource": "scale",
                "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                "verbs": STATUS_VERBS}));
        }
        if !subresources.is_empty() {
            resource["subresources"] = json!(subresources);
        }
        let group = match groups.iter_mut().find(|(g, _)| *g == key.group) {
            Some(group) => group,
            None => {
                groups.push((key.group.clone(), Vec::new()));
                let last = groups.len() - 1;
                &mut groups[last]
            }
        };
        match group.1.iter_mut().find(|(v, _)| *v == key.version) {
            Some((_, resources)) => resources.push(resource),
            None => group.1.push((key.version.clone(), vec![resource])),
        }
    }
    let items: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .into_iter()
                .map(|(version, resources)| {
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            let mut metadata = json!({});
            if !group.is_empty() {
                metadata["name"] = json!(group);
            }
            json!({"metadata": metadata, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}
