//! The StatefulSet and Deployment controllers: pure passes over the store.

use super::WorkloadError;
use super::util::{
    at, canonical_json, claims, controlled_by, deleting, deployments, format_time, list_all,
    name_of, namespace_of, pod_ready, pods, stateful_sets, text, uid_of, write_status,
};
use crate::names;
use crate::objects::{DeleteOptions, ListOptions, ResourceKey, Store, WriteOptions};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

/// The letters of hashes in names, as Kubernetes' `SafeEncodeString` uses.
const HASH_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A short name-safe hash of a pod template (FNV-1a over its canonical JSON), like the
/// `pod-template-hash` and `controller-revision-hash` labels.
pub fn template_hash(template: &Value) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in canonical_json(template).bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let mut out = String::new();
    let base = HASH_ALPHABET.len() as u32;
    loop {
        out.push(char::from(HASH_ALPHABET[(hash % base) as usize]));
        hash /= base;
        if hash == 0 {
            return out;
        }
    }
}

/// One pass of both controllers; returns what failed (each object is tried on its own).
pub fn reconcile_controllers(store: &mut Store, now: Timestamp) -> Vec<WorkloadError> {
    let mut errors = Vec::new();
    if store.resource_info(&pods()).is_none() {
        return errors;
    }
    let all_pods = list_all(store, &pods());
    for set in list_all(store, &stateful_sets()) {
        if deleting(&set) {
            continue;
        }
        if let Err(e) = stateful_set(store, &set, &all_pods, now) {
            errors.push(e);
        }
    }
    for deployment in list_all(store, &deployments()) {
        if deleting(&deployment) {
            continue;
        }
        if let Err(e) = deployment_pass(store, &deployment, &all_pods, now) {
            errors.push(e);
        }
    }
    errors
}

fn replicas_of(object: &Value) -> i64 {
    at(object, &["spec", "replicas"])
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0)
}

fn owner_reference(owner: &Value, kind: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "name": name_of(owner),
        "uid": uid_of(owner),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// A pod from the owner's template: its labels and annotations, the owner reference.
fn pod_from_template(owner: &Value, kind: &str, extra_labels: &[(&str, String)]) -> Value {
    let template = at(owner, &["spec", "template"])
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut labels = at(&template, &["metadata", "labels"])
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for (key, value) in extra_labels {
        labels.insert((*key).to_string(), json!(value));
    }
    let mut metadata = Map::new();
    metadata.insert("labels".into(), Value::Object(labels));
    if let Some(annotations) = at(&template, &["metadata", "annotations"]) {
        metadata.insert("annotations".into(), annotations.clone());
    }
    metadata.insert(
        "ownerReferences".into(),
        json!([owner_reference(owner, kind)]),
    );
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    })
}

fn delete(
    store: &mut Store,
    resource: &ResourceKey,
    object: &Value,
    now: Timestamp,
) -> Result<(), WorkloadError> {
    store.delete(
        resource,
        namespace_of(object),
        name_of(object),
        &DeleteOptions::default(),
        now,
    )?;
    Ok(())
}

fn ordinal_of(set_name: &str, pod: &Value) -> Option<i64> {
    name_of(pod)
        .strip_prefix(set_name)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

fn stateful_set(
    store: &mut Store,
    set: &Value,
    all_pods: &[Value],
    now: Timestamp,
) -> Result<(), WorkloadError> {
    let (namespace, name, uid) = (namespace_of(set), name_of(set), uid_of(set));
    let replicas = replicas_of(set);
    let template = at(set, &["spec", "template"]).cloned().unwrap_or_default();
    let revision = format!("{name}-{}", template_hash(&template));
    let on_delete = text(set, &["spec", "updateStrategy", "type"]) == "OnDelete";
    let owned: Vec<&Value> = all_pods
        .iter()
        .filter(|p| namespace_of(p) == namespace && controlled_by(p, uid))
        .collect();
    let by_ordinal = |i: i64| {
        owned
            .iter()
            .find(|p| ordinal_of(name, p) == Some(i))
            .copied()
    };
    // OrderedReady: make or repair pods in ordinal order, each waiting for the one before.
    let mut all_ready = true;
    for i in 0..replicas {
        match by_ordinal(i) {
            None => {
                create_claims(store, set, i, now)?;
                let pod = stateful_pod(set, i, &revision);
                store.create(&pods(), namespace, pod, &WriteOptions::default(), now)?;
                all_ready = false;
                break;
            }
            Some(pod) if deleting(pod) => {
                all_ready = false;
                break;
            }
            Some(pod) if matches!(text(pod, &["status", "phase"]), "Failed" | "Succeeded") => {
                delete(store, &pods(), pod, now)?;
                all_ready = false;
                break;
            }
            Some(pod) if !pod_ready(pod) => {
                all_ready = false;
                break;
            }
            Some(_) => {}
        }
    }
    if all_ready {
        let condemned = owned
            .iter()
            .filter(|p| ordinal_of(name, p).is_none_or(|i| i >= replicas))
            .max_by_key(|p| ordinal_of(name, p));
        if owned
            .iter()
            .any(|p| deleting(p) && ordinal_of(name, p).is_none_or(|i| i >= replicas))
        {
            // Scale down one pod at a time, as OrderedReady does.
        } else if let Some(pod) = condemned {
            delete(store, &pods(), pod, now)?;
        } else if !on_delete {
            // Rolling update: the highest outdated ordinal first, one at a time.
            let outdated = owned
                .iter()
                .filter(|p| {
                    text(p, &["metadata", "labels", "controller-revision-hash"]) != revision
                })
                .max_by_key(|p| ordinal_of(name, p));
            if let Some(pod) = outdated {
                delete(store, &pods(), pod, now)?;
            }
        }
    }
    // The status counts the pods as this pass left them.
    let after = owned_pods(store, namespace, uid);
    let live: Vec<&Value> = after.iter().filter(|p| !deleting(p)).collect();
    let ready = live.iter().filter(|p| pod_ready(p)).count();
    let current = live
        .iter()
        .filter(|p| text(p, &["metadata", "labels", "controller-revision-hash"]) == revision)
        .count();
    let mut status = json!({
        "observedGeneration": at(set, &["metadata", "generation"]).cloned().unwrap_or(json!(1)),
        "replicas": live.len(),
        "readyReplicas": ready,
        "currentReplicas": current,
        "updatedReplicas": current,
        "availableReplicas": ready,
        "currentRevision": revision,
        "updateRevision": revision,
        "collisionCount": 0,
    });
    if let Some(conditions) = at(set, &["status", "conditions"]) {
        status["conditions"] = conditions.clone();
    }
    write_status(store, &stateful_sets(), set, status)?;
    Ok(())
}

fn owned_pods(store: &Store, namespace: &str, uid: &str) -> Vec<Value> {
    store
        .list(&pods(), Some(namespace), &ListOptions::default())
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| controlled_by(p, uid))
        .collect()
}

fn stateful_pod(set: &Value, ordinal: i64, revision: &str) -> Value {
    let name = name_of(set);
    let pod_name = format!("{name}-{ordinal}");
    let mut pod = pod_from_template(
        set,
        "StatefulSet",
        &[
            ("statefulset.kubernetes.io/pod-name", pod_name.clone()),
            ("apps.kubernetes.io/pod-index", ordinal.to_string()),
            ("controller-revision-hash", revision.to_string()),
        ],
    );
    pod["metadata"]["name"] = json!(pod_name);
    pod["spec"]["hostname"] = json!(pod_name);
    let service = text(set, &["spec", "serviceName"]);
    if !service.is_empty() {
        pod["spec"]["subdomain"] = json!(service);
    }
    let templates = at(set, &["spec", "volumeClaimTemplates"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !templates.is_empty() {
        let mut volumes: Vec<Value> = pod["spec"]
            .get("volumes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for claim in &templates {
            let claim_name = name_of(claim);
            volumes.retain(|v| v.get("name").and_then(Value::as_str) != Some(claim_name));
            volumes.push(json!({
                "name": claim_name,
                "persistentVolumeClaim": {"claimName": format!("{claim_name}-{name}-{ordinal}")},
            }));
        }
        pod["spec"]["volumes"] = json!(volumes);
    }
    pod
}

/// The claims of one ordinal, `<claim>-<set>-<ordinal>`, made once and owned by nobody.
fn create_claims(
    store: &mut Store,
    set: &Value,
    ordinal: i64,
    now: Timestamp,
) -> Result<(), WorkloadError> {
    let (namespace, name) = (namespace_of(set), name_of(set));
    let templates = at(set, &["spec", "volumeClaimTemplates"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for template in templates {
        let claim_name = format!("{}-{name}-{ordinal}", name_of(&template));
        if store.get(&claims(), namespace, &claim_name).is_ok() {
            continue;
        }
        let mut labels = at(set, &["spec", "selector", "matchLabels"])
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        labels.insert(
            "statefulset.kubernetes.io/pod-name".into(),
            json!(format!("{name}-{ordinal}")),
        );
        let spec = template.get("spec").cloned().unwrap_or_else(|| json!({}));
        let claim = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim_name, "namespace": namespace, "labels": labels},
            "spec": spec,
        });
        let created = store.create(&claims(), namespace, claim, &WriteOptions::default(), now)?;
        let status = json!({
            "phase": "Bound",
            "accessModes": spec.get("accessModes").cloned().unwrap_or(json!(["ReadWriteOnce"])),
            "capacity": at(&spec, &["resources", "requests"]).cloned().unwrap_or(json!({})),
        });
        write_status(store, &claims(), &created, status)?;
    }
    Ok(())
}

fn deployment_pass(
    store: &mut Store,
    deployment: &Value,
    all_pods: &[Value],
    now: Timestamp,
) -> Result<(), WorkloadError> {
    let (namespace, name, uid) = (
        namespace_of(deployment),
        name_of(deployment),
        uid_of(deployment),
    );
    let replicas = usize::try_from(replicas_of(deployment)).unwrap_or(0);
    let template = at(deployment, &["spec", "template"])
        .cloned()
        .unwrap_or_default();
    let hash = template_hash(&template);
    let owned: Vec<&Value> = all_pods
        .iter()
        .filter(|p| namespace_of(p) == namespace && controlled_by(p, uid))
        .collect();
    let is_current = |p: &Value| text(p, &["metadata", "labels", "pod-template-hash"]) == hash;
    let old: Vec<&&Value> = owned.iter().filter(|p| !is_current(p)).collect();
    let mut current: Vec<&&Value> = owned
        .iter()
        .filter(|p| is_current(p) && !deleting(p))
        .collect();
    // Recreate: every old pod goes first; new ones come once they are gone.
    for pod in &old {
        if !deleting(pod) {
            delete(store, &pods(), pod, now)?;
        }
    }
    if old.is_empty() {
        // Failed or finished pods are replaced; extras go, the unready ones first.
        for pod in current
            .iter()
            .filter(|p| matches!(text(p, &["status", "phase"]), "Failed" | "Succeeded"))
        {
            delete(store, &pods(), pod, now)?;
        }
        current.retain(|p| !matches!(text(p, &["status", "phase"]), "Failed" | "Succeeded"));
        current.sort_by_key(|p| pod_ready(p));
        while current.len() > replicas {
            let pod = current.remove(0);
            delete(store, &pods(), pod, now)?;
        }
        for _ in current.len()..replicas {
            let mut pod = pod_from_template(
                deployment,
                "Deployment",
                &[("pod-template-hash", hash.clone())],
            );
            pod["metadata"]["name"] = json!(names::generate_name(&format!("{name}-{hash}-"))?);
            store.create(&pods(), namespace, pod, &WriteOptions::default(), now)?;
        }
    }
    // The status counts the pods as this pass left them.
    let after = owned_pods(store, namespace, uid);
    let live: Vec<&Value> = after.iter().filter(|p| !deleting(p)).collect();
    let old_left = after.iter().any(|p| !is_current(p));
    let current: Vec<&&Value> = live.iter().filter(|p| is_current(p)).collect();
    let (live, updated) = (live.len(), current.len());
    let ready = current.iter().filter(|p| pod_ready(p)).count();
    let generation = at(deployment, &["metadata", "generation"])
        .cloned()
        .unwrap_or(json!(1));
    let available = ready >= replicas;
    let complete = available && updated == replicas && !old_left;
    let previous = at(deployment, &["status", "conditions"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let conditions = vec![
        condition(
            &previous,
            "Available",
            available,
            if available {
                (
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.",
                )
            } else {
                (
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.",
                )
            },
            now,
        ),
        condition(
            &previous,
            "Progressing",
            true,
            if complete {
                ("NewReplicaSetAvailable", "The new pods are available.")
            } else {
                (
                    "ReplicaSetUpdated",
                    "The pods are being replaced or created.",
                )
            },
            now,
        ),
    ];
    let status = json!({
        "observedGeneration": generation,
        "replicas": live,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": replicas.saturating_sub(ready),
        "conditions": conditions,
    });
    write_status(store, &deployments(), deployment, status)?;
    Ok(())
}

/// A condition in the standard shape, keeping its times while nothing about it changes.
fn condition(
    previous: &[Value],
    kind: &str,
    status: bool,
    (reason, message): (&str, &str),
    now: Timestamp,
) -> Value {
    let status = if status { "True" } else { "False" };
    let before = previous
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind));
    let same = |field: &str, value: &str| {
        before.and_then(|c| c.get(field)).and_then(Value::as_str) == Some(value)
    };
    let time = format_time(now);
    let transition = match before {
        Some(c) if same("status", status) => c.get("lastTransitionTime").cloned(),
        _ => None,
    }
    .unwrap_or_else(|| json!(time));
    let update = match before {
        Some(c) if same("status", status) && same("reason", reason) => {
            c.get("lastUpdateTime").cloned()
        }
        _ => None,
    }
    .unwrap_or_else(|| json!(time));
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": update,
        "lastTransitionTime": transition,
    })
}
