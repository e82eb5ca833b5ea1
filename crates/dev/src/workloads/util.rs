//! Small helpers the controllers and the kubelet share.

use crate::objects::{ListOptions, ResourceKey, Store, WriteOptions};
use crate::status::Error;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

pub(super) fn pods() -> ResourceKey {
    ResourceKey::new("", "v1", "pods")
}

pub(super) fn claims() -> ResourceKey {
    ResourceKey::new("", "v1", "persistentvolumeclaims")
}

pub(super) fn stateful_sets() -> ResourceKey {
    ResourceKey::new("apps", "v1", "statefulsets")
}

pub(super) fn deployments() -> ResourceKey {
    ResourceKey::new("apps", "v1", "deployments")
}

/// Every object of `resource` in every namespace; none when it is not served.
pub(super) fn list_all(store: &Store, resource: &ResourceKey) -> Vec<Value> {
    store
        .list(resource, None, &ListOptions::default())
        .map(|l| l.items)
        .unwrap_or_default()
}

/// The string at a path of keys, or "".
pub(super) fn text<'a>(object: &'a Value, path: &[&str]) -> &'a str {
    at(object, path).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn at<'a>(object: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, key| v.get(key))
}

pub(super) fn name_of(object: &Value) -> &str {
    text(object, &["metadata", "name"])
}

pub(super) fn namespace_of(object: &Value) -> &str {
    text(object, &["metadata", "namespace"])
}

pub(super) fn uid_of(object: &Value) -> &str {
    text(object, &["metadata", "uid"])
}

pub(super) fn deleting(object: &Value) -> bool {
    !text(object, &["metadata", "deletionTimestamp"]).is_empty()
}

/// Whether `object` has a controller owner reference to `uid`.
pub(super) fn controlled_by(object: &Value, uid: &str) -> bool {
    at(object, &["metadata", "ownerReferences"])
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter().any(|r| {
                r.get("uid").and_then(Value::as_str) == Some(uid)
                    && r.get("controller").and_then(Value::as_bool) == Some(true)
            })
        })
}

/// A pod that is Running with condition Ready True.
pub(super) fn pod_ready(pod: &Value) -> bool {
    text(pod, &["status", "phase"]) == "Running"
        && at(pod, &["status", "conditions"])
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.get("type").and_then(Value::as_str) == Some("Ready")
                        && c.get("status").and_then(Value::as_str) == Some("True")
                })
            })
}

/// Replaces `.status` of a stored object: through the status subresource where the
/// resource has one, as a whole-object update otherwise. Writes nothing when unchanged.
pub(super) fn write_status(
    store: &mut Store,
    resource: &ResourceKey,
    object: &Value,
    status: Value,
) -> Result<(), Error> {
    if object.get("status") == Some(&status) {
        return Ok(());
    }
    let mut updated = object.clone();
    if let Some(map) = updated.as_object_mut() {
        map.insert("status".into(), status);
    }
    if let Some(meta) = updated.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    let subresource = store
        .resource_info(resource)
        .is_some_and(|i| i.status_subresource);
    let (namespace, name) = (namespace_of(object), name_of(object));
    let options = WriteOptions::default();
    if subresource {
        store.update_status(resource, namespace, name, updated, &options)?;
    } else {
        store.update(resource, namespace, name, updated, &options)?;
    }
    Ok(())
}

/// RFC 3339 at second precision, as `metav1.Time` is written.
pub(super) fn format_time(now: Timestamp) -> String {
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// JSON with object keys sorted, whatever order the map keeps, for stable hashes.
pub(super) fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        Value::String(k.clone()),
                        canonical_json(&map[k.as_str()])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}
